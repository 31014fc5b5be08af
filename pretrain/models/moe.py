"""Task-routed mixture-of-experts MLP (Mod-Squad / M3ViT) with dropless sort dispatch and grouped experts.

Routing: per-task router -> softmax -> top-k -> stable argsort of the S*K token-slots by expert -> index_select
rows -> each expert runs on its contiguous slice (one GEMM per expert per layer) -> results go back to token order
and are combined with the gates in one batched matmul. No capacity, no padding, no one-hot [S, E, C] tensor: no
token is ever dropped. With expert parallelism the sorted rows travel to the rank holding their expert through
an injected `comm` (see pretrain/expert_parallel.py); this module never imports torch.distributed. MOE.md has the
design notes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from pretrain.models import moe_losses

logger = logging.getLogger(__name__)

GATES = ("raw", "renorm")
ROUTER_INITS = ("zero", "normal", "trunc_normal", "uniform")
EXPERT_INITS = ("timm", "modsquad", "m3vit")
MI_TASK_WEIGHTINGS = ("uniform", "tokens")
_NOISE_EPS = 1e-2  # Mod-Squad adds it to softplus(noise logits)
_MAX_PENDING_FORWARDS = 256  # far above the T forwards of one micro-batch; bounds the graph kept alive


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
        h_RH = self.act(GroupedLinear.apply(x_RD, counts, self.w1, self.b1))
        return GroupedLinear.apply(h_RH, counts, self.w2, self.b2)


class TaskRouter(nn.Module):
    """One linear router per task: `weight` [T, E, D] (and `noise_weight` [T, E, D] for noisy gating).

    init (ROUTER_INITS): `zero`; `normal` (std 0.02); `trunc_normal` (timm's trunc_normal_ std 0.02 on the clean
    and the noise rows: Mod-Squad's effective init, its zero init being overwritten by `self.apply(_init_weights)`);
    `uniform` (U(+-1/sqrt(E)): M3ViT's kaiming_uniform(a=sqrt 5) of its [D, E] gate).
    """

    def __init__(self, *, dim: int, num_experts: int, num_tasks: int, noisy: bool, init: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_tasks, num_experts, dim))
        self.noise_weight = nn.Parameter(torch.zeros(num_tasks, num_experts, dim)) if noisy else None
        if init == "normal":
            nn.init.normal_(self.weight, std=0.02)
        elif init == "trunc_normal":
            for w in (self.weight, self.noise_weight):
                if w is not None:
                    trunc_normal_(w, std=0.02)
        elif init == "uniform":
            bound = num_experts**-0.5
            nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x_BND: Tensor, task_B: Tensor, single_task: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Clean logits [B, N, E] of each sample's task router, and softplus noise std [B, N, E] (None if not noisy).

        `single_task` (all of task_B equal to it) selects one plain GEMM instead of B small batched ones.
        """
        logits_BNE = self._logits(self.weight, x_BND, task_B, single_task)
        if self.noise_weight is None:
            return logits_BNE, None
        return logits_BNE, F.softplus(self._logits(self.noise_weight, x_BND, task_B, single_task)) + _NOISE_EPS

    @staticmethod
    def _logits(weight_TED: Tensor, x_BND: Tensor, task_B: Tensor, single_task: int | None) -> Tensor:
        if single_task is not None:
            return F.linear(x_BND, weight_TED[single_task])
        return torch.bmm(x_BND, weight_TED[task_B].transpose(1, 2))


@dataclass
class Routing:
    """Result of routing S = B*N tokens (float32 router math)."""

    logits_SE: Tensor  # logits the softmax saw (noisy in training when noisy gating is on)
    probs_SE: Tensor
    gates_SK: Tensor
    idx_SK: Tensor
    load_E: Tensor  # differentiable noisy load when noisy and training, else routed counts (for the CV loss)


class TaskRoutedLayer(nn.Module):
    """Shared routing, statistics and auxiliary-loss machinery of MoEMlp and MoEAttention.

    Statistics life cycle (MOE.md, "Statistics and the MI loss"): every training forward ADDS its statistics to
    the layer's pending sums; `moe_losses.collect_aux_losses(model)` computes each layer's losses once over
    everything pending (plus the detached earlier micro-batches of the optimizer step and the MI EMA), then clears;
    `moe_losses.pop_routing_counts(model)` hands out and clears the selection counts. Eval forwards add nothing.
    `aux` (the losses of the last forward alone) and `last_counts_TE` remain for inspection and tests.
    """

    def __init__(self, *, dim: int, num_experts: int, top_k: int, num_tasks: int, gate: str, noisy: bool,
                 router_init: str, usage_momentum: float, mi_ema: float, mi_task_weighting: str,
                 prob_eps: float = 0.0, usage_in_eval: bool = False) -> None:
        super().__init__()
        _check_choice("gate", gate, GATES)
        _check_choice("router_init", router_init, ROUTER_INITS)
        _check_choice("mi_task_weighting", mi_task_weighting, MI_TASK_WEIGHTINGS)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if num_tasks < 1:
            raise ValueError(f"num_tasks={num_tasks} must be >= 1")
        if not 0.0 <= mi_ema < 1.0 or not 0.0 <= usage_momentum < 1.0:
            raise ValueError(f"mi_ema={mi_ema} and usage_momentum={usage_momentum} must be in [0, 1)")
        if not prob_eps >= 0.0:
            raise ValueError(f"prob_eps={prob_eps} must be >= 0")
        self.num_experts, self.top_k, self.num_tasks = num_experts, top_k, num_tasks
        self.gate, self.noisy, self.usage_momentum = gate, noisy, usage_momentum
        self.mi_ema, self.mi_task_weighting = mi_ema, mi_task_weighting
        self.prob_eps, self.usage_in_eval = prob_eps, usage_in_eval
        self.router = TaskRouter(dim=dim, num_experts=num_experts, num_tasks=num_tasks, noisy=noisy, init=router_init)
        self.register_buffer("usage_TE", torch.zeros(num_tasks, num_experts))
        # decaying sums of the GLOBAL MI statistics of past optimizer steps (used when mi_ema > 0)
        self.register_buffer("mi_probs_TE", torch.zeros(num_tasks, num_experts))
        self.register_buffer("mi_counts_TE", torch.zeros(num_tasks, num_experts))
        self.stats_reducer: Callable[[Tensor], Tensor] | None = None
        self.last_counts_TE: Tensor | None = None
        self._last: moe_losses.RoutingStats | None = None  # the last forward's statistics (for `aux`)
        self._pending: moe_losses.RoutingStats | None = None  # training forwards since the last collect
        self._pending_forwards = 0
        self._step_TE: tuple[Tensor, Tensor] | None = None  # detached (probs, counts) of earlier micro-batches
        self._routed_TE: Tensor | None = None  # selection counts since the last pop_routing_counts

    def _check_inputs(self, x_BND: Tensor, task_B: Tensor) -> int | None:
        """Validate x_BND [B, N, D] and task_B [B]; return the task id when all samples share one, else None."""
        if x_BND.dim() != 3:
            raise ValueError(f"{type(self).__name__}: x must be [B, N, D], got shape {tuple(x_BND.shape)}")
        if task_B.shape != (x_BND.shape[0],) or task_B.dtype != torch.long:
            raise ValueError(f"{type(self).__name__}: task ids must be a LongTensor of shape [B={x_BND.shape[0]}], "
                             f"got {task_B.dtype} {tuple(task_B.shape)}")
        if task_B.numel() == 0:
            raise ValueError(f"{type(self).__name__}: empty batch")
        low, high = torch.aminmax(task_B)
        low, high = int(low), int(high)
        if low < 0 or high >= self.num_tasks:
            raise ValueError(f"{type(self).__name__}: task ids {task_B.unique().tolist()} outside "
                             f"[0, num_tasks={self.num_tasks})")
        return low if low == high else None

    def route(self, x_BND: Tensor, task_B: Tensor, single_task: int | None = None) -> Routing:
        """Per-task softmax top-k routing of every token of x_BND [B, N, D]; see `Routing`.

        `prob_eps` > 0 adds that constant to every probability after the softmax (Mod-Squad: 1e-4); it then enters
        the gates (so the expert outputs), the top-k tie-breaking and every statistic.
        """
        clean_BNE, noise_std_BNE = self.router(x_BND, task_B, single_task)
        clean_SE = clean_BNE.reshape(-1, self.num_experts).float()
        logits_SE = clean_SE
        use_noise = noise_std_BNE is not None and self.training
        if use_noise:
            noise_std_SE = noise_std_BNE.reshape_as(clean_SE).float()
            logits_SE = clean_SE + torch.randn_like(clean_SE) * noise_std_SE
        probs_SE = logits_SE.softmax(dim=-1)
        if self.prob_eps:
            probs_SE = probs_SE + self.prob_eps
        gates_SK, idx_SK = probs_SE.topk(self.top_k, dim=-1)
        if self.gate == "renorm":
            gates_SK = gates_SK / gates_SK.sum(dim=-1, keepdim=True)
        if use_noise and self.top_k < self.num_experts:
            load_E = moe_losses.prob_in_top_k(clean_SE, logits_SE, noise_std_SE, self.top_k).sum(dim=0)
        else:
            load_E = torch.bincount(idx_SK.reshape(-1), minlength=self.num_experts).float()
        return Routing(logits_SE, probs_SE, gates_SK, idx_SK, load_E)

    def record_statistics(self, routing: Routing, task_B: Tensor) -> Tensor:
        """Record this forward's statistics (added to the pending sums in training); return counts_E [E] (local).

        Calls `stats_reducer` once when set (collective: every rank must run the same MoE layers in order).
        """
        num_e, num_t = self.num_experts, self.num_tasks
        num_tokens = routing.idx_SK.shape[0]
        tokens_per_sample = num_tokens // max(task_B.numel(), 1)
        task_S = task_B.repeat_interleave(tokens_per_sample)
        slot_ids = (task_S[:, None] * num_e + routing.idx_SK).reshape(-1)
        counts_TE = torch.bincount(slot_ids, minlength=num_t * num_e).view(num_t, num_e)
        counts_E = counts_TE.sum(dim=0)
        probs_TE = routing.probs_SE.new_zeros(num_t, num_e).index_add(
            0, task_B, routing.probs_SE.view(-1, tokens_per_sample, num_e).sum(dim=1))
        counts_TE = counts_TE.float()
        if self.stats_reducer is not None:
            probs_TE, counts_TE = moe_losses.reduce_statistics(probs_TE, counts_TE, self.stats_reducer)
        self.last_counts_TE = counts_TE.detach()  # this forward's (global when reduced) selection counts
        importance_E = routing.gates_SK.new_zeros(num_e).index_add(
            0, routing.idx_SK.reshape(-1), routing.gates_SK.reshape(-1))
        self._last = moe_losses.RoutingStats(
            probs_TE=probs_TE, counts_TE=counts_TE, importance_E=importance_E, load_E=routing.load_E,
            probs_E=routing.probs_SE.sum(dim=0), counts_E=counts_E.float(),
            lse_sq=torch.logsumexp(routing.logits_SE, dim=-1).pow(2).sum(), tokens=num_tokens)
        if self.training:
            self._accumulate(self._last)
        if self.training or self.usage_in_eval:
            with torch.no_grad():
                moe_losses.update_usage_(self.usage_TE, self.last_counts_TE, self.usage_momentum)
        return counts_E

    def _accumulate(self, stats: moe_losses.RoutingStats) -> None:
        self._pending = stats if self._pending is None else self._pending + stats
        self._routed_TE = stats.counts_TE.detach() + (0 if self._routed_TE is None else self._routed_TE)
        self._pending_forwards += 1
        if self._pending_forwards > _MAX_PENDING_FORWARDS:  # nobody collects: keep the sums, drop the graph
            if self._pending_forwards == _MAX_PENDING_FORWARDS + 1:
                logger.warning("%s: %d training forwards without collect_aux_losses(model); their statistics are "
                               "kept detached", type(self).__name__, _MAX_PENDING_FORWARDS)
            self._pending = self._pending.detach()

    def _losses(self, stats: moe_losses.RoutingStats, with_step: bool) -> dict[str, Tensor]:
        """Unweighted losses of `stats` (+ the detached earlier micro-batches when `with_step`, + the MI EMA)."""
        probs_TE, counts_TE = stats.probs_TE, stats.counts_TE
        if with_step and self._step_TE is not None:
            probs_TE, counts_TE = probs_TE + self._step_TE[0], counts_TE + self._step_TE[1]
        if self.mi_ema > 0:
            probs_TE = self.mi_ema * self.mi_probs_TE + probs_TE
            counts_TE = self.mi_ema * self.mi_counts_TE + counts_TE
        mi_probs_TE = probs_TE
        if self.mi_task_weighting == "uniform":
            mi_probs_TE = moe_losses.balance_task_mass(probs_TE, counts_TE, self.top_k)
        return {
            "mi": moe_losses.mutual_information_loss(mi_probs_TE, counts_TE.sum(dim=0), self.top_k),
            "cv": moe_losses.cv_loss(stats.importance_E, stats.load_E),
            "switch": moe_losses.switch_loss(stats.probs_E, stats.counts_E),
            "z": stats.lse_sq / stats.tokens,
        }

    @property
    def aux(self) -> dict[str, Tensor]:
        """Unweighted losses of the LAST forward alone (with the MI EMA); {} before any forward.

        For inspection and single-forward uses; training reads `collect_aux_losses(model)`, which sees every
        forward since the previous call.
        """
        return {} if self._last is None else self._losses(self._last, with_step=False)

    def pop_aux_losses(self, end_of_step: bool = True) -> dict[str, Tensor]:
        """Losses over every training forward since the last call (one MI over the summed statistics), then clear.

        The pending statistics join the step's detached history, so later micro-batches of the same optimizer step
        still see them in their MI statistics. `end_of_step` closes the optimizer step: the step's statistics
        enter the MI EMA (skipped when non-finite) and the history is cleared. Returns {} when nothing is pending.
        """
        losses = {} if self._pending is None else self._losses(self._pending, with_step=True)
        if self._pending is not None:
            probs_TE, counts_TE = self._pending.probs_TE.detach(), self._pending.counts_TE
            if self._step_TE is not None:
                probs_TE, counts_TE = self._step_TE[0] + probs_TE, self._step_TE[1] + counts_TE
            self._step_TE = (probs_TE, counts_TE)
        self._pending, self._pending_forwards = None, 0
        if end_of_step and self._step_TE is not None:
            if self.mi_ema > 0:
                with torch.no_grad():
                    for buffer, step in zip((self.mi_probs_TE, self.mi_counts_TE), self._step_TE):
                        blended = self.mi_ema * buffer + step
                        buffer.copy_(torch.where(torch.isfinite(blended).all(), blended, buffer))
            self._step_TE = None
        return losses

    def pop_routing_counts(self) -> Tensor | None:
        """Selection counts [T, E] of the training forwards since the last call (global when reduced); clears."""
        counts_TE, self._routed_TE = self._routed_TE, None
        return counts_TE


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


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
            y_RD = self.experts(x_RD, counts_E.tolist())
        else:
            y_RD = self._experts_parallel(x_RD, counts_E)
        y_SD = combine_slots(y_RD, inverse_R, order_R, routing.gates_SK)
        return y_SD.view(batch, tokens, dim)

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
