"""Where a fine-tuning backbone comes from (`finetune.init_from`), and how its routers become the dense tasks'.

Sources: a pretraining run directory (`runs.load_run`), a file written by `pretrain export` / `pretrain extract`
(their loader), a dense timm ViT state dict (`.safetensors` / `.pth`, weights only: sparse-upcycled into the configured
placement), or nothing (random init). Position embeddings are resampled to the fine-tuning grid on the fly by the
backbone itself. Each dense task's router row and task-embedding row start from those of one pretraining task
(`finetune.router_from`), or one shared row serves every task (`finetune.routing=shared`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from pretrain.config import TASKS
from pretrain.finetune.config import FinetuneConfig
from pretrain.layers import moe_mlp_factory
from pretrain.models import build_backbone
from pretrain.models.moe_losses import moe_modules
from pretrain.models.moe_routing import TaskRouter
from pretrain.models.vit import VisionTransformer

logger = logging.getLogger(__name__)


def _portable_meta(path: Path) -> dict | None:
    """The metadata of a file written by `pretrain export` / `pretrain extract`, or None for any other file."""
    if path.suffix != ".safetensors":
        return None
    from pretrain.portable import FORMAT, decode_meta, read_meta

    try:
        meta = read_meta(path)
    except ValueError:  # a safetensors file of another kind (a dense timm ViT)
        return None
    return decode_meta(meta) if meta.get("format") == FORMAT else None


def load_source_backbone(cfg: FinetuneConfig) -> tuple[VisionTransformer, tuple[str, ...]]:
    """The backbone `finetune.init_from` names, or a fresh one, and the task name of each of its router rows.

    A run directory's `model`/`moe` sections replace `cfg`'s (in place), so the fine-tuning run's config describes
    its backbone. An extracted submodel holds only its own tasks' rows, in its own order.
    """
    src = cfg.finetune.init_from
    path = Path(src)
    if not src:
        logger.info("backbone: random initialisation (%s, %s placement)", cfg.model.size, cfg.moe.placement)
        return build_backbone(cfg.model, cfg.moe, moe_mlp_layer=moe_mlp_factory(cfg.moe, cfg.engine, rank=0)), TASKS
    if path.is_dir():
        from pretrain.runs import load_run

        run = load_run(path)
        logger.info("backbone: run %s at step %d (its model/moe sections replace the config's)", path, run.step)
        cfg.model, cfg.moe = run.cfg.model, run.cfg.moe  # the saved config.yaml then describes this backbone
        return run.model.backbone, TASKS
    if not path.is_file():
        raise FileNotFoundError(f"finetune.init_from={src}: no such run directory or file")
    meta = _portable_meta(path)
    if meta is not None:
        from pretrain.portable import load_backbone

        rows = tuple(meta["task_names"]) if meta.get("kind") == "submodel" else TASKS
        logger.info("backbone: %s (%s file, task rows %s)", path, meta.get("kind"), list(rows))
        return load_backbone(path), rows
    logger.info("backbone: dense ViT weights %s, upcycled into the %s placement", path, cfg.moe.placement)
    model = replace(cfg.model, upcycle_from=str(path))
    return build_backbone(model, cfg.moe, moe_mlp_layer=moe_mlp_factory(cfg.moe, cfg.engine, rank=0)), TASKS


@torch.no_grad()
def select_task_rows_(vit: VisionTransformer, rows: list[int]) -> VisionTransformer:
    """Keep task rows `rows` (in this order, repeats allowed) of every router, usage buffer and the task embedding.

    Args:
        vit: a backbone whose routed layers hold [T_old, ...] per-task parameters and buffers.
        rows: old row index of each new task row.
    """
    index = torch.tensor(rows, dtype=torch.long)
    for _, layer in moe_modules(vit):
        for module in layer.modules():  # the layer, and an exact-routing submodel's `full_routing` child
            if isinstance(module, TaskRouter):
                for name, param in list(module.named_parameters(recurse=False)):
                    setattr(module, name, nn.Parameter(param[index].clone()))
            for name, buf in list(module.named_buffers(recurse=False)):
                # the per-task statistics [T, E] by name: a submodel's `kept_E` [E'] may happen to have T entries
                if buf is not None and name.endswith("_TE"):
                    module.register_buffer(name, buf[index].clone())
            if hasattr(module, "num_tasks"):
                module.num_tasks = len(rows)
    if vit.task_embed is not None:
        vit.task_embed = nn.Parameter(vit.task_embed[index].clone())
    vit.num_tasks = len(rows)
    return vit


def build_finetune_backbone(cfg: FinetuneConfig, tasks: list[str]) -> VisionTransformer:
    """The source backbone with one router row per dense task (per_task) or one shared row, all copied from the
    pretraining task `finetune.router_from`."""
    vit, row_tasks = load_source_backbone(cfg)
    if cfg.finetune.router_from in row_tasks:
        source = row_tasks.index(cfg.finetune.router_from)
    else:  # an extracted submodel keeps only its own tasks' rows
        logger.warning("the backbone has no %s router (rows %s): dense routers start from %s's",
                       cfg.finetune.router_from, list(row_tasks), row_tasks[0])
        source = 0
    count = len(tasks) if cfg.finetune.routing == "per_task" else 1
    return select_task_rows_(vit, [source] * count)
