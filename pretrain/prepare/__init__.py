"""Dataset converters: raw ImageNet / COCO / ADE20K / NYUD-v2 / PASCAL-Context layouts -> WebDataset shards +
``_info.json``.

``PREPARERS[name](src, out, split, *, overwrite, workers, max_count, max_bytes, min_shards, progress)`` converts one
split and returns its summary dict (the dense ones, ``nyud`` and ``pascal_context``, also take ``tasks`` and
``keep_oversized``). Errors about the input raise ``PrepareError`` (``LayoutError`` for a source that
does not match the layout, ``OutputNotEmptyError`` for a non-empty output directory).
"""

from pretrain.prepare.ade20k import convert_ade20k
from pretrain.prepare.coco import convert_coco
from pretrain.prepare.imagenet import convert_imagenet
from pretrain.prepare.nyud import convert_nyud
from pretrain.prepare.pascal_context import convert_pascal_context
from pretrain.prepare.shards import LayoutError, OutputNotEmptyError, PrepareError, format_summary

PREPARERS = {"imagenet": convert_imagenet, "coco": convert_coco, "ade20k": convert_ade20k, "nyud": convert_nyud,
             "pascal_context": convert_pascal_context}

__all__ = [
    "PREPARERS",
    "LayoutError",
    "OutputNotEmptyError",
    "PrepareError",
    "convert_ade20k",
    "convert_coco",
    "convert_imagenet",
    "convert_nyud",
    "convert_pascal_context",
    "format_summary",
]
