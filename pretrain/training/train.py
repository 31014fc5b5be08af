"""`pretrain train`: heterogeneous multi-task pretraining of the task-routed MoE ViT with DeepSpeed.

`main` builds (data → model → engine → resume); `train_loop` reads top to bottom: per step choose the task(s),
forward, loss, agree across ranks on finiteness and stop requests, backward/step, log, checkpoint, evaluate. The
pieces every training loop shares live in `lifecycle.py`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pretrain import dist
from pretrain.config.pretraining import RunConfig, enabled_tasks, task_order
from pretrain.data.build import DataSpec, build_sampler, build_stream, check_shards, save_class_lists
from pretrain.data.collate import TARGET_KEYS
from pretrain.data.partitions import check_layout
from pretrain.log import MetricsWriter, progress, read_metrics, setup_logging
from pretrain.models.moe_losses import collect_aux_losses, moe_modules, pop_routing_counts
from pretrain.runs.drift import check_resume
from pretrain.runs.load import build_run_model
from pretrain.training.global_batch import GlobalBatch
from pretrain.training.lifecycle import (
    LossWindow,
    NonFiniteGuard,
    TaskTimer,
    agree,
    already_complete,
    checkpoint_if_due,
    clock,
    close_loop,
    resume_micro_step,
    resume_stream,
    skip_micro_batch,
    start_engine,
    stop_code,
    to_device,
    untouched_rng,
)
from pretrain.training.routing_stats import routing_metrics
from pretrain.training.signals import EXIT_ABORT, stop_flag
from pretrain.training.tracking import Tracker, wandb_mode

logger = logging.getLogger(__name__)


def forward_task(engine, batch: dict) -> dict[str, torch.Tensor]:
    """One task batch through the engine; returns that task's named loss terms."""
    targets = batch[TARGET_KEYS[batch["task"]]]
    return engine(batch["task"], to_device(batch["images"], engine.device), to_device(targets, engine.device))


def usage_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.usage_TE.detach().cpu().clone() for name, m in moe_modules(model)}


def train_loop(cfg: RunConfig, engine, model, spec: DataSpec, info: dist.DistInfo, start_step: int,
               stream_state: dict | None) -> int:
    run_dir, tasks, accum = Path(cfg.output_dir), enabled_tasks(cfg.tasks), cfg.engine.grad_accum
    sampler = build_sampler(cfg.data, cfg.tasks, spec, seed=cfg.seed)
    mixed = build_stream(cfg.data, cfg.tasks, spec, info, seed=cfg.seed, sampler=sampler,
                         start_micro_step=resume_micro_step(stream_state, start_step * accum))
    stream = resume_stream(mixed, stream_state)
    writer = MetricsWriter(run_dir / "metrics.jsonl", enabled=info.is_main)
    tracker = Tracker(run_dir=run_dir, mode=wandb_mode(cfg.logging.wandb), project=cfg.logging.project,
                      config=json.loads(json.dumps(cfg, default=vars)), enabled=info.is_main)
    stop = stop_flag()  # installed by the CLI before the heavy imports (a signal during start-up is kept)
    window, timer, guard = LossWindow(), TaskTimer(tasks), NonFiniteGuard(cfg.train.max_bad_steps)
    counts = {name: torch.zeros_like(m.usage_TE) for name, m in moe_modules(model)}
    # with partitions: random draws keyed per sample of the global batch, loss means over it (global_batch.py)
    global_batch = GlobalBatch(seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                               task_ids={t: i for i, t in enumerate(task_order(cfg.tasks))},
                               enabled=cfg.data.partitions > 0)
    exit_code = 0
    bar = progress(total=cfg.train.max_steps, initial=start_step, desc="train", enabled=info.is_main)
    step = start_step
    if cfg.eval.at_start and start_step == 0:
        from pretrain.training.evaluate import evaluate_model

        with untouched_rng(engine.device):
            with untouched_rng(engine.device):
                metrics = evaluate_model(cfg, engine.module, spec, info)
        writer.write(0, metrics)
        tracker.log(0, metrics)
    while step < cfg.train.max_steps:
        # 1. forward every micro-batch of this optimizer step (one task each, the same task on every rank)
        step_ok, stopping, parts_sum = True, False, {}
        for _micro in range(accum):
            t0 = clock(engine.device)
            _, task, drawn = next(stream)
            batches = drawn if task == "all" else [drawn]
            task_losses = {b["task"]: global_batch.forward(forward_task, engine, b, step=step, micro=_micro)
                           for b in batches}
            timer.add(task_losses, clock(engine.device) - t0, {b["task"]: len(b["images"]) for b in batches})
            # every forward of this micro-batch enters one MI loss; earlier micro-batches of the step stay in its
            # statistics (detached) until the step's last one
            loss, parts = model.objective(task_losses, collect_aux_losses(model, end_of_step=_micro == accum - 1),
                                          step=step)
            # 2. agree across ranks: any non-finite loss skips the step everywhere; any stop request stops everywhere
            finite, stopping = agree(loss, stop.requested)
            if not finite:
                step_ok = False
                skip_micro_batch(engine, model, accum)
                continue
            # 3. backward + optimizer step (DeepSpeed steps the optimizer at the accumulation boundary)
            t0 = clock(engine.device)
            engine.backward(loss)
            engine.step()
            timer.add(task_losses, clock(engine.device) - t0)
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + float(value) / accum
        for name, step_counts in pop_routing_counts(model).items():  # already global: never all-reduced again
            counts[name] += step_counts.to(counts[name].dtype)
        step += 1
        bar.update(1)
        # 4. non-finite bookkeeping: skip, count, abort after too many in a row (the last good checkpoint stays)
        if guard.update(step_ok, step):
            exit_code = EXIT_ABORT
            break
        if step_ok:
            window.add(parts_sum)
        # 5. log: window means, lr, per-task throughput, routing metrics
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            record = {**window.pop(), "lr": engine.get_lr()[0], "skipped_steps": guard.total, **timer.pop()}
            record.update({f"task_freq/{t}": f for t, f in sampler.frequencies().items()})
            record.update({f"data/skipped/{t}": n for t, n in mixed.skipped.items()})  # bad samples, this rank
            record.update({f"data/epoch/{t}": e for t, e in mixed.epochs().items()})  # partitioned streams only
            record.update(routing_metrics(counts, tasks))
            writer.write(step, record)
            tracker.log(step, record)
            bar.set_postfix(loss=f"{record.get('loss/total', float('nan')):.3f}")
            counts = {name: torch.zeros_like(c) for name, c in counts.items()}
        # 6. checkpoint: periodic, at the end, or on a signal (then exit with the requeue code)
        checkpoint_if_due(engine, mixed, step, ckpt_dir=run_dir / "checkpoints", train=cfg.train, ok=step_ok,
                          stopping=stopping)
        if stopping:
            exit_code = stop_code(step, logger)
            break
        # 7. periodic evaluation
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
            from pretrain.training.evaluate import evaluate_model

            with untouched_rng(engine.device):
                metrics = evaluate_model(cfg, engine.module, spec, info)
            writer.write(step, metrics)
            tracker.log(step, metrics)
    close_loop(stop, writer, tracker, bar)
    plot_run(cfg, model, tasks, info)
    return exit_code


