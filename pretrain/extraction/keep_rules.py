"""Which experts a task keeps, per MoE layer, from its usage (selection counts or Mod-Squad's usage EMA).

Rules (`RULES`), each on one layer's usage row u [E] of one task, each keeping at least the layer's top_k experts
(a token must still find k experts to route to):
- `modsquad` (Mod-Squad's `pruning`): keep e if usage% > thresh / k, usage% = 100·u/Σu; if fewer than k survive,
  the k most used.
- `topn`: the `keep` most used.
- `mass`: the fewest most-used experts holding a fraction `mass` of the usage.
- `share`: the ceil(share·E) most used (the same fraction of every layer, whatever its E: `pretrain extract --sweep`).
Ties go to the lower expert id. Several tasks keep the union of their sets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def usage_percent(usage_E: Tensor) -> Tensor:
    """usage [E] (any scale) → percent [E] summing to 100 (all zeros for an unused row)."""
    usage_E = usage_E.double()
    total = float(usage_E.sum())
    return usage_E * (100.0 / total) if total > 0 else torch.zeros_like(usage_E)


def _by_usage(usage_E: Tensor) -> list[int]:
    """Expert ids, most used first, ties to the lower id."""
    values = usage_E.double().tolist()
    return sorted(range(len(values)), key=lambda e: (-values[e], e))


def _floor(chosen: list[int], usage_E: Tensor, top_k: int) -> list[int]:
    return sorted(chosen) if len(chosen) >= top_k else sorted(_by_usage(usage_E)[:top_k])


def keep_modsquad(usage_E: Tensor, *, top_k: int, thresh: float = 3.0, **_: float) -> list[int]:
    """Experts with usage% > thresh / top_k, at least the top_k most used."""
    pct_E = usage_percent(usage_E)
    return _floor([e for e in range(len(pct_E)) if float(pct_E[e]) > thresh / top_k], usage_E, top_k)


def keep_topn(usage_E: Tensor, *, top_k: int, keep: int = 0, **_: float) -> list[int]:
    """The `keep` most used experts (at least top_k)."""
    if keep > len(usage_E):
        raise ValueError(f"--keep {keep} is more than the layer's {len(usage_E)} experts")
    if keep < 1:
        raise ValueError(f"--keep {keep}: the topn rule needs --keep N >= 1")
    return _floor(_by_usage(usage_E)[:keep], usage_E, top_k)


def keep_mass(usage_E: Tensor, *, top_k: int, mass: float = 0.9, **_: float) -> list[int]:
    """The fewest most-used experts whose usage sums to at least `mass` of the total (at least top_k)."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"--mass {mass}: must be in (0, 1]")
    pct_E, chosen, held = usage_percent(usage_E), [], 0.0
    for e in _by_usage(usage_E):
        if held >= 100.0 * mass - 1e-9:
            break
        chosen.append(e)
        held += float(pct_E[e])
    return _floor(chosen, usage_E, top_k)


def keep_share(usage_E: Tensor, *, top_k: int, share: float = 1.0, **_: float) -> list[int]:
    """The ceil(share·E) most used experts (at least top_k): one size for layers of different E (`--sweep`)."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"--share {share}: must be in (0, 1]")
    count = math.ceil(round(share * len(usage_E), 9))  # 0.3·10 is 3.0000000000000004 in floats: keep 3, not 4
    return _floor(_by_usage(usage_E)[:count], usage_E, top_k)


RULES: dict[str, Callable[..., list[int]]] = {"modsquad": keep_modsquad, "topn": keep_topn, "mass": keep_mass,
                                              "share": keep_share}


def choose_experts(usage: dict[str, Tensor], top_k: dict[str, int], task_rows: list[int], rule: str,
                   **params: float) -> dict[str, list[int]]:
    """Kept expert ids per layer: the union over `task_rows` of `rule` on each task's usage row.

    Args:
        usage: layer name → usage [T, E] (rows = task ids). top_k: layer name → k.
        params: the rule's parameters (`thresh`, `keep`, `mass`, `share`).
    """
    if rule not in RULES:
        raise ValueError(f"--rule {rule!r}: expected one of {', '.join(RULES)}")
    kept = {}
    for name, usage_TE in usage.items():
        union: set[int] = set()
        for row in task_rows:
            if float(usage_TE[row].sum()) <= 0:
                logger.warning("%s: task row %d has no recorded usage; keeping its first top-k experts", name, row)
            union.update(RULES[rule](usage_TE[row], top_k=top_k[name], **params))
        kept[name] = sorted(union)
    return kept
