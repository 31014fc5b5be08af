"""ViTDet simple feature pyramid (Li et al. 2022): four scales from the last block's single-scale map.

From a stride-p map: 2× deconv twice (p/4), one 2× deconv (p/2), identity (p), 2× max-pool (2p); then per level
a 1×1 conv and a 3×3 conv, each followed by a norm. With p=16 the strides are 4/8/16/32, as an FPN's P2-P5.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from timm.layers import LayerNorm2d
from torch import Tensor, nn

logger = logging.getLogger(__name__)

SCALES = (4.0, 2.0, 1.0, 0.5)  # output stride = patch / scale


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "ln":
        return LayerNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(32, channels), channels)
    raise ValueError(f"pyramid norm {kind!r}: expected 'ln' (LayerNorm2d, ViTDet) or 'gn' (GroupNorm)")


def _resample(scale: float, dim: int, norm: str) -> tuple[nn.Module, int]:
    """The scale-changing stem for one level and its output width."""
    if scale == 4.0:
        stem = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), _norm(norm, dim // 2), nn.GELU(),
                             nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2))
        return stem, dim // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.MaxPool2d(2, stride=2), dim
    raise ValueError(f"unsupported pyramid scale {scale}")


class SimpleFeaturePyramid(nn.Module):
    """Four-level pyramid from one ViT map.

    Args:
        in_dim: ViT width D (divisible by 4).
        out_channels: C of every level (torchvision detectors read this int).
        norm: `ln` (LayerNorm2d, ViTDet) or `gn` (GroupNorm).
    """

    def __init__(self, *, in_dim: int, out_channels: int = 256, norm: str = "ln") -> None:
        super().__init__()
        if in_dim % 4:
            raise ValueError(f"pyramid in_dim={in_dim} must be divisible by 4 (the stride p/4 level has D/4 channels)")
        self.out_channels = out_channels
        self.stems = nn.ModuleList()
        self.outs = nn.ModuleList()
        for scale in SCALES:
            stem, width = _resample(scale, in_dim, norm)
            self.stems.append(stem)
            self.outs.append(nn.Sequential(
                nn.Conv2d(width, out_channels, 1, bias=False), _norm(norm, out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), _norm(norm, out_channels)))

    def forward(self, x_BDhw: Tensor) -> OrderedDict[str, Tensor]:
        """x_BDhw [B,D,h,w] (stride p) → OrderedDict '0'..'3' of [B,C,4h,4w], [B,C,2h,2w], [B,C,h,w], [B,C,h/2,w/2]."""
        return OrderedDict((str(i), out(stem(x_BDhw))) for i, (stem, out) in enumerate(zip(self.stems, self.outs)))
