"""Multi-rank cases that must end, not hang (issue 21 point 6): each runs `pretrain train` as separate rank
processes with only the launcher's variables, as plain `srun` starts them (no torchrun to stop the others when one
exits), and asserts every rank's exit code and that the whole job ended within its timeout.

- an expert parallel rank whose experts receive no tokens from any rank;
- uneven evaluation shards across ranks (3 val shards on 2 ranks) under expert parallelism, where every eval forward
  is collective: the metrics equal a one-process evaluation of the same weights;
- a rank that raises before the first collective (the others wait at the rendezvous until `engine.timeout_s`);
- a rank that raises inside a checkpoint save (the last committed checkpoint stays `latest` and verifies).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import PORT_CLASH, free_port, kill_group, popen, run, timeout_scale
from test_train import DEBUG, FAST

from pretrain.errors import EXIT_CHECKPOINT, EXIT_PEER, EXIT_SETUP
from pretrain.log import read_metrics
from pretrain.runs.checkpoint import write_latest
from pretrain.runs.integrity import read_pointer, verify_tag

pytestmark = pytest.mark.slow

# Patches applied in the rank process before the CLI runs, chosen by HANG_CASE (and only on the rank it names).
PATCH = """import errno, os, sys
rank, case = int(os.environ["RANK"]), os.environ.get("HANG_CASE", "")
if case == "no_tokens":  # every token of every rank picks experts 0..k-1: rank 1's experts (4..7 of 8) get none
    import torch
    from pretrain.models.moe_routing import Routing, TaskRoutedLayer
    route = TaskRoutedLayer.route
    def first_experts(self, *args, **kwargs):
        r = route(self, *args, **kwargs)
        idx_SK = torch.arange(r.idx_SK.shape[1]).expand_as(r.idx_SK).contiguous()
        load_E = torch.bincount(idx_SK.reshape(-1), minlength=self.num_experts).float()
        return Routing(r.logits_SE, r.probs_SE, r.gates_SK, idx_SK, load_E)
    TaskRoutedLayer.route = first_experts
elif case == "before_collective" and rank == 1:
    import pretrain.parallel.engine as e
    from pretrain.errors import SetupError
    def refuse(*a, **k):
        raise SetupError("injected on rank 1 before the process group")
    e.init_distributed = refuse
elif case == "in_save" and rank == 1:
    import pretrain.runs.checkpoint as c
    write = c.write_rank_state
    def broken(tag_dir, *a, **k):
        if tag_dir.name == "step_00000002":  # the first save (step 1) commits; the second fails on rank 1 alone
            raise OSError(errno.EIO, "Input/output error (injected on rank 1)", str(tag_dir))
        return write(tag_dir, *a, **k)
    c.write_rank_state = broken
from pretrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def srun_style(script: Path, args: list[str], *, nprocs: int, timeout: float,
               env: dict[str, str]) -> tuple[list[int | None], list[str], float]:
    """`nprocs` processes with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* only; (exit codes, stderr per rank, seconds).
    A rank still running at `timeout` is killed and its code is None: that is the hang the cases rule out."""
    port, procs, start = str(free_port()), [], time.monotonic()
    try:
        for rank in range(nprocs):
            rank_env = {**env, "RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            procs.append(popen([sys.executable, str(script), *args], env=rank_env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True))
        deadline = start + timeout * timeout_scale()
        errs = []
        for proc in procs:
            try:
                errs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[1])
            except subprocess.TimeoutExpired:
                kill_group(proc)
                errs.append(proc.communicate()[1] + "\n(killed: still running at the timeout)")
    finally:
        for proc in procs:
            kill_group(proc)
    return [p.returncode if p.returncode is None or p.returncode >= 0 else None for p in procs], errs, \
        time.monotonic() - start


def _job(tmp_path: Path, case: str, extra: list[str], *, shards: Path, timeout: float = 300):
    script = tmp_path / "patched.py"
    script.write_text(PATCH)
    args = ["train", DEBUG, f"data.root={shards}", f"output_dir={tmp_path / 'run'}", *FAST, *extra]
    for _ in range(2):  # the port can be taken between choosing and binding it
        codes, errs, seconds = srun_style(script, args, nprocs=2, timeout=timeout, env={"HANG_CASE": case})
        if not any(s in "".join(errs) for s in PORT_CLASH):
            break
    return codes, errs, seconds


