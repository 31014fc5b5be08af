"""`pretrain submit`: validate a run config, freeze it into output_dir, render the SLURM job script and sbatch it.

Nothing reaches the queue before the config and overrides are valid, and a run dir that already holds a checkpoint
takes only a config its run would resume with (`check_resubmission`). The job runs `pretrain <subcommand> [MODEL]
<output_dir>/config.yaml`, the resolved config written at submission (add-task's MODEL is that config's
`add_task.model`, made absolute), so editing the YAML afterwards changes nothing. Each submission leaves
`output_dir/slurm/<job_id>.sbatch` (the exact script) and one line in `output_dir/slurm/jobs.jsonl`; the job appends
its log to `output_dir/slurm/<job_id>.log`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pretrain.cluster.render import (
    COMMANDS,
    TEMPLATE,
    JobOptions,
    SubmitError,
    check_value,
    render,
    tasks_per_node,
    time_limit_s,
)
from pretrain.cluster.status import ACTIVE, latest_checkpoint, read_jsonl, slurm_jobs
from pretrain.config.load import SCHEMAS, load_config, save_resolved, stage_of_file
from pretrain.errors import CheckpointError
from pretrain.runs.drift import ABSENT, check_resume, has_checkpoint

# the command's arguments before its config, from the frozen config: (what a bad value is reported as, the value)
LEADING_ARGS: dict[str, Callable[[Any], list[tuple[str, str]]]] = {
    "add-task": lambda cfg: [("add_task.model", cfg.add_task.model)],
}
# what a stage does to its config before its own drift check (fine-tuning adopts its backbone record): called with
# (config, run dir), changes the config in place, returns the keys the run derives itself (fnmatch patterns)
ResumeView = Callable[[Any, Path], tuple[str, ...]]


def refuse_busy_or_done(run_dir: Path, target: int) -> None:
    """Refuse a run dir that already holds a finished run or that a queued/running job is training."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt and ckpt["step"] >= target:
        raise SubmitError(f"{run_dir} already holds a finished run (checkpoint {ckpt['tag']} >= train.max_steps="
                          f"{target}); raise train.max_steps to continue it, or pass --force")
    ids = [str(j["job_id"]) for j in read_jsonl(run_dir / "slurm" / "jobs.jsonl") if "job_id" in j]
    for job_id, job in (slurm_jobs(ids) or {}).items():
        if job["JobState"] in ACTIVE:
            raise SubmitError(f"job {job_id} ({job['JobState']}) already trains {run_dir}; two jobs must not share "
                              f"a run dir: wait, `scancel {job_id}`, chain with --dependency afterany:{job_id} "
                              "--force, or pass --force")


