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
import re
import shlex
import shutil
import string
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pretrain.cluster.status import ACTIVE, latest_checkpoint, read_jsonl, slurm_jobs
from pretrain.config.load import SCHEMAS, load_config, save_resolved, stage_of_file
from pretrain.errors import CheckpointError
from pretrain.runs.drift import ABSENT, check_resume, has_checkpoint

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"
# `pretrain <command>` → its schema's key in SCHEMAS (`add-task` → `add_task`)
COMMANDS = {name.replace("_", "-"): name for name in SCHEMAS}
# the command's arguments before its config, from the frozen config: (what a bad value is reported as, the value)
LEADING_ARGS: dict[str, Callable[[Any], list[tuple[str, str]]]] = {
    "add-task": lambda cfg: [("add_task.model", cfg.add_task.model)],
}
# what a stage does to its config before its own drift check (fine-tuning adopts its backbone record): called with
# (config, run dir), changes the config in place, returns the keys the run derives itself (fnmatch patterns)
ResumeView = Callable[[Any, Path], tuple[str, ...]]


class SubmitError(ValueError):
    """A reason not to submit, reported as one line (CLI exit code 2)."""


class SbatchTemplate(string.Template):
    """Only `${name}` with a lower-case name is a placeholder; every other `$` belongs to the shell."""

    flags = 0  # case-sensitive: `${SLURM_JOB_ID}` stays for bash
    pattern = r"\$(?:(?P<escaped>(?!))|(?P<named>(?!))|\{(?P<braced>[a-z][a-z0-9_]*)\}|(?P<invalid>(?!)))"


@dataclass
class JobOptions:
    """The sbatch side of a submission (CLI options of `pretrain submit`)."""

    nodes: int = 1
    gpus_per_node: str = "8"  # [TYPE:]COUNT; "0" = a CPU-only job
    tasks_per_node: int | None = None  # CPU-only jobs (gpus_per_node == 0); else one task per GPU
    cpus_per_task: int | None = None  # None = data.num_workers + 1 (the loader workers and the rank itself)
    mem: str | None = None
    time: str | None = None  # None = the partition's default limit
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    job_name: str | None = None
    signal_grace: int = 300
    max_requeues: int = 20
    sbatch_args: list[str] = field(default_factory=list)  # KEY=VALUE or KEY -> `#SBATCH --KEY=VALUE`
    python: str = ""  # the interpreter command the job runs `-m pretrain` with; "" = $PRETRAIN_PYTHON or this one.
    # Its words are shell-quoted into the script: no `$VAR`, `;` or `#` is interpreted on the node.
    template: str = ""  # "" = slurm/train.sbatch of this checkout


def gpu_count(gpus_per_node: str) -> int:
    """GPUs per node from `--gpus-per-node [TYPE:]COUNT` (SLURM's own syntax, e.g. `a100:8`)."""
    count = str(gpus_per_node).rpartition(":")[2]
    if not count.isdigit():
        raise SubmitError(f"--gpus-per-node {gpus_per_node!r}: expected [TYPE:]COUNT, e.g. 8 or a100:8")
    return int(count)


def tasks_per_node(opts: JobOptions) -> int:
    """One task per GPU; `--tasks-per-node` only on CPU-only jobs (`--gpus-per-node 0`, default 1)."""
    gpus = gpu_count(opts.gpus_per_node)
    if opts.nodes < 1 or (opts.tasks_per_node is not None and opts.tasks_per_node < 1):
        raise SubmitError(f"--nodes {opts.nodes} / --tasks-per-node {opts.tasks_per_node}: must be >= 1")
    if gpus == 0:
        return opts.tasks_per_node or 1
    if opts.tasks_per_node not in (None, gpus):
        raise SubmitError(f"--tasks-per-node {opts.tasks_per_node} with --gpus-per-node {opts.gpus_per_node}: "
                          "jobs run one task per GPU; --tasks-per-node is for CPU-only jobs (--gpus-per-node 0)")
    return gpus


def time_limit_s(limit: str) -> int | None:
    """SLURM's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds; None for unlimited."""
    if limit.strip().upper() in ("UNLIMITED", "INFINITE"):
        return None
    found = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", limit.strip())
    if not found:
        raise SubmitError(f"--time {limit!r}: expected minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S")
    days, a, b, c = (int(g) if g else None for g in found.groups())
    if days is not None:  # D-H[:M[:S]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:
        return a * 3600 + b * 60 + c
    return a * 60 + (b or 0)


