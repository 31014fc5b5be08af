"""Dataset converters: raw ImageNet / COCO / ADE20K layouts -> WebDataset shards + ``_info.json``.

``PREPARERS[name](src, out, split, *, overwrite, workers, max_count, max_bytes, min_shards, progress)`` converts one
split and returns its summary dict. Errors about the input raise ``PrepareError`` (``LayoutError`` for a source that
does not match the layout, ``OutputNotEmptyError`` for a non-empty output directory).
"""

from pretrain.prepare.ade20k import convert_ade20k
from pretrain.prepare.coco import convert_coco
from pretrain.prepare.imagenet import convert_imagenet
from pretrain.prepare.shards import LayoutError, OutputNotEmptyError, PrepareError, format_summary

PREPARERS = {"imagenet": convert_imagenet, "coco": convert_coco, "ade20k": convert_ade20k}

__all__ = [
    "PREPARERS",
    "LayoutError",
    "OutputNotEmptyError",
    "PrepareError",
    "convert_ade20k",
    "convert_coco",
    "convert_imagenet",
    "format_summary",
]
