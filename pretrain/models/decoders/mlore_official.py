"""Reference transcription of the official MLoRE block in its original module names and forms (not for training).

Written from YuqiYang213/MLoRE `models/transformers/MLoRE.py` (`LoraBlock`, `SpatialAtt`, `MOEBlock`) and
`MLoRE_repara.py` (`reparameter`, per-image merge loop), keeping what makes it slow and what fixes its numbers:
every expert computed at full width and summed, top-k masking in a Python loop over images and dropped experts,
and a merged inference that builds and runs one kernel per image in a Python loop. It is the golden model of
tests/test_mlore.py (its state dict also fixes the official key names and shapes for mlore_keys.py) and the
"official" rows of benchmarks/bench_mlore.py. MLoREBlock (mlore_block.py) is the implementation to use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class OfficialLora(nn.Module):
    """`LoraBlock`: W (k×k conv C→r), M (1×1 conv r→C)."""

    def __init__(self, channels: int, rank: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.W = nn.Conv2d(channels, rank, kernel_size, padding=kernel_size // 2)
        self.M = nn.Conv2d(rank, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.M(self.W(x))

    def merged(self) -> tuple[Tensor, Tensor]:
        """The official `reparameter()`: (kernel [C, C, k, k], bias [C])."""
        kernel = (self.W.weight.permute(2, 3, 1, 0) @ self.M.weight.permute(2, 3, 1, 0)).permute(3, 2, 0, 1)
        bias = self.M.bias + (self.W.bias.reshape(1, 1, 1, -1) @ self.M.weight.permute(2, 3, 1, 0)).reshape(-1)
        return kernel, bias


class OfficialSpatialAtt(nn.Module):
    """`SpatialAtt` with `with_feat=False`: a 2·(C/4) routing descriptor [B, C/2, 1, 1]."""

    def __init__(self, channels: int, hw: int) -> None:
        super().__init__()
        d = channels // 4
        self.conv1 = nn.Conv2d(channels, d, 1)
        self.ln = nn.LayerNorm(d)
        self.convsp = nn.Linear(hw, 1)
        self.ln_sp = nn.LayerNorm(channels)
        self.conv2 = nn.Conv2d(channels, d, 1)
        self.conv3 = nn.Conv2d(d, d, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        feat = self.conv1(x)
        feat = self.ln(feat.reshape(n, -1, h * w).permute(0, 2, 1)).permute(0, 2, 1).reshape(n, -1, h, w)
        feat = self.conv3(F.gelu(feat))
        feat_sp = self.convsp(x.reshape(n, -1, h * w)).reshape(n, 1, -1)
        feat_sp = self.conv2(F.gelu(self.ln_sp(feat_sp).reshape(n, -1, 1, 1)))
        feat = feat.reshape(n, feat.shape[1], h * w).mean(dim=2).reshape(n, -1, 1, 1)
        return torch.cat([feat, feat_sp], dim=1)


class OfficialMoEBlock(nn.Module):
    """`MOEBlock` (kernel_size 3): forward(x, task) → (out [B, C, H, W], gates [B, E]); official init of experts."""

    def __init__(self, *, channels: int, tasks: Sequence[str], ranks: Sequence[int], spe_rank: int, top_k: int,
                 pre_softmax: bool, hw: int) -> None:
        super().__init__()
        c, self.num_lora, self.pre_softmax = channels, len(ranks), pre_softmax
        self.desert_k = len(ranks) - top_k
        self.lora_list_1 = nn.ModuleList(OfficialLora(c, r) for r in ranks)
        for lora in self.lora_list_1:
            for conv in (lora.W, lora.M):
                nn.init.kaiming_uniform_(conv.weight, a=5 ** 0.5)
                nn.init.zeros_(conv.bias)
        self.conv1 = nn.ModuleDict({t: nn.Conv2d(c, c, 1) for t in tasks})
        self.conv2 = nn.ModuleDict({t: OfficialLora(c, spe_rank) for t in tasks})
        self.conv3 = nn.ModuleDict({t: nn.Conv2d(c, c, 1) for t in tasks})
        self.share_conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.ModuleDict({t: nn.BatchNorm2d(c) for t in tasks})
        self.bn_all = nn.ModuleDict({t: nn.BatchNorm2d(c) for t in tasks})
        self.router_1 = nn.ModuleDict({t: nn.ModuleList([OfficialSpatialAtt(c, hw),
                                                         nn.Conv2d(c // 2, 2 * len(ranks) + 1, 1)]) for t in tasks})

    def route(self, out: Tensor, task: str, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Gates [B, E] (masked in the official double loop) and prob_mix [B, 1, 1, 1]; `noise` [B, E] if training."""
        n = out.shape[0]
        prob_all = self.router_1[task][1](self.router_1[task][0](out)).flatten(1)
        raw, std = prob_all[:, :self.num_lora], prob_all[:, self.num_lora:2 * self.num_lora]
        prob_mix = prob_all[:, 2 * self.num_lora].reshape(n, 1, 1, 1)
        if noise is not None:
            raw = raw + noise * std
        if self.pre_softmax:
            raw = raw.clone()
            drop = torch.topk(raw, self.desert_k, dim=1, largest=False)[1]
            for j in range(n):
                for i in range(self.desert_k):
                    raw[j, drop[j, i]] = -1e10
            return torch.softmax(raw, dim=1), prob_mix
        probs = torch.softmax(raw, dim=1)
        drop = torch.topk(probs, self.desert_k, dim=1, largest=False)[1]
        gates = probs.clone()
        for j in range(n):
            for i in range(self.desert_k):
                gates[j, drop[j, i]] = 0
        return gates, prob_mix

    def forward(self, x: Tensor, task: str, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out = self.conv1[task](x)
        gates, prob_mix = self.route(out, task, noise)
        lora = torch.stack([expert(out) for expert in self.lora_list_1], dim=1)  # every expert at full width
        mix = (lora * gates[:, :, None, None, None]).sum(dim=1)
        y = self.bn_all[task](mix) + self.conv2[task](out) * prob_mix + self.share_conv(out.detach())
        return self.conv3[task](F.gelu(self.bn[task](y))), gates

    @torch.no_grad()
    def reparameter(self) -> None:
        """The official `reparameter()`: every expert's and task expert's merged kernel, computed once."""
        self.virt = [lora.merged() for lora in self.lora_list_1]
        self.virt_task = {t: lora.merged() for t, lora in self.conv2.items()}

    @torch.no_grad()
    def merged_loop(self, out: Tensor, task: str, gates: Tensor, prob_mix: Tensor) -> Tensor:
        """The official merged conv: per image, Σ_i g_i K_i in a loop over experts, BN folded, one conv."""
        spe_k, spe_b = self.virt_task[task]
        bn = self.bn_all[task]
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        outs = []
        for s in range(out.shape[0]):
            k, b = 0, 0
            for i, (kern, bias) in enumerate(self.virt):
                k = k + kern * gates[s, i]
                b = b + bias * gates[s, i]
            k, b = k * scale.reshape(-1, 1, 1, 1), bn.bias + (b - bn.running_mean) * scale
            k = k + spe_k * prob_mix[s, 0] + self.share_conv.weight
            b = b + spe_b * prob_mix[s, 0].reshape(-1) + self.share_conv.bias
            outs.append(F.conv2d(out[s:s + 1], k, b, padding=1))
        return torch.cat(outs)

    @torch.no_grad()
    def forward_merged_loop(self, x: Tensor, task: str) -> tuple[Tensor, Tensor]:
        """The official inference form (after `reparameter()`), eval mode: (out [B, C, H, W], gates [B, E])."""
        out = self.conv1[task](x)
        gates, prob_mix = self.route(out, task)
        y = self.merged_loop(out, task, gates, prob_mix)
        return self.conv3[task](F.gelu(self.bn[task](y))), gates
