"""`pretrain extract ... --heal STEPS`: a short distillation of an extracted submodel from the full model.

The submodel (student) learns to reproduce the full model's (teacher's) final backbone tokens on the tasks' own
training images: loss = MSE(student tokens [B, N, D], teacher tokens [B, N, D]) at the task's router rows, the
heads copied from the full model left as they are, so every head keeps reading the features it was trained on
(a task-agnostic target that serves cls, det and seg alike). It runs on the training engine: the heal directory
`NAME.heal/` is a run directory (its `config.yaml`, DeepSpeed checkpoints, `metrics.jsonl`), a signal checkpoints
and exits 75, and the same command resumes it. `heal.json` there records what was extracted, so a resume with
other extraction settings is refused instead of loading mismatched weights. Only the student is checkpointed: the
teacher is the source model, read again at every start.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain import dist
from pretrain.config.load import load_config
from pretrain.config.pretraining import RunConfig
from pretrain.data.build import build_sampler, build_stream, check_shards
from pretrain.errors import AbortedError
from pretrain.log import MetricsWriter, progress
from pretrain.models.moe_losses import collect_aux_losses
from pretrain.runs.drift import check_resume
from pretrain.runs.portable import PortableModel, config_sections
from pretrain.training.lifecycle import agree, checkpoint_if_due, close_loop, resume_stream, start_engine, to_device
from pretrain.training.signals import EXIT_REQUEUE, stop_flag

logger = logging.getLogger(__name__)

HEAL_FILE = "heal.json"


class FeatureStudent(nn.Module):
    """The submodel as the engine's module: `forward(task, images, target_BND)` → distillation loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def no_weight_decay(self) -> set[str]:
        return {f"model.{name}" for name in self.model.no_weight_decay()}

    def forward(self, task: str, images: Tensor, target_BND: Tensor) -> Tensor:
        """images uint8 [B,3,H,W], target_BND the teacher's final tokens [B, N, D] → scalar MSE."""
        task_B = torch.full((images.shape[0],), self.model.task_ids[task], dtype=torch.long, device=images.device)
        out_BND = self.model.backbone.forward_features(self.model.normalize(images), task_B)
        return F.mse_loss(out_BND.float(), target_BND.float())


def teacher_tokens(full: nn.Module, task: str, images: Tensor) -> Tensor:
    """The full model's final backbone tokens [B, N, D] for `task` (eval mode, no gradient)."""
    task_B = torch.full((images.shape[0],), full.task_ids[task], dtype=torch.long, device=images.device)
    with torch.no_grad():
        return full.backbone.forward_features(full.normalize(images), task_B)


def heal_config(full: PortableModel, tasks: list[str], *, out_dir: Path, data_root: str, steps: int,
                lr: float) -> RunConfig:
    """The heal run's config: the full model's sections with only `tasks` enabled, a short constant-lr schedule."""
    if steps < 1:
        raise ValueError(f"--heal {steps}: the number of distillation steps must be >= 1")
    model_cfg, moe_cfg, table = config_sections("metadata", full.meta)
    cfg = load_config(None, [f"output_dir={out_dir}", f"data.root={data_root}", f"train.max_steps={steps}",
                             f"train.ckpt_every={max(1, steps // 4)}", f"train.log_every={max(1, steps // 10)}",
                             "train.eval_every=0", "train.keep_last=2", f"optim.lr={lr}", "optim.warmup_steps=0",
                             "optim.weight_decay=0.0", "logging.wandb=disabled", "logging.plots=false",
                             "engine.precision=fp32"])
    table = {t: replace(c, enabled=t in tasks) for t, c in table.items()}
    return replace(cfg, model=model_cfg, moe=replace(moe_cfg, backend="native"), tasks=table)


def check_heal_dir(out_dir: Path, record: dict[str, Any]) -> None:
    """Write `heal.json` on a fresh start; on a resume refuse a directory started for another extraction."""
    path = out_dir / HEAL_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != record:
            raise ValueError(f"{out_dir} was started for another extraction ({path}: {saved.get('kept')} vs now "
                             f"{record['kept']}): delete it, or use another --out")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def heal(full: PortableModel, sub: PortableModel, tasks: list[str], *, out_dir: Path, data_root: str, steps: int,
         lr: float = 1e-4) -> dict[str, Any]:
    """Distil `sub` from `full` for `steps` steps on the tasks' training shards (resuming `out_dir` if it holds a
    checkpoint); `sub` holds the healed weights afterwards (eval mode). Returns the first and last logged losses."""
    cfg = heal_config(full, tasks, out_dir=out_dir, data_root=data_root, steps=steps, lr=lr)
    check_heal_dir(out_dir, {"tasks": tasks, "kept": sub.meta["kept"], "moe": sub.meta["moe"]})
    check_resume(cfg, out_dir)  # a resume under another lr or data stream would not be the heal it continues
    info = dist.resolve()
    dist.export(info)
    spec = check_shards(cfg.data, cfg.tasks)
    for param in sub.model.heads.parameters():  # the heads keep reading the features they were trained on
        param.requires_grad_(False)
    student, teacher = FeatureStudent(sub.model.train()), full.model.eval()
    engine, start, stream_state = start_engine(cfg, student, info)
    mixed = build_stream(cfg.data, cfg.tasks, spec, info, seed=cfg.seed, start_micro_step=start,
                         sampler=build_sampler(cfg.data, cfg.tasks, spec, seed=cfg.seed))
    stream, stop = resume_stream(mixed, stream_state), stop_flag()
    writer = MetricsWriter(out_dir / "metrics.jsonl", enabled=info.is_main)
    losses, window = [], []
    for step in progress(range(start + 1, steps + 1), total=steps, initial=start, desc="heal", enabled=info.is_main):
        _, task, batch = next(stream)
        images = to_device(batch["images"], engine.device)
        loss = engine(task, images, teacher_tokens(teacher, task, images))
        collect_aux_losses(student)  # the routers' statistics only: healing trains on the distillation loss alone
        finite, stopping = agree(loss, stop.requested)
        if not finite:
            # no skipping here: a heal is a few steps, and one that diverges should be rerun at a lower lr
            raise AbortedError(f"heal step {step}: non-finite distillation loss (--heal-lr {lr:g}); lower --heal-lr "
                               f"(the last good checkpoint in {out_dir / 'checkpoints'} is kept)")
        engine.backward(loss)
        engine.step()
        window.append(loss.item())
        if step % cfg.train.log_every == 0 or step == steps:
            losses.append(sum(window) / len(window))
            writer.write(step, {"loss/distill": losses[-1], "lr": engine.get_lr()[0]})
            window = []
        # every step is finite here (a non-finite one raised above); train.max_steps is `steps`
        checkpoint_if_due(engine, mixed, step, ckpt_dir=out_dir / "checkpoints", train=cfg.train, ok=True,
                          stopping=stopping)
        if stopping:
            stop.uninstall()
            logger.warning("healing stopped by signal after step %d; run the same command to resume", step)
            raise SystemExit(EXIT_REQUEUE)
    close_loop(stop, writer)
    sub.model.eval()
    return {"steps": steps, "resumed_from": start, "lr": lr, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "dir": str(out_dir)}
