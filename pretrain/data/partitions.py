"""Partitioned training streams (`data.partitions` > 0): the samples of every global batch are a function of (seed,
task, step) only, not of the world size, the number of loader workers or the step a run was resumed at.

Order (`EpochOrder`, per task): epoch e is one sequence of the task's n samples: the shards in a permutation seeded
by (seed, task, e), each shard's samples in a permutation seeded by (seed, task, e, shard) (counts from `_info.json`
`shard_lengths`). The sequence is cut into N = `data.partitions` contiguous slices (lengths differ by at most one);
partition p reads its slice of epoch 0, then its slice of epoch 1, and so on. The task's j-th global batch (its j-th
draw) is, for p = 0 .. N-1 in order, partition p's samples j·c .. j·c + c - 1, c = global batch / N. Rank r of R
serves partitions r·N/R .. (r+1)·N/R - 1, so the rank batches concatenated in rank order are the global batch on any
R that divides N. A slice holds whole shards except at its two ends: a partition reads a shard through once.

Position: the draws of a task before step s follow from (seed, s) (`TaskSampler` is pure), so a stream built at s
starts every partition where the uninterrupted run was: nothing is replayed, repeated or skipped within an epoch,
whatever the world size before and after. Augmentation: each sample's RNG is seeded by (seed, task, epoch, its
position in the epoch), so it does not depend on who decodes it.

Workers: worker w of W builds this rank's batches of draws j ≡ w (mod W). The DataLoader takes one item from each
worker in turn, so items arrive in draw order, every worker is busy whatever N/R is, and each item is a whole rank
batch, collated into a shared-memory ring slot as in the resampled stream (ring.py). Reading is random access: a
worker indexes each shard it touches once (walks its headers, `tar.index_shard`; it keeps 2 per partition served), then
reads each sample's members with one `pread`; a shard is indexed by up to W workers per rank.

Bad samples: a sample that cannot be read or decoded is replaced by the next good one of the epoch's sequence (the
same replacement on every layout, with the bad sample's augmentation seed) and counted in the batch's `skipped`;
`max_consecutive_errors` failures in a row raise a DataError. The order follows `_info.json`'s counts: a shard
holding fewer readable samples (truncated, corrupt) costs its missing ones as bad samples, one holding more has its
extra ones never read (both logged once per worker).
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data

from pretrain.config.checks import ConfigError
from pretrain.data.collate import ring_fields
from pretrain.data.decode import is_allowed_member
from pretrain.data.ring import BatchRing, RingLoader
from pretrain.data.sources import (
    _DEFER_BYTES,
    _RING_SLOTS,
    SOURCES,
    TASK_IDS,
    ErrorCounter,
    Source,
    _Batch,
    _check_args,
    _loader,
    read_shard_info,
)
from pretrain.data.tar import index_shard, read_refs
from pretrain.errors import DataError, SetupError

logger = logging.getLogger(__name__)

_ORDER_SHARDS, _ORDER_SAMPLES, _ORDER_AUG = 3, 4, 5  # seed purposes (sources.py uses 0-2)
# Shard indexes (and within-shard orders) a worker keeps per partition it serves: a partition's chunk lies in one
# shard or straddles two; fewer would re-walk a shard for every chunk once a rank serves many partitions
_CACHE_PER_PARTITION = 2


def _seed(*entropy: int) -> int:
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


def check_layout(partitions: int, world_size: int) -> None:
    """SetupError (exit 7, the code of a process layout that does not fit the config) unless `world_size` divides
    `partitions`."""
    if partitions % world_size:
        divisors = [d for d in range(1, partitions + 1) if partitions % d == 0]
        raise SetupError(f"data.partitions={partitions} is not a multiple of the world size {world_size}: each rank "
                         f"serves partitions / world size of them; run on {', '.join(map(str, divisors))} ranks "
                         "(changing data.partitions changes the data order)")


def global_positions(rank: int, local_batch: int) -> range:
    """Where rank `rank`'s `local_batch` samples sit in the global batch: the rank batches concatenated in rank
    order are the global batch (module docstring), on every layout and in every micro-batch."""
    return range(rank * local_batch, (rank + 1) * local_batch)


def shard_lengths(info: dict[str, Any], shard_dir: str | Path) -> list[int]:
    """`_info.json` `shard_lengths`, checked against its `shards` and `num_samples` (DataError naming the file)."""
    lengths = info.get("shard_lengths")
    ok = (isinstance(lengths, list) and len(lengths) == len(info["shards"])
          and all(isinstance(n, int) and n >= 0 for n in lengths) and sum(lengths) == int(info["num_samples"]))
    if not ok:
        raise DataError(f"{Path(shard_dir) / '_info.json'}: shard_lengths missing or not one count per shard summing "
                        "to num_samples; data.partitions needs them: re-run `pretrain prepare` for this split")
    return lengths


class EpochOrder:
    """Which sample every partition reads at every count (module docstring).

    Args:
        lengths: samples per shard, in `_info.json` order.
        seed / task_id: what the order is seeded by (besides the epoch and shard).
        partitions: N, at most the number of samples.
        cache: within-shard orders kept (at least 2 per partition read, see `_CACHE_PER_PARTITION`).
    """

    def __init__(self, lengths: Sequence[int], *, seed: int, task_id: int, partitions: int,
                 cache: int = 2 * _CACHE_PER_PARTITION) -> None:
        self.cache, self.lengths = cache, np.asarray(lengths, dtype=np.int64)
        self.n, self.seed, self.task_id, self.partitions = int(self.lengths.sum()), seed, task_id, partitions
        if not 1 <= partitions <= self.n:
            raise ValueError(f"{partitions} partitions over {self.n} samples: need 1 <= partitions <= samples")
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._within: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def slice(self, p: int) -> tuple[int, int]:
        """Positions [start, stop) of partition p in every epoch's sequence."""
        return p * self.n // self.partitions, (p + 1) * self.n // self.partitions

    def position(self, p: int, k: int) -> tuple[int, int]:
        """(epoch, position in that epoch's sequence) of partition p's k-th sample since the run's start."""
        start, stop = self.slice(p)
        epoch, i = divmod(k, stop - start)
        return epoch, start + i

    def locate(self, epoch: int, q: int) -> tuple[int, int]:
        """(shard, index of the sample in the shard's file order) at position q of epoch `epoch`."""
        if epoch not in self._epochs:
            rng = np.random.default_rng(_seed(self.seed, self.task_id, _ORDER_SHARDS, epoch))
            perm = rng.permutation(len(self.lengths))
            _remember(self._epochs, epoch, (perm, np.cumsum(self.lengths[perm])), 2)  # at most 2 epochs in use
        perm, ends = self._epochs[epoch]
        i = int(np.searchsorted(ends, q, side="right"))  # empty shards have no position: skipped by "right"
        shard, offset = int(perm[i]), q - (int(ends[i - 1]) if i else 0)
        key = (epoch, shard)
        if key not in self._within:
            rng = np.random.default_rng(_seed(self.seed, self.task_id, _ORDER_SAMPLES, epoch, shard))
            _remember(self._within, key, rng.permutation(int(self.lengths[shard])), self.cache)
        self._within.move_to_end(key)
        return shard, int(self._within[key][offset])


