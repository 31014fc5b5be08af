"""`pretrain add-task MODEL CONFIG`: the added tasks' loop on the training engine, and the grown model file.

MODEL (a pretraining run directory or a `pretrain export` file) is read at every start; the run directory
(`output_dir`) holds this command's config, DeepSpeed checkpoints of the grown model (its split layout,
`models.grow`) and `metrics.jsonl`. A signal checkpoints and exits 75, and the same command resumes exactly. At
the last step rank 0 writes `output_dir/<add_task.out>`: one ordinary model file holding the old and the added
tasks, which `load_model` serves and a later `add-task` grows again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pretrain import dist
from pretrain.add_task.dense import AddedData, build_added_stream, check_added_shards
from pretrain.config.add_task import AddTaskConfig, data_tasks
from pretrain.config.pretraining import task_kind, task_order
from pretrain.data.build import build_sampler, build_stream
from pretrain.data.collate import TARGET_KEYS
from pretrain.errors import UsageError
from pretrain.log import MetricsWriter, progress, setup_logging
from pretrain.models.grow import GrowingModel, grow, merged_state
from pretrain.models.grow_layers import META_KEY, grown_moe, limits_meta
from pretrain.models.moe_losses import collect_aux_losses
from pretrain.runs.drift import check_resume
from pretrain.runs.portable import PortableModel, config_metadata, config_sections, load_model, read_meta, write_file
from pretrain.training.lifecycle import (
    LossWindow,
    NonFiniteGuard,
    agree,
    checkpoint_if_due,
    close_loop,
    resume_micro_step,
    resume_stream,
    start_engine,
    stop_code,
    to_device,
)
from pretrain.training.objective import build_objective
from pretrain.training.signals import EXIT_ABORT, stop_flag

logger = logging.getLogger(__name__)


def load_source(source: str | Path, new_tasks: list[str]) -> PortableModel:
    """The trained model MODEL names: a pretraining run directory (its latest checkpoint) or a model file.
    Anything else (a submodel, a fine-tuning run, a foreign file) and a model that already has one of `new_tasks`
    are a UsageError naming it (exit 2), found from the metadata before the model is built."""
    from pretrain.extraction.export import consolidate

    source = Path(source)
    try:
        if source.is_dir():  # a pretraining run has only the pretraining tasks, which the config check refuses
            return consolidate(source)
        meta = read_meta(source)
        if meta.get("kind") != "model":
            raise ValueError(f"{source} is a {meta.get('kind')} file: tasks are added to a whole pretraining model "
                             "(a run directory or a `pretrain export` file)")
        clash = [name for name in task_order(config_sections(source, meta)[2]) if name in new_tasks]
        if clash:
            raise UsageError(f"tasks.{clash[0]}: {source} already has a task {clash[0]!r}: choose another name")
        return load_model(source)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"MODEL {str(exc).strip(chr(39))}") from None


def start_from(cfg: AddTaskConfig, trained: PortableModel) -> dict[str, str]:
    """Added task → the trained task of its kind it starts from (`add_task.start=kind`), where the model has one."""
    if cfg.add_task.start != "kind":
        return {}
    model_kinds = {trained.model.kinds[t]: t for t in trained.model.task_ids}
    pairs = {name: model_kinds.get(task_kind(name, t)) for name, t in cfg.tasks.items()}
    return {name: old for name, old in pairs.items() if old is not None}


def main(cfg: AddTaskConfig) -> int:
    """Build the grown model and its data, resume `output_dir` if it holds a checkpoint, train, write the file."""
    info = dist.resolve()
    dist.export(info)
    run_dir = Path(cfg.output_dir)
    setup_logging(info.rank, log_file=run_dir / "logs" / f"rank{info.rank}.log")
    if not cfg.add_task.model:
        raise UsageError("add_task.model: name the trained model (pretrain add-task MODEL CONFIG)")
    check_resume(cfg, run_dir)  # before anything in the run directory is replaced: refuses an inexact resume
    trained = load_source(cfg.add_task.model, list(cfg.tasks))
    model_cfg, moe_cfg, old_tasks = config_sections("metadata", trained.meta)
    moe_cfg = replace(moe_cfg, backend="native")
    by_kind, name_of = data_tasks(cfg.tasks)
    added = check_added_shards(cfg.data, by_kind, name_of)  # every shard set checked before anything heavy starts
    spec = added.spec
    num_classes = {**trained.meta["num_classes"], **{name_of[k]: n for k, n in spec.num_classes.items()}}
    torch.manual_seed(cfg.seed)  # the added rows' and heads' init
    objective = build_objective(cfg.tasks, cfg.optim, moe_cfg, order=tuple(cfg.tasks))
    net = grow(trained.model, model=model_cfg, moe=moe_cfg, tasks=old_tasks, new_tasks=cfg.tasks,
               num_classes=num_classes, start_from=start_from(cfg, trained), objective=objective,
               new_experts=cfg.add_task.new_experts, limits=trained.meta.get(META_KEY), baseline=cfg.add_task.baseline)
    engine, start, stream_state = start_engine(cfg, GrowingModel(net), info)
    code = train_loop(cfg, engine, net, added, name_of, info, start, stream_state)
    if code == 0 and info.is_main:
        table = {**old_tasks, **{n: replace(t, enabled=True) for n, t in cfg.tasks.items()}}
        classes = {**trained.meta.get("classes", {}), **{name_of[k]: c for k, c in spec.classes.items()}}
        path = save_grown(run_dir / cfg.add_task.out, net, trained, table=table, num_classes=num_classes,
                          classes=classes, added={"tasks": list(cfg.tasks), "steps": cfg.train.max_steps,
                                                  "model": str(cfg.add_task.model),
                                                  "new_experts": cfg.add_task.new_experts,
                                                  **({"baseline": cfg.add_task.baseline}
                                                     if cfg.add_task.baseline != "none" else {})})
        logger.info("wrote %s (tasks %s)", path, list(net.task_ids))
    return code


def train_loop(cfg: AddTaskConfig, engine, net, added: AddedData, name_of: dict[str, str], info: dist.DistInfo,
               start: int, stream_state: dict | None) -> int:
    """Steps `start + 1 .. train.max_steps` of the added tasks (one task batch per step); 0, 75 or EXIT_ABORT."""
    by_kind, _ = data_tasks(cfg.tasks)
    first = resume_micro_step(stream_state, start)
    if added.dense:  # some task reads a dense dataset's shards (`add_task.dense`)
        mixed = build_added_stream(cfg.data, by_kind, added, info, seed=cfg.seed, start_micro_step=first)
    else:
        mixed = build_stream(cfg.data, by_kind, added.spec, info, seed=cfg.seed, start_micro_step=first,
                             sampler=build_sampler(cfg.data, by_kind, added.spec, seed=cfg.seed))
    stream, stop = resume_stream(mixed, stream_state), stop_flag()
    writer = MetricsWriter(Path(cfg.output_dir) / "metrics.jsonl", enabled=info.is_main)
    window, guard, code = LossWindow(), NonFiniteGuard(cfg.train.max_bad_steps), 0
    steps = cfg.train.max_steps
    for step in progress(range(start + 1, steps + 1), total=steps, initial=start, desc="add-task",
                         enabled=info.is_main):
        # 1. forward one added task's batch; its losses + the routing losses (old statistics rows read, not written)
        _, kind, batch = next(stream)
        task = name_of[kind]
        losses = engine(task, to_device(batch["images"], engine.device),
                        to_device(batch[TARGET_KEYS[kind]], engine.device))
        loss, parts = net.objective({task: losses}, collect_aux_losses(net), step=step - 1)
        # 2. agree across ranks; 3. backward + step (only the added rows and heads are in the optimizer)
        finite, stopping = agree(loss, stop.requested)
        if finite:
            engine.backward(loss)
            engine.step()
            window.add(parts)
        if guard.update(finite, step):
            code = EXIT_ABORT
            break
        # 4. log, 5. checkpoint (periodic, last, on a signal)
        if step % cfg.train.log_every == 0 or step == steps:
            writer.write(step, {**window.pop(), "lr": engine.get_lr()[0]})
        checkpoint_if_due(engine, mixed, step, ckpt_dir=Path(cfg.output_dir) / "checkpoints", train=cfg.train,
                          ok=finite, stopping=stopping)
        if stopping:
            code = stop_code(step, logger, requeue=False)
            break
    close_loop(stop, writer)
    return code


def save_grown(path: Path, net, trained: PortableModel, *, table: dict, num_classes: dict[str, int],
               classes: dict[str, Any], added: dict[str, Any]) -> Path:
    """The grown model as one ordinary model file (kind `model`): the trained file's metadata with the grown task
    table, rows, class lists and `moe` section (E + N experts), the tasks that see fewer experts (`task_experts`,
    `models.grow_layers`), and `added` (a list: one entry per addition, oldest first)."""
    model_cfg, moe_cfg, _ = config_sections("metadata", trained.meta)
    new_experts = int(added.get("new_experts", 0))
    meta = {k: v for k, v in trained.meta.items()
            if k not in ("format", "format_version", "kind", "pretrain_version", META_KEY)}
    meta.update(config_metadata(model=model_cfg, moe=grown_moe(model_cfg, moe_cfg, new_experts), tasks=table))
    if limits_meta(net):
        meta[META_KEY] = limits_meta(net)
    meta.update({"task_names": list(net.task_ids), "task_ids": net.task_ids, "num_classes": num_classes,
                 "classes": classes, "dtype": "fp32", "added": [*trained.meta.get("added", []), added]})
    return write_file(path, merged_state(net), {k: v if isinstance(v, str) else json.dumps(v)
                                                for k, v in meta.items()}, kind="model")
