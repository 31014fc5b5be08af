"""One WebDataset pipeline per task: resampled infinite streams for training, finite split streams for evaluation.

Training (`make_train_loader`): ResampledShards (deterministic) → tar samples (only whitelisted extensions are read)
→ shuffle buffer → decode + joint transform → collate into fixed-size batches. Every random choice (shard draws,
shuffle, augmentation) comes from a seed derived from (seed, task, rank, worker, start_step, epoch of the iterator),
so each (rank, worker) draws its own stream and no node/worker splitting is needed. With workers, batches reach the
main process through reused shared-memory slots (ring.py; `reuse_buffers=False` gives the DataLoader's transport).

Evaluation (`make_eval_loader`): the sorted shard list split by rank (explicit `rank`/`world_size`, not the
environment), then by DataLoader worker; each sample is seen by exactly one (rank, worker); the last partial batch is
kept, so ranks may see different numbers of batches (reduce metrics once at the end, not per batch).

Bad samples (undecodable image, bad json, out-of-range label, unreadable tar member or shard) are skipped and
counted; each batch carries `skipped`: the number of samples/errors its worker skipped since its previous batch, so
summing `skipped` over consumed batches gives the total. A run of `max_consecutive_errors` failures without a good
sample raises instead (broken shard set or a bug, not bad luck), which also stops a resampled stream over
unreadable shards from spinning forever.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
import webdataset as wds

from pretrain.catalog import DATASETS
from pretrain.data.collate import COLLATE, ring_fields
from pretrain.data.decode import (
    coco_label_maps,
    decode_cls_sample,
    decode_det_sample,
    decode_seg_sample,
    is_allowed_member,
)
from pretrain.data.ring import SLOT_KEY, BatchRing, RingLoader, pack_small
from pretrain.data.tar import TarSamples, read_refs
from pretrain.data.transforms import transform_cls, transform_det, transform_seg
from pretrain.errors import DataError

logger = logging.getLogger(__name__)

INFO_NAME = "_info.json"
# integer ids for seeding (no string hashing), the catalog's: pretraining tasks, then the dense datasets (dense.py)
TASK_IDS = {d.stream: d.id for d in DATASETS.values()}
_WARN_LIMIT = 5  # warnings per worker before skips are only counted
_SHARDS, _SHUFFLE, _AUG = 0, 1, 2  # seed purposes
_DEFER_BYTES = 16384  # image/mask members at least this large are read right before decoding (tar.py)


@dataclass(frozen=True)
class Source:
    """How one task turns raw samples into batches. `decoder_kwargs` maps `_info.json` to the decoder's kwargs."""

    decode: Callable[..., dict[str, Any]]
    decoder_kwargs: Callable[[Mapping[str, Any]], dict[str, Any]]
    transform: Callable[..., dict[str, Any]]
    aug_name: str  # the transform's augmentation-range kwarg
    collate: Callable[..., dict[str, Any]]
    describe: Callable[[Mapping[str, Any]], dict[str, Any]]  # `_info.json` → what the model/evaluator need


def _num_classes(info: Mapping[str, Any]) -> dict[str, Any]:
    return {"num_classes": len(info["classes"]) if "classes" in info else int(info["num_classes"])}


def _coco_maps(info: Mapping[str, Any]) -> dict[str, Any]:
    return {"cat_id_to_label": coco_label_maps(info["categories"])[0]}


def _coco_categories(info: Mapping[str, Any]) -> dict[str, Any]:
    ids = coco_label_maps(info["categories"])[1]
    return {"categories": info["categories"], "contiguous_to_cat_id": ids, "num_classes": len(ids)}


SOURCES: dict[str, Source] = {
    "cls": Source(decode_cls_sample, _num_classes, transform_cls, "scale", COLLATE["cls"], _num_classes),
    "det": Source(decode_det_sample, _coco_maps, transform_det, "jitter", COLLATE["det"], _coco_categories),
    "seg": Source(decode_seg_sample, _num_classes, transform_seg, "jitter", COLLATE["seg"], _num_classes),
}


