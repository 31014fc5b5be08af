"""Joint transforms of a dense multi-task sample (image + every task's map), both protocols of evaluation.md §1/§3.

"new" (ATRC → InvPT → TaskPrompter → MLoRE): train = RandomScaling s ~ U[0.5, 2] (image bilinear, labels nearest,
depth / s) → RandomCrop with cat_max_ratio 0.75 (≤ 10 re-draws, on semseg) → hflip p=0.5 (normals x negated) →
PhotoMetricDistortion (uint8) → centred pad → AddIgnoreRegions. Eval = centred pad to the eval size, with
`crop_box` (top, left, h, w) to cut predictions back to the original image exactly.
"old" (ASTMT / MTL-PyTorch: M3ViT, Mod-Squad): train = hflip → FixedResize; eval = FixedResize, with
`orig_targets` (full-resolution maps) so predictions resized back to `orig_size` are scored on the original labels.
Old training = hflip → ScaleNRotate (PASCAL: rotation ±20°, scale 0.75–1.25; NYUD: scale {1, 1.2, 1.5}; about the
centre, zero border like cv2.warpAffine's default; normals rotated in-plane) → FixedResize. Resampling follows
ASTMT's FLAGVALS: image and normals bicubic (normals back to unit length after FixedResize), every label nearest.

Random parameters come from an explicit `random.Random` (see transforms.py for why not torch's global RNG). Images
stay uint8: padding is the ImageNet mean (`PAD_RGB`, ≈ 0 after the model's normalisation, which is what the
reference pads with after normalising). Interpolation follows the reference's OpenCV calls: image bilinear without
antialiasing (cv2.INTER_LINEAR), labels nearest with OpenCV's floor rule (torch "nearest", not "nearest-exact"),
scaled sizes truncated (`int(h * s)`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as NF
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from pretrain.catalog import ScaleRotate
from pretrain.data.dense_decode import DENSE_TASKS
from pretrain.data.transforms import PAD_RGB

IGNORE = 255.0
SCALE_RANGE = (0.5, 2.0)
CAT_MAX_RATIO = 0.75
CROP_RETRIES = 10
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # OpenCV uint8 hue units (2°): draws from [-18, 17], as mmseg/ATRC's randint(-d, d - 1)

Targets = dict[str, torch.Tensor]


def _resize(image_3HW: torch.Tensor, targets: Targets, hw: tuple[int, int]) -> tuple[torch.Tensor, Targets]:
    """New protocol's RandomScaling geometry: image bilinear (cv2.INTER_LINEAR), every map nearest."""
    image = F.resize(image_3HW, list(hw), interpolation=InterpolationMode.BILINEAR, antialias=False)
    return image, {t: F.resize(x, list(hw), interpolation=InterpolationMode.NEAREST) for t, x in targets.items()}


def _fixed_resize(image_3HW: torch.Tensor, targets: Targets, hw: tuple[int, int]) -> tuple[torch.Tensor, Targets]:
    """Old protocol's FixedResize (ASTMT FLAGVALS): image bicubic, normals bicubic + unit length, labels nearest."""
    image = F.resize(image_3HW, list(hw), interpolation=InterpolationMode.BICUBIC, antialias=False)
    out = {}
    for name, x_CHW in targets.items():
        if DENSE_TASKS[name].old_normals:
            x_CHW = F.resize(x_CHW, list(hw), interpolation=InterpolationMode.BICUBIC, antialias=False)
            x_CHW = x_CHW / (x_CHW.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps)
        else:
            x_CHW = F.resize(x_CHW, list(hw), interpolation=InterpolationMode.NEAREST)
        out[name] = x_CHW
    return image, out


def _crop_ratio_ok(semseg_1HW: torch.Tensor, ratio: float) -> bool:
    """mmseg's cat_max_ratio test: ≥ 2 labelled classes and none covering `ratio` or more of labelled pixels."""
    counts = torch.bincount(semseg_1HW.flatten().to(torch.int64), minlength=256)[:255]
    counts = counts[counts > 0]
    return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < ratio


def crop_params(rng: random.Random, hw: tuple[int, int], size: tuple[int, int], *,
                semseg_1HW: torch.Tensor | None, cat_max_ratio: float) -> tuple[int, int]:
    """(top, left) of a random size-window (clipped by the image where it is smaller).

    With semseg and cat_max_ratio < 1 a window is re-drawn up to CROP_RETRIES times while one class dominates; the
    last draw is kept unchecked, as in the reference.
    """
    def draw() -> tuple[int, int]:
        return rng.randint(0, max(hw[0] - size[0], 0)), rng.randint(0, max(hw[1] - size[1], 0))

    top, left = draw()
    if semseg_1HW is None or cat_max_ratio >= 1.0:
        return top, left
    for _ in range(CROP_RETRIES):
        if _crop_ratio_ok(semseg_1HW[:, top:top + size[0], left:left + size[1]], cat_max_ratio):
            break
        top, left = draw()
    return top, left


