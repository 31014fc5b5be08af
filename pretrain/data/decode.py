"""Safe sample decoding: images, JSON, 8-bit label PNGs and ASCII ints, nothing else.

WebDataset 1.0.2's default decoder chain (`autodecode.basichandlers`) unpickles `.pyd/.pkl/.pickle` and
`torch.load`s `.pth`, so shards are never passed through `wds.decode`. Instead `is_allowed_member` keeps every other
tar member from even being read (`tar.TarSamples` seeks over them), and the per-task decoders below look up
only the keys they need. Label maps go through PIL as raw 8-bit indices, never an RGB or float image decoder (which
would turn ADE class 149 into a colour or 0.584).

Per-task decoders return plain dicts of tensors; every failure raises (ValueError, RuntimeError, OSError, ...),
and the pipeline in `sources.py` counts and skips that sample.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png")
MASK_KEY = "seg.png"
# Tar member extensions (text after the first dot of the file name) that are read at all.
ALLOWED_EXTENSIONS = frozenset({*IMAGE_KEYS, MASK_KEY, "cls", "json"})
IGNORE_INDEX = 255


def is_allowed_member(fname: str) -> bool:
    """True for tar members whose extension is decodable here; everything else (pickles, tensors) is never read."""
    base = fname.rsplit("/", 1)[-1]
    if "." not in base:
        return False
    return base.split(".", 1)[1].lower() in ALLOWED_EXTENSIONS


def decode_rgb(data: bytes) -> torch.Tensor:
    """JPEG/PNG bytes → uint8 [3, H, W] RGB tensor (libjpeg-turbo via torchvision).

    Grayscale, CMYK, palette and alpha images are converted to RGB by the decoder; 16-bit PNGs keep their high byte.
    """
    if not data:
        raise ValueError("empty image bytes")
    # a zero-copy view (decode_image only reads it): copying ~100 KB per sample cost ~1% of loader throughput.
    # torch warns once per process that the bytes are not writable; that is known and harmless here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        buf_U = torch.frombuffer(data, dtype=torch.uint8)
    img_3HW = decode_image(buf_U, mode=ImageReadMode.RGB)
    if img_3HW.dtype == torch.uint16:
        img_3HW = (img_3HW >> 8).to(torch.uint8)
    if img_3HW.dtype != torch.uint8 or img_3HW.ndim != 3 or img_3HW.shape[0] != 3:
        raise ValueError(f"image decoded to {tuple(img_3HW.shape)} {img_3HW.dtype}, expected uint8 [3, H, W]")
    return img_3HW


def decode_mask(data: bytes) -> torch.Tensor:
    """8-bit single-channel PNG bytes → uint8 [H, W] tensor of the stored values (no colour conversion).

    Mode "L" and palette mode "P" are both read as raw indices; any other mode is an error, not a guess.
    """
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"label PNG has mode {im.mode!r}, expected 8-bit 'L' or 'P'")
        arr_HW = np.array(im, dtype=np.uint8)
    return torch.from_numpy(arr_HW)


def decode_json(data: bytes) -> Any:
    """UTF-8 JSON bytes → Python object."""
    return json.loads(data.decode("utf-8"))


def decode_int(data: bytes) -> int:
    """ASCII integer bytes (webdataset `.cls` convention) → int."""
    return int(data.decode("ascii").strip())


def _image_bytes(sample: Mapping[str, Any]) -> bytes:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    raise KeyError(f"sample has no image entry (one of {IMAGE_KEYS}); keys: {sorted(sample)}")


def decode_cls_sample(sample: Mapping[str, Any], *, num_classes: int) -> dict[str, Any]:
    """Raw ImageNet sample → {"image": uint8 [3,H,W], "label": int in [0, num_classes)}."""
    label = decode_int(sample["cls"])
    if not 0 <= label < num_classes:
        raise ValueError(f"cls label {label} outside [0, {num_classes})")
    return {"image": decode_rgb(_image_bytes(sample)), "label": label}


def decode_det_sample(sample: Mapping[str, Any], *, cat_id_to_label: Mapping[int, int]) -> dict[str, Any]:
    """Raw COCO sample → image, xyxy boxes in original pixels, contiguous labels, crowd flags, raw annotations.

    Returns:
        {"image": uint8 [3,H,W], "boxes": float32 [n,4] xyxy, "labels": int64 [n] in 1..K,
         "iscrowd": bool [n], "image_id": int, "annotations": the json's annotation list (original ids)}
    """
    meta = decode_json(sample["json"])
    anns = meta["annotations"]
    bad = [a["bbox"] for a in anns if len(a["bbox"]) != 4]
    if bad:
        raise ValueError(f"bbox entries must be [x, y, w, h], got {bad[0]}")
    boxes_N4 = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes_N4[:, 2:] += boxes_N4[:, :2]
    unknown = [a["category_id"] for a in anns if a["category_id"] not in cat_id_to_label]
    if unknown:
        raise ValueError(f"category ids {sorted(set(unknown))} are not in _info.json categories")
    labels_N = torch.tensor([cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
    crowd_N = torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool)
    return {"image": decode_rgb(_image_bytes(sample)), "boxes": boxes_N4, "labels": labels_N, "iscrowd": crowd_N,
            "image_id": int(meta["image_id"]), "annotations": anns}


def reduce_zero_label(mask_HW: torch.Tensor) -> torch.Tensor:
    """ADE20K convention on a uint8 map: raw 0 ("other") → 255 (ignore), raw c → c − 1. Returns uint8."""
    return torch.where(mask_HW == 0, torch.full_like(mask_HW, IGNORE_INDEX), mask_HW - 1)


def decode_seg_sample(sample: Mapping[str, Any], *, num_classes: int) -> dict[str, Any]:
    """Raw ADE20K sample → {"image": uint8 [3,H,W], "mask": uint8 [H,W] after reduce-zero-label (255 = ignore)}.

    Raw values must lie in 0..num_classes (0 = other); anything larger is a corrupt label map, not a class.
    """
    mask_HW = decode_mask(sample[MASK_KEY])
    top = int(mask_HW.max()) if mask_HW.numel() else 0
    if top > num_classes:
        raise ValueError(f"{MASK_KEY} holds value {top} > num_classes {num_classes}")
    image_3HW = decode_rgb(_image_bytes(sample))
    if tuple(image_3HW.shape[1:]) != tuple(mask_HW.shape):
        raise ValueError(f"image {tuple(image_3HW.shape[1:])} and {MASK_KEY} {tuple(mask_HW.shape)} sizes differ")
    return {"image": image_3HW, "mask": reduce_zero_label(mask_HW)}


def coco_label_maps(categories: Sequence[Mapping[str, Any]]) -> tuple[dict[int, int], list[int]]:
    """COCO categories (original, non-contiguous ids) → (cat_id_to_label, contiguous_to_cat_id).

    Sorted original ids map to labels 1..K (0 = background, torchvision convention). `contiguous_to_cat_id` has K
    entries: label l ↔ `contiguous_to_cat_id[l - 1]` (the convention of `pretrain.metrics.detection`).
    """
    ids = sorted(int(c["id"]) for c in categories)
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate COCO category ids in {ids}")
    return {cat_id: i + 1 for i, cat_id in enumerate(ids)}, ids