def read_shard_info(shard_dir: str | Path) -> dict[str, Any]:
    """Load and check `<shard_dir>/_info.json`; adds "urls" (absolute shard paths). Raises naming the directory."""
    root = Path(shard_dir)
    info_path = root / INFO_NAME
    if not root.is_dir():
        raise FileNotFoundError(f"shard directory {root} does not exist")
    if not info_path.is_file():
        raise FileNotFoundError(f"shard directory {root} has no {INFO_NAME} (write shards with `pretrain prepare`)")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as exn:
        raise DataError(f"{info_path}: unreadable JSON ({exn}): re-run `pretrain prepare` for this split") from exn
    shards = info.get("shards") or []
    if not shards or int(info.get("num_samples", 0)) <= 0:
        raise ValueError(f"shard directory {root}: {INFO_NAME} lists no shards or no samples")
    missing = [s for s in shards if not (root / s).is_file() or (root / s).stat().st_size == 0]
    if missing:
        raise FileNotFoundError(f"shard directory {root}: {len(missing)} shard file(s) missing or empty: {missing[:5]}")
    info["urls"] = [str(root / s) for s in shards]
    return info


def task_info(kind: str, shard_dir: str | Path) -> dict[str, Any]:
    """What the model and evaluator need from `_info.json` of a task of `kind` (`config.task_kind`: an added task's
    shards read like its kind's): "num_samples", "num_classes", and for det "categories" and "contiguous_to_cat_id"
    (K original ids; label l ↔ entry l − 1)."""
    if kind not in SOURCES:
        raise ValueError(f"unknown task {kind!r}; expected one of {sorted(SOURCES)}")
    info = read_shard_info(shard_dir)
    return {"num_samples": int(info["num_samples"]), **SOURCES[kind].describe(info)}


def _worker_id() -> int:
    worker = torch.utils.data.get_worker_info()
    return 0 if worker is None else worker.id


@dataclass(frozen=True)
class StreamId:
    """Identity of one rank's stream for one task; seeds are derived inside each worker (so they differ per worker)."""

    seed: int
    task: str
    rank: int
    start_step: int

    def seed_for(self, purpose: int, epoch: int = 0) -> int:
        """Seed for (seed, task, rank, current worker, start_step, purpose, epoch), mixed by numpy SeedSequence."""
        entropy = [self.seed, TASK_IDS[self.task], self.rank, _worker_id(), self.start_step, purpose, epoch]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def shard_seed(self) -> int:
        """`worker_seed` for ResampledShards (which mixes in its own epoch and seed)."""
        return self.seed_for(_SHARDS)


class ErrorCounter:
    """Counts skipped samples in one worker; is also the WebDataset exception handler for tar reading."""

    def __init__(self, task: str, *, max_consecutive: int) -> None:
        self.task, self.max_consecutive = task, max_consecutive
        self.total = self.consecutive = self._reported = 0

    def record(self, exn: BaseException, key: str = "?") -> None:
        self.total += 1
        self.consecutive += 1
        if self.total <= _WARN_LIMIT:
            logger.warning("%s: skipped sample %s (worker %d): %s: %s", self.task, key, _worker_id(),
                           type(exn).__name__, exn)
        if self.consecutive >= self.max_consecutive:
            raise DataError(f"{self.task}: {self.consecutive} consecutive bad samples/shards (last: "
                            f"{type(exn).__name__}: {exn}): the shard set is broken, re-convert it with "
                            "`pretrain prepare --overwrite`") from exn

    def __call__(self, exn: BaseException) -> bool:
        self.record(exn, key="<tar>")
        return True  # continue with the next member/shard

    def good(self) -> None:
        self.consecutive = 0

    def take(self) -> int:
        """Skips since the previous call."""
        delta, self._reported = self.total - self._reported, self.total
        return delta


