"""Joint image / box / mask transforms per task, on uint8 CHW tensors.

Random parameters come from an explicit `random.Random` owned by the pipeline stage (seeded from seed, task, rank,
worker, resume step), and pixels go through `torchvision.transforms.v2.functional` kernels (uint8 bilinear with
antialias, nearest-exact for masks). The v2 transform classes are not used because they draw from torch's global
RNG: making them reproducible per (rank, worker, step) would mean reseeding process-global state, which with
`num_workers=0` is the trainer's own RNG. Box and mask geometry is a single resize → flip → S×S window (crop where
the image is larger, pad where smaller), so boxes, masks and pixels share one mapping.

Padding: images with the ImageNet mean in uint8 (≈ 0 after the model's normalisation, as detectron2 pads after
normalising), masks with 255 (ignore), so padded pixels never count in the seg loss or metric.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from typing import Any

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from pretrain.data.decode import IGNORE_INDEX

logger = logging.getLogger(__name__)

PAD_RGB = (124, 116, 104)  # ImageNet mean ×255
CLS_SCALE = (0.08, 1.0)
CLS_RATIO = (3 / 4, 4 / 3)
CLS_CROP_PCT = 0.875  # eval: shorter side to size / 0.875, centre crop (timm default)
DET_JITTER = (0.1, 2.0)  # large-scale jitter: longer side to size·U(lo, hi) (ViTDet LSJ)
SEG_JITTER = (0.5, 2.0)  # mmseg ratio range around "shorter side = size, longer ≤ 4·size"
SEG_MAX_ASPECT = 4  # mmseg ADE scale (2048, 512): longer side ≤ 4 × shorter target


def rrc_params(rng: random.Random, h: int, w: int, *, scale: tuple[float, float] = CLS_SCALE,
               ratio: tuple[float, float] = CLS_RATIO) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, height, width), same rule as torchvision (10 tries, then centre crop)."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def transform_cls(sample: Mapping[str, Any], *, rng: random.Random, size: int, train: bool,
                  scale: tuple[float, float] = CLS_SCALE) -> dict[str, Any]:
    """Train: RandomResizedCrop(size, scale) + hflip. Eval: shorter side to size/0.875, centre crop.

    Returns {"image": uint8 [3, size, size], "label": int}.
    """
    img_3HW = sample["image"]
    if train:
        top, left, ch, cw = rrc_params(rng, img_3HW.shape[1], img_3HW.shape[2], scale=scale)
        out_3SS = F.resized_crop(img_3HW, top, left, ch, cw, [size, size], antialias=True)
        if rng.random() < 0.5:
            out_3SS = F.horizontal_flip(out_3SS)
    else:
        out_3SS = F.center_crop(F.resize(img_3HW, int(size / CLS_CROP_PCT), antialias=True), [size, size])
    return {"image": out_3SS.contiguous(), "label": sample["label"]}


def _window(x_CHW: torch.Tensor, *, top: int, left: int, size: int, fill: tuple[int, ...]) -> torch.Tensor:
    """The size×size window of x at (top, left); parts outside x are `fill` (per channel)."""
    c, h, w = x_CHW.shape
    out_CSS = torch.empty((c, size, size), dtype=x_CHW.dtype)
    out_CSS.copy_(torch.tensor(fill, dtype=x_CHW.dtype).view(-1, 1, 1).expand(c, size, size))
    vh, vw = min(size, h - top), min(size, w - left)
    out_CSS[:, :vh, :vw] = x_CHW[:, top:top + vh, left:left + vw]
    return out_CSS


def _place(img_3HW: torch.Tensor, mask_HW: torch.Tensor | None, *, hw: tuple[int, int], flip: bool,
           top: int, left: int, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize to hw (image bilinear+antialias, mask nearest-exact), optional hflip, then the size×size window."""
    img = F.resize(img_3HW, list(hw), antialias=True)
    mask = None
    if mask_HW is not None:
        mask = F.resize(mask_HW[None], list(hw), interpolation=InterpolationMode.NEAREST_EXACT)
    if flip:
        img = F.horizontal_flip(img)
        mask = F.horizontal_flip(mask) if mask is not None else None
    img = _window(img, top=top, left=left, size=size, fill=PAD_RGB)
    if mask is not None:
        mask = _window(mask, top=top, left=left, size=size, fill=(IGNORE_INDEX,))[0]
    return img, mask


