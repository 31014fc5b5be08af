"""What the MLoRE and decoder tests share: one thread for tiny convs, relative error, BN statistics worth folding,
and the official `ConvHead` layout in checkpoint names."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs on a shared 2-core machine: one thread avoids OpenMP barriers stalled by preempted vCPUs.
    Imported by a test module, it applies to every test there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


def randomize_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics (so folding them is really tested)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


class OfficialConvHead(nn.Module):
    """The official `ConvHead` in checkpoint names: mt_proj (3×3 conv, BN, GELU), then linear_pred."""

    def __init__(self, c: int, n: int) -> None:
        super().__init__()
        self.mt_proj = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.GELU())
        self.linear_pred = nn.Conv2d(c, n, 1)
