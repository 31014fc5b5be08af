"""A trained model grown by tasks (`pretrain add-task`) without changing a bit of what its old tasks read.

The grown model has T = T_old + T_new task rows; rows 0..T_old-1 are the trained model's. Every per-task tensor that
holds rows of both is split into two parameters (`GrownRows`): `old` (the trained rows, `requires_grad=False`) and
`new` (the added rows). A frozen parameter is in no optimizer group, so neither a gradient nor AdamW's decoupled
weight decay (which shrinks every element of a parameter it holds, even one whose gradient is exactly zero) ever
reaches an old row; zeroing the old rows' gradients inside one [T, ...] parameter would not be enough.
- router rows: every MoE layer's `router.weight` and `router.noise_weight` [T, E, D] (`GrownMoEMlp`,
  `GrownMoEAttention`: the layers plugged into `build_model`, the one constructor);
- the task embedding `backbone.task_embed` [T, D] (the backbone has no part to plug in for it: `build_grown_model`
  splits it right after building);
- routing statistics: `usage_TE` is only updated for tasks in the batch (`moe_losses.update_usage_`, exact), but the
  MI EMA buffers (`mi_probs_TE`, `mi_counts_TE`) decay every row at each optimizer step: a grown layer keeps their
  old rows, so the new task's MI is measured against the old tasks' frozen statistics and leaves them as they were.
Everything else the old tasks read (patch and position embedding, blocks, experts, norms, their heads) is frozen by
`freeze_old`. With N new experts per MoE layer (`add_task.new_experts`, `grow_layers`) each layer holds its E trained
experts (`experts` / `heads`, frozen) apart from the N added ones (`new_experts` / `new_heads`, trained); routers and
statistics get N more columns (zero in the old rows), the added tasks' routers read all E + N, and an old task reads
the first E logits of its row only (`grow_layers.LimitedRouting`), so its softmax, top-k and expert GEMMs are the
trained layer's. Either way an old task's forward reads only old rows and frozen tensors: its outputs are
bit-for-bit the trained model's. On disk a grown model is an ordinary one (`merged_state` concatenates the rows
back to [T, ...] and the experts to [E + N, ...]; the table order of the added tasks gives their rows,
`config.task_order`; the file's `task_experts` metadata says which tasks see fewer experts), so `load_model` serves it
and a later `add-task` grows it again (`load_trained` splits a trained state into this layout).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from pretrain.config.pretraining import ModelConfig, MoEConfig, TaskConfig, task_order
from pretrain.models import build_model
from pretrain.models.grow_layers import LAYER_TYPES, LimitedRouting, grown_moe, limits_of, split_grouped, split_stacked
from pretrain.models.moe import GroupedLinear, MoEMlp
from pretrain.models.moe_attention import MoEAttention
from pretrain.models.multitask import MultiTaskModel

logger = logging.getLogger(__name__)

_OLD, _NEW = ".old", ".new"
_ADDED_EXPERTS = {".new_experts.": ".experts.", ".new_heads.": ".heads."}  # trained child → frozen child (merged)
_KEPT_STATS = ("mi_probs_TE", "mi_counts_TE")  # decayed for every row by `pop_aux_losses`


class GrownRows(nn.Module):
    """A per-task tensor [T_old + T_new, ...] as a frozen `old` part and a trained `new` part.

    Indexing (`rows[task_B]`, `rows[t]`) reads like the tensor it replaces, which is all routers and the backbone
    do with it; `full()` is the whole [T, ...] tensor.
    """

    def __init__(self, rows: Tensor, num_old: int) -> None:
        super().__init__()
        if not 0 < num_old < rows.shape[0]:
            raise ValueError(f"num_old={num_old} must be in [1, {rows.shape[0]}) (rows {tuple(rows.shape)})")
        self.old = nn.Parameter(rows[:num_old].detach().clone(), requires_grad=False)
        self.new = nn.Parameter(rows[num_old:].detach().clone())

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.old.shape[0] + self.new.shape[0], *self.old.shape[1:]))

    def full(self) -> Tensor:
        return torch.cat([self.old, self.new])

    def __getitem__(self, index: int | Tensor) -> Tensor:
        num_old = self.old.shape[0]
        if isinstance(index, int):  # one task (the usual single-task batch): no concatenation
            return self.old[index] if index < num_old else self.new[index - num_old]
        return self.full()[index]


class GrownRouting:
    """Mixin for a routed layer whose first `num_old_tasks` router rows and statistics rows are a trained model's."""

    def _grow(self, num_old_tasks: int) -> None:
        self.num_old_tasks = num_old_tasks
        split_rows_(self.router, "weight", num_old_tasks)
        if self.router.noise_weight is not None:
            split_rows_(self.router, "noise_weight", num_old_tasks)

    def pop_aux_losses(self, end_of_step: bool = True) -> dict[str, Tensor]:
        """The layer's losses (see `TaskRoutedLayer.pop_aux_losses`); the MI EMA's old rows stay as trained."""
        kept = [getattr(self, name)[: self.num_old_tasks].clone() for name in _KEPT_STATS]
        losses = super().pop_aux_losses(end_of_step)
        with torch.no_grad():
            for name, rows in zip(_KEPT_STATS, kept):
                getattr(self, name)[: self.num_old_tasks] = rows
        return losses


