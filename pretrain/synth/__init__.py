"""The embedded corpus: small, deterministic, learnable ImageNet / COCO / ADE20K / NYUD-v2 / PASCAL-Context raw
layouts.

Images are textured shapes (``SHAPES``) on varied backgrounds (smooth noise, gradients, stripes, plain):

- ImageNet: one large shape per image; class = (shape, fill) with fill in ``FILLS`` (solid, stripes, checker).
- COCO: 2-4 non-overlapping shapes per image; category = shape, with non-contiguous ids ``COCO_CATEGORY_IDS``.
- ADE20K: a floor band (id 4) and 1-4 possibly overlapping shapes; per-pixel ids ``ADE_CLASS_IDS``, 0 = other.

Colour and background carry no label, so the tasks need shape/texture features; shapes span 25-85% of the short
side, so the signal survives downscaling to 64 px. Every image draws from its own generator seeded by
(seed, dataset, split, index): same seed, same bytes. With ``quirks=True`` the train splits also hold the release
quirks the converters must handle (see ``write_imagenet``, ``write_coco``, ``write_ade20k``).

- NYUD-v2 / PASCAL-Context (``NYUDv2/``, ``PASCALContext/``): scenes of shapes on planes with every dense label
  (semseg, depth, normals, edges, saliency, human parts) derived from one scene (`dense.py`, `dense_layouts.py`).

``LAYOUTS`` maps a dataset name to its writer (`layouts.py`, `dense_layouts.py`, drawing in `draw.py`);
``FOLDERS`` the folder it is written to (the release's name for the dense ones).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from pretrain.catalog import DATASETS
from pretrain.synth.dense_layouts import write_nyud, write_pascal_context
from pretrain.synth.draw import ADE_CLASS_IDS, ADE_FLOOR_ID, COCO_CATEGORY_IDS, FILLS, SHAPES, write_file
from pretrain.synth.layouts import imagenet_class, imagenet_wnid, write_ade20k, write_coco, write_imagenet

logger = logging.getLogger(__name__)
__all__ = ["ADE_CLASS_IDS", "ADE_FLOOR_ID", "COCO_CATEGORY_IDS", "FILLS", "FOLDERS", "LAYOUTS", "MARKER_NAME",
           "SHAPES", "imagenet_class", "imagenet_wnid", "synthesize", "write_ade20k", "write_coco", "write_imagenet",
           "write_nyud", "write_pascal_context"]

LAYOUTS = {"imagenet": write_imagenet, "coco": write_coco, "ade20k": write_ade20k, "nyud": write_nyud,
           "pascal_context": write_pascal_context}
FOLDERS = {name: d.folder for name, d in DATASETS.items()}  # the release folders, the catalog's

MARKER_NAME = ".synth.json"  # written first into every dataset folder synth creates


def _refuse_foreign(folders: Sequence[Path], *, overwrite: bool) -> None:
    """Raise FileExistsError for the first folder that exists and was not written by synth (no marker), unless
    ``overwrite``; checked for every folder before any is touched, so a refusal leaves ``out`` as it was."""
    for folder in folders:
        if os.path.lexists(folder) and not (overwrite or (folder / MARKER_NAME).is_file()):
            raise FileExistsError(f"{folder} exists and was not written by pretrain synth; pass overwrite=True "
                                  "(--overwrite) to replace it")


def _claim(folder: Path, *, seed: int) -> None:
    """Make ``folder`` empty and mark it as synth's (``_refuse_foreign`` has allowed it)."""
    if folder.is_symlink() or folder.is_file():
        folder.unlink()  # never rmtree through a link: what it points to is not synth's
    elif folder.exists():
        shutil.rmtree(folder)
    write_file(folder / MARKER_NAME, json.dumps({"generator": "pretrain.synth", "seed": seed}).encode())


def _check_arguments(layouts: Sequence[str], image_size: tuple[int, int], dense_size: tuple[int, int],
                     scale: float) -> None:
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown layout(s) {unknown}; expected some of {sorted(LAYOUTS)}")
    if not 8 <= image_size[0] <= image_size[1]:
        raise ValueError(f"image_size={image_size} must be (min, max) with 8 <= min <= max")
    if min(dense_size) < 16:
        raise ValueError(f"dense_size={dense_size} must be (height, width), both >= 16")
    if scale <= 0:
        raise ValueError(f"scale={scale} must be > 0")


def synthesize(
    out: Path,
    *,
    seed: int = 0,
    imagenet_train: int = 60,
    imagenet_val: int = 10,
    coco_train: int = 300,
    coco_val: int = 60,
    ade_train: int = 300,
    ade_val: int = 60,
    nyud_train: int = 24,
    nyud_val: int = 12,
    pascal_train: int = 24,
    pascal_val: int = 12,
    dense_size: tuple[int, int] = (96, 128),
    num_classes: int = 10,
    image_size: tuple[int, int] = (96, 160),
    scale: float = 1.0,
    quirks: bool = True,
    layouts: Sequence[str] = tuple(LAYOUTS),
    overwrite: bool = False,
) -> dict:
    """Write the raw corpus under ``out/{imagenet,coco,ade20k,NYUDv2,PASCALContext}`` (``FOLDERS``); returns per
    dataset and split the files written and the ``expected_samples`` / ``expected_skipped`` a converter must report.

    ``imagenet_train``/``imagenet_val`` count images per class; ``scale`` multiplies every image count (at least
    1, and at least 3 COCO train images with quirks); image sides are drawn uniformly from ``image_size`` =
    (min, max) pixels; the dense scenes are all ``dense_size`` = (height, width) (one NYUD quirk image is larger).
    A dataset folder synth wrote before (its ``MARKER_NAME`` file) is regenerated; any other existing folder is
    refused, before anything is written, unless ``overwrite``.
    """
    out = Path(out)
    _check_arguments(layouts, image_size, dense_size, scale)

    def n(count: int, least: int = 1) -> int:
        return max(least, round(count * scale)) if scale != 1.0 else count

    args = {
        "imagenet": {"num_classes": num_classes, "train": n(imagenet_train), "val": n(imagenet_val)},
        "coco": {"train": n(coco_train, 3 if quirks else 1), "val": n(coco_val)},
        "ade20k": {"train": n(ade_train), "val": n(ade_val)},
        "nyud": {"train": n(nyud_train, 2 if quirks else 1), "val": n(nyud_val), "image_size": tuple(dense_size)},
        "pascal_context": {"train": n(pascal_train, 2 if quirks else 1), "val": n(pascal_val),
                           "image_size": tuple(dense_size)},
    }
    start = time.monotonic()
    summary: dict = {"root": str(out), "seed": seed}
    _refuse_foreign([out / FOLDERS[name] for name in layouts], overwrite=overwrite)
    for name in layouts:
        _claim(out / FOLDERS[name], seed=seed)
        summary[name] = LAYOUTS[name](out / FOLDERS[name], seed=seed, quirks=quirks,
                                      **{"image_size": tuple(image_size), **args[name]})
        logger.info("synth %s: %s", name, summary[name])
    summary["seconds"] = round(time.monotonic() - start, 3)
    logger.info("synth corpus written to %s in %.1f s", out, summary["seconds"])
    return summary
