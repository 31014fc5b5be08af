"""ImageNet class-folder layout -> WebDataset shards.

Layout: ``{src}/{train,val}/<wnid>/*.JPEG`` (val sorted into class folders, e.g. by the common ``valprep.sh``), and
optionally ``{src}/LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca`` per line) for class names.
Sample: ``__key__`` (file stem), ``jpg`` or ``png`` (original bytes; the key follows the magic bytes),
``cls`` (ASCII int), ``json`` ``{"wnid", "file"}``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pretrain.prepare.images import IMAGE_SUFFIXES, CheckedImage, ImageError, try_load_image
from pretrain.prepare.paths import SourceTree, scan
from pretrain.prepare.shards import DEFAULT_MAX_BYTES, DEFAULT_MAX_COUNT, LayoutError, encode_json, sample_key
from pretrain.prepare.skeleton import Converter, Listing, Sample, Skip, run_converter, skip_for

logger = logging.getLogger(__name__)

MAPPING_NAME = "LOC_synset_mapping.txt"


@dataclass(frozen=True)
class _Job:
    rel: str  # path relative to src, used in skipped.jsonl and the sample json
    path: Path
    wnid: str


def read_synset_mapping(path: Path) -> dict[str, str]:
    """Parse ``LOC_synset_mapping.txt`` into ``{wnid: name}``; a malformed line raises LayoutError with its number."""
    names: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2 or parts[0] in names:
            raise LayoutError(f"{path}:{lineno}: expected a unique '<wnid> <class name>' line, got {line!r}")
        names[parts[0]] = parts[1]
    if not names:
        raise LayoutError(f"{path} lists no classes")
    return names


def _class_dirs(split_dir: Path, tree: SourceTree) -> list[str]:
    """Names of the real (not symlinked) class folders; directory symlinks are never followed."""
    return [e.name for e in scan(split_dir, tree)[0] if e.is_dir and not e.name.startswith(".")]


def imagenet_classes(src: Path, tree: SourceTree | None = None) -> list[dict]:
    """Class table ``[{index, wnid, name}]`` with index = position in sorted wnid order.

    The wnids come from ``LOC_synset_mapping.txt`` when present (it must be a regular file inside ``src``), else
    from the union of the class folders of ``{src}/train`` and ``{src}/val``, so both splits get the same indices
    even if one lacks a class.
    """
    tree = tree or SourceTree(src)
    mapping = src / MAPPING_NAME
    if os.path.lexists(mapping):
        names = read_synset_mapping(tree.layout_file(mapping))
    else:
        split_dirs = [tree.layout_dir(src / s) for s in ("train", "val") if (src / s).is_dir()]
        names = {wnid: wnid for d in split_dirs for wnid in _class_dirs(d, tree)}
    return [{"index": i, "wnid": wnid, "name": names[wnid]} for i, wnid in enumerate(sorted(names))]


def _list_split(tree: SourceTree, split: str, known: set[str]) -> tuple[list[_Job], list[tuple[str, str, str]]]:
    """Image jobs in (wnid, file name) order, and stray entries as (rel, reason, detail)."""
    src = tree.src
    split_dir = src / split
    expected = f"expected ImageNet layout {split_dir}/<wnid>/*.JPEG"
    if not split_dir.is_dir():
        raise LayoutError(f"{expected}, but {split_dir} is not a directory")
    entries, links = scan(tree.layout_dir(split_dir), tree)
    wnids = [e.name for e in entries if e.is_dir and not e.name.startswith(".")]
    loose = [e.name for e in entries if not e.is_dir]
    if not wnids:
        hint = " (val images must be sorted into <wnid>/ folders first)" if loose else ""
        raise LayoutError(f"{expected}, but {split_dir} has no class folders{hint}")
    unknown = [w for w in wnids if w not in known]
    if unknown:
        raise LayoutError(f"{split_dir}/{unknown[0]}: class folder not listed in {src / MAPPING_NAME}")
    strays = [(f"{split}/{name}", "not_an_image", "file outside the class folders") for name in loose]
    strays += [(f"{split}/{name}", reason, detail) for name, reason, detail in links]
    jobs: list[_Job] = []
    for wnid in wnids:
        entries, links = scan(split_dir / wnid, tree)
        strays += [(f"{split}/{wnid}/{name}", reason, detail) for name, reason, detail in links]
        for entry in entries:
            rel = f"{split}/{wnid}/{entry.name}"
            if entry.is_dir:
                strays.append((rel, "not_an_image", "unexpected directory inside a class folder"))
            elif entry.name.startswith(".") or Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                strays.append((rel, "not_an_image", "not an image file name (stray file)"))
            else:
                jobs.append(_Job(rel=rel, path=Path(entry.path), wnid=wnid))
    return jobs, strays


class ImageNetConverter(Converter):
    """ImageNet class folders: one job per image file, class index from the sorted wnids."""

    dataset = "imagenet"

    def list_jobs(self) -> Listing:
        self.classes = imagenet_classes(self.src, self.tree)
        self.index = {c["wnid"]: c["index"] for c in self.classes}
        jobs, strays = _list_split(self.tree, self.split, set(self.index))
        return Listing(jobs=jobs, skips=[Skip(*stray) for stray in strays],
                       source={"layout": "imagenet", "mapping": (self.src / MAPPING_NAME).is_file()})

    def files(self, job: _Job) -> list[tuple[str, Path]]:
        return [(job.rel, job.path)]

    @staticmethod
    def load(job: _Job) -> CheckedImage | ImageError:
        return try_load_image((job.path, job.rel))

    def to_sample(self, job: _Job, loaded: CheckedImage | ImageError) -> Sample | Skip:
        skip = skip_for(job.rel, loaded)
        if skip is not None:
            return skip
        fields = {loaded.ext: loaded.data, "cls": str(self.index[job.wnid]).encode("ascii"),
                  "json": encode_json({"wnid": job.wnid, "file": job.rel})}
        return Sample(sample_key(job.path.stem), fields, f"{loaded.ext}/{loaded.mode}")

    def extra(self) -> dict:
        return {"num_classes": len(self.classes), "classes": self.classes,
                "image_kinds": dict(sorted(self.image_kinds.items())),
                "sample_keys": {"jpg|png": "original image bytes", "cls": "class index (ASCII int)",
                                "json": "{wnid, file}"}}


def convert_imagenet(
    src: Path,
    out: Path,
    split: str,
    *,
    overwrite: bool = False,
    workers: int = 0,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_shards: int = 1,
    progress: bool = True,
) -> dict:
    """Convert one ImageNet split to shards in ``out``; returns the summary (see ``ShardSink.finish``).

    Every image is decoded fully once; undecodable, empty and stray files are skipped and listed in
    ``{out}/skipped.jsonl``. Raises LayoutError for a source that does not match the layout and
    OutputNotEmptyError for a non-empty ``out`` without ``overwrite``.
    """
    return run_converter(ImageNetConverter(src, split), out, overwrite=overwrite, workers=workers,
                         max_count=max_count, max_bytes=max_bytes, min_shards=min_shards, progress=progress)