class GrownMoEMlp(GrownRouting, LimitedRouting, MoEMlp):
    """`MoEMlp` whose first `num_old_tasks` task rows and first `num_old_experts` experts (`experts`) are frozen;
    the added experts are `new_experts`. Task t routes over its first `task_experts[t]` experts (`grow_layers`)."""

    def __init__(self, *, num_old_tasks: int, num_old_experts: int, task_experts: list[int], **kwargs: Any) -> None:
        MoEMlp.__init__(self, **kwargs)
        self._limit(task_experts)
        self._grow(num_old_tasks)
        self.num_old_experts = num_old_experts
        if num_old_experts < self.num_experts:
            self.new_experts = split_stacked(self.experts, num_old_experts)
            # the checkpoint's expert files hold `experts` under their global ids (ep_size is 1 here); the added
            # ones are ordinary trained parameters in the engine's module state
            self.num_local_experts = num_old_experts

    def local_experts(self, x_RD: Tensor, counts: list[int]) -> Tensor:
        if self.num_old_experts == self.num_experts:
            return self.experts(x_RD, counts)
        return split_grouped(x_RD, counts, self.num_old_experts, self.experts, self.new_experts)


class GrownMoEAttention(GrownRouting, LimitedRouting, MoEAttention):
    """`MoEAttention` whose first `num_old_tasks` task rows and first `num_old_experts` head experts (`heads`) are
    frozen; the added head experts are `new_heads` (`GrownMoEMlp`)."""

    def __init__(self, *, num_old_tasks: int, num_old_experts: int, task_experts: list[int], **kwargs: Any) -> None:
        MoEAttention.__init__(self, **kwargs)
        self._limit(task_experts)
        self._grow(num_old_tasks)
        self.num_old_experts = num_old_experts
        if num_old_experts < self.num_experts:
            self.new_heads = split_stacked(self.heads, num_old_experts)

    def head_linear(self, x_RI: Tensor, counts: list[int], name: str) -> Tensor:
        if self.num_old_experts == self.num_experts:
            return super().head_linear(x_RI, counts, name)
        return split_grouped(x_RI, counts, self.num_old_experts,
                             lambda x, c: GroupedLinear.apply(x, c, getattr(self.heads, name), None),
                             lambda x, c: GroupedLinear.apply(x, c, getattr(self.new_heads, name), None))


