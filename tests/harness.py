"""Test helpers shared by the test modules: free ports, scaled timeouts, subprocesses that cannot outlive their test,
and the 2-rank torchrun launcher with its JSON summary line.

Every child runs in its own session (process group), so a timeout kills the launcher AND every rank it started: a
leftover rank can never keep a port or a shared-memory segment alive for the next test. torchrun's rendezvous binds
port 0 (`--rdzv-endpoint 127.0.0.1:0`) and the ranks join that already-bound store, so no two launches can collide,
whatever else runs on the machine.

`PRETRAIN_TEST_TIMEOUT_SCALE` (default 1) multiplies every timeout; the defaults leave >= 3x headroom over the
durations measured on 2 idle cores, so a machine 3x slower passes without setting it.

Tests start processes only through `run`, `run_ranks` or `popen` (+ `communicate` / `kill_group`), and scale their
own waits with `scaled`: tests/test_harness.py fails on any other `subprocess` / `os` process call under tests/
(outside the few files it names, with the reason).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "dist_scripts"
SUMMARY_PREFIX = "SUMMARY "
TAIL_CHARS = 3000
PORT_CLASH = ("EADDRINUSE", "address already in use", "Address already in use")


def free_port(low: int | None = None, high: int | None = None) -> int:
    """A TCP port free on 127.0.0.1 right now, any (the OS picks) or drawn at random from [low, high) (for a port
    derived from something else, e.g. a SLURM job id: `dist.slurm_port`). torchrun launches use port 0 instead."""
    candidates = [0] if low is None else random.sample(range(low, high), min(200, high - low))
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise AssertionError(f"no free port in [{low}, {high}) after {len(candidates)} tries")


def retry_port_clash(launch: Callable[[], subprocess.CompletedProcess]) -> subprocess.CompletedProcess:
    """`launch()`, and once more if it failed because its port was taken meanwhile (`launch` must pick a new port
    each call): a port chosen free can be bound by someone else before the child binds it."""
    first = launch()
    if first.returncode != 0 and any(s in f"{first.stdout}{first.stderr}" for s in PORT_CLASH):
        return launch()
    return first


def timeout_scale() -> float:
    """`PRETRAIN_TEST_TIMEOUT_SCALE` as a positive float (1 when unset)."""
    raw = os.environ.get("PRETRAIN_TEST_TIMEOUT_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(f"PRETRAIN_TEST_TIMEOUT_SCALE={raw!r} is not a number") from None
    if scale <= 0:
        raise ValueError(f"PRETRAIN_TEST_TIMEOUT_SCALE={raw!r} must be positive")
    return scale


def scaled(seconds: float) -> float:
    """`seconds` × `PRETRAIN_TEST_TIMEOUT_SCALE`: for a test's own waits (a deadline while polling a file)."""
    return seconds * timeout_scale()


