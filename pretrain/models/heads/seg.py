"""Semantic segmentation heads on a simple feature pyramid: semantic FPN (Kirillov et al. 2019) or UPerNet.

Both use GroupNorm instead of (Sync)BatchNorm: batches are small and single-task per rank, and GroupNorm behaves
the same in training and eval without cross-rank statistics.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.heads.pyramid import SimpleFeaturePyramid
from pretrain.models.sample_random import KeyedDropout2d, count_term

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255


def conv_gn_relu(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         nn.GroupNorm(min(32, cout), cout), nn.ReLU(inplace=True))


def _up(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SemanticFPN(nn.Module):
    """Per level: (3×3 conv-GN-ReLU, 2× upsample) until stride of level 0, sum, → width `dim` at level-0 size."""

    def __init__(self, *, in_channels: int, dim: int = 128, num_levels: int = 4) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList(
            nn.Sequential(*[conv_gn_relu(in_channels if j == 0 else dim, dim) for j in range(max(1, i))])
            for i in range(num_levels))
        self.out_dim = dim

    def forward(self, feats: list[Tensor]) -> Tensor:
        """feats: levels [B,C,h_i,w_i], finest first → [B,dim,h_0,w_0]."""
        out = None
        for i, (head, f) in enumerate(zip(self.scale_heads, feats)):
            for j, layer in enumerate(head):
                f = layer(f)
                if i > 0:  # one 2× step per conv, to the exact size of the next finer level (odd sizes floor)
                    f = _up(f, feats[i - j - 1].shape[-2:])
            out = f if out is None else out + f
        return out


class UPerNetDecoder(nn.Module):
    """Pyramid pooling (scales 1,2,3,6) on the coarsest level + FPN top-down fusion + concat of all levels."""

    def __init__(self, *, in_channels: int, dim: int = 256, num_levels: int = 4,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.pool_scales = pool_scales
        self.ppm = nn.ModuleList(conv_gn_relu(in_channels, dim, 1) for _ in pool_scales)
        self.bottleneck = conv_gn_relu(in_channels + len(pool_scales) * dim, dim)
        self.laterals = nn.ModuleList(conv_gn_relu(in_channels, dim, 1) for _ in range(num_levels - 1))
        self.fpn_convs = nn.ModuleList(conv_gn_relu(dim, dim) for _ in range(num_levels - 1))
        self.fuse = conv_gn_relu(num_levels * dim, dim)
        self.out_dim = dim

    def forward(self, feats: list[Tensor]) -> Tensor:
        """feats: levels [B,C,h_i,w_i], finest first → [B,dim,h_0,w_0]."""
        top = feats[-1]
        pooled = [_up(conv(F.adaptive_avg_pool2d(top, s)), top.shape[-2:]) for s, conv in zip(self.pool_scales,
                                                                                              self.ppm)]
        lat = [conv(f) for conv, f in zip(self.laterals, feats[:-1])] + [self.bottleneck(torch.cat([top, *pooled], 1))]
        for i in range(len(lat) - 1, 0, -1):  # top-down: coarse context added into finer levels
            lat[i - 1] = lat[i - 1] + _up(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[-2:]
        return self.fuse(torch.cat([outs[0]] + [_up(x, size) for x in outs[1:]], dim=1))


SEG_HEADS: dict[str, Callable[..., nn.Module]] = {"fpn": SemanticFPN, "upernet": UPerNetDecoder}


class SegHead(nn.Module):
    """Pyramid + decoder + 1×1 classifier; logits upsampled to the input size.

    Args:
        in_dim: ViT width D. num_classes: C. kind: key of `SEG_HEADS`. pyramid_dim: pyramid width.
        decoder_dim: decoder width (semantic FPN's 128, UPerNet's 256 are the papers' usual choices at C=150).
        norm: pyramid norm (`ln` | `gn`).
    """

    def __init__(self, *, in_dim: int, num_classes: int = 150, kind: str = "fpn", pyramid_dim: int = 256,
                 decoder_dim: int | None = None, norm: str = "ln") -> None:
        super().__init__()
        if kind not in SEG_HEADS:
            raise ValueError(f"unknown seg head {kind!r}; expected one of {', '.join(SEG_HEADS)}")
        self.pyramid = SimpleFeaturePyramid(in_dim=in_dim, out_channels=pyramid_dim, norm=norm)
        dim = decoder_dim or (128 if kind == "fpn" else 256)
        self.decoder = SEG_HEADS[kind](in_channels=pyramid_dim, dim=dim)
        self.dropout = KeyedDropout2d(0.1)  # keyed per sample inside a keyed forward (sample_random.py)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def predictor_modules(self) -> list[nn.Module]:
        """The final classifier (counted as "heads"; pyramid and decoder are "decoder")."""
        return [self.classifier]

    def forward(self, feat_BDhw: Tensor, out_size: tuple[int, int]) -> Tensor:
        """feat_BDhw [B,D,h,w] (last ViT block) → logits [B,C,H,W] at `out_size` (H, W)."""
        feats: OrderedDict[str, Tensor] = self.pyramid(feat_BDhw)
        x = self.decoder(list(feats.values()))
        return _up(self.classifier(self.dropout(x)), out_size)

    @staticmethod
    def loss(logits_BCHW: Tensor, masks_BHW: Tensor) -> dict[str, Tensor]:
        """Pixel cross-entropy, 255 ignored, mean over labelled pixels → {"seg": scalar} (0 if none labelled)."""
        if masks_BHW.shape != (logits_BCHW.shape[0], *logits_BCHW.shape[-2:]):
            raise ValueError(f"seg masks shape {tuple(masks_BHW.shape)} does not match logits "
                             f"{tuple(logits_BCHW.shape)} (expected [B,H,W])")
        labelled = masks_BHW[masks_BHW != IGNORE_INDEX]
        if labelled.numel() and (int(labelled.min()) < 0 or int(labelled.max()) >= logits_BCHW.shape[1]):
            raise ValueError(f"seg mask values must lie in [0, {logits_BCHW.shape[1]}) or be {IGNORE_INDEX}; got "
                             f"[{int(labelled.min())}, {int(labelled.max())}]")
        ce = F.cross_entropy(logits_BCHW, masks_BHW, ignore_index=IGNORE_INDEX, reduction="sum")
        # mean over labelled pixels; an all-ignored batch gives 0 instead of torch's NaN. A keyed forward learns the
        # count, so the training side can make it the mean over the GLOBAL batch's pixels
        count_term("seg", labelled.numel())
        return {"seg": ce / max(labelled.numel(), 1)}
