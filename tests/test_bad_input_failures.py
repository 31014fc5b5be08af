"""The bad-input matrix, failure rows: real failures, provoked in this process, and the exit code and one line each
becomes (`errors.describe`, what `cli.main` prints). Nothing is raised by hand: a full disk is /dev/full, Ctrl-C is a
real SIGINT, a loader worker's error comes from a real DataLoader worker, a stop signal lands in a real ninja run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from test_bad_input import check

from pretrain import errors
from pretrain.runs import checkpoint

FULL = Path("/dev/full")  # Linux: every write fails with ENOSPC. Only opened in place, never replaced: a writer that
# renames a temporary file over its target (safetensors' save_file) would turn the device into a regular file


def _consecutive(task: str = "cls", n: int = 3) -> None:
    """`n` undecodable samples in a row, counted as the stream's decode step counts them."""
    from pretrain.data.decode import decode_rgb
    from pretrain.data.sources import ErrorCounter

    counter = ErrorCounter(task, max_consecutive=n)
    for k in range(n):
        try:
            decode_rgb(b"not an image")
        except (ValueError, OSError) as exn:
            counter.record(exn, key=f"sample{k}")


def _ep_mismatch() -> None:
    from pretrain.config.pretraining import EngineConfig, OptimConfig
    from pretrain.parallel.engine import build_engine

    build_engine(torch.nn.Linear(1, 1), engine=EngineConfig(ep_size=2), optim=OptimConfig(), max_steps=1,
                 world_size=1)


def _rank_json(tmp: Path) -> None:
    checkpoint.write_rank_state(tmp, 0, {"step": 1})
    (tmp / "rank_00000.json").write_text('{"rank": 0, "state": ')
    checkpoint.read_rank_state(tmp, 0)


