"""Dense multi-task samples (NYUD-v2, PASCAL-Context) → image + per-task label tensors at the original resolution.

Shard schema: DATA.md beside this file, "Dense multi-task fine-tuning data". `DENSE_TASKS` says how each task's
member decodes and how geometry treats it; what pads it and the dataset's tasks, class counts, label conventions and
default sizes are the catalog's (`pretrain.catalog`). Only whitelisted members are read
(`decode.is_allowed_member`); `.npy` goes through `np.load(allow_pickle=False)` after a magic/dtype/shape check.

Label conventions (what the references' loaders do, evaluation.md §2):
- semseg: NYUD raw 0..40 → reduce-zero-label (0 → 255, c → c − 1); PASCAL 0..20 kept, 255 ignore.
- human_parts 0..6, 255 ignore; sal = v/255 > 0.5 (0/1); edge = v/255; depth = metres, 0 invalid;
  normals n = 2·v/255 − 1, zeroed where PASCAL's `normals_valid.png` is 0 (AddIgnoreRegions then marks 255).
A task the sample's json does not list gets a map of its padding value (ignored by its loss and metric); a listed
task whose member is missing or malformed raises, and the pipeline skips and counts the sample.

Evaluation labels (`DenseDataset.eval_labels`) are GT maps a task is scored against instead of its training target,
decoded with the task whenever the sample carries their member (never required, never trained on): PASCAL-Context's
`edge_regions` (the LabelMap partition SEISM derives its boundary GT from, `metrics/edges.py`). They are rows of
`DENSE_TASKS` too, so the geometry treats them like any map.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pretrain.catalog import DATASETS, dense_datasets
from pretrain.catalog import DENSE_TASKS as CATALOG_TASKS
from pretrain.catalog import Dataset as DenseDataset
from pretrain.data.decode import (
    IGNORE_INDEX,
    MAX_IMAGE_PIXELS,
    decode_json,
    decode_mask,
    decode_rgb,
    image_bytes,
    open_checked_png,
    reduce_zero_label,
)

logger = logging.getLogger(__name__)

_NPY_MAGIC = b"\x93NUMPY"


# the records live in the catalog; this snapshot serves importers (code looks up `catalog.DATASETS` by name)
DENSE_DATASETS: dict[str, DenseDataset] = {name: DATASETS[name] for name in dense_datasets()}


def _class_map(data: bytes, *, top: int, member: str) -> torch.Tensor:
    """8-bit label PNG → uint8 [1,H,W]; values must be 0..top or 255."""
    mask_HW = decode_mask(data)
    bad = (mask_HW > top) & (mask_HW != IGNORE_INDEX)
    if bool(bad.any()):
        raise ValueError(f"{member} holds value {int(mask_HW[bad].max())} outside 0..{top} and {IGNORE_INDEX}")
    return mask_HW[None]


def _decode_semseg(sample: Mapping[str, Any], ds: DenseDataset) -> torch.Tensor:
    raw_1HW = _class_map(sample["semseg.png"], top=ds.label_range["semseg"], member="semseg.png")
    return reduce_zero_label(raw_1HW) if ds.semseg_zero_is_ignore else raw_1HW


def _decode_parts(sample: Mapping[str, Any], ds: DenseDataset) -> torch.Tensor:
    return _class_map(sample["human_parts.png"], top=ds.label_range["human_parts"], member="human_parts.png")


def _decode_sal(sample: Mapping[str, Any], ds: DenseDataset) -> torch.Tensor:
    return (decode_mask(sample["sal.png"]) > 127)[None].to(torch.uint8)  # v/255 > 0.5 ⇔ v ≥ 128


def _decode_edge(sample: Mapping[str, Any], ds: DenseDataset) -> torch.Tensor:
    return (decode_mask(sample["edge.png"]).to(torch.float32) / 255.0)[None]


def _decode_regions(sample: Mapping[str, Any], ds: DenseDataset) -> torch.Tensor:
    """Region ids 0..254 as float32 [1,H,W]: a float map like the edge target, so both crop and batch alike."""
    regions_HW = decode_mask(sample["edge_regions.png"])
    if bool((regions_HW == IGNORE_INDEX).any()):
        raise ValueError(f"edge_regions.png holds {IGNORE_INDEX}, the padding value (regions are 0..254)")
    return regions_HW.to(torch.float32)[None]


def _decode_normals(sample: Mapping[str, Any], ds: DenseDataset) -> torch.Tensor:
    with open_checked_png(sample["normals.png"]) as im:
        if im.mode != "RGB":
            raise ValueError(f"normals.png has mode {im.mode!r}, expected 8-bit 'RGB'")
        arr_HW3 = np.asarray(im, dtype=np.uint8)
    normals_3HW = torch.from_numpy(arr_HW3.transpose(2, 0, 1).astype(np.float32)) * (2.0 / 255.0) - 1.0
    if ds.normals_valid_member is not None:
        valid_HW = decode_mask(sample[ds.normals_valid_member])
        if bool((valid_HW > 1).any()):
            raise ValueError(f"{ds.normals_valid_member} must hold 0/1, found {int(valid_HW.max())}")
        if valid_HW.shape != normals_3HW.shape[1:]:
            raise ValueError(f"{ds.normals_valid_member} {tuple(valid_HW.shape)} and normals.png "
                             f"{tuple(normals_3HW.shape[1:])} sizes differ")
        normals_3HW = normals_3HW * valid_HW[None]
    return normals_3HW


def decode_npy_depth(data: bytes) -> torch.Tensor:
    """`.npy` bytes of a float depth map [H,W] (or [H,W,1]) in metres → float32 [1,H,W]; never unpickles.

    Refuses: non-npy bytes (an `.npz` zip would make np.load return an archive), object/integer dtypes, other
    shapes, more than MAX_IMAGE_PIXELS values, non-finite or negative depths.
    """
    if not data.startswith(_NPY_MAGIC):
        raise ValueError(f"depth.npy is not a .npy array (starts with {bytes(data[:8]).hex()})")
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.dtype not in (np.float32, np.float64, np.float16):
        raise ValueError(f"depth.npy has dtype {arr.dtype}, expected float32")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.size == 0 or arr.size > MAX_IMAGE_PIXELS:
        raise ValueError(f"depth.npy has shape {arr.shape}, expected [H, W]")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError("depth.npy holds non-finite or negative values (0 marks invalid pixels)")
    return torch.from_numpy(np.ascontiguousarray(arr))[None]


def _decode_depth(sample: Mapping[str, Any], ds: DenseDataset) -> torch.Tensor:
    return decode_npy_depth(sample["depth.npy"])


@dataclass(frozen=True)
class DenseTask:
    """How one dense task decodes, pads and moves with the geometry.

    Attributes:
        channels: C of the per-sample map [C,H,W]; index maps (int64 [B,H,W] in the batch) have C = 1.
        fill: value of padding and of a map for a task the sample lacks.
        index_map: class ids (uint8 in the pipeline, int64 [B,H,W] in the batch) vs float32 [B,C,H,W].
        negate_x_on_flip: channel 0 is a horizontal direction (surface normals).
        divide_by_scale: values are distances that shrink as the image grows (depth, RandomScaling).
        zero_norm_ignored: AddIgnoreRegions: zero vectors (invalid normals, padding) → 255 on all channels.
        ignore_without_foreground: AddIgnoreRegions: a map with only {0, 255} → all 255 (no person in the image).
        old_normals: old protocol (ASTMT FLAGVALS): resampled bicubic, rotated in-plane by ScaleNRotate, unit length
            after FixedResize; every other map is resampled nearest.
    """

    member: str
    decode: Callable[[Mapping[str, Any], DenseDataset], torch.Tensor]
    channels: int
    fill: float
    index_map: bool
    negate_x_on_flip: bool = False
    divide_by_scale: bool = False
    zero_norm_ignored: bool = False
    ignore_without_foreground: bool = False
    old_normals: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8 if self.index_map else torch.float32


def _row(task: str, member: str, decode: Callable[[Mapping[str, Any], DenseDataset], torch.Tensor],
         **geometry: bool) -> DenseTask:
    """A task's decoding row; its channels, padding value and map kind are its catalog record's."""
    t = CATALOG_TASKS[task]
    return DenseTask(member, decode, t.channels, t.fill, t.index_map, **geometry)


DENSE_TASKS: dict[str, DenseTask] = {
    "semseg": _row("semseg", "semseg.png", _decode_semseg),
    "human_parts": _row("human_parts", "human_parts.png", _decode_parts, ignore_without_foreground=True),
    "sal": _row("sal", "sal.png", _decode_sal),
    "edge": _row("edge", "edge.png", _decode_edge),
    # an evaluation label, not a task (no catalog record): PASCAL's LabelMap partition, padded like the edge map
    "edge_regions": DenseTask("edge_regions.png", _decode_regions, 1, float(IGNORE_INDEX), index_map=False),
    "depth": _row("depth", "depth.npy", _decode_depth, divide_by_scale=True),
    "normals": _row("normals", "normals.png", _decode_normals, negate_x_on_flip=True, zero_norm_ignored=True,
                    old_normals=True),
}


def decode_dense_sample(sample: Mapping[str, Any], *, dataset: DenseDataset,
                        tasks: tuple[str, ...]) -> dict[str, Any]:
    """Raw dense sample → {"image": uint8 [3,H,W], "targets": {task: [C,H,W] (uint8 or float32)}, "id": str}.

    Every label map must have the image's size. Tasks absent from the json's "tasks" get a map of their fill value;
    a decoded task's evaluation label joins the targets when the sample has its member.
    """
    meta = decode_json(sample["json"])
    if not isinstance(meta.get("tasks"), list):
        raise ValueError(f"json has no 'tasks' list (got {meta.get('tasks')!r}); the schema requires one")
    listed = set(meta["tasks"])
    image_3HW = decode_rgb(image_bytes(sample))
    hw = tuple(image_3HW.shape[1:])
    targets: dict[str, torch.Tensor] = {}
    for name in tasks:
        task = DENSE_TASKS[name]
        if name not in listed:
            targets[name] = torch.full((task.channels, *hw), task.fill, dtype=task.dtype)
            continue
        if task.member not in sample:
            raise KeyError(f"json lists task {name!r} but the sample has no {task.member} member")
        label = dataset.eval_labels.get(name)
        decoded = (name, label) if label is not None and DENSE_TASKS[label].member in sample else (name,)
        for key in decoded:
            target_CHW = DENSE_TASKS[key].decode(sample, dataset)
            if tuple(target_CHW.shape[1:]) != hw:
                raise ValueError(f"{DENSE_TASKS[key].member} is {tuple(target_CHW.shape[1:])}, image is {hw}")
            targets[key] = target_CHW
    return {"image": image_3HW, "targets": targets, "id": str(meta.get("id", ""))}
