"""Shard writing shared by the converters: output-dir policy, ordered worker pool, shards, skips, ``_info.json``.

Crash safety: shards are written and fsynced first, ``_info.json`` last via tmp file + fsync + ``os.replace``; on
``overwrite`` the old ``_info.json`` is removed before anything else. So an ``_info.json`` on disk always describes
complete shards. Tar entries get a fixed mtime/owner, so the same input gives byte-identical shards.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import webdataset as wds
from tqdm import tqdm

from pretrain.durable import atomic_write, check_writable, fsync_path

logger = logging.getLogger(__name__)

INFO_NAME = "_info.json"
SKIPPED_NAME = "skipped.jsonl"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_MAX_COUNT = 1000
DEFAULT_MAX_BYTES = 512 * 2**20
_WARN_SKIPS = 20  # individual skip warnings before the log points at skipped.jsonl instead

J = TypeVar("J")
R = TypeVar("R")


class PrepareError(ValueError):
    """Bad input to a converter; the CLI prints the message as one line and exits 2."""


class LayoutError(PrepareError):
    """The source directory does not match the dataset's expected layout."""


class OutputNotEmptyError(PrepareError):
    """The output directory holds files and overwriting was not requested (or is unsafe)."""


def check_split(split: str) -> str:
    """Return ``split`` if it is one of SPLITS, else raise PrepareError naming the allowed values."""
    if split not in SPLITS:
        raise PrepareError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def sample_key(stem: str) -> str:
    """WebDataset key for a file stem: dots would split key from extension, so they become underscores."""
    key = stem.replace(".", "_").replace("/", "_")
    if not key:
        raise PrepareError(f"empty sample key from file stem {stem!r}")
    return key


def encode_json(obj: Any) -> bytes:
    """Deterministic JSON bytes for a sample's ``json`` field."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _is_own_file(path: Path) -> bool:
    name = path.name
    own = {INFO_NAME, SKIPPED_NAME}
    interrupted = name.startswith(f".{INFO_NAME}.tmp")  # atomic_write's tmp file from a crashed run
    return path.is_file() and (name in own or interrupted or name.endswith(".tar"))


def prepare_output_dir(out: Path, *, overwrite: bool) -> None:
    """Create ``out`` or make it reusable.

    A non-empty ``out`` is refused unless ``overwrite``; even then only files a converter writes (``*.tar``,
    ``_info.json``, ``skipped.jsonl``) are removed, and a directory holding anything else is refused, so a mistyped
    ``--out $HOME --overwrite`` deletes nothing.
    """
    if out.exists() and not out.is_dir():
        raise OutputNotEmptyError(f"output path {out} exists and is not a directory")
    try:
        entries = sorted(out.iterdir()) if out.exists() else []
    except OSError as exc:
        raise PrepareError(f"cannot read {out}: {exc.strerror or exc}") from None
    if entries and not overwrite:
        names = ", ".join(e.name for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise OutputNotEmptyError(
            f"output directory {out} is not empty ({len(entries)} entries: {names}); "
            "pass --overwrite (overwrite=True) to replace its shards"
        )
    foreign = [e.name for e in entries if not _is_own_file(e)]
    if foreign:
        raise OutputNotEmptyError(
            f"refusing to overwrite {out}: it holds entries no converter wrote ({', '.join(foreign[:3])}); "
            "use an empty or new directory"
        )
    try:  # before anything is removed: a folder that cannot be written keeps its old shards
        check_writable(out)
    except OSError as exc:  # no permission, a read-only filesystem, a file where a folder should be
        raise PrepareError(f"cannot write {out}: {exc.strerror or exc}") from None
    # _info.json goes first: if we crash mid-clean, no stale index points at deleted shards.
    for entry in sorted(entries, key=lambda e: e.name != INFO_NAME):
        entry.unlink()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that ``path`` is either absent/old or complete: tmp file, fsync, ``os.replace``, dir fsync."""
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


SHUFFLE_SEED = 0


def shuffled(jobs: Sequence[J]) -> list[J]:
    """The jobs in a fixed pseudo-random order (same every run, so shards stay byte-reproducible).

    Release layouts are sorted by class (ImageNet folders) or name; shards written in that order hold a few classes
    each, and a resampled reader with a bounded shuffle buffer would then train on batches of a few classes.
    """
    order = list(jobs)
    random.Random(SHUFFLE_SEED).shuffle(order)
    return order


