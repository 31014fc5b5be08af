"""PASCAL-Context multi-task release (``PASCALContext.tar.gz`` / ASTMT ``PASCAL_MT``) -> dense shards
(``DENSE_SCHEMA``).

Layout: ``{src}/PASCALContext/`` (or ``{src}``) with ``JPEGImages/<id>.jpg``, ``ImageSets/Context/{train,val}.txt``,
``semseg/VOC12/<id>.png`` (else ``semseg/pascal-context/<id>.png``), ``human_parts/<id>.mat``,
``pascal-context/trainval/<id>.mat`` (``LabelMap``), ``normals_distill/<id>.png``, ``sal_distill/<id>.png``.
Derived at conversion (`pascal_labels.py`): ``human_parts.png``, ``edge.png`` (0/255), ``normals_valid.png`` (0/1).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io

from pretrain.prepare.dense import DenseConverter, DenseJob, DenseLayout, check_size, png_bytes, png_member
from pretrain.prepare.images import ImageError, decode_image, load_image, read_bytes
from pretrain.prepare.pascal_labels import (
    NORMALS_VALID_CLASSES,
    NUM_PART_CLASSES,
    LabelFileError,
    edge_map,
    label_map,
    normals_valid,
    parts_map,
)
from pretrain.prepare.shards import DEFAULT_MAX_BYTES, DEFAULT_MAX_COUNT
from pretrain.prepare.skeleton import run_converter

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def _load_mat(path: Path, name: str) -> dict:
    try:
        return scipy.io.loadmat(io.BytesIO(read_bytes(path)))
    except ImageError:
        raise
    except Exception as err:  # scipy raises ValueError, TypeError, MatReadError, ... for a damaged .mat
        raise ImageError("unreadable_mat", f"{name}: {type(err).__name__}: {err}") from None


def _semseg(path: Path, name: str, image_hw: tuple[int, int]) -> bytes:
    """The release label PNG as an L PNG of the same values: L bytes unchanged; a palette PNG's indices (what
    the reference's ``np.array(Image.open(...))`` reads) re-encoded as L."""
    checked, image = decode_image(read_bytes(path), name=name)
    if checked.ext != "png" or checked.mode not in ("L", "P"):
        raise ImageError("bad_label_format", f"{name}: expected an L or P PNG, found {checked.ext}/{checked.mode}")
    labels_HW = np.asarray(image, dtype=np.uint8)
    check_size(name, labels_HW.shape, image_hw)
    bad = np.setdiff1d(np.unique(labels_HW), [*range(len(VOC_CLASSES)), 255])
    if bad.size:
        raise ImageError("label_out_of_range", f"{name}: label values {bad.tolist()[:5]} not in 0..20 or 255")
    return checked.data if checked.mode == "L" else png_bytes(labels_HW)


def _derived(job: DenseJob, hw: tuple[int, int]) -> dict[str, bytes]:
    """human_parts.png, edge.png, normals_valid.png from the two .mat files."""
    fields = {}
    try:
        if "human_parts" in job.tasks:
            name = f"human_parts/{job.id}.mat"
            fields["human_parts.png"] = png_bytes(parts_map(_load_mat(job.files["parts"], name), hw))
        if "edge" in job.tasks or "normals" in job.tasks:
            name = f"pascal-context/trainval/{job.id}.mat"
            labels_HW = label_map(_load_mat(job.files["labelmap"], name))
            check_size(name, labels_HW.shape, hw)
            if "edge" in job.tasks:
                fields["edge.png"] = png_bytes(edge_map(labels_HW).astype(np.uint8) * 255)
            if "normals" in job.tasks:
                fields["normals_valid.png"] = png_bytes(normals_valid(labels_HW))
    except LabelFileError as err:
        raise ImageError(err.reason, f"{name}: {err}") from None
    return fields


def load_pascal_context(job: DenseJob) -> tuple[dict[str, bytes], int, int, str] | ImageError:
    """Decode, check and derive every member of one PASCAL-Context id (worker function)."""
    try:
        image = load_image(job.files["image"], name=f"JPEGImages/{job.id}.jpg")
        hw = (image.height, image.width)
        fields = {image.ext: image.data}
        if "semseg" in job.tasks:
            fields["semseg.png"] = _semseg(job.files["semseg"], f"semseg/{job.id}.png", hw)
        if "sal" in job.tasks:
            fields["sal.png"] = png_member(job.files["sal"], f"sal_distill/{job.id}.png", "L", hw)
        if "normals" in job.tasks:
            fields["normals.png"] = png_member(job.files["normals"], f"normals_distill/{job.id}.png", "RGB", hw)
        fields.update(_derived(job, hw))
    except ImageError as err:
        return err
    return fields, image.width, image.height, f"{image.ext}/{image.mode}"


PASCAL_CONTEXT = DenseLayout(
    dataset="pascal_context", root_name="PASCALContext", split_list="ImageSets/Context/{split}.txt",
    image=("JPEGImages/{id}.jpg",),
    roles={"semseg": ("semseg/VOC12/{id}.png", "semseg/pascal-context/{id}.png"), "parts": ("human_parts/{id}.mat",),
           "sal": ("sal_distill/{id}.png",), "normals": ("normals_distill/{id}.png",),
           "labelmap": ("pascal-context/trainval/{id}.mat",)},
    tasks={"semseg": ("semseg",), "human_parts": ("parts",), "sal": ("sal",), "normals": ("normals", "labelmap"),
           "edge": ("labelmap",)},
    pad_hw=(512, 512), expected={"train": 4998, "val": 5105}, load=load_pascal_context,
    info={"num_classes": {"semseg": len(VOC_CLASSES), "human_parts": NUM_PART_CLASSES, "sal": 2},
          "semseg_classes": list(VOC_CLASSES), "normals_valid_classes": sorted(NORMALS_VALID_CLASSES),
          "label_note": "semseg.png 0..20, 255 ignore; human_parts.png 0..6, all 255 = no person; sal.png v / 255 "
                        "> 0.5; normals n = 2 v / 255 - 1, ignored where normals_valid.png is 0; edge.png 0/255"},
)


class PascalContextConverter(DenseConverter):
    layout = PASCAL_CONTEXT


def convert_pascal_context(
    src: Path,
    out: Path,
    split: str,
    *,
    overwrite: bool = False,
    workers: int = 0,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_shards: int = 1,
    tasks: Sequence[str] | None = None,
    keep_oversized: bool = False,
    progress: bool = True,
) -> dict:
    """Convert one PASCAL-Context split to dense shards in ``out``; returns the summary (``ShardSink.finish``).

    ``tasks`` limits the converted tasks (default all five); an image larger than the 512x512 pad target is
    reported and skipped unless ``keep_oversized``; ids with a missing, unreadable or wrongly sized label file are
    skipped and listed.
    """
    return run_converter(PascalContextConverter(src, split, tasks=tasks, keep_oversized=keep_oversized), out,
                         overwrite=overwrite, workers=workers, max_count=max_count, max_bytes=max_bytes,
                         min_shards=min_shards, progress=progress)
