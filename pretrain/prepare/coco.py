"""COCO instances JSON + images -> WebDataset shards.

Layout: ``{src}/annotations/instances_{train,val}2017.json`` and ``{src}/{train,val}2017/*.jpg``.
Sample: ``__key__`` (file stem), ``jpg`` or ``png`` (original bytes), ``json`` ``{image_id, file_name, width,
height, annotations: [{id, bbox (xywh), category_id (original, non-contiguous), iscrowd, area, segmentation}]}``
with annotation values exactly as in the file (polygons or RLE).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from pretrain.prepare.images import CheckedImage, ImageError, try_load_image
from pretrain.prepare.paths import OUTSIDE_SRC, SourceTree, confined
from pretrain.prepare.shards import DEFAULT_MAX_BYTES, DEFAULT_MAX_COUNT, LayoutError, encode_json, sample_key
from pretrain.prepare.skeleton import Converter, Listing, Sample, Skip, run_converter

logger = logging.getLogger(__name__)

_IMAGE_FIELDS = ("id", "file_name", "width", "height")
_ANN_FIELDS = ("id", "image_id", "bbox", "category_id", "iscrowd", "area", "segmentation")


def _require(entry: Any, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise LayoutError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [f for f in fields if f not in entry]
    if missing:
        raise LayoutError(f"{where}: missing field(s) {', '.join(missing)}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def clean_bbox(bbox: Any, width: int, height: int) -> tuple[list | None, str | None]:
    """COCO's box rule, applied once at conversion so training and evaluation see the same boxes.

    A box is ``[x, y, w, h]`` of four finite numbers with ``w > 0`` and ``h > 0``; a box reaching outside the
    ``width`` x ``height`` image is clipped to it (and dropped if nothing is left).

    Returns:
        (box, None) with the original list when it is inside the image, (clipped box, None) when it was clipped,
        or (None, why) for a box to drop.
    """
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return None, f"bbox {bbox!r} is not [x, y, w, h] of four finite numbers"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return None, f"bbox {bbox!r} has w <= 0 or h <= 0"
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x1 <= x0 or y1 <= y0:
        return None, f"bbox {bbox!r} lies outside the {width}x{height} image"
    if (x0, y0, x1, y1) == (x, y, x + w, y + h):
        return bbox, None  # unchanged values keep their JSON form (int stays int): shards stay byte-identical
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], None


def _check_size(image: dict, where: str) -> None:
    for key in ("width", "height"):
        value = image[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise LayoutError(f"{where}: {key} must be a positive integer, got {value!r}")


def load_instances(path: Path) -> dict:
    """Load and validate a COCO instances JSON; apply :func:`clean_bbox` to every annotation.

    Returns:
        ``{"images": [...], "categories": [...], "by_image": {image_id: [annotation, ...]}, "orphans": int,
        "bad_boxes": [(image_id, detail)], "clipped_boxes": int}`` with images and annotations in file order.
        Raises LayoutError naming the file and the bad entry.
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
    sizes: dict[int, tuple[int, int]] = {}
    for i, image in enumerate(data["images"]):
        _require(image, _IMAGE_FIELDS, f"{path}: images[{i}]")
        _check_size(image, f"{path}: images[{i}]")
        if image["id"] in by_image:
            raise LayoutError(f"{path}: images[{i}]: duplicate image id {image['id']}")
        by_image[image["id"]] = []
        sizes[image["id"]] = (image["width"], image["height"])
    orphans, clipped, bad_boxes = 0, 0, []
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}] (id {ann.get('id') if isinstance(ann, dict) else '?'})"
        _require(ann, _ANN_FIELDS, where)
        if ann["category_id"] not in category_ids:
            raise LayoutError(f"{where}: category_id {ann['category_id']} is not in 'categories'")
        if ann["image_id"] not in by_image:
            orphans += 1
            continue
        bbox, why = clean_bbox(ann["bbox"], *sizes[ann["image_id"]])
        if bbox is None:
            bad_boxes.append((ann["image_id"], f"image id {ann['image_id']}, annotation id {ann['id']}: {why}"))
            continue
        clipped += bbox is not ann["bbox"]
        by_image[ann["image_id"]].append({**{k: ann[k] for k in _ANN_FIELDS if k != "image_id"}, "bbox": bbox})
    if orphans:
        logger.warning("%s: %d annotations refer to image ids not in 'images' (ignored)", path, orphans)
    return {"images": data["images"], "categories": data["categories"], "by_image": by_image, "orphans": orphans,
            "bad_boxes": bad_boxes, "clipped_boxes": clipped}


