"""Safe sample decoding: images, JSON, 8-bit label PNGs, ASCII ints and plain `.npy` arrays, nothing else.

WebDataset 1.0.2's default decoder chain (`autodecode.basichandlers`) unpickles `.pyd/.pkl/.pickle` and
`torch.load`s `.pth`, so shards are never passed through `wds.decode`. Instead `is_allowed_member` keeps every other
tar member from even being read (`tar.TarSamples` seeks over them), and the per-task decoders below look up
only the keys they need. Label maps go through PIL as raw 8-bit indices, never an RGB or float image decoder (which
would turn ADE class 149 into a colour or 0.584).

Untrusted bytes: shards may come from elsewhere or be damaged, and a decoder must never take the training process
down. torchvision's PNG decoder (libpng) dies with SIGSEGV on a bad IDAT CRC or a damaged zlib stream, so PNGs are
checked first (every chunk's CRC, IHDR sanity: `check_png`) and decoded by PIL, which raises on broken data.
JPEGs keep libjpeg-turbo (torchvision), which reports errors. Both formats have their size read from the header
and are refused above `MAX_IMAGE_PIXELS` before any pixel is decoded (a tiny PNG can declare 30000×30000).

Per-task decoders return plain dicts of tensors; every failure raises (ValueError, RuntimeError, OSError, ...),
and the pipeline in `sources.py` counts and skips that sample.
"""

from __future__ import annotations

import io
import json
import logging
import math
import struct
import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from pretrain.catalog import IGNORE_INDEX as IGNORE_INDEX  # the catalog's, re-exported for the decoders
from pretrain.metrics.segmentation import reduce_zero_label

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png")
MASK_KEY = "seg.png"
# dense multi-task members (DENSE_SCHEMA: data/dense.py); `.npy` is read with allow_pickle=False only
DENSE_KEYS = ("semseg.png", "depth.npy", "normals.png", "normals_valid.png", "edge.png", "edge_regions.png",
              "human_parts.png", "sal.png")
# Tar member extensions (text after the first dot of the file name) that are read at all.
ALLOWED_EXTENSIONS = frozenset({*IMAGE_KEYS, MASK_KEY, "cls", "json", *DENSE_KEYS})
# Largest image (width × height) decoded anywhere. The converters (prepare/images.py) accept what PIL opens without
# a DecompressionBombError, i.e. up to 2 × PIL's default MAX_IMAGE_PIXELS (89,478,485); one number for both sides.
MAX_IMAGE_PIXELS = 2 * 89_478_485
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}  # colour type → bit depths
_PNG_MAX_DIM = 2**31 - 1
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4/C8/CC are DHT/JPG/DAC, not frames
_JPEG_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: no length field


def is_allowed_member(fname: str) -> bool:
    """True for tar members whose extension is decodable here; everything else (pickles, tensors) is never read."""
    base = fname.rsplit("/", 1)[-1]
    if "." not in base:
        return False
    return base.split(".", 1)[1].lower() in ALLOWED_EXTENSIONS


def _check_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{what} declares {width}x{height} = {width * height} pixels, over the limit of "
                         f"{MAX_IMAGE_PIXELS} (MAX_IMAGE_PIXELS); refused before decoding")