def _remember(cache: OrderedDict, key: Any, value: Any, size: int) -> None:
    """Add to an LRU cache of `size` entries (the caller moves hits to the end)."""
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)


class _ShardIndex:
    """Random access to one worker's samples: the `cache` last used shard indexes (`tar.index_shard`)."""

    def __init__(self, urls: Sequence[str], lengths: Sequence[int], task: str, cache: int) -> None:
        self.urls, self.lengths, self.task, self.cache = urls, lengths, task, cache
        self._cache: OrderedDict[int, list[dict[str, Any]]] = OrderedDict()
        self._warned: set[int] = set()

    def sample(self, shard: int, index: int) -> dict[str, Any]:
        """The raw sample (`MemberRef`s for large members); LookupError when the shard has no such sample."""
        if shard not in self._cache:
            samples, errors = index_shard(self.urls[shard], select=is_allowed_member, defer_bytes=_DEFER_BYTES)
            if (errors or len(samples) != self.lengths[shard]) and shard not in self._warned:
                self._warned.add(shard)  # the order keeps _info.json's count: missing samples are bad samples
                logger.warning("%s: %s holds %d readable samples, its _info.json shard_lengths says %d (%d read "
                               "error(s)%s): missing samples are replaced and counted, extra ones never read",
                               self.task, self.urls[shard], len(samples), self.lengths[shard], len(errors),
                               f", first: {errors[0]}" if errors else "")
            _remember(self._cache, shard, samples, self.cache)
        samples = self._cache[shard]
        self._cache.move_to_end(shard)
        if index >= len(samples):
            raise LookupError(f"sample {index} of {self.urls[shard]} is missing (the shard has {len(samples)} "
                              "readable samples)")
        return samples[index]


