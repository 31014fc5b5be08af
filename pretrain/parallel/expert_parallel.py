"""Expert parallelism for `MoEMlp`: count exchange and an autograd-aware all-to-all over an expert-parallel group.

`pretrain/models/` never imports torch.distributed; the engine builds an `ExpertComm` per expert-parallel group and
injects it into the MoE layers (`apply_expert_parallel`), plus a `stats_reducer` summing the routing statistics over
data-parallel ranks. Both collectives use `all_to_all_single` with uneven splits, which NCCL and gloo implement
(gloo on CPU checked with torch 2.14.1), so there is no fallback path to keep in sync.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pretrain.models.moe_losses import moe_modules

logger = logging.getLogger(__name__)


class _AllToAll(torch.autograd.Function):
    """Rows x_RD [sum(send_splits), ...] -> [sum(recv_splits), ...]; backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x_RD: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
        ctx.splits = (send_splits, recv_splits)
        ctx.group = group
        return _all_to_all_rows(x_RD, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad_RD: Tensor):
        send_splits, recv_splits = ctx.splits
        return _all_to_all_rows(grad_RD, recv_splits, send_splits, ctx.group), None, None, None


def _all_to_all_rows(x_RD: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
    x_RD = x_RD.contiguous()
    out_RD = x_RD.new_empty((sum(recv_splits), *x_RD.shape[1:]))
    dist.all_to_all_single(out_RD, x_RD, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group)
    return out_RD


class ExpertComm:
    """Collectives of one expert-parallel group (rank r of the group holds global experts [r*E_local, (r+1)*E_local)).

    Args:
        group: the expert-parallel process group (None = the default group).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ExpertComm needs an initialised torch.distributed process group")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def exchange_counts(self, counts_E: Tensor) -> Tensor:
        """Tell every rank how many rows it will receive per local expert.

        Args:
            counts_E: [E] this rank's routed token-slots per GLOBAL expert.
        Returns:
            [P, E_local] (P = group size): row p = rows rank p sends to each of this rank's local experts.
        """
        if counts_E.numel() % self.world_size:
            raise ValueError(f"{counts_E.numel()} experts are not divisible by the expert-parallel size "
                             f"{self.world_size}")
        send_PE = counts_E.reshape(self.world_size, -1).contiguous()
        recv_PE = torch.empty_like(send_PE)
        dist.all_to_all_single(recv_PE, send_PE, group=self.group)
        return recv_PE

    def all_to_all(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Tensor:
        """Autograd-aware exchange of rows: send_splits[p] rows go to rank p, recv_splits[p] come from it."""
        if len(send_splits) != self.world_size or len(recv_splits) != self.world_size:
            raise ValueError(f"splits {send_splits}/{recv_splits} must have {self.world_size} entries")
        return _AllToAll.apply(x_RD, list(send_splits), list(recv_splits), self.group)


def make_stats_reducer(group: dist.ProcessGroup | None = None) -> Callable[[Tensor], Tensor]:
    """A `stats_reducer` for MoE layers: SUM of a detached tensor over the ranks of `group` (data-parallel ranks)."""

    def reduce_sum(x: Tensor) -> Tensor:
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    return reduce_sum


def apply_expert_parallel(model: nn.Module, *, comm: ExpertComm | None,
                          stats_reducer: Callable[[Tensor], Tensor] | None) -> int:
    """Inject `comm` into every MoE layer with ep_size > 1 and `stats_reducer` into every task-routed layer.

    Returns the number of layers that received a comm. Raises if a layer's ep_size/ep_rank disagree with `comm`.
    """
    injected = 0
    routed = {id(m) for _, m in moe_modules(model)}

    def is_routed(module: nn.Module) -> bool:
        return id(module) in routed

    for name, module in model.named_modules():
        if is_routed(module):
            module.stats_reducer = stats_reducer
        if getattr(module, "ep_size", 1) > 1:
            if comm is None or comm.world_size != module.ep_size or comm.rank != module.ep_rank:
                raise ValueError(f"{name}: ep_size={module.ep_size}, ep_rank={module.ep_rank} do not match comm "
                                 f"{None if comm is None else (comm.world_size, comm.rank)}")
            module.comm = comm
            injected += 1
    return injected