def check_png(data: bytes) -> tuple[int, int]:
    """Walk a PNG's chunks before anything decodes it; returns (width, height) from IHDR.

    Checks: signature, IHDR first with sane fields (1 ≤ size < 2^31, a valid colour type / bit depth pair, standard
    compression/filter/interlace), the pixel limit (right after IHDR, so a bomb is refused without reading on), the
    CRC of every chunk, at least one IDAT, and IEND. A walk with `zlib.crc32` costs a few % of decoding the same
    bytes; written here because neither PIL (which skips IDAT CRCs) nor libpng (which crashes) checks safely.
    Raises ValueError naming the chunk and byte offset.
    """
    if not data.startswith(PNG_MAGIC):
        raise ValueError(f"not a PNG (starts with {bytes(data[:8]).hex()})")
    view, pos, size, has_idat = memoryview(data), len(PNG_MAGIC), None, False
    while True:
        if pos + 12 > len(data):
            raise ValueError(f"PNG truncated at byte {pos} (no IEND chunk)")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if length > _PNG_MAX_DIM or end > len(data):
            raise ValueError(f"PNG chunk {ctype!r} at byte {pos}: length {length} runs past the end ({len(data)} B)")
        if size is None:
            size = _png_ihdr(ctype, view[pos + 8:end - 4], pos)
        if zlib.crc32(view[pos + 4:end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            raise ValueError(f"PNG chunk {ctype!r} at byte {pos}: CRC mismatch (damaged file)")
        has_idat = has_idat or ctype == b"IDAT"
        if ctype == b"IEND":
            if not has_idat:
                raise ValueError("PNG has no IDAT chunk (no image data)")
            return size
        pos = end


def _png_ihdr(ctype: bytes, body: memoryview, pos: int) -> tuple[int, int]:
    if ctype != b"IHDR" or len(body) != 13:
        raise ValueError(f"PNG: first chunk at byte {pos} is {ctype!r} of {len(body)} B, expected a 13-byte IHDR")
    width, height, depth, colour, compression, filt, interlace = struct.unpack(">IIBBBBB", body)
    if not (1 <= width <= _PNG_MAX_DIM and 1 <= height <= _PNG_MAX_DIM):
        raise ValueError(f"PNG IHDR: bad size {width}x{height}")
    if depth not in _PNG_DEPTHS.get(colour, ()) or compression != 0 or filt != 0 or interlace not in (0, 1):
        raise ValueError(f"PNG IHDR: invalid colour type {colour} / bit depth {depth} / compression {compression} / "
                         f"filter {filt} / interlace {interlace}")
    _check_pixels(width, height, "PNG")
    return width, height


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's start-of-frame header, walking the marker segments (no decoding).

    Hand-written because PIL's lazy `Image.open` costs 60–300 µs per image on the loaded 2-core VM (5–25% of a
    224 px sample's decode + transform), this walk ~12 µs in the same runs. Raises ValueError when no frame header
    precedes the scan data.
    """
    if not data.startswith(JPEG_MAGIC):
        raise ValueError(f"not a JPEG (starts with {bytes(data[:8]).hex()})")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"JPEG: expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            break
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _JPEG_SOF:
            if length < 8 or pos + 9 > len(data):
                raise ValueError(f"JPEG: truncated frame header at byte {pos}")
            height, width = struct.unpack_from(">HH", data, pos + 5)
            if width == 0 or height == 0:
                raise ValueError(f"JPEG: frame header declares {width}x{height}")
            return width, height
        if length < 2:
            raise ValueError(f"JPEG: segment length {length} at byte {pos}")
        pos += 2 + length
    raise ValueError("JPEG: no frame header (SOF) before the scan data or the end")


def open_checked_png(data: bytes) -> Image.Image:
    """PIL image (lazy) of PNG bytes that passed `check_png`; raises ValueError before PIL sees bad bytes."""
    check_png(data)
    with warnings.catch_warnings():  # the pixel limit is ours (checked above), not PIL's warning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=["PNG"])


def _decode_png_rgb(data: bytes) -> torch.Tensor:
    with open_checked_png(data) as im:
        if im.mode.startswith("I"):  # 16-bit grey: keep the high byte (PIL's RGB conversion would clip at 255)
            arr = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
            arr_HW3 = np.repeat(arr[..., None], 3, axis=2)
        else:
            arr_HW3 = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr_HW3.transpose(2, 0, 1)))


def decode_rgb(data: bytes) -> torch.Tensor:
    """JPEG/PNG bytes → uint8 [3, H, W] RGB tensor; header checked and pixel-limited first (module docstring).

    JPEG: libjpeg-turbo via torchvision (CMYK and grayscale → RGB). PNG: PIL after `check_png` (palette, alpha, grey
    → RGB; 16-bit keeps the high byte). Anything else is refused.
    """
    if not data:
        raise ValueError("empty image bytes")
    if data.startswith(PNG_MAGIC):
        return _decode_png_rgb(data)
    _check_pixels(*jpeg_size(data), "JPEG")
    # a zero-copy view (decode_image only reads it): copying ~100 KB per sample cost ~1% of loader throughput.
    # torch warns once per process that the bytes are not writable; that is known and harmless here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        buf_U = torch.frombuffer(data, dtype=torch.uint8)
    img_3HW = decode_image(buf_U, mode=ImageReadMode.RGB)
    if img_3HW.dtype != torch.uint8 or img_3HW.ndim != 3 or img_3HW.shape[0] != 3:
        raise ValueError(f"image decoded to {tuple(img_3HW.shape)} {img_3HW.dtype}, expected uint8 [3, H, W]")
    return img_3HW


def decode_mask(data: bytes) -> torch.Tensor:
    """8-bit single-channel PNG bytes → uint8 [H, W] tensor of the stored values (no colour conversion).

    The PNG is checked like any image (`check_png`, pixel limit). Mode "L" and palette mode "P" are both read as raw
    indices; any other mode is an error, not a guess.
    """
    with open_checked_png(data) as im:
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


def image_bytes(sample: Mapping[str, Any]) -> bytes:
    """The image member of a raw sample (`jpg`, `jpeg` or `png`); KeyError naming the keys when there is none."""
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    raise KeyError(f"sample has no image entry (one of {IMAGE_KEYS}); keys: {sorted(sample)}")


def decode_cls_sample(sample: Mapping[str, Any], *, num_classes: int) -> dict[str, Any]:
    """Raw ImageNet sample → {"image": uint8 [3,H,W], "label": int in [0, num_classes)}."""
    label = decode_int(sample["cls"])
    if not 0 <= label < num_classes:
        raise ValueError(f"cls label {label} outside [0, {num_classes})")
    return {"image": decode_rgb(image_bytes(sample)), "label": label}


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def valid_coco_box(bbox: Any, *, width: int, height: int) -> tuple[float, float, float, float] | None:
    """COCO's own box rule: [x, y, w, h] of finite numbers, clipped to the image, with w > 0 and h > 0 after clipping.

    Returns the clipped xyxy box, or None when the box breaks the rule (the annotation is then dropped).
    """
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_finite_number(v) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def decode_det_sample(sample: Mapping[str, Any], *, cat_id_to_label: Mapping[int, int]) -> dict[str, Any]:
    """Raw COCO sample → image, xyxy boxes in original pixels, contiguous labels, crowd flags, raw annotations.

    Annotations whose box breaks `valid_coco_box` (non-finite, w ≤ 0 or h ≤ 0 after clipping to the decoded image)
    are dropped from the training targets AND from the returned `annotations` (the evaluation GT), so training and
    evaluation see the same objects; the sample itself stays. Kept boxes are clipped in `boxes`; `annotations` keep
    their original `bbox` (what COCO's evaluation scores against).

    Returns:
        {"image": uint8 [3,H,W], "boxes": float32 [n,4] xyxy, "labels": int64 [n] in 1..K,
         "iscrowd": bool [n], "image_id": int, "annotations": the kept annotations (original ids)}
    """
    meta = decode_json(sample["json"])
    image_3HW = decode_rgb(image_bytes(sample))
    height, width = image_3HW.shape[1:]
    kept, boxes = [], []
    for ann in meta["annotations"]:
        box = valid_coco_box(ann.get("bbox"), width=width, height=height)
        if box is not None:
            kept.append(ann)
            boxes.append(box)
    unknown = [a["category_id"] for a in kept if a["category_id"] not in cat_id_to_label]
    if unknown:
        raise ValueError(f"category ids {sorted(set(unknown))} are not in _info.json categories")
    boxes_N4 = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels_N = torch.tensor([cat_id_to_label[a["category_id"]] for a in kept], dtype=torch.int64)
    crowd_N = torch.tensor([bool(a.get("iscrowd", 0)) for a in kept], dtype=torch.bool)
    return {"image": image_3HW, "boxes": boxes_N4, "labels": labels_N, "iscrowd": crowd_N,
            "image_id": int(meta["image_id"]), "annotations": kept}


def decode_seg_sample(sample: Mapping[str, Any], *, num_classes: int) -> dict[str, Any]:
    """Raw ADE20K sample → {"image": uint8 [3,H,W], "mask": uint8 [H,W] after reduce-zero-label (255 = ignore)}.

    Raw values must lie in 0..num_classes (0 = other); anything larger is a corrupt label map, not a class.
    """
    mask_HW = decode_mask(sample[MASK_KEY])
    top = int(mask_HW.max()) if mask_HW.numel() else 0
    if top > num_classes:
        raise ValueError(f"{MASK_KEY} holds value {top} > num_classes {num_classes}")
    image_3HW = decode_rgb(image_bytes(sample))
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
