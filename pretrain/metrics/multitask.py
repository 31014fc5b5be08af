"""Multi-task performance Δm (evaluation.md §6) and the metric per task that enters it.

Δm = 100 / T · Σ_t (−1)^{l_t} · (M_{m,t} − M_{s,t}) / M_{s,t}, in percent, where M_m is the multi-task model,
M_s the single-task baseline and l_t = 1 for lower-is-better metrics (depth RMSE, normals mean error). Positive Δm
means the multi-task model is better on average. M3ViT `calculate_multi_task_performance` computes the same mean
relative change (as a fraction); DenseMTL reports it ×100, as here.

Which metric enters Δm per task is its catalog record's (`catalog.primary_metric`; `PRIMARY[mode][task] = (key in
that meter's compute(), lower_is_better)` is the same lookup as a table): semseg and human_parts mIoU, saliency maxF
in the new protocol but mIoU in the old one (as M3ViT), normals mean angular error, depth RMSE, edge odsF.
The baselines are the caller's: always state which single-task runs (same backbone, same protocol) were used.
"""

from __future__ import annotations

import math

from pretrain.catalog import DENSE_TASKS, PROTOCOLS, primary_metric

PRIMARY: dict[str, dict[str, tuple[str, bool]]] = {
    mode: {task: primary_metric(task, mode) for task in DENSE_TASKS} for mode in PROTOCOLS}


def delta_m(metrics: dict[str, float], baselines: dict[str, float], lower_is_better: set[str]) -> float:
    """Mean relative improvement over single-task baselines, in percent.

    Args:
        metrics: {task: value} of the multi-task model, one value per task (the PRIMARY metric).
        baselines: {task: value} of the single-task models, same tasks.
        lower_is_better: tasks whose metric improves downwards (their sign is flipped).

    Returns:
        Δm in percent (positive = better than the baselines on average).
    """
    if not metrics or set(metrics) != set(baselines):
        raise ValueError(f"delta_m: tasks differ: metrics {sorted(metrics)} vs baselines {sorted(baselines)}")
    unknown = set(lower_is_better) - set(metrics)
    if unknown:
        raise ValueError(f"delta_m: lower_is_better names tasks without a metric: {sorted(unknown)}")
    total = 0.0
    for task, value in metrics.items():
        base = baselines[task]
        if base == 0 or not math.isfinite(base) or not math.isfinite(value):
            raise ValueError(f"delta_m: task {task!r}: metric {value} / baseline {base} must be finite, baseline != 0")
        sign = -1.0 if task in lower_is_better else 1.0
        total += sign * (value - base) / base
    return 100.0 * total / len(metrics)


def primary_metrics(results: dict[str, dict[str, float]], *, mode: str) -> tuple[dict[str, float], set[str]]:
    """Pick each task's Δm metric from per-task meter outputs.

    Args:
        results: {task: meter.compute() dict}, e.g. {"semseg": {"mIoU": 70.1, ...}, "depth": {"rmse": 0.52, ...}}.
        mode: "new" or "old" protocol (decides the saliency metric).

    Returns:
        ({task: value}, lower-is-better task set), ready for `delta_m`.
    """
    values, lower = {}, set()
    for task, scores in results.items():
        try:
            key, is_lower = primary_metric(task, mode)
        except ValueError as exc:
            raise ValueError(f"primary_metrics: {exc}") from None
        if key not in scores:
            raise ValueError(f"primary_metrics: task {task!r} results lack {key!r} (have {sorted(scores)})")
        values[task] = float(scores[key])
        if is_lower:
            lower.add(task)
    return values, lower
