"""`pretrain evaluate RUN_DIR` of an add-task run: the tasks it added, read from the model file it wrote
(`output_dir/<add_task.out>`, what `load_model` serves), each on its own val shards with its kind's evaluator
(`pretrain.evaluate.EVALUATORS`).

The old tasks are not evaluated here: everything they read is bit-identical to the trained model's
(tests/test_add_task.py), so their metrics are that model's (`pretrain evaluate` of its pretraining run). The run's
checkpoints hold the grown model in its split training layout; the file is the one result the run commits to, so a
run that has not finished is refused rather than evaluated from an intermediate checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain import dist
from pretrain.add_task.config import AddTaskConfig
from pretrain.data.build import check_shards
from pretrain.errors import UsageError
from pretrain.evaluate import evaluate_model
from pretrain.log import MetricsWriter, setup_logging
from pretrain.portable import load_model


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
    spec = check_shards(cfg.data, cfg.tasks)  # the added tasks' shards; raises naming a missing folder
    if info.world_size > 1:  # metrics are reduced across ranks: that needs a process group
        dist.init_process_group(cfg.engine.backend, cfg.engine.timeout_s)
    metrics = evaluate_model(cfg, grown.model, spec, info)
    step = int(grown.meta.get("added", [{}])[-1].get("steps", 0))
    if info.is_main:
        MetricsWriter(run_dir / "eval.jsonl").write(step, metrics)
        print(json.dumps({"step": step, **{k: round(v, 3) for k, v in metrics.items()}}))
    return 0
