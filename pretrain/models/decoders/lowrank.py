"""Low-rank convolution experts of MLoRE and their three exact evaluation forms.

Expert i = a 3×3 conv C→r_i (W_i, bias) followed by a 1×1 conv r_i→C (M_i, bias) with nothing in between, so the
expert is one linear map whose C×C×3×3 kernel is K_i[o, c] = Σ_j M_i[o, j] W_i[j, c] with bias M_i b_Wi + b_Mi
(zero padding commutes with the pointwise M_i). A gate-weighted sum over experts is then one conv per image.

The E shared experts are stored stacked along the rank axis (R = Σ r_i) so the whole mixture runs as
  - `forward_lowrank`: one 3×3 conv C→R, per-image scaling of each expert's r_i channels by its gate, one 1×1
    conv R→C (never the E separate full-width outputs the official code computes and sums), or
  - merged: per-image kernels Σ_i g_i K_i from one GEMM [B, E]×[E, C·C·9] over `kernels()` and one
    `grouped_conv` (groups = B); with `kernels()` built under autograd each step this is also a training form in
    which the gradient reaches every W_i and M_i through the kernel product (mlore_block.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def grouped_conv(x_BCHW: Tensor, kernel_BOF: Tensor, bias_BO: Tensor, kernel_size: int) -> Tensor:
    """One conv per image in a single call: per-image kernels as the groups of one grouped convolution.

    Args:
        x_BCHW: input [B, C, H, W]. kernel_BOF: per-image kernels [B, O, C·k·k]. bias_BO: per-image biases [B, O].
    Returns: [B, O, H, W], zero padding k // 2.
    """
    b, c, h, w = x_BCHW.shape
    out = kernel_BOF.shape[1]
    weight = kernel_BOF.reshape(b * out, c, kernel_size, kernel_size)
    y = F.conv2d(x_BCHW.reshape(1, b * c, h, w), weight, bias_BO.reshape(b * out), padding=kernel_size // 2,
                 groups=b)
    return y.view(b, out, h, w)


class LowRankExperts(nn.Module):
    """E low-rank conv experts (C→r_i 3×3, r_i→C 1×1) stored stacked along the rank axis.

    Parameters: `w_weight` [R, C, k, k], `w_bias` [R], `m_weight` [C, R], `m_bias` [E, C] with R = Σ ranks.
    Initialisation as the official `LoraBlock.init_weights`: Kaiming-uniform (a=√5) per expert, zero biases.
    """

    def __init__(self, *, channels: int, ranks: tuple[int, ...], kernel_size: int = 3) -> None:
        super().__init__()
        if not ranks or min(ranks) < 1:
            raise ValueError(f"MLoRE expert ranks must be positive integers, got {ranks!r}")
        self.channels, self.ranks, self.kernel_size = channels, tuple(int(r) for r in ranks), kernel_size
        total = sum(self.ranks)
        self.w_weight = nn.Parameter(torch.empty(total, channels, kernel_size, kernel_size))
        self.w_bias = nn.Parameter(torch.zeros(total))
        self.m_weight = nn.Parameter(torch.empty(channels, total))
        self.m_bias = nn.Parameter(torch.zeros(len(self.ranks), channels))
        self.register_buffer("expert_of_rank_R", torch.repeat_interleave(
            torch.arange(len(self.ranks)), torch.tensor(self.ranks), output_size=total), persistent=False)
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # kaiming_uniform(a=√5) is U(±1/√fan_in); fan_in differs per expert for M (its rank r_i)
        bound_w = 1.0 / math.sqrt(self.channels * self.kernel_size ** 2)
        self.w_weight.uniform_(-bound_w, bound_w)
        for m_CR in self.m_weight.split(self.ranks, dim=1):
            m_CR.uniform_(-1.0 / math.sqrt(m_CR.shape[1]), 1.0 / math.sqrt(m_CR.shape[1]))
        self.w_bias.zero_()
        self.m_bias.zero_()

    def forward_lowrank(self, x_BCHW: Tensor, gates_BE: Tensor) -> Tensor:
        """Σ_i g_i M_i(W_i x) as one C→R conv, per-image rank scaling and one R→C conv.

        Args: x_BCHW [B, C, H, W]; gates_BE [B, E] (zeros for dropped experts). Returns [B, C, H, W].
        """
        b, _, h, w = x_BCHW.shape
        z_BRN = F.conv2d(x_BCHW, self.w_weight, self.w_bias, padding=self.kernel_size // 2).flatten(2)
        z_BRN = z_BRN * gates_BE[:, self.expert_of_rank_R, None]
        # the R→C 1×1 conv as a matmul: oneDNN has no fast path for a 1×1 conv on a view of [C, R] (slow_conv2d)
        y_BCN = torch.baddbmm((gates_BE @ self.m_bias)[:, :, None], self.m_weight.expand(b, -1, -1), z_BRN)
        return y_BCN.view(b, self.channels, h, w)

    def kernels(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Each expert as one conv: kernels [E, C·C·k·k] (rows: output channel, input channel, ky, kx), biases [E, C].

        Differentiable (the merged training form builds them every step, see `ExpertKernels`). `dtype`: compute in
        this dtype (merged inference folds bf16 weights in fp32); default the parameters' dtype.
        """
        w_RF, w_R, m_CR, m_EC = (p.to(dtype) for p in (self.w_weight.flatten(1), self.w_bias, self.m_weight,
                                                      self.m_bias))
        kernels_ECF = ExpertKernels.apply(w_RF, m_CR, self.ranks)
        bias_EC = torch.stack([m_Cr @ b_r for m_Cr, b_r in zip(m_CR.split(self.ranks, dim=1), w_R.split(self.ranks))])
        return kernels_ECF.flatten(1), bias_EC + m_EC


