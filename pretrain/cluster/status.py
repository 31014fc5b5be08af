"""`pretrain status RUN_DIR`: where is my run? Checkpoint, last metrics, speed and ETA, SLURM jobs, verdict.

Everything is read from the run directory (`config.yaml`, `checkpoints/latest`, `metrics.jsonl`,
`slurm/jobs.jsonl` written by `pretrain submit`, `slurm/attempts.jsonl` written by the job script, the job logs)
plus one `scontrol show job` when SLURM answers. A run directory can be half-written at any moment (a job is
writing it, a save was killed): every missing or torn piece is reported as unknown (None), never raised.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

# `checkpoint.TAG_RE` and `checkpoint.read_latest` say the same; importing pretrain.runs.checkpoint pulls in torch and
# DeepSpeed (~6 s), too slow for a status line, and read_latest raises on a half-written directory.
TAG_RE = re.compile(r"step_(\d{8})$")
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"}
JOB_FIELDS = ("JobState", "Reason", "Restarts", "ExitCode", "RunTime", "TimeLimit", "StartTime", "NodeList")
EXIT_VERDICTS = {0: "stopped", 3: "aborted", 75: "preempted"}  # pretrain.training.signals: EXIT_ABORT, EXIT_REQUEUE
ATTEMPT_HEADER = re.compile(r"^=== pretrain: job \d+ attempt \d+ \(", re.MULTILINE)  # slurm/train.sbatch
RUN_START = re.compile(r"training steps \d+ → \d+")  # pretrain/training/train.py's first line of every run (rank logs)
LOG_MARKERS = (("aborting:", "aborted"), ("stopped by signal", "preempted"), ("run already complete", "finished"))
# what srun and slurmstepd print when SLURM declares a node of the job dead (slurmd unreachable for SlurmdTimeout)
NODE_FAILURE_RES = (re.compile(r"srun: error: Node failure on (\S+)"),
                    re.compile(r"\*\*\* JOB \d+ ON (\S+) CANCELLED AT \S+ DUE TO NODE FAILURE"))
PEER_LEFT = "another rank failed and left the job"  # pretrain.errors: the survivors' line (exit 9)
# the error lines worth showing, best first: what the run said (a Python exception, a `pretrain` one-liner), then
# what srun or the job script said about it
ERROR_RES = (re.compile(r"^([\w.]*(Error|Exception)(:.*)?|pretrain \w+: error: .*)$"),
             re.compile(r"^(srun|slurmstepd\S*|pretrain): error: .*$"))


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file; a missing file is [], torn or foreign lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def latest_checkpoint(run_dir: Path) -> dict | None:
    """{step, tag, time} of the committed checkpoint (`checkpoints/latest` → an existing tag dir), or None."""
    ckpt_dir = run_dir / "checkpoints"
    try:
        tag = (ckpt_dir / "latest").read_text(errors="replace").strip()
        found = TAG_RE.match(tag)
        if not found or not (ckpt_dir / tag).is_dir():
            return None
        return {"step": int(found.group(1)), "tag": tag, "time": (ckpt_dir / "latest").stat().st_mtime}
    except OSError:
        return None


def max_steps(run_dir: Path) -> int | None:
    """train.max_steps of the run's resolved config.yaml, or None when it is missing or unreadable."""
    from pretrain.config.load import load_config, schema_of_file

    try:
        path = run_dir / "config.yaml"
        return load_config(path, schema=schema_of_file(path)).train.max_steps
    except Exception:  # ConfigError, OSError, or whatever a torn or foreign file raises: never crash status
        return None


def last_metrics(records: list[dict]) -> dict[str, dict]:
    """Last logged value of every `loss/*` and `eval/*` key: {key: {value, step}}."""
    last = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(("loss/", "eval/")):
                last[key] = {"value": value, "step": record.get("step")}
    return last


def speed(records: list[dict], target: int | None) -> dict:
    """steps/s over the last logging window (the last two training records) and the ETA to `target` steps."""
    train = [r for r in records
             if "lr" in r and isinstance(r.get("step"), int) and isinstance(r.get("time"), (int, float))]
    out: dict[str, Any] = {"last_step": train[-1]["step"] if train else None, "steps_per_s": None, "eta_s": None}
    if len(train) >= 2 and train[-1]["step"] > train[-2]["step"] and train[-1]["time"] > train[-2]["time"]:
        rate = (train[-1]["step"] - train[-2]["step"]) / (train[-1]["time"] - train[-2]["time"])
        out["steps_per_s"] = rate
        if target is not None:
            out["eta_s"] = max(0, target - train[-1]["step"]) / rate
    return out


