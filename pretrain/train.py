"""`pretrain train`: heterogeneous multi-task pretraining of the task-routed MoE ViT with DeepSpeed.

`main` builds (data → model → engine → resume); `train_loop` reads top to bottom: per step choose the task(s),
forward, loss, agree across ranks on finiteness and stop requests, backward/step, log, checkpoint, evaluate.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from pretrain import checkpoint, dist
from pretrain.config import RunConfig, enabled_tasks, save_resolved
from pretrain.data.build import DataSpec, build_data, build_sampler, build_stream
from pretrain.log import MetricsWriter, progress, read_metrics, setup_logging
from pretrain.models import build_model
from pretrain.models.moe_losses import collect_aux_losses, moe_modules
from pretrain.routing_stats import routing_metrics
from pretrain.signals import EXIT_ABORT, EXIT_REQUEUE, StopFlag
from pretrain.tasks import build_task_loss
from pretrain.tracking import Tracker, wandb_mode

logger = logging.getLogger(__name__)


def to_device(obj, device: torch.device):
    """Move the tensors of a batch (nested dicts/lists) to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    return obj


def forward_task(engine, batch: dict) -> dict[str, torch.Tensor]:
    """One task batch through the engine; returns that task's named loss terms."""
    targets = {"cls": "labels", "det": "targets", "seg": "masks"}[batch["task"]]
    return engine(batch["task"], to_device(batch["images"], engine.device), to_device(batch[targets], engine.device))


