"""Reused shared-memory batch slots (pretrain/data/ring.py): same batches as the DataLoader's own transport, a held
batch is never overwritten, and a plain training loop really reuses the slots."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from pretrain.data.ring import SLOT_KEY, BatchRing, RingLoader, pack_small, unpack_small
from pretrain.data.sources import make_train_loader

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
TASK_DIRS = {"cls": "imagenet/train", "det": "coco/train", "seg": "ade20k/train"}


def _loader(shards: Path, task: str, *, reuse: bool, batch_size: int = 4):
    return make_train_loader(task, shards / TASK_DIRS[task], batch_size=batch_size, img_size=32, seed=3,
                             num_workers=2, shuffle_buffer=8, reuse_buffers=reuse)


def _ring_ptrs(loader: RingLoader) -> set[int]:
    return {t.data_ptr() for per_worker in loader.ring.buffers["images"] for t in per_worker}


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("task", ["cls", "det", "seg"])
def test_ring_batches_equal_the_dataloader_transport_even_when_all_are_held(shards: Path, task: str) -> None:
    """16 batches held at once (more than the 2 × 5 slots): equal to the plain loader's, none sharing memory."""
    ring_loader = _loader(shards, task, reuse=True)
    assert isinstance(ring_loader, RingLoader)
    held = list(itertools.islice(ring_loader, 16))
    plain = list(itertools.islice(_loader(shards, task, reuse=False), 16))
    for a, b in zip(held, plain):
        assert _same(a, b), f"{task}: batch {a['keys']} differs from the DataLoader transport's"
    ptrs = [b["images"].data_ptr() for b in held]
    assert len(set(ptrs)) == len(ptrs), "two live batches share one buffer"
    in_ring = sum(p in _ring_ptrs(ring_loader) for p in ptrs)
    assert 0 < in_ring <= 10, f"{in_ring} of 16 held batches in the ring's 10 slots"


def test_a_training_loop_that_drops_its_batches_runs_entirely_in_the_ring(shards: Path) -> None:
    loader = _loader(shards, "seg", reuse=True)
    ring_ptrs = _ring_ptrs(loader)
    mask_ptrs = {t.data_ptr() for per_worker in loader.ring.buffers["masks"] for t in per_worker}
    for step, batch in enumerate(loader):
        assert batch["images"].data_ptr() in ring_ptrs and batch["masks"].data_ptr() in mask_ptrs, step
        assert batch["masks"].dtype == torch.int64 and batch["images"].shape == (4, 3, 32, 32)
        if step == 40:
            break


def test_a_slot_is_freed_only_when_no_view_of_it_is_left() -> None:
    ring = BatchRing(1, 2, {"images": ((2, 3, 4, 4), torch.uint8)})
    first = ring.acquire(0)  # what a worker does, here in-process
    assert first[SLOT_KEY] == (0, 0) and int(ring.busy_WS[0, 0]) == 1
    got = ring.receive(0, 0)
    view = got["images"][1:]
    del got
    assert ring.release_unused() == 0 and int(ring.busy_WS[0, 0]) == 1  # the view still uses slot 0
    assert ring.acquire(0)[SLOT_KEY] == (0, 1)
    assert ring.acquire(0) is None and ring.fallbacks == 1  # both busy: the worker collates into fresh memory
    del view
    assert ring.release_unused() == 1 and int(ring.busy_WS[0, 0]) == 0
    assert ring.release_unused() == 0  # slot 1 was never received: in flight, never freed by the main process
    assert ring.acquire(0)[SLOT_KEY] == (0, 0)


def test_small_tensors_travel_by_value_and_big_ones_stay_tensors() -> None:
    batch = {"labels": torch.arange(5), "targets": [{"boxes": torch.ones(2, 4)}], "keys": ["a"],
             "big": torch.zeros(64, 1024), "bf16": torch.ones(3, dtype=torch.bfloat16), "n": 3}
    packed = pack_small(batch)
    assert not isinstance(packed["labels"], torch.Tensor) and not isinstance(packed["targets"][0]["boxes"],
                                                                            torch.Tensor)
    assert isinstance(packed["big"], torch.Tensor) and isinstance(packed["bf16"], torch.Tensor)
    assert _same(unpack_small(packed), batch)