def _rank_tensors(tmp: Path) -> None:
    checkpoint.write_rank_state(tmp, 0, {"x": torch.zeros(3)})
    (tmp / "rank_00000.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    checkpoint.read_rank_state(tmp, 0)


def _disk_full() -> None:
    with FULL.open("wb") as f:  # buffered: the write fails at flush, as a real file's would
        f.write(b"checkpoint bytes")


def _zip_writer_full() -> None:
    torch.save({"w": torch.zeros(4096)}, FULL)  # torch's zip writer: "unexpected pos", not ENOSPC


def _unexpected() -> None:
    steps = [1, 2, 3]
    print(sum(steps) / len(steps[3:]))  # a bug: an empty slice


def _ctrl_c() -> None:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C, not pytest's
    try:
        signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


class _BadSamples(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        _consecutive("cls", 100)  # the stream's counter giving up, inside the worker


def _from_a_loader_worker() -> None:
    next(iter(torch.utils.data.DataLoader(_BadSamples(), num_workers=1)))


def _stop_during_op_build(tmp: Path) -> None:
    from test_op_build import _signal_once, _sleeping_build

    import pretrain.parallel.engine as engine
    from pretrain.training.signals import StopFlag

    started, real = tmp / "started", engine.deepspeed.init_distributed
    engine.deepspeed.init_distributed = lambda **_: _sleeping_build(tmp, started)  # DeepSpeed builds its op here
    flag = StopFlag().install()
    try:
        _signal_once(started, signal.SIGTERM)
        engine.init_distributed("gloo")
    finally:
        flag.uninstall()
        engine.deepspeed.init_distributed = real


def unwritable(kind: str, tmp: Path) -> Path:
    """A folder in which creating a file really fails: `read_only` a 0555 directory (root passes permission bits: the
    row is skipped), `sysfs` /sys (EACCES for root too), `under_a_file` a path below a regular file (ENOTDIR)."""
    if kind == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root creates files in a 0555 directory (the sysfs row covers root)")
        (tmp / "read_only").mkdir(mode=0o555)
        return tmp / "read_only"
    if kind == "sysfs":
        try:
            (Path("/sys") / f"pretrain-probe-{os.getpid()}").open("x").close()
        except OSError:
            return Path("/sys")
        pytest.skip("/sys takes new files here (not a Linux sysfs)")
    (tmp / "a_file").write_text("")
    return tmp / "a_file"


def _no_permission(tmp: Path) -> None:
    with open(unwritable("sysfs" if os.geteuid() == 0 else "read_only", tmp) / "config.yaml", "w") as f:
        f.write("output_dir: x\n")


FAILURES = {  # name -> (fail(tmp_path), code, fragment)
    "permission_denied": (_no_permission, 2, "pretrain train: error: cannot access /"),
    "consecutive_bad_samples": (lambda t: _consecutive(), 6, "3 consecutive bad samples/shards"),
    "ep_size_vs_world": (lambda t: _ep_mismatch(), 7, "engine.ep_size=2 must divide the world size 1"),
    "malformed_rank_json": (_rank_json, 5, "rank_00000.json: unreadable rank state (JSONDecodeError"),
    "truncated_rank_tensors": (_rank_tensors, 5, "rank_00000.safetensors: unreadable rank state"),
    "enospc": (lambda t: _disk_full(), 8, "pretrain train: error: disk full: [Errno 28] No space left on device"),
    "torch_zip_writer_full": (lambda t: _zip_writer_full(), 8, "disk full: [enforce fail at inline_container.cc"),
    "unexpected": (lambda t: _unexpected(), 1,
                   "pretrain train: internal error: ZeroDivisionError: division by zero (run with --debug"),
    "interrupt": (lambda t: _ctrl_c(), 130, "pretrain train: interrupted"),
    "from_a_loader_worker": (lambda t: _from_a_loader_worker(), 6,
                             "pretrain train: error: cls: 100 consecutive bad samples/shards"),
    "stop_signal_during_op_build": (_stop_during_op_build, 75,
                                    "pretrain train: stopped: SIGTERM arrived while DeepSpeed was building its op"),
}
SLOW_ROWS = {"from_a_loader_worker"}  # a worker process: ~1 s
NEEDS_DEV_FULL = {"enospc", "torch_zip_writer_full"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ROWS else n for n in FAILURES])
def test_failures_map_to_codes(name, tmp_path):
    if name in NEEDS_DEV_FULL and not FULL.is_char_device():
        pytest.skip("needs the /dev/full device (Linux)")
    fn, code, fragment = FAILURES[name]
    with pytest.raises(BaseException) as info:
        fn(tmp_path)
    got, line = errors.describe(info.value, "train")
    assert got == code and fragment in line and "\n" not in line, line
    if name == "from_a_loader_worker":  # the worker's message, without its traceback
        assert "Original Traceback" in str(info.value) and "Traceback" not in line


def test_every_exit_code_is_documented():
    codes = [errors.EXIT_OK, errors.EXIT_INTERNAL, errors.EXIT_USAGE, errors.EXIT_ABORT, errors.EXIT_DEMO_STAGE,
             errors.EXIT_CHECKPOINT, errors.EXIT_DATA, errors.EXIT_SETUP, errors.EXIT_DISK_FULL, errors.EXIT_PEER,
             errors.EXIT_REQUEUE, errors.EXIT_INTERRUPTED]
    assert len(set(codes)) == len(codes) and set(errors.EXIT_CODES) == set(codes)
    for cls in (errors.CheckpointError, errors.DataError, errors.SetupError, errors.DiskFullError,
                errors.StoppedError):
        assert cls.exit_code in errors.EXIT_CODES and cls.exit_code != errors.EXIT_INTERNAL


@pytest.fixture(scope="module")
def sources(shards, tmp_path_factory) -> dict[str, Path]:
    """What export, extract and prepare read: a run directory, a model file, an ImageNet layout with one image."""
    from test_extract import model_file, native_run
    from test_prepare_bad_input import _png, _put

    tmp = tmp_path_factory.mktemp("unwritable_sources")
    native_run(tmp / "run", shards)
    _put(tmp / "imagenet/train/n01/a.JPEG", _png(torch.zeros(12, 16, 3, dtype=torch.uint8).numpy()))
    return {"run": tmp / "run", "model": model_file(tmp / "model.safetensors")[0], "imagenet": tmp / "imagenet"}


OUT_ARGS = {  # command -> (its arguments but --out, the --out name inside the unwritable folder)
    "export": (lambda s: ["export", s["run"]], "m.safetensors"),
    "extract": (lambda s: ["extract", s["model"], "--task", "cls", "--no-report"], "cls.safetensors"),
    "prepare": (lambda s: ["prepare", "imagenet", "--src", s["imagenet"], "--split", "train"], "shards"),
}
UNWRITABLE = [(c, k) for c in OUT_ARGS for k in ("read_only", "sysfs")] + [("prepare", "under_a_file")]


@pytest.mark.parametrize(("command", "kind"), UNWRITABLE)
def test_an_unwritable_out_is_one_line_naming_it(capsys, sources, tmp_path, command, kind):
    """--out in a folder that takes no new file: exit 2 and "cannot write PATH: REASON", before any work, and
    nothing left behind (the unique name keeps /sys's own entries out of reach)."""
    args, name = OUT_ARGS[command]
    out = unwritable(kind, tmp_path) / f"{os.getpid()}-{name}"
    from pretrain.cli import main as cli_main

    code = cli_main([str(a) for a in [*args(sources), "--out", out]])
    check(code, capsys.readouterr().err, 2, f"pretrain {command}: error: cannot write {out}: ")
    assert not os.path.lexists(out)
