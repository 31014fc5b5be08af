"""Model building: plain dicts of sizes and heads, and `build_model(cfg)` (the only reader of the run config here).

Task ids are `TASKS.index(name)` for every task, enabled or not, so routers and task embeddings always have
T = len(TASKS) rows and checkpoints keep their shapes when a task is switched off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from pretrain.config import TASKS, RunConfig, enabled_tasks
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

__all__ = ["BACKBONE_SIZES", "DET_HEADS", "SEG_HEADS", "MultiTaskModel", "build_backbone", "build_model"]


def _size(cfg: RunConfig) -> dict[str, Any]:
    if cfg.model.size not in BACKBONE_SIZES:
        raise ValueError(f"model.size={cfg.model.size!r} is not one of {', '.join(BACKBONE_SIZES)}")
    size = dict(BACKBONE_SIZES[cfg.model.size])
    if cfg.model.patch_size:
        size["patch_size"] = cfg.model.patch_size
    return size


def _moe_kwargs(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments of the MoE MLP and MoE attention layers (beyond dim/num_tasks) for this config.

    `moe.expert_hidden=0` → mlp_ratio·dim/top_k (k active experts: MLP FLOPs equal the dense MLP's);
    `moe.attn_head_dim=0` → dim/num_heads; `auto` inits resolve per placement (`vit.PLACEMENT_INITS`).
    ep_size/ep_rank are not set here: the rank is a runtime fact, so the engine binds them in the
    `moe_mlp_layer` factory it passes to `build_model`.
    """
    size, m = _size(cfg), cfg.moe
    dim = size["embed_dim"]
    hidden = m.expert_hidden or max(1, int(size["mlp_ratio"] * dim / m.top_k))
    common = {"gate": m.gate, "noisy": m.noisy, "router_init": _resolve(cfg, "router_init"),
              "usage_momentum": m.usage_momentum, "mi_ema": m.mi_ema}
    # options beyond the MoE factory contract travel only when set, so the DeepSpeed backend keeps working
    extra = {k: v for k, v in (("prob_eps", m.prob_eps), ("usage_in_eval", m.usage_in_eval)) if v}
    init = _resolve(cfg, "init")
    mlp = {"hidden_dim": hidden, "num_experts": m.num_experts, "top_k": m.top_k, **common, **extra}
    if m.backend == "deepspeed" and (extra or m.init not in ("auto", "timm")):
        raise ValueError(f"moe.backend=deepspeed supports neither moe.prob_eps, moe.usage_in_eval nor moe.init="
                         f"{m.init} (its experts keep the timm init): use moe.backend=native")
    if init != "timm" and m.backend != "deepspeed":
        mlp["init"] = init
    attn = {"num_experts": m.attn_num_experts, "top_k": m.attn_top_k,
            "head_dim": m.attn_head_dim or dim // size["num_heads"], **common, **extra, "init": init}
    return mlp, attn


def _resolve(cfg: RunConfig, key: str) -> str:
    """`moe.init` or `moe.router_init`; `auto` = the placement's official choice."""
    value = getattr(cfg.moe, key)
    return PLACEMENT_INITS[cfg.moe.placement][key] if value == "auto" else value


def build_backbone(cfg: RunConfig, *, moe_mlp_layer: Callable[..., nn.Module] | None = None) -> VisionTransformer:
    """The ViT of `cfg.model.size` with `cfg.moe.placement`; upcycled from `cfg.model.upcycle_from` when set."""
    mlp_kwargs, attn_kwargs = _moe_kwargs(cfg)
    vit = VisionTransformer(**_size(cfg), drop_path=cfg.model.drop_path, num_tasks=len(TASKS),
                            task_embed=cfg.model.task_embed, task_embed_init=cfg.model.task_embed_init,
                            dense_attn_head_dim=cfg.moe.dense_attn_head_dim, placement=cfg.moe.placement,
                            moe_mlp_layer=moe_mlp_layer or MoEMlp, moe_mlp_kwargs=mlp_kwargs,
                            moe_attn_layer=MoEAttention, moe_attn_kwargs=attn_kwargs)
    if cfg.model.upcycle_from:
        upcycle_vit(vit, cfg.model.upcycle_from, mode=cfg.model.upcycle_mode)
    return vit


def build_model(cfg: RunConfig, *, num_classes: dict[str, int] | None = None,
                moe_mlp_layer: Callable[..., nn.Module] | None = None) -> MultiTaskModel:
    """Backbone + a head for each enabled task.

    Args:
        cfg: the run config (model, moe, tasks sections).
        num_classes: task → class count overriding `model.{cls,det,seg}_classes` (e.g. from the shards'
            `_info.json`; required for cls when `model.cls_classes=0`). det counts foreground classes.
        moe_mlp_layer: MoE MLP factory with the contract's keywords (default `MoEMlp`).
    """
    classes = {"cls": cfg.model.cls_classes, "det": cfg.model.det_classes, "seg": cfg.model.seg_classes}
    classes.update(num_classes or {})
    vit = build_backbone(cfg, moe_mlp_layer=moe_mlp_layer)
    m = cfg.model
    heads: dict[str, nn.Module] = {}
    for task in enabled_tasks(cfg):
        if classes[task] < 1:
            raise ValueError(f"task {task!r} has {classes[task]} classes: set model.{task}_classes or pass "
                             f"num_classes={{'{task}': N}} (e.g. from the shards' _info.json)")
        if task == "cls":
            heads[task] = ClsHead(dim=vit.embed_dim, num_classes=classes[task], num_prefix_tokens=vit.num_prefix_tokens)
        elif task == "det":
            heads[task] = DetHead(vit=vit, task_id=TASKS.index("det"), kind=m.det_head, num_classes=classes[task],
                                  min_size=m.det_min_size, max_size=m.det_max_size, out_channels=m.pyramid_dim)
        else:
            heads[task] = SegHead(in_dim=vit.embed_dim, num_classes=classes[task], kind=m.seg_head,
                                  pyramid_dim=m.pyramid_dim)
    model = MultiTaskModel(vit, heads, {t: TASKS.index(t) for t in heads})
    logger.info("built %s (%s placement, tasks %s): %s", m.size, cfg.moe.placement, list(heads), model.param_counts())
    return model
