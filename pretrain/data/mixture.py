"""Task choice per step and the mixed multi-task batch stream.

`TaskSampler.task_for_step(step)` is a pure function of (seed, step): every rank takes the same task in the same
step (ZeRO-1/2 needs the same parameters to receive gradients on every rank), and after a resume at step s the task
sequence continues exactly as in the uninterrupted run. `MixedStream` pulls one batch per step from the chosen
task's loader only; see DATA.md for exactly what is reproducible across resumes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from pretrain.data.sources import make_train_loader, read_shard_info

logger = logging.getLogger(__name__)

MODES = ("fixed", "size", "temperature")
_SEED_MULT = 1_000_003


def task_probabilities(tasks: Sequence[str], *, mode: str = "fixed", weights: Sequence[float] | None = None,
                       sizes: Sequence[int] | None = None, temperature: float = 1.0) -> dict[str, float]:
    """Sampling probability per task.

    fixed: weights normalised; size: p ∝ n (dataset sizes); temperature: p ∝ n^(1/T) (T=1 is "size", T→∞ uniform).
    """
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be non-empty and distinct, got {list(tasks)}")
    if mode not in MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; expected one of {MODES}")
    if mode == "fixed":
        raw = _per_task(tasks, weights, "weights")
    else:
        counts = _per_task(tasks, sizes, "sizes")
        if mode == "temperature":
            if temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {temperature}")
            counts = [n ** (1.0 / temperature) for n in counts]
        raw = counts
    total = sum(raw)
    if total <= 0:
        raise ValueError(f"all task {'weights' if mode == 'fixed' else 'sizes'} are zero: {dict(zip(tasks, raw))}")
    return {t: v / total for t, v in zip(tasks, raw)}


def _per_task(tasks: Sequence[str], values: Sequence[float] | None, name: str) -> list[float]:
    if values is None or len(values) != len(tasks):
        raise ValueError(f"{name} must give one value per task {list(tasks)}, got {values}")
    for task, value in zip(tasks, values):
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"{name} for task {task!r} must be >= 0, got {value}")
    return [float(v) for v in values]


class TaskSampler:
    """Which task(s) each step trains on; counts the realised draws for logging.

    Args:
        tasks: task names in a fixed order (the order enters the draw, so keep it identical on all ranks).
        weights / sizes / temperature / mode: see `task_probabilities`.
        seed: integer run seed; the draw for step s uses `random.Random(seed * 1_000_003 + s)`.
        all_tasks: every step trains every task (per-task sub-batches); probabilities are then unused.
    """

    def __init__(self, tasks: Sequence[str], weights: Sequence[float] | None = None, *, mode: str = "fixed",
                 sizes: Sequence[int] | None = None, temperature: float = 1.0, seed: int = 0,
                 all_tasks: bool = False) -> None:
        self.tasks = list(tasks)
        self.probs = task_probabilities(self.tasks, mode=mode, weights=weights, sizes=sizes, temperature=temperature)
        self.seed, self.all_tasks = int(seed), all_tasks
        self._weights = [self.probs[t] for t in self.tasks]
        self.counts = dict.fromkeys(self.tasks, 0)

    def task_for_step(self, step: int) -> str:
        """The single task of `step`; a pure function of (seed, step), identical on every rank."""
        return random.Random(self.seed * _SEED_MULT + step).choices(self.tasks, weights=self._weights)[0]

    def tasks_for_step(self, step: int) -> list[str]:
        """All tasks (all_tasks mode) or [task_for_step(step)]; pure."""
        return list(self.tasks) if self.all_tasks else [self.task_for_step(step)]

    def draw(self, step: int) -> list[str]:
        """`tasks_for_step` and count the result in `counts`."""
        tasks = self.tasks_for_step(step)
        for task in tasks:
            self.counts[task] += 1
        return tasks

    def frequencies(self) -> dict[str, float]:
        """Realised fraction of draws per task (0 before any draw)."""
        total = sum(self.counts.values())
        return {t: (c / total if total else 0.0) for t, c in self.counts.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = {t: int(state["counts"].get(t, 0)) for t in self.tasks}


class MixedStream:
    """Yields `(step, task, batch)` from `start_step` on, pulling only from the chosen task's loader
    (all_tasks mode: `(step, "all", [batch per task])`).

    Loaders are built lazily (a task never drawn starts no workers) by
    `make_loader(task, seed=, rank=, world_size=, num_workers=, start_step=, **loader_kwargs[task])`, so a resumed
    stream reseeds every loader from (seed, start_step). `skipped` sums the per-batch skip counts per task.

    Args:
        loader_kwargs: per task, e.g. {"shard_dir": ..., "batch_size": 64, "img_size": 224}: batch size and
            resolution are per task.
        seed: data seed (default: the sampler's seed).
    """

    def __init__(self, sampler: TaskSampler, loader_kwargs: Mapping[str, Mapping[str, Any]], *, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, start_step: int = 0, seed: int | None = None,
                 make_loader: Callable[..., Any] = make_train_loader) -> None:
        missing = [t for t in sampler.tasks if t not in loader_kwargs]
        if missing:
            raise ValueError(f"loader_kwargs has no entry for tasks {missing}")
        self.sampler, self.loader_kwargs = sampler, loader_kwargs
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed = sampler.seed if seed is None else seed
        self.start_step = self.step = start_step
        self.make_loader = make_loader
        self.skipped = dict.fromkeys(sampler.tasks, 0)
        self._iters: dict[str, Iterator[dict[str, Any]]] = {}
        self._replay_to = start_step  # steps before this were consumed before a resume: draw and discard them

    def _next_batch(self, task: str, *, count: bool = True) -> dict[str, Any]:
        if task not in self._iters:
            loader = self.make_loader(task, seed=self.seed, rank=self.rank, world_size=self.world_size,
                                      num_workers=self.num_workers, start_step=self.start_step,
                                      **self.loader_kwargs[task])
            self._iters[task] = iter(loader)
        # a DataLoader draws its base seed from the global torch RNG when its iterator starts, which for a wrapped
        # loader (a generator) is the first `next`, and with num_workers=0 the whole pipeline runs here: the
        # process's RNG (drop path, noisy gates) must not depend on the data, or a resume that replays batches
        # would drift from the uninterrupted run. Forking costs one 5 KB state copy per batch.
        with torch.random.fork_rng(devices=[]):
            batch = next(self._iters[task])
        if count:
            self.skipped[task] += int(batch.get("skipped", 0))
        return batch

    def __iter__(self) -> Iterator[tuple[int, str, Any]]:
        while self.step < self._replay_to:  # resumed between two restarts: the same batches, not counted twice
            for task in self.sampler.tasks_for_step(self.step):
                self._next_batch(task, count=False)
            self.step += 1
        while True:
            step = self.step
            tasks = self.sampler.draw(step)
            batches = [self._next_batch(t) for t in tasks]
            self.step = step + 1
            if self.sampler.all_tasks:
                yield step, "all", batches
            else:
                yield step, tasks[0], batches[0]

    def restart(self) -> None:
        """Reseed every loader from (seed, current step), keeping the counters.

        Called at every periodic checkpoint: the batches after such a step s depend only on (seed, s). A resume from
        any other step (a signal checkpoint) rebuilds the loaders at the last restart and replays the steps since
        (`state_dict` records both), so every resumed run sees exactly the batches the uninterrupted run saw.
        """
        self.start_step = self._replay_to = self.step
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Next step, the step of the last restart, realised task counts and this rank's skip counts (JSON-able);
        resume with `MixedStream(start_step=state["start_step"])` + `load_state_dict(state)`."""
        return {"step": self.step, "start_step": self.start_step, "counts": dict(self.sampler.counts),
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters and the position: the stream must be built at the state's `start_step` (default: its
        `step`); iteration then replays, without counting, the steps from there to `step`."""
        start, step = int(state.get("start_step", state["step"])), int(state["step"])
        if start != self.start_step or step < start:
            raise ValueError(f"stream state (start_step {start}, step {step}) needs a stream built with "
                             f"start_step={start}, this one has {self.start_step}")
        self.step, self._replay_to = start, step
        self.sampler.load_state_dict(state)
        self.skipped = {t: int(state.get("skipped", {}).get(t, 0)) for t in self.sampler.tasks}

    def epochs(self) -> dict[str, float]:
        """Epochs of data consumed per task: none for resampled streams (they have no epochs)."""
        return {}

    def close(self) -> None:
        """Drop the loader iterators (shuts their worker processes down)."""
        self._iters.clear()


def draws_before(sampler: TaskSampler, step: int) -> dict[str, int]:
    """How many batches of each task the steps before `step` drew: a function of (seed, step) only."""
    draws = dict.fromkeys(sampler.tasks, 0)
    for s in range(step):
        for task in sampler.tasks_for_step(s):
            draws[task] += 1
    return draws


class PartitionStream(MixedStream):
    """`MixedStream` over partitioned loaders (`data.partitions` > 0, partitions.py): the batches of every step
    are a function of (seed, step), so the stream's position is the step alone. A resume, on any world size, builds
    the stream at its step (`start_step` = `step` in `state_dict`); `restart` has nothing to reseed.

    Args:
        loader_kwargs: per task {"shard_dir", "batch_size" (the GLOBAL batch), "img_size", "aug_range"}; the
            shards' `_info.json` gives the sample counts behind `epochs`.
        partitions: N; the world size must divide it and it must divide every batch size.
        make_loader: `partitions.make_partition_loader` or a stand-in with its signature.
    """

    def __init__(self, sampler: TaskSampler, loader_kwargs: Mapping[str, Mapping[str, Any]], *, partitions: int,
                 make_loader: Callable[..., Any], rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 start_step: int = 0, seed: int | None = None) -> None:
        super().__init__(sampler, loader_kwargs, rank=rank, world_size=world_size, num_workers=num_workers,
                         start_step=start_step, seed=seed, make_loader=self._make)
        self.partitions, self._make_partition_loader = partitions, make_loader
        self._position(start_step)
        self.samples = {t: int(read_shard_info(kw["shard_dir"])["num_samples"]) for t, kw in loader_kwargs.items()}

    def _position(self, step: int) -> None:
        self.start_step = self.step = self._replay_to = step
        self.draws = draws_before(self.sampler, step)
        self._start_draws = dict(self.draws)
        self.sampler.counts = dict(self.draws)  # the realised draws are the step's, whichever rank state was loaded

    def _make(self, task: str, *, start_step: int, **kwargs: Any) -> Any:
        return self._make_partition_loader(task, partitions=self.partitions, start_draw=self._start_draws[task],
                                           **kwargs)

    def _next_batch(self, task: str, *, count: bool = True) -> dict[str, Any]:
        batch = super()._next_batch(task, count=count)
        self.draws[task] += 1
        return batch

    def restart(self) -> None:
        """Nothing to reseed: the loaders' positions already are the step's."""
        self.start_step = self.step

    def epochs(self) -> dict[str, float]:
        """Epochs of each task's data consumed so far (global batches drawn × global batch / samples)."""
        return {t: self.draws[t] * int(self.loader_kwargs[t]["batch_size"]) / self.samples[t] for t in self.draws}

    def state_dict(self) -> dict[str, Any]:
        """The step (all a resume needs), the partition count, per task the draws and (epoch, samples into it), and
        this rank's skip counts."""
        consumed = {t: self.draws[t] * int(self.loader_kwargs[t]["batch_size"]) for t in self.draws}
        return {"step": self.step, "start_step": self.step, "partitions": self.partitions,
                "counts": dict(self.sampler.counts), "skipped": dict(self.skipped), "draws": dict(self.draws),
                "epoch": {t: list(divmod(n, self.samples[t])) for t, n in consumed.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Position the stream at the state's step (from any world size or stream mode); keep this rank's skips."""
        if self._iters:
            raise RuntimeError("load_state_dict must come before the first batch")
        saved = state.get("partitions")
        if saved is not None and int(saved) != self.partitions:
            logger.warning("stream state saved with data.partitions=%s, now %d: the data order changes here",
                           saved, self.partitions)
        self._position(int(state["step"]))
        self.skipped = {t: int(state.get("skipped", {}).get(t, 0)) for t in self.sampler.tasks}
