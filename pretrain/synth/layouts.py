"""Raw ImageNet / COCO / ADE20K release layouts of the embedded corpus, with the quirks the converters handle."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pretrain.synth.draw import (
    ADE_CLASS_IDS,
    ADE_FLOOR_ID,
    COCO_CATEGORY_IDS,
    DS_STORE,
    FILLS,
    SHAPES,
    background,
    encode,
    image_dims,
    muted_colour,
    paint,
    place,
    ramp,
    rasterize,
    rle,
    rng_for,
    shape_polygon,
    write_file,
)


def imagenet_wnid(index: int) -> str:
    """Synthetic wnid of class ``index`` (``n9`` + 7 digits: real-looking, never a real ImageNet wnid)."""
    return f"n{90000000 + index:08d}"


def imagenet_class(index: int) -> tuple[str, str]:
    """(shape, fill) drawn for ImageNet class ``index``."""
    return SHAPES[index % len(SHAPES)], FILLS[index // len(SHAPES)]


def _imagenet_image(rng: np.random.Generator, cls: int, image_size: tuple[int, int]) -> np.ndarray:
    w, h = image_dims(rng, image_size)
    canvas = background(rng, h, w)
    shape, fill = imagenet_class(cls)
    cx, cy, radius = place(rng, h, w, (0.28, 0.42))
    paint(rng, canvas, rasterize(shape_polygon(shape, cx, cy, radius, rng.uniform(0, 2 * np.pi)), h, w), fill, radius)
    return canvas


_IMAGENET_QUIRKS = ("cmyk", "gray", "png_named_jpeg", "truncated")


def _imagenet_bytes(canvas: np.ndarray, quirk: str | None) -> bytes:
    if quirk == "cmyk":
        return encode(canvas, mode="CMYK")
    if quirk == "gray":
        return encode(canvas, mode="L")
    if quirk == "png_named_jpeg":
        return encode(canvas, "PNG")
    data = encode(canvas)
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
    write_file(root / "LOC_synset_mapping.txt", ("\n".join(names) + "\n").encode())
    quirk_at = {(k % num_classes, k // num_classes): q for k, q in enumerate(_IMAGENET_QUIRKS)} if quirks else {}
    result = {}
    for split, per_class in (("train", train), ("val", val)):
        for c in range(num_classes):
            wnid = imagenet_wnid(c)
            for i in range(per_class):
                index = c * per_class + i
                canvas = _imagenet_image(rng_for(seed, "imagenet", split, index), c, image_size)
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{index + 1:08d}.JPEG"
                quirk = quirk_at.get((c, i)) if split == "train" else None
                write_file(root / split / wnid / name, _imagenet_bytes(canvas, quirk))
        files = num_classes * per_class
        bad = int(quirks and split == "train")  # the truncated JPEG
        result[split] = {"files": files, "expected_samples": files - bad, "expected_skipped": 2 * bad}
    if quirks:
        write_file(root / "train" / imagenet_wnid(0) / ".DS_Store", DS_STORE)
    return result


def _coco_image(rng: np.random.Generator, image_size: tuple[int, int], n_shapes: int) -> tuple[np.ndarray, list]:
    """Canvas and [(category_id, polygon, mask)] of up to ``n_shapes`` non-overlapping shapes."""
    w, h = image_dims(rng, image_size)
    canvas = background(rng, h, w)
    placed: list[tuple[float, float, float]] = []
    objects = []
    for _ in range(n_shapes):
        for _try in range(20):
            cx, cy, radius = place(rng, h, w, (0.13, 0.25))
            if all(np.hypot(cx - x, cy - y) > radius + r + 2 for x, y, r in placed):
                break
        else:
            continue
        placed.append((cx, cy, radius))
        s = int(rng.integers(len(SHAPES)))
        polygon = shape_polygon(SHAPES[s], cx, cy, radius, rng.uniform(0, 2 * np.pi))
        mask = rasterize(polygon, h, w)
        paint(rng, canvas, mask, FILLS[rng.integers(len(FILLS))], radius)
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
    return {**ann, "iscrowd": 1, "segmentation": rle(mask_HW), "area": float(mask_HW.sum()), "bbox": bbox}


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
            rng = rng_for(seed, "coco", split, i)
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
                write_file(root / f"{split}2017" / file_name, encode(canvas))
        doc = {"info": {"description": "pretrain synthetic COCO-style shapes", "version": "1"}, "licenses": [],
               "images": images, "annotations": annotations, "categories": categories}
        write_file(root / "annotations" / f"instances_{split}2017.json", json.dumps(doc).encode())
        result[split] = {"files": count - int(quirky), "expected_samples": count - int(quirky),
                         "expected_skipped": int(quirky), "annotations": len(annotations)}
    return result


def _ade_image(rng: np.random.Generator, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Canvas [H, W, 3] and uint8 label map [H, W]: floor band, then 1-4 shapes painted over each other."""
    w, h = image_dims(rng, image_size)
    canvas = background(rng, h, w)
    labels_HW = np.zeros((h, w), np.uint8)
    floor = np.arange(h)[:, None].repeat(w, 1) >= int(h * rng.uniform(0.6, 0.8))
    first = muted_colour(rng)  # draw order kept: the corpus bytes depend on it
    stripes = ramp(rng, h, w, 10, "stripes")[..., None]
    canvas[floor] = (first * (1 - stripes) + muted_colour(rng) * 0.5)[floor]
    labels_HW[floor] = ADE_FLOOR_ID
    for _ in range(int(rng.integers(1, 5))):
        s = int(rng.integers(len(SHAPES)))
        cx, cy, radius = place(rng, h, w, (0.15, 0.3))
        mask = rasterize(shape_polygon(SHAPES[s], cx, cy, radius, rng.uniform(0, 2 * np.pi)), h, w)
        paint(rng, canvas, mask, FILLS[rng.integers(len(FILLS))], radius)
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
            canvas, labels_HW = _ade_image(rng_for(seed, "ade20k", split, i), image_size)
            stem = f"ADE_{split}_{i + 1:08d}"
            write_file(base / "images" / sub / f"{stem}.jpg", encode(canvas))
            if not (quirky and i == 0):
                buf = io.BytesIO()
                Image.fromarray(labels_HW, "L").save(buf, "PNG")
                write_file(base / "annotations" / sub / f"{stem}.png", buf.getvalue())
        result[split] = {"files": count, "expected_samples": count - int(quirky), "expected_skipped": int(quirky)}
    return result
