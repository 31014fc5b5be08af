"""The embedded corpus: small, deterministic, learnable ImageNet / COCO / ADE20K-style raw layouts.

Images are textured shapes (``SHAPES``) on varied backgrounds (smooth noise, gradients, stripes, plain):

- ImageNet: one large shape per image; class = (shape, fill) with fill in ``FILLS`` (solid, stripes, checker).
- COCO: 2-4 non-overlapping shapes per image; category = shape, with non-contiguous ids ``COCO_CATEGORY_IDS``.
- ADE20K: a floor band (id 4) and 1-4 possibly overlapping shapes; per-pixel ids ``ADE_CLASS_IDS``, 0 = other.

Colour and background carry no label, so the tasks need shape/texture features; shapes span 25-85% of the short
side, so the signal survives downscaling to 64 px. Every image draws from its own generator seeded by
(seed, dataset, split, index): same seed, same bytes. With ``quirks=True`` the train splits also hold the release
quirks the converters must handle (see ``write_imagenet``, ``write_coco``, ``write_ade20k``).

``LAYOUTS`` maps a dataset name to its writer; a new layout (NYUD-v2, PASCAL-Context) is one more function.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "cross", "crescent", "arrow", "ell")
FILLS = ("solid", "stripes", "checker")
COCO_CATEGORY_IDS = (1, 3, 7, 14, 22, 37, 52, 88)  # shape i -> category id; gaps like COCO's 1..90
ADE_CLASS_IDS = (12, 25, 37, 56, 74, 93, 117, 142)  # shape i -> ADE20K label id in 1..150
ADE_FLOOR_ID = 4
JPEG_QUALITY = 90
DS_STORE = b"\x00\x00\x00\x01Bud1" + bytes(24)  # the magic of a macOS .DS_Store; any content would do
_DATASET_CODES = {"imagenet": 1, "coco": 2, "ade20k": 3}
_SPLIT_CODES = {"train": 0, "val": 1}


_W = 0.32  # half-width of the cross arms
_FIXED_POLYGONS = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "cross": [(-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W), (_W, 1), (-_W, 1), (-_W, _W), (-1, _W),
              (-1, -_W), (-_W, -_W)],
    "arrow": [(-1, -0.3), (0.2, -0.3), (0.2, -0.75), (1, 0), (0.2, 0.75), (0.2, 0.3), (-1, 0.3)],
    "ell": [(-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)],
}


def _unit_polygon(shape: str) -> np.ndarray:
    """Outline of ``shape`` as [P, 2] points, scaled so that the farthest point lies on the unit circle."""
    if shape in _FIXED_POLYGONS:
        pts = np.array(_FIXED_POLYGONS[shape], float)
    elif shape == "circle":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "triangle":
        a = np.deg2rad([-90, 30, 150])
        pts = np.stack([np.cos(a), np.sin(a)], 1)
    elif shape == "star":
        a = np.linspace(-np.pi / 2, 1.5 * np.pi, 10, endpoint=False)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    elif shape == "crescent":  # outer arc through the left, inner arc meeting it at both tips
        a = np.deg2rad(np.linspace(50, 310, 24))
        inner = np.stack([0.55 * np.cos(a[::-1]) + np.cos(a[0]) * 0.45, np.sin(a[::-1])], 1)
        pts = np.concatenate([np.stack([np.cos(a), np.sin(a)], 1), inner])
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return pts / np.linalg.norm(pts, axis=1).max()


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = _unit_polygon(shape) @ rot.T * radius + np.array([cx, cy])
    return [(round(float(x), 2), round(float(y), 2)) for x, y in pts]


def _mask(polygon: list[tuple[float, float]], h: int, w: int) -> np.ndarray:
    """Boolean [H, W] mask of a polygon, drawn without anti-aliasing so label ids stay exact."""
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    rgb = Image.new("HSV", (1, 1), (int(h * 255), int(s * 255), int(v * 255))).convert("RGB").getpixel((0, 0))
    return np.array(rgb, np.float32)


def _muted(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.15, 0.6))


def _bright(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(0.65, 1), rng.uniform(0.75, 1))


def _ramp(rng: np.random.Generator, h: int, w: int, period: float, kind: str) -> np.ndarray:
    """[H, W] float pattern in 0..1: ``stripes``/``checker`` (binary, random angle), ``noise``, ``gradient``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, np.pi)
    u, v = xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)
    if kind == "stripes":
        return (np.floor(u / (period / 2)) % 2).astype(np.float32)
    if kind == "checker":
        return ((np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2).astype(np.float32)
    if kind == "noise":
        coarse = Image.fromarray(rng.random((h // 16 + 2, w // 16 + 2)).astype(np.float32), mode="F")
        return np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.float32)
    if kind == "gradient":
        return (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    return np.zeros((h, w), np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """[H, W, 3] float canvas: muted two-colour noise, gradient, low-contrast stripes or plain."""
    kind = ("noise", "gradient", "stripes", "plain")[rng.integers(4)]
    t = _ramp(rng, h, w, rng.uniform(8, 24), kind)[..., None]
    canvas = _muted(rng) * (1 - t) + _muted(rng) * t
    return canvas + rng.normal(0, 6, (h, w, 1)).astype(np.float32)


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, fill: str, radius: float) -> None:
    """Fill ``mask`` of the [H, W, 3] canvas with a bright colour in the given texture (in place)."""
    color = _bright(rng)
    t = _ramp(rng, *mask.shape, max(6.0, radius / 2.5), fill)[..., None]
    canvas[mask] = (color * (1 - t) + color * 0.3 * t)[mask]


def _place(rng: np.random.Generator, h: int, w: int, rel: tuple[float, float]) -> tuple[float, float, float]:
    """Random (cx, cy, radius) with radius = rel-range x short side, fully inside the image."""
    radius = rng.uniform(*rel) * min(h, w)
    return rng.uniform(radius, w - radius), rng.uniform(radius, h - radius), radius


def _size(rng: np.random.Generator, image_size: tuple[int, int]) -> tuple[int, int]:
    lo, hi = image_size
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def _encode(canvas: np.ndarray, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB").convert(mode)
    image.save(buf, fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _rng(seed: int, dataset: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _DATASET_CODES[dataset], _SPLIT_CODES[split], index])


def _rle(mask_HW: np.ndarray) -> dict:
    """Uncompressed COCO RLE (column-major run lengths, starting with a zero run) of a boolean mask."""
    flat = mask_HW.T.ravel()
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"counts": ([0] + counts) if flat[0] else counts, "size": list(mask_HW.shape)}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def imagenet_wnid(index: int) -> str:
    """Synthetic wnid of class ``index`` (``n9`` + 7 digits: real-looking, never a real ImageNet wnid)."""
    return f"n{90000000 + index:08d}"


def imagenet_class(index: int) -> tuple[str, str]:
    """(shape, fill) drawn for ImageNet class ``index``."""
    return SHAPES[index % len(SHAPES)], FILLS[index // len(SHAPES)]


def _imagenet_image(rng: np.random.Generator, cls: int, image_size: tuple[int, int]) -> np.ndarray:
    w, h = _size(rng, image_size)
    canvas = _background(rng, h, w)
    shape, fill = imagenet_class(cls)
    cx, cy, radius = _place(rng, h, w, (0.28, 0.42))
    _paint(rng, canvas, _mask(_polygon(shape, cx, cy, radius, rng.uniform(0, 2 * np.pi)), h, w), fill, radius)
    return canvas


_IMAGENET_QUIRKS = ("cmyk", "gray", "png_named_jpeg", "truncated")


def _imagenet_bytes(canvas: np.ndarray, quirk: str | None) -> bytes:
    if quirk == "cmyk":
        return _encode(canvas, mode="CMYK")
    if quirk == "gray":
        return _encode(canvas, mode="L")
    if quirk == "png_named_jpeg":
        return _encode(canvas, "PNG")
    data = _encode(canvas)
    return data[: len(data) // 2] if quirk == "truncated" else data


def write_imagenet(
    root: Path, *, seed: int, num_classes: int, train: int, val: int, image_size: tuple[int, int], quirks: bool
) -> dict:
    """Write ``{root}/{train,val}/<wnid>/*.JPEG`` (``train``/``val`` images per class) + LOC_synset_mapping.txt.

    Quirks (train): quirk k of ``_IMAGENET_QUIRKS`` replaces image k // num_classes of class k % num_classes
    (CMYK JPEG, grayscale JPEG, PNG bytes named .JPEG, JPEG cut in half), plus a ``.DS_Store`` in class 0.
    Returns per split: files written and the samples/skips a converter must report.
    """
    if not 1 <= num_classes <= len(SHAPES) * len(FILLS):
        raise ValueError(f"num_classes={num_classes} must be in 1..{len(SHAPES) * len(FILLS)}")
    if quirks and num_classes * train < len(_IMAGENET_QUIRKS):
        raise ValueError(f"quirks need >= {len(_IMAGENET_QUIRKS)} ImageNet train images, got {num_classes * train}")
    names = [f"{imagenet_wnid(c)} {' '.join(reversed(imagenet_class(c)))}, {imagenet_class(c)[0]}"
             for c in range(num_classes)]
    _write(root / "LOC_synset_mapping.txt", ("\n".join(names) + "\n").encode())
    quirk_at = {(k % num_classes, k // num_classes): q for k, q in enumerate(_IMAGENET_QUIRKS)} if quirks else {}
    result = {}
    for split, per_class in (("train", train), ("val", val)):
        for c in range(num_classes):
            wnid = imagenet_wnid(c)
            for i in range(per_class):
                index = c * per_class + i
                canvas = _imagenet_image(_rng(seed, "imagenet", split, index), c, image_size)
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{index + 1:08d}.JPEG"
                quirk = quirk_at.get((c, i)) if split == "train" else None
                _write(root / split / wnid / name, _imagenet_bytes(canvas, quirk))
        files = num_classes * per_class
        bad = int(quirks and split == "train")  # the truncated JPEG
        result[split] = {"files": files, "expected_samples": files - bad, "expected_skipped": 2 * bad}
    if quirks:
        _write(root / "train" / imagenet_wnid(0) / ".DS_Store", DS_STORE)
    return result


def _coco_image(rng: np.random.Generator, image_size: tuple[int, int], n_shapes: int) -> tuple[np.ndarray, list]:
    """Canvas and [(category_id, polygon, mask)] of up to ``n_shapes`` non-overlapping shapes."""
    w, h = _size(rng, image_size)
    canvas = _background(rng, h, w)
    placed: list[tuple[float, float, float]] = []
    objects = []
    for _ in range(n_shapes):
        for _try in range(20):
            cx, cy, radius = _place(rng, h, w, (0.13, 0.25))
            if all(np.hypot(cx - x, cy - y) > radius + r + 2 for x, y, r in placed):
                break
        else:
            continue
        placed.append((cx, cy, radius))
        s = int(rng.integers(len(SHAPES)))
        polygon = _polygon(SHAPES[s], cx, cy, radius, rng.uniform(0, 2 * np.pi))
        mask = _mask(polygon, h, w)
        _paint(rng, canvas, mask, FILLS[rng.integers(len(FILLS))], radius)
        objects.append((COCO_CATEGORY_IDS[s], polygon, mask))
    return canvas, objects


def _coco_annotation(ann_id: int, image_id: int, category_id: int, polygon: list) -> dict:
    """Polygon annotation as in COCO: bbox = tight xywh box of the vertices, area = polygon area (shoelace)."""
    xy = np.asarray(polygon)
    x0, y0 = xy.min(0)
    x1, y1 = xy.max(0)
    area = 0.5 * abs(float(np.dot(xy[:, 0], np.roll(xy[:, 1], 1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], 1))))
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
            "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)], "area": round(area, 2),
            "segmentation": [[c for point in polygon for c in point]]}


def _crowd(ann: dict, mask_HW: np.ndarray) -> dict:
    """Turn ``ann`` into an ``iscrowd=1`` annotation with an uncompressed RLE of the drawn mask."""
    ys, xs = np.nonzero(mask_HW)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
    return {**ann, "iscrowd": 1, "segmentation": _rle(mask_HW), "area": float(mask_HW.sum()), "bbox": bbox}


def write_coco(root: Path, *, seed: int, train: int, val: int, image_size: tuple[int, int], quirks: bool) -> dict:
    """Write ``{root}/annotations/instances_{train,val}2017.json`` + ``{root}/{train,val}2017/*.jpg``.

    Quirks (train): image 0 has no shapes and no annotations, image 1 is listed (with annotations) but its file
    is not written, image 2's first object is an ``iscrowd=1`` annotation with an uncompressed RLE.
    """
    if quirks and train < 3:
        raise ValueError(f"quirks need >= 3 COCO train images, got {train}")
    categories = [{"id": cid, "name": s, "supercategory": "shape"} for cid, s in zip(COCO_CATEGORY_IDS, SHAPES)]
    result = {}
    for split, count in (("train", train), ("val", val)):
        images, annotations = [], []
        quirky = quirks and split == "train"
        for i in range(count):
            rng = _rng(seed, "coco", split, i)
            image_id = (1 if split == "train" else 900_001) + 3 * i
            canvas, objects = _coco_image(rng, image_size, 0 if quirky and i == 0 else int(rng.integers(2, 5)))
            h, w = canvas.shape[:2]
            file_name = f"{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
            for k, (category_id, polygon, mask) in enumerate(objects):
                ann = _coco_annotation(len(annotations) + 1 + 10**6 * (split == "val"), image_id, category_id,
                                       polygon)
                annotations.append(_crowd(ann, mask) if quirky and i == 2 and k == 0 else ann)
            if not (quirky and i == 1):
                _write(root / f"{split}2017" / file_name, _encode(canvas))
        doc = {"info": {"description": "pretrain synthetic COCO-style shapes", "version": "1"}, "licenses": [],
               "images": images, "annotations": annotations, "categories": categories}
        _write(root / "annotations" / f"instances_{split}2017.json", json.dumps(doc).encode())
        result[split] = {"files": count - int(quirky), "expected_samples": count - int(quirky),
                         "expected_skipped": int(quirky), "annotations": len(annotations)}
    return result


def _ade_image(rng: np.random.Generator, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Canvas [H, W, 3] and uint8 label map [H, W]: floor band, then 1-4 shapes painted over each other."""
    w, h = _size(rng, image_size)
    canvas = _background(rng, h, w)
    labels_HW = np.zeros((h, w), np.uint8)
    floor = np.arange(h)[:, None].repeat(w, 1) >= int(h * rng.uniform(0.6, 0.8))
    canvas[floor] = (_muted(rng) * (1 - _ramp(rng, h, w, 10, "stripes")[..., None]) + _muted(rng) * 0.5)[floor]
    labels_HW[floor] = ADE_FLOOR_ID
    for _ in range(int(rng.integers(1, 5))):
        s = int(rng.integers(len(SHAPES)))
        cx, cy, radius = _place(rng, h, w, (0.15, 0.3))
        mask = _mask(_polygon(SHAPES[s], cx, cy, radius, rng.uniform(0, 2 * np.pi)), h, w)
        _paint(rng, canvas, mask, FILLS[rng.integers(len(FILLS))], radius)
        labels_HW[mask] = ADE_CLASS_IDS[s]
    return canvas, labels_HW


def write_ade20k(root: Path, *, seed: int, train: int, val: int, image_size: tuple[int, int], quirks: bool) -> dict:
    """Write ``{root}/ADEChallengeData2016/{images,annotations}/{training,validation}/`` (JPEG + L-mode PNG).

    Quirk (train): image 0 has no annotation file.
    """
    base = root / "ADEChallengeData2016"
    result = {}
    for split, sub, count in (("train", "training", train), ("val", "validation", val)):
        quirky = quirks and split == "train" and count > 0
        for i in range(count):
            canvas, labels_HW = _ade_image(_rng(seed, "ade20k", split, i), image_size)
            stem = f"ADE_{split}_{i + 1:08d}"
            _write(base / "images" / sub / f"{stem}.jpg", _encode(canvas))
            if not (quirky and i == 0):
                buf = io.BytesIO()
                Image.fromarray(labels_HW, "L").save(buf, "PNG")
                _write(base / "annotations" / sub / f"{stem}.png", buf.getvalue())
        result[split] = {"files": count, "expected_samples": count - int(quirky), "expected_skipped": int(quirky)}
    return result


LAYOUTS = {"imagenet": write_imagenet, "coco": write_coco, "ade20k": write_ade20k}
MARKER_NAME = ".synth.json"  # written first into every dataset folder synth creates


def _claim(folder: Path, *, overwrite: bool, seed: int) -> None:
    """Make ``folder`` empty and mark it as synth's. A folder synth wrote before (marker present, e.g. from an
    interrupted run) is regenerated; anything else is only removed with ``overwrite``."""
    if folder.exists():
        if not (overwrite or (folder / MARKER_NAME).is_file()):
            raise FileExistsError(f"{folder} exists and was not written by pretrain synth; pass overwrite=True "
                                  "(--overwrite) to replace it")
        shutil.rmtree(folder)
    _write(folder / MARKER_NAME, json.dumps({"generator": "pretrain.synth", "seed": seed}).encode())


def synthesize(
    out: Path,
    *,
    seed: int = 0,
    imagenet_train: int = 60,
    imagenet_val: int = 10,
    coco_train: int = 300,
    coco_val: int = 60,
    ade_train: int = 300,
    ade_val: int = 60,
    num_classes: int = 10,
    image_size: tuple[int, int] = (96, 160),
    scale: float = 1.0,
    quirks: bool = True,
    layouts: Sequence[str] = tuple(LAYOUTS),
    overwrite: bool = False,
) -> dict:
    """Write the raw corpus under ``out/{imagenet,coco,ade20k}``; returns per dataset and split the files written
    and the ``expected_samples`` / ``expected_skipped`` a converter must report.

    ``imagenet_train``/``imagenet_val`` count images per class; ``scale`` multiplies every image count (at least
    1, and at least 3 COCO train images with quirks); image sides are drawn uniformly from ``image_size`` =
    (min, max) pixels. A dataset folder synth wrote before is regenerated; any other existing folder is refused
    unless ``overwrite``.
    """
    out = Path(out)
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown layout(s) {unknown}; expected some of {sorted(LAYOUTS)}")
    if not 8 <= image_size[0] <= image_size[1]:
        raise ValueError(f"image_size={image_size} must be (min, max) with 8 <= min <= max")
    if scale <= 0:
        raise ValueError(f"scale={scale} must be > 0")

    def n(count: int, least: int = 1) -> int:
        return max(least, round(count * scale)) if scale != 1.0 else count

    args = {
        "imagenet": {"num_classes": num_classes, "train": n(imagenet_train), "val": n(imagenet_val)},
        "coco": {"train": n(coco_train, 3 if quirks else 1), "val": n(coco_val)},
        "ade20k": {"train": n(ade_train), "val": n(ade_val)},
    }
    start = time.monotonic()
    summary: dict = {"root": str(out), "seed": seed}
    for name in layouts:
        _claim(out / name, overwrite=overwrite, seed=seed)
        summary[name] = LAYOUTS[name](out / name, seed=seed, image_size=tuple(image_size), quirks=quirks,
                                      **args[name])
        logger.info("synth %s: %s", name, summary[name])
    summary["seconds"] = round(time.monotonic() - start, 3)
    logger.info("synth corpus written to %s in %.1f s", out, summary["seconds"])
    return summary
