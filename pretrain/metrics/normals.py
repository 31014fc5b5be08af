"""Surface-normal angular errors pooled over every valid pixel of the set, in the two protocols' ways.

Both modes L2-normalise prediction and GT per pixel and drop pixels where any GT channel is 255 (the loader writes
255 on all three channels where a pixel is ignored). They differ only in how the angle is taken:

- "new" (MLoRE / TaskPrompter `evaluation/eval_normals.py`): angle = 2·atan2(‖p − g‖, ‖p + g‖); a zero-norm vector
  stays zero after normalisation (so a zero prediction is 90° off). Accurate for near-parallel vectors.
- "old" (M3ViT `evaluation/eval_normals.py`, offline `eval_normals`): angle = acos(clip(p·g, −1, 1)) with
  v / (‖v‖ + 1e-12) normalisation. In float32 p·g rounds to 1 for angles below ~0.02°, which then count as 0°.

Angles are computed in float32 like the references (that is what makes the two modes differ on near-parallel
vectors) and summed in float64. Reported, all in degrees except the percentages:
mean, rmse = sqrt(mean angle²), median, and "11.25"/"22.5"/"30" = % of pixels with angle strictly below it.
The new-protocol code reports only `mean`; M3ViT's in-training `NormalsMeter` reports rmse equal to the mean (a bug);
here rmse is the real root-mean-square, as in M3ViT's offline `eval_normals`.

Median: exact medians need every angle, which is not reducible across ranks in fixed memory, so angles are binned
into a fixed histogram (`bin_deg` wide bins over 0–180°, default 0.01° → 18,000 bins, part of the pooled state) and
the median is taken from bin centres (for an even count, the mean of the two middle ranks' bin centres): it is
within bin_deg / 2 (0.005°) of np.median of all angles.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pretrain.metrics.pooled import PooledSums
from pretrain.metrics.segmentation import ReduceFn

THRESHOLDS_DEG = (11.25, 22.5, 30.0)
_HEAD = 3 + len(THRESHOLDS_DEG)  # n, sum, sum of squares, then one count per threshold; the histogram follows


def _unit_or_zero(v_BCN: torch.Tensor) -> torch.Tensor:
    norm = v_BCN.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, v_BCN / norm.clamp_min(torch.finfo(v_BCN.dtype).tiny), torch.zeros_like(v_BCN))


def angle_atan2_deg(pred_BCN: torch.Tensor, gt_BCN: torch.Tensor) -> torch.Tensor:
    """New-protocol angle [B, N] in degrees between [B, 3, N] vectors: 2·atan2(‖p−g‖, ‖p+g‖) of unit vectors."""
    p, g = _unit_or_zero(pred_BCN), _unit_or_zero(gt_BCN)
    return torch.rad2deg(2 * torch.atan2((p - g).norm(dim=1), (p + g).norm(dim=1)))


def angle_acos_deg(pred_BCN: torch.Tensor, gt_BCN: torch.Tensor) -> torch.Tensor:
    """Old-protocol angle [B, N] in degrees between [B, 3, N] vectors: acos(clip(p·g, −1, 1)), v/(‖v‖+1e-12)."""
    p = pred_BCN / (pred_BCN.norm(dim=1, keepdim=True) + 1e-12)
    g = gt_BCN / (gt_BCN.norm(dim=1, keepdim=True) + 1e-12)
    return torch.rad2deg(torch.acos((p * g).sum(dim=1).clamp(-1.0, 1.0)))


ANGLE_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "new": angle_atan2_deg,
    "old": angle_acos_deg,
}


class NormalsMeter:
    """Dataset-pooled angular error of surface normals; state is 6 sums + a histogram, one reducer call.

    Args:
        mode: "new" (2·atan2) or "old" (acos), see the module docstring.
        ignore_value: GT value marking an ignored pixel (on any channel).
        bin_deg: histogram bin width for the median, degrees; 180 / bin_deg must be a whole number.
    """

    def __init__(self, *, mode: str = "new", ignore_value: float = 255.0, bin_deg: float = 0.01) -> None:
        if mode not in ANGLE_FNS:
            raise ValueError(f"NormalsMeter: mode must be one of {sorted(ANGLE_FNS)}, got {mode!r}")
        num_bins = round(180.0 / bin_deg)
        if num_bins < 1 or not math.isclose(num_bins * bin_deg, 180.0):
            raise ValueError(f"NormalsMeter: bin_deg={bin_deg} must divide 180 degrees")
        self.mode = mode
        self.ignore_value = ignore_value
        self.bin_deg = bin_deg
        self.num_bins = num_bins
        self._angle_fn = ANGLE_FNS[mode]
        self._sums = PooledSums(_HEAD + num_bins, owner="NormalsMeter")

    def reset(self) -> None:
        """Forget all sums (local and synced)."""
        self._sums.reset()

    @torch.no_grad()
    def update(self, pred_B3HW: torch.Tensor, gt_B3HW: torch.Tensor) -> None:
        """Add one batch of predictions at the GT's size.

        Args:
            pred_B3HW: predicted normals [B, 3, H, W] (any scale; normalised here). Decode a saved 8-bit prediction
                with 2·v/255 − 1 before passing it.
            gt_B3HW: GT normals [B, 3, H, W] in [−1, 1]; `ignore_value` on any channel drops the pixel.
        """
        if pred_B3HW.shape != gt_B3HW.shape or pred_B3HW.dim() != 4 or pred_B3HW.shape[1] != 3:
            raise ValueError(
                f"NormalsMeter.update: prediction {tuple(pred_B3HW.shape)} and GT {tuple(gt_B3HW.shape)} must both "
                "be [B, 3, H, W] of the same size"
            )
        batch = gt_B3HW.shape[0]
        gt_B3N = gt_B3HW.detach().to(torch.float32).reshape(batch, 3, -1)
        pred_B3N = pred_B3HW.detach().to(device=gt_B3N.device, dtype=torch.float32).reshape(batch, 3, -1)
        valid_BN = (gt_B3N != self.ignore_value).all(dim=1)
        angle_V = self._angle_fn(pred_B3N, gt_B3N)[valid_BN].to(torch.float64)
        bins_V = (angle_V / self.bin_deg).floor().clamp(0, self.num_bins - 1).to(torch.int64)
        head = [torch.tensor(float(angle_V.numel()), dtype=torch.float64), angle_V.sum(), (angle_V**2).sum()]
        head += [(angle_V < t).sum().to(torch.float64) for t in THRESHOLDS_DEG]
        hist = torch.bincount(bins_V, minlength=self.num_bins).to(torch.float64)
        self._sums.add(torch.cat([torch.stack([h.cpu() for h in head]), hist.cpu()]))

    def sync(self, reduce_fn: ReduceFn) -> None:
        """Sum the state over ranks (a collective: every rank calls it). See `PooledSums.sync`."""
        self._sums.sync(reduce_fn)

    @property
    def num_pixels(self) -> int:
        """Valid pixels counted so far (synced if `sync` ran since the last update)."""
        return int(self._sums.value[0])

    def _median(self, hist: torch.Tensor, n: int) -> float:
        cum = hist.cumsum(0)
        # 0-based middle ranks; the bin of rank k is the first whose cumulative count exceeds k
        ranks = torch.tensor([float((n - 1) // 2), float(n // 2)], dtype=torch.float64)
        bins = torch.searchsorted(cum, ranks, right=True)
        return float(((bins.to(torch.float64) + 0.5) * self.bin_deg).mean())

    def compute(self) -> dict[str, float]:
        """Return {"mean", "median", "rmse", "11.25", "22.5", "30"}: degrees, then percent of valid pixels."""
        state = self._sums.value
        n = int(state[0])
        if n == 0:
            raise ValueError("NormalsMeter.compute: no valid (non-ignored) pixels were counted")
        out = {
            "mean": float(state[1]) / n,
            "median": self._median(state[_HEAD:], n),
            "rmse": math.sqrt(float(state[2]) / n),
        }
        for i, t in enumerate(THRESHOLDS_DEG):
            out[f"{t:g}"] = 100.0 * float(state[3 + i]) / n
        return out
