"""The demo's fine-tuning verdict: does an initialisation beat random initialisation by more than the noise?

Every initialisation (extracted, pretrained, random) is fine-tuned with n seeds, s = N … N + n − 1 (the demo: n = 4).
Per seed, Δm (`metrics.multitask.delta_m`, primary metric per task) compares an initialisation's run with the
random-init run of the same seed: d_s (one seed gives both runs the same decoder init and data order, so the pair
shares that part of the noise). Reported: mean of the d_s and spread = their standard error, sd / √n (for two seeds
this is half their difference). A third number says how far Δm moves when nothing but the seed changes: the
reseeding Δm, the root mean square of Δm(random seed a against random seed b) over every ordered pair a ≠ b (for two
seeds about |Δm| of the one pair; every pair rather than each against seed N, so one lucky or unlucky first seed
does not set it).

The rule (`RULE`, quoted in the report and report.json): margin = max(2 × spread, reseeding Δm); "helped" when
mean > margin, "hurt" when mean < −margin, otherwise "no measurable difference". Two standard errors is about a
one-sided 93% t-bound at n = 4 (3 degrees of freedom); the reseeding term asks for an effect larger than what a new
seed alone produces. With two seeds the standard error rests on one difference and the verdict flipped between
demo seeds (benchmarks/RESULTS.md, "pretrain demo with four fine-tuning seeds"): four seeds are what the demo runs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from pretrain.metrics.multitask import delta_m

BASELINE = "random"
HELPED, HURT, NONE = "helped", "hurt", "no measurable difference"
RULE = ("margin = max(2 × spread, reseeding Δm), spread = the standard error of the seeds' Δm (sd / √n), reseeding "
        "Δm = root mean square of Δm between the random-init runs of any two seeds (every ordered pair); \"helped\" "
        "when the mean Δm > margin, \"hurt\" when it is < −margin, otherwise \"no measurable difference\"")


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error sd / √n) of a few runs' values; for two seeds the error is half their difference, for
    one it is 0."""
    if not values:
        raise ValueError("mean_spread: no values")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values, mean) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


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
        primary: {init: {seed: {task: primary metric}}}; every init has the same seeds (two or more) as BASELINE.
        lower: tasks whose primary metric improves downwards.

    Returns:
        {"seeds", "rule", "baseline", "reseed_delta_m", "reseed_pairs": {"a vs b": Δm}, "delta_m": {init:
        {"per_seed": {seed: d}, "mean", "spread"}}, "verdicts": {init: verdict}} (seeds as strings, so it is the
        report.json shape as it is).
    """
    base = primary[BASELINE]
    seeds = sorted(base)
    if len(seeds) < 2:
        raise ValueError(f"summarize: the baseline has seeds {seeds}; the spread needs two")
    pairs = {f"{a} vs {b}": delta_m(dict(base[a]), dict(base[b]), lower) for a in seeds for b in seeds if a != b}
    result: dict = {"seeds": seeds, "rule": RULE, "baseline": BASELINE,
                    "reseed_delta_m": math.sqrt(sum(d * d for d in pairs.values()) / len(pairs)),
                    "reseed_pairs": pairs, "delta_m": {}, "verdicts": {}}
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
