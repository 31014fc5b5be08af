"""Shared pieces of the engine/checkpoint torchrun scripts: a tiny config, the model, deterministic batches, a step.

The model is `build_model` on `vit_debug` shrunk to 32 px images (17 tokens), cls task only, Mod-Squad placement
(MoE attention + MoE MLP), 4 experts top-2. Batches depend only on (step, rank), so an interrupted run and an
uninterrupted one see the same data.
"""

from __future__ import annotations

import torch

from pretrain.config.load import load_config
from pretrain.config.pretraining import RunConfig
from pretrain.models import build_model
from pretrain.models.moe_losses import collect_aux_losses
from pretrain.parallel.layers import moe_mlp_factory

BATCH, IMG, CLASSES = 4, 32, 10
W_MI = 0.01


def make_cfg(*overrides: str) -> RunConfig:
    base = ["model.size=vit_debug", "model.drop_path=0.0", f"tasks.cls.num_classes={CLASSES}",
            "tasks.det.enabled=false", "tasks.seg.enabled=false", f"tasks.cls.img_size={IMG}", "moe.num_experts=4",
            "moe.top_k=2", "moe.attn_num_experts=4", "moe.attn_top_k=2", "moe.router_init=normal",
            "engine.precision=fp32", "optim.lr=1e-2", "optim.warmup_steps=2", "train.max_steps=20",
            "optim.grad_clip=1.0"]
    return load_config(None, base + list(overrides))


def build(cfg: RunConfig, rank: int) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return build_model(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks,
                       moe_mlp_layer=moe_mlp_factory(cfg.moe, cfg.engine, rank=rank))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    images = torch.randint(0, 256, (BATCH, 3, IMG, IMG), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, CLASSES, (BATCH,), generator=g)


def fixed_images() -> torch.Tensor:
    return torch.randint(0, 256, (3, 3, IMG, IMG), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)


def train_step(engine, model: torch.nn.Module, step: int, rank: int) -> float:
    """One optimizer step on this rank's batch of `step`: cls loss + W_MI * MI loss; returns the loss."""
    images, labels = batch(step, rank)
    loss = engine("cls", images, labels)["cls"] + W_MI * collect_aux_losses(model)["mi"]
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def eval_logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits [3, CLASSES] of `fixed_images()` in eval mode (collective under EP: every rank calls it)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model("cls", fixed_images())
    model.train(was_training)
    return out
