"""Saliency maxF (and old-protocol saliency mIoU), reproducing each protocol's reference meter.

Input to both modes: the foreground probability in [0, 1] (softmax[:, 1] of the 2-class head) and the binary GT
(0/1, 255 ignored). Pixels whose GT is 255 are dropped in both modes.

"new" (MLoRE / TaskPrompter `evaluation/eval_sal.py`, `SaliencyMeter(threshold_step=0.05, beta_squared=0.3)`):
  the reference receives prob × 255 (`get_output`), divides by 255 and, because prediction and GT have the same
  number of dims, applies a SIGMOID AGAIN, so its scores lie in [0.5, 0.731]. This double sigmoid is reproduced
  exactly (float32: x = prob·255/255, s = sigmoid(x)). Thresholds are float32 `arange(0.05, 1, 0.05)` (19 values,
  s >= t is positive), so only 0.55/0.60/0.65/0.70 can separate pixels (prob ≈ 0.20/0.41/0.62/0.85).
  TP, predicted and actual positives are pooled over the whole set per threshold; P = TP/PP, R = TP/AP,
  F = (1 + β²)·P·R / (β²·P + R) with β² = 0.3, NaN (0/0) → 0, maxF = max over thresholds. Counts are float64 here
  (the reference accumulates them in float32, which can change the last digits on a full val set).

"old" (M3ViT / ASTMT `evaluation/eval_sal.py` `SaliencyMeter`): 15 thresholds float32 `linspace(0.2, 0.9, 15)`,
  positive where prob > t (strict; no extra sigmoid). Per IMAGE: precision = tp/(tp+fp+1e-12), recall =
  tp/(tp+fn+1e-12), Jaccard = |gt ∧ pred| / |gt ∨ pred| (1 when both are empty); each averaged over images;
  F = 2·P̄·R̄ / (P̄ + R̄ + 1e-12) (β² = 1); maxF = max over thresholds; mIoU = max over thresholds of the mean
  Jaccard. The reference has no ignore label (its FixedResize inputs have none); here 255 pixels are voids as in
  ASTMT's `jaccard(..., void_pixels)`, and an image with no valid pixel is skipped.

`compute()` returns percent: {"maxF"} (new) or {"maxF", "mIoU"} (old).
"""

from __future__ import annotations

import torch

from pretrain.metrics.pooled import PooledSums
from pretrain.metrics.segmentation import ReduceFn

NEW_THRESHOLDS = torch.arange(0.05, 1, 0.05, dtype=torch.float32)  # the reference's arange(step, 1, step)
OLD_THRESHOLDS = torch.linspace(0.2, 0.9, 15, dtype=torch.float64).to(torch.float32)


def _reference_scores(prob_N: torch.Tensor) -> torch.Tensor:
    """New-protocol score: the reference's prob×255 → /255 → sigmoid, in float32."""
    return torch.sigmoid(prob_N.to(torch.float32) * 255.0 / 255.0)


def _new_sums(prob_BN: torch.Tensor, gt_BN: torch.Tensor, valid_BN: torch.Tensor) -> torch.Tensor:
    """[3T] pooled sums: TP per threshold, then predicted positives, then actual positives."""
    score_V = _reference_scores(prob_BN[valid_BN])
    target_V = gt_BN[valid_BN] == 1
    pos_TV = score_V.unsqueeze(0) >= NEW_THRESHOLDS.to(score_V.device).unsqueeze(1)
    tp_T = (pos_TV & target_V).sum(dim=1)
    pp_T = pos_TV.sum(dim=1)
    ap_T = target_V.sum().expand_as(tp_T)
    return torch.cat([tp_T, pp_T, ap_T]).to(torch.float64)


def _old_sums(prob_BN: torch.Tensor, gt_BN: torch.Tensor, valid_BN: torch.Tensor) -> torch.Tensor:
    """[1 + 3T] sums over images: image count, then Jaccard, precision and recall per threshold."""
    keep_B = valid_BN.any(dim=1)
    prob_BN, gt_BN, valid_BN = prob_BN[keep_B], gt_BN[keep_B], valid_BN[keep_B]
    score_BN = prob_BN.to(torch.float32) * 255.0 / 255.0
    target_BN = (gt_BN == 1) & valid_BN
    thresholds = OLD_THRESHOLDS.to(score_BN.device)
    pos_TBN = (score_BN.unsqueeze(0) > thresholds.view(-1, 1, 1)) & valid_BN
    tp_TB = (pos_TBN & target_BN).sum(dim=2).to(torch.float64)
    fp_TB = (pos_TBN & ~target_BN).sum(dim=2).to(torch.float64)
    fn_TB = (~pos_TBN & target_BN).sum(dim=2).to(torch.float64)
    union_TB = tp_TB + fp_TB + fn_TB
    jaccard_TB = torch.where(union_TB > 0, tp_TB / union_TB.clamp_min(1), torch.ones_like(union_TB))
    prec_TB = tp_TB / (tp_TB + fp_TB + 1e-12)
    rec_TB = tp_TB / (tp_TB + fn_TB + 1e-12)
    count = torch.tensor([float(keep_B.sum())], dtype=torch.float64, device=tp_TB.device)
    return torch.cat([count, jaccard_TB.sum(dim=1), prec_TB.sum(dim=1), rec_TB.sum(dim=1)])


