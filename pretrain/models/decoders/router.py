"""MLoRE's image-level router (one per task and block), its noisy top-k gates and the CV² load-balance loss.

Router (official `SpatialAtt` + a 1×1 conv): a 2·(C/4) descriptor from
  (a) per pixel Linear C→C/4 → LayerNorm → GELU, averaged over pixels, then Linear C/4→C/4, and
  (b) a spatial pooling of the map to one C-vector → LayerNorm → GELU → Linear C→C/4,
mapped by a Linear to 2E+1 values: E logits, E noise standard deviations, 1 scalar `prob_mix` (the weight of the
task-specific expert). In (a) the pixel mean is taken before the last Linear (the official code applies its 1×1
conv per pixel, then averages): both are linear, so the result is the same and C/4 × C/4 work per pixel is saved.

Pooling (b), option `pool`:
  - "linear": the official `Linear(H·W, 1)` over the flattened pixels. It ties the router to one feature-map size
    (`pool_hw`); needed to load official checkpoints.
  - "attention" (default): softmax over pixels of a 1×1 conv C→1, weighted sum; any resolution. Zero-initialised,
    so it starts as the mean.
  - "mean": plain average over pixels.

Gates (`route_top_k`): logits + N(0,1)·std in training only (std used raw as in the official code; with
`noise_softplus` softplus(std), which keeps the noise scale non-negative); keep the top-k experts per image:
  - pre_softmax=True: softmax over the kept logits only, so the kept gates sum to 1 (NYUD ViT-L config);
  - pre_softmax=False: softmax over all E, dropped gates set to 0, so the kept gates sum to < 1 (PASCAL configs).
Which experts are dropped is the official rule to the tie: `topk(E − k, largest=False)` over the (noisy) logits
when pre_softmax, else over the softmax probabilities (distinct logits can round to equal probabilities, in bf16
often). Keeping `topk(k)` of the largest instead picks other experts among tied values; torch.topk breaks ties the
same way on every call on one device, so gates are deterministic and equal the official ones (tests/test_mlore.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROUTER_POOLS = ("linear", "attention", "mean")


def route_top_k(logits_BE: Tensor, std_BE: Tensor, *, top_k: int, pre_softmax: bool, noisy: bool,
                noise_softplus: bool = False) -> Tensor:
    """Noisy top-k gates, zero outside the k kept experts of each image.

    Args:
        logits_BE, std_BE: router outputs [B, E]. top_k: experts kept per image. pre_softmax: see module docstring.
        noisy: add N(0,1)·std (training). noise_softplus: use softplus(std) instead of the raw value.
    Returns: gates_BE [B, E].
    """
    if noisy:
        scale_BE = F.softplus(std_BE) if noise_softplus else std_BE
        logits_BE = logits_BE + torch.randn_like(logits_BE) * scale_BE
    num_drop = logits_BE.shape[1] - top_k
    scores_BE = logits_BE if pre_softmax else logits_BE.softmax(dim=1)
    drop_idx_BD = scores_BE.topk(num_drop, dim=1, largest=False).indices  # the official call, ties included
    drop_BE = torch.zeros_like(scores_BE, dtype=torch.bool).scatter_(1, drop_idx_BD, True)
    if pre_softmax:
        return logits_BE.masked_fill(drop_BE, float("-inf")).softmax(dim=1)
    return scores_BE.masked_fill(drop_BE, 0.0)


def balance_loss(gates: list[Tensor]) -> Tensor:
    """CV² over experts of one block: rows of every task concatenated, averaged to one E-vector v, (std(v)/mean(v))².

    Args: gates: [B_t, E] masked gates per task. Returns: scalar (std unbiased, as `torch.std` in the official loss).
    """
    v_E = torch.cat(gates).mean(dim=0)
    return (v_E.std() / v_E.mean()) ** 2


class ImageRouter(nn.Module):
    """Image-level router of one task in one block: [B, C, H, W] → (gates [B, E], prob_mix [B])."""

    def __init__(self, *, channels: int, num_experts: int, top_k: int, pre_softmax: bool, pool: str = "attention",
                 pool_hw: tuple[int, int] | None = None, noise_softplus: bool = False) -> None:
        super().__init__()
        if pool not in ROUTER_POOLS:
            raise ValueError(f"router_pool={pool!r} is not one of {', '.join(ROUTER_POOLS)}")
        if pool == "linear" and not pool_hw:
            raise ValueError("router_pool='linear' needs router_hw=(h, w), the feature-map size it is tied to")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must lie in [1, {num_experts}] (number of experts)")
        d = channels // 4
        self.num_experts, self.top_k, self.pre_softmax = num_experts, top_k, pre_softmax
        self.pool_kind, self.noise_softplus = pool, noise_softplus
        self.pool_hw = tuple(pool_hw) if pool == "linear" else None
        self.feat_in = nn.Linear(channels, d)
        self.feat_norm = nn.LayerNorm(d)
        self.feat_out = nn.Linear(d, d)
        if pool == "linear":
            self.pool = nn.Linear(self.pool_hw[0] * self.pool_hw[1], 1)
            nn.init.trunc_normal_(self.pool.weight, std=0.02)  # the official ViT init applied to every nn.Linear
            nn.init.zeros_(self.pool.bias)
        elif pool == "attention":
            self.pool = nn.Conv2d(channels, 1, 1)
            nn.init.zeros_(self.pool.weight)
            nn.init.zeros_(self.pool.bias)
        self.pool_norm = nn.LayerNorm(channels)
        self.pool_out = nn.Linear(channels, d)
        self.logits = nn.Linear(2 * d, 2 * num_experts + 1)

    def _pool(self, x_BCHW: Tensor) -> Tensor:
        x_BCN = x_BCHW.flatten(2)
        if self.pool_kind == "mean":
            return x_BCN.mean(dim=2)
        if self.pool_kind == "attention":
            attn_B1N = self.pool(x_BCHW).flatten(2).softmax(dim=2)
            return (x_BCN * attn_B1N).sum(dim=2)
        if tuple(x_BCHW.shape[-2:]) != self.pool_hw:
            raise ValueError(f"router_pool='linear' was built for router_hw={self.pool_hw} feature maps but got "
                             f"{tuple(x_BCHW.shape[-2:])}; use router_pool='attention' for other sizes")
        return self.pool(x_BCN).squeeze(2)

    def forward(self, x_BCHW: Tensor) -> tuple[Tensor, Tensor]:
        """Args: x_BCHW [B, C, H, W]. Returns: gates_BE [B, E] (top-k masked), prob_mix_B [B] (unnormalised)."""
        feat_BNd = F.gelu(self.feat_norm(self.feat_in(x_BCHW.flatten(2).transpose(1, 2))))
        feat_Bd = self.feat_out(feat_BNd.mean(dim=1))
        pool_Bd = self.pool_out(F.gelu(self.pool_norm(self._pool(x_BCHW))))
        out_BO = self.logits(torch.cat([feat_Bd, pool_Bd], dim=1))
        e = self.num_experts
        gates_BE = route_top_k(out_BO[:, :e], out_BO[:, e:2 * e], top_k=self.top_k, pre_softmax=self.pre_softmax,
                               noisy=self.training, noise_softplus=self.noise_softplus)
        return gates_BE, out_BO[:, 2 * e]
