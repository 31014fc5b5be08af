"""Logging for the package: module loggers with a rank-0 console, progress bars, and the JSONL metrics file.

Named `log.py`, not `logging.py`, so it never shadows the standard library.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(rank: int = 0, level: int = logging.INFO, log_file: str | Path | None = None) -> None:
    """Console output from rank 0 only (other ranks log warnings and errors); optional per-rank file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
    console.setLevel(level if rank == 0 else logging.WARNING)
    root.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(f"[rank {rank}] " + _FORMAT))
        root.addHandler(file_handler)
    root.setLevel(level)
    for noisy in ("PIL", "matplotlib", "urllib3", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             enabled: bool = True, initial: int = 0) -> Iterator[T] | tqdm:
    """A progress bar with ETA on stderr; silent when `enabled` is False (non-zero ranks, tests)."""
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, initial=initial, dynamic_ncols=True,
                leave=False, file=sys.stderr, mininterval=1.0)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible instead of failing the run
    return value


class MetricsWriter:
    """Append-only JSONL: one object per logged step, each with a `step` field.

    Opened in append mode so a resumed run continues the same file; each line is flushed so a crash loses nothing
    that was logged.
    """

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._fh = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the writer

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if self._fh is None:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL metrics file (a torn last line from a crash is ignored)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