def _locate(tree: SourceTree, split: str) -> tuple[Path, Path]:
    ann_path = tree.src / "annotations" / f"instances_{split}2017.json"
    image_dir = tree.src / f"{split}2017"
    expected = f"expected COCO layout {ann_path} and {image_dir}/*.jpg"
    if not os.path.lexists(ann_path):
        raise LayoutError(f"{expected}, but {ann_path} is missing")
    if not image_dir.is_dir():
        raise LayoutError(f"{expected}, but {image_dir} is not a directory")
    return tree.layout_file(ann_path), tree.layout_dir(image_dir)


def _sample_json(image: dict, annotations: list[dict]) -> bytes:
    return encode_json({"image_id": image["id"], "file_name": image["file_name"], "width": image["width"],
                        "height": image["height"], "annotations": annotations})


_Job = tuple[dict, Path]  # the image's JSON entry, its file


def _load(job: _Job) -> CheckedImage | ImageError:
    image, path = job
    return try_load_image((path, image["file_name"]))


class CocoConverter(Converter):
    """COCO instances JSON: one job per listed image, its annotations in the sample json."""

    dataset = "coco"
    load = staticmethod(_load)

    def __init__(self, src: Path, split: str, *, keep_unannotated: bool = True) -> None:
        super().__init__(src, split)
        self.keep_unannotated = keep_unannotated
        self.unannotated = 0

    def list_jobs(self) -> Listing:
        self.ann_path, self.image_dir = _locate(self.tree, self.split)
        self.coco = load_instances(self.ann_path)
        rel = {image["id"]: f"{self.split}2017/{image['file_name']}" for image in self.coco["images"]}
        skips = [Skip(rel[image_id], "bad_bbox", detail) for image_id, detail in self.coco["bad_boxes"]]
        jobs = []
        for image in self.coco["images"]:
            path = confined(self.src, f"{self.split}2017", str(image["file_name"]))
            if path is None:  # never opened: a file name must not point out of --src
                skips.append(Skip(rel[image["id"]], OUTSIDE_SRC,
                                  f"image id {image['id']}: file_name {image['file_name']!r} leaves {self.src}"))
            else:
                jobs.append((image, path))
        return Listing(jobs=jobs, skips=skips, source={"layout": "coco", "annotations": self.ann_path.name})

    def files(self, job: _Job) -> list[tuple[str, Path]]:
        return [(f"{self.split}2017/{job[0]['file_name']}", job[1])]

    def to_sample(self, job: _Job, loaded: CheckedImage | ImageError) -> Sample | Skip:
        image, path = job
        rel = f"{self.split}2017/{image['file_name']}"
        annotations = self.coco["by_image"][image["id"]]
        where = f"image id {image['id']}"
        if isinstance(loaded, ImageError):
            return Skip(rel, "missing_file" if not path.exists() else loaded.reason, f"{where}: {loaded.detail}")
        if (loaded.width, loaded.height) != (image["width"], image["height"]):
            return Skip(rel, "size_mismatch", f"{where}: file is {loaded.width}x{loaded.height}, "
                                              f"JSON says {image['width']}x{image['height']}")
        if not annotations and not self.keep_unannotated:
            return Skip(rel, "no_annotations", f"{where} has no annotations")
        return Sample(sample_key(Path(image["file_name"]).stem),
                      {loaded.ext: loaded.data, "json": _sample_json(image, annotations)},
                      f"{loaded.ext}/{loaded.mode}")

    def written(self, sample: Sample) -> None:
        super().written(sample)
        self.unannotated += not json.loads(sample.fields["json"])["annotations"]

    def extra(self) -> dict:
        return {"categories": self.coco["categories"], "num_categories": len(self.coco["categories"]),
                "clipped_boxes": self.coco["clipped_boxes"],
                "images_without_annotations": self.unannotated, "orphan_annotations": self.coco["orphans"],
                "image_kinds": dict(sorted(self.image_kinds.items())),
                "sample_keys": {"jpg|png": "original image bytes",
                                "json": "{image_id, file_name, width, height, annotations: [{id, bbox (xywh), "
                                        "category_id (original id), iscrowd, area, segmentation}]}"}}

    def summary_extra(self) -> dict:
        logger.info("coco/%s: %d written images have no annotations", self.split, self.unannotated)
        return {"images_without_annotations": self.unannotated}


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
    return run_converter(CocoConverter(src, split, keep_unannotated=keep_unannotated), out, overwrite=overwrite,
                         workers=workers, max_count=max_count, max_bytes=max_bytes, min_shards=min_shards,
                         progress=progress)
