"""The interleaved timing harness shared by the benchmark scripts (performance.md section 0).

Variants of one comparison run round-robin in one process with the order reversed every other round; a round in
which other processes used > 0.15 core is skipped when at least 3 clean rounds remain (else every round is used and
the result is flagged noisy). Reported: the median time per variant and the median of per-round paired ratios
against a baseline variant. Ratios are the trustworthy quantity on a shared machine.

Imported by the scripts in this folder as `from harness import ...` (run them as `python benchmarks/<script>.py`,
which puts this folder first on sys.path).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)
_TICK = os.sysconf("SC_CLK_TCK")
MAX_OTHER_LOAD = 0.15  # cores other processes may use during a round that still counts as clean


def cpu_snapshot() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    t = os.times()
    return busy / _TICK, t.user + t.system


def interleaved(variants: dict[str, Callable[[], None]], baseline: str, rounds: int) -> dict:
    """Round-robin timing of `variants` (name -> a callable doing one measured unit of work).

    Returns {"ms": {name: median ms}, "ratio": {name: median paired time ratio vs baseline}, "clean_rounds",
    "rounds", "noisy", "per_round": [{name: seconds}] of the rounds used, "other_load": [cores per round]}.
    """
    for fn in variants.values():
        fn()  # warm-up: allocator, oneDNN/MKL kernels
    names, records = list(variants), []
    for r in range(rounds):
        times, (busy0, own0), wall0 = {}, cpu_snapshot(), time.perf_counter()
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            variants[name]()
            times[name] = time.perf_counter() - t0
        busy1, own1 = cpu_snapshot()
        records.append((times, ((busy1 - busy0) - (own1 - own0)) / (time.perf_counter() - wall0)))
    clean = [t for t, other in records if other <= MAX_OTHER_LOAD]
    used = clean if len(clean) >= 3 else [t for t, _ in records]
    return {
        "ms": {n: 1e3 * statistics.median(t[n] for t in used) for n in names},
        "ratio": {n: statistics.median(t[n] / t[baseline] for t in used) for n in names},
        "clean_rounds": len(clean), "rounds": rounds, "noisy": len(clean) < 3, "per_round": used,
        "other_load": [other for _, other in records],
    }


def paired(res: dict, num: str, den: str) -> float:
    """Median over the used rounds of time[num] / time[den]."""
    return statistics.median(t[num] / t[den] for t in res["per_round"])


def report(title: str, res: dict) -> None:
    """Print one comparison: title, clean-round count, median ms and median paired ratio per variant."""
    flag = " NOISY (too few clean rounds: all rounds used)" if res["noisy"] else ""
    print(f"\n{title}  [{res['clean_rounds']}/{res['rounds']} clean rounds]{flag}")
    print(f"  {'variant':<14}{'median ms':>12}{'ratio':>9}")
    for name, ms in res["ms"].items():
        print(f"  {name:<14}{ms:>12.1f}{res['ratio'][name]:>9.3f}")


def write_results(out: dict, json_path: str | None, **meta) -> None:
    """Add run metadata (date, machine, torch, + `meta`), print the keys, and write them to `json_path` if given."""
    import json
    import platform

    import torch

    out["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "torch": torch.__version__, **meta}
    print("\n" + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}, indent=1))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