class _PartitionBatches(torch.utils.data.IterableDataset):
    """This rank's batches of draws `start_draw`, `start_draw + 1`, ...; worker w of W yields draws ≡ w (mod W)."""

    def __init__(self, *, task: str, order: EpochOrder, urls: Sequence[str], parts: range, chunk: int,
                 start_draw: int, seed: int, source: Source, decoder_kwargs: dict[str, Any], img_size: int,
                 aug: dict[str, Any], counter: ErrorCounter, batcher: _Batch) -> None:
        super().__init__()
        self.task, self.order, self.urls, self.parts, self.chunk = task, order, urls, parts, chunk
        self.start_draw, self.seed, self.source, self.decoder_kwargs = start_draw, seed, source, decoder_kwargs
        self.img_size, self.aug, self.counter, self.batcher = img_size, aug, counter, batcher

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        w, workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        return self.batcher(self._samples(w, workers))

    def _samples(self, w: int, workers: int) -> Iterator[dict[str, Any]]:
        shards = _ShardIndex(self.urls, self.order.lengths.tolist(), self.task, self.order.cache)
        for draw in count(self.start_draw + w, workers):
            for p in self.parts:
                for k in range(draw * self.chunk, (draw + 1) * self.chunk):
                    yield self._sample(shards, *self.order.position(p, k))

    def _sample(self, shards: _ShardIndex, epoch: int, q: int) -> dict[str, Any]:
        """The decoded, augmented sample at position q of `epoch`, or the next good one after it."""
        aug_seed = _seed(self.seed, TASK_IDS[self.task], _ORDER_AUG, epoch, q)
        for t in range(self.order.n):
            shard, index = self.order.locate(epoch, (q + t) % self.order.n)
            raw: dict[str, Any] = {}
            try:
                raw = shards.sample(shard, index)
                sample = self.source.decode(read_refs(raw), **self.decoder_kwargs)
                out = self.source.transform(sample, rng=random.Random(aug_seed), size=self.img_size, train=True,
                                            **self.aug)
            except Exception as exn:  # any failure on untrusted data skips and counts (raises after too many)
                self.counter.record(exn, key=f"{raw.get('__key__', '?')} ({self.urls[shard]})")
                continue
            self.counter.good()
            out["key"] = raw["__key__"]
            return out
        raise DataError(f"{self.task}: no readable sample in the {self.order.n} of epoch {epoch}")


def make_partition_loader(task: str, shard_dir: str | Path, *, batch_size: int, img_size: int, seed: int,
                          partitions: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                          start_draw: int = 0, aug_range: tuple[float, float] | None = None,
                          max_consecutive_errors: int = 100, reuse_buffers: bool = True) -> Iterable[dict[str, Any]]:
    """This rank's part of a task's global batches `start_draw`, `start_draw + 1`, ... (contract in collate.py).

    Args:
        batch_size: the GLOBAL batch of the task; each item holds batch_size / world_size samples (the rank's
            partitions' chunks, in partition order).
        partitions: N virtual partitions; world_size must divide N and N must divide batch_size.
        start_draw: how many batches of this task came before (a resume: `draws_before` of the step).
        aug_range: cls RandomResizedCrop area range, det/seg scale-jitter range; None = the task's default.
    Raises: SetupError (world size), ConfigError (batch size, too many partitions), DataError (`_info.json`).
    """
    check_layout(partitions, world_size)
    _check_args(task, kind=task, batch_size=batch_size, img_size=img_size, rank=rank, world_size=world_size,
                num_workers=num_workers)
    if seed < 0 or start_draw < 0:
        raise ValueError(f"{task}: seed and start_draw must be >= 0, got {seed}, {start_draw}")
    if batch_size % partitions:
        raise ConfigError(f"tasks.{task}.batch_size={batch_size} is not a multiple of data.partitions={partitions}: "
                          "with partitions the batch size is the task's global batch, split evenly over them")
    info, source = read_shard_info(shard_dir), SOURCES[task]
    lengths = shard_lengths(info, shard_dir)
    if partitions > sum(lengths):
        raise ConfigError(f"data.partitions={partitions} is more than the {sum(lengths)} samples of {shard_dir}")
    per_rank, per = batch_size // world_size, partitions // world_size
    order = EpochOrder(lengths, seed=seed, task_id=TASK_IDS[task], partitions=partitions,
                       cache=_CACHE_PER_PARTITION * per + 2)
    counter = ErrorCounter(task, max_consecutive=max_consecutive_errors)
    ring = None
    if reuse_buffers and num_workers > 0:
        ring = BatchRing(num_workers, _RING_SLOTS, ring_fields(task, per_rank, img_size))
    logger.info("%s: partitions %d-%d of %d on rank %d; global batch %d = %d per partition, %d per rank; draws from "
                "%d on, %d worker(s) taking turns", task, rank * per, (rank + 1) * per - 1, partitions, rank,
                batch_size, batch_size // partitions, per_rank, start_draw, max(1, num_workers))
    dataset = _PartitionBatches(
        task=task, order=order, urls=info["urls"], parts=range(rank * per, (rank + 1) * per),
        chunk=batch_size // partitions, start_draw=start_draw, seed=seed, source=source,
        decoder_kwargs=source.decoder_kwargs(info), img_size=img_size,
        aug={} if aug_range is None else {source.aug_name: tuple(aug_range)}, counter=counter,
        batcher=_Batch(per_rank, source.collate, partial=False, counter=counter, ring=ring))
    loader = _loader(dataset, num_workers, persistent=True)
    return loader if ring is None else RingLoader(loader, ring)
