"""COCO box AP with pycocotools, from torchvision detector outputs, gathered across ranks.

Conventions (pycocotools' COCOeval, as the official COCO evaluation runs it):
- boxes reach `update` as xyxy in ORIGINAL image pixels (the caller undoes any loader resize) and are stored as COCO
  `[x, y, w, h]`;
- detector labels are contiguous 1..K (0 is torchvision's background); `contiguous_to_cat_id[label - 1]` gives the
  original COCO category id, which is what COCOeval matches against the GT;
- AP is computed over the images this meter saw (after the cross-rank merge), not over every GT image, so a partial
  eval pass is scored on its own images; an image seen twice (a padded distributed sampler) counts once;
- COCOeval reports -1 for an area range with no GT; that is returned as NaN rather than -100.

Per-rank results are plain lists of ints and floats, so the injected `gather_fn` (e.g. `all_gather_object`) only ever
pickles JSON-safe data produced by our own ranks.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

logger = logging.getLogger(__name__)

GatherFn = Callable[[list], list[list]]
# COCOeval.stats indices 0..5 for iouType "bbox".
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_REQUIRED_ANN_KEYS = ("id", "image_id", "category_id", "bbox", "area")


def category_ids_from_gt(gt: Mapping) -> list[int]:
    """The contiguous-label → category-id table used across the project: sorted original ids (label l ↔ ids[l-1])."""
    return sorted(int(c["id"]) for c in gt["categories"])


def _check_gt(gt: Mapping) -> None:
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"CocoDetectionMeter: GT dict has no '{key}' key (COCO instances format expected)")
    for ann in gt["annotations"]:
        missing = [k for k in _REQUIRED_ANN_KEYS if k not in ann]
        if missing:
            raise ValueError(f"CocoDetectionMeter: GT annotation {ann.get('id', '?')} lacks keys {missing}")


class CocoDetectionMeter:
    """Collects detections per image and scores them with COCOeval ("bbox").

    Args:
        gt: COCO instances dict with `images`, `annotations` (`id`, `image_id`, `category_id`, `bbox` xywh, `area`,
            optional `iscrowd`) and `categories` with their ORIGINAL ids. Not modified.
        contiguous_to_cat_id: K original category ids; detector label l (1..K) means `contiguous_to_cat_id[l - 1]`.
    """

    def __init__(self, *, gt: Mapping, contiguous_to_cat_id: Sequence[int]) -> None:
        _check_gt(gt)
        cat_ids = {int(c["id"]) for c in gt["categories"]}
        unknown = [c for c in contiguous_to_cat_id if int(c) not in cat_ids]
        if unknown:
            raise ValueError(f"CocoDetectionMeter: contiguous_to_cat_id has ids {unknown} not in the GT categories")
        self.contiguous_to_cat_id = [int(c) for c in contiguous_to_cat_id]
        self._image_ids = {int(img["id"]) for img in gt["images"]}
        # COCOeval writes an 'ignore' key into the GT annotation dicts: copy them so the caller's dict stays as given.
        dataset = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
        with contextlib.redirect_stdout(io.StringIO()):
            self._coco_gt = COCO()
            self._coco_gt.dataset = dataset
            self._coco_gt.createIndex()
        self.reset()

    def reset(self) -> None:
        """Forget all detections (local and merged)."""
        # image id → rows [category_id, x, y, w, h, score]; an image with no detection still has an (empty) entry.
        self._local: dict[int, list[list[float]]] = {}
        self._merged: dict[int, list[list[float]]] | None = None

    def update(self, image_ids: Sequence[int] | torch.Tensor, detections: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Add the detections of one batch.

        Args:
            image_ids: [B] COCO image ids.
            detections: B torchvision outputs: `boxes` [N, 4] xyxy in original image pixels, `scores` [N],
                `labels` [N] contiguous 1..K.
        """
        ids = image_ids.tolist() if isinstance(image_ids, torch.Tensor) else list(image_ids)
        if len(ids) != len(detections):
            raise ValueError(f"CocoDetectionMeter.update: {len(ids)} image ids but {len(detections)} detection dicts")
        for image_id, det in zip(ids, detections, strict=True):
            image_id = int(image_id)
            if image_id not in self._image_ids:
                raise ValueError(f"CocoDetectionMeter.update: image id {image_id} is not in the GT images")
            if image_id in self._local:
                continue  # padded duplicate from the sampler: the first occurrence is the prediction for this image
            self._local[image_id] = self._to_rows(image_id, det)
        self._merged = None

    def _to_rows(self, image_id: int, det: Mapping[str, torch.Tensor]) -> list[list[float]]:
        boxes = det["boxes"].detach().to("cpu", torch.float64)
        scores = det["scores"].detach().to("cpu", torch.float64).tolist()
        labels = det["labels"].detach().cpu().tolist()
        if boxes.dim() != 2 or boxes.shape[1] != 4 or not (len(scores) == len(labels) == boxes.shape[0]):
            raise ValueError(
                f"CocoDetectionMeter.update: image {image_id}: boxes {tuple(boxes.shape)}, {len(scores)} scores and "
                f"{len(labels)} labels do not form N detections"
            )
        num_cats = len(self.contiguous_to_cat_id)
        bad = [lab for lab in labels if not 1 <= lab <= num_cats]
        if bad:
            raise ValueError(f"CocoDetectionMeter.update: image {image_id}: labels {bad[:5]} outside 1..{num_cats}")
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        return [
            [self.contiguous_to_cat_id[lab - 1], *box, score]
            for lab, box, score in zip(labels, xywh, scores, strict=True)
        ]

    def sync(self, gather_fn: GatherFn) -> None:
        """Merge every rank's detections; a collective, so every rank must call it.

        Args:
            gather_fn: takes this rank's payload (a list of `[image_id, rows]`, plain ints/floats) and returns the list
                of all ranks' payloads, e.g. `torch.distributed.all_gather_object`. Local results are kept.
        """
        payload = [[image_id, rows] for image_id, rows in sorted(self._local.items())]
        merged: dict[int, list[list[float]]] = {}
        for rank_payload in gather_fn(payload):
            for image_id, rows in rank_payload:
                merged.setdefault(int(image_id), rows)
        self._merged = merged

    @property
    def num_images(self) -> int:
        """Distinct images seen (merged over ranks after `sync`)."""
        return len(self._merged if self._merged is not None else self._local)

    def results(self) -> list[dict]:
        """COCO results: dicts with `image_id`, `category_id` (original id), `bbox` [x, y, w, h], `score`."""
        per_image = self._merged if self._merged is not None else self._local
        return [
            {"image_id": image_id, "category_id": int(row[0]), "bbox": row[1:5], "score": row[5]}
            for image_id, rows in sorted(per_image.items())
            for row in rows
        ]

    def compute(self) -> dict[str, float]:
        """Run COCOeval over the seen images; return AP, AP50, AP75, APs, APm, APl in percent (NaN: no GT in range)."""
        per_image = self._merged if self._merged is not None else self._local
        if not per_image:
            raise ValueError("CocoDetectionMeter.compute: no images were seen (update was never called)")
        results = self.results()
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            coco_dt = self._coco_gt.loadRes(results) if results else self._empty_results()
            evaluator = COCOeval(self._coco_gt, coco_dt, "bbox")
            evaluator.params.imgIds = sorted(per_image)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        logger.info("COCO bbox eval over %d images, %d detections\n%s", len(per_image), len(results), buffer.getvalue())
        return {
            name: (math.nan if value < 0 else 100.0 * float(value))
            for name, value in zip(STAT_NAMES, evaluator.stats[: len(STAT_NAMES)], strict=True)
        }

    def _empty_results(self) -> COCO:
        # loadRes indexes results[0] and fails on an empty list; an empty result set still scores AP 0 where GT exists.
        coco_dt = COCO()
        coco_dt.dataset = {
            "images": list(self._coco_gt.dataset["images"]),
            "categories": list(self._coco_gt.dataset["categories"]),
            "annotations": [],
        }
        coco_dt.createIndex()
        return coco_dt