class _Shuffle:
    """Buffer shuffle of raw samples with a per-(rank, worker, epoch) seeded RNG."""

    def __init__(self, bufsize: int, stream: StreamId) -> None:
        self.bufsize, self.stream, self.epoch = bufsize, stream, -1

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self.epoch += 1
        rng = random.Random(self.stream.seed_for(_SHUFFLE, self.epoch))
        buf: list[dict[str, Any]] = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf


class _DecodeTransform:
    """Decode + joint transform each raw sample; failures are counted and skipped."""

    def __init__(self, source: Source, *, decoder_kwargs: dict[str, Any], train: bool, img_size: int,
                 aug: dict[str, Any], stream: StreamId | None, counter: ErrorCounter) -> None:
        self.source, self.decoder_kwargs, self.train, self.img_size = source, decoder_kwargs, train, img_size
        self.aug, self.stream, self.counter, self.epoch = aug, stream, counter, -1

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self.epoch += 1
        rng = random.Random(self.stream.seed_for(_AUG, self.epoch) if self.stream else 0)
        for raw in src:
            key = raw.get("__key__", "?")
            try:
                sample = self.source.decode(read_refs(raw), **self.decoder_kwargs)
                out = self.source.transform(sample, rng=rng, size=self.img_size, train=self.train, **self.aug)
            except Exception as exn:  # any failure on untrusted data (or a transform bug) skips and counts
                self.counter.record(exn, key=f"{key} ({raw.get('__url__', '?')})")
                continue
            self.counter.good()
            out["key"] = key
            yield out


