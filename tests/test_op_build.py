"""DeepSpeed's JIT-built CPU op: one cache per Python environment, and a stop signal during its build is a clean stop.

The real build takes minutes, so the signal path is tested on a build step that torch's own ninja runner runs (a
build.ninja whose one rule sleeps) under `engine.init_distributed`, and, slow, on `pretrain train` stopped a few
seconds into a real build in an empty cache.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import communicate, kill_group, popen, scaled

import pretrain.parallel.engine as engine
from pretrain import errors
from pretrain.training.signals import StopFlag, in_op_build

HOME_CACHE = "/home/u/.cache/torch_extensions"


def test_each_environment_has_its_own_op_cache():
    venv_a, venv_b = "/work/a/.venv", "/work/b/.venv"
    a = engine.op_cache_dir({}, venv_a, writable=True, user_cache=HOME_CACHE)
    b = engine.op_cache_dir({}, venv_b, writable=True, user_cache=HOME_CACHE)
    assert (a, b) == (f"{venv_a}/torch_extensions", f"{venv_b}/torch_extensions")
    # a prefix we cannot write (a system Python): one folder per prefix under the user's cache, the same every time
    ro_a = engine.op_cache_dir({}, "/usr", writable=False, user_cache=HOME_CACHE)
    ro_b = engine.op_cache_dir({}, "/opt/conda", writable=False, user_cache=HOME_CACHE)
    assert ro_a.startswith(f"{HOME_CACHE}/env-") and ro_b.startswith(f"{HOME_CACHE}/env-") and ro_a != ro_b
    assert ro_a == engine.op_cache_dir({}, "/usr", writable=False, user_cache=HOME_CACHE)
    # the user's choice wins; an empty value is no choice
    mine = {"TORCH_EXTENSIONS_DIR": "/scratch/ext"}
    assert engine.op_cache_dir(mine, venv_a, writable=True, user_cache=HOME_CACHE) == "/scratch/ext"
    assert engine.op_cache_dir({"TORCH_EXTENSIONS_DIR": ""}, venv_a, writable=True, user_cache=HOME_CACHE) == a


def test_prepare_op_build_sets_the_cache_and_ninja(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    cache = engine.prepare_op_build(env)
    assert env["TORCH_EXTENSIONS_DIR"] == cache
    if os.access(sys.prefix, os.W_OK):
        assert cache == os.path.join(sys.prefix, "torch_extensions")
    bin_dir = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(bin_dir, "ninja")):
        assert env["PATH"].split(os.pathsep)[0] == bin_dir
    assert engine.prepare_op_build({"TORCH_EXTENSIONS_DIR": str(tmp_path)}) == str(tmp_path)  # the user's, kept
    # this process imported pretrain.parallel.engine: torch builds DeepSpeed's op under the environment's cache
    from torch.utils.cpp_extension import _get_build_directory

    built = _get_build_directory("deepspeed_shm_comm", verbose=False)
    assert Path(built).parent == Path(os.environ["TORCH_EXTENSIONS_DIR"])


def _sleeping_build(build_dir: Path, started: Path) -> None:
    """What torch runs to build an op (`_run_ninja_build`: ninja in the build folder), on a rule that sleeps."""
    from torch.utils.cpp_extension import _run_ninja_build

    (build_dir / "build.ninja").write_text(f"rule slow\n  command = touch {started} && sleep 60\n"
                                           "build out.so: slow\n")
    _run_ninja_build(str(build_dir), verbose=False, error_prefix="Error building extension 'fake_op'")


def _signal_once(path: Path, sig: int) -> threading.Thread:
    """Send `sig` to this process once `path` exists (the build's rule has started)."""
    def wait_then_signal() -> None:
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=wait_then_signal, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_during_the_op_build_stops_at_once_with_75(monkeypatch, tmp_path, sig):
    started = tmp_path / "started"
    monkeypatch.setattr(engine.deepspeed, "init_distributed",
                        lambda **_: _sleeping_build(tmp_path, started))  # DeepSpeed builds its op here
    flag = StopFlag().install()
    t0 = time.time()
    try:
        thread = _signal_once(started, sig)
        with pytest.raises(errors.StoppedError) as info:
            engine.init_distributed("gloo")
        thread.join()
    finally:
        flag.uninstall()
    assert time.time() - t0 < 30  # not after the rule's 60 s: the build was left at once (ninja killed)
    code, line = errors.describe(info.value, "train")
    name = signal.Signals(sig).name
    assert code == errors.EXIT_REQUEUE == 75 and flag.requested and flag.signum == sig
    assert line.startswith(f"pretrain train: stopped: {name} arrived while DeepSpeed was building its op, before "
                           "the first step: nothing to checkpoint; exit 75") and "\n" not in line, line


def test_a_stop_signal_elsewhere_only_sets_the_flag(caplog):
    assert not in_op_build(sys._getframe())
    flag = StopFlag().install()
    try:
        signal.raise_signal(signal.SIGUSR1)  # no exception: the loop checkpoints after its step
    finally:
        flag.uninstall()
    assert flag.requested and "will checkpoint after this step and exit 75" in caplog.text


@pytest.mark.slow  # `pretrain train` until DeepSpeed starts building: ~15-40 s on 2 cores
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_train_stopped_during_a_real_op_build_exits_75_in_one_line(shards, tmp_path, sig):
    """SLURM (and torchrun) signal the whole process group: the rank and the build's ninja and compilers alike."""
    from test_train import _train_cmd

    cache = tmp_path / "ext"  # empty: this run must build the op
    proc = popen(_train_cmd(shards, tmp_path / "run", "train.max_steps=2"), {"TORCH_EXTENSIONS_DIR": str(cache)},
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + scaled(300)
        ninja = cache / "deepspeed_shm_comm" / "build.ninja"  # written just before torch starts ninja
        while time.time() < deadline and proc.poll() is None and not ninja.exists():
            time.sleep(0.1)
        assert proc.poll() is None and ninja.exists(), "the run ended or never started building the op"
        time.sleep(1)  # ninja and its compilers are running
        os.killpg(proc.pid, sig)
        out, err = communicate(proc, timeout=120)
    finally:
        kill_group(proc)
    name = signal.Signals(sig).name
    assert proc.returncode == 75, err[-3000:]
    assert f"pretrain train: stopped: {name} arrived while DeepSpeed was building its op" in err, err[-3000:]
    assert "internal error" not in err and "Traceback" not in err and "will checkpoint" not in err, err[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing saved


def test_a_stale_build_lock_is_removed_and_a_live_one_kept(tmp_path):
    """torch waits forever on a build's `lock`: one left by a killed build (older than the op it guards, or older
    than any build takes) is removed; a build in progress (lock newer than the op, recent) keeps its lock."""
    import os

    from pretrain.parallel.engine import STALE_LOCK_BUILT_S, STALE_LOCK_S, clear_stale_build_lock

    build = tmp_path / "deepspeed_shm_comm"
    build.mkdir()
    lock, op = build / "lock", build / "deepspeed_shm_comm.so"
    assert not clear_stale_build_lock(str(build), now=0.0)  # no lock
    lock.write_text("")
    op.write_bytes(b"\x7fELF")
    os.utime(lock, (100.0, 100.0))
    os.utime(op, (50.0, 50.0))  # an older op, a start (or a rebuild) running since t=100
    assert not clear_stale_build_lock(str(build), now=200.0) and lock.exists()
    assert clear_stale_build_lock(str(build), now=100.0 + STALE_LOCK_BUILT_S + 1) and not lock.exists()
    op.unlink()  # before the first build: a build may hold the lock for minutes
    lock.write_text("")
    os.utime(lock, (100.0, 100.0))
    assert not clear_stale_build_lock(str(build), now=100.0 + STALE_LOCK_BUILT_S + 1) and lock.exists()
    assert clear_stale_build_lock(str(build), now=100.0 + STALE_LOCK_S + 1) and not lock.exists()
    op.write_bytes(b"\x7fELF")
    lock.write_text("")
    os.utime(lock, (100.0, 100.0))
    os.utime(op, (300.0, 300.0))  # the op finished after the lock was taken: its build died before releasing
    assert clear_stale_build_lock(str(build), now=301.0) and not lock.exists()
