"""A pretraining run's model, from its config or from its run directory: the one place both are built.

`build_run_model(cfg, ...)` is what `pretrain train` builds (objective included, this rank's expert slice);
`load_run(run_dir, step=...)` turns a run directory (its `config.yaml` and a checkpoint) into a ready model in one
process, without DeepSpeed for the native MoE backend: evaluation, export, extraction and fine-tuning start here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pretrain.runs.checkpoint import TAG_RE, load_model_weights, tag_for
from pretrain.config.pretraining import TASKS, RunConfig, enabled_tasks
from pretrain.config.load import load_config
from pretrain.runs.integrity import select_tag, tag_step
from pretrain.parallel.layers import moe_mlp_factory
from pretrain.models import MultiTaskModel, build_model
from pretrain.training.objective import build_objective

logger = logging.getLogger(__name__)


def build_run_model(cfg: RunConfig, *, num_classes: dict[str, int] | None, rank: int,
                    single_process: bool = False) -> MultiTaskModel:
    """The run's multi-task model with its objective: every rank builds the full MoE layers from the same RNG state
    and keeps its expert slice. `single_process`: hold every expert here (ep_size=1), whatever the run's EP size —
    checkpoints store experts under global ids, so any EP size loads into it."""
    engine = replace(cfg.engine, ep_size=1) if single_process else cfg.engine
    return build_model(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks, num_classes=num_classes,
                       moe_mlp_layer=moe_mlp_factory(cfg.moe, engine, rank=0 if single_process else rank),
                       objective=build_objective(cfg.tasks, cfg.optim, cfg.moe))


def model_counts(cfg: RunConfig, *, num_classes: dict[str, int]) -> dict[str, dict[str, int]]:
    """Parameter counts of the whole model (`params`: every expert) and of what one rank holds (`params_per_rank`:
    its expert slice at `engine.ep_size`), built on the meta device: no memory, no weights, no upcycling source read.
    """
    meta_cfg = replace(cfg, model=replace(cfg.model, upcycle_from=""))
    with torch.device("meta"):
        whole = build_run_model(meta_cfg, num_classes=num_classes, rank=0, single_process=True).param_counts()
        rank = build_run_model(meta_cfg, num_classes=num_classes, rank=0).param_counts()
    return {"params": whole, "params_per_rank": rank}


@dataclass
class LoadedRun:
    """A run directory's config and its model at `step` (eval mode, CPU, every expert in this process)."""

    cfg: RunConfig
    model: MultiTaskModel
    step: int
    tag_dir: Path


def unused_prefixes(cfg: RunConfig) -> tuple[str, ...]:
    """Checkpoint key prefixes a one-process model of `cfg` does not load: the heads of tasks switched off (a run
    trained on three tasks evaluated on two) and the objective (its σ has one entry per enabled task; evaluation and
    export never use it)."""
    return ("objective.", *(f"heads.{t}." for t in TASKS if t not in enabled_tasks(cfg.tasks)))


def find_tag(ckpt_dir: Path, step: int | None) -> Path:
    """The tag directory of `step` (None = the committed `latest`, or the newest older checkpoint that verifies
    when that one is damaged: `integrity.select_tag`); raises FileNotFoundError naming what is missing."""
    if step is None:
        tag = select_tag(ckpt_dir)
        if tag is None:
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint (no 'latest' file)")
        return ckpt_dir / tag
    tag_dir = ckpt_dir / tag_for(step)
    if not tag_dir.is_dir():
        have = sorted(int(m.group(1)) for p in ckpt_dir.glob("step_*") if (m := TAG_RE.match(p.name)))
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint for step {step} (have steps {have or 'none'})")
    return tag_dir


def load_run(run_dir: str | Path, *, step: int | None = None, overrides: list[str] | tuple[str, ...] = (),
             num_classes: dict[str, int] | None = None) -> LoadedRun:
    """Load a run directory's model at `step` (default: its latest checkpoint) in this process.

    Args:
        overrides: `key=value` applied to the run's `config.yaml` (e.g. `tasks.det.enabled=false`).
        num_classes: class counts for tasks whose config count is 0 (default: from the run's shards).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no config.yaml in it")
    cfg = load_config(run_dir / "config.yaml", [f"output_dir={run_dir}", *overrides])
    tag_dir = find_tag(run_dir / "checkpoints", step)
    if num_classes is None:
        from pretrain.data.build import check_shards

        num_classes = check_shards(cfg.data, cfg.tasks).num_classes
    model = build_run_model(cfg, num_classes=num_classes, rank=0, single_process=True)
    load_model_weights(tag_dir, model, skip=unused_prefixes(cfg), verify=step is not None)
    return LoadedRun(cfg=cfg, model=model.eval(), step=tag_step(tag_dir), tag_dir=tag_dir)