def plot_run(cfg: RunConfig, model, tasks: list[str], info: dist.DistInfo) -> None:
    """Loss curves and expert usage PNGs of a finished (or stopped) run, on rank 0 when `logging.plots`."""
    if not (info.is_main and cfg.logging.plots):
        return
    from pretrain.training.plots import plot_losses, plot_usage

    run_dir = Path(cfg.output_dir)
    plot_losses(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss_curves.png")
    plot_usage({n: u.numpy() for n, u in usage_snapshot(model).items()}, tasks, run_dir / "expert_usage.png")


def print_dry_run(cfg: RunConfig) -> int:
    """`--dry-run`: the resolved config, then one JSON line: the whole model's parameters, what one rank holds at
    `engine.ep_size`, and where the class counts came from (the shards when they are there, else the releases')."""
    from pretrain.config.load import to_yaml
    from pretrain.data.build import RELEASE_CLASSES
    from pretrain.runs.load import model_counts

    try:
        num_classes, source = check_shards(cfg.data, cfg.tasks).num_classes, "shards"
    except FileNotFoundError:
        num_classes, source = dict(RELEASE_CLASSES), "release (no shards at data.root)"
    print(to_yaml(cfg))
    print(json.dumps({**model_counts(cfg, num_classes=num_classes), "ep_size": cfg.engine.ep_size,
                      "num_classes": num_classes, "class_counts_from": source}))
    return 0


def main(cfg: RunConfig, dry_run: bool = False) -> int:
    """Build data, model and engine, resume from `output_dir` if it holds a checkpoint, and train."""
    info = dist.resolve()
    dist.export(info)
    run_dir = Path(cfg.output_dir)
    setup_logging(info.rank, log_file=None if dry_run else run_dir / "logs" / f"rank{info.rank}.log")
    check_resume(cfg, run_dir)  # before anything in the run directory is replaced: refuses an inexact resume
    # a chained SLURM job (`pretrain submit --chain N`) that starts after the run reached max_steps has nothing to do
    if not dry_run and already_complete(run_dir, cfg.train.max_steps):
        return 0
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    if dry_run:
        return print_dry_run(cfg)
    spec = check_shards(cfg.data, cfg.tasks)  # validates every shard set before anything heavy starts
    if cfg.data.partitions:  # a requeued job on a world size that does not divide them stops before building
        check_layout(cfg.data.partitions, info.world_size)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    # every rank builds the full MoE layers from the same seed and keeps its expert slice (any ep_size, same init)
    model = build_run_model(cfg, num_classes=spec.num_classes, rank=info.rank)
    if info.rank == 0:  # what `pretrain export` needs from the shards, so a run exports without them
        save_class_lists(run_dir, spec)
    engine, start_step, stream_state = start_engine(cfg, model, info)
    logger.info("params %s; training steps %d → %d", model.param_counts(), start_step, cfg.train.max_steps)
    return train_loop(cfg, engine, model, spec, info, start_step, stream_state)
