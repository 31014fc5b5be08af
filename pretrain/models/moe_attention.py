"""Mod-Squad mixture of attention heads (`MoETaskAttention`): task-routed head experts with one shared K/V head.

Each of E head experts owns a query projection D -> head_dim and an output projection head_dim -> D (no bias);
a token selects top-k heads with its task's router. Keys and values come from one shared head (`kv_proj`,
D -> 2*head_dim), so attention is multi-query: the S*K routed query slots of an image attend to the same N keys.
Efficient form: sort-dispatch the token-slots to the query experts (one GEMM per expert), run ONE scaled-dot-product
attention per image with queries [B, 1, N*K, hd] against K, V [B, 1, N, hd], dispatch the per-slot outputs through
the selected experts' output projections, scale by the gates and sum over k.

Head experts are replicated on every rank (never expert-parallel); their parameters live under `heads`, not under a
child named `experts`, so the engine never treats them as expert-parallel parameters.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.moe import (
    GroupedLinear,
    TaskRoutedLayer,
    combine_slots,
    init_experts_,
    permute_rows,
    sort_routes,
)
from pretrain.models.sample_random import KeyedDropout, keyed_dropout_allowed

logger = logging.getLogger(__name__)


class HeadExperts(nn.Module):
    """Stacked head-expert projections: `q_weight` [E, D, hd] (query) and `o_weight` [E, hd, D] (output), no bias.

    Same layout as Mod-Squad's `q_proj.experts.w` and `q_proj.output_experts.w`.
    """

    def __init__(self, *, num_experts: int, dim: int, head_dim: int, init: str = "timm") -> None:
        super().__init__()
        self.q_weight = nn.Parameter(torch.empty(num_experts, dim, head_dim))
        self.o_weight = nn.Parameter(torch.empty(num_experts, head_dim, dim))
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "timm") -> None:
        """`init_experts_` (timm: trunc_normal std 0.02; modsquad: U(+-1/in); m3vit: U(+-1/sqrt(in*out)))."""
        init_experts_(self.q_weight, None, init)
        init_experts_(self.o_weight, None, init)


class MoEAttention(TaskRoutedLayer):
    """Task-routed mixture of attention heads with a shared K/V head (multi-query attention).

    forward(x_BND [B, N, D], task_B [B] long) -> y_BND [B, N, D]. `init`: head-expert init (EXPERT_INITS);
    `prob_eps`, `usage_in_eval`: see `TaskRoutedLayer`.
    """

    def __init__(self, *, dim: int, num_experts: int, top_k: int, head_dim: int, num_tasks: int,
                 gate: str = "raw", noisy: bool = False, router_init: str = "zero", qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, usage_momentum: float = 0.95,
                 mi_ema: float = 0.0, mi_task_weighting: str = "uniform", init: str = "timm",
                 prob_eps: float = 0.0, usage_in_eval: bool = False) -> None:
        super().__init__(dim=dim, num_experts=num_experts, top_k=top_k, num_tasks=num_tasks, gate=gate, noisy=noisy,
                         router_init=router_init, usage_momentum=usage_momentum, mi_ema=mi_ema,
                         mi_task_weighting=mi_task_weighting, prob_eps=prob_eps, usage_in_eval=usage_in_eval)
        if head_dim < 1:
            raise ValueError(f"head_dim={head_dim} must be >= 1")
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.heads = HeadExperts(num_experts=num_experts, dim=dim, head_dim=head_dim, init=init)
        # qkv_bias applies to the shared K/V projection: Mod-Squad's kv_proj always has a bias (hence the default),
        # its head experts have none
        self.kv_proj = nn.Linear(dim, 2 * head_dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj_drop = KeyedDropout(proj_drop)  # keyed per sample inside a keyed forward

    def forward(self, x_BND: Tensor, task_B: Tensor) -> Tensor:
        single_task = self._check_inputs(x_BND, task_B)
        if self.training:
            keyed_dropout_allowed(self.attn_drop)
        batch, tokens, dim = x_BND.shape
        routing = self.route(x_BND, task_B, single_task)
        counts = self.record_statistics(routing, task_B).tolist()
        order_R, inverse_R = sort_routes(routing.idx_SK)
        x_RD = x_BND.reshape(batch * tokens, dim).index_select(0, order_R // self.top_k)
        x_RD = x_RD.to(self.heads.q_weight.dtype)  # `out=` GEMMs are never autocast (see GroupedExperts.forward)
        q_RH = self.head_linear(x_RD, counts, "q_weight")
        # slots back in token order: queries of image b are its N*K (token, head) slots
        q_B1QH = permute_rows(q_RH, inverse_R, order_R).view(batch, 1, tokens * self.top_k, self.head_dim)
        k_BNH, v_BNH = self.kv_proj(x_BND).chunk(2, dim=-1)
        o_B1QH = F.scaled_dot_product_attention(
            q_B1QH, k_BNH.unsqueeze(1), v_BNH.unsqueeze(1),
            dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
        o_RH = permute_rows(o_B1QH.reshape(-1, self.head_dim), order_R, inverse_R).to(self.heads.o_weight.dtype)
        y_RD = self.head_linear(o_RH, counts, "o_weight")
        y_SD = combine_slots(y_RD, inverse_R, order_R, routing.gates_SK)
        return self.proj_drop(y_SD.view(batch, tokens, dim))

    def head_linear(self, x_RI: Tensor, counts: list[int], name: str) -> Tensor:
        """Rows x_RI [R, I] grouped by head expert (counts[e] each) through projection `name` (`q_weight` |
        `o_weight`) of their experts -> [R, O] (a layer grown by new heads keeps them apart: `models.grow_layers`)."""
        return GroupedLinear.apply(x_RI, counts, getattr(self.heads, name), None)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, head_dim={self.head_dim}, "
                f"num_tasks={self.num_tasks}, gate={self.gate}, noisy={self.noisy}")
