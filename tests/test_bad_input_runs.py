"""The bad-input matrix, slow rows: real `pretrain train` runs in subprocesses (one process and two torchrun ranks).

The fast rows and the conventions (exit code, message fragment, no traceback) are in test_bad_input.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_input import check

from pretrain.runs import checkpoint
from pretrain.runs.integrity import META

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("deepspeed_shm_op")  # `pretrain train` starts DeepSpeed in the children


# ---------------------------------------------------------------- slow: real training runs in a subprocess


def _train(shards: Path, out: Path, *extra: str, code: str | None = None) -> subprocess.CompletedProcess:
    from harness import run
    from test_train import _train_cmd

    cmd = _train_cmd(shards, out, "train.max_steps=4", "train.ckpt_every=2", *extra)
    if code is not None:  # the same command with something patched first
        cmd = [sys.executable, "-c", code + "\nfrom pretrain.cli import main\nsys.exit(main(sys.argv[1:]))",
               *cmd[3:]]
    return run(cmd, timeout=600)


@pytest.fixture(scope="module")
def trained_run(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_input_trained") / "run"
    proc = _train(shards, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_real_checkpoint_manifest_damage_and_drift(shards, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    tag = run / "checkpoints" / "step_00000004"
    files = json.loads((tag / META).read_text())["files"]
    assert {checkpoint.MODEL_FILE, "rank_00000.json", "rank_00000.safetensors"} <= set(files)
    assert sorted(files) == sorted(p.name for p in tag.iterdir() if p.name != META)
    # a changed model config is refused before config.yaml is touched
    saved = (run / "config.yaml").read_bytes()
    proc = _train(shards, run, "moe.num_experts=4")
    check(proc.returncode, proc.stderr, 2, "moe.num_experts: 8 -> 4")
    assert (run / "config.yaml").read_bytes() == saved
    # forced through, the load fails: config.yaml still describes the checkpoint (it was rewritten before the load)
    proc = _train(shards, run, "moe.num_experts=4", "train.allow_config_change=true", "train.max_steps=5")
    check(proc.returncode, proc.stderr, 5, "size mismatch for backbone.blocks.1.mlp")
    assert (run / "config.yaml").read_bytes() == saved
    # a malformed rank file in the newest checkpoint: resume falls back to step 2 and finishes
    (tag / "rank_00000.json").write_text('{"rank": 0, "state": ')
    proc = _train(shards, run, "train.max_steps=5")
    check(proc.returncode, proc.stderr, 0, "rank_00000.json has")
    assert "falling back to" in proc.stderr and "resumed from step 2" in proc.stderr
    assert checkpoint.read_latest(run / "checkpoints") == "step_00000005"


@pytest.mark.slow
def test_real_resume_falls_back_past_an_escaping_latest_and_a_removed_metadata_file(shards, trained_run, tmp_path):
    """Resume, not only evaluate/export: `latest` holding '..' and a newest tag without pretrain_meta.json are
    skipped with a warning naming them, and the run continues from the newest intact checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpt = run / "checkpoints"
    (ckpt / "latest").write_text("..")
    proc = _train(shards, run, "train.max_steps=5")
    check(proc.returncode, proc.stderr, 0, "holds '..', which leaves")
    assert "falling back to" in proc.stderr and "resumed from step 4" in proc.stderr
    assert checkpoint.read_latest(ckpt) == "step_00000005"
    (ckpt / "step_00000005" / META).unlink()
    proc = _train(shards, run, "train.max_steps=6")
    check(proc.returncode, proc.stderr, 0, "step_00000005: pretrain_meta.json is missing")
    assert "resumed from step 4" in proc.stderr and checkpoint.read_latest(ckpt) == "step_00000006"