def clock(device: torch.device) -> float:
    """Wall time after the device's queued work finished (CUDA runs asynchronously; timing needs a sync)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def usage_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.usage_TE.detach().cpu().clone() for name, m in moe_modules(model)}


def train_loop(cfg: RunConfig, engine, model, spec: DataSpec, info: dist.DistInfo, start_step: int,
               client_state: dict | None) -> int:
    run_dir, tasks = Path(cfg.output_dir), enabled_tasks(cfg)
    sampler = build_sampler(cfg, spec)
    if client_state:
        sampler.load_state_dict({"counts": client_state["task_counts"]})
    mixed = build_stream(cfg, spec, info, start_step=start_step, sampler=sampler)
    stream = iter(mixed)
    writer = MetricsWriter(run_dir / "metrics.jsonl", enabled=info.is_main)
    tracker = Tracker(run_dir=run_dir, mode=wandb_mode(cfg.logging.wandb), project=cfg.logging.project,
                      config=json.loads(json.dumps(cfg, default=vars)), enabled=info.is_main)
    stop = StopFlag().install()
    window: dict[str, tuple[float, int]] = {}  # (sum, count) per logged key over the logging window
    counts = {name: torch.zeros_like(m.usage_TE) for name, m in moe_modules(model)}
    images_seen = {t: 0 for t in tasks}
    task_time = {t: 0.0 for t in tasks}
    bad_in_row, bad_total, exit_code = 0, 0, 0
    bar = progress(total=cfg.train.max_steps, initial=start_step, desc="train", enabled=info.is_main)
    step = start_step
    while step < cfg.train.max_steps:
        # 1. forward every micro-batch of this optimizer step (one task each, the same task on every rank)
        step_ok, parts_sum = True, {}
        for _micro in range(cfg.engine.grad_accum):
            task_losses = {}
            t0 = clock(engine.device)
            _, task, drawn = next(stream)
            for batch in drawn if task == "all" else [drawn]:
                task_losses[batch["task"]] = forward_task(engine, batch)
                images_seen[batch["task"]] += len(batch["images"])
            for task in task_losses:
                task_time[task] += (clock(engine.device) - t0) / len(task_losses)
            loss, parts = model.task_loss(task_losses, collect_aux_losses(model))
            # 2. agree across ranks: any non-finite loss skips the step everywhere; any stop request stops everywhere
            flags = dist.all_reduce_max(torch.tensor([float(not torch.isfinite(loss)), float(stop.requested)]))
            if flags[0] > 0:
                step_ok = False
                if cfg.engine.grad_accum > 1:  # keep DeepSpeed's micro-step count: a zero-gradient micro-batch
                    engine.backward(sum(p.view(-1)[0] * 0 for p in model.parameters() if p.requires_grad))
                    engine.step()
                continue
            # 3. backward + optimizer step (DeepSpeed steps the optimizer at the accumulation boundary)
            t0 = clock(engine.device)
            engine.backward(loss)
            engine.step()
            for task in task_losses:
                task_time[task] += (clock(engine.device) - t0) / len(task_losses)
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + float(value) / cfg.engine.grad_accum
        for name, m in moe_modules(model):
            counts[name] += m.last_counts_TE.to(counts[name].dtype) if m.last_counts_TE is not None else 0
        step += 1
        bar.update(1)
        # 4. non-finite bookkeeping: skip, count, abort after too many in a row (the last good checkpoint stays)
        if not step_ok:
            bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
            logger.warning("step %d: non-finite loss, skipped (%d in a row, %d total)", step, bad_in_row, bad_total)
            if bad_in_row >= cfg.train.max_bad_steps:
                logger.error("aborting: %d consecutive non-finite steps; last good checkpoint kept", bad_in_row)
                exit_code = EXIT_ABORT
                break
        else:
            bad_in_row = 0
            for key, value in parts_sum.items():  # per-key sums and counts: a task's loss averages its own steps
                total, count = window.get(key, (0.0, 0))
                window[key] = (total + value, count + 1)
        # 5. log: window means, lr, per-task throughput, routing metrics
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            record = {k: total / count for k, (total, count) in window.items()}
            record["lr"] = engine.get_lr()[0]
            record["skipped_steps"] = bad_total
            record.update({f"img_per_s/{t}": images_seen[t] / task_time[t] for t in tasks if task_time[t] > 0})
            record.update({f"task_freq/{t}": f for t, f in sampler.frequencies().items()})
            record.update({f"data/skipped/{t}": n for t, n in mixed.skipped.items()})  # bad samples, this rank
            reduced = {name: dist.all_reduce_sum(c) for name, c in counts.items()}
            record.update(routing_metrics(reduced, tasks))
            writer.write(step, record)
            tracker.log(step, record)
            bar.set_postfix(loss=f"{record.get('loss/total', float('nan')):.3f}")
            window = {}
            counts = {name: torch.zeros_like(c) for name, c in counts.items()}
            images_seen, task_time = {t: 0 for t in tasks}, {t: 0.0 for t in tasks}
        # 6. checkpoint: periodic, at the end, or on a signal (then exit with the requeue code)
        stopping = bool(flags[1] > 0)
        periodic = step % cfg.train.ckpt_every == 0 and step_ok  # never checkpoint inside a non-finite streak
        if periodic or step == cfg.train.max_steps or stopping:
            save(cfg, engine, model, sampler, step, info)
            # the data stream restarts from (seed, step) at every checkpoint, so a resumed run sees the same batches
            skipped = mixed.skipped
            mixed = build_stream(cfg, spec, info, start_step=step, sampler=sampler)
            mixed.skipped = skipped
            stream = iter(mixed)
        if stopping:
            logger.warning("stopped by signal after step %d; exit %d so the job is requeued", step, EXIT_REQUEUE)
            exit_code = EXIT_REQUEUE
            break
        # 7. periodic evaluation
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
            from pretrain.evaluate import evaluate_model

            metrics = evaluate_model(cfg, engine.module, spec, info)
            writer.write(step, metrics)
            tracker.log(step, metrics)
    bar.close()
    stop.uninstall()
    finish_run(cfg, model, tasks, info, writer, tracker)
    return exit_code


def save(cfg: RunConfig, engine, model, sampler, step: int, info: dist.DistInfo) -> None:
    checkpoint.save(engine, Path(cfg.output_dir) / "checkpoints", step,
                    client_state={"step": step, "task_counts": dict(sampler.counts)},
                    rank_state=checkpoint.capture_rng(), keep_last=cfg.train.keep_last)


def finish_run(cfg: RunConfig, model, tasks: list[str], info: dist.DistInfo, writer: MetricsWriter,
               tracker: Tracker) -> None:
    writer.close()
    tracker.finish()
    if not (info.is_main and cfg.logging.plots):
        return
    from pretrain.plots import plot_losses, plot_usage

    run_dir = Path(cfg.output_dir)
    plot_losses(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss_curves.png")
    plot_usage({n: u.numpy() for n, u in usage_snapshot(model).items()}, tasks, run_dir / "expert_usage.png")


def main(cfg: RunConfig, dry_run: bool = False) -> int:
    """Build data, model and engine, resume from `output_dir` if it holds a checkpoint, and train."""
    info = dist.resolve()
    dist.export(info)
    run_dir = Path(cfg.output_dir)
    setup_logging(info.rank, log_file=None if dry_run else run_dir / "logs" / f"rank{info.rank}.log")
    # a chained SLURM job (`pretrain submit --chain N`) that starts after the run reached max_steps has nothing to do
    latest = None if dry_run else checkpoint.read_latest(run_dir / "checkpoints")
    done = checkpoint.TAG_RE.match(latest or "")
    if done and int(done.group(1)) >= cfg.train.max_steps:
        logger.info("run already complete: %s is at step %d >= train.max_steps=%d", run_dir / "checkpoints" / latest,
                    int(done.group(1)), cfg.train.max_steps)
        return 0
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    spec = build_data(cfg)  # validates every shard set before anything heavy starts
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    from pretrain.engine import build_engine, init_distributed, moe_mlp_factory

    # every rank builds the full MoE layers from the same seed and keeps its expert slice (any ep_size, same init)
    model = build_model(cfg, num_classes=spec.num_classes, moe_mlp_layer=moe_mlp_factory(cfg, rank=info.rank))
    model.task_loss = build_task_loss(cfg)
    if dry_run:
        from pretrain.config import to_yaml

        print(to_yaml(cfg))
        print(json.dumps({"params": model.param_counts()}))
        return 0
    if info.is_main:
        from pretrain.engine import make_ds_config

        save_resolved(cfg, run_dir)
        (run_dir / "ds_config.json").write_text(json.dumps(make_ds_config(cfg, info.world_size), indent=2))
    init_distributed(cfg.engine.backend)
    engine = build_engine(cfg, model, world_size=info.world_size)
    resumed = checkpoint.load_latest(engine, run_dir / "checkpoints")
    start_step, client_state = 0, None
    if resumed is not None:
        start_step, client_state, rank_state = resumed
        checkpoint.restore_rng(rank_state)
        logger.info("resumed from step %d in %s", start_step, run_dir / "checkpoints")
    else:
        torch.manual_seed(cfg.seed * 1000 + info.rank + 1)  # per-rank randomness (drop path, noisy gates)
    logger.info("params %s; training steps %d → %d", model.param_counts(), start_step, cfg.train.max_steps)
    return train_loop(cfg, engine, model, spec, info, start_step, client_state)
