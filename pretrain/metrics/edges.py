"""Boundary detection ODS F-measure without MATLAB, following SEISM's `eval_method` / `edgesEvalImg` per protocol.

NOT VALIDATED AGAINST SEISM: no MATLAB run was available here. The numbers follow the SEISM code path step by step
(see below) but must be cross-checked on one saved prediction set (`save_predictions` → SEISM) before they are quoted
next to published ones. The in-training "edge" number of MLoRE / TaskPrompter / M3ViT is a validation BCE loss
(`evaluation/eval_edge.py`); it is not computed here.

Per image (at its ORIGINAL size: the tolerance is a fraction of the image diagonal):
1. prediction: edge probability; `quantize=True` first stores it as the reference does (trunc(prob·255)) and reads it
   back /255, as SEISM reads the saved PNG.
2. mode "new" (InvPT / TaskPrompter / MLoRE via prismformore/Boundary-Detection-Evaluation-Tools, reader
   `read_one_cont_png`): non-maximum suppression (`boundaries.edge_nms`), then positive where value > t, with the 101
   thresholds of SEISM's `parameters/HED.txt` (0.001, 0.01 … 0.99, 0.999).
   mode "old" (M3ViT / ASTMT, reader `read_one_png`): no NMS, positive where value >= t, t = 0.01 … 0.99 (99).
3. the binary map is thinned (`bwmorph thin Inf`, `boundaries.thin`), as `edgesEvalImg` does.
4. GT: `gt_boundary="seg2bmap"` treats the GT map as a label image, takes `seg2bmap` and thins: SEISM's rule for
   both datasets (`gt_wrappers/db_gt.m` hands a partition to `edgesEvalImg`). NYUD: the partition is the NYUD edge
   PNG itself. PASCAL-Context: it is relabel(LabelMap), which the converter stores as the evaluation label
   `edge_regions` (`data/dense_decode.py`); it is not the training target thin(|Laplacian(LabelMap)| > 0), which
   misses the middle class of three in a row (its Laplacian cancels) and, elsewhere, may keep the other pixel of
   the two-pixel band that seg2bmap (upper/left pixel of each class change) does not: not "within every tolerance".
   `gt_boundary="thin"` thins a binary edge map (> 0): the old PASCAL convention, scoring the training target;
   `finetune/evaluate.py` falls back to it, with a warning, for PASCAL shards converted before `edge_regions`.
5. matching within r = max_dist · sqrt(H² + W²) pixels: `matching="bipartite"` counts a maximum-cardinality
   one-to-one matching, equal to correspondPixels' count (see `boundaries.match_count`); `matching="distance"` is
   the cheaper distance-transform approximation (a pixel counts if any pixel of the other map is within r), which
   over-counts crowded predictions.
Over the set, per threshold, matched / predicted / GT pixel counts are summed; P = matchedP / predicted, R =
matchedR / GT, F = 2PR / (P + R) (0 when nothing matched, as SEISM's `gather_measure`), and ODS = the best F over one
dataset-wide threshold (the first on ties, like MATLAB `max`). max_dist: 0.0075 PASCAL-Context, 0.011 NYUD
(`EDGE_DATASETS`), chosen by SEISM's `eval_method` from the database name in both protocols.

Cost: every threshold thins and matches again, on the CPU. Measured on the shared 2-core dev machine for one 375×500
image with a noisy synthetic prediction (101 HED thresholds): ~20 s exact ("bipartite"), ~6 s "distance". A full
PASCAL-Context val set (5,105 images) is hours per process: split images over ranks (`sync` pools them) or run it
offline on saved predictions; SEISM itself is no faster (M3ViT submits it as 102 cluster jobs).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pretrain.catalog import DATASETS
from pretrain.metrics.boundaries import edge_nms, match_count, match_count_distance, seg2bmap, thin
from pretrain.metrics.pooled import PooledSums
from pretrain.metrics.segmentation import ReduceFn

HED_THRESHOLDS = (0.001, *(round(0.01 * i, 2) for i in range(1, 100)), 0.999)  # SEISM parameters/HED.txt
OLD_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(1, 100))  # M3ViT eval_edge.py: arange(0.01, 1.00, 0.01)

# mode → (thresholds, non-maximum suppression first, strict ">" comparison)
EDGE_MODES = {
    "new": (HED_THRESHOLDS, True, True),
    "old": (OLD_THRESHOLDS, False, False),
}
# EdgeMeter keywords per dataset, from its catalog record; PASCAL's GT map is its `edge_regions` label
EDGE_DATASETS = {name: {"max_dist": d.edge_max_dist, "gt_boundary": d.edge_gt_boundary}
                 for name, d in DATASETS.items() if d.edge_max_dist is not None}
TARGET_GT_BOUNDARY = "thin"  # how a binary training edge target becomes GT (PASCAL shards without edge_regions)
GT_BOUNDARIES = {
    "thin": lambda gt_HW: thin(gt_HW > 0),
    "seg2bmap": lambda gt_HW: thin(seg2bmap(gt_HW)),
}


def _bipartite(pred_HW: np.ndarray, gt_HW: np.ndarray, radius: float) -> tuple[int, int]:
    count = match_count(pred_HW, gt_HW, radius)
    return count, count


MATCHERS = {"bipartite": _bipartite, "distance": match_count_distance}


def _check_choice(name: str, value: str, table: dict) -> None:
    if value not in table:
        raise ValueError(f"EdgeMeter: {name} must be one of {sorted(table)}, got {value!r}")


class EdgeMeter:
    """Dataset-level boundary F-measure at the optimal dataset scale (ODS); state is 3·T + 1 sums.

    Args:
        mode: "new" (NMS, HED thresholds) or "old" (no NMS, 99 thresholds), see the module docstring.
        max_dist: tolerance as a fraction of the image diagonal (0.0075 PASCAL-Context, 0.011 NYUD).
        gt_boundary: "seg2bmap" (a label image: SEISM) or "thin" (a binary edge map), how the GT map becomes a
            1-pixel boundary map (module docstring, step 4).
        matching: "bipartite" (correspondPixels' count) or "distance" (faster approximation).
        quantize: read predictions through 8-bit storage as SEISM does (trunc(prob·255)/255).
        ignore_value: GT value of padding; a GT containing it is rejected (crop to the original size first).
    """

    def __init__(
        self,
        *,
        mode: str = "new",
        max_dist: float = 0.0075,
        gt_boundary: str = "thin",
        matching: str = "bipartite",
        quantize: bool = True,
        ignore_value: float = 255.0,
    ) -> None:
        for name, value, table in (("mode", mode, EDGE_MODES), ("gt_boundary", gt_boundary, GT_BOUNDARIES),
                                   ("matching", matching, MATCHERS)):
            _check_choice(name, value, table)
        if not max_dist > 0:
            raise ValueError(f"EdgeMeter: max_dist must be > 0, got {max_dist}")
        self.mode, self.max_dist, self.quantize, self.ignore_value = mode, max_dist, quantize, ignore_value
        self.thresholds, self._nms, self._strict = EDGE_MODES[mode]
        self.gt_boundary = gt_boundary
        self._matcher = MATCHERS[matching]
        self._sums = PooledSums(3 * len(self.thresholds) + 1, owner="EdgeMeter")

    def reset(self) -> None:
        """Forget all sums (local and synced)."""
        self._sums.reset()

    def _image_sums(self, prob_HW: np.ndarray, gt_HW: np.ndarray, gt_boundary: str) -> np.ndarray:
        """[3T + 1]: matched predicted, predicted, matched GT pixels per threshold, then GT pixels."""
        num = len(self.thresholds)
        edges = np.floor(prob_HW * 255).astype(np.float32) / 255 if self.quantize else prob_HW.astype(np.float32)
        if self._nms:
            edges = edge_nms(edges)
        gt = GT_BOUNDARIES[gt_boundary](gt_HW)
        radius = self.max_dist * math.hypot(*gt.shape)
        sums = np.zeros(3 * num + 1, dtype=np.float64)
        sums[-1] = gt.sum()
        for i, t in enumerate(self.thresholds):
            positive = edges > t if self._strict else edges >= t
            if not positive.any():
                break  # thresholds ascend: every later map is empty too
            pred = thin(positive)
            sums[i], sums[2 * num + i] = self._matcher(pred, gt, radius)
            sums[num + i] = pred.sum()
        return sums

    @torch.no_grad()
    def update(self, prob_B1HW: torch.Tensor, gt_B1HW: torch.Tensor, *, gt_boundary: str | None = None) -> None:
        """Add images at their ORIGINAL size (batch only equal-size crops; usually one image per call).

        Args:
            prob_B1HW: edge probability (sigmoid output) in [0, 1], [B, 1, H, W] (or [1, H, W] / [H, W]).
            gt_B1HW: GT map, same shape: a label image ("seg2bmap") or a 0/1 edge map ("thin"); no padding.
            gt_boundary: this call's GT convention instead of the meter's (a GT of another kind, e.g. the training
                edge target of shards that lack PASCAL's `edge_regions`).
        """
        gt_boundary = self.gt_boundary if gt_boundary is None else gt_boundary
        _check_choice("gt_boundary", gt_boundary, GT_BOUNDARIES)
        if prob_B1HW.shape != gt_B1HW.shape:
            raise ValueError(f"EdgeMeter.update: prediction {tuple(prob_B1HW.shape)} != GT {tuple(gt_B1HW.shape)}")
        prob_NHW = prob_B1HW.detach().to(device="cpu", dtype=torch.float32).reshape(-1, *prob_B1HW.shape[-2:])
        gt_NHW = gt_B1HW.detach().cpu().reshape(-1, *gt_B1HW.shape[-2:])
        if bool((gt_NHW == self.ignore_value).any()):
            raise ValueError(
                f"EdgeMeter.update: GT contains the padding value {self.ignore_value}; crop prediction and GT to the "
                "original image (the tolerance is a fraction of the original diagonal)"
            )
        if bool(((prob_NHW < 0) | (prob_NHW > 1)).any()):
            raise ValueError("EdgeMeter.update: prediction must be a probability in [0, 1] (apply the sigmoid)")
        for prob_HW, gt_HW in zip(prob_NHW.numpy(), gt_NHW.numpy()):
            self._sums.add(torch.from_numpy(self._image_sums(prob_HW, gt_HW, gt_boundary)))

    def sync(self, reduce_fn: ReduceFn) -> None:
        """Sum the state over ranks (a collective: every rank calls it). See `PooledSums.sync`."""
        self._sums.sync(reduce_fn)

    def compute(self) -> dict[str, float]:
        """Return {"odsF", "ods_precision", "ods_recall"} in percent and "ods_threshold"."""
        num = len(self.thresholds)
        state = self._sums.value
        matched_p, predicted, matched_r = state[: 3 * num].view(3, num)
        gt_total = state[-1]
        if float(gt_total) == 0:
            raise ValueError("EdgeMeter.compute: no GT boundary pixel was counted")
        precision = torch.where(predicted > 0, matched_p / predicted.clamp_min(1), torch.zeros_like(predicted))
        recall = matched_r / gt_total
        denom = precision + recall
        f = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300), torch.zeros_like(denom))
        best = int(torch.argmax(f))  # first maximum, as MATLAB max
        return {
            "odsF": 100.0 * float(f[best]),
            "ods_precision": 100.0 * float(precision[best]),
            "ods_recall": 100.0 * float(recall[best]),
            "ods_threshold": float(self.thresholds[best]),
        }
