"""What every training loop shares: rank agreement, the non-finite streak, the loss window, per-task timing, and the
life cycle around the steps: start-up, stream resume, checkpoint / stop, shutdown.

The loops (`pretrain train`, `pretrain finetune`, `pretrain add-task`, the heal of `pretrain extract --heal`) read
top to bottom in their own module and call these pieces; nothing here owns the loop. Agreement is collective: every
rank calls `agree` once per micro-batch. `start_engine` is the start-up they share (config files, engine, resume);
`resume_micro_step` + `resume_stream` the stream's restart, `checkpoint_if_due` a step's checkpoint, `stop_code` the
exit on a signal and `close_loop` the shutdown, each written once for every loop; `untouched_rng` keeps evaluations
out of the training's random stream.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pretrain import dist

logger = logging.getLogger(__name__)


def to_device(obj: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (nested dicts/lists) to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    return obj


def clock(device: torch.device) -> float:
    """Wall time after the device's queued work finished (CUDA runs asynchronously; timing needs a sync)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextmanager
def untouched_rng(device: torch.device) -> Iterator[None]:
    """Run an evaluation inside a training without moving the training's random stream: its DataLoader draws the
    workers' base seed from torch's RNG, so without this, evaluating (at the start, every N steps) would change every
    later dropout mask, gate noise and sampler draw: a run's weights would depend on when it evaluated."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def agree(loss: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """(every rank's loss is finite, some rank was asked to stop): one all-reduce, identical on every rank, so a
    non-finite loss skips the step everywhere and a signal on one rank stops all of them after the same step."""
    flags = dist.all_reduce_max(torch.tensor([float(not torch.isfinite(loss)), float(stop_requested)]))
    return bool(flags[0] == 0), bool(flags[1] > 0)


def skip_micro_batch(engine, model: torch.nn.Module, grad_accum: int) -> None:
    """A skipped micro-batch still advances DeepSpeed's micro-step count under accumulation (zero gradient)."""
    if grad_accum > 1:
        engine.backward(sum(p.view(-1)[0] * 0 for p in model.parameters() if p.requires_grad))
        engine.step()


class NonFiniteGuard:
    """Counts non-finite steps; `update(ok)` returns True when `max_in_row` came in a row (abort the run)."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row, self.in_row, self.total = max_in_row, 0, 0

    def update(self, ok: bool, step: int) -> bool:
        if ok:
            self.in_row = 0
            return False
        self.in_row, self.total = self.in_row + 1, self.total + 1
        logger.warning("step %d: non-finite loss, skipped (%d in a row, %d total)", step, self.in_row, self.total)
        if self.in_row >= self.max_in_row:
            logger.error("aborting: %d consecutive non-finite steps; last good checkpoint kept", self.in_row)
            return True
        return False


class LossWindow:
    """Per-key sums and counts over a logging window: a task's loss averages the steps that trained it."""

    def __init__(self) -> None:
        self._sums: dict[str, tuple[float, int]] = {}

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            total, count = self._sums.get(key, (0.0, 0))
            self._sums[key] = (total + float(value), count + 1)

    def pop(self) -> dict[str, float]:
        """The window's means; starts a new window."""
        means = {k: total / count for k, (total, count) in self._sums.items()}
        self._sums = {}
        return means


class TaskTimer:
    """Images and seconds per task over a logging window → `img_per_s/<task>`."""

    def __init__(self, tasks: Iterable[str]) -> None:
        self.tasks = list(tasks)
        self._reset()

    def _reset(self) -> None:
        self.images = dict.fromkeys(self.tasks, 0)
        self.seconds = dict.fromkeys(self.tasks, 0.0)

    def add(self, tasks: Iterable[str], seconds: float, images: dict[str, int] | None = None) -> None:
        """Split `seconds` evenly over `tasks`; count `images` per task."""
        tasks = list(tasks)
        for task in tasks:
            self.seconds[task] += seconds / len(tasks)
        for task, n in (images or {}).items():
            self.images[task] += n

    def pop(self) -> dict[str, float]:
        rates = {f"img_per_s/{t}": self.images[t] / self.seconds[t] for t in self.tasks if self.seconds[t] > 0}
        self._reset()
        return rates


def already_complete(run_dir: Path, max_steps: int) -> bool:
    """True when the run's committed checkpoint is at `max_steps` or beyond (a chained job then has nothing to do;
    a damaged `latest` is left to resume, which falls back to the newest intact checkpoint)."""
    from pretrain.runs import checkpoint

    latest, damaged = checkpoint.read_pointer(run_dir / "checkpoints")
    done = None if damaged else checkpoint.TAG_RE.match(latest or "")
    if done and int(done.group(1)) >= max_steps:
        logger.info("run already complete: %s is at step %d >= train.max_steps=%d", run_dir / "checkpoints" / latest,
                    int(done.group(1)), max_steps)
        return True
    return False


def start_engine(cfg: Any, model: torch.nn.Module, info: dist.DistInfo, *,
                 keep_config: bool = False) -> tuple[Any, int, dict | None]:
    """What both loops do before their first step: write the resolved config and the generated DeepSpeed config
    (rank 0), initialise torch.distributed, build the engine, and resume from `cfg.output_dir` (weights, optimizer,
    schedule, this rank's RNG and stream state) or seed this rank's randomness.

    Args:
        cfg: a run or fine-tuning config (its `engine`, `optim`, `train`, `seed`, `output_dir`).
        keep_config: a resume leaves `config.yaml` as the first start wrote it (a fine-tuning run's config is
            written once); otherwise every start writes it.
    Returns: (engine, start step, this rank's saved stream state or None).
    """
    from pretrain.config.load import save_resolved
    from pretrain.parallel.engine import build_engine, init_distributed, make_ds_config
    from pretrain.runs import checkpoint
    from pretrain.training.tracking import wandb_mode

    # a bad WANDB_MODE is one line (exit 2) before the process group and the engine start, not after them
    wandb_mode(cfg.logging.wandb)

    run_dir = Path(cfg.output_dir)
    ds_config = make_ds_config(cfg.engine, cfg.optim, max_steps=cfg.train.max_steps, world_size=info.world_size)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    init_distributed(cfg.engine.backend, cfg.engine.timeout_s)
    engine = build_engine(model, engine=cfg.engine, optim=cfg.optim, max_steps=cfg.train.max_steps,
                          world_size=info.world_size)
    resumed = checkpoint.load_latest(engine, run_dir / "checkpoints")
    # only once the checkpoint loaded: a resume that fails must leave the run's config.yaml as it was
    if info.is_main and not (keep_config and resumed is not None):
        save_resolved(cfg, run_dir)
    if resumed is None:
        # per-rank randomness (drop path, noisy gates; with data.partitions the forward's draws are keyed per sample
        # instead: training/global_batch.py)
        torch.manual_seed(cfg.seed * 1000 + info.rank + 1)
        return engine, 0, None
    start_step, client_state, rank_state = resumed
    checkpoint.restore_rng(rank_state)
    # the stream's counters (per rank); checkpoints written before they were saved hold only the task counts
    stream_state = rank_state.get("stream") or {"step": start_step * cfg.engine.grad_accum,
                                                "counts": client_state.get("task_counts", {})}
    logger.info("resumed from step %d in %s", start_step, run_dir / "checkpoints")
    return engine, start_step, stream_state


def resume_micro_step(stream_state: dict | None, first_micro_step: int) -> int:
    """The micro-step a loop's stream starts from: `first_micro_step` on a fresh start; on resume, the stream's last
    restart (loaders restart at periodic checkpoints only: a resume from a signal checkpoint replays from there)."""
    return stream_state.get("start_step", stream_state["step"]) if stream_state else first_micro_step


def resume_stream(mixed: Any, stream_state: dict | None) -> Iterator:
    """An iterator over `mixed` (a `MixedStream`) with this rank's saved counters restored on resume."""
    if stream_state:
        mixed.load_state_dict(stream_state)
    return iter(mixed)


def checkpoint_if_due(engine, mixed: Any, step: int, *, ckpt_dir: Path, train: Any, ok: bool, stopping: bool) -> None:
    """A step's checkpoint, collective: periodic (`train.ckpt_every`, never inside a non-finite streak: `ok` False),
    at the last step (`train.max_steps`), or on a stop request. Model/optimizer (DeepSpeed), this rank's RNG and
    stream counters; the `train.keep_last` newest are kept."""
    from pretrain.runs import checkpoint

    periodic = step % train.ckpt_every == 0 and ok
    if periodic:  # before the save, so the saved stream state starts here: nothing to replay on resume
        mixed.restart()  # batches after step s depend on (seed, s) only: every resume sees the same batches
    if periodic or step == train.max_steps or stopping:
        checkpoint.save(engine, ckpt_dir, step, client_state={"step": step},
                        rank_state={**checkpoint.capture_rng(), "stream": mixed.state_dict()},
                        keep_last=train.keep_last)


def stop_code(step: int, log: logging.Logger, *, requeue: bool = True) -> int:
    """The exit code of a loop stopped by a signal after `step` (its checkpoint is saved): EXIT_REQUEUE. `requeue`:
    say the job is requeued (a SLURM job) rather than that the same command resumes; logged by the loop's `log`."""
    from pretrain.training.signals import EXIT_REQUEUE

    if requeue:
        log.warning("stopped by signal after step %d; exit %d so the job is requeued", step, EXIT_REQUEUE)
    else:
        log.warning("stopped by signal after step %d; run the same command to resume", step)
    return EXIT_REQUEUE


def close_loop(stop: Any, writer: Any, tracker: Any = None, bar: Any = None) -> None:
    """The end of every loop, whatever its exit: the progress bar, the signal handlers given back, the logs
    flushed and closed."""
    if bar is not None:
        bar.close()
    stop.uninstall()
    writer.close()
    if tracker is not None:
        tracker.finish()
