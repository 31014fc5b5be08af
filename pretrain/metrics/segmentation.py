"""Semantic segmentation metrics (mIoU, mAcc, aAcc) from a dataset-level confusion matrix, in two conventions.

Pixels are pooled over the whole dataset before any ratio is taken: per-class IoU = TP / (TP + FP + FN) =
intersection / union, per-class accuracy = intersection / GT pixels. The conventions differ only for a class with
union 0 (neither GT nor predicted pixels anywhere in the set), chosen by `empty_classes`:

- "zero" (the default): its IoU is 0 and mIoU is the plain mean over all C classes. This is the official dense
  multi-task meters' rule (ASTMT → M3ViT, ATRC, InvPT / TaskPrompter, MLoRE `evaluation/eval_semseg.py` and
  `eval_human_parts.py`: jac = tp / max(tp + fp + fn, 1e-8), then `np.mean` over every class), so the dense
  fine-tuning meters (NYUD / PASCAL semseg, human parts) use it and their numbers compare with published tables.
  A val set with empty classes scores lower than under "skip" (NYUD with 3 empty classes: 35.18 vs 38.03).
- "skip": its IoU is NaN and mIoU is the nanmean over classes with union > 0 (mmseg `IoUMetric`:
  `total_area_to_metrics` + `np.nanmean`). The ADE20K pretraining evaluation uses it (mmseg protocol, evaluation.md
  §7), where ADE's published numbers come from.

Under both:
- a class predicted but absent from the GT has IoU 0 and lowers mIoU (false positives count);
- mAcc is mmseg's, averaged over classes with GT pixels only (nanmean), and aAcc is correct pixels / valid pixels.
  The official dense meters report neither (mIoU only), so mAcc/aAcc of a dense run are diagnostics, not numbers
  to set next to a paper's.

Pixels whose label equals `ignore_index` are dropped before counting, whatever was predicted there (both codes do).
Predictions are compared at the label's resolution: the caller resizes logits to the GT size first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

logger = logging.getLogger(__name__)

ReduceFn = Callable[[torch.Tensor], torch.Tensor]
MaskT = TypeVar("MaskT", torch.Tensor, np.ndarray)
# IoU of a class with union 0, per convention (module docstring): the official dense meters' 0, or mmseg's NaN that
# nanmean leaves out.
EMPTY_CLASS_IOU = {"zero": 0.0, "skip": math.nan}


def reduce_zero_label(mask: MaskT, *, ignore_index: int = 255) -> MaskT:
    """ADE20K label convention: raw 0 ("other") → ignore_index, raw c → c − 1, ignore_index stays ignore_index.

    Same mapping as mmseg `LoadAnnotations(reduce_zero_label=True)`. Works on a torch tensor or numpy array of any
    shape and integer dtype and returns the same type and dtype (uint8 in → uint8 out).

    Args:
        mask: [..., H, W] raw label map (ADE20K: 0..150).
    """
    if isinstance(mask, np.ndarray):
        if not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(f"reduce_zero_label: mask must have an integer dtype, got {mask.dtype}")
        shifted = mask.astype(np.int64) - 1
        out = np.where((mask == 0) | (mask == ignore_index), ignore_index, shifted)
        return out.astype(mask.dtype)
    if mask.dtype.is_floating_point or mask.dtype == torch.bool:
        raise ValueError(f"reduce_zero_label: mask must have an integer dtype, got {mask.dtype}")
    shifted = mask.to(torch.int64) - 1
    out = torch.where((mask == 0) | (mask == ignore_index), torch.full_like(shifted, ignore_index), shifted)
    return out.to(mask.dtype)


class SegmentationMeter:
    """Accumulates a [C, C] confusion matrix (rows: GT class, columns: predicted class) over the dataset.

    Args:
        num_classes: C (150 for ADE20K after reduce-zero-label).
        ignore_index: label value excluded from every metric.
        empty_classes: "zero" (official dense meters) or "skip" (mmseg): the IoU of a class with neither GT nor
            predicted pixels, 0 inside the mean or left out of it (module docstring).
    """

    def __init__(self, *, num_classes: int = 150, ignore_index: int = 255, empty_classes: str = "zero") -> None:
        if empty_classes not in EMPTY_CLASS_IOU:
            raise ValueError(
                f"SegmentationMeter: empty_classes must be one of {sorted(EMPTY_CLASS_IOU)}, got {empty_classes!r}"
            )
        if num_classes < 1:
            raise ValueError(f"SegmentationMeter: num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"SegmentationMeter: ignore_index={ignore_index} collides with a class in 0..{num_classes - 1}"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.empty_classes = empty_classes
        self.reset()

    def reset(self) -> None:
        """Forget all counts (local and synced)."""
        self._confusion_CC: torch.Tensor | None = None
        self._synced_CC: torch.Tensor | None = None

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add predictions for one batch (or one image).

        Args:
            pred: [B, H, W] (or [H, W]) integer class map, or [B, C, H, W] (or [C, H, W]) float logits, argmax'd here.
            label: [B, H, W] (or [H, W]) integer GT in 0..C-1 or `ignore_index`, same H, W as `pred`.
        """
        if pred.dtype.is_floating_point:
            if pred.dim() != label.dim() + 1 or pred.shape[-3] != self.num_classes:
                raise ValueError(
                    f"SegmentationMeter.update: logits {tuple(pred.shape)} do not match label {tuple(label.shape)} "
                    f"with {self.num_classes} classes on dim -3"
                )
            pred = pred.argmax(dim=-3)
        if pred.shape != label.shape:
            raise ValueError(
                f"SegmentationMeter.update: prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ; "
                "resize logits to the label size before update"
            )
        num = self.num_classes
        label = label.to(device=pred.device, dtype=torch.int64).flatten()
        pred = pred.to(torch.int64).flatten()
        valid = label != self.ignore_index
        label, pred = label[valid], pred[valid]
        out_of_range = (label < 0) | (label >= num) | (pred < 0) | (pred >= num)
        if bool(out_of_range.any()):
            bad = out_of_range.nonzero()[0, 0]
            raise ValueError(
                f"SegmentationMeter.update: label {int(label[bad])} / prediction {int(pred[bad])} outside "
                f"0..{num - 1} (ignore_index={self.ignore_index}); was reduce_zero_label applied?"
            )
        batch_CC = torch.bincount(label * num + pred, minlength=num * num).reshape(num, num)
        if self._confusion_CC is None:
            self._confusion_CC = batch_CC
        else:
            self._confusion_CC += batch_CC.to(self._confusion_CC.device)
        self._synced_CC = None

    def sync(self, reduce_fn: ReduceFn) -> None:
        """Sum the confusion matrix over ranks; a collective, so every rank must call it.

        Args:
            reduce_fn: takes an int64 tensor [C, C] (CPU when this rank saw no data) and returns its element-wise sum
                over ranks, moving it to the backend's device itself. Local counts are kept (sync is repeatable).
        """
        local = self._confusion_CC
        if local is None:
            local = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self._synced_CC = reduce_fn(local.clone()).to(torch.int64)

    @property
    def confusion(self) -> torch.Tensor:
        """[C, C] int64 confusion matrix (synced if `sync` ran since the last update), rows GT, columns prediction."""
        conf = self._synced_CC if self._synced_CC is not None else self._confusion_CC
        if conf is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        return conf

    def class_iou(self) -> torch.Tensor:
        """[C] float64 IoU per class in 0..1; where the class has neither GT nor predicted pixels, 0 ("zero") or NaN
        ("skip", then excluded from mIoU by nanmean)."""
        conf = self.confusion.cpu().to(torch.float64)
        intersect_C = conf.diagonal()
        union_C = conf.sum(dim=1) + conf.sum(dim=0) - intersect_C
        empty_C = torch.full_like(union_C, EMPTY_CLASS_IOU[self.empty_classes])
        return torch.where(union_C > 0, intersect_C / union_C.clamp_min(1), empty_C)

    def compute(self) -> dict[str, float]:
        """Return {"mIoU", "mAcc", "aAcc"} in percent (module docstring: empty classes, mAcc's class set)."""
        conf = self.confusion.cpu().to(torch.float64)
        total = conf.sum()
        if total == 0:
            raise ValueError("SegmentationMeter.compute: no valid (non-ignored) pixels were counted")
        intersect_C = conf.diagonal()
        acc_C = intersect_C / conf.sum(dim=1)
        return {
            "mIoU": 100.0 * float(self.class_iou().nanmean()),
            "mAcc": 100.0 * float(acc_C.nanmean()),
            "aAcc": 100.0 * float(intersect_C.sum() / total),
        }
