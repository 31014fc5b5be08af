"""Shared part of the dense multi-task converters (NYUD-v2, PASCAL-Context): split lists, task folders, per-id
file resolution inside ``--src``, release validation (counts, sizes, folders) and the sample layout of
``DENSE_SCHEMA`` (one sample = one image with all its labels).

A dataset is a :class:`DenseLayout` table entry; its worker function turns a :class:`DenseJob` into
``{member: bytes}`` plus the image size, or an ImageError.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pretrain.prepare.images import ImageError, decode_image, load_image, read_bytes
from pretrain.prepare.paths import OUTSIDE_SRC, confined
from pretrain.prepare.shards import LayoutError, PrepareError, encode_json, sample_key
from pretrain.prepare.skeleton import Converter, Listing, Sample, Skip

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseLayout:
    """One dense release layout.

    Attributes:
        dataset: shard set name (``nyud`` / ``pascal_context``).
        root_name: the release folder (``NYUDv2``); ``--src`` may be it or its parent.
        split_list: path of the split list, ``{split}`` filled in.
        image: candidate paths of the image, ``{id}`` filled in.
        roles: role -> candidate paths (first existing wins) of every label file.
        tasks: task -> roles it needs (in ``DENSE_SCHEMA`` order).
        pad_hw: the reference's test-time pad target; a larger image is "oversized".
        expected: release count per split (reported, never enforced).
        load: module-level worker ``DenseJob -> (fields, width, height, kind) | ImageError``.
        info: dataset-specific ``_info.json`` keys.
    """

    dataset: str
    root_name: str
    split_list: str
    image: tuple[str, ...]
    roles: dict[str, tuple[str, ...]]
    tasks: dict[str, tuple[str, ...]]
    pad_hw: tuple[int, int]
    expected: dict[str, int]
    load: Callable[[Any], Any]
    info: dict[str, Any]


@dataclass(frozen=True)
class DenseJob:
    """One image id: its files (role -> path, ``image`` included) and the tasks to convert."""

    id: str
    files: dict[str, Path]
    tasks: tuple[str, ...]


def png_bytes(array: np.ndarray) -> bytes:
    """Deterministic PNG bytes of a uint8 [H, W] (L) or [H, W, 3] (RGB) array."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def check_size(name: str, hw: tuple[int, int], image_hw: tuple[int, int]) -> None:
    """Raise ImageError ``size_mismatch`` when a label's [H, W] differs from the image's."""
    if tuple(hw) != tuple(image_hw):
        raise ImageError("size_mismatch", f"{name} is {hw[1]}x{hw[0]}, the image is {image_hw[1]}x{image_hw[0]}")


def png_member(path: Path, name: str, mode: str, image_hw: tuple[int, int]) -> bytes:
    """Bytes of a label PNG that must decode as ``mode`` and have the image's size (stored unchanged)."""
    checked, _ = decode_image(read_bytes(path), name=name)
    if checked.ext != "png" or checked.mode != mode:
        raise ImageError("bad_label_format", f"{name}: expected a {mode} PNG, found {checked.ext}/{checked.mode}")
    check_size(name, (checked.height, checked.width), image_hw)
    return checked.data


Member = Callable[[DenseJob, tuple[int, int], dict], dict[str, bytes]]  # (job, image [H, W], per-job cache)


def load_members(job: DenseJob, image_name: str, members: dict[str, Member]
                 ) -> tuple[dict[str, bytes], int, int, str] | ImageError:
    """Worker body shared by the dense datasets: decode the image, then build each task's members from the
    ``members`` table; the first problem comes back as the ImageError (returned, not raised, for the pool).

    Returns:
        ({member: bytes} including the image's ``jpg``/``png``, width, height, image kind ``"jpg/RGB"``).
    """
    try:
        image = load_image(job.files["image"], name=image_name.format(id=job.id))
        hw = (image.height, image.width)
        fields, cache = {image.ext: image.data}, {}
        for task in job.tasks:
            fields.update(members[task](job, hw, cache))
    except ImageError as err:
        return err
    return fields, image.width, image.height, f"{image.ext}/{image.mode}"


def _find_root(src: Path, layout: DenseLayout, split: str) -> Path:
    for root in (src / layout.root_name, src):
        if os.path.lexists(root / layout.split_list.format(split=split)):  # a FIFO here is refused, not passed over
            return root
    raise LayoutError(f"expected {layout.dataset} layout with split list {src}/{layout.root_name}/"
                      f"{layout.split_list.format(split=split)} (or {src}/{layout.split_list.format(split=split)})"
                      ", found neither")


