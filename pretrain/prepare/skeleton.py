"""The one conversion loop every converter runs: list jobs -> shuffle -> output dir -> decode in workers -> write
or skip -> ``_info.json``.

A dataset fills in a :class:`Converter` (how to list its jobs, which files a job opens, how to load one job in a
worker, how a loaded job becomes a sample or a skip, what goes into ``_info.json``); :func:`run_converter` does the
rest, so every converter shares the same order of checks (layout before the output directory is touched), the same
confinement (no worker opens a file that resolves outside ``--src`` or is not a regular file: ``paths.py``), the
same skip accounting and the same crash safety.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.prepare.images import ImageError
from pretrain.prepare.paths import SourceTree
from pretrain.prepare.shards import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_COUNT,
    ShardSink,
    check_split,
    prepare_output_dir,
    run_ordered,
    shuffled,
)


@dataclass(frozen=True)
class Skip:
    """A file (or annotation) that is not written: one row of ``skipped.jsonl``."""

    file: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Sample:
    """One sample to write: WebDataset key, ``{extension: bytes}`` and its image kind (``"jpg/RGB"``)."""

    key: str
    fields: Mapping[str, bytes]
    kind: str


@dataclass
class Listing:
    """What a converter found in the source before decoding anything.

    Attributes:
        jobs: one picklable job per candidate sample, in release order (the skeleton shuffles them).
        skips: rows for ``skipped.jsonl`` known from the listing alone (stray files, unpaired files, ...).
        source: extra keys of ``_info.json`` ``"source"`` (``path`` is added by the sink).
    """

    jobs: list
    skips: list[Skip] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)


class Converter(ABC):
    """One dataset's part of a conversion; a fresh instance per (src, split) run.

    Subclasses set ``dataset`` and ``load`` (a module-level function ``job -> loaded | ImageError``, run in the
    worker pool, so it must be picklable) and implement ``list_jobs``, ``files``, ``to_sample`` and ``extra``.
    ``tree`` resolves paths against the real ``--src`` (``layout_dir`` / ``layout_file`` for what ``list_jobs``
    reads itself); ``image_kinds`` counts ``Sample.kind`` of every written sample.
    """

    dataset: str = ""
    load: Callable[[Any], Any]

    def __init__(self, src: Path, split: str) -> None:
        self.src = Path(src)
        self.split = check_split(split)
        self.tree = SourceTree(self.src)
        self.image_kinds: Counter[str] = Counter()

    @abstractmethod
    def list_jobs(self) -> Listing:
        """Read the layout; raise LayoutError for a source that does not match it (nothing written yet)."""

    @abstractmethod
    def files(self, job: Any) -> list[tuple[str, Path]]:
        """Every file ``load`` opens for ``job``, as ``(name in skipped.jsonl, path)``: :func:`run_converter` skips
        the job, unopened, when one of them resolves outside ``--src`` or is not a regular file."""

    @abstractmethod
    def to_sample(self, job: Any, loaded: Any) -> Sample | Skip:
        """Turn a loaded job (or the ImageError its load returned) into a sample or a skip."""

    def written(self, sample: Sample) -> None:
        """Called after ``sample`` was written (not for a duplicate key)."""
        self.image_kinds[sample.kind] += 1

    @abstractmethod
    def extra(self) -> dict[str, Any]:
        """Dataset-specific ``_info.json`` keys."""

    def summary_extra(self) -> dict[str, Any]:
        """Keys added to the returned summary (besides ``ShardSink.finish``'s)."""
        return {}


def skip_for(file: str, loaded: Any) -> Skip | None:
    """The Skip for a job whose load returned an ImageError, else None."""
    if isinstance(loaded, ImageError):
        return Skip(file, loaded.reason, loaded.detail)
    return None


def admit(converter: Converter, jobs: list) -> tuple[list, list[Skip]]:
    """The jobs whose every file may be opened, and a Skip (``outside_src`` / ``not_a_regular_file``, the first
    offending file) for each of the others.

    Checked here, before any worker starts, so no converter can forget it; a file swapped for a FIFO or a device
    after this check is still refused by ``images.read_bytes``. A symlink redirected out of ``--src`` in that
    window is not: confining a concurrent writer of ``--src`` needs ``openat2(RESOLVE_BENEATH)``.
    """
    admitted, refused = [], []
    for job in jobs:
        for name, path in converter.files(job):
            why = converter.tree.refusal(path)
            if why is not None:
                refused.append(Skip(name, *why))
                break
        else:
            admitted.append(job)
    return admitted, refused


def run_converter(
    converter: Converter,
    out: Path,
    *,
    overwrite: bool = False,
    workers: int = 0,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_shards: int = 1,
    progress: bool = True,
) -> dict:
    """Convert one split with ``converter`` into ``out``; returns the summary (see ``ShardSink.finish``).

    The layout is read before ``out`` is touched, so a LayoutError leaves ``out`` as it was; jobs are written in
    the fixed ``shuffled`` order; listing skips come first in ``skipped.jsonl``, then the files refused by
    :func:`admit` in release order, then decode/sample skips in job order.
    """
    out = Path(out)
    listing = converter.list_jobs()
    admitted, refused = admit(converter, listing.jobs)
    jobs = shuffled(admitted)
    prepare_output_dir(out, overwrite=overwrite)
    name, split = converter.dataset, converter.split
    with ShardSink(out, dataset=name, split=split, src=converter.src, expected=len(jobs), max_count=max_count,
                   max_bytes=max_bytes, min_shards=min_shards) as sink:
        for skip in [*listing.skips, *refused]:
            sink.skip(skip.file, skip.reason, skip.detail)
        results = run_ordered(converter.load, jobs, workers=workers, desc=f"{name}/{split}", progress=progress)
        for job, loaded in zip(jobs, results):
            outcome = converter.to_sample(job, loaded)
            if isinstance(outcome, Skip):
                sink.skip(outcome.file, outcome.reason, outcome.detail)
            elif sink.write(outcome.key, outcome.fields):
                converter.written(outcome)
        summary = sink.finish(source=listing.source, extra=converter.extra())
    return {**summary, **converter.summary_extra()}