def sbatch(script: Path, dependency: str | None) -> tuple[str, list[str]]:
    """Submit `script`; returns (job id, the command). Raises SubmitError with sbatch's own message."""
    cmd = ["sbatch", "--parsable", *([f"--dependency={dependency}"] if dependency else []), str(script)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise SubmitError("sbatch did not answer within 120 s (is slurmctld up?)") from None
    job_id = out.stdout.strip().split(";")[0]
    if out.returncode != 0 or not job_id.isdigit():
        message = " ".join(out.stderr.split()) or f"exit code {out.returncode}, output {out.stdout.strip()!r}"
        raise SubmitError(f"sbatch refused the job: {message}")
    return job_id, cmd


def check_model(model: str) -> str:
    """`add_task.model` made absolute; SubmitError naming it unless it is what `pretrain add-task` reads: a
    pretraining run directory with a checkpoint, or a `pretrain export` model file (kind `model`)."""
    if not model:
        raise SubmitError("add_task.model: name the trained model (pretrain submit add-task MODEL CONFIG): "
                          "nothing submitted")
    path = Path(os.path.abspath(check_value("add_task.model", model)))
    if path.is_dir():
        saved = path / "config.yaml"
        if not saved.is_file() or stage_of_file(saved) is not None or not has_checkpoint(path):
            raise SubmitError(f"MODEL {model}: not a pretraining run directory with a checkpoint (tasks are added to "
                              "a whole pretraining model: a run directory or a `pretrain export` file): nothing "
                              "submitted")
    elif path.is_file():
        from pretrain.runs.portable import read_meta  # torch: only for a file MODEL

        try:
            kind = read_meta(path).get("kind")
        except ValueError as exc:
            raise SubmitError(f"MODEL {exc}: nothing submitted") from None
        if kind != "model":
            raise SubmitError(f"MODEL {model} is a {kind} file: tasks are added to a whole pretraining model (a run "
                              "directory or a `pretrain export` file): nothing submitted")
    else:
        raise SubmitError(f"MODEL {model}: no such run directory or model file: nothing submitted")
    return str(path)


def check_resubmission(cfg: Any, run_dir: Path, view: ResumeView | None = None) -> Any:
    """The config to freeze for a run dir that already holds a checkpoint; the drift check's ConfigError (one line,
    the keys old → new) when its run would refuse to resume with it. A new run dir keeps `cfg` as it is.

    `view` does what the stage does before its own check (`pretrain finetune` adopts its backbone record into the
    config and leaves the keys its source defines to it), so a legitimate resubmission passes here as it would on
    the node. The keys the run derives itself keep the saved values: the job reads nothing but this file, so it must
    carry the new safe values (a raised train.max_steps), and the source's `model` / `moe` sections the run's first
    start wrote stay in it rather than the overlay's, which the run never trained (config.yaml keeps telling the
    truth, and the next resume compares against the same sections).
    """
    if not has_checkpoint(run_dir) or not (run_dir / "config.yaml").is_file():
        return cfg
    try:
        ignore = view(cfg, run_dir) if view else ()
    except (ValueError, CheckpointError) as exc:  # a damaged backbone record names its file
        raise SubmitError(f"{exc}: nothing submitted") from None
    diff = check_resume(cfg, run_dir, ignore=ignore)
    kept = {key: old for key, (old, new) in diff.items()  # a key one side lacks stays the schema's
            if old is not ABSENT and new is not ABSENT and any(fnmatchcase(key, pattern) for pattern in ignore)}
    if not kept:
        return cfg
    merged = OmegaConf.structured(cfg)
    for key, old in kept.items():
        OmegaConf.update(merged, key, old, merge=False)
    return OmegaConf.to_object(merged)


def prepare(subcommand: str, config: str, overrides: list[str], opts: JobOptions, *, chain: int = 1,
            force: bool = False, view: ResumeView | None = None) -> tuple[object, Path, str]:
    """Validate everything a submission needs; returns (resolved config, absolute run dir, rendered script).

    `subcommand` is a `COMMANDS` name; `view` is its stage's `ResumeView` (`check_resubmission`).
    Raises ConfigError / SubmitError; writes nothing.
    """
    if subcommand not in COMMANDS:
        raise SubmitError(f"`pretrain {subcommand}` does not exist in this version: nothing submitted")
    cfg = load_config(config, overrides, schema=SCHEMAS[COMMANDS[subcommand]])
    if subcommand == "add-task":
        cfg.add_task.model = check_model(cfg.add_task.model)
    run_dir = Path(os.path.abspath(cfg.output_dir))
    cfg = check_resubmission(cfg, run_dir, view)
    ranks = opts.nodes * tasks_per_node(opts)
    if ranks % cfg.engine.ep_size:
        raise SubmitError(f"engine.ep_size={cfg.engine.ep_size} does not divide the job's {ranks} ranks")
    partitions = getattr(getattr(cfg, "data", None), "partitions", 0)  # pretraining configs (data.partitions)
    if partitions and partitions % ranks:
        raise SubmitError(f"the job's {ranks} ranks do not divide data.partitions={partitions}: each rank serves "
                          "partitions / ranks of them; choose --nodes/--tasks-per-node accordingly")
    if chain < 1 or opts.signal_grace < 1 or opts.max_requeues < 0:
        raise SubmitError("--chain and --signal-grace must be >= 1, --max-requeues >= 0")
    limit = time_limit_s(opts.time) if opts.time else None
    if limit is not None and opts.signal_grace + 60 >= limit:
        raise SubmitError(f"--signal-grace {opts.signal_grace} s plus up to 60 s of SLURM's signal timing leave no "
                          f"time to train within --time {opts.time} ({limit} s)")
    if not force:
        refuse_busy_or_done(run_dir, cfg.train.max_steps)
    template = Path(opts.template) if opts.template else TEMPLATE
    if not template.is_file():
        raise SubmitError(f"job template {template} not found (pass --template FILE)")
    cpus = opts.cpus_per_task or cfg.data.num_workers + 1
    leading = LEADING_ARGS[subcommand](cfg) if subcommand in LEADING_ARGS else []
    return cfg, run_dir, render(template.read_text(), subcommand=subcommand, run_dir=run_dir, cpus_per_task=cpus,
                                opts=opts, leading=leading)


def submit(subcommand: str, config: str, overrides: list[str], opts: JobOptions, *, chain: int = 1,
           dependency: str | None = None, dry_run: bool = False, force: bool = False,
           argv: list[str] | None = None, view: ResumeView | None = None) -> tuple[Path, list[str]]:
    """Validate, freeze the config into output_dir, and sbatch `chain` jobs (each after the previous one ends).

    Returns (run dir, job ids); a dry run prints the script and the sbatch commands and returns no ids.
    """
    cfg, run_dir, script = prepare(subcommand, config, overrides, opts, chain=chain, force=force, view=view)
    slurm_dir = run_dir / "slurm"
    if dry_run:
        print(script)
        for dep in [dependency] + [f"afterany:<job {i}>" for i in range(1, chain)]:
            print(shlex.join(["sbatch", "--parsable", *([f"--dependency={dep}"] if dep else []),
                              str(slurm_dir / "<job id>.sbatch")]))
        return run_dir, []
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found on PATH: submit from a SLURM login node (--dry-run shows the job script)")
    save_resolved(cfg, run_dir)
    slurm_dir.mkdir(exist_ok=True)
    job_ids = []
    for _ in range(chain):
        pending = slurm_dir / f".submit-{os.getpid()}.sbatch"  # named after the job once sbatch tells its id
        pending.write_text(script)
        try:
            job_id, cmd = sbatch(pending, dependency)
        except SubmitError as exc:
            pending.unlink()
            if job_ids:
                raise SubmitError(f"{exc} (already queued: job {', '.join(job_ids)})") from None
            raise
        final = slurm_dir / f"{job_id}.sbatch"
        pending.replace(final)  # sbatch has sent the script's text to slurmctld; requeues use that copy
        record = {"job_id": job_id, "time": time.time(), "argv": argv or sys.argv, "script": str(final),
                  "sbatch": [*cmd[:-1], str(final)]}
        with open(slurm_dir / "jobs.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        job_ids.append(job_id)
        dependency = f"afterany:{job_id}"
    return run_dir, job_ids


def summary(run_dir: Path, job_ids: list[str]) -> str:
    """What to tell the user after a submission: the job ids, the log and how to follow the run."""
    chained = f" (each after the previous one ends: {' -> '.join(job_ids)})" if len(job_ids) > 1 else ""
    log = run_dir / "slurm" / f"{job_ids[0]}.log"
    others = f" (one log per job, {run_dir / 'slurm'}/<job id>.log)" if len(job_ids) > 1 else ""
    return "\n".join([f"submitted job {', '.join(job_ids)}{chained}", f"log:    {log}{others}",
                      f"follow: tail -f {shlex.quote(str(log))}",
                      f"status: pretrain status {shlex.quote(str(run_dir))}"])
