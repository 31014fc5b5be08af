"""Task-routed mixture-of-experts MLP (Mod-Squad / M3ViT) with dropless sort dispatch and grouped experts.

Routing: per-task router -> softmax -> top-k -> stable argsort of the S*K token-slots by expert -> index_select
rows -> each expert runs on its contiguous slice (one GEMM per expert per layer) -> results go back to token order
and are combined with the gates in one batched matmul. No capacity, no padding, no one-hot [S, E, C] tensor: no
token is ever dropped. With expert parallelism the sorted rows travel to the rank holding their expert through
an injected `comm` (see pretrain/parallel/expert_parallel.py); this module never imports torch.distributed. Routers and
statistics live in `moe_routing.py`; MOE.md has the design notes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from pretrain.models.moe_routing import (  # re-exported: the routing layer's historical home
    GATES,
    MI_TASK_WEIGHTINGS,
    ROUTER_INITS,
    Routing,
    TaskRoutedLayer,
    TaskRouter,
    _check_choice,
)

__all__ = ["EXPERT_INITS", "GATES", "MI_TASK_WEIGHTINGS", "ROUTER_INITS", "GroupedExperts", "GroupedLinear", "MoEMlp",
           "PermuteRows", "Routing", "TaskRoutedLayer", "TaskRouter", "combine_slots", "init_experts_", "permute_rows",
           "sort_routes"]

logger = logging.getLogger(__name__)

EXPERT_INITS = ("timm", "modsquad", "m3vit")


class GroupedLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e] + b[e] for rows grouped by expert; writes into preallocated buffers.

    A loop over `w[e]` selects of a stacked Parameter under plain autograd allocates a full-size zero gradient per
    select; this Function computes every expert's weight gradient straight into one [E, in, out] buffer.
    """

    @staticmethod
    def forward(ctx, x_RI: Tensor, counts: list[int], w_EIO: Tensor, b_EO: Tensor | None) -> Tensor:
        y_RO = x_RI.new_empty(x_RI.shape[0], w_EIO.shape[2])
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                if b_EO is None:
                    torch.mm(x_RI[rows], w_EIO[e], out=y_RO[rows])
                else:
                    torch.addmm(b_EO[e], x_RI[rows], w_EIO[e], out=y_RO[rows])
                start += count
        ctx.counts = counts
        ctx.has_bias = b_EO is not None
        ctx.save_for_backward(x_RI, w_EIO)
        return y_RO

    @staticmethod
    def backward(ctx, grad_RO: Tensor):
        x_RI, w_EIO = ctx.saved_tensors
        need_x, _, need_w, need_b = ctx.needs_input_grad
        grad_RO = grad_RO.contiguous()
        grad_x = torch.empty_like(x_RI) if need_x else None
        grad_w = torch.empty_like(w_EIO) if need_w else None
        grad_b = w_EIO.new_empty(w_EIO.shape[0], w_EIO.shape[2]) if (need_b and ctx.has_bias) else None
        start = 0
        for e, count in enumerate(ctx.counts):
            rows = slice(start, start + count)
            start += count
            if count == 0:  # an expert that got no rows has an exactly-zero gradient
                for grad in (grad_w, grad_b):
                    if grad is not None:
                        grad[e].zero_()
                continue
            if grad_x is not None:
                torch.mm(grad_RO[rows], w_EIO[e].t(), out=grad_x[rows])
            if grad_w is not None:
                torch.mm(x_RI[rows].t(), grad_RO[rows], out=grad_w[e])
            if grad_b is not None:
                torch.sum(grad_RO[rows], dim=0, out=grad_b[e])
        return grad_x, None, grad_w, grad_b


class PermuteRows(torch.autograd.Function):
    """out = x[index] for a permutation `index`; backward gathers with the inverse permutation (no scatter-add)."""

    @staticmethod
    def forward(ctx, x_RD: Tensor, index_R: Tensor, inverse_R: Tensor) -> Tensor:
        ctx.save_for_backward(inverse_R)
        return x_RD.index_select(0, index_R)

    @staticmethod
    def backward(ctx, grad_RD: Tensor):
        (inverse_R,) = ctx.saved_tensors
        return grad_RD.index_select(0, inverse_R), None, None


def permute_rows(x_RD: Tensor, index_R: Tensor, inverse_R: Tensor) -> Tensor:
    """Rows of x_RD [R, ...] in the order `index_R` [R] (a permutation whose inverse is `inverse_R`)."""
    return PermuteRows.apply(x_RD, index_R, inverse_R)