def _flip(image_3HW: torch.Tensor, targets: Targets) -> tuple[torch.Tensor, Targets]:
    out = {}
    for name, x_CHW in targets.items():
        x_CHW = x_CHW.flip(-1)
        if DENSE_TASKS[name].negate_x_on_flip:
            x_CHW = torch.cat([-x_CHW[:1], x_CHW[1:]])
        out[name] = x_CHW
    return image_3HW.flip(-1), out


def pad_centred(x_CHW: torch.Tensor, size: tuple[int, int], fill: float | tuple[int, ...]) -> torch.Tensor:
    """x placed at (Δh // 2, Δw // 2) of a size canvas of `fill` (per channel or scalar). x must fit."""
    c, h, w = x_CHW.shape
    if h > size[0] or w > size[1]:
        raise ValueError(f"map {h}x{w} does not fit in the pad target {size[0]}x{size[1]}")
    fill_C11 = torch.as_tensor(fill, dtype=x_CHW.dtype).reshape(-1, 1, 1)
    out_CHW = fill_C11.expand(c, *size).clone()
    top, left = (size[0] - h) // 2, (size[1] - w) // 2
    out_CHW[:, top:top + h, left:left + w] = x_CHW
    return out_CHW


def _pad(image_3HW: torch.Tensor, targets: Targets, size: tuple[int, int]) -> tuple[torch.Tensor, Targets]:
    return (pad_centred(image_3HW, size, PAD_RGB),
            {t: pad_centred(x, size, DENSE_TASKS[t].fill) for t, x in targets.items()})


def add_ignore_regions(targets: Targets) -> Targets:
    """AddIgnoreRegions: zero-norm normals → 255 on all channels; a parts map with only {0, 255} → all 255."""
    out = {}
    for name, x_CHW in targets.items():
        task = DENSE_TASKS[name]
        if task.zero_norm_ignored:
            x_CHW = x_CHW.masked_fill((x_CHW == 0).all(0, keepdim=True), IGNORE)
        if task.ignore_without_foreground and bool(((x_CHW == 0) | (x_CHW == IGNORE)).all()):
            x_CHW = torch.full_like(x_CHW, IGNORE)
        out[name] = x_CHW
    return out


# ---------------------------------------------------------------- photometric distortion (OpenCV HSV, uint8)

def _affine_u8(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """x·alpha + beta, clipped to 0..255 and truncated to uint8 (numpy's astype after clip, as the reference)."""
    return (x.to(torch.float32) * alpha + beta).clamp_(0, 255).to(torch.uint8)


def rgb_to_hsv_cv(image_3HW: torch.Tensor) -> torch.Tensor:
    """uint8 RGB → uint8 HSV in OpenCV's 8-bit convention: H in [0, 180) (2° units), S and V in 0..255.

    Written here because no library in the environment has OpenCV's 8-bit HSV (torchvision/kornia use float H in
    [0, 1) or radians); values are rounded like OpenCV's fixed-point code up to ±1 in rare ties.
    """
    r, g, b = image_3HW.to(torch.float32)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    s = torch.where(v > 0, diff * 255.0 / v.clamp(min=1.0), torch.zeros_like(v))
    safe = diff.clamp(min=1e-6)
    h = torch.where(v == r, 60.0 * (g - b) / safe,
                    torch.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe))
    h = torch.where(diff == 0, torch.zeros_like(h), h)
    h = torch.where(h < 0, h + 360.0, h)
    return torch.stack([torch.round(h / 2.0) % 180, torch.round(s), v]).to(torch.uint8)


def hsv_cv_to_rgb(hsv_3HW: torch.Tensor) -> torch.Tensor:
    """uint8 HSV (OpenCV 8-bit convention, see rgb_to_hsv_cv) → uint8 RGB, rounded.

    Closed form of the six-sector rule: channel = v − v·s·clip(min(k, 4 − k), 0, 1), k = (n + h/60) mod 6 with
    n = 5, 3, 1 for R, G, B (one expression per channel instead of six candidate maps).
    """
    h, s, v = hsv_3HW.to(torch.float32)
    h6_1HW = (h * (2.0 / 60.0))[None]
    k_3HW = (torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1) + h6_1HW) % 6.0
    ramp_3HW = torch.minimum(k_3HW, 4.0 - k_3HW).clamp_(0.0, 1.0)
    rgb_3HW = v[None] - (v * s / 255.0)[None] * ramp_3HW
    return torch.round(rgb_3HW).clamp_(0, 255).to(torch.uint8)