class _Batch:
    """Group samples into batches, collate, attach the worker's skip count since its last batch.

    With a `ring`, a DataLoader worker collates into a free ring slot and ships small tensors by value (ring.py).
    """

    def __init__(self, batch_size: int, collate: Callable[..., dict[str, Any]], *, partial: bool,
                 counter: ErrorCounter, ring: BatchRing | None = None) -> None:
        self.batch_size, self.collate, self.partial, self.counter = batch_size, collate, partial, counter
        self.ring = ring

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        buf: list[dict[str, Any]] = []
        for sample in src:
            buf.append(sample)
            if len(buf) == self.batch_size:
                yield self._emit(buf)
                buf = []
        if buf and self.partial:
            yield self._emit(buf)

    def _emit(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        worker = torch.utils.data.get_worker_info()
        if self.ring is None or worker is None:
            return {**self.collate(samples), "skipped": self.counter.take()}
        out = self.ring.acquire(worker.id) if len(samples) == self.batch_size else None
        batch = self.collate(samples, out=out)
        if out is not None:  # the main process puts the slot's views back in (RingLoader)
            for name in self.ring.buffers:
                del batch[name]
            batch[SLOT_KEY] = out[SLOT_KEY]
        batch["skipped"] = self.counter.take()
        return pack_small(batch)


class _SplitByRank:
    """Shard-list split by an explicit rank (webdataset's split_by_node reads RANK/WORLD_SIZE from the env)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return islice(src, self.rank, None, self.world_size)


def _check_args(task: str, *, kind: str, batch_size: int, img_size: int, rank: int, world_size: int,
                num_workers: int) -> None:
    if kind not in SOURCES:
        raise ValueError(f"unknown task {kind!r}; expected one of {sorted(SOURCES)}")
    for name, value, low in (("batch_size", batch_size, 1), ("img_size", img_size, 1), ("world_size", world_size, 1),
                             ("num_workers", num_workers, 0)):
        if value < low:
            raise ValueError(f"{task}: {name} must be >= {low}, got {value}")
    if not 0 <= rank < world_size:
        raise ValueError(f"{task}: rank {rank} outside [0, world_size={world_size})")


_PREFETCH = 2  # batches in flight per worker (the DataLoader's default)
# ring slots per worker: prefetched + being written + the caller's current batch + its previous one, which the
# caller's loop variable still holds while it asks for the next
_RING_SLOTS = _PREFETCH + 3


def _loader(pipeline: wds.DataPipeline, num_workers: int, *, persistent: bool) -> wds.WebLoader:
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers,
                         persistent_workers=persistent and num_workers > 0,
                         prefetch_factor=_PREFETCH if num_workers > 0 else None)


def make_train_loader(task: str, shard_dir: str | Path, *, batch_size: int, img_size: int, seed: int, rank: int = 0,
                      world_size: int = 1, num_workers: int = 0, start_step: int = 0, shuffle_buffer: int = 1000,
                      aug_range: tuple[float, float] | None = None, max_consecutive_errors: int = 100,
                      reuse_buffers: bool = True) -> Iterable[dict[str, Any]]:
    """Infinite training batches of one task (contract in collate.py), deterministic in (seed, task, rank,
    start_step, num_workers).

    Args:
        aug_range: cls RandomResizedCrop area range, det/seg scale-jitter range; None = the task's default.
        start_step: the global step this loader starts at (resume); enters every seed.
        reuse_buffers: with workers, move images/masks through reused shared-memory slots (ring.py); same batches.
    """
    _check_args(task, kind=task, batch_size=batch_size, img_size=img_size, rank=rank, world_size=world_size,
                num_workers=num_workers)
    if seed < 0 or start_step < 0:
        raise ValueError(f"{task}: seed and start_step must be >= 0, got {seed}, {start_step}")
    info, source = read_shard_info(shard_dir), SOURCES[task]
    stream = StreamId(seed=seed, task=task, rank=rank, start_step=start_step)
    counter = ErrorCounter(task, max_consecutive=max_consecutive_errors)
    aug = {} if aug_range is None else {source.aug_name: tuple(aug_range)}
    ring = None
    if reuse_buffers and num_workers > 0:
        ring = BatchRing(num_workers, _RING_SLOTS, ring_fields(task, batch_size, img_size))
    pipeline = wds.DataPipeline(
        wds.ResampledShards(info["urls"], seed=seed, worker_seed=stream.shard_seed, deterministic=True),
        TarSamples(select=is_allowed_member, handler=counter, defer_bytes=_DEFER_BYTES),
        _Shuffle(shuffle_buffer, stream),
        _DecodeTransform(source, decoder_kwargs=source.decoder_kwargs(info), train=True, img_size=img_size, aug=aug,
                         stream=stream, counter=counter),
        _Batch(batch_size, source.collate, partial=False, counter=counter, ring=ring),
    )
    loader = _loader(pipeline, num_workers, persistent=True)
    return loader if ring is None else RingLoader(loader, ring)


def make_eval_loader(task: str, shard_dir: str | Path, *, batch_size: int, img_size: int, rank: int = 0,
                     world_size: int = 1, num_workers: int = 0, max_consecutive_errors: int = 100,
                     kind: str | None = None) -> wds.WebLoader:
    """Finite, deterministic eval batches of one task; ranks × workers partition the shard set exactly once.

    Shard i goes to rank i % world_size, then to that rank's worker (i // world_size) % num_workers.

    Args:
        kind: the task's kind (`config.task_kind`), whose source decodes its samples; None: `task` is a pretraining
            task, its own kind. `task` names the task in warnings and errors.
    """
    kind = kind or task
    _check_args(task, kind=kind, batch_size=batch_size, img_size=img_size, rank=rank, world_size=world_size,
                num_workers=num_workers)
    info, source = read_shard_info(shard_dir), SOURCES[kind]
    if len(info["urls"]) < world_size * max(1, num_workers):
        logger.warning("%s: %d eval shards for %d ranks × %d workers: some get no data", shard_dir,
                       len(info["urls"]), world_size, max(1, num_workers))
    counter = ErrorCounter(task, max_consecutive=max_consecutive_errors)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(info["urls"]),
        _SplitByRank(rank, world_size),
        wds.split_by_worker,
        TarSamples(select=is_allowed_member, handler=counter, defer_bytes=_DEFER_BYTES),
        _DecodeTransform(source, decoder_kwargs=source.decoder_kwargs(info), train=False, img_size=img_size, aug={},
                         stream=None, counter=counter),
        _Batch(batch_size, source.collate, partial=True, counter=counter),
    )
    return _loader(pipeline, num_workers, persistent=False)
