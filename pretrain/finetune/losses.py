"""Per-task losses of the current dense protocol (InvPT / TaskPrompter / MLoRE; evaluation.md §4).

Every loss takes the task's prediction [B,C,H,W] (float) and the loader's target (see `data/dense.py`: semseg,
human_parts, sal int64 [B,H,W] with 255 = ignore; depth [B,1,H,W] with 0 = invalid; normals [B,3,H,W] and edge
[B,1,H,W] with 255.0 = ignore) and returns a scalar averaged over the valid pixels (0 when none is valid).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    return (values * valid).sum() / valid.sum().clamp(min=1)


def cross_entropy(pred_BCHW: Tensor, target_BHW: Tensor) -> Tensor:
    """Pixel CE, 255 ignored (semseg, human_parts); 0 for an all-ignored batch instead of torch's NaN."""
    valid = target_BHW != IGNORE
    ce = F.cross_entropy(pred_BCHW, target_BHW.masked_fill(~valid, 0), reduction="none")
    return _masked_mean(ce, valid)


def balanced_cross_entropy(pred_B2HW: Tensor, target_BHW: Tensor) -> Tensor:
    """Saliency: 2-class CE whose class weights are recomputed from each batch (reference `balanced=True`):
    w = share of background pixels; class 0 weighs 1 − w, class 1 weighs w."""
    valid = target_BHW != IGNORE
    fg = (target_BHW == 1) & valid
    w = 1.0 - fg.sum() / valid.sum().clamp(min=1)
    weight = torch.stack([1.0 - w, w]).to(pred_B2HW.dtype)
    ce = F.cross_entropy(pred_B2HW, target_BHW.masked_fill(~valid, 0), weight=weight, reduction="none")
    # per-pixel weighted CE averaged over the valid pixels (not torch's division by the summed weights)
    return _masked_mean(ce, valid)


def balanced_bce(pred_B1HW: Tensor, target_B1HW: Tensor, *, pos_weight: float) -> Tensor:
    """Edge: BCE with pos_weight = w/(1−w), scaled by (1−w) (the reference's normalisation), padding ignored."""
    valid = target_B1HW != IGNORE
    bce = F.binary_cross_entropy_with_logits(
        pred_B1HW, target_B1HW.masked_fill(~valid, 0), reduction="none",
        pos_weight=torch.tensor(pos_weight / (1.0 - pos_weight), device=pred_B1HW.device))
    return _masked_mean(bce, valid) * (1.0 - pos_weight)


def normals_l1(pred_B3HW: Tensor, target_B3HW: Tensor) -> Tensor:
    """L1 between the L2-normalised prediction and the GT normals, over pixels whose GT is not 255."""
    valid = (target_B3HW != IGNORE).all(dim=1, keepdim=True).expand_as(target_B3HW)
    pred = F.normalize(pred_B3HW, p=2, dim=1)
    return _masked_mean((pred - target_B3HW.masked_fill(~valid, 0)).abs(), valid)


def depth_l1(pred_B1HW: Tensor, target_B1HW: Tensor) -> Tensor:
    """L1 over pixels with valid depth (GT 0 = invalid; padding is 0 too)."""
    valid = (target_B1HW != 0) & (target_B1HW != IGNORE)
    return _masked_mean((pred_B1HW - target_B1HW).abs(), valid)


LossFn = Callable[[Tensor, Tensor], Tensor]


def _fixed(loss: LossFn) -> Callable[[float], LossFn]:
    return lambda edge_pos_weight: loss


# task (a `catalog.DENSE_TASKS` name) → its loss, given `finetune.edge_pos_weight` (only the edge loss takes it)
LOSSES: dict[str, Callable[[float], LossFn]] = {
    "semseg": _fixed(cross_entropy),
    "human_parts": _fixed(cross_entropy),
    "sal": _fixed(balanced_cross_entropy),
    "normals": _fixed(normals_l1),
    "edge": lambda edge_pos_weight: functools.partial(balanced_bce, pos_weight=edge_pos_weight),
    "depth": _fixed(depth_l1),
}


def build_losses(tasks: list[str], *, edge_pos_weight: float) -> dict[str, LossFn]:
    """The loss function of each dense task."""
    return {t: LOSSES[t](edge_pos_weight) for t in tasks}
