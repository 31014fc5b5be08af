"""`pretrain finetune`: dense multi-task fine-tuning on the same engine as pretraining.

`main` builds (shards → backbone from `finetune.init_from` at the first start, from the run's own `backbone.json` on
resume (`finetune.record`) → decoder → engine → resume); `finetune_loop` reads top to bottom like the pretraining
loop, on the pieces of `training/lifecycle.py`: per step forward every task, agree across ranks, backward/step, log,
checkpoint, evaluate.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from pretrain import dist
from pretrain.config.finetuning import FinetuneConfig, enabled_dense_tasks
from pretrain.config.load import to_yaml
from pretrain.data.dense import DENSE_DATASETS
from pretrain.finetune.build import (
    DenseData,
    build_dense_model,
    check_dense_shards,
    data_depth_bias,
    make_eval_loader,
    make_stream,
)
from pretrain.finetune.evaluate import evaluate_dense, plot_grid
from pretrain.finetune.init import resume_view
from pretrain.finetune.record import (
    BackboneRecord,
    check_source_unchanged,
    write_record,
)
from pretrain.log import MetricsWriter, progress, read_metrics, setup_logging
from pretrain.models.moe_losses import collect_aux_losses
from pretrain.runs.drift import check_resume
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
from pretrain.training.signals import EXIT_ABORT, stop_flag
from pretrain.training.tracking import Tracker, wandb_mode

logger = logging.getLogger(__name__)


def evaluate(cfg: FinetuneConfig, model, data: DenseData, info: dist.DistInfo, *, grid: Path | None = None) -> dict:
    """Metrics on the val shards (and the prediction grid PNG of the first batch, on rank 0)."""
    tasks, first = enabled_dense_tasks(cfg), {}

    def keep_first(batch: dict, preds: dict) -> None:
        if not first:
            first.update(batch=batch, preds={t: p.cpu() for t, p in preds.items()})

    with untouched_rng(next(model.parameters()).device):
        loader = make_eval_loader(cfg, data, info)
        metrics = evaluate_dense(cfg, model, loader, tasks, data.num_classes, info, max_images=cfg.eval.max_samples,
                                 on_batch=keep_first)
    if grid is not None and info.is_main and first and cfg.finetune.grid_images:
        plot_grid(first["batch"], first["preds"], tasks, grid, cfg.finetune.grid_images)
    return metrics


def finetune_loop(cfg: FinetuneConfig, engine, model, data: DenseData, info: dist.DistInfo, start_step: int,
                  stream_state: dict | None) -> int:
    run_dir, accum = Path(cfg.output_dir), cfg.engine.grad_accum
    mixed = make_stream(cfg, data, info, start_micro_step=resume_micro_step(stream_state, start_step * accum))
    stream = resume_stream(mixed, stream_state)
    writer = MetricsWriter(run_dir / "metrics.jsonl", enabled=info.is_main)
    tracker = Tracker(run_dir=run_dir, mode=wandb_mode(cfg.logging.wandb), project=cfg.logging.project,
                      config=json.loads(json.dumps(cfg, default=vars)), enabled=info.is_main)
    stop = stop_flag()  # installed by the CLI before the heavy imports (a signal during start-up is kept)
    window, timer, guard = LossWindow(), TaskTimer(["all"]), NonFiniteGuard(cfg.train.max_bad_steps)
    exit_code, step = 0, start_step
    bar = progress(total=cfg.train.max_steps, initial=start_step, desc="finetune", enabled=info.is_main)
    if cfg.eval.at_start and start_step == 0:
        writer.write(0, metrics := evaluate(cfg, engine.module, data, info))
        tracker.log(0, metrics)
    while step < cfg.train.max_steps:
        # 1. forward: every task's prediction from one batch (per_task routing runs the backbone once per task)
        step_ok, stopping, parts_sum = True, False, {}
        for _micro in range(accum):
            t0 = clock(engine.device)
            _, _, batch = next(stream)
            task_losses, decoder_aux = engine(to_device(batch["images"], engine.device),
                                              to_device(batch["targets"], engine.device))
            backbone_aux = collect_aux_losses(model, end_of_step=_micro == accum - 1)
            loss, parts = model.objective(task_losses, {**backbone_aux, **decoder_aux})
            timer.add(["all"], clock(engine.device) - t0, {"all": len(batch["images"])})
            # 2. agree across ranks on finiteness and stop requests
            finite, stopping = agree(loss, stop.requested)
            if not finite:
                step_ok = False
                skip_micro_batch(engine, model, accum)
                continue
            # 3. backward + optimizer step at the accumulation boundary
            t0 = clock(engine.device)
            engine.backward(loss)
            engine.step()
            timer.add(["all"], clock(engine.device) - t0)
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + float(value) / accum
        step += 1
        bar.update(1)
        # 4. non-finite bookkeeping
        if guard.update(step_ok, step):
            exit_code = EXIT_ABORT
            break
        if step_ok:
            window.add(parts_sum)
        # 5. log
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            record = {**window.pop(), "lr": engine.get_lr()[0], "skipped_steps": guard.total, **timer.pop()}
            record.update({f"data/skipped/{t}": n for t, n in mixed.skipped.items()})
            writer.write(step, record)
            tracker.log(step, record)
            bar.set_postfix(loss=f"{record.get('loss/total', float('nan')):.3f}")
        # 6. checkpoint: periodic, at the end, or on a signal (then exit with the requeue code)
        checkpoint_if_due(engine, mixed, step, ckpt_dir=run_dir / "checkpoints", train=cfg.train, ok=step_ok,
                          stopping=stopping)
        if stopping:
            exit_code = stop_code(step, logger)
            break
        # 7. evaluation: periodic and at the end
        if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.max_steps:
            metrics = evaluate(cfg, engine.module, data, info,
                               grid=run_dir / "predictions.png" if step == cfg.train.max_steps else None)
            writer.write(step, metrics)
            tracker.log(step, metrics)
    close_loop(stop, writer, tracker, bar)
    if info.is_main and cfg.logging.plots:
        from pretrain.training.plots import plot_losses

        plot_losses(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss_curves.png")
    return exit_code


def print_dry_run(cfg: FinetuneConfig, record: BackboneRecord | None = None) -> int:
    """`--dry-run`: the resolved config, then one JSON line with the parameter counts (one process holds every
    parameter: fine-tuning runs without expert parallelism) and where the class counts came from (the shards when
    they are there, else the dataset's release)."""
    try:
        data, source = check_dense_shards(cfg), "shards"
    except FileNotFoundError:
        release = DENSE_DATASETS[cfg.data.dataset]
        data, source = DenseData(cfg.data.dataset, Path(), Path(), 0, dict(release.num_classes)), "release"
    # from random init or a record nothing needs real memory: counts on the meta device (a ViT-L decoder takes
    # seconds, not GBs)
    with torch.device("meta") if not cfg.finetune.init_from or record else contextlib.nullcontext():
        model, _ = build_dense_model(cfg, data, record=record)
    print(to_yaml(cfg))
    print(json.dumps({"params": model.param_counts(), "num_classes": data.num_classes, "class_counts_from": source}))
    return 0


def main(cfg: FinetuneConfig, dry_run: bool = False) -> int:
    """Build data, model and engine, resume from `output_dir` if it holds a checkpoint, and fine-tune."""
    info = dist.resolve()
    dist.export(info)
    run_dir = Path(cfg.output_dir)
    setup_logging(info.rank, log_file=None if dry_run else run_dir / "logs" / f"rank{info.rank}.log")
    # a resume rebuilds the backbone from the run's own record (`finetune.record`), whose sections go into `cfg` as
    # the first start's did, before the drift check compares it with config.yaml: `init_from` is read at the first
    # start only. A run started before records existed resumes from `init_from` as it always did.
    record, derived = resume_view(cfg, run_dir)
    if record is not None:
        check_source_unchanged(record)
    check_resume(cfg, run_dir, ignore=derived)
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    if dry_run:
        return print_dry_run(cfg, record)
    data = check_dense_shards(cfg)  # every shard set and task checked before anything heavy starts
    depth_bias = data_depth_bias(cfg, data)  # before seeding: its DataLoader draws a seed from torch's generator
    torch.manual_seed(cfg.seed)
    model, built = build_dense_model(cfg, data, depth_bias=depth_bias, record=record)  # (a resume loads its own)
    if already_complete(run_dir, cfg.train.max_steps):
        return 0
    if info.is_main and record is None:  # the first start (or a run from before records): what resume needs
        write_record(run_dir, built)
    engine, start_step, stream_state = start_engine(cfg, model, info, keep_config=True)
    logger.info("params %s; fine-tuning steps %d → %d", model.param_counts(), start_step, cfg.train.max_steps)
    return finetune_loop(cfg, engine, model, data, info, start_step, stream_state)
