"""`moe.backend: deepspeed`: the task-routed MoE MLP on DeepSpeed's `MoE` layer (capacity-based dispatch).

The second and last module that imports DeepSpeed (`engine.py` is the first). DeepSpeed finds MoE layers with
`isinstance(m, deepspeed.moe.layer.MoE)` and checkpoints their experts by the key prefix
`.deepspeed_moe.experts.deepspeed_experts.`, so this layer subclasses `MoE` and keeps its structure.

Routing is NOT DeepSpeed's: a `TaskRoutedLayer` child (`routing`: per-task router [T, E, D], gate mode, noisy
gating, usage/MI statistics and auxiliary losses, exactly as the native `MoEMlp`) routes every token; `TaskGate`
(a `TopKGate`) hands those logits to DeepSpeed's `top1gating/top2gating/topkgating` with `sparse_routes=True`
(the 7-value contract of DeepSpeed 0.19.8) for capacity and dropping, then replaces the gate values with ours
(`raw` or `renorm` probabilities). So the two backends differ only in dispatch: with a capacity no token exceeds,
the outputs equal the native layer's (tests/test_engine.py checks it). Dropped routes contribute zero (the token
passes through the residual); `TaskGate.drop_fraction` reports their share.

Initialisation draws the weights of all E experts in the native layer's order and keeps this rank's slice, so a
model built with any `ep_size` (and the native backend) starts from identical weights for the same seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate, top1gating, top2gating, topkgating
from torch import Tensor, nn

from pretrain.models.moe import Routing, TaskRoutedLayer

logger = logging.getLogger(__name__)


class TaskGate(TopKGate):
    """DeepSpeed gate that takes the layer's task routing (set in `pending` before each call) instead of `wg`."""

    def __init__(self, *, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int,
                 renorm: bool) -> None:
        with torch.random.fork_rng(devices=[]):  # the unused parent Linear must not shift the RNG stream
            super().__init__(1, num_experts, top_k, capacity_factor, capacity_factor, min_capacity,
                             noisy_gate_policy=None, drop_tokens=capacity_factor > 0, use_rts=True,
                             top2_2nd_expert_sampling=False)
        del self.wg  # routing weights live in the layer's per-task router
        self.renorm = renorm
        self.pending: Routing | None = None
        self.drop_fraction: Tensor | None = None  # share of routes dropped by the capacity in the last forward

    def forward(self, input: Tensor, used_token: Tensor | None = None, sparse_routes: bool = False,
                use_tutel: bool = False):
        """input [S, D] (unused: the routing was computed from it already) → DeepSpeed's 7-value sparse contract
        (l_aux, capacity, E, indices_KS, locations_KS, gates_KS, exp_counts_E); dropped routes have index -1."""
        routing, self.pending = self.pending, None
        if routing is None:
            raise RuntimeError("TaskGate has no routing: call DeepSpeedMoEMlp.forward(x_BND, task_B), not MoE.forward")
        if not sparse_routes:
            raise ValueError("TaskGate supports only sparse_routes=True (DeepSpeed 0.19.8's MOELayer passes it)")
        # DeepSpeed decides capacity and drops from the logits; its own gate values are replaced below
        logits_SE = routing.logits_SE.detach().clone()
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            out = top1gating(logits_SE, capacity_factor, self.min_capacity, used_token, None, self.drop_tokens,
                             self.use_rts, self.ep_group, True, use_tutel)
        elif self.k == 2:
            out = top2gating(logits_SE, capacity_factor, self.min_capacity, self.drop_tokens, self.ep_group, False,
                             True)
        else:
            out = topkgating(logits_SE, self.k, capacity_factor, self.min_capacity, self.drop_tokens, self.ep_group,
                             sparse_routes=True)
        l_aux, capacity, num_experts, idx_KS, locations_KS, _, exp_counts = out
        self.drop_fraction = (idx_KS < 0).float().mean().detach()
        return l_aux, capacity, num_experts, idx_KS, locations_KS, self._gates(routing.probs_SE, idx_KS), exp_counts

    def _gates(self, probs_SE: Tensor, idx_KS: Tensor) -> Tensor:
        """gate[k, s] = p[s, idx[k, s]] (raw) or that / sum of the token's top-k probabilities (renorm); [K, S]."""
        kept_KS = idx_KS >= 0
        gates_KS = probs_SE.t().gather(0, idx_KS.long().clamp(min=0)) * kept_KS
        if self.renorm:
            gates_KS = gates_KS / probs_SE.topk(self.k, dim=-1).values.sum(dim=-1)
        return gates_KS


