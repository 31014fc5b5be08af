"""Baseline dense decoder: one M3ViT/SETR-PUP head per task on the last backbone tap (methods.md §3).

Per task: 4 × [3×3 conv (256) → BatchNorm → ReLU → bilinear ×2] then a 1×1 conv to the task's channels, bilinear
to `out_size`. The last tap is already normed by the backbone, so there is no extra LayerNorm here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn


class PUPHead(nn.Module):
    """Progressive upsampling head: [B, D, h, w] → [B, out_channels, 16h, 16w] with `num_ups` = 4."""

    def __init__(self, *, in_dim: int, out_channels: int, channels: int = 256, num_ups: int = 4) -> None:
        super().__init__()
        dims = [in_dim] + [channels] * num_ups
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[i], channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
            for i in range(num_ups))
        self.pred = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x_BDhw: Tensor) -> Tensor:
        """[B, D, h, w] → [B, out_channels, 2^num_ups·h, 2^num_ups·w]."""
        x = x_BDhw
        for stage in self.stages:
            x = F.interpolate(stage(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.pred(x)


class HeadsDecoder(nn.Module):
    """`DECODERS["heads"]`: per-task PUP heads on the last block; no auxiliary losses.

    Args: embed_dim: backbone width D. depth: backbone blocks (taps = (depth - 1,)). tasks: {task: channels}.
        channels: width of the four conv stages. num_ups: number of conv + ×2 stages.
    """

    def __init__(self, *, embed_dim: int, depth: int, tasks: Mapping[str, int], channels: int = 256,
                 num_ups: int = 4) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("heads decoder needs at least one task")
        self.taps = (depth - 1,)
        self.aux_weights: dict[str, float] = {}
        self.heads = nn.ModuleDict({t: PUPHead(in_dim=embed_dim, out_channels=n, channels=channels, num_ups=num_ups)
                                    for t, n in tasks.items()})

    def predictor_modules(self) -> dict[str, list[nn.Module]]:
        """Per task the final 1×1 conv (counted as "heads"; the conv stages are "decoder")."""
        return {t: [head.pred] for t, head in self.heads.items()}

    def forward(self, feats: Mapping[str, list[Tensor]],
                out_size: tuple[int, int]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Args: feats {task: [last-tap map [B, D, h, w]]}; out_size (H, W).
        Returns: ({task: [B, C_t, H, W]}, {}).
        """
        preds = {}
        for t, head in self.heads.items():
            if t not in feats or len(feats[t]) != 1:
                raise ValueError(f"heads decoder needs exactly one tapped map for task {t!r}")
            preds[t] = F.interpolate(head(feats[t][0]), size=out_size, mode="bilinear", align_corners=False)
        return preds, {}