def child_env(extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The test process's environment for a child: this checkout first on PYTHONPATH, CPU DeepSpeed, one thread,
    unbuffered output, and no inherited rank variables (a test run under torchrun or SLURM must not leak them);
    then `extra`, where None removes a variable (`{"OMP_NUM_THREADS": None}`: torch's default thread count)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "TORCHELASTIC_"))}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run(cmd: Sequence[str], *, timeout: float, env: Mapping[str, str | None] | None = None, cwd: Path = ROOT,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group, capturing text output; `timeout` (seconds) is multiplied by the scale.
    `env` is added to `child_env`; `input` is written to the child's stdin.

    On timeout the WHOLE group is killed (SIGKILL) and AssertionError shows the tails of stdout and stderr.
    A non-zero exit is returned, not raised: the caller decides what a failure means.
    """
    proc = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=child_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            stdin=None if input is None else subprocess.PIPE)
    out, err = communicate(proc, timeout=timeout, input=input)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def communicate(proc: subprocess.Popen, *, timeout: float,
                input: str | None = None) -> tuple[str | None, str | None]:
    """`proc.communicate()` within `timeout` × the scale, for a child from `popen` (or `run`); the group is killed
    afterwards in any case. On timeout AssertionError shows the tails of what the child wrote."""
    limit = scaled(timeout)
    try:
        return proc.communicate(input, timeout=limit)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {limit:.0f} s (PRETRAIN_TEST_TIMEOUT_SCALE={timeout_scale():g}): "
                             f"{' '.join(map(str, proc.args))}\n{tails(out, err)}") from None
    finally:
        kill_group(proc)  # a child that exited may have left grandchildren behind


def signal_once_logging(proc: subprocess.Popen, metrics: Path, *, wait: float, timeout: float) -> str | None:
    """SIGUSR1 to a training child once it has written `metrics` (its first logged step; or once it exited or `wait`
    × the scale passed), then `communicate` within `timeout`; returns its stderr. The group is killed in any case."""
    import signal
    import time

    deadline = time.monotonic() + scaled(wait)
    while not metrics.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    return communicate(proc, timeout=timeout)[1]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process of `proc`'s session (it was started with `start_new_session=True`)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def popen(cmd: Sequence[str], env: Mapping[str, str | None] | None = None, **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` in a new session with `child_env`, for tests that signal or kill a run mid-way.
    Pair it with `communicate(proc, timeout=...)`, or `kill_group(proc)` in a `finally`."""
    return subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=child_env(env), start_new_session=True, **kwargs)


def torchrun_cmd(script: str | Path, *args: str, nprocs: int = 2) -> list[str]:
    """A torchrun command on this host whose rendezvous store binds port 0 (the ranks reuse that store).
    `script="-m"` with the module as first arg runs a module: `torchrun_cmd("-m", "pretrain", "train", ...)`."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nprocs),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", uuid.uuid4().hex,
            "--local-addr", "127.0.0.1", "--tee", "3", str(script), *map(str, args)]


def run_ranks(script: str | Path, *args: str, nprocs: int = 2, timeout: float = 600,
              env: Mapping[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """Run `script` (a path, a name under tests/dist_scripts/, or "-m" + module in `args`) on `nprocs` gloo ranks.

    Each rank's lines carry torchrun's `[default<rank>]:` prefix. Raises AssertionError showing the tail of every
    rank's output when the launch fails or times out; returns the completed process otherwise.
    """
    if script != "-m" and not Path(script).is_absolute() and (SCRIPTS / script).is_file():
        script = SCRIPTS / script
    proc = run(torchrun_cmd(script, *args, nprocs=nprocs), timeout=timeout, env=env)
    if proc.returncode != 0:
        per_rank = "\n".join(f"--- rank {r} ---\n{rank_output(proc.stdout + proc.stderr, r)[-TAIL_CHARS:]}"
                             for r in range(nprocs))
        raise AssertionError(f"{script} on {nprocs} ranks exited {proc.returncode}\n{per_rank}\n"
                             f"--- launcher ---\n{proc.stderr[-TAIL_CHARS:]}")
    return proc


def rank_output(text: str, rank: int) -> str:
    """The lines of `rank` in torchrun's `--tee` output, prefix removed."""
    prefix = f"[default{rank}]:"
    return "\n".join(line[len(prefix):] for line in text.splitlines() if line.startswith(prefix))


def summary(text: str, rank: int | None = 0) -> dict:
    """The JSON of the last `SUMMARY {...}` line (of `rank`'s output when the text is torchrun's; None: plain text).
    Raises AssertionError when there is none (the script failed before its summary)."""
    lines = (rank_output(text, rank) if rank is not None else text).splitlines()
    found = [line[len(SUMMARY_PREFIX):] for line in lines if line.startswith(SUMMARY_PREFIX)]
    assert found, f"no {SUMMARY_PREFIX!r} line in:\n{text[-TAIL_CHARS:]}"
    # raw_decode: a line the tailer read before its newline arrived ends in the next read's `[defaultN]:` prefix
    return json.JSONDecoder().raw_decode(found[-1])[0]


def tails(out: str | None, err: str | None) -> str:
    return f"--- stdout ---\n{(out or '')[-TAIL_CHARS:]}\n--- stderr ---\n{(err or '')[-TAIL_CHARS:]}"