class ExpertKernels(torch.autograd.Function):
    """K[e] = M_e W_e for experts stored stacked along the rank axis, each written straight into one [E, C, F] buffer.

    Plain autograd over `split` + `stack` copies the whole E×C×F stack forward and concatenates the gradients
    backward (≈13% of a merged training step at C=192, RESULTS.md); here the per-expert GEMMs write their slices
    of the outputs and of dW, dMᵀ directly.
    """

    @staticmethod
    def forward(ctx, w_RF: Tensor, m_CR: Tensor, ranks: tuple[int, ...]) -> Tensor:
        out_ECF = w_RF.new_empty(len(ranks), m_CR.shape[0], w_RF.shape[1])
        start = 0
        for e, r in enumerate(ranks):
            torch.mm(m_CR[:, start:start + r], w_RF[start:start + r], out=out_ECF[e])
            start += r
        ctx.ranks = ranks
        ctx.save_for_backward(w_RF, m_CR)
        return out_ECF

    @staticmethod
    def backward(ctx, grad_ECF: Tensor):
        w_RF, m_CR = ctx.saved_tensors
        grad_ECF = grad_ECF.contiguous()
        grad_w_RF = torch.empty_like(w_RF)
        grad_m_RC = m_CR.new_empty(m_CR.shape[1], m_CR.shape[0])
        start = 0
        for e, r in enumerate(ctx.ranks):
            rows = slice(start, start + r)
            torch.mm(m_CR[:, rows].t(), grad_ECF[e], out=grad_w_RF[rows])
            torch.mm(w_RF[rows], grad_ECF[e].t(), out=grad_m_RC[rows])
            start += r
        return grad_w_RF, grad_m_RC.t(), None


class LowRankConv(nn.Module):
    """One low-rank conv expert: `w` 3×3 conv C→r then `m` 1×1 conv r→C (the task-specific expert of MLoRE).

    PyTorch's default conv init, biases included: the official `MOEBlock` calls `LoraBlock.init_weights` (zero
    biases) on the shared experts only, never on the task experts `conv2[t]`, and its ViT init leaves convs alone.
    """

    def __init__(self, *, channels: int, rank: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.w = nn.Conv2d(channels, rank, kernel_size, padding=kernel_size // 2)
        self.m = nn.Conv2d(rank, channels, 1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        """[B, C, H, W] → [B, C, H, W]."""
        return self.m(self.w(x_BCHW))

    def kernel(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """The expert as one conv: kernel [C, C·k·k], bias [C]; computed in `dtype` (default the weights')."""
        m_CR = self.m.weight.flatten(1).to(dtype)
        return m_CR @ self.w.weight.flatten(1).to(dtype), m_CR @ self.w.bias.to(dtype) + self.m.bias.to(dtype)
