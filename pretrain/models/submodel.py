"""Submodels: keep some tasks' experts of a task-routed MoE ViT (Mod-Squad's pruning) → a smaller standalone model.

Every MoE layer (MoE MLP and mixture of attention heads) keeps a subset of its E experts (global ids, ascending);
its stacked expert tensors and its routers' expert rows are sliced to them, and only the chosen tasks' router rows,
task-embedding rows and heads are kept (task ids become 0..T'-1 in the chosen order). Routing in the submodel:
- default (Mod-Squad's standalone model): a plain layer over the kept experts, so the softmax runs over the kept
  experts' logits only;
- `exact_routing`: the full router rows are kept (`full_routing`, a `TaskRoutedLayer` over all E), the softmax runs
  over all E logits as in the full model, and top-k is restricted to the kept experts. Whenever no token's full top-k
  holds a dropped expert, every output equals the full model's (same rows, same GEMMs, same gate values and order).
A layer keeping exactly k experts is NOT folded into a dense layer: its gates are the tokens' router probabilities
(raw, or renormalised per token), so the output stays a token-dependent mixture that no fixed dense layer computes.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pretrain.config.pretraining import ModelConfig, MoEConfig, TaskConfig
from pretrain.models import backbone_size, build_model
from pretrain.models.moe import MoEMlp, Routing, TaskRoutedLayer
from pretrain.models.moe_attention import MoEAttention
from pretrain.models.multitask import MultiTaskModel
from pretrain.models.vit import moe_layout

logger = logging.getLogger(__name__)

_EXPERT_CHILDREN = ("experts.", "heads.")  # stacked [E, ...] expert tensors of MoEMlp / MoEAttention
_FULL = "full_routing."


class KeptRouting:
    """Mixin for a routed layer that holds the experts `kept` (global ids) of a layer with `num_full_experts`."""

    def _init_kept(self, kept: Sequence[int], num_full_experts: int, exact_routing: bool, kwargs: dict) -> None:
        if sorted(set(kept)) != list(kept) or not kept or kept[-1] >= num_full_experts:
            raise ValueError(f"kept experts {list(kept)} must be distinct ascending ids in [0, {num_full_experts})")
        self.kept = list(kept)
        self.num_full_experts = num_full_experts
        self.full_routing: TaskRoutedLayer | None = None
        if exact_routing:
            del self.router  # the full router rows live in `full_routing`
            params = inspect.signature(TaskRoutedLayer.__init__).parameters
            routing = {name: getattr(self, name) for name in params if hasattr(self, name)}
            routing.update({k: v for k, v in kwargs.items() if k in params})
            routing["num_experts"] = num_full_experts
            routing.pop("self", None)
            self.full_routing = TaskRoutedLayer(**routing)
        local_of_global_E = torch.full((num_full_experts,), -1, dtype=torch.long)
        local_of_global_E[torch.tensor(self.kept)] = torch.arange(len(self.kept))
        self.register_buffer("local_of_global_E", local_of_global_E, persistent=False)
        self.register_buffer("kept_E", torch.tensor(self.kept), persistent=False)

    def route(self, x_BND: Tensor, task_B: Tensor, single_task: int | None = None) -> Routing:
        """Kept-expert routing of x_BND [B, N, D]; `Routing` over the kept experts (local indices)."""
        if self.full_routing is None:
            return super().route(x_BND, task_B, single_task)
        full = self.full_routing.route(x_BND, task_B, single_task)
        dropped_E = self.local_of_global_E < 0
        gates_SK, global_SK = full.probs_SE.masked_fill(dropped_E, float("-inf")).topk(self.top_k, dim=-1)
        if self.gate == "renorm":
            gates_SK = gates_SK / gates_SK.sum(dim=-1, keepdim=True)
        idx_SK = self.local_of_global_E[global_SK]
        load_E = torch.bincount(idx_SK.reshape(-1), minlength=self.num_experts).float()
        kept_E = self.kept_E
        return dataclasses.replace(full, logits_SE=full.logits_SE[:, kept_E], probs_SE=full.probs_SE[:, kept_E],
                                   gates_SK=gates_SK, idx_SK=idx_SK, load_E=load_E)


class KeptMoEMlp(KeptRouting, MoEMlp):
    """`MoEMlp` over the kept experts of a full layer (see module docstring); `num_experts` = the full E."""

    def __init__(self, *, kept: Sequence[int], exact_routing: bool, num_experts: int, **kwargs: Any) -> None:
        MoEMlp.__init__(self, num_experts=len(kept), **kwargs)
        self._init_kept(kept, num_experts, exact_routing, kwargs)


class KeptMoEAttention(KeptRouting, MoEAttention):
    """`MoEAttention` over the kept head experts of a full layer; `num_experts` = the full E."""

    def __init__(self, *, kept: Sequence[int], exact_routing: bool, num_experts: int, **kwargs: Any) -> None:
        MoEAttention.__init__(self, num_experts=len(kept), **kwargs)
        self._init_kept(kept, num_experts, exact_routing, kwargs)


def routed_layer_names(placement: str, depth: int) -> list[str]:
    """Backbone-relative names of the MoE layers in construction order (`blocks.{i}.attn`, `blocks.{i}.mlp`)."""
    names = []
    for i, (attn_moe, mlp_moe) in enumerate(moe_layout(placement, depth)):
        names += [f"blocks.{i}.attn"] * attn_moe + [f"blocks.{i}.mlp"] * mlp_moe
    return names


class _KeptFactory:
    """The `moe_*_layer` factory of one layer type: the i-th call builds the i-th layer of that type."""

    def __init__(self, layer_cls: type, names: list[str], kept: dict[str, list[int]], exact_routing: bool) -> None:
        self.layer_cls, self.names, self.kept, self.exact = layer_cls, iter(names), kept, exact_routing

    def __call__(self, **kwargs: Any) -> nn.Module:
        name = next(self.names)
        return self.layer_cls(kept=self.kept[name], exact_routing=self.exact, **kwargs)


def build_submodel(*, model: ModelConfig, moe: MoEConfig, tasks: dict[str, TaskConfig], task_names: list[str],
                   num_classes: dict[str, int], kept: dict[str, list[int]], exact_routing: bool) -> MultiTaskModel:
    """The submodel's structure (random weights): `build_model` with kept-expert layers plugged in; `task_names`
    get ids 0..T'-1, layer `name` keeps `kept[name]`.

    Args:
        model, moe, tasks: the full model's config sections. num_classes: class count per kept task.
        kept: backbone-relative MoE layer name (`blocks.{i}.attn|mlp`) → kept global expert ids, every MoE layer.
    """
    names = routed_layer_names(moe.placement, backbone_size(model)["depth"])
    if sorted(kept) != sorted(names):
        raise ValueError(f"kept experts given for layers {sorted(kept)}, the model has MoE layers {sorted(names)}")
    return build_model(
        model=model, moe=moe, tasks=tasks, num_classes=num_classes, task_names=list(task_names),
        moe_mlp_layer=_KeptFactory(KeptMoEMlp, [n for n in names if n.endswith("mlp")], kept, exact_routing),
        moe_attn_layer=_KeptFactory(KeptMoEAttention, [n for n in names if n.endswith("attn")], kept, exact_routing))


def slice_state(full_state: dict[str, Tensor], sub: MultiTaskModel, *, task_rows: list[int],
                kept: dict[str, list[int]]) -> dict[str, Tensor]:
    """The submodel's state dict cut from the full model's: per MoE layer the kept experts' slices of the stacked
    expert tensors and of every [T, E, ...] tensor (routers, usage), the chosen task rows of routers and task
    embedding; `full_routing.*` (exact routing) takes all E router columns. Raises naming a key or shape mismatch."""
    rows = torch.tensor(task_rows)
    out = {}
    for key, target in sub.state_dict().items():
        layer = next((n for n in kept if key.startswith(f"backbone.{n}.")), None)
        rest = key[len(f"backbone.{layer}."):] if layer else ""
        src_key = f"backbone.{layer}.{rest.removeprefix(_FULL)}" if layer else key
        if src_key not in full_state:
            raise KeyError(f"submodel tensor {key}: the full model has no {src_key}")
        value = full_state[src_key]
        ids = torch.tensor(kept[layer]) if layer else None
        if layer and rest.startswith(_EXPERT_CHILDREN):
            value = value[ids]
        elif layer and rest.startswith(_FULL):
            value = value[rows]
        elif layer and value.dim() >= 2 and value.shape[0] == full_state[f"backbone.{layer}.usage_TE"].shape[0]:
            value = value[rows][:, ids]  # routers [T, E, D], usage/MI statistics [T, E]
        elif key == "backbone.task_embed":
            value = value[rows]
        if value.shape != target.shape:
            raise ValueError(f"submodel tensor {key}: sliced shape {tuple(value.shape)} != {tuple(target.shape)}")
        out[key] = value.clone()
    return out
