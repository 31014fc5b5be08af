"""Routing metrics for logging: per-task expert load, routing entropy, task–expert mutual information.

Computed from selection counts [T, E] summed over a logging window (already reduced over data-parallel ranks
by the caller), so they describe what the routers did, not one noisy batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mutual_information(counts_TE: Tensor) -> float:
    """MI(T; E) in nats of the empirical joint distribution of (task, selected expert)."""
    joint_TE = counts_TE.double() / counts_TE.sum().clamp_min(1)
    p_T1 = joint_TE.sum(1, keepdim=True)
    p_1E = joint_TE.sum(0, keepdim=True)
    ratio = joint_TE / (p_T1 * p_1E).clamp_min(1e-30)
    return float((joint_TE * torch.log(ratio.clamp_min(1e-30))).sum())


def routing_metrics(counts: dict[str, Tensor], tasks: list[str]) -> dict[str, float]:
    """Args: counts {layer: [T, E] selection counts}. Returns flat metrics, averaged over layers:

    `moe/mi` (MI(T;E)), `moe/entropy/<task>` (routing entropy of the task's expert distribution, normalised by
    log E so 1 = uniform), `moe/max_load/<task>` (share of the busiest expert: collapse shows as → 1).
    """
    if not counts:
        return {}
    out: dict[str, list[float]] = {}
    for counts_TE in counts.values():
        counts_TE = counts_TE.double().cpu()
        out.setdefault("moe/mi", []).append(mutual_information(counts_TE))
        num_experts = counts_TE.shape[1]
        for t, task in enumerate(tasks):
            row_E = counts_TE[t]
            if row_E.sum() <= 0:
                continue
            p_E = row_E / row_E.sum()
            entropy = float(-(p_E * torch.log(p_E.clamp_min(1e-30))).sum()) / math.log(max(num_experts, 2))
            out.setdefault(f"moe/entropy/{task}", []).append(entropy)
            out.setdefault(f"moe/max_load/{task}", []).append(float(p_E.max()))
    return {k: sum(v) / len(v) for k, v in out.items()}
