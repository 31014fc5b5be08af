"""Shared fixtures (a small embedded corpus converted to shards once per session) and the suite's markers.

`slow`: the tests in SLOW (measured over ~5 s on 2 cores with `pytest --durations=0`) and any test marked
`@pytest.mark.slow`; `pytest -m "not slow"` runs the fast unit tests alone. `gpu`: skipped without CUDA.
Tests that start DeepSpeed in child processes get the `deepspeed_shm_op` fixture first, so DeepSpeed's JIT build of
its CPU communication op (scripts/setup.sh normally does it) never runs inside a timed test.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"imagenet_train": 24, "imagenet_val": 4, "coco_train": 48, "coco_val": 8, "ade_train": 48, "ade_val": 8,
         "num_classes": 4, "image_size": (64, 96)}

# Whole modules, test names (covering every parametrised case) or exact node ids: over ~5 s each in
# `python -m pytest --durations=0 -q -p no:cacheprovider` on the shared 2-core machine (README "Tests").
SLOW = {
    "tests/test_train.py",  # every test runs `pretrain train` in child processes: 7-300 s each
    "tests/test_slurm.py",  # a real SLURM cluster and `srun -n 2`
    "tests/test_engine.py::test_ep2_matches_ep1_through_deepspeed_zero012",  # 2 ranks: 19 s
    "tests/test_engine.py::test_deepspeed_backend_trains_on_two_ranks_and_checkpoints_every_expert",  # 27 s
    "tests/test_checkpoint.py::test_save_resume_bit_exact_and_single_process_export",  # 2 ranks: 17 s
    "tests/test_checkpoint.py::test_checkpoint_and_models_do_not_import_deepspeed",  # a child interpreter: 7 s
    "tests/test_expert_parallel.py::test_ep2_matches_ep1_on_two_gloo_ranks",  # 2 ranks: 20 s
    "tests/test_mixture.py::test_same_task_on_every_rank_independent_of_process_and_hash_seed",  # children: 5 s
    "tests/test_upcycle.py::test_equals_dense_timm_vit_small_under_the_condition",  # 15 s
    "tests/test_vit.py::test_sizes_match_timm_and_moe_counts[vit_l16]",  # 10 s
    "tests/test_harness.py::test_failed_launch_shows_every_rank",  # torchrun: ~10 s
}
# Modules whose tests launch DeepSpeed in child processes (`pretrain train`, tests/dist_scripts/*).
DEEPSPEED_CHILDREN = {"tests/test_train.py", "tests/test_engine.py", "tests/test_checkpoint.py", "tests/test_slurm.py"}


def _listed(nodeid: str, table: set[str]) -> bool:
    module, _, name = nodeid.partition("::")
    return nodeid in table or module in table or f"{module}::{name.split('[')[0]}" in table


def pytest_collection_modifyitems(config, items):
    has_cuda = None
    for item in items:
        if _listed(item.nodeid, SLOW):
            item.add_marker(pytest.mark.slow)
        if _listed(item.nodeid, DEEPSPEED_CHILDREN):
            item.fixturenames.insert(0, "deepspeed_shm_op")
        if item.get_closest_marker("gpu"):
            if has_cuda is None:
                import torch

                has_cuda = torch.cuda.is_available()
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def deepspeed_shm_op() -> None:
    """Build DeepSpeed's `deepspeed_shm_comm` CPU op once, untimed, if scripts/setup.sh has not (a first build takes
    minutes on a loaded machine and used to time out the first multi-process test)."""
    from torch.utils.cpp_extension import _get_build_directory

    built = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "deepspeed_shm_comm.so"
    if not built.is_file():
        code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=1800, capture_output=True,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """`<root>/{imagenet,coco,ade20k}/{train,val}` shard sets from the real converters over a small synth corpus."""
    from pretrain.prepare import PREPARERS
    from pretrain.synth import synthesize

    base = tmp_path_factory.mktemp("corpus")
    synthesize(base / "raw", seed=0, **SMALL)
    for name in ("imagenet", "coco", "ade20k"):
        for split in ("train", "val"):
            PREPARERS[name](base / "raw" / name, base / "shards" / name / split, split, min_shards=2,
                            max_count=32, progress=False)
    return base / "shards"
