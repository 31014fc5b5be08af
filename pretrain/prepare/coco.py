"""COCO instances JSON + images -> WebDataset shards.

Layout: ``{src}/annotations/instances_{train,val}2017.json`` and ``{src}/{train,val}2017/*.jpg``.
Sample: ``__key__`` (file stem), ``jpg`` or ``png`` (original bytes), ``json`` ``{image_id, file_name, width,
height, annotations: [{id, bbox (xywh), category_id (original, non-contiguous), iscrowd, area, segmentation}]}``
with annotation values exactly as in the file (polygons or RLE).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from pretrain.prepare.images import CheckedImage, ImageError, try_load_image
from pretrain.prepare.shards import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_COUNT,
    LayoutError,
    ShardSink,
    check_split,
    encode_json,
    prepare_output_dir,
    run_ordered,
    sample_key,
    shuffled,
)

logger = logging.getLogger(__name__)

_IMAGE_FIELDS = ("id", "file_name", "width", "height")
_ANN_FIELDS = ("id", "image_id", "bbox", "category_id", "iscrowd", "area", "segmentation")


def _require(entry: Any, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise LayoutError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [f for f in fields if f not in entry]
    if missing:
        raise LayoutError(f"{where}: missing field(s) {', '.join(missing)}")


def load_instances(path: Path) -> dict:
    """Load and validate a COCO instances JSON.

    Returns:
        ``{"images": [...], "categories": [...], "by_image": {image_id: [annotation, ...]}, "orphans": int}``
        with images and annotations in file order. Raises LayoutError naming the file and the bad entry.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LayoutError(f"{path}: cannot read COCO annotations: {err}") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                         "categories")):
        raise LayoutError(f"{path}: expected a COCO instances file with lists 'images', 'annotations', 'categories'")
    for i, cat in enumerate(data["categories"]):
        _require(cat, ("id", "name"), f"{path}: categories[{i}]")
    category_ids = {cat["id"] for cat in data["categories"]}
    by_image: dict[int, list[dict]] = {}
    for i, image in enumerate(data["images"]):
        _require(image, _IMAGE_FIELDS, f"{path}: images[{i}]")
        if image["id"] in by_image:
            raise LayoutError(f"{path}: images[{i}]: duplicate image id {image['id']}")
        by_image[image["id"]] = []
    orphans = 0
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}] (id {ann.get('id') if isinstance(ann, dict) else '?'})"
        _require(ann, _ANN_FIELDS, where)
        if ann["category_id"] not in category_ids:
            raise LayoutError(f"{where}: category_id {ann['category_id']} is not in 'categories'")
        if not (isinstance(ann["bbox"], list) and len(ann["bbox"]) == 4):
            raise LayoutError(f"{where}: bbox must be [x, y, w, h], got {ann['bbox']!r}")
        if ann["image_id"] not in by_image:
            orphans += 1
            continue
        by_image[ann["image_id"]].append({k: ann[k] for k in _ANN_FIELDS if k != "image_id"})
    if orphans:
        logger.warning("%s: %d annotations refer to image ids not in 'images' (ignored)", path, orphans)
    return {"images": data["images"], "categories": data["categories"], "by_image": by_image, "orphans": orphans}


def _locate(src: Path, split: str) -> tuple[Path, Path]:
    ann_path = src / "annotations" / f"instances_{split}2017.json"
    image_dir = src / f"{split}2017"
    expected = f"expected COCO layout {ann_path} and {image_dir}/*.jpg"
    if not ann_path.is_file():
        raise LayoutError(f"{expected}, but {ann_path} is missing")
    if not image_dir.is_dir():
        raise LayoutError(f"{expected}, but {image_dir} is not a directory")
    return ann_path, image_dir


def _sample_json(image: dict, annotations: list[dict]) -> bytes:
    return encode_json({"image_id": image["id"], "file_name": image["file_name"], "width": image["width"],
                        "height": image["height"], "annotations": annotations})


def _problem(image: dict, result: CheckedImage | ImageError, image_dir: Path, *, has_annotations: bool
             ) -> tuple[str, str] | None:
    """(reason, detail) when the image listed in the JSON cannot become a sample, else None."""
    where = f"image id {image['id']}"
    if isinstance(result, ImageError):
        missing = not (image_dir / image["file_name"]).exists()
        return ("missing_file" if missing else result.reason), f"{where}: {result.detail}"
    if (result.width, result.height) != (image["width"], image["height"]):
        return "size_mismatch", (f"{where}: file is {result.width}x{result.height}, "
                                 f"JSON says {image['width']}x{image['height']}")
    if not has_annotations:
        return "no_annotations", f"{where} has no annotations"
    return None


def convert_coco(
    src: Path,
    out: Path,
    split: str,
    *,
    overwrite: bool = False,
    workers: int = 0,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_shards: int = 1,
    keep_unannotated: bool = True,
    progress: bool = True,
) -> dict:
    """Convert one COCO split to shards in ``out``; returns the summary (see ``ShardSink.finish``).

    Images listed in the JSON whose file is missing, undecodable or of a different size than listed are
    skipped with a reason; images without annotations are kept (and counted) unless ``keep_unannotated=False``.
    """
    src, out = Path(src), Path(out)
    check_split(split)
    ann_path, image_dir = _locate(src, split)
    coco = load_instances(ann_path)
    images = shuffled(coco["images"])
    prepare_output_dir(out, overwrite=overwrite)
    kinds: Counter[str] = Counter()
    unannotated = 0
    with ShardSink(out, dataset="coco", split=split, src=src, expected=len(images), max_count=max_count,
                   max_bytes=max_bytes, min_shards=min_shards) as sink:
        loads = [(image_dir / image["file_name"], image["file_name"]) for image in images]
        results = run_ordered(try_load_image, loads, workers=workers, desc=f"coco/{split}", progress=progress)
        for image, result in zip(images, results):
            rel = f"{split}2017/{image['file_name']}"
            annotations = coco["by_image"][image["id"]]
            problem = _problem(image, result, image_dir, has_annotations=bool(annotations) or keep_unannotated)
            if problem is not None:
                sink.skip(rel, *problem)
                continue
            assert isinstance(result, CheckedImage)
            if sink.write(sample_key(Path(image["file_name"]).stem), {result.ext: result.data,
                                                                       "json": _sample_json(image, annotations)}):
                kinds[f"{result.ext}/{result.mode}"] += 1
                unannotated += not annotations
        extra = {"categories": coco["categories"], "num_categories": len(coco["categories"]),
                 "images_without_annotations": unannotated, "orphan_annotations": coco["orphans"],
                 "image_kinds": dict(sorted(kinds.items())),
                 "sample_keys": {"jpg|png": "original image bytes",
                                 "json": "{image_id, file_name, width, height, annotations: [{id, bbox (xywh), "
                                         "category_id (original id), iscrowd, area, segmentation}]}"}}
        summary = sink.finish(source={"layout": "coco", "annotations": ann_path.name}, extra=extra)
    logger.info("coco/%s: %d written images have no annotations", split, unannotated)
    return {**summary, "images_without_annotations": unannotated}
