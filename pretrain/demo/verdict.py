"""The demo's fine-tuning verdict: does an initialisation beat random initialisation by more than the noise?

Every initialisation (extracted, pretrained, random) is fine-tuned with two seeds, s = N and N + 1. Per seed, Δm
(`metrics.multitask.delta_m`, primary metric per task) compares an initialisation's run with the random-init run of
the same seed: d_s. Reported: mean = (d_N + d_{N+1}) / 2 and spread = |d_N − d_{N+1}| / 2 (half the difference; with
two values it is also the estimate of the mean's standard error). A third number says how far Δm moves when nothing
but the seed changes: the reseeding Δm, random-init seed N+1 against random-init seed N.

The rule (`RULE`, quoted in the report and report.json): margin = max(2 × spread, |reseeding Δm|); "helped" when
mean > margin, "hurt" when mean < −margin, otherwise "no measurable difference". mean > 2 × spread means both seeds
have the mean's sign and agree within a factor of three (the smaller is mean − spread > spread ≥ 0); the reseeding
term asks for an effect larger than what a new seed alone produces. Two seeds cannot give a significance test; the
rule only keeps a sign that is inside the noise from being read as a result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pretrain.metrics.multitask import delta_m

BASELINE = "random"
HELPED, HURT, NONE = "helped", "hurt", "no measurable difference"
RULE = ("margin = max(2 × spread, |reseeding Δm|), spread = half the difference of the two seeds' Δm, reseeding Δm "
        "= random init seed N+1 against random init seed N; \"helped\" when the mean Δm > margin, \"hurt\" when it "
        "is < −margin, otherwise \"no measurable difference\"")


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half the range) of a few runs' values: for two seeds, mean ± half their difference."""
    if not values:
        raise ValueError("mean_spread: no values")
    return sum(values) / len(values), (max(values) - min(values)) / 2


def decide(deltas: Sequence[float], reseed: float) -> str:
    """The verdict for one initialisation from its per-seed Δm (in %) and the reseeding Δm (see the module doc)."""
    mean, spread = mean_spread(deltas)
    margin = max(2 * spread, abs(reseed))
    if mean > margin:
        return HELPED
    if mean < -margin:
        return HURT
    return NONE


def summarize(primary: Mapping[str, Mapping[int, Mapping[str, float]]], lower: set[str]) -> dict:
    """Per-seed Δm, its mean and spread, the reseeding Δm and the verdict of every initialisation but the baseline.

    Args:
        primary: {init: {seed: {task: primary metric}}}; every init has the same two (or more) seeds as BASELINE.
        lower: tasks whose primary metric improves downwards.

    Returns:
        {"seeds", "rule", "baseline", "reseed_delta_m", "delta_m": {init: {"per_seed": {seed: d}, "mean",
        "spread"}}, "verdicts": {init: verdict}} (seeds as strings, so it is the report.json shape as it is).
    """
    base = primary[BASELINE]
    seeds = sorted(base)
    if len(seeds) < 2:
        raise ValueError(f"summarize: the baseline has seeds {seeds}; the spread needs two")
    result: dict = {"seeds": seeds, "rule": RULE, "baseline": BASELINE,
                    "reseed_delta_m": delta_m(dict(base[seeds[1]]), dict(base[seeds[0]]), lower),
                    "delta_m": {}, "verdicts": {}}
    for init, runs in primary.items():
        if init == BASELINE:
            continue
        if sorted(runs) != seeds:
            raise ValueError(f"summarize: {init} has seeds {sorted(runs)}, the baseline {seeds}")
        per_seed = {s: delta_m(dict(runs[s]), dict(base[s]), lower) for s in seeds}
        mean, spread = mean_spread(list(per_seed.values()))
        result["delta_m"][init] = {"per_seed": {str(s): d for s, d in per_seed.items()}, "mean": mean,
                                   "spread": spread}
        result["verdicts"][init] = decide(list(per_seed.values()), result["reseed_delta_m"])
    return result


def phrase(init: str, verdict: str, mean: float, spread: float) -> str:
    """One initialisation's verdict as the report says it: "helped by +8.00 ± 1.00%", never a bare sign."""
    numbers = f"{mean:+.2f} ± {spread:.2f}%"
    return f"{init}: {verdict} ({numbers})" if verdict == NONE else f"{init}: {verdict} by {numbers}"


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: a metric that is not a finite number is written as null."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
