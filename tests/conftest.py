"""Shared fixtures: a small embedded corpus converted to shards once per test session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"imagenet_train": 24, "imagenet_val": 4, "coco_train": 48, "coco_val": 8, "ade_train": 48, "ade_val": 8,
         "num_classes": 4, "image_size": (64, 96)}


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
