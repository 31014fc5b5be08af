"""Backbone + dense decoder → every task's map in one forward (the fine-tuning model).

Routing (`routing`): `per_task` gives every dense task its own router row (the backbone runs once per task, as
Mod-Squad and M3ViT do on multi-label data: T backbone passes); `shared` runs the backbone once with one router row
for all tasks (1 pass; the tasks then share the experts). The decoder (`pretrain.models.decoders`) receives, per task,
the tapped block outputs of that task's pass and returns per-task predictions and its auxiliary losses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.heads.det import IMAGENET_MEAN, IMAGENET_STD
from pretrain.models.vit import VisionTransformer

logger = logging.getLogger(__name__)

ROUTINGS = ("per_task", "shared")


class FloatBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalises in fp32 whatever the dtype of its input and parameters.

    DeepSpeed's bf16 mode casts parameters but not the running statistics, and cuDNN's batch-norm backward refuses
    bf16 weights with fp32 statistics; fp32 statistics are also what the references train with (AMP keeps batch
    norm in fp32). Same state dict and, in fp32, the same numbers as `nn.BatchNorm2d`.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or self.running_mean is None
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = F.batch_norm(x.float(), self.running_mean, self.running_var, weight, bias, batch_stats, momentum,
                           self.eps)
        return out.to(x.dtype)


def use_float_batchnorm_(module: nn.Module) -> nn.Module:
    """Turn every plain `nn.BatchNorm2d` under `module` into a `FloatBatchNorm2d` (in place, state kept)."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = FloatBatchNorm2d
    return module


def _count(modules: list[nn.Module]) -> int:
    return sum({id(p): p.numel() for m in modules for p in m.parameters()}.values())


class DenseModel(nn.Module):
    """A (task-routed) ViT backbone and a dense decoder for a set of dense tasks.

    Args:
        backbone: the ViT; its router rows / task embedding rows are the dense tasks' (per_task: T rows in
            `tasks` order; shared: 1 row).
        decoder: a `DECODERS` module (`taps`, `forward(feats, out_size)`, `predictor_modules()`, `aux_weights`).
        tasks: dense task names, in router-row order.
        losses: task → loss function (prediction [B,C,H,W], target) → scalar.
        routing: `per_task` | `shared`.
        objective: the loss module combining task losses and auxiliary losses (a child: trained and checkpointed).
    """

    def __init__(self, *, backbone: VisionTransformer, decoder: nn.Module, tasks: list[str],
                 losses: dict[str, Callable[[Tensor, Tensor], Tensor]], routing: str = "per_task",
                 objective: nn.Module | None = None) -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing={routing!r} is not one of {ROUTINGS}")
        missing = [t for t in tasks if t not in losses]
        if missing:
            raise ValueError(f"no loss for dense tasks {missing}")
        self.backbone, self.decoder, self.objective = backbone, use_float_batchnorm_(decoder), objective
        self.tasks, self.routing, self.losses = list(tasks), routing, dict(losses)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [B,3,H,W] → float [B,3,H,W] (ImageNet mean/std), in the weights' dtype."""
        x = (images.float() - self.pixel_mean.float()) / self.pixel_std.float()
        return x.to(self.backbone.patch_embed.proj.weight.dtype)

    def features(self, x: Tensor) -> dict[str, list[Tensor]]:
        """Tapped block outputs per task: {task: [B,D,h,w] per tap (the last block's after the final norm)}; one
        shared list in `shared` routing."""
        taps = list(self.decoder.taps)

        last = self.backbone.depth - 1

        def run(row: int) -> list[Tensor]:
            task_B = torch.full((x.shape[0],), row, dtype=torch.long, device=x.device)
            feats = self.backbone.forward_intermediates(x, task_B, indices=taps, norm=False, intermediates_only=True,
                                                        stop_early=True)
            if taps[-1] == last:  # the final block's output goes through the final norm (timm / MLoRE convention)
                feats[-1] = self.backbone.norm(feats[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return feats

        if self.routing == "shared":
            shared = run(0)
            return dict.fromkeys(self.tasks, shared)
        return {task: run(row) for row, task in enumerate(self.tasks)}

    def forward(self, images: Tensor, targets: dict[str, Tensor] | None = None
                ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]] | dict[str, Tensor]:
        """images uint8 [B,3,H,W] → eval: {task: prediction [B,C_t,H,W]} at the input size;
        training (targets {task: target}): ({task: {task: loss}}, decoder auxiliary losses {name: scalar})."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [B,3,H,W], got {images.dtype} {tuple(images.shape)}")
        preds, aux = self.decoder(self.features(self.normalize(images)), tuple(images.shape[-2:]))
        if not self.training:
            return preds
        if targets is None:
            raise ValueError("a training forward needs targets {task: tensor}")
        return {t: {t: self.losses[t](preds[t].float(), targets[t])} for t in self.tasks}, aux

    def no_weight_decay(self) -> set[str]:
        skip = {f"backbone.{name}" for name in self.backbone.no_weight_decay()}
        if hasattr(self.decoder, "no_weight_decay"):  # MLoRE: the shared experts' biases are stored [E, C]
            skip |= {f"decoder.{name}" for name in self.decoder.no_weight_decay()}
        return skip

    def param_counts(self) -> dict[str, int]:
        """backbone; heads = the decoder's per-task output layers; decoder = the rest of the decoder; total."""
        heads = _count([m for mods in self.decoder.predictor_modules().values() for m in mods])
        return {"backbone": _count([self.backbone]), "decoder": _count([self.decoder]) - heads, "heads": heads,
                "total": _count([self])}