def build_grown_model(*, model: ModelConfig, moe: MoEConfig, tasks: dict[str, TaskConfig], num_old_tasks: int,
                      num_old_experts: dict[str, int], task_experts: dict[str, list[int]],
                      num_classes: dict[str, int], objective: nn.Module | None = None) -> MultiTaskModel:
    """The model of `tasks` (the trained model's table + the added tasks, after it) with the first `num_old_tasks`
    rows of every per-task tensor split off as frozen (`GrownRows`), and in each MoE layer of type `mlp` | `attn`
    the first `num_old_experts[type]` of the `moe` section's experts frozen, task row t routing over the first
    `task_experts[type][t]`. Its weights are at init: `load_trained`."""
    net = build_model(model=model, moe=moe, tasks=tasks, num_classes=num_classes, objective=objective,
                      moe_mlp_layer=functools.partial(GrownMoEMlp, num_old_tasks=num_old_tasks,
                                                      num_old_experts=num_old_experts["mlp"],
                                                      task_experts=task_experts["mlp"]),
                      moe_attn_layer=functools.partial(GrownMoEAttention, num_old_tasks=num_old_tasks,
                                                       num_old_experts=num_old_experts["attn"],
                                                       task_experts=task_experts["attn"]))
    if net.backbone.task_embed is not None:
        split_rows_(net.backbone, "task_embed", num_old_tasks)
    return net


def split_rows_(module: nn.Module, name: str, num_old: int) -> None:
    """Replace the per-task parameter `module.<name>` [T, ...] by `GrownRows` holding the same values."""
    rows = getattr(module, name).data
    delattr(module, name)  # a parameter's name cannot take a module until the parameter is gone
    setattr(module, name, GrownRows(rows, num_old))


def freeze_old(net: MultiTaskModel, new_tasks: list[str]) -> int:
    """Train only the added rows and the heads of `new_tasks` (and the objective); returns the trainable count."""
    for name, param in net.named_parameters():
        trained = name.endswith(_NEW) or name.startswith("objective.") or \
            any(child in name for child in _ADDED_EXPERTS) or any(name.startswith(f"heads.{t}.") for t in new_tasks)
        param.requires_grad_(trained)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def load_trained(net: MultiTaskModel, state: dict[str, Tensor]) -> None:
    """Load a trained model's state (rows [T_old, ...], E_old experts) into the grown `net`: per-task rows into the
    `old` parts, routers and statistics into their first T_old rows and E_old columns (the added tasks' rows and the
    added experts' columns start at zero: an old task never reads them), the frozen experts, everything else as
    is."""
    own = net.state_dict()
    for key, value in state.items():
        if key.startswith("objective."):
            continue
        if key + _OLD in own:
            key = key + _OLD
        elif key not in own:
            raise ValueError(f"the trained model's {key} has no place in the grown model")
        target = own[key]
        if target.shape != value.shape:
            if target.dim() != value.dim() or any(v > t for v, t in zip(value.shape, target.shape)):
                raise ValueError(f"{key}: trained {tuple(value.shape)} does not fit grown {tuple(target.shape)}")
            padded = torch.zeros_like(target)
            padded[tuple(slice(0, n) for n in value.shape)] = value
            value = padded
        own[key] = value
    net.load_state_dict(own)


def merged_state(net: nn.Module) -> dict[str, Tensor]:
    """`net`'s state in the ordinary layout: each `GrownRows` as one [T, ...] tensor, the added experts after the
    frozen ones in one [E + N, ...] tensor, the objective left out."""
    out: dict[str, Tensor] = {}
    state = net.state_dict()
    added = {key.replace(new, old): key for key in state for new, old in _ADDED_EXPERTS.items() if new in key}
    for key, value in state.items():
        if key.startswith("objective.") or (key.endswith(_NEW) and key[: -len(_NEW)] + _OLD in state):
            continue
        if any(child in key for child in _ADDED_EXPERTS):
            continue
        if key in added:
            out[key] = torch.cat([value, state[added[key]]])
            continue
        if key.endswith(_OLD) and (base := key[: -len(_OLD)]) + _NEW in state:
            out[base] = torch.cat([value, state[base + _NEW]])
        else:
            out[key] = value
    return out


def start_new_rows(net: MultiTaskModel, *, new_task: str, from_task: str) -> list[str]:
    """Start `new_task`'s router rows, task-embedding row and head from `from_task`'s (same kind: every head tensor of
    the same name and shape, i.e. all but a classifier whose class count differs). Returns the head keys copied."""
    new_row = net.task_ids[new_task] - _num_old(net)
    old_row = net.task_ids[from_task]
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, GrownRows):
                module.new[new_row] = module.old[old_row]
        copied = []
        if net.kinds[new_task] == net.kinds[from_task]:
            source = net.heads[from_task].state_dict()
            for key, value in net.heads[new_task].state_dict().items():
                if key in source and source[key].shape == value.shape:
                    value.copy_(source[key])
                    copied.append(key)
    return copied


