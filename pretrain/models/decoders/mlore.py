"""MLoRE dense multi-task decoder (Yang et al., CVPR 2024; official code YuqiYang213/MLoRE `models/transformers/`).

Four backbone taps (`taps`: 4 evenly spaced blocks ending at the last, e.g. ViT-L 5, 11, 17, 23). Per level l:
a 1×1 conv embed→C shared by all tasks (`proj[l]`, official `fea_fuse`), then two MLoRE blocks
(`blocks[l][0]`, `blocks[l][1]`; official `MLoRE_1[l]`, `MLoRE_2[l]`, mlore_block.py), each run for every task.
Level fusion per task (`fusion[t]`, official `task_mask`): 1×1 conv 4C→C → BN → GELU → 3×3 conv C→4, softmax
over the 4 levels per pixel, weighted sum, bilinear ×4 to stride 4. `heads[t]` (official `ConvHead`): 3×3 conv →
BN → GELU → 1×1 conv to the task's channels, bilinear to `out_size`.

Auxiliary loss "mlore_balance": CV² over experts of the top-k-masked gates, per block over all tasks and images,
summed over the 8 blocks (official `losses/loss_schemes.py`); its weight is `load_balance` (`aux_weights`).

Training form: `train_form="merged"` by default (see mlore_block.py for why). Inference: in eval mode every block
runs the re-parameterised form of the official `MLoRE_repara.py` (`inference_form="merged"`, the default: one conv
per image and block instead of three, folded from the current weights, nothing to call and nothing saved), so
fine-tuning evaluation, loaded and exported models all get it; `inference_form="unmerged"` keeps the training form.
Official checkpoints: mlore_keys.official_to_ours + `load_strict`, with `router_pool="linear"` and `router_hw` = the
official feature-map size (e.g. (32, 32) at 512 px).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.decoders.mlore_block import MLoREBlock
from pretrain.models.decoders.router import balance_loss

logger = logging.getLogger(__name__)

NUM_LEVELS = 4  # backbone taps
BLOCKS_PER_LEVEL = 2


def _ranks(start: int, step: int) -> tuple[int, ...]:
    return tuple(range(start, start + 15 * step, step))


# configs/{pascal,nyud}/*_MLoRE.yml of the official code (methods.md §1). The ViT-S config has no `pre_softmax`
# key (the official code crashes reading it); False as in the other PASCAL configs.
MLORE_PRESETS: dict[str, dict[str, Any]] = {
    "pascal_vitl": {"channels": 452, "ranks": _ranks(16, 8), "spe_rank": 72, "top_k": 9, "pre_softmax": False,
                    "load_balance": 3e-4},
    "pascal_vitb": {"channels": 640, "ranks": _ranks(16, 8), "spe_rank": 64, "top_k": 9, "pre_softmax": False,
                    "load_balance": 1e-4},
    "pascal_vits": {"channels": 192, "ranks": _ranks(8, 4), "spe_rank": 32, "top_k": 9, "pre_softmax": False,
                    "load_balance": 1e-4},
    "nyud_vitl": {"channels": 768, "ranks": _ranks(16, 16), "spe_rank": 16, "top_k": 9, "pre_softmax": True,
                  "load_balance": 5e-4},
}
DEFAULT_PRESET = "pascal_vits"


def default_taps(depth: int, levels: int = NUM_LEVELS) -> tuple[int, ...]:
    """`levels` evenly spaced 0-based block indices ending at the last block (24 → 5, 11, 17, 23)."""
    if depth < levels:
        raise ValueError(f"backbone depth {depth} is smaller than the {levels} decoder taps")
    return tuple(round(depth * (i + 1) / levels) - 1 for i in range(levels))


class LevelFusion(nn.Module):
    """Per-pixel softmax weights over the levels from their concatenation; weighted sum of the levels."""

    def __init__(self, *, channels: int, levels: int = NUM_LEVELS) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels * levels, channels, 1)
        self.norm = nn.BatchNorm2d(channels)
        self.score = nn.Conv2d(channels, levels, 3, padding=1)

    def forward(self, levels: list[Tensor]) -> Tensor:
        """Args: levels: L maps [B, C, h, w]. Returns: [B, C, h, w]."""
        weights_BLhw = self.score(F.gelu(self.norm(self.reduce(torch.cat(levels, dim=1))))).softmax(dim=1)
        return sum(weights_BLhw[:, i:i + 1] * x_BChw for i, x_BChw in enumerate(levels))


class ConvHead(nn.Module):
    """3×3 conv → BN → GELU → 1×1 conv to the task's channels (official ConvHead and its init)."""

    def __init__(self, *, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)
        self.pred = nn.Conv2d(channels, out_channels, 1)
        nn.init.trunc_normal_(self.conv.weight, std=0.02)
        nn.init.normal_(self.pred.bias, std=0.02)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        """[B, C, H, W] → [B, out_channels, H, W]."""
        return self.pred(F.gelu(self.norm(self.conv(x_BCHW))))