def _new_scores(state: torch.Tensor, beta_squared: float) -> dict[str, float]:
    tp_T, pp_T, ap_T = state.view(3, -1)
    if float(ap_T[0]) == 0:  # recall 0/0 at every threshold: maxF would silently be 0
        raise ValueError("SaliencyMeter.compute: no valid foreground GT pixel was counted")
    precision_T, recall_T = tp_T / pp_T, tp_T / ap_T
    f_T = (1 + beta_squared) * precision_T * recall_T / (beta_squared * precision_T + recall_T)
    return {"maxF": 100.0 * float(torch.nan_to_num(f_T, nan=0.0).max())}


def _old_scores(state: torch.Tensor, beta_squared: float) -> dict[str, float]:
    n = float(state[0])
    if n == 0:
        raise ValueError("SaliencyMeter.compute: no image with valid pixels was counted")
    miou_T, prec_T, rec_T = (state[1:] / n).view(3, -1)
    f_T = (1 + beta_squared) * prec_T * rec_T / (beta_squared * prec_T + rec_T + 1e-12)
    return {"maxF": 100.0 * float(f_T.max()), "mIoU": 100.0 * float(miou_T.max())}


# mode → (sums per batch, scores from pooled state, state size, beta²)
MODES = {
    "new": (_new_sums, _new_scores, 3 * len(NEW_THRESHOLDS), 0.3),
    "old": (_old_sums, _old_scores, 1 + 3 * len(OLD_THRESHOLDS), 1.0),
}


class SaliencyMeter:
    """Saliency maxF in the "new" (pooled, double sigmoid, β² = 0.3) or "old" (per image, β² = 1) protocol.

    Args:
        mode: "new" or "old", see the module docstring.
        ignore_index: GT value excluded from every count.
    """

    def __init__(self, *, mode: str = "new", ignore_index: int = 255) -> None:
        if mode not in MODES:
            raise ValueError(f"SaliencyMeter: mode must be one of {sorted(MODES)}, got {mode!r}")
        self.mode = mode
        self.ignore_index = ignore_index
        self._sums_fn, self._scores_fn, size, self.beta_squared = MODES[mode]
        self._sums = PooledSums(size, owner="SaliencyMeter")

    def reset(self) -> None:
        """Forget all sums (local and synced)."""
        self._sums.reset()

    @torch.no_grad()
    def update(self, prob_BHW: torch.Tensor, gt_BHW: torch.Tensor) -> None:
        """Add one batch at the GT's size.

        Args:
            prob_BHW: foreground probability in [0, 1], [B, H, W] or [B, 1, H, W] (NOT ×255, NOT logits).
            gt_BHW: GT, same shape (or [B, H, W] for a [B, 1, H, W] prediction), values 0, 1 or `ignore_index`.
        """
        if prob_BHW.dim() == 4 and prob_BHW.shape[1] == 1:
            prob_BHW = prob_BHW[:, 0]
        if gt_BHW.dim() == 4 and gt_BHW.shape[1] == 1:
            gt_BHW = gt_BHW[:, 0]
        if prob_BHW.shape != gt_BHW.shape or prob_BHW.dim() != 3:
            raise ValueError(
                f"SaliencyMeter.update: prediction {tuple(prob_BHW.shape)} and GT {tuple(gt_BHW.shape)} must both "
                "be [B, H, W] (or [B, 1, H, W]) of the same size"
            )
        gt_BN = gt_BHW.detach().flatten(1).to(device=prob_BHW.device, dtype=torch.int64)
        valid_BN = gt_BN != self.ignore_index
        bad = valid_BN & (gt_BN != 0) & (gt_BN != 1)
        if bool(bad.any()):
            raise ValueError(
                f"SaliencyMeter.update: GT value {int(gt_BN[bad][0])} is not 0, 1 or ignore_index={self.ignore_index}"
            )
        prob_BN = prob_BHW.detach().flatten(1)
        if bool(((prob_BN < 0) | (prob_BN > 1)).any()):
            raise ValueError("SaliencyMeter.update: prediction must be a probability in [0, 1] (not ×255 or logits)")
        self._sums.add(self._sums_fn(prob_BN, gt_BN, valid_BN).cpu())

    def sync(self, reduce_fn: ReduceFn) -> None:
        """Sum the state over ranks (a collective: every rank calls it). See `PooledSums.sync`."""
        self._sums.sync(reduce_fn)

    def compute(self) -> dict[str, float]:
        """Return {"maxF"} (new) or {"maxF", "mIoU"} (old), in percent."""
        return self._scores_fn(self._sums.value, self.beta_squared)
