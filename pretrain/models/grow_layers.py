"""MoE layers of a model grown by new experts (`pretrain add-task`, `add_task.new_experts=N`): each task's router
sees only the experts that existed when the task was added.

A layer of E + N experts has a per-task limit `task_experts` [T]: task t's router reads the logits of experts
0..task_experts[t]-1 only (the first E for a task trained before the N were added, all E + N for the added task).
For one task per batch (the model's forward always is) a limited task's logits are computed from the first
task_experts[t] rows of its router row, so its softmax, top-k, gates and expert GEMMs are those of the layer it was
trained in, bit for bit; the returned `Routing` is padded back to E + N columns (probability 0, logit -inf) so the
statistics keep their [T, E + N] shape. A batch mixing tasks masks the unseen logits to -inf instead (same routes,
not bit-identical sums).

On disk a grown model is an ordinary model file of E + N experts whose metadata holds the limits
(`task_experts`: {"mlp"|"attn": {task: n}}, tasks not named see every expert); `layer_factories` turns it into the
`moe_*_layer` factories `build_model` takes, so `load_model` builds it with the one constructor. While training,
`grow.GrownMoEMlp` / `GrownMoEAttention` hold the E frozen experts (`experts` / `heads`) apart from the N trained
ones (`new_experts` / `new_heads`), and `split_grouped` runs each group on its own rows.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config.pretraining import ModelConfig, MoEConfig
from pretrain.models import backbone_size
from pretrain.models.moe import MoEMlp, Routing
from pretrain.models.moe_attention import MoEAttention
from pretrain.models.moe_routing import _NOISE_EPS
from pretrain.models.vit import moe_layout

META_KEY = "task_experts"
LAYER_TYPES = ("mlp", "attn")  # the metadata's keys: MoE MLP experts, MoE attention head experts


class LimitedRouting:
    """Mixin for a task-routed layer whose task t routes over its first `task_experts[t]` experts only."""

    def _limit(self, task_experts: Sequence[int]) -> None:
        limits = [int(n) for n in task_experts]
        if len(limits) != self.num_tasks or not all(self.top_k <= n <= self.num_experts for n in limits):
            raise ValueError(f"task_experts={limits}: need {self.num_tasks} counts in [top_k={self.top_k}, "
                             f"num_experts={self.num_experts}]")
        self.task_experts = limits
        self.register_buffer("task_experts_T", torch.tensor(limits), persistent=False)

    def keep_task_rows(self, rows: Sequence[int]) -> None:
        """Row i of the limits becomes old row `rows[i]`'s (the routers' rows are reindexed alike by the caller, and
        `num_tasks` already set to len(rows)): fine-tuning from a grown model keeps each copied row's expert count."""
        self._limit([self.task_experts[r] for r in rows])

    def route(self, x_BND: Tensor, task_B: Tensor, single_task: int | None = None) -> Routing:
        """Routing of x_BND [B, N, D] over each sample's task's experts; `Routing` over all E (module docstring)."""
        if single_task is not None:
            seen = self.task_experts[single_task]
            if seen == self.num_experts:
                return super().route(x_BND, task_B, single_task)
            clean_BNE = F.linear(x_BND, self.router.weight[single_task][:seen])
            noise_BNE = None
            if self.router.noise_weight is not None:
                noise_BNE = F.softplus(F.linear(x_BND, self.router.noise_weight[single_task][:seen])) + _NOISE_EPS
            return self._pad(self.route_logits(clean_BNE, noise_BNE))
        if bool((self.task_experts_T[task_B] == self.num_experts).all()):
            return super().route(x_BND, task_B, single_task)
        clean_BNE, noise_BNE = self.router(x_BND, task_B, single_task)
        unseen_BE = torch.arange(self.num_experts, device=x_BND.device) >= self.task_experts_T[task_B][:, None]
        return self.route_logits(clean_BNE.masked_fill(unseen_BE[:, None, :], float("-inf")), noise_BNE)

    def _pad(self, routing: Routing) -> Routing:
        """`routing` over the first E' experts as one over all E (the others: logit -inf, probability and load 0)."""
        missing = self.num_experts - routing.probs_SE.shape[1]
        logits = routing.logits_SE
        return replace(routing, logits_SE=torch.cat([logits, logits.new_full((logits.shape[0], missing),
                                                                             float("-inf"))], 1),
                       probs_SE=F.pad(routing.probs_SE, (0, missing)), load_E=F.pad(routing.load_E, (0, missing)))


