"""The demo's ETA: the seconds its remaining stages took on the reference machine, times this machine's pace so far.

Each stage's weight is its seconds in a reference run (`SECONDS` in `demo/__init__.py`). Before stage i starts,
pace = seconds spent so far / the reference seconds of the stages done, and ETA = pace × the reference seconds of
stage i and every later one. On the reference machine the ETA is then right from the second stage on; on a machine
that is uniformly k× slower too (pace = k). It errs where a machine's slowdown differs between kinds of stage: the
first twelve stages (synth, prepare) are mostly process start and torch import, the rest mostly training, so until
`train` has run the pace comes from start-up cost alone (the issue's Xeon ran those stages at ~0.75× the reference
seconds and the rest at ~1.5×: its ETA before training reads about half the time left). Skipped stages (a resumed
demo) count with the seconds their records hold; `--fast` runs other step counts than the weights assume.

Stages that run at once (the fine-tunings, `--jobs` at a time) weigh their share of the wall: their reference seconds
/ the reference run's jobs. `Progress` adds the wall time between completions, not each stage's own seconds, and
credits the running stages with the part of their weight their elapsed time covers at the pace so far: without that
credit a stage that starts while another is half done reads its ETA up to 40% high (the 2026-12-07 reference run).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def eta_seconds(spent: float, weight_done: float, weight_left: float) -> float | None:
    """Seconds left: `weight_left` reference seconds at the pace `spent` / `weight_done` (None before any stage)."""
    if weight_done <= 0:
        return None
    return spent / weight_done * weight_left


def format_eta(eta: float | None, reference_total: float) -> str:
    """The ETA text of a stage line; before the first stage, the reference machine's total."""
    if eta is None:
        return f", demo ETA ~{reference_total / 60:.0f} min on the reference machine (2 idle cores)"
    return f", demo ETA {eta / 60:.1f} min"


class Progress:
    """The ETA's inputs, shared by the stages that run at once: wall seconds spent up to the last completion, the
    reference weight of the stages done, and the running stages (their start and weight). `clock`: a test's."""

    def __init__(self, total_weight: float, jobs: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.jobs, self.clock = total_weight, jobs, clock
        self.spent, self.done, self.mark = 0.0, 0.0, clock()
        self.running: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def eta(self) -> float | None:
        """Seconds left (None before any stage ended)."""
        with self.lock:
            spent, done, now = self.spent, self.done, self.clock()
            if self.running and done > 0:  # credit: each running stage's wall share at the pace so far
                pace = spent / done
                done += sum(min(w, (now - t) / self.jobs / pace) for t, w in self.running.values())
                spent += now - self.mark
            return eta_seconds(spent, done, self.total - done)

    def eta_text(self) -> str:
        return format_eta(self.eta(), self.total)

    def started(self, name: str, weight: float) -> None:
        with self.lock:
            if not self.running:  # the wall before a stage starts (the demo's own work) is nobody's
                self.mark = self.clock()
            self.running[name] = (self.clock(), weight)

    def finished(self, name: str, seconds: float, ran: bool, parallel: bool) -> None:
        """`seconds`: the stage's record; `ran`: False for a stage skipped on resume (its record's seconds count,
        shared with its neighbours when it runs in parallel)."""
        with self.lock:
            now = self.clock()
            _, weight = self.running.pop(name)
            if ran:  # wall time since the last mark (one stage at a time: its own seconds)
                self.spent += now - self.mark
            else:
                self.spent += seconds / (self.jobs if parallel else 1)
            self.done += weight
            self.mark = now
