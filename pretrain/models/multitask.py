"""The shared backbone, its task heads and the training objective behind one forward: `model(task, images, targets)`.

How a task's head meets the backbone is a table (`FORWARDS`): cls pools the final tokens, seg reads the last block's
map, det hands float images to a torchvision detector that calls the backbone itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pretrain.models.heads.det import IMAGENET_MEAN, IMAGENET_STD
from pretrain.models.vit import VisionTransformer

logger = logging.getLogger(__name__)


def _count(modules: list[nn.Module]) -> int:
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def _forward_cls(model: MultiTaskModel, head: nn.Module, images: Tensor, task_B: Tensor, targets: Any):
    out = head(model.backbone.forward_features(model.normalize(images), task_B, norm=head.backbone_norm))
    return head.loss(out, targets) if model.training else out


def _forward_seg(model: MultiTaskModel, head: nn.Module, images: Tensor, task_B: Tensor, targets: Any):
    (feat_BDhw,) = model.backbone.forward_intermediates(model.normalize(images), task_B, indices=1, norm=True,
                                                         intermediates_only=True)
    out = head(feat_BDhw, tuple(images.shape[-2:]))
    return head.loss(out, targets) if model.training else out


def _forward_det(model: MultiTaskModel, head: nn.Module, images: Tensor, task_B: Tensor, targets: Any):
    images_f = list(images.float().div(255.0))
    if model.input_dtype() == torch.float32:
        return head(images_f, targets if model.training else None)
    # low-precision weights (DeepSpeed bf16): torchvision's NMS has no bf16 kernel; under autocast its registered
    # autocast wrappers run NMS / RoIAlign in fp32 while convs and linears run in bf16
    with torch.autocast(device_type=images.device.type, dtype=model.input_dtype()):
        return head(images_f, targets if model.training else None)


# task → how its head runs on the backbone: (model, head, uint8 images, task_B, targets) → losses | predictions
FORWARDS: dict[str, Callable[..., Any]] = {"cls": _forward_cls, "det": _forward_det, "seg": _forward_seg}


class MultiTaskModel(nn.Module):
    """A task-routed ViT (`backbone`), one head per task (`heads[name]`) and the training objective.

    Args:
        backbone: the shared `VisionTransformer`.
        heads: task name → head (`ClsHead`, `DetHead`, `SegHead`); the det head already references `backbone`.
        tasks: task name → task id (the routers' / task embedding's row); same keys as `heads`.
        kinds: task name → the pretraining task (`cls`, `det`, `seg`) whose forward it runs (`FORWARDS`); default:
            each task is its own kind (a task added by `pretrain add-task` has another name).
        objective: the loss module combining task and auxiliary losses (`training.objective.Objective`), or None for
            a model that is only evaluated. A child module, so its parameters are trained and checkpointed.

    Batches are single-task (one `forward` per task batch). Images arrive as uint8 [B,3,H,W]; cls/seg normalise
    here with ImageNet mean/std, the detector inside torchvision's transform (after its resize).
    """

    def __init__(self, backbone: VisionTransformer, heads: dict[str, nn.Module], tasks: dict[str, int],
                 objective: nn.Module | None = None, kinds: dict[str, str] | None = None) -> None:
        super().__init__()
        if set(heads) != set(tasks):
            raise ValueError(f"heads {sorted(heads)} and tasks {sorted(tasks)} must name the same tasks")
        self.kinds = {t: (kinds or {}).get(t, t) for t in heads}
        unknown = set(self.kinds.values()) - set(FORWARDS)
        if unknown:
            raise ValueError(f"unknown task heads {sorted(unknown)}; expected {', '.join(FORWARDS)}")
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.task_ids = dict(tasks)
        self.objective = objective
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [B,3,H,W] → float [B,3,H,W] normalised with ImageNet mean/std."""
        # normalise in fp32, then match the weights' dtype (DeepSpeed bf16 casts parameters, not these buffers)
        x = (images.float() - self.pixel_mean.float()) / self.pixel_std.float()
        return x.to(self.input_dtype())

    def input_dtype(self) -> torch.dtype:
        return self.backbone.patch_embed.proj.weight.dtype

    def forward(self, task: str, images: Tensor, targets: Any = None) -> dict[str, Tensor] | Tensor | list:
        """Run one task batch.

        Args:
            task: a task with a head (`cls` | `det` | `seg`).
            images: uint8 [B,3,H,W].
            targets: cls int64 labels [B]; det list of {"boxes" [n,4] xyxy float, "labels" [n] int64 in 1..K};
                seg int64 masks [B,H,W] (255 = ignore). Required in training mode, ignored in eval mode.
        Returns:
            training: named losses — cls {"cls"}, det torchvision's keys prefixed `det_`, seg {"seg"}.
            eval: cls logits [B,C]; det list of {"boxes" [m,4], "scores" [m], "labels" [m]} in input pixels;
                seg logits [B,C,H,W] at the input size.
        """
        if task not in self.heads:
            raise ValueError(f"task {task!r} has no head; this model has {sorted(self.heads)}")
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [B,3,H,W], got {images.dtype} {tuple(images.shape)}")
        if self.training and targets is None:
            raise ValueError(f"training forward for task {task!r} needs targets")
        task_B = torch.full((images.shape[0],), self.task_ids[task], dtype=torch.long, device=images.device)
        return FORWARDS[self.kinds[task]](self, self.heads[task], images, task_B, targets)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this model) excluded from weight decay (besides biases and norms)."""
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}

    def param_counts(self) -> dict[str, int]:
        """Parameter counts held by this process (under expert parallelism: local experts only).

        backbone = the ViT incl. task embedding and routers; heads = each head's `predictor_modules()` (cls:
        LayerNorm + Linear; det: Faster R-CNN's box predictor or RetinaNet's cls_logits/bbox_reg convs; seg: the
        1×1 classifier); decoder = the rest of the heads (pyramids, FPN/UPerNet, RPN, RoI box trunk, RetinaNet
        conv towers); total = all parameters.
        """
        backbone = _count([self.backbone])
        heads = _count([m for h in self.heads.values() for m in h.predictor_modules()])
        decoder = _count(list(self.heads.values())) - heads
        total = _count([self])
        return {"backbone": backbone, "decoder": decoder, "heads": heads, "total": total}
