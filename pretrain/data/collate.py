"""Per-task batch collation into the batch contract the model and trainer rely on.

Images stay uint8 (the model normalises: 4× fewer bytes through worker queues). Every batch also carries `keys`
(the samples' WebDataset keys); the pipeline adds `skipped` (see sources.py). `out` (training workers, ring.py):
preallocated tensors to stack "images" (and "masks") into; `ring_fields` gives their shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

logger = logging.getLogger(__name__)


Out = Mapping[str, torch.Tensor] | None


def _stack(tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    if out is not None:
        return torch.stack(tensors, out=out)
    # default_collate stacks straight into shared memory inside a worker, saving a copy on the way to the main process
    return default_collate(tensors)


def _stack_images(samples: Sequence[dict[str, Any]], out: Out) -> torch.Tensor:
    return _stack([s["image"] for s in samples], None if out is None else out["images"])


# per task: the fixed-size batch tensors besides "images" (name → dtype; shape [B, S, S]) that ring slots hold
_RING_EXTRA: dict[str, dict[str, torch.dtype]] = {"cls": {}, "det": {}, "seg": {"masks": torch.int64}}


def ring_fields(task: str, batch_size: int, img_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the fixed-size tensors of a full training batch (what `out` must hold)."""
    fields = {"images": ((batch_size, 3, img_size, img_size), torch.uint8)}
    fields.update({name: ((batch_size, img_size, img_size), dtype) for name, dtype in _RING_EXTRA[task].items()})
    return fields


def collate_cls(samples: Sequence[dict[str, Any]], out: Out = None) -> dict[str, Any]:
    """→ {"task": "cls", "images": uint8 [B,3,H,W], "labels": int64 [B], "keys": list[str]}."""
    return {"task": "cls", "images": _stack_images(samples, out),
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
            "keys": [s["key"] for s in samples]}


def collate_det(samples: Sequence[dict[str, Any]], out: Out = None) -> dict[str, Any]:
    """→ {"task": "det", "images": uint8 [B,3,S,S], "targets": [{"boxes": float32 [n,4] xyxy, "labels": int64 [n]}],
    "image_ids": int64 [B], "scales": float32 [B], "orig_sizes": int64 [B,2] (h, w), "keys": list[str]}
    (+ "annotations": per-image raw COCO annotation lists, eval only).
    """
    batch = {"task": "det", "images": _stack_images(samples, out),
             "targets": [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples],
             "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
             "scales": torch.tensor([s["scale"] for s in samples], dtype=torch.float32),
             "orig_sizes": torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64).reshape(-1, 2),
             "keys": [s["key"] for s in samples]}
    if "annotations" in samples[0]:
        batch["annotations"] = [s["annotations"] for s in samples]
    return batch


def collate_seg(samples: Sequence[dict[str, Any]], out: Out = None) -> dict[str, Any]:
    """→ {"task": "seg", "images": uint8 [B,3,S,S], "masks": int64 [B,S,S] (255 = ignore), "keys": list[str]}
    (+ eval only: "valid_hw": int64 [B,2], "orig_sizes": int64 [B,2], "orig_masks": list of int64 [h,w]).
    """
    batch = {"task": "seg", "images": _stack_images(samples, out),
             "masks": _stack([s["mask"].to(torch.int64) for s in samples], None if out is None else out["masks"]),
             "keys": [s["key"] for s in samples]}
    if "valid_hw" in samples[0]:
        batch["valid_hw"] = torch.tensor([s["valid_hw"] for s in samples], dtype=torch.int64).reshape(-1, 2)
        batch["orig_sizes"] = torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64).reshape(-1, 2)
        batch["orig_masks"] = [s["orig_mask"].to(torch.int64) for s in samples]
    return batch


# task → the batch key holding what the model's training forward takes as `targets`
TARGET_KEYS: dict[str, str] = {"cls": "labels", "det": "targets", "seg": "masks"}

COLLATE: dict[str, Callable[..., dict[str, Any]]] = {
    "cls": collate_cls,
    "det": collate_det,
    "seg": collate_seg,
}
