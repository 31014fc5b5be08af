"""Auxiliary losses of task-routed MoE layers and the task x expert statistics they read.

Every loss here is a pure function returning an UN-weighted scalar; the trainer applies the weights. The
mutual-information loss follows Mod-Squad's `TaskMoE.get_aux_loss_and_clear` literally (epsilons included). What
Mod-Squad gets for free (one step holds every task, so P(t) = 1/T) we must build: `reduce_statistics` sums the
[T, E] statistics over data-parallel ranks and the layer keeps a decaying history of them (`mi_ema`), otherwise the
loss is identically zero when a step holds a single task. See MOE.md for the choices (P(t) weighting, gradient
scale of the reduced statistics).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_MI_EPS = 1e-4  # Mod-Squad's constant, used in four places of its MI loss


@dataclass
class RoutingStats:
    """Running sums of one MoE layer's routing statistics over one or more forwards (`a + b` adds them).

    probs_TE [T, E]: sum of p(e|x) over the tokens of task t (differentiable; global when a reducer is set).
    counts_TE [T, E]: routed token-slots (global when reduced). The rest are this rank's (local) sums, the
    statistics Mod-Squad's `get_aux_loss_and_clear` pools over its T passes: importance_E [E] = sum of gates,
    load_E [E] = counts or noisy load, probs_E [E] = sum of p, counts_E [E] = routed slots, lse_sq = sum of
    logsumexp(logits)^2 over tokens, tokens = token count.
    """

    probs_TE: Tensor
    counts_TE: Tensor
    importance_E: Tensor
    load_E: Tensor
    probs_E: Tensor
    counts_E: Tensor
    lse_sq: Tensor
    tokens: int

    def __add__(self, other: RoutingStats) -> RoutingStats:
        return RoutingStats(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    def detach(self) -> RoutingStats:
        return RoutingStats(*(v.detach() if isinstance(v, Tensor) else v
                              for v in (getattr(self, f) for f in self.__dataclass_fields__)))


def cv_squared(x_E: Tensor) -> Tensor:
    """Squared coefficient of variation var/mean^2 of a [E] vector (unbiased var, as Shazeer/M3ViT); 0 for E=1."""
    if x_E.numel() <= 1:
        return x_E.new_zeros(())
    x_E = x_E.float()
    return x_E.var() / (x_E.mean() ** 2 + 1e-10)


def cv_loss(importance_E: Tensor, load_E: Tensor) -> Tensor:
    """M3ViT / Shazeer balance loss CV^2(importance) + CV^2(load).

    Args:
        importance_E: [E] sum over tokens of the gate value given to each expert (differentiable).
        load_E: [E] routed token count per expert, or the differentiable probability-of-being-in-top-k sum.
    """
    return cv_squared(importance_E) + cv_squared(load_E)


def switch_loss(probs_E: Tensor, counts_E: Tensor) -> Tensor:
    """Switch/GShard balance loss E * sum_e P_e * f_e, as Mod-Squad codes it (both vectors L1-normalised).

    Args:
        probs_E: [E] sum over tokens of the router probabilities (differentiable).
        counts_E: [E] routed token-slots per expert (all k choices).
    """
    num_experts = probs_E.shape[0]
    p_E = F.normalize(probs_E.float(), p=1, dim=0)
    f_E = F.normalize(counts_E.float(), p=1, dim=0)
    return num_experts * (p_E * f_E).sum()


def z_loss(logits_SE: Tensor) -> Tensor:
    """Router z-loss mean_s logsumexp(logits_s)^2 over [S, E] logits (Mod-Squad: log(sum exp + 1e-4); no eps here)."""
    return torch.logsumexp(logits_SE.float(), dim=-1).pow(2).mean()


def mutual_information_loss(probs_TE: Tensor, counts_E: Tensor, top_k: int) -> Tensor:
    """Mod-Squad's MI loss -MI(T; E), exactly as `TaskMoE.get_aux_loss_and_clear` computes it.

    N = sum(F)/k, P(t,e) = S/(N + 1e-4), P(t) = sum_e P(t,e) + 1e-4, P(e) = sum_t P(t,e) + 1e-4,
    L = -sum_{t,e} P(t,e) * log(P(t,e) / (P(t) P(e)) + 1e-4).

    Args:
        probs_TE: [T, E] S[t, e] = sum over the tokens of task t of p(e|x) (differentiable).
        counts_E: [E] F[e] = token-slots routed to expert e (all tasks, all k choices).
        top_k: k, so that sum(F)/k is the token count.
    Returns:
        scalar loss (float32).
    """
    tokens = counts_E.float().sum() / top_k
    p_TE = probs_TE.float() / (tokens + _MI_EPS)
    p_T1 = p_TE.sum(dim=1, keepdim=True) + _MI_EPS
    p_1E = p_TE.sum(dim=0, keepdim=True) + _MI_EPS
    return -(p_TE * torch.log(p_TE / p_T1 / p_1E + _MI_EPS)).sum()


def balance_task_mass(probs_TE: Tensor, counts_TE: Tensor, top_k: int) -> Tensor:
    """Rescale each task's row so every task present in the statistics has the same mass: P(t) = 1/T_present.

    Raw token weighting would let the task with the most tokens per image (COCO at 1,024 px: 4,096 tokens vs 196
    for ImageNet at 224) and whichever task the recent steps drew dominate P(t). Mod-Squad runs every task on every
    image, so its P(t) is 1/T; this restores that. The scale factors come from counts (no gradient).

    Args:
        probs_TE: [T, E] per-task sums of router probabilities.
        counts_TE: [T, E] per-task routed token-slots (k per token).
        top_k: k.
    Returns:
        [T, E] rescaled probability sums with the same total token mass.
    """
    tokens_T = counts_TE.detach().float().sum(dim=1) / top_k
    present_T = tokens_T > 0
    num_present = present_T.sum().clamp(min=1)
    target_T = tokens_T.sum() / num_present
    scale_T = torch.where(present_T, target_T / tokens_T.clamp(min=1e-12), torch.zeros_like(tokens_T))
    return probs_TE * scale_T.to(probs_TE.dtype)[:, None]


def reduce_statistics(
    probs_TE: Tensor, counts_TE: Tensor, reducer: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """Sum the [T, E] statistics over data-parallel ranks with ONE reducer call.

    The value is the global sum; the gradient flows through the local part only, scaled by the world size W:
    data-parallel training averages gradients over ranks, so without the factor every rank would receive 1/W of
    the gradient of the global loss; with it the averaged gradient equals that of one process holding all ranks'
    tokens (checked by tests/dist_scripts/ep_parity.py).

    Args:
        probs_TE: [T, E] local probability sums (differentiable).
        counts_TE: [T, E] local routed token-slots.
        reducer: returns the SUM over ranks of a detached tensor.
    Returns:
        (probs_TE global, counts_TE global), float32.
    """
    local_TE = probs_TE.float()
    packed = torch.cat([local_TE.detach().flatten(), counts_TE.float().flatten(), local_TE.new_ones(1)])
    summed = reducer(packed)
    n = probs_TE.numel()
    world = summed[-1]
    global_TE = summed[:n].view_as(local_TE)
    probs_global_TE = world * local_TE + (global_TE - world * local_TE.detach())
    return probs_global_TE, summed[n : 2 * n].view_as(local_TE)


def prob_in_top_k(clean_SE: Tensor, noisy_SE: Tensor, noise_std_SE: Tensor, top_k: int) -> Tensor:
    """Shazeer et al.'s differentiable probability that each expert lands in the noisy top-k (for the load term).

    Args:
        clean_SE: [S, E] logits without noise.
        noisy_SE: [S, E] logits with noise N(0, 1) * noise_std_SE.
        noise_std_SE: [S, E] noise standard deviation (> 0).
        top_k: k < E.
    Returns:
        [S, E] probabilities.
    """
    top_SM = noisy_SE.topk(top_k + 1, dim=-1).values
    threshold_in_S1 = top_SM[:, top_k : top_k + 1]  # the value to beat if the expert is currently in
    threshold_out_S1 = top_SM[:, top_k - 1 : top_k]  # the value to beat if it is out
    normal = torch.distributions.Normal(clean_SE.new_zeros(()), clean_SE.new_ones(()))
    prob_in_SE = normal.cdf((clean_SE - threshold_in_S1) / noise_std_SE)
    prob_out_SE = normal.cdf((clean_SE - threshold_out_S1) / noise_std_SE)
    return torch.where(noisy_SE > threshold_in_S1, prob_in_SE, prob_out_SE)


def update_usage_(usage_TE: Tensor, counts_TE: Tensor, momentum: float) -> None:
    """Mod-Squad's usage EMA u[t] <- m*u[t] + (1-m)*count_t, in place, only for tasks present in counts_TE [T, E]."""
    present_T = counts_TE.sum(dim=1) > 0
    blended_TE = momentum * usage_TE + (1.0 - momentum) * counts_TE.to(usage_TE.dtype)
    usage_TE.copy_(torch.where(present_T[:, None], blended_TE, usage_TE))


