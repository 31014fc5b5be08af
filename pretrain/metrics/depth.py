"""Depth error metrics pooled over every valid pixel of the set (MLoRE / TaskPrompter `evaluation/eval_depth.py`).

Reference behaviour reproduced (MLoRE `DepthMeter(max_depth=80, min_depth=0)`; the caller's model output was already
clamped at 0 by `get_output`):

- valid pixels: min_depth < g < max_depth (both strict; NYUD: 0 < g < 80, so the loader's 0 = invalid/padding drops);
- prediction clamped at 0, then values <= 0 set to 1e-9 (so log is finite); GT values <= 0 likewise (only reachable
  with min_depth < 0);
- rmse = sqrt(sum (g - p)^2 / N) with N the valid pixels of the WHOLE set, not a mean of per-image RMSEs;
  log_rmse = sqrt(sum (ln g - ln p)^2 / N); abs_rel = sum |g - p| / g / N; sq_rel = sum (g - p)^2 / g / N.

Extras not in the reference (clearly named, for comparison with monocular-depth papers): delta1/2/3 = percentage of
valid pixels with max(g/p, p/g) < 1.25, 1.25^2, 1.25^3. All sums are float64 (the reference sums float32 per image
into a Python float, so the last digits can differ). Depth is in metres; rmse is in metres.
"""

from __future__ import annotations

import math

import torch

from pretrain.metrics.pooled import PooledSums
from pretrain.metrics.segmentation import ReduceFn

# Order of the pooled sums.
_SUMS = ("n", "sq_err", "sq_log_err", "abs_rel", "sq_rel", "delta1", "delta2", "delta3")


class DepthMeter:
    """Dataset-pooled depth errors; state is 8 sums, reducible across ranks with one call.

    Args:
        min_depth: GT values must be > min_depth to count (reference 0.0).
        max_depth: GT values must be < max_depth to count (reference 80.0 m).
    """

    def __init__(self, *, min_depth: float = 0.0, max_depth: float = 80.0) -> None:
        if not max_depth > min_depth:
            raise ValueError(f"DepthMeter: max_depth={max_depth} must exceed min_depth={min_depth}")
        self.min_depth = min_depth
        self.max_depth = max_depth
        self._sums = PooledSums(len(_SUMS), owner="DepthMeter")

    def reset(self) -> None:
        """Forget all sums (local and synced)."""
        self._sums.reset()

    @torch.no_grad()
    def update(self, pred_B1HW: torch.Tensor, gt_B1HW: torch.Tensor) -> None:
        """Add one batch (or image) of predictions at the GT's size (crop padded predictions back first).

        Args:
            pred_B1HW: predicted depth in metres, [B, 1, H, W] (any shape equal to the GT's works, e.g. [H, W]).
            gt_B1HW: GT depth in metres, same shape; pixels outside (min_depth, max_depth) are ignored.
        """
        if pred_B1HW.shape != gt_B1HW.shape:
            raise ValueError(
                f"DepthMeter.update: prediction {tuple(pred_B1HW.shape)} and GT {tuple(gt_B1HW.shape)} differ; "
                "crop the padded prediction to the GT size first"
            )
        gt = gt_B1HW.detach().to(torch.float64).flatten()
        pred = pred_B1HW.detach().to(device=gt.device, dtype=torch.float64).flatten().clamp_min(0.0)
        valid = (gt > self.min_depth) & (gt < self.max_depth)
        tiny = torch.tensor(1e-9, dtype=torch.float64, device=gt.device)
        g = torch.where(gt[valid] > 0, gt[valid], tiny)
        p = torch.where(pred[valid] > 0, pred[valid], tiny)
        err = g - p
        ratio = torch.maximum(g / p, p / g)
        sums = torch.stack(
            [
                torch.tensor(float(g.numel()), dtype=torch.float64, device=g.device),
                (err**2).sum(),
                ((g.log() - p.log()) ** 2).sum(),
                (err.abs() / g).sum(),
                (err**2 / g).sum(),
                (ratio < 1.25).sum().to(torch.float64),
                (ratio < 1.25**2).sum().to(torch.float64),
                (ratio < 1.25**3).sum().to(torch.float64),
            ]
        )
        self._sums.add(sums)

    def sync(self, reduce_fn: ReduceFn) -> None:
        """Sum the state over ranks (a collective: every rank calls it). See `PooledSums.sync`."""
        self._sums.sync(reduce_fn)

    @property
    def num_pixels(self) -> int:
        """Valid pixels counted so far (synced if `sync` ran since the last update)."""
        return int(self._sums.value[0])

    def compute(self) -> dict[str, float]:
        """Return {"rmse", "log_rmse", "abs_rel", "sq_rel", "delta1", "delta2", "delta3"} (delta* in percent)."""
        s = dict(zip(_SUMS, self._sums.value.tolist()))
        n = s["n"]
        if n == 0:
            raise ValueError(
                f"DepthMeter.compute: no valid pixels ({self.min_depth} < gt < {self.max_depth}) were counted"
            )
        return {
            "rmse": math.sqrt(s["sq_err"] / n),
            "log_rmse": math.sqrt(s["sq_log_err"] / n),
            "abs_rel": s["abs_rel"] / n,
            "sq_rel": s["sq_rel"] / n,
            "delta1": 100.0 * s["delta1"] / n,
            "delta2": 100.0 * s["delta2"] / n,
            "delta3": 100.0 * s["delta3"] / n,
        }