def check_value(option: str, value: object) -> str:
    """`value` as text; SubmitError naming `option` when it holds a newline or another control character.

    A newline would end the line it is rendered into: in a `#SBATCH` line the rest becomes a shell command, and
    sbatch stops reading directives at the first line that is not a comment (the preemption signal among them).
    """
    text = str(value)
    bad = next((c for c in text if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise SubmitError(f"{option} {text!r}: a newline or other control character ({bad!r}) cannot go into the "
                          "job script")
    return text


def sbatch_value(option: str, value: object) -> str:
    """`value` as one word of an `#SBATCH` line, checked and quoted when needed.

    sbatch does not run these lines through a shell: it splits them at whitespace, honours '...' and "..." quotes
    and backslash escapes (also inside double quotes), and ends the line at an unquoted `#` (Slurm's
    `_get_argument`). A `hetjob` / `packjob` anywhere in such a line starts another component of a heterogeneous
    job, quoted or not, so such a value is refused.
    """
    text = check_value(option, value)
    if re.search("hetjob|packjob", text, re.IGNORECASE):
        raise SubmitError(f"{option} {text!r}: sbatch reads 'hetjob'/'packjob' anywhere in an #SBATCH line as the "
                          "start of another job component; choose a value without it")
    if text and not re.search(r"[\s\"'\\#]", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def output_pattern(run_dir: Path) -> str:
    """The `--output` filename pattern of the job log, `<run_dir>/slurm/%j.log`: a `%` of the path is doubled (sbatch
    replaces `%j`, `%x`, ... in it); a backslash is refused, since sbatch then replaces nothing, `%j` included."""
    text = check_value("output_dir", run_dir)
    if "\\" in text:
        raise SubmitError(f"output_dir {text!r}: a backslash in the path turns off sbatch's %j in --output; choose an "
                          "output_dir without one")
    return text.replace("%", "%%") + "/slurm/%j.log"


def python_words(command: str, option: str) -> str:
    """The interpreter command for the srun line, each word shell-quoted: `;`, `#`, `$(...)` or a quote in it stay
    literal (a container prefix such as `apptainer exec --nv image.sif python` is words, not shell code)."""
    try:
        words = shlex.split(check_value(option, command))
    except ValueError as exc:
        raise SubmitError(f"{option} {command!r}: not a command line ({exc})") from None
    if not words:
        raise SubmitError(f"{option} {command!r}: empty interpreter command")
    return shlex.join(words)


def sbatch_lines(opts: JobOptions) -> list[str]:
    """The optional `#SBATCH` lines (only options that were given)."""
    pairs = [("gpus-per-node", opts.gpus_per_node if gpu_count(opts.gpus_per_node) else None), ("mem", opts.mem),
             ("time", opts.time), ("partition", opts.partition), ("account", opts.account), ("qos", opts.qos),
             ("constraint", opts.constraint), ("exclude", opts.exclude)]
    for item in opts.sbatch_args:
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9-]*", key) or re.search("hetjob|packjob", key, re.IGNORECASE):
            raise SubmitError(f"--sbatch-arg {item!r}: expected KEY=VALUE (or KEY) with an sbatch option name as KEY")
        pairs.append((key, value if eq else ""))
    lines = []
    for key, value in pairs:
        if value is None:
            continue
        lines.append(f"#SBATCH --{key}={sbatch_value(f'--{key}', value)}" if value != "" else f"#SBATCH --{key}")
    return lines


def _integer(option: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SubmitError(f"{option} {value!r}: expected an integer")
    return value


def render(text: str, *, subcommand: str, run_dir: Path, cpus_per_task: int, opts: JobOptions,
           leading: list[tuple[str, str]] = ()) -> str:
    """Fill the template's placeholders; raises SubmitError naming an unknown placeholder or the option whose value
    cannot be rendered safely.

    Every value is checked (`check_value`) and quoted for where it goes: `#SBATCH` values as sbatch reads them
    (`sbatch_value`: `job_name`, `log`, `workdir`, `sbatch_options`), shell words with `shlex` (`run_dir`,
    `python`, `arguments`), numbers as integers; `subcommand` is one of `COMMANDS`. `arguments` is the command's
    argument list: `leading` ((option, value) pairs, e.g. add-task's MODEL), then `"$RUN_DIR/config.yaml"`.
    """
    if subcommand not in COMMANDS:
        raise SubmitError(f"`pretrain {subcommand}` does not exist in this version: nothing submitted")
    if leading and "${arguments}" not in text:  # a template copied before `${arguments}` would drop MODEL
        raise SubmitError(f"`pretrain {subcommand}` needs {', '.join(o for o, _ in leading)} before its config, but "
                          "the job template has no ${arguments}: run `pretrain ${subcommand} ${arguments}` as "
                          "slurm/train.sbatch does")
    run = check_value("output_dir", run_dir)
    python_option = "--python" if opts.python else "PRETRAIN_PYTHON"
    python = opts.python or os.environ.get("PRETRAIN_PYTHON")
    values = {
        "subcommand": subcommand, "run_dir": shlex.quote(run),
        "arguments": " ".join([*(shlex.quote(check_value(o, v)) for o, v in leading), '"$RUN_DIR/config.yaml"']),
        "log": sbatch_value("output_dir", output_pattern(run_dir)),
        "job_name": sbatch_value("--job-name", opts.job_name or f"{subcommand}-{run_dir.name}"),
        "nodes": _integer("--nodes", opts.nodes), "tasks_per_node": tasks_per_node(opts),
        "cpus_per_task": _integer("--cpus-per-task", cpus_per_task),
        "signal_grace": _integer("--signal-grace", opts.signal_grace),
        "max_requeues": _integer("--max-requeues", opts.max_requeues),
        "workdir": sbatch_value("the working directory", os.getcwd()),
        "sbatch_options": "\n".join(sbatch_lines(opts)),
        "python": python_words(python or shlex.quote(sys.executable), python_option if python else "sys.executable"),
    }
    try:
        return SbatchTemplate(text).substitute(values)
    except KeyError as exc:
        raise SubmitError(f"job template has an unknown placeholder ${{{exc.args[0]}}}; known: "
                          f"{', '.join(sorted(values))}") from None


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
