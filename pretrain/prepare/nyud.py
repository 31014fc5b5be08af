"""NYUD-v2 multi-task release (``NYUDv2.tar.gz``, ``.png`` layout) -> dense shards (``DENSE_SCHEMA``).

Layout: ``{src}/NYUDv2/`` (or ``{src}`` itself) with ``images/<id>.png``, ``segmentation/<id>.png`` (raw 0..40,
0 = unlabelled), ``depth/<id>.npy`` (float metres, 0 = invalid), ``normals/<id>.png``, ``edge/<id>.png`` and
``gt_sets/{train,val}.txt``. Sample members: ``png`` (or ``jpg``), ``semseg.png``, ``depth.npy``, ``normals.png``,
``edge.png``, ``json``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pretrain.catalog import DATASETS
from pretrain.prepare.dense import DenseConverter, DenseJob, DenseLayout, check_size, load_members, png_member
from pretrain.prepare.images import ImageError, load_label_png, read_bytes
from pretrain.prepare.shards import DEFAULT_MAX_BYTES, DEFAULT_MAX_COUNT
from pretrain.prepare.skeleton import run_converter

SEMSEG_CLASSES = DATASETS["nyud"].class_names["semseg"]  # raw value v is class v - 1
NUM_CLASSES = len(SEMSEG_CLASSES)


def _npy_header(name: str, buf: io.BytesIO) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy header, read before any array is allocated; an .npz (a zip archive) or any other
    file under the .npy name is a `bad_label_format` skip, not an error that stops the conversion."""
    try:
        major, _ = np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(buf)
    except Exception as err:  # numpy raises ValueError, OSError, EOFError, ... for a non-.npy or damaged header
        raise ImageError("bad_label_format", f"{name}: not a .npy array ({type(err).__name__}: {err})") from None
    return shape, dtype


def _depth(path: Path, name: str, image_hw: tuple[int, int]) -> bytes:
    buf = io.BytesIO(read_bytes(path))
    shape, dtype = _npy_header(name, buf)
    if len(shape) != 2 or dtype.kind != "f":
        raise ImageError("bad_label_format", f"{name}: depth must be a 2-D float array, got {dtype} {shape}")
    check_size(name, shape, image_hw)  # before the array is read: a forged header allocates nothing
    try:
        depth = np.load(io.BytesIO(buf.getvalue()), allow_pickle=False)
    except Exception as err:  # a truncated or damaged body
        raise ImageError("decode_error", f"{name}: {type(err).__name__}: {err}") from None
    if not np.isfinite(depth).all() or (depth < 0).any():
        raise ImageError("bad_label_format", f"{name}: depth has NaN, infinite or negative values")
    buf = io.BytesIO()
    np.save(buf, depth.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def _semseg(job: DenseJob, hw: tuple[int, int], cache: dict) -> dict[str, bytes]:
    name = f"segmentation/{job.id}.png"
    label, labels_HW = load_label_png(job.files["semseg"], name=name, max_value=NUM_CLASSES)
    check_size(name, labels_HW.shape, hw)
    return {"semseg.png": label.data}


MEMBERS = {  # task -> members of the sample (DENSE_SCHEMA)
    "semseg": _semseg,
    "depth": lambda job, hw, cache: {"depth.npy": _depth(job.files["depth"], f"depth/{job.id}.npy", hw)},
    "normals": lambda job, hw, cache: {
        "normals.png": png_member(job.files["normals"], f"normals/{job.id}.png", "RGB", hw)},
    "edge": lambda job, hw, cache: {"edge.png": png_member(job.files["edge"], f"edge/{job.id}.png", "L", hw)},
}


def load_nyud(job: DenseJob) -> tuple[dict[str, bytes], int, int, str] | ImageError:
    """Decode and check every file of one NYUD id (worker function); ImageError on the first problem."""
    return load_members(job, "images/{id}.png", MEMBERS)


NYUD = DenseLayout(
    dataset="nyud", root_name="NYUDv2", split_list="gt_sets/{split}.txt", image=("images/{id}.png",),
    roles={"semseg": ("segmentation/{id}.png",), "depth": ("depth/{id}.npy",), "normals": ("normals/{id}.png",),
           "edge": ("edge/{id}.png",)},
    tasks={"semseg": ("semseg",), "depth": ("depth",), "normals": ("normals",), "edge": ("edge",)},
    pad_hw=(448, 576), expected={"train": 795, "val": 654}, load=load_nyud,
    info={"num_classes": {"semseg": NUM_CLASSES}, "semseg_classes": list(SEMSEG_CLASSES),
          "label_note": "semseg.png raw 0..40: class = v - 1, 0 -> 255 ignore; depth.npy float32 metres, 0 = "
                        "invalid; normals n = 2 v / 255 - 1; edge v / 255"},
)


class NyudConverter(DenseConverter):
    layout = NYUD


def convert_nyud(
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
    """Convert one NYUD-v2 split to dense shards in ``out``; returns the summary (see ``ShardSink.finish``).

    ``tasks`` limits the converted tasks (default all four; a missing task folder is a LayoutError unless its task
    is left out). An image larger than the 448x576 pad target is reported in ``_info.json`` ``validation`` and
    skipped (``oversized``) unless ``keep_oversized``.
    """
    return run_converter(NyudConverter(src, split, tasks=tasks, keep_oversized=keep_oversized), out,
                         overwrite=overwrite, workers=workers, max_count=max_count, max_bytes=max_bytes,
                         min_shards=min_shards, progress=progress)