class DeepSpeedMoEMlp(MoE):
    """Task-routed MoE MLP with DeepSpeed's capacity-based dispatch; the native `MoEMlp` factory contract.

    forward(x_BND [B, N, D], task_B [B] long) -> y_BND [B, N, D]. Expert i of this rank is global expert
    `ep_rank * E_local + i`, each `Linear(D, H) → act → Linear(H, D)`. Statistics (`aux`, `usage_TE`,
    `last_counts_TE`, `stats_reducer`) live on the `routing` child, where `moe_modules` finds them; DeepSpeed's own
    switch loss of the last forward is `l_aux`, its demand per expert `exp_counts`.

    Args:
        capacity_factor: DeepSpeed's capacity factor (train and eval); <= 0 = dropless (capacity = max demand).
        min_capacity: DeepSpeed's lower bound on the capacity.
        Others: as `MoEMlp` (`mi_task_weighting` included).
    """

    def __init__(self, *, dim: int, hidden_dim: int, num_experts: int, top_k: int, num_tasks: int,
                 gate: str = "raw", noisy: bool = False, router_init: str = "zero",
                 act_layer: Callable[[], nn.Module] = nn.GELU, bias: bool = True, ep_size: int = 1,
                 ep_rank: int = 0, usage_momentum: float = 0.95, mi_ema: float = 0.0,
                 mi_task_weighting: str = "uniform", capacity_factor: float = 1.25, min_capacity: int = 4) -> None:
        if ep_size < 1 or num_experts % ep_size or not 0 <= ep_rank < ep_size:
            raise ValueError(f"num_experts={num_experts}, ep_size={ep_size}, ep_rank={ep_rank}: need ep_size to divide "
                             "num_experts and 0 <= ep_rank < ep_size")
        with torch.random.fork_rng(devices=[]):  # the template expert's init is overwritten below
            template = nn.Sequential(nn.Linear(dim, hidden_dim, bias=bias), act_layer(),
                                     nn.Linear(hidden_dim, dim, bias=bias))
            super().__init__(dim, template, num_experts=num_experts, ep_size=ep_size, k=top_k,
                             capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                             min_capacity=min_capacity, drop_tokens=capacity_factor > 0)
        self.ep_rank = ep_rank
        self.top_k = top_k
        self.routing = TaskRoutedLayer(dim=dim, num_experts=num_experts, top_k=top_k, num_tasks=num_tasks, gate=gate,
                                       noisy=noisy, router_init=router_init, usage_momentum=usage_momentum,
                                       mi_ema=mi_ema, mi_task_weighting=mi_task_weighting)
        self.deepspeed_moe.gate = TaskGate(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                                           min_capacity=min_capacity, renorm=gate == "renorm")
        self._init_experts(dim, hidden_dim)
        self.l_aux: Tensor | None = None
        self.exp_counts: Tensor | None = None

    def _init_experts(self, dim: int, hidden_dim: int) -> None:
        """Draw w1 [E, D, H] then w2 [E, H, D] (trunc-normal 0.02, zero biases) like the native `GroupedExperts`,
        and keep this rank's experts."""
        w1_EDH = nn.init.trunc_normal_(torch.empty(self.num_experts, dim, hidden_dim), std=0.02)
        w2_EHD = nn.init.trunc_normal_(torch.empty(self.num_experts, hidden_dim, dim), std=0.02)
        first = self.ep_rank * self.num_local_experts
        with torch.no_grad():
            for i, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
                fc1, fc2 = expert[0], expert[2]
                fc1.weight.copy_(w1_EDH[first + i].t())
                fc2.weight.copy_(w2_EHD[first + i].t())
                for linear in (fc1, fc2):
                    if linear.bias is not None:
                        linear.bias.zero_()

    @property
    def gate(self) -> TaskGate:
        return self.deepspeed_moe.gate

    def forward(self, x_BND: Tensor, task_B: Tensor) -> Tensor:  # type: ignore[override]
        """x_BND [B, N, D], task_B [B] long → y_BND [B, N, D] (dropped routes contribute zero)."""
        routing = self.routing.route(x_BND, task_B)
        self.routing.record_statistics(routing, task_B)
        self.gate.pending = routing
        y_BND, self.l_aux, self.exp_counts = super().forward(x_BND)
        return y_BND

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"capacity_factor={self.gate.capacity_factor}")
