"""The SLURM job script of a submission: `JobOptions` (the sbatch side of `pretrain submit`) and `render`, which fills
the template (`slurm/train.sbatch`) with every value checked and quoted for where it goes.

A value with a newline or a control character, an `#SBATCH` word sbatch would read as another job component, or a
placeholder the template does not know is a `SubmitError` naming the option: nothing reaches the queue half-quoted.
"""

from __future__ import annotations

import os
import re
import shlex
import string
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.config.load import SCHEMAS

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"
# `pretrain <command>` → its schema's key in SCHEMAS (`add-task` → `add_task`)
COMMANDS = {name.replace("_", "-"): name for name in SCHEMAS}


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


# `pretrain submit` options: (flag, type, help); defaults live in JobOptions above
SUBMIT_OPTIONS = [
    ("--nodes", int, "nodes (default 1)"),
    ("--gpus-per-node", str, "[TYPE:]COUNT GPUs per node = tasks per node (default 8; 0 = CPU-only job)"),
    ("--tasks-per-node", int, "ranks per node of a CPU-only job (--gpus-per-node 0; default 1)"),
    ("--cpus-per-task", int, "CPUs per rank (default data.num_workers + 1)"),
    ("--mem", str, "memory per node, e.g. 400G"),
    ("--time", str, "time limit per attempt, e.g. 24:00:00 (default: the partition's)"),
    ("--partition", str, None), ("--account", str, None), ("--qos", str, None), ("--constraint", str, None),
    ("--exclude", str, "nodes to avoid"),
    ("--job-name", str, "default <subcommand>-<output_dir name>"),
    ("--signal-grace", int, "seconds before the time limit that USR1 asks for a checkpoint (default 300)"),
    ("--max-requeues", int, "requeue at most this many times (default 20)"),
    ("--python", str, "interpreter command the job runs `-m pretrain` with (default: this one)"),
    ("--template", str, "job script template (default slurm/train.sbatch)"),
]


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