class LimitedMoEMlp(LimitedRouting, MoEMlp):
    """`MoEMlp` whose task t routes over its first `task_experts[t]` experts (module docstring)."""

    def __init__(self, *, task_experts: Sequence[int], **kwargs: Any) -> None:
        MoEMlp.__init__(self, **kwargs)
        self._limit(task_experts)


class LimitedMoEAttention(LimitedRouting, MoEAttention):
    """`MoEAttention` whose task t routes over its first `task_experts[t]` head experts (module docstring)."""

    def __init__(self, *, task_experts: Sequence[int], **kwargs: Any) -> None:
        MoEAttention.__init__(self, **kwargs)
        self._limit(task_experts)


def limits_of(meta: dict[str, Any], order: Sequence[str], moe: MoEConfig) -> dict[str, list[int]]:
    """Per layer type, each task row's expert count (`order`: the model's tasks in row order) from a file's decoded
    metadata; a task the metadata does not name sees every expert."""
    named = meta.get(META_KEY) or {}
    total = {"mlp": moe.num_experts, "attn": moe.attn_num_experts}
    return {kind: [int(named.get(kind, {}).get(t, total[kind])) for t in order] for kind in LAYER_TYPES}


def layer_factories(meta: dict[str, Any], order: Sequence[str], moe: MoEConfig) -> dict[str, Callable[..., nn.Module]]:
    """`build_model`'s `moe_mlp_layer` / `moe_attn_layer` for a file whose metadata limits some tasks' experts;
    {} (the ordinary layers) for every other file."""
    if not meta.get(META_KEY):
        return {}
    limits = limits_of(meta, order, moe)
    return {"moe_mlp_layer": functools.partial(LimitedMoEMlp, task_experts=limits["mlp"]),
            "moe_attn_layer": functools.partial(LimitedMoEAttention, task_experts=limits["attn"])}


def limits_meta(net: nn.Module) -> dict[str, dict[str, int]]:
    """The `task_experts` metadata of a model: per layer type, the tasks that see fewer than all experts ({} when
    every task sees every expert, so a file grown without new experts stays an ordinary one)."""
    out: dict[str, dict[str, int]] = {}
    for kind, cls in (("mlp", MoEMlp), ("attn", MoEAttention)):
        layer = next((m for m in net.modules() if isinstance(m, cls) and isinstance(m, LimitedRouting)), None)
        if layer is None:
            continue
        limited = {t: layer.task_experts[row] for t, row in net.task_ids.items()
                   if layer.task_experts[row] < layer.num_experts}
        if limited:
            out[kind] = limited
    return out


def split_stacked(module: nn.Module, num_old: int) -> nn.Module:
    """Cut `module`'s stacked expert parameters [E, ...] into itself (the first `num_old`, frozen) and a returned copy
    holding the rest (trained)."""
    new = copy.deepcopy(module)
    for name, param in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(param.data[:num_old].clone(), requires_grad=False))
        setattr(new, name, nn.Parameter(param.data[num_old:].clone()))
    return new


def split_grouped(x_RI: Tensor, counts: list[int], num_old: int, old: Callable[[Tensor, list[int]], Tensor],
                  new: Callable[[Tensor, list[int]], Tensor]) -> Tensor:
    """Rows x_RI [R, I] grouped by expert (counts[e] each) through `old` (experts 0..num_old-1) and `new` (the rest):
    the old experts' rows come first, so each runs on its contiguous block; a block of 0 rows is not run, so a
    batch that routes to old experts only computes exactly what the layer computed before it grew."""
    rows = sum(counts[:num_old])
    if rows == x_RI.shape[0]:
        return old(x_RI, counts[:num_old])
    if rows == 0:
        return new(x_RI, counts[num_old:])
    return torch.cat([old(x_RI[:rows], counts[:num_old]), new(x_RI[rows:], counts[num_old:])])


def grown_moe(model: ModelConfig, moe: MoEConfig, new_experts: int) -> MoEConfig:
    """The `moe` section of a model grown by `new_experts` experts in every MoE layer: MoE MLPs and, where the
    placement has them, mixtures of attention heads."""
    layout = moe_layout(moe.placement, backbone_size(model)["depth"])
    has_attn, has_mlp = any(a for a, _ in layout), any(m for _, m in layout)
    return replace(moe, num_experts=moe.num_experts + (new_experts if has_mlp else 0),
                   attn_num_experts=moe.attn_num_experts + (new_experts if has_attn else 0))
