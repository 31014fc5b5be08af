"""`pretrain train` under a real SLURM: a one-node cluster (Debian's slurm-wlm + munge) started by the test.

The cluster comes from tests/cluster.py (`.ci/run` installs the packages; the daemons need root). Elsewhere the test is
skipped, in CI it must run.
"""

import sys

from cluster import slurm_cluster  # noqa: F401 - the `slurm` fixture: the session's one-node cluster
from harness import run

from pretrain.log import read_metrics


def test_srun_two_ranks_expert_parallel(slurm, shards, tmp_path):
    """`srun -n 2` with only SLURM's variables: ranks, master host and port come from SLURM (pretrain/dist.py)."""
    env = {k: v for k, v in slurm.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_JOB", "SLURM_PROCID"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = ["srun", "--ntasks", "2", "--cpus-per-task", "1", "--kill-on-bad-exit=1", "--time", "10",
           sys.executable, "-m", "pretrain", "train", "configs/debug/pretrain.yaml", f"data.root={shards}",
           f"output_dir={tmp_path}", "data.num_workers=0", "tasks.cls.img_size=32", "tasks.cls.batch_size=8",
           "tasks.det.img_size=64", "tasks.det.batch_size=2", "model.det_min_size=64", "model.det_max_size=64",
           "tasks.seg.img_size=32", "tasks.seg.batch_size=4", "logging.wandb=disabled", "logging.plots=false",
           "engine.ep_size=2", "train.max_steps=3", "train.ckpt_every=3", "train.log_every=1"]
    out = run(cmd, timeout=400, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "world=2" in out.stderr and "ep_size=2" in out.stderr
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