def sort_routes(idx_SK: Tensor) -> tuple[Tensor, Tensor]:
    """Stable sort of the token-slots by expert.

    Args:
        idx_SK: [S, K] expert chosen by each token-slot.
    Returns:
        order_R: [R = S*K] flat slot index (s*K + k) at each sorted position; token = order_R // K.
        inverse_R: [R] sorted position of each flat slot.
    """
    order_R = torch.argsort(idx_SK.reshape(-1), stable=True)
    inverse_R = torch.empty_like(order_R)
    inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
    return order_R, inverse_R


def combine_slots(y_RD: Tensor, inverse_R: Tensor, order_R: Tensor, gates_SK: Tensor) -> Tensor:
    """Expert outputs in sorted order [R, D] -> sum_k gate[s, k] * y[s, k] [S, D] (one batched matmul)."""
    num_tokens, top_k = gates_SK.shape
    y_SKD = permute_rows(y_RD, inverse_R, order_R).view(num_tokens, top_k, -1)
    return torch.bmm(gates_SK.to(y_SKD.dtype).unsqueeze(1), y_SKD).squeeze(1)


def init_experts_(w_EIO: Tensor, b_EO: Tensor | None, init: str) -> None:
    """Initialise stacked expert weights w [E, in, out] and biases b [E, out] in place (EXPERT_INITS).

    `timm`: trunc_normal(std 0.02) weights, zero biases (timm's ViT Linear init; the project's original).
    `modsquad`: U(+-1/in) weights and U(+-1/sqrt(out)) biases (Mod-Squad's `ParallelExperts.reset_parameters`: the
    bias bound comes from the fan-in of w[0] [in, out], which torch takes as out; `self.apply(_init_weights)` leaves
    these non-Linear parameters alone).
    `m3vit`: kaiming_uniform(a=sqrt 5) of FastMoE's [E, out, in] weight, i.e. U(+-1/sqrt(in*out)), zero biases.
    """
    _check_choice("init", init, EXPERT_INITS)
    fan_in, fan_out = w_EIO.shape[1], w_EIO.shape[2]
    if init == "timm":
        nn.init.trunc_normal_(w_EIO, std=0.02)
    elif init == "modsquad":
        nn.init.uniform_(w_EIO, -1.0 / fan_in, 1.0 / fan_in)
    else:
        bound = (fan_in * fan_out) ** -0.5
        nn.init.uniform_(w_EIO, -bound, bound)
    if b_EO is not None:
        if init == "modsquad":
            nn.init.uniform_(b_EO, -fan_out**-0.5, fan_out**-0.5)
        else:
            nn.init.zeros_(b_EO)


class GroupedExperts(nn.Module):
    """E_local two-layer MLP experts with stacked weights w1 [E, D, H], b1 [E, H], w2 [E, H, D], b2 [E, D]."""

    def __init__(self, *, num_experts: int, dim: int, hidden_dim: int, act_layer: Callable[[], nn.Module],
                 bias: bool, init: str = "timm") -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, dim)) if bias else None
        self.act = act_layer()
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "timm") -> None:
        """`init_experts_` on both layers (timm: w1, w2 drawn first, then the biases, as before)."""
        if init == "timm":  # the original draw order, kept so existing seeds give the same weights
            for w in (self.w1, self.w2):
                nn.init.trunc_normal_(w, std=0.02)
            for b in (self.b1, self.b2):
                if b is not None:
                    nn.init.zeros_(b)
            return
        init_experts_(self.w1, self.b1, init)
        init_experts_(self.w2, self.b2, init)

    def forward(self, x_RD: Tensor, counts: list[int]) -> Tensor:
        """x_RD [R, D] rows grouped by local expert, counts[e] rows each -> [R, D]."""
        # the experts' GEMMs write into `out=` buffers, which autocast never casts: under CUDA autocast (the bf16
        # detector path) LayerNorm hands fp32 activations to bf16 weights, so match the weights' dtype here
        x_RD = x_RD.to(self.w1.dtype)
        h_RH = self.act(GroupedLinear.apply(x_RD, counts, self.w1, self.b1))
        return GroupedLinear.apply(h_RH, counts, self.w2, self.b2)