def _show(errs: list[str]) -> str:
    return "\n".join(f"--- rank {r} ---\n{e[-2500:]}" for r, e in enumerate(errs))


def test_experts_that_receive_no_tokens_train_and_checkpoint(shards, tmp_path):
    codes, errs, _ = _job(tmp_path, "no_tokens", ["engine.ep_size=2", "train.max_steps=2", "train.ckpt_every=2"],
                          shards=shards)
    assert codes == [0, 0], _show(errs)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/total" in r]
    assert [r["step"] for r in records] == [1, 2], records
    assert all(math.isfinite(r["loss/total"]) for r in records), records
    assert read_pointer(tmp_path / "run" / "checkpoints") == ("step_00000002", None)


@pytest.fixture()
def uneven_shards(shards, tmp_path) -> Path:
    """The session shards with ade20k/val re-split into shards of 3, 3 and 2 images: with one image per eval batch
    rank 0 reads shards 0 and 2 (5 batches), rank 1 shard 1 (3 batches, then 2 throw-away collective forwards)."""
    from pretrain.prepare import PREPARERS

    root = tmp_path / "shards"
    for name in ("imagenet", "coco", "ade20k"):
        (root / name).mkdir(parents=True)
        (root / name / "train").symlink_to(shards / name / "train")
        if name != "ade20k":
            (root / name / "val").symlink_to(shards / name / "val")
    PREPARERS["ade20k"](shards.parent / "raw" / "ade20k", root / "ade20k" / "val", "val", max_count=3,
                        progress=False)
    assert json.loads((root / "ade20k" / "val" / "_info.json").read_text())["shard_lengths"] == [3, 3, 2]
    return root


def test_uneven_eval_shards_under_expert_parallelism_end_and_count_every_image(uneven_shards, tmp_path):
    codes, errs, _ = _job(tmp_path, "", ["engine.ep_size=2", "engine.precision=fp32", "train.max_steps=2",
                                         "train.ckpt_every=1", "train.eval_every=1", "eval.num_workers=0",
                                         "tasks.cls.enabled=false", "tasks.det.enabled=false",
                                         "tasks.seg.eval_batch_size=1"], shards=uneven_shards)
    assert codes == [0, 0], _show(errs)
    during = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/seg/mIoU" in r)
    assert during["step"] == 1  # periodic evaluations run before the last step
    # the same weights (step 1's checkpoint) evaluated by one process, which reads all 3 shards itself
    write_latest(tmp_path / "run" / "checkpoints", "step_00000001")
    out = run([sys.executable, "-m", "pretrain", "evaluate", str(tmp_path / "run")], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    alone = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("eval/seg/mIoU", "eval/seg/aAcc"):  # every pixel counted once on the 2 ranks: the same confusion
        assert during[key] == pytest.approx(alone[key], abs=2e-3), (key, during, alone)


def test_a_rank_that_fails_before_the_first_collective_ends_the_job(shards, tmp_path):
    timeout_s = 10
    codes, errs, seconds = _job(tmp_path, "before_collective", [f"engine.timeout_s={timeout_s}",
                                                                "train.max_steps=1"], shards=shards, timeout=240)
    assert codes == [EXIT_PEER, EXIT_SETUP], _show(errs)
    assert "injected on rank 1" in errs[1] and "did not join" in errs[0], _show(errs)
    assert f"engine.timeout_s={timeout_s}" in errs[0], _show(errs)
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_a_rank_that_fails_inside_a_checkpoint_save_ends_the_job_and_keeps_the_last_checkpoint(shards, tmp_path):
    codes, errs, _ = _job(tmp_path, "in_save", ["train.max_steps=3", "train.ckpt_every=1"], shards=shards)
    assert codes == [EXIT_PEER, EXIT_CHECKPOINT], _show(errs)
    assert "injected on rank 1" in errs[1], _show(errs)
    ckpts = tmp_path / "run" / "checkpoints"
    assert read_pointer(ckpts) == ("step_00000001", None)
    assert verify_tag(ckpts / "step_00000001") is None
    assert not (ckpts / "step_00000002").exists()  # the partial tag was removed
    shutil.rmtree(ckpts / "step_00000001")  # (keeps tmp_path small for the session)
