"""The task-routed MoE vision transformer, built from timm parts.

Parameter names follow timm's `VisionTransformer` (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.{i}.norm1/attn/norm2/mlp`, `norm`) so a dense timm state dict maps onto the dense parts by name
(see `upcycle.py`). The block is our own small class because MoE layers need the per-sample task ids
(`task_B`) as an explicit argument; timm's `Block` has no way to pass them.

MoE placement (`moe_layout`):
- `modsquad`: even blocks = MoE attention + dense MLP, odd blocks = dense MHSA + MoE MLP (Mod-Squad).
- `m3vit`: MoE MLP in odd blocks, dense attention everywhere (M3ViT).
- `dense`: a plain ViT (baseline); `task_B` then only selects the task embedding.

The backbone takes normalised float images; `MultiTaskModel` turns uint8 batches into those.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.layers import (
    Attention,
    LayerNorm,
    LayerScale,
    Mlp,
    PatchEmbed,
    resample_abs_pos_embed,
    trunc_normal_,
)
from torch import Tensor, nn

from pretrain.models.sample_random import KeyedDropPath

logger = logging.getLogger(__name__)

PLACEMENTS = ("modsquad", "m3vit", "dense")
TASK_EMBED_INITS = ("zero", "randn")
# what `auto` means per placement: the official code's effective inits (MOE.md, "Initialisation")
PLACEMENT_INITS: dict[str, dict[str, str]] = {
    "modsquad": {"init": "modsquad", "router_init": "trunc_normal"},
    "m3vit": {"init": "m3vit", "router_init": "uniform"},
    "dense": {"init": "timm", "router_init": "trunc_normal"},
}


def moe_layout(placement: str, depth: int) -> list[tuple[bool, bool]]:
    """(attention is MoE, MLP is MoE) for each block index under a placement name."""
    if placement == "modsquad":
        return [(i % 2 == 0, i % 2 == 1) for i in range(depth)]
    if placement == "m3vit":
        return [(False, i % 2 == 1) for i in range(depth)]
    if placement == "dense":
        return [(False, False)] * depth
    raise ValueError(f"unknown MoE placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")


def take_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    """Block indices to tap, timm's convention: None = all, int n = last n blocks, sequence = those (negatives wrap)."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"indices={indices}: must take between 1 and depth={depth} last blocks")
        return list(range(depth - indices, depth))
    taken = [i % depth if -depth <= i < depth else None for i in indices]
    if None in taken:
        raise ValueError(f"indices={list(indices)}: out of range for depth={depth}")
    return taken  # type: ignore[return-value]


class Block(nn.Module):
    """Pre-norm transformer block whose attention and/or MLP may be task-routed MoE layers.

    `attn_routed`/`mlp_routed` say which sub-layers take `(x_BND, task_B)` instead of `x_BND`.
    """

    def __init__(self, *, dim: int, attn: nn.Module, mlp: nn.Module, attn_routed: bool, mlp_routed: bool,
                 drop_path: float = 0.0, init_values: float | None = None) -> None:
        super().__init__()
        self.attn_routed = attn_routed
        self.mlp_routed = mlp_routed
        self.norm1 = LayerNorm(dim)
        self.attn = attn
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = KeyedDropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = mlp
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = KeyedDropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x_BND: Tensor, task_B: Tensor) -> Tensor:
        """x_BND [B,N,D], task_B [B] int64 → [B,N,D]."""
        h = self.norm1(x_BND)
        h = self.attn(h, task_B) if self.attn_routed else self.attn(h)
        x_BND = x_BND + self.drop_path1(self.ls1(h))
        h = self.norm2(x_BND)
        h = self.mlp(h, task_B) if self.mlp_routed else self.mlp(h)
        return x_BND + self.drop_path2(self.ls2(h))