def slurm_jobs(job_ids: list[str]) -> dict[str, dict] | None:
    """{job id: {JobState, Reason, Restarts, ...}} from `scontrol show job`; None when SLURM does not answer.

    A job missing from the answer ended longer ago than SLURM's MinJobAge (300 s by default) and is forgotten.
    """
    if not job_ids or shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    jobs = {}
    for line in out.stdout.splitlines():
        fields = dict(re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(\S*)", line))
        if fields.get("JobId") in job_ids:
            jobs[fields["JobId"]] = {k: fields.get(k) for k in JOB_FIELDS}
    return jobs


def last_attempt_log(log: Path) -> str:
    """The text of a log from its last attempt's start (the job script's header, else the training loop's first
    line in a rank log) on; '' when it cannot be read."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 256 * 1024))  # the tail is enough; logs of long runs grow large
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    headers = list(ATTEMPT_HEADER.finditer(text)) or list(RUN_START.finditer(text))
    return text[headers[-1].start():] if headers else text


def log_findings(text: str) -> dict:
    """What an attempt's log says: a verdict marker from the training loop, the last error line, the nodes SLURM
    declared failed (srun's "Node failure on NODE"; the other ranks' error then only says a peer left) and whether a
    rank reported that another one left the job."""
    verdict = next((v for marker, v in LOG_MARKERS if marker in text), None)
    lost = list(dict.fromkeys(NODE_FAILURE_RES[0].findall(text)))  # slurmstepd's line names the node that cancels
    found = {"verdict": verdict, "error": None, "lost_nodes": lost, "peer_left": PEER_LEFT in text,
             "node_failure": bool(lost or NODE_FAILURE_RES[1].search(text))}
    lines = [line.strip() for line in text.splitlines()]
    for pattern in ERROR_RES:
        errors = [line for line in lines if pattern.search(line)]
        if errors:
            return {**found, "error": errors[-1]}
    return found


def node_failure(found: dict, job_id: object) -> str:
    """The one-line account of an attempt that lost a node (`found`: `log_findings` of its log)."""
    others = ("; the ranks on the other nodes stopped (exit 9: another rank left the job)" if found["peer_left"]
              else "")
    nodes = f"node {', '.join(found['lost_nodes'])}" if found["lost_nodes"] else "a node (see slurmctld's log)"
    return f"{nodes} failed during job {job_id}{others}"


def attempt_verdict(attempt: dict) -> str:
    """What one attempt record of the job script says: preempted | stopped | aborted | failed."""
    action = str(attempt.get("action", ""))
    if action in ("requeued", "not requeued", "requeue failed"):  # stopped on a signal, checkpoint written
        return "preempted"
    if action.startswith("not requeued:"):  # SLURM was ending the job: scancel, or out of time before the save
        return "stopped"
    return EXIT_VERDICTS.get(attempt.get("rc"), "failed")


def verdict(report: dict) -> tuple[str, str]:
    """(state, one-line detail): finished | running | preempted | node_failed | pending | aborted | failed | stopped
    | unknown.

    preempted: the last attempt stopped on a signal with its checkpoint written (exit 75), and the job waits
    requeued or was not requeued (--max-requeues reached). node_failed: SLURM declared a node of the last attempt
    dead; a `--requeue` job (every `pretrain submit` job) is requeued by SLURM itself and resumes from the last
    complete checkpoint. stopped: it ended without reaching train.max_steps and without an error (scancel, out of
    time before the save could finish, an earlier max_steps).
    """
    ckpt, target, attempt, found = report["checkpoint"], report["max_steps"], report["last_attempt"], report["log"]
    if ckpt and target is not None and ckpt["step"] >= target:
        return "finished", f"checkpoint at step {ckpt['step']} = train.max_steps"
    resume = f"resumes from checkpoint {ckpt['tag']}" if ckpt else "starts the run again (no checkpoint yet)"
    for job in reversed(report["jobs"]):
        s = job["slurm"] or {}
        if s.get("JobState") == "COMPLETING" and job["attempts"]:
            break  # its attempt record is written: that says more
        if s.get("JobState") in ACTIVE:
            detail = f"job {job['job_id']} {s['JobState']} (reason {s.get('Reason')}), requeued {s.get('Restarts')}×"
            if s["JobState"] not in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
                return "running", detail
            if found.get("node_failure") and job is report["jobs"][-1]:  # the log read is this job's
                return "node_failed", f"{node_failure(found, job['job_id'])}; SLURM requeued the job, it {resume} " \
                                      f"once the nodes are up: {detail}"
            was_preempted = job["attempts"] and attempt_verdict(job["attempts"][-1]) == "preempted"
            return ("preempted" if was_preempted else "pending"), detail
    if found.get("node_failure"):  # the job ended (NODE_FAIL, not requeued) or SLURM is still ending the attempt
        job_id = report["jobs"][-1]["job_id"] if report["jobs"] else None
        state = ((report["jobs"][-1]["slurm"] or {}) if report["jobs"] else {}).get("JobState")
        then = "not requeued: resubmit" if report["slurm_answered"] else \
            "SLURM does not answer here; unless it requeued the job, resubmit"
        if state in ACTIVE:
            then = f"SLURM is ending the attempt ({state}); unless it requeues the job, resubmit"
        return "node_failed", f"{node_failure(found, job_id)}; {then} (the same `pretrain submit` command), the " \
                              f"run {resume}"
    if attempt is not None:
        state = attempt_verdict(attempt)
        state = "aborted" if found["verdict"] == "aborted" else state
        detail = f"job {attempt.get('job_id')} attempt {attempt.get('attempt')} exited {attempt.get('rc')}" \
                 f" ({attempt.get('action')})"
        return state, detail + (f": {found['error']}" if state == "failed" and found["error"] else "")
    if found["verdict"] or found["error"]:
        return found["verdict"] or "failed", found["error"] or f"from {found['path']}"
    return "unknown", "no SLURM job or log says more" if ckpt or report["metrics"] else "nothing written yet"


def collect(run_dir: str | Path, use_slurm: bool = True) -> dict:
    """Everything `pretrain status` shows, as plain JSON-able data (None = unknown)."""
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    target = max_steps(run_dir)
    submitted = read_jsonl(run_dir / "slurm" / "jobs.jsonl")
    attempts = read_jsonl(run_dir / "slurm" / "attempts.jsonl")
    ids = [str(j["job_id"]) for j in submitted if "job_id" in j]
    known = slurm_jobs(ids) if use_slurm else None
    jobs = [{"job_id": i, "log": str(run_dir / "slurm" / f"{i}.log"), "slurm": (known or {}).get(i),
             "attempts": [a for a in attempts if str(a.get("job_id")) == i]} for i in ids]
    log = Path(jobs[-1]["log"]) if jobs else run_dir / "logs" / "rank0.log"
    report = {
        "run_dir": str(run_dir), "max_steps": target, "checkpoint": latest_checkpoint(run_dir),
        "metrics": last_metrics(records), "speed": speed(records, target), "jobs": jobs,
        "slurm_answered": known is not None, "last_attempt": attempts[-1] if attempts else None,
        "log": {"path": str(log), **log_findings(last_attempt_log(log))},
    }
    report["state"], report["detail"] = verdict(report)
    return report


def _ago(t: float | None) -> str:
    if t is None:
        return "unknown"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    return f"{stamp} ({_duration(time.time() - t)} ago)"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_report(report: dict) -> str:
    """The one-screen text form of `collect`'s report."""
    ckpt, target, sp = report["checkpoint"], report["max_steps"], report["speed"]
    of = f" / {target}" if target is not None else " (train.max_steps unknown: no readable config.yaml)"
    lines = [f"run         {report['run_dir']}", f"state       {report['state']}: {report['detail']}",
             "checkpoint  " + (f"step {ckpt['step']}{of}, saved {_ago(ckpt['time'])}" if ckpt else "none")]
    rate = f"{sp['steps_per_s']:.3g} steps/s over the last logging window" if sp["steps_per_s"] else "speed unknown"
    eta = f", ETA {_duration(sp['eta_s'])}" if sp["eta_s"] is not None and report["state"] != "finished" else ""
    lines.append(f"logged      step {sp['last_step'] if sp['last_step'] is not None else 'none'}; {rate}{eta}")
    for prefix, title in (("loss/", "losses"), ("eval/", "eval")):
        # one loss per task (their parts, e.g. loss/det/det_loss_box_reg, are in --json); every eval metric
        shown = {k: m for k, m in sorted(report["metrics"].items())
                 if k.startswith(prefix) and (prefix == "eval/" or k.count("/") == 1)}
        items = [f"{k.removeprefix(prefix)} {_value(m['value'])} (step {m['step']})" for k, m in shown.items()]
        if items:
            lines.append(f"{title:<11} " + ", ".join(items))
    if report["jobs"] and not report["slurm_answered"]:
        lines.append("jobs        (SLURM does not answer here: job states unknown)")
    for job in report["jobs"]:
        s = job["slurm"] or {}
        state = f"{s.get('JobState')} reason={s.get('Reason')} restarts={s.get('Restarts')} " \
                f"exit={s.get('ExitCode')} runtime={s.get('RunTime')}" if s else "not known to SLURM (ended)"
        tries = ", ".join(f"#{a.get('attempt')} exit {a.get('rc')} {a.get('action')}" for a in job["attempts"])
        lines.append(f"job {job['job_id']:<7} {state}" + (f"; attempts: {tries}" if tries else ""))
    if report["log"]["error"]:
        lines.append(f"last error  {report['log']['error']}")
    log = report["log"]["path"]
    lines.append(f"log         tail -f {log}" if Path(log).is_file() else f"log         none yet ({log})")
    return "\n".join(lines)
