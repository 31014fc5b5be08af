"""`pretrain evaluate RUN_DIR` of an add-task run: the tasks it added, read from the model file it wrote
(`output_dir/<add_task.out>`, what `load_model` serves), each on its own val shards with its kind's evaluator
(`pretrain.training.evaluate.EVALUATORS`).

The old tasks are not evaluated here: everything they read is bit-identical to the trained model's
(tests/test_add_task.py), so their metrics are that model's (`pretrain evaluate` of its pretraining run). The run's
checkpoints hold the grown model in its split training layout; the file is the one result the run commits to, so a
run that has not finished is refused rather than evaluated from an intermediate checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from pretrain import dist
from pretrain.add_task.dense import evaluate_semseg, source_of
from pretrain.config.add_task import AddTaskConfig
from pretrain.config.pretraining import DataConfig, TaskConfig
from pretrain.data.build import check_shards, resolve_shards
from pretrain.data.sources import read_shard_info
from pretrain.errors import UsageError
from pretrain.log import MetricsWriter, setup_logging
from pretrain.runs.portable import load_model
from pretrain.training.evaluate import evaluate_model


def main(cfg: AddTaskConfig) -> int:
    """Evaluate the added tasks of the run in `cfg.output_dir`; writes `eval.jsonl` there and prints the metrics
    (`eval/<task>/<metric>`, at the run's last step)."""
    info = dist.resolve()
    dist.export(info)
    setup_logging(info.rank)
    run_dir = Path(cfg.output_dir)
    path = run_dir / cfg.add_task.out
    if not path.is_file():
        raise UsageError(f"{path} does not exist: the add-task run has not finished (run the same `pretrain add-task` "
                         "command to the end, then evaluate it)")
    grown = load_model(path)
    dense = {name: dataset for name, task in cfg.tasks.items() if (dataset := source_of(cfg.data, task))}
    shards = replace(cfg, tasks={name: task for name, task in cfg.tasks.items() if name not in dense})
    spec = check_shards(cfg.data, shards.tasks)  # the added tasks' shards; raises naming a missing folder
    for name in dense:
        need_val(cfg.data, name, cfg.tasks[name])
    if info.world_size > 1:  # metrics are reduced across ranks: that needs a process group
        dist.init_process_group(cfg.engine.backend, cfg.engine.timeout_s)
    metrics = evaluate_model(shards, grown.model, spec, info) if shards.tasks else {}
    for name, dataset in dense.items():  # a dense dataset's semseg: its own protocol and meter (`add_task.dense`)
        scores = evaluate_semseg(grown.model, name, dataset, resolve_shards(cfg.data.root, cfg.tasks[name].val_shards),
                                 cfg.tasks[name], grown.meta["num_classes"][name], info,
                                 num_workers=cfg.eval.num_workers, max_samples=cfg.eval.max_samples)
        metrics.update({f"eval/{name}/{key}": value for key, value in scores.items()})
    step = int(grown.meta.get("added", [{}])[-1].get("steps", 0))
    if info.is_main:
        MetricsWriter(run_dir / "eval.jsonl").write(step, metrics)
        print(json.dumps({"step": step, **{k: round(v, 3) for k, v in metrics.items()}}))
    return 0


def need_val(data: DataConfig, name: str, task: TaskConfig) -> None:
    """Raise naming the task when a dense task has no val shards to evaluate on."""
    if not task.val_shards:
        raise UsageError(f"tasks.{name}.val_shards: not set, nothing to evaluate {name} on")
    read_shard_info(resolve_shards(data.root, task.val_shards))  # raises naming a missing folder