def _read_ids(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise LayoutError(f"{path}: cannot read split list: {err}") from None
    ids = [line.strip() for line in lines if line.strip()]
    if not ids:
        raise LayoutError(f"{path}: split list is empty")
    return ids


class DenseConverter(Converter):
    """A dense release split -> shards of ``DENSE_SCHEMA``; the dataset comes from ``layout``."""

    layout: DenseLayout

    def __init__(self, src: Path, split: str, *, tasks: Sequence[str] | None = None,
                 keep_oversized: bool = False) -> None:
        super().__init__(src, split)
        self.dataset = self.layout.dataset
        self.load = self.layout.load
        unknown = [t for t in (tasks or ()) if t not in self.layout.tasks]
        if unknown or (tasks is not None and not tasks):
            raise PrepareError(f"tasks {list(tasks or [])} for {self.dataset}: expected a non-empty subset of "
                               f"{', '.join(self.layout.tasks)}")
        self.tasks = tuple(t for t in self.layout.tasks if tasks is None or t in tasks)
        self.keep_oversized = keep_oversized
        self.oversized: list[dict] = []

    def _check_folders(self, root: Path) -> dict[str, list[str]]:
        """Folders of every task, missing ones per task; a requested task whose folders are all missing (and the
        image folder) is a LayoutError."""
        missing: dict[str, list[str]] = {}
        for task, roles in self.layout.tasks.items():
            gone = [role for role in roles
                    if not any((root / p).parent.is_dir() for p in self.layout.roles[role])]
            if gone:
                missing[task] = sorted({str(Path(p).parent) for r in gone for p in self.layout.roles[r]})
        if not any((root / p).parent.is_dir() for p in self.layout.image):
            raise LayoutError(f"{root}: image folder {Path(self.layout.image[0]).parent}/ is missing")
        needed = {t: m for t, m in missing.items() if t in self.tasks}
        if needed:
            task, folders = next(iter(needed.items()))
            raise LayoutError(f"{root}: task {task!r} needs folder(s) {', '.join(folders)}, missing; exclude the "
                              f"task with --tasks (tasks=...) to convert without it")
        return missing

    def _resolve(self, root: Path, ident: str, candidates: tuple[str, ...]) -> Path | Skip:
        paths = [confined(root, c.format(id=ident)) for c in candidates]
        if any(p is None for p in paths):
            return Skip(candidates[0].format(id=ident), OUTSIDE_SRC, f"id {ident!r} leaves {root}")
        for path in paths:
            if path.exists():  # not is_file(): a FIFO or a folder in its place is refused by name (admit), not missing
                return path
        return Skip(candidates[0].format(id=ident), "missing_file",
                    f"id {ident}: none of {', '.join(c.format(id=ident) for c in candidates)} exists")

    def _split_counts(self, root: Path) -> dict[str, dict[str, int]]:
        """Ids listed per split next to the release's count (information: a small or partial copy is allowed)."""
        counts = {}
        for split, release in self.layout.expected.items():
            path = root / self.layout.split_list.format(split=split)
            if path.is_file():
                counts[split] = {"listed": len(_read_ids(self.tree.layout_file(path))), "release": release}
                if counts[split]["listed"] != release:
                    logger.info("%s/%s: %d ids listed, the release has %d (information only)", self.dataset, split,
                                counts[split]["listed"], release)
        return counts

    def list_jobs(self) -> Listing:
        root = self.tree.layout_dir(_find_root(self.src, self.layout, self.split))
        self.root = root
        missing_folders = self._check_folders(root)
        ids = _read_ids(self.tree.layout_file(root / self.layout.split_list.format(split=self.split)))
        roles = {"image": self.layout.image, **{r: self.layout.roles[r] for t in self.tasks
                                                for r in self.layout.tasks[t]}}
        jobs, skips = [], []
        for ident in ids:
            files = {role: self._resolve(root, ident, candidates) for role, candidates in roles.items()}
            bad = [f for f in files.values() if isinstance(f, Skip)]
            if bad:
                skips.append(bad[0])
            else:
                jobs.append(DenseJob(ident, files, self.tasks))
        self.validation = {"split_counts": self._split_counts(root), "missing_task_folders": missing_folders,
                           "pad_target_hw": list(self.layout.pad_hw)}
        return Listing(jobs=jobs, skips=skips, source={"layout": self.dataset, "root": str(root)})

    def files(self, job: DenseJob) -> list[tuple[str, Path]]:
        root = os.path.abspath(self.root)  # the job's paths are absolute (``confined``)
        return [(os.path.relpath(path, root), path) for path in job.files.values()]

    def to_sample(self, job: DenseJob, loaded: Any) -> Sample | Skip:
        rel = self.layout.image[0].format(id=job.id)
        if isinstance(loaded, ImageError):
            return Skip(rel, loaded.reason, loaded.detail)
        fields, width, height, kind = loaded
        pad_h, pad_w = self.layout.pad_hw
        if height > pad_h or width > pad_w:
            self.oversized.append({"id": job.id, "width": width, "height": height, "kept": self.keep_oversized})
            logger.warning("%s/%s: image %s is %dx%d, larger than the %dx%d pad target%s", self.dataset,
                           self.split, job.id, width, height, pad_w, pad_h,
                           " (kept)" if self.keep_oversized else " (skipped; keep_oversized keeps it)")
            if not self.keep_oversized:
                return Skip(rel, "oversized", f"id {job.id}: {width}x{height} does not fit {pad_w}x{pad_h}")
        meta = encode_json({"id": job.id, "width": width, "height": height, "tasks": list(job.tasks)})
        return Sample(sample_key(job.id), {**fields, "json": meta}, kind)

    def extra(self) -> dict:
        return {"dataset": self.dataset, "tasks": list(self.tasks), **self.layout.info,
                "validation": {**self.validation, "oversized": self.oversized},
                "image_kinds": dict(sorted(self.image_kinds.items()))}
