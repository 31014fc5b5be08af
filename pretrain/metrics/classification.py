"""Top-k classification accuracy pooled over a dataset, reducible across ranks.

Accuracy is counts (correct@k, total), never a mean of per-batch means, so an uneven last batch or an uneven split
across ranks weighs every sample once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

ReduceFn = Callable[[torch.Tensor], torch.Tensor]


class ClassificationMeter:
    """Counts top-k hits over the samples it is given; metrics `top{k}` in percent.

    Args:
        topk: the k values to report, e.g. (1, 5). When a batch has fewer classes C than k, top-k is taken over all C
            classes (every sample is a hit), as timm's `accuracy` does.
    """

    def __init__(self, *, topk: Sequence[int] = (1, 5)) -> None:
        ks = tuple(int(k) for k in topk)
        if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
            raise ValueError(f"ClassificationMeter: topk must be distinct positive ints, got {tuple(topk)!r}")
        self.topk = ks
        self.reset()

    def reset(self) -> None:
        """Forget all counts (local and synced)."""
        # counts_K1: correct@k for each k, then the sample total; kept on the device of the logits so an eval loop
        # on GPU never synchronises with the host per batch.
        self._counts: torch.Tensor | None = None
        self._synced: torch.Tensor | None = None

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch.

        Args:
            logits: [B, C] class scores (any float dtype).
            labels: [B] integer class indices in 0..C-1.
        """
        if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"ClassificationMeter.update: expected logits [B, C] and labels [B], got logits "
                f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point:
            raise ValueError(f"ClassificationMeter.update: labels must be integer class indices, got {labels.dtype}")
        num_classes = logits.shape[1]
        maxk = min(max(self.topk), num_classes)
        top_idx_BK = logits.topk(maxk, dim=1).indices
        hit_BK = top_idx_BK == labels.to(top_idx_BK.device).unsqueeze(1)
        # A label appears at most once among the top-k, so the cumulative sum over k is 0/1: "hit within top-k".
        hit_within_BK = hit_BK.cumsum(dim=1)
        correct = [hit_within_BK[:, min(k, maxk) - 1].sum() for k in self.topk]
        total = torch.tensor(labels.shape[0], device=hit_BK.device)
        batch_counts = torch.stack([*correct, total]).to(torch.int64)
        self._counts = batch_counts if self._counts is None else self._counts + batch_counts.to(self._counts.device)
        self._synced = None

    def sync(self, reduce_fn: ReduceFn) -> None:
        """Sum the counts over ranks; a collective, so every rank must call it (also a rank that saw no batch).

        Args:
            reduce_fn: takes an int64 tensor [len(topk) + 1] (on CPU when this rank saw no data, else on the logits'
                device) and returns the element-wise sum over ranks; it must move the tensor to the backend's device
                itself (e.g. CUDA for NCCL). Local counts are kept, so calling sync again does not double count.
        """
        local = self._counts if self._counts is not None else torch.zeros(len(self.topk) + 1, dtype=torch.int64)
        self._synced = reduce_fn(local.clone()).to(torch.int64)

    def compute(self) -> dict[str, float]:
        """Return {"top1": %, "top5": %, ...} from the synced counts if `sync` ran since the last update, else local."""
        counts = self._synced if self._synced is not None else self._counts
        if counts is None or int(counts[-1]) == 0:
            raise ValueError("ClassificationMeter.compute: no samples were counted (update was never called)")
        values = counts.cpu().tolist()
        total = values[-1]
        return {f"top{k}": 100.0 * c / total for k, c in zip(self.topk, values[:-1], strict=True)}

    @property
    def num_samples(self) -> int:
        """Samples counted (synced total after `sync`)."""
        counts = self._synced if self._synced is not None else self._counts
        return 0 if counts is None else int(counts[-1])
