"""Per-task routers and the routing/statistics machinery shared by every task-routed MoE layer.

`TaskRoutedLayer` routes (softmax top-k per task), records the task x expert statistics and turns them into the
auxiliary losses (`moe_losses`). `MoEMlp` (moe.py) and `MoEAttention` (moe_attention.py) subclass it; the
DeepSpeed backend holds one as its `routing` child. MOE.md has the statistics life cycle.
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
from pretrain.models.sample_random import randn_like, softplus

logger = logging.getLogger(__name__)

GATES = ("raw", "renorm")
ROUTER_INITS = ("zero", "normal", "trunc_normal", "uniform")
MI_TASK_WEIGHTINGS = ("uniform", "tokens")
_NOISE_EPS = 1e-2  # Mod-Squad adds it to softplus(noise logits)
_MAX_PENDING_FORWARDS = 256  # far above the T forwards of one micro-batch; bounds the graph kept alive


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
        # keyed forwards: a std that does not depend on the local batch size (sample_random.softplus)
        return logits_BNE, softplus(self._logits(self.noise_weight, x_BND, task_B, single_task)) + _NOISE_EPS

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

    # Sums and EMAs that extraction's keep rules read. In bf16 (8 bits of mantissa) every EMA step is rounded:
    # values lie 4 apart near 1000, so a step under 2 is lost. Like batch norm's statistics under mixed
    # precision they stay fp32 whatever the layer is cast to (DeepSpeed's bf16 engine,
    # `pretrain export --dtype bf16`, a bf16 model file's loader). Device moves apply as usual.
    FP32_STATS = ("usage_TE", "mi_probs_TE", "mi_counts_TE")

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        before = {name: self._buffers[name] for name in self.FP32_STATS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:  # a cast: keep the fp32 values, take the new device
                self._buffers[name] = old.to(device=new.device)
        return self

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
        return self.route_logits(clean_BNE, noise_std_BNE)

    def route_logits(self, clean_BNE: Tensor, noise_std_BNE: Tensor | None) -> Routing:
        """`route` from router logits [B, N, E'] (and noise std, or None) over the E' experts they cover (E' = E
        but for a task that sees only the first E' experts: `models.grow_layers`); `Routing` over E'."""
        num_experts = clean_BNE.shape[-1]
        clean_SE = clean_BNE.reshape(-1, num_experts).float()
        logits_SE = clean_SE
        use_noise = noise_std_BNE is not None and self.training
        if use_noise:
            noise_std_SE = noise_std_BNE.reshape_as(clean_SE).float()
            # torch's RNG, or per-sample keyed normals inside a keyed forward (sample_random.py)
            logits_SE = clean_SE + randn_like(clean_SE, batch=clean_BNE.shape[0]) * noise_std_SE
        probs_SE = logits_SE.softmax(dim=-1)
        if self.prob_eps:
            probs_SE = probs_SE + self.prob_eps
        gates_SK, idx_SK = probs_SE.topk(self.top_k, dim=-1)
        if self.gate == "renorm":
            gates_SK = gates_SK / gates_SK.sum(dim=-1, keepdim=True)
        if use_noise and self.top_k < num_experts:
            load_E = moe_losses.prob_in_top_k(clean_SE, logits_SE, noise_std_SE, self.top_k).sum(dim=0)
        else:
            load_E = torch.bincount(idx_SK.reshape(-1), minlength=num_experts).float()
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
