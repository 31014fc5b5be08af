"""One MLoRE block (official `MOEBlock`): shared low-rank experts under task routers, a task expert, a generic conv.

Per task t, input x [B, C, H, W] (stride 16):
  u = task_in[t](x)                                   1×1 conv (official conv1)
  g, prob_mix = router[t](u)                          image-level noisy top-k gates [B, E] (router.py)
  y = expert_norm[t](Σ_i g_i M_i W_i u)               shared experts (lowrank.py) under the task's BatchNorm
      + prob_mix · task_expert[t](u)                  task-specific low-rank expert (rank spe_rank, conv2)
      + generic(u.detach())                           3×3 conv shared by all tasks (share_conv): its weights learn
                                                      from every task, no gradient reaches u through it
  out = tail_proj[t](GELU(tail_norm[t](y)))           the official order inside every block (bn, GELU, conv3)

Forms of the expert sum in training (all exact, `train_form`):
  - "merged" (default): per-image kernels Σ_i g_i K_i built under autograd each step (K_i = M_i W_i, computed once
    per block forward and shared by the tasks; one GEMM gives every task's per-image kernels), one grouped conv.
    It is the faster training form: its conv is one C→C conv whatever the number of experts, while "lowrank"
    convolves C→Σr_i (2.8× the width at the PASCAL ViT-S ranks); the kernel build is a pixel-free C·Σr·C·9 GEMM.
    Measured (benchmarks/bench_mlore.py, C=192, 32×32, B=2, N=15, fwd+bwd, RESULTS.md): expert path + generic
    conv 2.37× a plain 3×3 conv vs 3.97× for "lowrank" and 4.39× for the official all-experts form.
  - "lowrank": one 3×3 conv C→Σr_i, per-image rank scaling by the gates, one 1×1 conv Σr_i→C; it wins only when
    the feature maps are small next to Σr_i (the kernel build then dominates), so it stays an option.
Inference (`inference_form`, used whenever the block is in eval mode):
  - "merged" (default; the official `MLoRE_repara.py`): y as ONE 3×3 conv per image. The experts, the eval
    BatchNorm `expert_norm[t]` (running statistics: folding is exact only then, hence eval mode only), the task
    expert and the generic conv fold into a kernel + bias per image: Σ_i g_i K_i from one GEMM [B, E]×[E, C·C·9]
    for every task's images, then the BN scale, prob_mix·K_task and K_generic, and one grouped conv (groups = B).
    The weight-only part (`fold()`: K_i, BN scale/shift, K_task, K_generic; fp32 for bf16 weights) is cached for
    no-grad forwards, keyed on every source tensor's storage and version counter (an optimizer step, `.to()` or
    any in-place write recomputes it); `train()`/`eval()`, `load_state_dict` and a forward with gradients enabled
    (rebuilt under autograd, then maybe a fused optimizer step, which bumps no version counter) drop it. Nothing
    is in the state dict: it stays in training form. The cache holds E·C²·9 values per block (8 blocks: 0.16 GB
    fp32 at the PASCAL ViT-S preset, 2.5 GB at NYUD ViT-L, as the official `reparameter()` keeps too).
  - "unmerged": the training form with BN running statistics (three convs per task), for comparison.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.decoders.lowrank import LowRankConv, LowRankExperts, grouped_conv
from pretrain.models.decoders.router import ImageRouter

TRAIN_FORMS = ("merged", "lowrank")
INFERENCE_FORMS = ("merged", "unmerged")


class Folded(NamedTuple):
    """A block's weights in merged-inference form, in fp32 or wider (T: the block's tasks, C: channels, F = C·k·k:
    one output channel's kernel row; `kernels_EF` holds each expert's whole kernel flattened, C·F values)."""

    kernels_EF: Tensor  # [E, C·F] shared expert i as one conv K_i = M_i W_i
    bias_EC: Tensor  # [E, C] its bias M_i b_Wi + b_Mi
    scale_TC: Tensor  # [T, C] expert_norm[t]: γ / √(σ² + ε)
    shift_TC: Tensor  # [T, C] expert_norm[t]: β − scale·μ, plus the generic conv's bias
    task_TCF: Tensor  # [T, C, F] task expert as one conv
    task_TC: Tensor  # [T, C] its bias
    generic_CF: Tensor  # [C, F] the generic conv's kernel


class MLoREBlock(nn.Module):
    """An MLoRE block run for every task of `x_by_task`: {task: [B, C, H, W]} → {task: [B, C, H, W]}, gates."""

    def __init__(self, *, channels: int, tasks: Sequence[str], ranks: tuple[int, ...], spe_rank: int, top_k: int,
                 pre_softmax: bool, router_pool: str = "attention", router_hw: tuple[int, int] | None = None,
                 noise_softplus: bool = False, train_form: str = "merged", inference_form: str = "merged") -> None:
        super().__init__()
        if train_form not in TRAIN_FORMS:
            raise ValueError(f"train_form={train_form!r} is not one of {', '.join(TRAIN_FORMS)}")
        if inference_form not in INFERENCE_FORMS:
            raise ValueError(f"inference_form={inference_form!r} is not one of {', '.join(INFERENCE_FORMS)}")
        c = channels
        self.tasks, self.train_form, self.inference_form = tuple(tasks), train_form, inference_form
        self.experts = LowRankExperts(channels=c, ranks=ranks)
        self.generic = nn.Conv2d(c, c, 3, padding=1)
        self.task_in = nn.ModuleDict({t: nn.Conv2d(c, c, 1) for t in self.tasks})
        self.task_expert = nn.ModuleDict({t: LowRankConv(channels=c, rank=spe_rank) for t in self.tasks})
        self.expert_norm = nn.ModuleDict({t: nn.BatchNorm2d(c) for t in self.tasks})
        self.tail_norm = nn.ModuleDict({t: nn.BatchNorm2d(c) for t in self.tasks})
        self.tail_proj = nn.ModuleDict({t: nn.Conv2d(c, c, 1) for t in self.tasks})
        self.router = nn.ModuleDict({t: ImageRouter(
            channels=c, num_experts=len(ranks), top_k=top_k, pre_softmax=pre_softmax, pool=router_pool,
            pool_hw=router_hw, noise_softplus=noise_softplus) for t in self.tasks})
        self._fold_cache: tuple[tuple, Folded] | None = None  # (source versions, fold) of no-grad eval forwards
        self.register_load_state_dict_post_hook(_drop_fold_cache)

    @property
    def merged_inference(self) -> bool:
        """Whether forward runs the merged form: eval mode (BN running statistics) and inference_form="merged"."""
        return not self.training and self.inference_form == "merged"

    def forward(self, x_by_task: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Args: x_by_task {task: [B, C, H, W]}. Returns ({task: [B, C, H, W]}, {task: gates [B, E]})."""
        u, gates, prob_mix = {}, {}, {}
        for task, x_BCHW in x_by_task.items():
            u[task] = self.task_in[task](x_BCHW)
            gates[task], prob_mix[task] = self.router[task](u[task])
        if self.merged_inference:
            y = self.merged_mix(u, gates, prob_mix)
        else:
            y = {t: self.expert_norm[t](mix) + self.task_expert[t](u[t]) * prob_mix[t][:, None, None, None]
                 + self.generic(u[t].detach()) for t, mix in self.expert_mix(u, gates).items()}
        return {t: self.tail_proj[t](F.gelu(self.tail_norm[t](y[t]))) for t in y}, gates

    def expert_mix(self, u: dict[str, Tensor], gates: dict[str, Tensor]) -> dict[str, Tensor]:
        """Σ_i g_i M_i W_i u per task in the `train_form`; merged: kernels for every task's images in one GEMM.

        Args: u {task: [B, C, H, W]}; gates {task: [B, E]}. Returns {task: [B, C, H, W]}.
        """
        if self.train_form == "lowrank":
            return {t: self.experts.forward_lowrank(u[t], gates[t]) for t in u}
        kernels_EF, bias_EC = self.experts.kernels()  # once per block forward, shared by the tasks
        gates_RE = torch.cat(list(gates.values()))
        c, rows = self.experts.channels, [g.shape[0] for g in gates.values()]
        kernel_ROF = (gates_RE @ kernels_EF).view(gates_RE.shape[0], c, -1).split(rows)
        bias_RO = (gates_RE @ bias_EC).split(rows)
        k = self.experts.kernel_size
        return {t: grouped_conv(u[t], kern, bias, k) for t, kern, bias in zip(u, kernel_ROF, bias_RO)}

    def merged_mix(self, u: dict[str, Tensor], gates: dict[str, Tensor],
                   prob_mix: dict[str, Tensor]) -> dict[str, Tensor]:
        """Merged inference: expert_norm(mix) + prob_mix·task expert + generic as one grouped conv per task.

        Args: u {task: [B, C, H, W]} (after task_in); gates {task: [B, E]}; prob_mix {task: [B]}.
        Returns {task: [B, C, H, W]} in u's dtype (the kernels are built in fp32 or wider, then cast).
        """
        fold = self.folded()
        c, k = self.experts.channels, self.experts.kernel_size
        gates_RE = torch.cat([gates[t] for t in u]).to(fold.kernels_EF.dtype)
        rows = [gates[t].shape[0] for t in u]
        mix_ROF = (gates_RE @ fold.kernels_EF).view(gates_RE.shape[0], c, -1).split(rows)
        mix_RO = (gates_RE @ fold.bias_EC).split(rows)
        out = {}
        for task, mix_BOF, mix_BO in zip(u, mix_ROF, mix_RO):
            i, p_B1 = self.tasks.index(task), prob_mix[task].to(fold.kernels_EF.dtype)[:, None]
            kernel_BOF = torch.addcmul(fold.generic_CF, mix_BOF, fold.scale_TC[i, :, None])
            kernel_BOF.addcmul_(p_B1[:, :, None], fold.task_TCF[i])
            bias_BO = torch.addcmul(fold.shift_TC[i], mix_BO, fold.scale_TC[i]).addcmul_(p_B1, fold.task_TC[i])
            dtype = u[task].dtype
            out[task] = grouped_conv(u[task], kernel_BOF.to(dtype), bias_BO.to(dtype), k)
        return out

    def fold(self) -> Folded:
        """The weight-only part of merged inference from the current weights and BN running statistics.

        Exact up to float rounding: each expert M_i W_i is one linear conv (zero padding and biases commute with
        the pointwise M_i), and an eval BatchNorm is a per-channel affine map. In fp32 for bf16 weights (folding
        the BN scale into a bf16 kernel would round it twice). Differentiable.
        """
        dtype = torch.promote_types(self.generic.weight.dtype, torch.float32)
        kernels_EF, bias_EC = self.experts.kernels(dtype)
        scale, shift, task_k, task_b = [], [], [], []
        for t in self.tasks:
            bn = self.expert_norm[t]
            scale_C = bn.weight.to(dtype) * torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
            scale.append(scale_C)
            shift.append(bn.bias.to(dtype) - scale_C * bn.running_mean.to(dtype) + self.generic.bias.to(dtype))
            kernel_CF, bias_C = self.task_expert[t].kernel(dtype)
            task_k.append(kernel_CF)
            task_b.append(bias_C)
        return Folded(kernels_EF, bias_EC, torch.stack(scale), torch.stack(shift), torch.stack(task_k),
                      torch.stack(task_b), self.generic.weight.to(dtype).flatten(1))

    def folded(self) -> Folded:
        """`fold()`, cached across no-grad forwards until a source tensor changes (storage or version counter)."""
        if torch.is_grad_enabled():  # the weights must get gradients: build under autograd, keep nothing; an
            self._fold_cache = None  # optimizer step may follow, and fused kernels leave version counters alone
            return self.fold()
        sources = list(itertools.chain(self.experts.parameters(), self.generic.parameters(),
                                       self.expert_norm.parameters(), self.expert_norm.buffers(),
                                       self.task_expert.parameters()))
        if any(t.is_inference() for t in sources):  # weights made under inference_mode have no version counter
            return self.fold()
        key = tuple((t.data_ptr(), t._version) for t in sources)
        if self._fold_cache is None or self._fold_cache[0] != key:
            self._fold_cache = None  # free the old fold before building the new one
            self._fold_cache = (key, self.fold())
        return self._fold_cache[1]

    def train(self, mode: bool = True) -> MLoREBlock:
        self._fold_cache = None  # training changes weights and BN statistics; eval rebuilds it on first use
        return super().train(mode)


def _drop_fold_cache(block: MLoREBlock, _incompatible_keys: object) -> None:
    block._fold_cache = None  # loaded weights: the version counters would catch it too, this frees the memory now
