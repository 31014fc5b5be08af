"""One MLoRE block (official `MOEBlock`): shared low-rank experts under task routers, a task expert, a generic conv.

Per task t, input x [B, C, H, W] (stride 16):
  u = task_in[t](x)                                   1×1 conv (official conv1)
  g, prob_mix = router[t](u)                          image-level noisy top-k gates [B, E] (router.py)
  y = expert_norm[t](Σ_i g_i M_i W_i u)               shared experts (lowrank.py) under the task's BatchNorm
      + prob_mix · task_expert[t](u)                  task-specific low-rank expert (rank spe_rank, conv2)
      + generic(u.detach())                           3×3 conv shared by all tasks (share_conv): its weights learn
                                                      from every task, no gradient reaches u through it
  out = tail_proj[t](GELU(tail_norm[t](y)))           the official order inside every block (bn, GELU, conv3)

Forms of the expert sum (all exact, selected by `train_form` outside `merge()`):
  - "merged" (default): per-image kernels Σ_i g_i K_i built under autograd each step (K_i = M_i W_i, computed once
    per block forward and shared by the tasks; one GEMM gives every task's per-image kernels), one grouped conv.
    It is the faster training form: its conv is one C→C conv whatever the number of experts, while "lowrank"
    convolves C→Σr_i (2.8× the width at the PASCAL ViT-S ranks); the kernel build is a pixel-free C·Σr·C·9 GEMM.
    Measured (benchmarks/bench_mlore.py, C=192, 32×32, B=2, N=15, fwd+bwd, RESULTS.md): expert path + generic
    conv 2.37× a plain 3×3 conv vs 3.97× for "lowrank" and 4.39× for the official all-experts form.
  - "lowrank": one 3×3 conv C→Σr_i, per-image rank scaling by the gates, one 1×1 conv Σr_i→C; it wins only when
    the feature maps are small next to Σr_i (the kernel build then dominates), so it stays an option.
Inference: `merge()` (eval mode) folds experts, the eval BatchNorm `expert_norm[t]`, the task expert and the
generic conv into one 3×3 kernel + bias per image: kernels from one GEMM [B, E]×[E, C·C·9], then the BN scale,
prob_mix·K_task and K_generic added in place, and one grouped conv (groups = B). The merged tensors are
non-persistent buffers: the state dict stays in training form, `train()` drops them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.decoders.lowrank import LowRankConv, LowRankExperts, grouped_conv
from pretrain.models.decoders.router import ImageRouter

TRAIN_FORMS = ("merged", "lowrank")
_MERGED = ("merged_kernels_EF", "merged_bias_EC", "merged_generic_OF", "merged_generic_O", "merged_scale_TO",
           "merged_shift_TO", "merged_task_TOF", "merged_task_TO")


class MLoREBlock(nn.Module):
    """An MLoRE block run for every task of `x_by_task`: {task: [B, C, H, W]} → {task: [B, C, H, W]}, gates."""

    def __init__(self, *, channels: int, tasks: Sequence[str], ranks: tuple[int, ...], spe_rank: int, top_k: int,
                 pre_softmax: bool, router_pool: str = "attention", router_hw: tuple[int, int] | None = None,
                 noise_softplus: bool = False, train_form: str = "merged") -> None:
        super().__init__()
        if train_form not in TRAIN_FORMS:
            raise ValueError(f"train_form={train_form!r} is not one of {', '.join(TRAIN_FORMS)}")
        c = channels
        self.tasks, self.train_form = tuple(tasks), train_form
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
        for name in _MERGED:
            self.register_buffer(name, None, persistent=False)
        self.merged = False

    def forward(self, x_by_task: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Args: x_by_task {task: [B, C, H, W]}. Returns ({task: [B, C, H, W]}, {task: gates [B, E]})."""
        u, gates, prob_mix = {}, {}, {}
        for task, x_BCHW in x_by_task.items():
            u[task] = self.task_in[task](x_BCHW)
            gates[task], prob_mix[task] = self.router[task](u[task])
        if self.merged:
            y = {t: self.merged_conv(u[t], t, gates[t], prob_mix[t]) for t in u}
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

    def merged_conv(self, u_BCHW: Tensor, task: str, gates_BE: Tensor, prob_mix_B: Tensor) -> Tensor:
        """After `merge()`: expert_norm(mix) + prob_mix·task expert + generic as one grouped conv → [B, C, H, W].

        Args: u_BCHW [B, C, H, W] (after task_in); gates_BE [B, E]; prob_mix_B [B].
        """
        t = self.tasks.index(task)
        b, c = u_BCHW.shape[:2]
        kernel_BOF = (gates_BE @ self.merged_kernels_EF).view(b, c, -1)
        kernel_BOF.mul_(self.merged_scale_TO[t, :, None]).add_(self.merged_generic_OF)
        kernel_BOF.addcmul_(prob_mix_B.view(b, 1, 1), self.merged_task_TOF[t].unsqueeze(0))
        bias_BO = ((gates_BE @ self.merged_bias_EC) * self.merged_scale_TO[t] + self.merged_shift_TO[t]
                   + self.merged_generic_O + prob_mix_B[:, None] * self.merged_task_TO[t])
        return grouped_conv(u_BCHW, kernel_BOF, bias_BO, self.experts.kernel_size)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold experts, eval `expert_norm`, task experts and the generic conv into per-image kernels at inference.

        Valid only with BatchNorm running statistics, so the block must be in eval mode; call again after loading
        new weights. Exact up to float rounding (tests/test_mlore.py checks ≤ 1e-5 relative).
        """
        if self.training:
            raise RuntimeError("MLoREBlock.merge() folds BatchNorm running statistics: call .eval() first")
        self.merged_kernels_EF, self.merged_bias_EC = self.experts.kernels()
        self.merged_generic_OF = self.generic.weight.flatten(1).clone()
        self.merged_generic_O = self.generic.bias.clone()
        scale, shift, task_k, task_b = [], [], [], []
        for t in self.tasks:
            bn = self.expert_norm[t]
            scale_O = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            scale.append(scale_O)
            shift.append(bn.bias - scale_O * bn.running_mean)
            kernel_OF, bias_O = self.task_expert[t].kernel()
            task_k.append(kernel_OF)
            task_b.append(bias_O)
        self.merged_scale_TO, self.merged_shift_TO = torch.stack(scale), torch.stack(shift)
        self.merged_task_TOF, self.merged_task_TO = torch.stack(task_k), torch.stack(task_b)
        self.merged = True

    def unmerge(self) -> None:
        """Drop the merged kernels; the block runs its `train_form` again."""
        for name in _MERGED:
            setattr(self, name, None)
        self.merged = False

    def train(self, mode: bool = True) -> MLoREBlock:
        if mode and self.merged:  # merged kernels hold eval BN statistics and frozen weights
            self.unmerge()
        return super().train(mode)
