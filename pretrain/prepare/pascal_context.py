"""PASCAL-Context multi-task release (``PASCALContext.tar.gz`` / ASTMT ``PASCAL_MT``) -> dense shards
(``DENSE_SCHEMA``).

Layout: ``{src}/PASCALContext/`` (or ``{src}``) with ``JPEGImages/<id>.jpg``, ``ImageSets/Context/{train,val}.txt``,
``semseg/VOC12/<id>.png`` (else ``semseg/pascal-context/<id>.png``), ``human_parts/<id>.mat``,
``pascal-context/trainval/<id>.mat`` (``LabelMap``), ``normals_distill/<id>.png``, ``sal_distill/<id>.png``.
Derived at conversion (`pascal_labels.py`): ``human_parts.png``, ``edge.png`` (0/255, the training target),
``edge_regions.png`` (the LabelMap renumbered 0..K-1: SEISM's boundary GT for evaluation), ``normals_valid.png`` (0/1).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.io

from pretrain.catalog import DATASETS
from pretrain.prepare.dense import (
    DenseConverter,
    DenseJob,
    DenseLayout,
    check_size,
    load_members,
    png_bytes,
    png_member,
)
from pretrain.prepare.images import ImageError, decode_image, read_bytes
from pretrain.prepare.matfile import check_mat_size
from pretrain.prepare.pascal_labels import (
    NORMALS_VALID_CLASSES,
    NUM_PART_CLASSES,
    LabelFileError,
    edge_map,
    edge_regions,
    label_map,
    normals_valid,
    parts_map,
)
from pretrain.prepare.shards import DEFAULT_MAX_BYTES, DEFAULT_MAX_COUNT
from pretrain.prepare.skeleton import run_converter

VOC_CLASSES = DATASETS["pascal_context"].class_names["semseg"]


def _load_mat(path: Path, name: str, image_hw: tuple[int, int], role: str) -> dict:
    try:
        data = read_bytes(path)
        check_mat_size(data, name, image_hw, role)  # from the element tags: nothing is allocated for the arrays
        return scipy.io.loadmat(io.BytesIO(data))
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


def _semseg_name(job: DenseJob) -> str:
    return f"semseg/{job.files['semseg'].parent.name}/{job.id}.png"  # VOC12 or the pascal-context fallback


def _mat_labels(fn: Callable[[dict, tuple[int, int]], np.ndarray], job: DenseJob, role: str, name: str,
                hw: tuple[int, int]) -> np.ndarray:
    """``fn(loadmat(file))`` with a LabelFileError turned into the ImageError of its reason."""
    try:
        return fn(_load_mat(job.files[role], name, hw, role), hw)
    except LabelFileError as err:
        raise ImageError(err.reason, f"{name}: {err}") from None


def _labels(job: DenseJob, hw: tuple[int, int], cache: dict) -> np.ndarray:
    """The LabelMap, loaded once per job (edge and normals both need it)."""
    if "labels" not in cache:
        name = f"pascal-context/trainval/{job.id}.mat"
        labels_HW = _mat_labels(lambda mat, _: label_map(mat), job, "labelmap", name, hw)
        check_size(name, labels_HW.shape, hw)
        cache["labels"] = labels_HW
    return cache["labels"]


def _edge(job: DenseJob, hw: tuple[int, int], cache: dict) -> dict[str, bytes]:
    """The training edge target and, for evaluation, the LabelMap regions SEISM derives its GT from."""
    labels_HW = _labels(job, hw, cache)
    try:
        regions_HW = edge_regions(labels_HW)
    except LabelFileError as err:
        raise ImageError(err.reason, f"pascal-context/trainval/{job.id}.mat: {err}") from None
    return {"edge.png": png_bytes(edge_map(labels_HW).astype(np.uint8) * 255),
            "edge_regions.png": png_bytes(regions_HW)}


def _parts(job: DenseJob, hw: tuple[int, int], cache: dict) -> dict[str, bytes]:
    return {"human_parts.png": png_bytes(_mat_labels(parts_map, job, "parts", f"human_parts/{job.id}.mat", hw))}


MEMBERS = {  # task -> members of the sample (DENSE_SCHEMA)
    "semseg": lambda job, hw, cache: {"semseg.png": _semseg(job.files["semseg"], _semseg_name(job), hw)},
    "human_parts": _parts,
    "sal": lambda job, hw, cache: {"sal.png": png_member(job.files["sal"], f"sal_distill/{job.id}.png", "L", hw)},
    "normals": lambda job, hw, cache: {
        "normals.png": png_member(job.files["normals"], f"normals_distill/{job.id}.png", "RGB", hw),
        "normals_valid.png": png_bytes(normals_valid(_labels(job, hw, cache)))},
    "edge": _edge,
}


def load_pascal_context(job: DenseJob) -> tuple[dict[str, bytes], int, int, str] | ImageError:
    """Decode, check and derive every member of one PASCAL-Context id (worker function)."""
    return load_members(job, "JPEGImages/{id}.jpg", MEMBERS)


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
                        "> 0.5; normals n = 2 v / 255 - 1, ignored where normals_valid.png is 0; edge.png 0/255; "
                        "edge_regions.png LabelMap renumbered 0..K-1 (SEISM's edge GT: seg2bmap, thin)"},
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
