"""Model building: plain dicts of sizes and heads, and the `build_*` functions (the only readers of config here).

Task ids are `TASKS.index(name)` for every task, enabled or not, so routers and task embeddings always have
T = len(TASKS) rows and checkpoints keep their shapes when a task is switched off (a model grown by
`pretrain add-task` has one more row per added task, after them: `config.task_order`). Builders take the config sections
they read (`model`, `moe`, the `tasks` table), never the whole run config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from pretrain.config.checks import ConfigError
from pretrain.config.pretraining import TASKS, ModelConfig, MoEConfig, TaskConfig, task_kind, task_order
from pretrain.models.heads import DET_HEADS, SEG_HEADS, ClsHead, DetHead, SegHead
from pretrain.models.moe import MoEMlp
from pretrain.models.moe_attention import MoEAttention
from pretrain.models.multitask import MultiTaskModel
from pretrain.models.upcycle import upcycle_vit
from pretrain.models.vit import PLACEMENT_INITS, VisionTransformer

logger = logging.getLogger(__name__)

BACKBONE_SIZES: dict[str, dict[str, Any]] = {
    # tiny, for CPU tests and debug runs at 64-96 px
    "vit_debug": {"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0, "img_size": 64},
    "vit_s16": {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "mlp_ratio": 4.0, "img_size": 224},
    "vit_b16": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0, "img_size": 224},
    "vit_l16": {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0, "img_size": 224},
}

__all__ = ["BACKBONE_SIZES", "DET_HEADS", "HEADS", "SEG_HEADS", "MultiTaskModel", "build_backbone", "build_model"]


def backbone_size(model: ModelConfig) -> dict[str, Any]:
    if model.size not in BACKBONE_SIZES:
        raise ValueError(f"model.size={model.size!r} is not one of {', '.join(BACKBONE_SIZES)}")
    size = dict(BACKBONE_SIZES[model.size])
    if model.patch_size:
        size["patch_size"] = model.patch_size
    if model.img_size:
        size["img_size"] = model.img_size
    if any(model.pos_grid):  # a (possibly non-square) stored grid, in pixels for PatchEmbed
        rows, cols = model.pos_grid
        if rows < 1 or cols < 1:
            raise ValueError(f"model.pos_grid={list(model.pos_grid)}: expected [rows, cols] >= 1, or [0, 0]")
        size["img_size"] = (rows * size["patch_size"], cols * size["patch_size"])
    return size


def moe_kwargs(model: ModelConfig, moe: MoEConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments of the MoE MLP and MoE attention layers (beyond dim/num_tasks) for these sections.

    `moe.expert_hidden=0` → mlp_ratio·dim/top_k (k active experts: MLP FLOPs equal the dense MLP's);
    `moe.attn_head_dim=0` → dim/num_heads; `auto` inits resolve per placement (`vit.PLACEMENT_INITS`).
    ep_size/ep_rank are not set here: the rank is a runtime fact, so `parallel.layers.moe_mlp_factory` binds them
    in the `moe_mlp_layer` factory passed to `build_model`.
    """
    size, m = backbone_size(model), moe
    dim = size["embed_dim"]
    hidden = m.expert_hidden or max(1, int(size["mlp_ratio"] * dim / m.top_k))
    common = {"gate": m.gate, "noisy": m.noisy, "router_init": _resolve(moe, "router_init"),
              "usage_momentum": m.usage_momentum, "mi_ema": m.mi_ema}
    # options beyond the MoE factory contract travel only when set, so the DeepSpeed backend keeps working
    extra = {k: v for k, v in (("prob_eps", m.prob_eps), ("usage_in_eval", m.usage_in_eval)) if v}
    init = _resolve(moe, "init")
    mlp = {"hidden_dim": hidden, "num_experts": m.num_experts, "top_k": m.top_k, **common, **extra}
    if m.backend == "deepspeed" and (extra or m.init not in ("auto", "timm")):
        raise ValueError(f"moe.backend=deepspeed supports neither moe.prob_eps, moe.usage_in_eval nor moe.init="
                         f"{m.init} (its experts keep the timm init): use moe.backend=native")
    if init != "timm" and m.backend != "deepspeed":
        mlp["init"] = init
    attn = {"num_experts": m.attn_num_experts, "top_k": m.attn_top_k,
            "head_dim": m.attn_head_dim or dim // size["num_heads"], **common, **extra, "init": init}
    return mlp, attn


def _resolve(moe: MoEConfig, key: str) -> str:
    """`moe.init` or `moe.router_init`; `auto` = the placement's official choice."""
    value = getattr(moe, key)
    return PLACEMENT_INITS[moe.placement][key] if value == "auto" else value


def build_backbone(model: ModelConfig, moe: MoEConfig, *, num_tasks: int = len(TASKS),
                   moe_mlp_layer: Callable[..., nn.Module] | None = None,
                   moe_attn_layer: Callable[..., nn.Module] | None = None) -> VisionTransformer:
    """The ViT of `model.size` with `moe.placement`; upcycled from `model.upcycle_from` when set.

    The one constructor of every backbone (full model, submodel, fine-tuning source): a variant plugs in its own
    MoE layer factories (`moe_mlp_layer`, `moe_attn_layer`: default `MoEMlp`, `MoEAttention`) and task-row count,
    so every backbone option reaches it by construction.
    """
    mlp_kwargs, attn_kwargs = moe_kwargs(model, moe)
    vit = VisionTransformer(**backbone_size(model), drop_path=model.drop_path, num_tasks=num_tasks,
                            class_token=model.class_token, task_embed=model.task_embed,
                            task_embed_init=model.task_embed_init, task_embed_std=model.task_embed_std,
                            dense_attn_head_dim=moe.dense_attn_head_dim, placement=moe.placement,
                            moe_mlp_layer=moe_mlp_layer or MoEMlp, moe_mlp_kwargs=mlp_kwargs,
                            moe_attn_layer=moe_attn_layer or MoEAttention, moe_attn_kwargs=attn_kwargs)
    if model.upcycle_from:
        try:
            upcycle_vit(vit, model.upcycle_from, mode=model.upcycle_mode)
        except (ValueError, KeyError, OSError) as exc:  # a garbage, foreign or unreadable file: the user's input
            raise ConfigError(f"model.upcycle_from={model.upcycle_from}: {str(exc).strip(chr(39))}") from None
    return vit


def _cls_head(vit: VisionTransformer, *, task_id: int, kind: str, num_classes: int, model: ModelConfig) -> nn.Module:
    return ClsHead(dim=vit.embed_dim, num_classes=num_classes, num_prefix_tokens=vit.num_prefix_tokens, order=kind)


def _det_head(vit: VisionTransformer, *, task_id: int, kind: str, num_classes: int, model: ModelConfig) -> nn.Module:
    return DetHead(vit=vit, task_id=task_id, kind=kind, num_classes=num_classes, min_size=model.det_min_size,
                   max_size=model.det_max_size, out_channels=model.pyramid_dim, box_fc_dim=model.det_box_fc_dim,
                   rois_per_image=model.det_rois_per_image, proposals=model.det_proposals)


def _seg_head(vit: VisionTransformer, *, task_id: int, kind: str, num_classes: int, model: ModelConfig) -> nn.Module:
    return SegHead(in_dim=vit.embed_dim, num_classes=num_classes, kind=kind, pyramid_dim=model.pyramid_dim)


# task → head builder (vit, task_id=, kind=tasks.<t>.head, num_classes=, model=section)
HEADS: dict[str, Callable[..., nn.Module]] = {"cls": _cls_head, "det": _det_head, "seg": _seg_head}


def build_model(*, model: ModelConfig, moe: MoEConfig, tasks: dict[str, TaskConfig],
                num_classes: dict[str, int] | None = None, moe_mlp_layer: Callable[..., nn.Module] | None = None,
                moe_attn_layer: Callable[..., nn.Module] | None = None, task_names: list[str] | None = None,
                objective: nn.Module | None = None) -> MultiTaskModel:
    """Backbone + a head for each enabled task (+ the training objective, part of the checkpointed state).

    Args:
        model, moe: config sections. tasks: the task table (enabled flags, head kinds, class counts).
        num_classes: task → class count for tasks whose `tasks.<t>.num_classes` is 0 (e.g. from the shards'
            `_info.json`: `DataSpec.num_classes`); det counts foreground classes.
        moe_mlp_layer, moe_attn_layer: MoE layer factories with the contract's keywords (default `MoEMlp`,
            `MoEAttention`); a submodel plugs in its kept-expert layers (`models.submodel`).
        task_names: build only these tasks, with router / task-embedding rows 0..T'-1 in this order (a submodel);
            default: every enabled task at its `config.task_order` row (`TASKS`, then tasks added by
            `pretrain add-task`), T = that many rows. A task's head and forward are its kind's (`config.task_kind`).
        objective: the loss module (`pretrain.training.objective.Objective`): a child of the model, so its parameters
            (uncertainty weights) are optimised and checkpointed with it.
    """
    order = tuple(task_names) if task_names is not None else task_order(tasks)
    rows = {t: i for i, t in enumerate(order) if task_names is not None or (t in tasks and tasks[t].enabled)}
    kinds = {t: task_kind(t, tasks[t]) for t in rows}
    vit = build_backbone(model, moe, num_tasks=len(order), moe_mlp_layer=moe_mlp_layer,
                         moe_attn_layer=moe_attn_layer)
    heads: dict[str, nn.Module] = {}
    for task, row in rows.items():
        classes = tasks[task].num_classes or (num_classes or {}).get(task, 0)
        if classes < 1:
            raise ValueError(f"task {task!r} has no class count: set tasks.{task}.num_classes or pass "
                             f"num_classes={{'{task}': N}} (e.g. from the shards' _info.json)")
        heads[task] = HEADS[kinds[task]](vit, task_id=row, kind=tasks[task].head, num_classes=classes, model=model)
    built = MultiTaskModel(vit, heads, rows, objective=objective, kinds=kinds)
    logger.info("built %s (%s placement, tasks %s): %s", model.size, moe.placement, list(heads),
                built.param_counts())
    return built
