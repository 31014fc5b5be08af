"""Forwards that see the global batch, not the rank's slice of it (`data.partitions` > 0).

With partitions the samples of every step are a function of (seed, step) only (`data/partitions.py`); two more
things made a run depend on the layout, and this module removes both:

- randomness: each rank drew stochastic depth, dropout masks, gate noise and the detector's fg/bg picks from its own
  torch RNG, so a sample's draws depended on its batch-mates. Each forward runs inside
  `models.sample_random.keyed_forward`, keyed by every sample's (seed, step, micro-batch, task, position in the
  global batch): a sample's draws are the same on any layout.
- loss means over a rank's items: the seg loss is a mean over the rank's labelled pixels, Faster R-CNN's RPN / RoI
  losses means over its sampled anchors / RoIs (fixed per image only while every image has enough candidates).
  The forward reports the local counts; one all-reduce gives the global ones, and each such term is rescaled by
  local·W / global so that DeepSpeed's gradient mean over the W ranks is the gradient of the global-batch mean, as
  one process holding the whole batch computes it (on one process the factor is exactly 1).

The MoE routing statistics behind the MI loss are already summed over ranks (`moe_losses.reduce_statistics`). Not
made global: the CV and switch auxiliary losses (`moe.w_cv`, `moe.w_switch`, 0 by default), products and ratios of
local sums, and the DeepSpeed MoE backend's capacity-limited dispatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pretrain import dist
from pretrain.data.partitions import global_positions
from pretrain.models.sample_random import keyed_forward, sample_keys

Forward = Callable[[Any, dict], dict[str, Tensor]]


class GlobalBatch:
    """Runs a task batch's forward keyed by its global positions and with global loss means (module docstring).

    Args:
        seed: the run's seed. rank / world_size: this process's place in the data-parallel world.
        task_ids: task name → id entering the keys (the model's task order).
        enabled: False (`data.partitions` = 0) runs every forward as before: torch's RNG, per-rank means.
    """

    def __init__(self, *, seed: int, rank: int, world_size: int, task_ids: dict[str, int], enabled: bool) -> None:
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.task_ids, self.enabled = dict(task_ids), enabled

    def forward(self, fn: Forward, engine: Any, batch: dict, *, step: int, micro: int) -> dict[str, Tensor]:
        """`fn(engine, batch)`'s named losses; keyed and globally normalised when enabled.

        Args:
            batch: this rank's part of the global batch of micro-batch `micro` of optimizer step `step` (0-based).
        """
        if not self.enabled:
            return fn(engine, batch)
        positions_B = torch.as_tensor(global_positions(self.rank, len(batch["images"])), dtype=torch.int64,
                                      device=engine.device)  # keys hashed where the forward draws
        keys_B = sample_keys(positions_B, seed=self.seed, step=step, micro=micro, task=self.task_ids[batch["task"]])
        with keyed_forward(keys_B) as keyed:
            losses = fn(engine, batch)
        return self.normalise(losses, keyed.counts)

    def normalise(self, losses: dict[str, Tensor], counts: dict[str, float]) -> dict[str, Tensor]:
        """Rescale every term that is a mean over `counts[term]` local items to its share of the global mean.

        Collective when `counts` is not empty: every rank runs the same task, so the same terms, in each forward.
        """
        if not counts:
            return losses
        names = sorted(counts)
        local = torch.tensor([counts[name] for name in names], dtype=torch.float64)
        total = dist.all_reduce_sum(local.clone())
        out = dict(losses)
        for name, n_local, n_total in zip(names, local.tolist(), total.tolist()):
            # a term with no items anywhere is 0 on every rank (the heads divide by max(n, 1)): leave it
            out[name] = losses[name] * (n_local * self.world_size / max(n_total, 1.0))
        return out