def _num_old(net: MultiTaskModel) -> int:
    rows = next(m for m in net.modules() if isinstance(m, GrownRows))
    return rows.old.shape[0]


class GrowingModel(nn.Module):
    """The engine's module while tasks are added: the grown model's forward, and its weight-decay exemptions renamed
    to the trained parts (`backbone.task_embed` → `backbone.task_embed.new`)."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def no_weight_decay(self) -> set[str]:
        names = {name for name, _ in self.model.named_parameters()}
        skip = set()
        for name in self.model.no_weight_decay():  # both parts (the old one trains in a `baseline` run only)
            skip.update({f"model.{name}{_NEW}", f"model.{name}{_OLD}"} if name + _NEW in names else {f"model.{name}"})
        return skip

    def forward(self, task: str, images: Tensor, targets: Any = None) -> Any:
        return self.model(task, images, targets)


def grow(trained: MultiTaskModel, *, model: ModelConfig, moe: MoEConfig, tasks: dict[str, TaskConfig],
         new_tasks: dict[str, TaskConfig], num_classes: dict[str, int], start_from: dict[str, str] | None = None,
         objective: nn.Module | None = None, new_experts: int = 0,
         limits: dict[str, dict[str, int]] | None = None, baseline: str = "none") -> MultiTaskModel:
    """`trained` (the model of the `model`, `moe`, `tasks` sections) grown by `new_tasks`, ready to train them.

    Args:
        num_classes: class counts of every task whose `num_classes` is 0 (trained and new ones).
        new_experts: N experts added to every MoE layer (`grow_layers.grown_moe`), trained; the new tasks route
            over all E + N, the old ones over what they saw before.
        limits: the trained model's own `task_experts` metadata (a model grown by experts before), else None.
        baseline: `none` (the addition); for measurements, `full` (every parameter trains: the old tasks change)
            or `scratch` (the same model at its random init, every parameter trains).
        start_from: new task → trained task whose rows and head (same kind) it starts from (`start_new_rows`);
            tasks not named keep the fresh init (routers per `moe.router_init`, task embedding per its init).
        objective: the loss module of the new tasks (a child of the model, trained with it).
    Raises ValueError naming a new task that the model already has.
    """
    clash = sorted(set(new_tasks) & set(task_order(tasks)))
    if clash:
        raise ValueError(f"the model already has task(s) {clash}: choose another name")
    if new_experts < 0:
        raise ValueError(f"new_experts={new_experts} must be >= 0")
    table = {**tasks, **{name: replace(t, enabled=True) for name, t in new_tasks.items()}}
    big = grown_moe(model, moe, new_experts)
    old_limits = limits_of({"task_experts": limits or {}}, task_order(tasks), moe)
    total = {"mlp": big.num_experts, "attn": big.attn_num_experts}
    net = build_grown_model(model=model, moe=big, tasks=table, num_old_tasks=len(task_order(tasks)),
                            num_old_experts={"mlp": moe.num_experts, "attn": moe.attn_num_experts},
                            task_experts={k: old_limits[k] + [total[k]] * len(new_tasks) for k in LAYER_TYPES},
                            num_classes=num_classes, objective=objective)
    if baseline != "scratch":
        load_trained(net, trained.state_dict())
    for new_task, from_task in (start_from or {}).items():
        copied = start_new_rows(net, new_task=new_task, from_task=from_task)
        logger.info("%s starts from %s's router and task-embedding rows and %d of its head tensors", new_task,
                    from_task, len(copied))
    trainable = freeze_old(net, list(new_tasks))
    if baseline != "none":  # a comparison, not an addition: nothing stays frozen
        trainable = sum(p.requires_grad_(True).numel() for p in net.parameters())
    logger.info("grown by %s: %d of %d parameters train", list(new_tasks), trainable,
                sum(p.numel() for p in net.parameters()))
    return net