def map_boxes(boxes_N4: torch.Tensor, *, src_hw: tuple[int, int], dst_hw: tuple[int, int], flip: bool, top: int,
              left: int, size: int) -> torch.Tensor:
    """xyxy boxes in source pixels → the same boxes after resize to dst_hw, hflip and the size×size window.

    Coordinates are clipped to the part of the window covered by the image (not the padding).
    """
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    b_N4 = boxes_N4 * torch.tensor([sx, sy, sx, sy], dtype=boxes_N4.dtype)
    if flip:
        b_N4 = torch.stack([dst_hw[1] - b_N4[:, 2], b_N4[:, 1], dst_hw[1] - b_N4[:, 0], b_N4[:, 3]], dim=1)
    b_N4 = b_N4 - torch.tensor([left, top, left, top], dtype=b_N4.dtype)
    max_x, max_y = min(size, dst_hw[1] - left), min(size, dst_hw[0] - top)
    b_N4[:, 0::2] = b_N4[:, 0::2].clamp(0, max_x)
    b_N4[:, 1::2] = b_N4[:, 1::2].clamp(0, max_y)
    return b_N4


def _scaled_hw(h: int, w: int, s: float) -> tuple[int, int]:
    return max(1, round(h * s)), max(1, round(w * s))


def transform_det(sample: Mapping[str, Any], *, rng: random.Random, size: int, train: bool,
                  jitter: tuple[float, float] | None = None) -> dict[str, Any]:
    """Detection. Train: longer side to size·U(jitter), hflip, random size×size crop/pad; crowd and degenerate
    (w or h < 1 px) boxes dropped. Eval: longer side to size, pad bottom/right, no flip; crowd boxes left out of
    `boxes`/`labels` (kept in `annotations`).

    Returns {"image": uint8 [3,S,S], "boxes": float32 [n,4] xyxy in S×S pixels, "labels": int64 [n] (1..K),
    "image_id": int, "scale": float (S-pixels per original pixel), "orig_size": (h, w)} (+ "annotations" in eval).
    """
    img_3HW, boxes_N4 = sample["image"], sample["boxes"]
    h, w = img_3HW.shape[1:]
    lo, hi = jitter or DET_JITTER
    s = size * (rng.uniform(lo, hi) if train else 1.0) / max(h, w)
    hw = _scaled_hw(h, w, s)
    flip = train and rng.random() < 0.5
    top = rng.randint(0, max(0, hw[0] - size)) if train else 0
    left = rng.randint(0, max(0, hw[1] - size)) if train else 0
    image, _ = _place(img_3HW, None, hw=hw, flip=flip, top=top, left=left, size=size)
    keep_N = ~sample["iscrowd"]
    out_N4 = map_boxes(boxes_N4[keep_N], src_hw=(h, w), dst_hw=hw, flip=flip, top=top, left=left, size=size)
    labels_N = sample["labels"][keep_N]
    if train:
        big_N = ((out_N4[:, 2] - out_N4[:, 0]) >= 1) & ((out_N4[:, 3] - out_N4[:, 1]) >= 1)
        out_N4, labels_N = out_N4[big_N], labels_N[big_N]
    out = {"image": image, "boxes": out_N4, "labels": labels_N, "image_id": sample["image_id"], "scale": s,
           "orig_size": (h, w)}
    if not train:
        out["annotations"] = sample["annotations"]
    return out


def transform_seg(sample: Mapping[str, Any], *, rng: random.Random, size: int, train: bool,
                  jitter: tuple[float, float] | None = None) -> dict[str, Any]:
    """Segmentation (mask already reduce-zero-label, 255 = ignore).

    Train: rescale so the shorter side is size·r (longer side ≤ 4·size·r), r ~ U(jitter) (mmseg ADE recipe), hflip,
    random size×size crop, pad (image mean, mask 255). Eval (deterministic): longer side to size keeping the ratio,
    pad bottom/right; `valid_hw` is the unpadded part and `orig_mask` the full-resolution mask for exact
    original-size scoring.

    Returns {"image": uint8 [3,S,S], "mask": uint8 [S,S]} (+ "valid_hw", "orig_size", "orig_mask" in eval).
    """
    img_3HW, mask_HW = sample["image"], sample["mask"]
    h, w = img_3HW.shape[1:]
    if train:
        lo, hi = jitter or SEG_JITTER
        s = rng.uniform(lo, hi) * min(size / min(h, w), SEG_MAX_ASPECT * size / max(h, w))
    else:
        s = size / max(h, w)
    hw = _scaled_hw(h, w, s)
    flip = train and rng.random() < 0.5
    top = rng.randint(0, max(0, hw[0] - size)) if train else 0
    left = rng.randint(0, max(0, hw[1] - size)) if train else 0
    image, mask = _place(img_3HW, mask_HW, hw=hw, flip=flip, top=top, left=left, size=size)
    out = {"image": image, "mask": mask}
    if not train:
        out.update(valid_hw=(min(size, hw[0]), min(size, hw[1])), orig_size=(h, w), orig_mask=mask_HW)
    return out