class MLoREDecoder(nn.Module):
    """The MLoRE decoder behind `DECODERS["mlore"]`; interface in decoders/__init__.py."""

    def __init__(self, *, embed_dim: int, taps: Sequence[int], tasks: Mapping[str, int], channels: int,
                 ranks: Sequence[int], spe_rank: int, top_k: int, pre_softmax: bool, load_balance: float,
                 router_pool: str = "attention", router_hw: Sequence[int] | None = None, noise_softplus: bool = False,
                 train_form: str = "merged", inference_form: str = "merged") -> None:
        super().__init__()
        if len(taps) != NUM_LEVELS:
            raise ValueError(f"MLoRE reads {NUM_LEVELS} backbone taps, got taps={tuple(taps)}")
        if not tasks:
            raise ValueError("MLoRE decoder needs at least one task")
        self.taps, self.tasks = tuple(int(i) for i in taps), dict(tasks)
        self.aux_weights = {"mlore_balance": float(load_balance)}
        block = {"channels": channels, "tasks": list(tasks), "ranks": tuple(ranks), "spe_rank": spe_rank,
                 "top_k": top_k, "pre_softmax": pre_softmax, "router_pool": router_pool,
                 "noise_softplus": noise_softplus, "router_hw": tuple(router_hw) if router_hw else None,
                 "train_form": train_form, "inference_form": inference_form}
        self.proj = nn.ModuleList(nn.Conv2d(embed_dim, channels, 1) for _ in range(NUM_LEVELS))
        self.blocks = nn.ModuleList(nn.ModuleList(MLoREBlock(**block) for _ in range(BLOCKS_PER_LEVEL))
                                    for _ in range(NUM_LEVELS))
        self.fusion = nn.ModuleDict({t: LevelFusion(channels=channels) for t in tasks})
        self.heads = nn.ModuleDict({t: ConvHead(channels=channels, out_channels=n) for t, n in tasks.items()})

    def predictor_modules(self) -> dict[str, list[nn.Module]]:
        """Per task the ConvHead (counted as "heads"; projections, blocks and level fusion are "decoder")."""
        return {t: [head] for t, head in self.heads.items()}

    def forward(self, feats: Mapping[str, list[Tensor]],
                out_size: tuple[int, int]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Args:
            feats: {task: [4 tapped maps [B, D, h, w]]}; one list object shared by tasks is projected once.
            out_size: (H, W) of the predictions.
        Returns: ({task: [B, C_t, H, W]}, {"mlore_balance": unweighted scalar}).
        """
        missing = [t for t in self.tasks if t not in feats or len(feats[t]) != NUM_LEVELS]
        if missing:
            raise ValueError(f"MLoRE decoder needs {NUM_LEVELS} tapped maps for tasks {missing}; got "
                             f"{ {t: len(v) for t, v in feats.items()} }")
        projected: dict[tuple[int, int], Tensor] = {}
        levels: dict[str, list[Tensor]] = {t: [] for t in self.tasks}
        balance = 0.0
        for lvl, (proj, level_blocks) in enumerate(zip(self.proj, self.blocks)):
            x_by_task = {}
            for t in self.tasks:
                key = (id(feats[t]), lvl)
                if key not in projected:
                    projected[key] = proj(feats[t][lvl])
                x_by_task[t] = projected[key]
            for block in level_blocks:
                x_by_task, gates = block(x_by_task)
                balance = balance + balance_loss(list(gates.values()))
            for t in self.tasks:
                levels[t].append(x_by_task[t])
        preds = {}
        for t in self.tasks:
            fused_BChw = F.interpolate(self.fusion[t](levels[t]), scale_factor=4, mode="bilinear", align_corners=False)
            preds[t] = F.interpolate(self.heads[t](fused_BChw), size=out_size, mode="bilinear", align_corners=False)
        return preds, {"mlore_balance": balance}

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay: the shared experts' biases `experts.m_bias`, stored [E, C]
        (one bias per expert), which the "decay ≥ 2-D tensors" rule would otherwise decay like a weight."""
        return {name for name, _ in self.named_parameters() if name.endswith(".experts.m_bias")}


def build_mlore(*, embed_dim: int, depth: int, tasks: Mapping[str, int], preset: str | None = None,
                channels: int | None = None, ranks: Sequence[int] | None = None, spe_rank: int | None = None,
                top_k: int | None = None, pre_softmax: bool | None = None, load_balance: float | None = None,
                router_pool: str = "attention", router_hw: Sequence[int] | None = None, noise_softplus: bool = False,
                train_form: str = "merged", inference_form: str = "merged",
                taps: Sequence[int] | None = None) -> MLoREDecoder:
    """`DECODERS["mlore"]`: values not given come from `MLORE_PRESETS[preset]` (default: the PASCAL ViT-S config).

    Args: see MLoREDecoder and the module docstring; `taps` defaults to `default_taps(depth)`.
    """
    name = preset or DEFAULT_PRESET
    if name not in MLORE_PRESETS:
        raise ValueError(f"decoder.mlore.preset={name!r} is not one of {', '.join(MLORE_PRESETS)}")
    given = {"channels": channels, "ranks": ranks, "spe_rank": spe_rank, "top_k": top_k, "pre_softmax": pre_softmax,
             "load_balance": load_balance}
    values = {**MLORE_PRESETS[name], **{k: v for k, v in given.items() if v is not None}}
    return MLoREDecoder(embed_dim=embed_dim, taps=taps or default_taps(depth), tasks=tasks, router_pool=router_pool,
                        router_hw=router_hw, noise_softplus=noise_softplus, train_form=train_form,
                        inference_form=inference_form, **values)


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "state dict") -> None:
    """`load_state_dict` that fails listing every missing and unexpected key (the official code loads non-strictly).

    Args: module; state_dict; source: named in the error (e.g. the checkpoint path).
    """
    result = module.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{source} does not match {type(module).__name__}: "
                         f"{len(result.missing_keys)} missing keys {result.missing_keys}, "
                         f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys}")
    logger.info("loaded %d tensors from %s into %s", len(state_dict), source, type(module).__name__)