def photometric_distortion(image_3HW: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """mmseg/ATRC PhotoMetricDistortion on uint8 RGB: brightness ±32, contrast [0.5, 1.5] (first or last),
    saturation [0.5, 1.5], hue ±18 (OpenCV units); each step with p = 0.5. Returns uint8 [3,H,W]."""
    x = image_3HW
    if rng.random() < 0.5:
        x = _affine_u8(x, beta=rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        x = _affine_u8(x, alpha=rng.uniform(*CONTRAST_RANGE))
    if rng.random() < 0.5:
        hsv = rgb_to_hsv_cv(x)
        hsv[1] = _affine_u8(hsv[1], alpha=rng.uniform(*SATURATION_RANGE))
        x = hsv_cv_to_rgb(hsv)
    if rng.random() < 0.5:
        hsv = rgb_to_hsv_cv(x)
        hsv[0] = ((hsv[0].to(torch.int64) + rng.randint(-HUE_DELTA, HUE_DELTA - 1)) % 180).to(torch.uint8)
        x = hsv_cv_to_rgb(hsv)
    if not contrast_first and rng.random() < 0.5:
        x = _affine_u8(x, alpha=rng.uniform(*CONTRAST_RANGE))
    return x


# ---------------------------------------------------------------- old protocol: ScaleNRotate

def _warp_grid(h: int, w: int, angle: float, scale: float) -> torch.Tensor:
    """grid_sample grid [1,H,W,2] of cv2.warpAffine with getRotationMatrix2D((w/2, h/2), angle, scale).

    cv2 maps source → output by M = [[a, b, (1−a)cx − b·cy], [−b, a, b·cx + (1−a)cy]] (a = s·cos, b = s·sin) and
    samples each output pixel at M⁻¹·(x, y); pixel centres are integer coordinates, hence align_corners=True.
    """
    rad = math.radians(angle)
    a, b = scale * math.cos(rad), scale * math.sin(rad)
    cx, cy = w / 2, h / 2
    tx, ty = (1 - a) * cx - b * cy, b * cx + (1 - a) * cy
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    det = a * a + b * b
    sx = (a * (xs - tx) - b * (ys - ty)) / det
    sy = (b * (xs - tx) + a * (ys - ty)) / det
    gx = 2 * sx / max(w - 1, 1) - 1
    gy = 2 * sy / max(h - 1, 1) - 1
    return torch.stack([gx, gy], dim=-1)[None]


def _warp(x_CHW: torch.Tensor, grid_1HW2: torch.Tensor, mode: str) -> torch.Tensor:
    out_CHW = NF.grid_sample(x_CHW[None].to(torch.float32), grid_1HW2, mode=mode, padding_mode="zeros",
                             align_corners=True)[0]
    if x_CHW.dtype == torch.uint8:
        out_CHW = out_CHW.round().clamp_(0, 255).to(torch.uint8)
    return out_CHW


def scale_rotate(image_3HW: torch.Tensor, targets: Targets, *, angle: float,
                 scale: float) -> tuple[torch.Tensor, Targets]:
    """ASTMT ScaleNRotate with fixed parameters: rotate by `angle` degrees (counter-clockwise) and zoom by `scale`
    about the image centre, same size, zeros outside (cv2's default border; zero normals become ignore). Image and
    normals bicubic, labels nearest; normals' in-plane (x, y) components rotate with the image."""
    grid_1HW2 = _warp_grid(*image_3HW.shape[1:], angle, scale)
    out = {}
    for name, x_CHW in targets.items():
        if DENSE_TASKS[name].old_normals:
            rad = math.radians(angle)
            nx, ny = x_CHW[0], x_CHW[1]
            x_CHW = torch.stack([nx * math.cos(rad) + ny * math.sin(rad), ny * math.cos(rad) - nx * math.sin(rad),
                                 *x_CHW[2:]])
            out[name] = _warp(x_CHW, grid_1HW2, "bicubic")
        else:
            out[name] = _warp(x_CHW, grid_1HW2, "nearest")
    return _warp(image_3HW, grid_1HW2, "bicubic"), out


def _draw_scale_rotate(rng: random.Random, ranges: ScaleRotate) -> tuple[float, float]:
    if ranges.discrete:
        return ranges.rotations[rng.randrange(len(ranges.rotations))], ranges.scales[rng.randrange(len(ranges.scales))]
    rot_span, scale_span = ranges.rotations[1] - ranges.rotations[0], ranges.scales[1] - ranges.scales[0]
    # ASTMT centres both ranges on 0° and scale 1, whatever their bounds
    return rot_span * rng.random() - rot_span / 2, scale_span * rng.random() - scale_span / 2 + 1


# ---------------------------------------------------------------- protocols

def _train_new(image: torch.Tensor, targets: Targets, rng: random.Random, size: tuple[int, int], *,
               scale_range: tuple[float, float], cat_max_ratio: float, **_: Any) -> dict[str, Any]:
    s = rng.uniform(*scale_range)
    if s != 1.0:
        h, w = image.shape[1:]
        image, targets = _resize(image, targets, (max(1, int(h * s)), max(1, int(w * s))))
        targets = {t: x / s if DENSE_TASKS[t].divide_by_scale else x for t, x in targets.items()}
    top, left = crop_params(rng, tuple(image.shape[1:]), size, semseg_1HW=targets.get("semseg"),
                            cat_max_ratio=cat_max_ratio)
    window = (slice(None), slice(top, top + size[0]), slice(left, left + size[1]))
    image, targets = image[window], {t: x[window] for t, x in targets.items()}
    if rng.random() < 0.5:
        image, targets = _flip(image, targets)
    image = photometric_distortion(image, rng)
    image, targets = _pad(image, targets, size)
    return {"image": image, "targets": add_ignore_regions(targets)}


def _eval_new(image: torch.Tensor, targets: Targets, size: tuple[int, int]) -> dict[str, Any]:
    h, w = image.shape[1:]
    if h > size[0] or w > size[1]:
        raise ValueError(f"image {h}x{w} is larger than the eval pad size {size[0]}x{size[1]} (the new protocol "
                         "pads, never resizes: raise the eval size)")
    image, targets = _pad(image, targets, size)
    crop_box = ((size[0] - h) // 2, (size[1] - w) // 2, h, w)
    return {"image": image, "targets": add_ignore_regions(targets), "crop_box": crop_box, "orig_size": (h, w)}


def _train_old(image: torch.Tensor, targets: Targets, rng: random.Random, size: tuple[int, int], *,
               scale_rotate_ranges: ScaleRotate | None, **_: Any) -> dict[str, Any]:
    if rng.random() < 0.5:
        image, targets = _flip(image, targets)
    if scale_rotate_ranges is not None:
        angle, scale = _draw_scale_rotate(rng, scale_rotate_ranges)
        if angle != 0.0 or scale != 1.0:
            image, targets = scale_rotate(image, targets, angle=angle, scale=scale)
    image, targets = _fixed_resize(image, targets, size)
    return {"image": image, "targets": add_ignore_regions(targets)}


def _eval_old(image: torch.Tensor, targets: Targets, size: tuple[int, int]) -> dict[str, Any]:
    h, w = image.shape[1:]
    resized, resized_targets = _fixed_resize(image, targets, size)
    return {"image": resized, "targets": add_ignore_regions(resized_targets), "crop_box": (0, 0, *size),
            "orig_size": (h, w), "orig_targets": add_ignore_regions(targets)}


PROTOCOLS = {"new": (_train_new, _eval_new), "old": (_train_old, _eval_old)}


def transform_dense(sample: Mapping[str, Any], *, rng: random.Random, size: tuple[int, int], train: bool,
                    protocol: str = "new", scale_range: tuple[float, float] = SCALE_RANGE,
                    cat_max_ratio: float = CAT_MAX_RATIO,
                    scale_rotate_ranges: ScaleRotate | None = None) -> dict[str, Any]:
    """One decoded dense sample → fixed-size image and maps (module docstring for the two protocols).

    Args:
        sample: {"image": uint8 [3,H,W], "targets": {task: [C,H,W]}} from `decode_dense_sample`.
        size: (h, w) of the output: the train crop, the new protocol's eval pad target or the old FixedResize.
        scale_range, cat_max_ratio: new protocol training; scale_rotate_ranges: old protocol training (None: off).
    Returns:
        {"image": uint8 [3,h,w], "targets": {task: [C,h,w]}} (+ eval: "crop_box" (top, left, height, width) of the
        original image inside the output, "orig_size" (H, W); old protocol eval also "orig_targets" at (H, W)).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown dense protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    image, targets = sample["image"], dict(sample["targets"])
    train_fn, eval_fn = PROTOCOLS[protocol]
    if train:
        return train_fn(image, targets, rng, tuple(size), scale_range=scale_range, cat_max_ratio=cat_max_ratio,
                        scale_rotate_ranges=scale_rotate_ranges)
    return eval_fn(image, targets, tuple(size))
