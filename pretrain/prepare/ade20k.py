"""ADE20K SceneParsing (ADEChallengeData2016) -> WebDataset shards.

Layout: ``{src}/ADEChallengeData2016/images/{training,validation}/*.jpg`` and
``.../annotations/{training,validation}/*.png`` (8-bit L-mode label maps, 0 = other, 1..150 = classes); ``src`` may
also be the ``ADEChallengeData2016`` folder itself. Split ``train`` reads ``training``, ``val`` reads ``validation``.
Sample: ``__key__`` (file stem), ``jpg`` (original bytes), ``seg.png`` (original label PNG bytes),
``json`` ``{"file", "width", "height"}``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pretrain.catalog import DATASETS
from pretrain.prepare.images import IMAGE_SUFFIXES, CheckedImage, ImageError, load_image, load_label_png
from pretrain.prepare.paths import SourceTree, scan
from pretrain.prepare.shards import DEFAULT_MAX_BYTES, DEFAULT_MAX_COUNT, LayoutError, encode_json, sample_key
from pretrain.prepare.skeleton import Converter, Listing, Sample, Skip, run_converter, skip_for

logger = logging.getLogger(__name__)

# the SceneParsing benchmark's class names for label ids 1..150 (index 0 = label 1, after reduce-zero-label)
CLASS_NAMES = DATASETS["ade20k"].class_names["seg"]
NUM_CLASSES = len(CLASS_NAMES)
ROOT_NAME = "ADEChallengeData2016"
SPLIT_DIRS = {"train": "training", "val": "validation"}

_Job = tuple[Path, str, Path, str]  # image path, image rel, annotation path, annotation rel


def _find_root(src: Path) -> Path:
    for root in (src / ROOT_NAME, src):
        if (root / "images").is_dir() and (root / "annotations").is_dir():
            return root
    raise LayoutError(f"expected ADE20K layout {src / ROOT_NAME}/images/{{training,validation}}/*.jpg and "
                      f"{src / ROOT_NAME}/annotations/{{training,validation}}/*.png, but no images/ + annotations/ "
                      f"folders were found there or in {src}")


def _list_files(folder: Path, suffixes: frozenset[str], tree: SourceTree
                ) -> tuple[dict[str, str], list[str], list[tuple[str, str, str]]]:
    """``{stem: file name}`` of the wanted files in ``folder``, the names of everything else, and the directory
    symlinks (never followed) as ``(name, reason, detail)``."""
    wanted: dict[str, str] = {}
    strays: list[str] = []
    entries, links = scan(tree.layout_dir(folder), tree)
    for entry in entries:
        suffix = Path(entry.name).suffix.lower()
        if entry.is_dir or entry.name.startswith(".") or suffix not in suffixes:
            strays.append(entry.name)
        else:
            wanted[Path(entry.name).stem] = entry.name
    return wanted, strays, links


def _list_split(tree: SourceTree, split: str) -> tuple[Path, list[_Job], list[tuple[str, str, str]]]:
    """Root, (image, annotation) jobs in image-name order, and unpaired or stray files as (rel, reason, detail)."""
    root = _find_root(tree.src)
    sub = SPLIT_DIRS[split]
    image_dir, ann_dir = root / "images" / sub, root / "annotations" / sub
    for folder in (image_dir, ann_dir):
        if not folder.is_dir():
            raise LayoutError(f"expected ADE20K folder {folder} for split {split!r}, but it is not a directory")
    images, image_strays, image_links = _list_files(image_dir, IMAGE_SUFFIXES, tree)
    anns, ann_strays, ann_links = _list_files(ann_dir, frozenset({".png"}), tree)
    if not images:
        raise LayoutError(f"expected ADE20K images in {image_dir}/*.jpg, found none")
    skips = [(f"images/{sub}/{n}", "not_an_image", "stray file") for n in image_strays]
    skips += [(f"annotations/{sub}/{n}", "not_an_image", "stray file") for n in ann_strays]
    skips += [(f"{kind}/{sub}/{n}", reason, detail)
              for kind, links in (("images", image_links), ("annotations", ann_links)) for n, reason, detail in links]
    jobs: list[_Job] = []
    for stem, name in images.items():
        if stem not in anns:
            skips.append((f"images/{sub}/{name}", "missing_annotation", f"no {ann_dir / (stem + '.png')}"))
            continue
        jobs.append((image_dir / name, f"images/{sub}/{name}", ann_dir / anns[stem], f"annotations/{sub}/{anns[stem]}"))
    skips += [(f"annotations/{sub}/{n}", "annotation_without_image", f"no image {stem}.* in {image_dir}")
              for stem, n in anns.items() if stem not in images]
    return root, jobs, skips


def load_pair(job: _Job) -> tuple[CheckedImage, CheckedImage] | ImageError:
    """Decode an image and its label map fully; returns an ImageError (not raised) for the pool.

    The label map must be an L-mode PNG with ids in 0..150 and the image's size.
    """
    image_path, image_rel, ann_path, ann_rel = job
    try:
        image = load_image(image_path, name=image_rel)
        label, _ = load_label_png(ann_path, name=ann_rel, max_value=NUM_CLASSES)
    except ImageError as err:
        return err
    if (image.width, image.height) != (label.width, label.height):
        return ImageError("size_mismatch", f"{ann_rel} is {label.width}x{label.height}, "
                                           f"{image_rel} is {image.width}x{image.height}")
    return image, label


class Ade20kConverter(Converter):
    """ADE20K SceneParsing: one job per (image, label map) pair."""

    dataset = "ade20k"
    load = staticmethod(load_pair)

    def list_jobs(self) -> Listing:
        root, jobs, skips = _list_split(self.tree, self.split)
        return Listing(jobs=jobs, skips=[Skip(*s) for s in skips], source={"layout": "ade20k", "root": str(root)})

    def files(self, job: _Job) -> list[tuple[str, Path]]:
        return [(job[1], job[0]), (job[3], job[2])]

    def to_sample(self, job: _Job, loaded: tuple[CheckedImage, CheckedImage] | ImageError) -> Sample | Skip:
        skip = skip_for(job[1], loaded)
        if skip is not None:
            return skip
        image, label = loaded
        fields = {image.ext: image.data, "seg.png": label.data,
                  "json": encode_json({"file": job[1], "width": image.width, "height": image.height})}
        return Sample(sample_key(job[0].stem), fields, f"{image.ext}/{image.mode}")

    def extra(self) -> dict:
        return {"num_classes": NUM_CLASSES, "classes": list(CLASS_NAMES), "reduce_zero_label": True,
                "label_note": "seg.png holds raw ids: 0 = other (ignore), 1..150 = classes; reduce-zero-label "
                              "maps 0 -> 255 and c -> c-1",
                "image_kinds": dict(sorted(self.image_kinds.items())),
                "sample_keys": {"jpg|png": "original image bytes", "seg.png": "original L-mode label PNG",
                                "json": "{file, width, height}"}}


def convert_ade20k(
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
    """Convert one ADE20K split to shards in ``out``; returns the summary (see ``ShardSink.finish``).

    Label PNG bytes are stored unchanged; pairs with a missing, non-L-mode, out-of-range or wrongly sized
    label map are skipped with a reason in ``{out}/skipped.jsonl``.
    """
    return run_converter(Ade20kConverter(src, split), out, overwrite=overwrite, workers=workers,
                         max_count=max_count, max_bytes=max_bytes, min_shards=min_shards, progress=progress)