def expert_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every layer whose experts may be split over ranks (`ep_size`, `ep_rank`,
    `num_local_experts`): the native `MoEMlp` and the DeepSpeed-backend layer alike. The one predicate for "this layer
    holds experts" (checkpointing, expert-parallel wiring); `moe_modules` is the one for "this layer routes"."""
    return [(n, m) for n, m in model.named_modules()
            if all(hasattr(m, a) for a in ("ep_size", "ep_rank", "num_local_experts")) and hasattr(m, "num_experts")]


def moe_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every task-routed MoE layer (MoEMlp, MoEAttention) in `model`, in `named_modules` order.

    A routed layer inside another one (an exact-routing submodel layer's `full_routing`) is part of its parent's
    routing, not a layer of its own: it is not listed, so nothing handles its rows twice.
    """
    layers: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        # `pop_aux_losses`, not the `aux` property: hasattr would compute the last forward's losses for nothing
        if hasattr(m, "pop_aux_losses") and hasattr(m, "usage_TE"):
            if not any(name.startswith(f"{outer}.") for outer, _ in layers):
                layers.append((name, m))
    return layers


def collect_aux_losses(model: nn.Module, *, end_of_step: bool = True) -> dict[str, Tensor]:
    """Sum each auxiliary loss ("mi", "cv", "switch", "z") over the MoE layers, each layer's losses computed over
    EVERY training forward since the previous call (e.g. the T task forwards of an all-tasks step), then clear.

    Call once per micro-batch, after all its forwards and before its backward. With gradient accumulation pass
    `end_of_step=False` for all but the last micro-batch of an optimizer step: earlier micro-batches then stay in
    the MI statistics (detached) and the MI EMA is updated once per optimizer step. Returns an empty dict when the
    model has no MoE layer or no training forward ran since the last call.
    """
    totals: dict[str, Tensor] = {}
    for _, module in moe_modules(model):
        for key, value in module.pop_aux_losses(end_of_step).items():
            totals[key] = totals[key] + value if key in totals else value
    return totals


def pop_routing_counts(model: nn.Module) -> dict[str, Tensor]:
    """Layer name -> selection counts [T, E] of the training forwards since the last call; clears them.

    The counts are already summed over data-parallel ranks when a `stats_reducer` is set (do NOT all-reduce them
    again). Layers without training forwards since the last call are left out.
    """
    popped = {name: module.pop_routing_counts() for name, module in moe_modules(model)}
    return {name: counts for name, counts in popped.items() if counts is not None}
