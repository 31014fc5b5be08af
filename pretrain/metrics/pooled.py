"""Dataset-level sums that the dense meters keep: one float64 vector per meter, summed over ranks in one call.

Every dense meter (depth, normals, saliency, edges) reduces its state to sums and counts, so a metric over the
whole set is computed from pooled totals, never as a mean of per-batch means, and one `all_reduce(SUM)` makes the
state of N ranks equal to that of one rank that saw every image. float64 holds pixel counts exactly up to 2**53.
"""

from __future__ import annotations

import torch

from pretrain.metrics.segmentation import ReduceFn


class PooledSums:
    """A float64 vector [N] of running sums with a local copy and a synced copy.

    Args:
        size: N, the number of sums.
        owner: meter name used in error messages.
    """

    def __init__(self, size: int, *, owner: str) -> None:
        self.size = size
        self.owner = owner
        self.reset()

    def reset(self) -> None:
        """Forget local and synced sums."""
        self._local_N = torch.zeros(self.size, dtype=torch.float64)
        self._synced_N: torch.Tensor | None = None

    def add(self, values_N: torch.Tensor) -> None:
        """Add one batch's sums (any device; kept on CPU so the state is cheap and device-agnostic)."""
        if values_N.shape != (self.size,):
            raise ValueError(f"{self.owner}: expected {self.size} sums, got shape {tuple(values_N.shape)}")
        self._local_N += values_N.detach().to(device="cpu", dtype=torch.float64)
        self._synced_N = None

    def sync(self, reduce_fn: ReduceFn) -> None:
        """Sum over ranks; a collective, so every rank calls it (also one that saw no data). Repeatable.

        Args:
            reduce_fn: takes a float64 CPU tensor [N] and returns its element-wise sum over ranks (it moves the
                tensor to the backend's device itself).
        """
        self._synced_N = reduce_fn(self._local_N.clone()).to(device="cpu", dtype=torch.float64)

    @property
    def value(self) -> torch.Tensor:
        """[N] float64 sums: the synced ones if `sync` ran since the last `add`, else the local ones."""
        return self._synced_N if self._synced_N is not None else self._local_N