@pytest.mark.slow
def test_real_run_setup_and_disk_full(shards, trained_run, tmp_path):
    proc = _train(shards, tmp_path / "ep", "engine.ep_size=2")
    check(proc.returncode, proc.stderr, 7, "engine.ep_size=2 must divide the world size 1")
    # the second save (step 4) hits a full disk: exit 8, step 2 stays the loadable latest
    patch = ("import errno, sys\nimport pretrain.runs.checkpoint as c\nreal, calls = c.write_rank_state, []\n"
             "def full(*a, **k):\n    calls.append(1)\n    if len(calls) == 2:\n"
             "        raise OSError(errno.ENOSPC, 'No space left on device')\n    return real(*a, **k)\n"
             "c.write_rank_state = full")
    run = tmp_path / "full"
    proc = _train(shards, run, code=patch)
    check(proc.returncode, proc.stderr, 8, "disk full while saving the checkpoint")
    assert "`latest` still names step_00000002" in proc.stderr and "GiB" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002"]
    from pretrain.runs.load import load_run

    assert load_run(run).step == 2


def _garbage_images(src: Path, dst: Path) -> None:
    """A copy of the shard set whose every image is undecodable (labels intact)."""
    import io
    import tarfile

    shutil.copytree(src, dst)
    for tar_path in dst.glob("*.tar"):
        members = []
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                if m.name.rsplit(".", 1)[-1].lower() in ("jpg", "jpeg", "png", "webp"):
                    data = b"not an image"
                members.append((m.name, data))
        with tarfile.open(tar_path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_real_run_consecutive_bad_samples(shards, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(shards, root, ignore=shutil.ignore_patterns("train"))
    _garbage_images(shards / "imagenet" / "train", root / "imagenet" / "train")
    for name in ("coco", "ade20k"):
        shutil.copytree(shards / name / "train", root / name / "train")
    proc = _train(root, tmp_path / "run", "tasks.det.enabled=false", "tasks.seg.enabled=false", "data.num_workers=1")
    check(proc.returncode, proc.stderr, 6, "pretrain train: error: cls: 100 consecutive bad samples/shards")
    assert "Original Traceback" not in proc.stderr  # re-raised from the loader worker: its message only


TWO_RANK_PATCH = """import errno, os, sys
import pretrain.runs.checkpoint as c
import pretrain.training.train as t
rank, mode = int(os.environ["RANK"]), os.environ["BAD_INPUT_MODE"]
if mode == "full":  # every rank's disk is full at the first save
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    c.write_rank_state = full
elif rank == 1:  # only rank 1 fails, while rank 0 waits in the step's all-reduce
    from pretrain.errors import DataError
    def broken(*a, **k):
        raise DataError("cls: 100 consecutive bad samples/shards (injected on rank 1)")
    t.forward_task = broken
from pretrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


TWO_RANK_CASES = [  # (mode, message)
    ("full", "disk full while saving the checkpoint"),
    ("rank1", "injected on rank 1"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "message"), TWO_RANK_CASES)
def test_two_ranks_one_line_and_nobody_hangs(shards, tmp_path, mode, message):
    """Under torchrun (which exits 1 whatever the child's code, stops the other workers when one exits, and prints
    its own summary): the failure's line appears once, the failing rank's line is in its log file, the job ends."""
    from harness import run as run_cmd
    from harness import torchrun_cmd
    from test_train import FAST

    script = tmp_path / "patched.py"
    script.write_text(TWO_RANK_PATCH)
    run = tmp_path / "run"
    cmd = torchrun_cmd(script, "train", "configs/debug/pretrain.yaml", f"data.root={shards}", f"output_dir={run}",
                       *FAST, "train.max_steps=2", "train.ckpt_every=1")
    proc = run_cmd(cmd, timeout=300, env={"BAD_INPUT_MODE": mode})
    assert proc.returncode != 0 and proc.stderr.count(message) == 1, proc.stderr[-4000:]
    assert f'File "{ROOT / "pretrain"}' not in proc.stderr  # torchrun's own launcher traceback is not ours
    assert message in "".join(p.read_text() for p in (run / "logs").glob("rank*.log"))