def run_ordered(
    fn: Callable[[J], R], jobs: Sequence[J], *, workers: int, desc: str, progress: bool = True
) -> Iterator[R]:
    """Yield ``fn(job)`` for every job, in job order, with a progress bar.

    ``workers > 0`` decodes in a process pool (``imap`` keeps the order, so output is identical to
    ``workers=0``); ``fn`` must then be a module-level function or a ``functools.partial`` of one.
    """
    bar = tqdm(total=len(jobs), desc=desc, unit="file", disable=None if progress else True, dynamic_ncols=True)
    try:
        if workers <= 0:
            for job in jobs:
                yield fn(job)
                bar.update()
            return
        chunksize = max(1, min(64, len(jobs) // (workers * 8)))
        # Not fork (Python 3.11's default on Linux): a child forked while another thread of the caller holds a lock
        # (torch's OpenMP pool, a test runner's threads) can wait on it forever; a forkserver's workers start from a
        # clean process. It costs the workers' imports once (~1.5 s), nothing next to a real dataset.
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            for result in pool.imap(fn, jobs, chunksize=chunksize):
                yield result
                bar.update()
    finally:
        bar.close()


class ShardSink:
    """WebDataset ShardWriter plus ``skipped.jsonl`` plus the final ``_info.json`` of one dataset split.

    Shards are named ``{dataset}-{split}-%06d.tar``. A shard is closed once it holds ``max_count`` samples or
    ``max_bytes`` payload bytes (ShardWriter checks before each write, so a shard can exceed ``max_bytes`` by one
    sample). ``min_shards`` lowers the per-shard count to ``expected // min_shards`` so that small splits still
    give enough shards for world_size x workers readers.
    """

    def __init__(
        self,
        out: Path,
        *,
        dataset: str,
        split: str,
        src: Path,
        expected: int,
        max_count: int = DEFAULT_MAX_COUNT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        min_shards: int = 1,
    ) -> None:
        if max_count < 1 or max_bytes < 1 or min_shards < 1:
            raise PrepareError(f"max_count={max_count}, max_bytes={max_bytes}, min_shards={min_shards} must be >= 1")
        self.out, self.dataset, self.split, self.src = out, dataset, split, src
        self.min_shards = min_shards
        self.max_count = min(max_count, max(1, expected // min_shards))
        self.shards: list[str] = []
        self.shard_lengths: list[int] = []
        self.skips: Counter[str] = Counter()
        self.keys: set[str] = set()
        self._start = time.monotonic()
        self._skipped_file = open(out / SKIPPED_NAME, "w", encoding="utf-8")
        pattern = str(out).replace("%", "%%") + os.sep + f"{dataset}-{split}-%06d.tar"
        # encoder=False: every field is already bytes; the default encoder would pickle unknown extensions.
        self._writer = wds.ShardWriter(
            pattern, maxcount=self.max_count, maxsize=max_bytes, post=self._shard_done, verbose=0, encoder=False,
            mtime=0,
        )

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _shard_done(self, fname: str) -> None:
        path = Path(fname)
        if self._writer.count == 0:  # ShardWriter opens its first tar eagerly; drop it when nothing was written
            path.unlink()
            return
        fsync_path(path)
        self.shards.append(path.name)
        self.shard_lengths.append(self._writer.count)

    def write(self, key: str, fields: Mapping[str, bytes]) -> bool:
        """Write one sample (``fields``: extension -> bytes). Returns False (and records a skip) on a duplicate key."""
        if key in self.keys:
            self.skip(key, "duplicate_key", f"sample key {key!r} already written in this split")
            return False
        self.keys.add(key)
        self._writer.write({"__key__": key, **fields})
        return True

    def skip(self, file: str, reason: str, detail: str) -> None:
        """Record a file that was not written: one line in ``skipped.jsonl``, counted per reason."""
        self.skips[reason] += 1
        self._skipped_file.write(json.dumps({"file": file, "reason": reason, "detail": detail}) + "\n")
        total = sum(self.skips.values())
        if total <= _WARN_SKIPS:
            logger.warning("skipped %s (%s): %s", file, reason, detail)
        elif total == _WARN_SKIPS + 1:
            logger.warning("further skips are listed in %s only", self.out / SKIPPED_NAME)

    def close(self) -> None:
        """Close the open shard and ``skipped.jsonl`` (idempotent); writes no ``_info.json``."""
        if self._skipped_file.closed:
            return
        self._writer.close()
        self._skipped_file.flush()
        os.fsync(self._skipped_file.fileno())
        self._skipped_file.close()

    def finish(self, *, source: Mapping[str, Any], extra: Mapping[str, Any]) -> dict:
        """Close everything, write ``_info.json`` last and atomically, log and return the summary dict."""
        self.close()
        num_samples = sum(self.shard_lengths)
        if len(self.shards) < self.min_shards:
            logger.warning("%s/%s: only %d shards (< min_shards=%d)", self.dataset, self.split, len(self.shards),
                           self.min_shards)
        shard_bytes = [(self.out / name).stat().st_size for name in self.shards]
        info = {
            "name": self.dataset,
            "split": self.split,
            "format_version": FORMAT_VERSION,
            "num_samples": num_samples,
            "shards": self.shards,
            "shard_lengths": self.shard_lengths,
            "shard_bytes": shard_bytes,
            "skipped": sum(self.skips.values()),
            "skipped_by_reason": dict(sorted(self.skips.items())),
            "source": {"path": str(self.src), **source},
            **extra,
            # timm's reader_wds.py looks up info["splits"][split] with these four keys.
            "splits": {self.split: {"name": self.split, "num_samples": num_samples, "filenames": self.shards,
                                    "shard_lengths": self.shard_lengths}},
        }
        write_json_atomic(self.out / INFO_NAME, info)
        summary = {
            "dataset": self.dataset,
            "split": self.split,
            "out": str(self.out),
            "written": num_samples,
            "skipped": info["skipped"],
            "skipped_by_reason": info["skipped_by_reason"],
            "shards": len(self.shards),
            "bytes": sum(shard_bytes),
            "seconds": round(time.monotonic() - self._start, 3),
        }
        logger.info("%s", format_summary(summary))
        return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """One line for a converter summary: written, skipped by reason, shards, bytes, time."""
    reasons = ", ".join(f"{k}={v}" for k, v in summary["skipped_by_reason"].items()) or "none"
    return (
        f"{summary['dataset']}/{summary['split']}: wrote {summary['written']} samples to {summary['shards']} shards "
        f"({summary['bytes'] / 2**20:.1f} MiB) in {summary['out']}; skipped {summary['skipped']} ({reasons}); "
        f"{summary['seconds']:.1f} s"
    )
