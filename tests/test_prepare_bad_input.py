"""Converter skeleton byte-identity, and bad input at conversion: damaged PNGs, bad COCO boxes, paths outside
``--src``, directory symlinks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# sha256 over the sorted "dataset/split/shard:sha256" lines of the conftest `shards` corpus (SMALL, seed 0,
# min_shards=2, max_count=32), computed with the converters as they were BEFORE the skeleton refactor (commit
# e6a7115): the refactor and the hardening must not change a byte of the existing datasets' shards.
SHARDS_SHA256 = "899fa0a599f5adcaccb288e907acb925004aa2ba5d33143d9fb09de5c1439833"
SKIPPED_BEFORE = {
    ("imagenet", "train"): [("train/n90000000/.DS_Store", "not_an_image"),
                            ("train/n90000003/n90000003_0.JPEG", "decode_error")],
    ("coco", "train"): [("train2017/000000000004.jpg", "missing_file")],
    ("ade20k", "train"): [("images/training/ADE_train_00000001.jpg", "missing_annotation")],
}


def test_existing_converters_byte_identical(shards: Path):
    lines = []
    for name in ("imagenet", "coco", "ade20k"):
        for split in ("train", "val"):
            folder = shards / name / split
            for tar in sorted(folder.glob("*.tar")):
                lines.append(f"{name}/{split}/{tar.name}:{hashlib.sha256(tar.read_bytes()).hexdigest()}")
            rows = [json.loads(line) for line in (folder / "skipped.jsonl").read_text().splitlines()]
            assert [(r["file"], r["reason"]) for r in rows] == SKIPPED_BEFORE.get((name, split), [])
    assert hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest() == SHARDS_SHA256
