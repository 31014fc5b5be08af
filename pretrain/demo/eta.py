"""The demo's ETA: the seconds its remaining stages took on the reference machine, times this machine's pace so far.

Each stage's weight is its seconds in a reference run (`SECONDS` in `demo/__init__.py`). Before stage i starts,
pace = seconds spent so far / the reference seconds of the stages done, and ETA = pace × the reference seconds of
stage i and every later one. On the reference machine the ETA is then right from the second stage on; on a machine
that is uniformly k× slower too (pace = k). It errs where a machine's slowdown differs between kinds of stage: the
first twelve stages (synth, prepare) are mostly process start and torch import, the rest mostly training, so until
`train` has run the pace comes from start-up cost alone (the issue's Xeon ran those stages at ~0.75× the reference
seconds and the rest at ~1.5×: its ETA before training reads about half the time left). Skipped stages (a resumed
demo) count with the seconds their records hold; `--fast` runs other step counts than the weights assume.
"""

from __future__ import annotations

from collections.abc import Sequence


def eta_seconds(spent: float, weight_done: float, weight_left: float) -> float | None:
    """Seconds left: `weight_left` reference seconds at the pace `spent` / `weight_done` (None before any stage)."""
    if weight_done <= 0:
        return None
    return spent / weight_done * weight_left


def etas(weights: Sequence[float], seconds: Sequence[float]) -> list[float | None]:
    """The ETA printed before each stage of a run whose stages took `seconds`, under stage `weights`."""
    total, out, spent, done = sum(weights), [], 0.0, 0.0
    for weight, took in zip(weights, seconds, strict=True):
        out.append(eta_seconds(spent, done, total - done))
        spent, done = spent + took, done + weight
    return out


def format_eta(eta: float | None, reference_total: float) -> str:
    """The ETA text of a stage line; before the first stage, the reference machine's total."""
    if eta is None:
        return f", demo ETA ~{reference_total / 60:.0f} min on the reference machine (2 idle cores)"
    return f", demo ETA {eta / 60:.1f} min"