class MoEMlp(TaskRoutedLayer):
    """Task-routed MoE MLP: each token uses top-k of E experts (Linear D->H, act, Linear H->D), chosen by its task.

    forward(x_BND [B, N, D], task_B [B] long) -> y_BND [B, N, D]; tokens of sample b use router task_B[b].
    Expert parameters live in `self.experts` (local experts only when ep_size > 1: local i = global
    ep_rank * E_local + i); `self.comm` (an ExpertComm) must be injected when ep_size > 1. `init` is the expert
    init (EXPERT_INITS, `init_experts_`); `prob_eps`, `usage_in_eval`: see `TaskRoutedLayer`.
    """

    def __init__(self, *, dim: int, hidden_dim: int, num_experts: int, top_k: int, num_tasks: int,
                 gate: str = "raw", noisy: bool = False, router_init: str = "zero",
                 act_layer: Callable[[], nn.Module] = nn.GELU, bias: bool = True, ep_size: int = 1,
                 ep_rank: int = 0, usage_momentum: float = 0.95, mi_ema: float = 0.0,
                 mi_task_weighting: str = "uniform", init: str = "timm", prob_eps: float = 0.0,
                 usage_in_eval: bool = False) -> None:
        super().__init__(dim=dim, num_experts=num_experts, top_k=top_k, num_tasks=num_tasks, gate=gate, noisy=noisy,
                         router_init=router_init, usage_momentum=usage_momentum, mi_ema=mi_ema,
                         mi_task_weighting=mi_task_weighting, prob_eps=prob_eps, usage_in_eval=usage_in_eval)
        if ep_size < 1 or num_experts % ep_size or not 0 <= ep_rank < ep_size:
            raise ValueError(f"num_experts={num_experts}, ep_size={ep_size}, ep_rank={ep_rank}: need ep_size to divide "
                             "num_experts and 0 <= ep_rank < ep_size")
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.num_local_experts = num_experts // ep_size
        self.experts = GroupedExperts(num_experts=self.num_local_experts, dim=dim, hidden_dim=hidden_dim,
                                      act_layer=act_layer, bias=bias, init=init)
        self.comm = None  # ExpertComm, injected by the engine when ep_size > 1

    def forward(self, x_BND: Tensor, task_B: Tensor) -> Tensor:
        single_task = self._check_inputs(x_BND, task_B)
        batch, tokens, dim = x_BND.shape
        routing = self.route(x_BND, task_B, single_task)
        counts_E = self.record_statistics(routing, task_B)
        x_SD = x_BND.reshape(batch * tokens, dim)
        order_R, inverse_R = sort_routes(routing.idx_SK)
        x_RD = x_SD.index_select(0, order_R // self.top_k)
        if self.ep_size == 1:
            y_RD = self.local_experts(x_RD, counts_E.tolist())
        else:
            y_RD = self._experts_parallel(x_RD, counts_E)
        y_SD = combine_slots(y_RD, inverse_R, order_R, routing.gates_SK)
        return y_SD.view(batch, tokens, dim)

    def local_experts(self, x_RD: Tensor, counts: list[int]) -> Tensor:
        """x_RD [R, D] rows grouped by expert, counts[e] rows each, through this process's experts -> [R, D] (a
        layer grown by new experts keeps them apart from the frozen ones: `models.grow_layers`)."""
        return self.experts(x_RD, counts)

    def _experts_parallel(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """Send rows (sorted by global expert) to the ranks holding their experts, run, and bring results back."""
        if self.comm is None:
            raise RuntimeError(f"MoEMlp has ep_size={self.ep_size} but no comm was injected (set layer.comm)")
        if self.comm.world_size != self.ep_size:
            raise RuntimeError(f"MoEMlp ep_size={self.ep_size} but comm group has {self.comm.world_size} ranks")
        e_local = self.num_local_experts
        send_splits = counts_E.view(self.ep_size, e_local).sum(dim=1).tolist()
        recv_counts_PE = self.comm.exchange_counts(counts_E)  # [source rank, local expert]
        recv_splits = recv_counts_PE.sum(dim=1).tolist()
        x_recv_RD = self.comm.all_to_all(x_RD, send_splits, recv_splits)
        # received rows are grouped by source rank, then expert: regroup by expert for contiguous GEMMs
        expert_of_row = torch.arange(e_local, device=x_RD.device).repeat(self.ep_size)
        expert_of_row = expert_of_row.repeat_interleave(recv_counts_PE.reshape(-1))
        by_expert_R = torch.argsort(expert_of_row, stable=True)
        back_R = torch.empty_like(by_expert_R)
        back_R[by_expert_R] = torch.arange(by_expert_R.numel(), device=x_RD.device)
        y_local_RD = self.experts(permute_rows(x_recv_RD, by_expert_R, back_R), recv_counts_PE.sum(dim=0).tolist())
        return self.comm.all_to_all(permute_rows(y_local_RD, back_R, by_expert_R), recv_splits, send_splits)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, num_tasks={self.num_tasks}, gate={self.gate}, "
                f"noisy={self.noisy}, ep_size={self.ep_size}, ep_rank={self.ep_rank}")