def _init_dense(module: nn.Module) -> None:
    """timm's ViT init for dense Linear layers (trunc-normal 0.02, zero bias); MoE layers keep their own init."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """ViT with an optional class token, absolute position embedding resampled to any input grid, optional per-task
    embedding, and task-routed MoE layers placed by `placement`.

    Args:
        img_size: size the position embedding is stored for, int (square) or (h, w); an input whose patch grid
            differs is resampled on the fly, one at the stored grid is not.
        class_token: prepend a learned class token (timm's default). False = the geometry of MLoRE's official ViT
            (`mlore_import.py`): patch tokens only, `pos_embed` [1, h·w, D], `num_prefix_tokens` 0.
        patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the usual ViT shape.
        drop_path: stochastic-depth rate of the last block (linear ramp from 0).
        init_values: LayerScale init (None = no LayerScale, as timm's plain ViT).
        num_tasks: T; size of the task embedding and of each MoE layer's router stack.
        task_embed: add a learned per-task vector to the tokens before every block (Mod-Squad).
        task_embed_init: `zero` (no weight decay; an upcycled model then starts as the dense one) or `randn`
            (std `task_embed_std`, weight-decayed: Mod-Squad's `torch.randn(1, T, D)`, std 1, which its optimizer
            groups decay).
        dense_attn_head_dim: head dim of the dense attention blocks; 0 = embed_dim / num_heads. Mod-Squad's ViT-B
            uses 128 (its `head_dim` reaches the dense `Attention` too: qkv D -> 3*H*128, proj H*128 -> D).
        placement: `modsquad` | `m3vit` | `dense` (module docstring).
        moe_mlp_layer: factory called with the MoE contract's keywords (`dim`, `hidden_dim`, `num_experts`,
            `top_k`, `num_tasks`, `gate`, `noisy`, `router_init`, `act_layer`, `bias`, `usage_momentum`,
            `mi_ema`, and only when set by the config: `init`, `prob_eps`, `usage_in_eval`); required when the
            placement has MoE MLPs. The engine passes a DeepSpeed-backed one.
        moe_mlp_kwargs: keywords for `moe_mlp_layer` other than `dim`, `num_tasks`, `act_layer`, `bias`.
        moe_attn_layer, moe_attn_kwargs: the same for MoE attention (`modsquad` only).
    """

    def __init__(self, *, img_size: int | tuple[int, int] = 224, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, init_values: float | None = None, class_token: bool = True,
                 num_tasks: int = 1, task_embed: bool = False,
                 task_embed_init: str = "zero", task_embed_std: float = 1.0, dense_attn_head_dim: int = 0,
                 placement: str = "dense",
                 moe_mlp_layer: Callable[..., nn.Module] | None = None,
                 moe_mlp_kwargs: dict[str, Any] | None = None, moe_attn_layer: Callable[..., nn.Module] | None = None,
                 moe_attn_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_tasks = num_tasks
        self.num_prefix_tokens = 1 if class_token else 0
        self.placement = placement
        # NHWC output + no strict size: any input size works; inputs not divisible by the patch are padded.
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim,
                                      output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + self.num_prefix_tokens, embed_dim))
        if task_embed_init not in TASK_EMBED_INITS:
            raise ValueError(f"task_embed_init={task_embed_init!r} is not one of {TASK_EMBED_INITS}")
        self.task_embed_init = task_embed_init
        self.task_embed = nn.Parameter(torch.zeros(num_tasks, embed_dim)) if task_embed else None
        layout = moe_layout(placement, depth)
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear ramp; no tensor (meta-safe)
        blocks = []
        for i, (attn_moe, mlp_moe) in enumerate(layout):
            if attn_moe:
                attn = _required(moe_attn_layer, "moe_attn_layer", placement)(
                    dim=embed_dim, num_tasks=num_tasks, qkv_bias=qkv_bias, **(moe_attn_kwargs or {}))
            else:
                attn = Attention(embed_dim, num_heads=num_heads, attn_head_dim=dense_attn_head_dim or None,
                                 qkv_bias=qkv_bias)
                _init_dense(attn)
            if mlp_moe:
                mlp = _required(moe_mlp_layer, "moe_mlp_layer", placement)(
                    dim=embed_dim, num_tasks=num_tasks, act_layer=nn.GELU, bias=True, **(moe_mlp_kwargs or {}))
            else:
                mlp = Mlp(in_features=embed_dim, hidden_features=int(embed_dim * mlp_ratio), act_layer=nn.GELU)
                _init_dense(mlp)
            blocks.append(Block(dim=embed_dim, attn=attn, mlp=mlp, attn_routed=attn_moe, mlp_routed=mlp_moe,
                                drop_path=dpr[i], init_values=init_values))
        self.blocks = nn.ModuleList(blocks)
        self.norm = LayerNorm(embed_dim)
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.task_embed is not None and task_embed_init == "randn":
            nn.init.normal_(self.task_embed, std=task_embed_std)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) excluded from weight decay."""
        names = {"pos_embed"} | ({"cls_token"} if self.cls_token is not None else set())
        return names | ({"task_embed"} if self.task_embed is not None and self.task_embed_init == "zero" else set())

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """x [B,3,H,W] → tokens [B,P+h·w,D] (P = num_prefix_tokens: the class token, if any, first) with the
        position embedding added, and the grid (h, w)."""
        x_BhwD = self.patch_embed(x)
        B, h, w, D = x_BhwD.shape
        # at the stored grid timm returns the parameter itself (no interpolation per forward)
        pos = resample_abs_pos_embed(self.pos_embed, new_size=(h, w), old_size=self.patch_embed.grid_size,
                                     num_prefix_tokens=self.num_prefix_tokens)
        x_BND = x_BhwD.reshape(B, h * w, D)
        if self.cls_token is not None:
            x_BND = torch.cat([self.cls_token.expand(B, -1, -1), x_BND], dim=1)
        # timm releases differ in whether the resampled embedding keeps the weights' dtype (bf16 under DeepSpeed)
        return x_BND + pos.to(x_BND.dtype), (h, w)

    def _check_task(self, x: Tensor, task_B: Tensor) -> None:
        if task_B.dtype != torch.long or task_B.shape != (x.shape[0],):
            raise ValueError(f"task_B must be int64 of shape [{x.shape[0]}], got {task_B.dtype} {tuple(task_B.shape)}")

    def _block(self, i: int, x_BND: Tensor, task_B: Tensor) -> Tensor:
        if self.task_embed is not None:
            x_BND = x_BND + self.task_embed[task_B].unsqueeze(1)
        return self.blocks[i](x_BND, task_B)

    def forward_features(self, x: Tensor, task_B: Tensor, norm: bool = True) -> Tensor:
        """x [B,3,H,W] normalised float, task_B [B] int64 → tokens [B,P+h·w,D] (class token first, if any),
        final-normed unless `norm=False` (Mod-Squad's class path pools the un-normed tokens:
        `ClsHead(order="modsquad")`)."""
        self._check_task(x, task_B)
        x_BND, _ = self._embed(x)
        for i in range(self.depth):
            x_BND = self._block(i, x_BND, task_B)
        return self.norm(x_BND) if norm else x_BND

    def forward_intermediates(self, x: Tensor, task_B: Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              stop_early: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Block outputs at `indices` (timm's signature and conventions, prefix tokens dropped).

        Args:
            x: [B,3,H,W] normalised float images; task_B: [B] int64 task ids.
            indices: None = every block, int n = last n blocks, sequence = those block indices.
            norm: apply the final norm to each intermediate.
            output_fmt: `NCHW` → [B,D,h,w] maps (h = ceil(H/patch)); `NLC` → [B,h·w,D].
            intermediates_only: return only the list; otherwise (final-normed tokens [B,P+h·w,D], list).
            stop_early: skip blocks after the last tapped one (only with intermediates_only).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}: expected NCHW or NLC")
        self._check_task(x, task_B)
        take = set(take_indices(self.depth, indices))
        last = max(take) if (stop_early and intermediates_only) else self.depth - 1
        x_BND, (h, w) = self._embed(x)
        outs = []
        for i in range(last + 1):
            x_BND = self._block(i, x_BND, task_B)
            if i in take:
                y = (self.norm(x_BND) if norm else x_BND)[:, self.num_prefix_tokens:]
                outs.append(y.transpose(1, 2).reshape(y.shape[0], -1, h, w) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return outs
        return self.norm(x_BND), outs

    def forward(self, x: Tensor, task_B: Tensor) -> Tensor:
        """Same as `forward_features`."""
        return self.forward_features(x, task_B)


def _required(factory: Callable[..., nn.Module] | None, name: str, placement: str) -> Callable[..., nn.Module]:
    if factory is None:
        raise ValueError(f"placement {placement!r} has MoE layers but no {name} factory was given")
    return factory
