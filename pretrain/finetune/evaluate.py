"""Dense evaluation: the meter table (`DENSE_METERS`), crop-back of padded predictions, Δm, the prediction grid.

Every rank evaluates its disjoint part of the val shards; meters pool sums/counts and are reduced across ranks once at
the end. Predictions are compared at the original resolution: the new protocol pads each image (centred) and the
loader gives the crop box of the original inside it; the old protocol resizes, and its box is the whole input.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pretrain import dist
from pretrain.catalog import DATASETS
from pretrain.config.finetuning import FinetuneConfig
from pretrain.log import progress
from pretrain.metrics import DepthMeter, EdgeMeter, NormalsMeter, SaliencyMeter, SegmentationMeter
from pretrain.metrics.edges import EDGE_DATASETS, TARGET_GT_BOUNDARY
from pretrain.metrics.multitask import delta_m, primary_metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseMeter:
    """How one task is scored: `activate` turns the raw output [B,C,H,W] into the prediction the meter and the saved
    PNGs take (class ids, probabilities, normals, metres); `make(cfg, num_classes)` builds the meter;
    `without_label(meter, pred, target)` scores the task's own target where the dataset names an evaluation label
    for the task (`DenseDataset.eval_labels`) that the batch lacks (shards converted before it existed); None makes
    that an error."""

    activate: Callable[[Tensor], Tensor]
    make: Callable[[FinetuneConfig, dict[str, int]], Any]
    without_label: Callable[[Any, Tensor, Tensor], None] | None = None


def _classes(out_BCHW: Tensor) -> Tensor:
    return out_BCHW.argmax(1)


def _foreground(out_B2HW: Tensor) -> Tensor:
    return out_B2HW.float().softmax(1)[:, 1]


def _sigmoid(out_B1HW: Tensor) -> Tensor:
    return out_B1HW.float().sigmoid()


def _identity(out: Tensor) -> Tensor:
    return out.float()


def _segmentation(task: str) -> Callable[[FinetuneConfig, dict[str, int]], SegmentationMeter]:
    # the official dense meters count a class with neither GT nor predicted pixels as IoU 0 (metrics/segmentation.py)
    return lambda cfg, nc: SegmentationMeter(num_classes=nc[task], empty_classes="zero")


def _edge_on_target(meter: EdgeMeter, prob_B1HW: Tensor, target_B1HW: Tensor) -> None:
    meter.update(prob_B1HW, target_B1HW, gt_boundary=TARGET_GT_BOUNDARY)  # a binary edge map, not SEISM's partition


DENSE_METERS: dict[str, DenseMeter] = {
    "semseg": DenseMeter(_classes, _segmentation("semseg")),
    "human_parts": DenseMeter(_classes, _segmentation("human_parts")),
    "sal": DenseMeter(_foreground, lambda cfg, nc: SaliencyMeter(mode=cfg.data.protocol)),
    "normals": DenseMeter(_identity, lambda cfg, nc: NormalsMeter(mode=cfg.data.protocol)),
    "depth": DenseMeter(_identity, lambda cfg, nc: DepthMeter()),
    "edge": DenseMeter(_sigmoid, lambda cfg, nc: EdgeMeter(mode=cfg.data.protocol,
                                                             **EDGE_DATASETS[cfg.data.dataset]),
                       without_label=_edge_on_target),
}


def activate(preds: dict[str, Tensor]) -> dict[str, Tensor]:
    """Raw decoder outputs → predictions per task (see `DenseMeter.activate`)."""
    return {t: DENSE_METERS[t].activate(p) for t, p in preds.items()}


def crop(x_BCHW: Tensor, box: list[int]) -> Tensor:
    """The original image's region (top, left, h, w) of a padded [..., H, W] map."""
    top, left, h, w = box
    return x_BCHW[..., top:top + h, left:left + w]


def score(task: str, meter: Any, pred: Tensor, targets: dict[str, Tensor], label: str) -> bool:
    """Update `meter` with the prediction of `task` against `targets[label]` (the task's evaluation label, or the task
    itself); without that label, against the task's own target through `DenseMeter.without_label`. Returns whether
    `label` was there."""
    if label in targets:
        meter.update(pred, targets[label])
        return True
    fallback = DENSE_METERS[task].without_label
    if fallback is None:
        raise ValueError(f"{task}: the batch has no {label!r} GT map and this task has no fallback")
    fallback(meter, pred, targets[task])
    return False


def _warn_unlabelled(unlabelled: dict[str, int], labels: dict[str, str], dataset: str) -> None:
    for task, count in unlabelled.items():
        if count:
            logger.warning("%s: %d image(s) lack the evaluation GT %r (shards converted before it existed) and were "
                           "scored on the training target instead, not comparable to the official number; re-run "
                           "`pretrain prepare %s` for the val split", task, count, labels[task], dataset)


def as_map(target: Tensor) -> Tensor:
    """[B,H,W] targets → [B,1,H,W] so that one crop handles every task."""
    return target.unsqueeze(1) if target.dim() == 3 else target


@torch.no_grad()
def evaluate_dense(cfg: FinetuneConfig, model: torch.nn.Module, loader, tasks: list[str], num_classes: dict[str, int],
                   info: dist.DistInfo, *, max_images: int = 0,
                   on_batch: Callable[[dict, dict[str, Tensor]], None] | None = None) -> dict[str, float]:
    """Score every task on the val loader; returns `eval/<task>/<metric>` plus `eval/delta_m` when baselines are
    configured. `on_batch(batch, preds)` sees every batch with its activated predictions (saving, the grid)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    meters = {t: DENSE_METERS[t].make(cfg, num_classes) for t in tasks}
    labels = {t: DATASETS[cfg.data.dataset].eval_labels.get(t, t) for t in tasks}
    unlabelled, seen = dict.fromkeys(tasks, 0), 0
    for batch in progress(loader, desc="eval", enabled=info.is_main):
        if max_images and seen >= max_images:
            break
        preds = activate(model(batch["images"].to(device)))
        for b, box in enumerate(batch["crop_box"].tolist()):
            targets = {k: crop(v[b:b + 1], box).to(device) for k, v in batch["targets"].items()}
            for task in tasks:
                pred = crop(preds[task][b:b + 1], box)
                unlabelled[task] += not score(task, meters[task], pred, targets, labels[task])
        if on_batch is not None:
            on_batch(batch, preds)
        seen += len(batch["images"])
    _warn_unlabelled(unlabelled, labels, cfg.data.dataset)
    metrics: dict[str, float] = {}
    scores: dict[str, dict[str, float]] = {}
    for task, meter in meters.items():
        meter.sync(dist.all_reduce_sum)
        scores[task] = {k: float(v) for k, v in meter.compute().items()}
        metrics.update({f"eval/{task}/{k}": v for k, v in scores[task].items()})
    baselines = cfg.finetune.baselines
    if baselines and set(tasks) <= set(baselines):
        values, lower = primary_metrics(scores, mode=cfg.data.protocol)
        metrics["eval/delta_m"] = delta_m(values, {t: baselines[t] for t in tasks}, lower)
    model.train(was_training)
    logger.info("evaluation: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return metrics


def plot_grid(batch: dict, preds: dict[str, Tensor], tasks: list[str], out: Path, limit: int) -> Path | None:
    """PNG grid: per image (row) the image, then ground truth and prediction of every task."""
    from pretrain.training.plots import _pyplot

    n = min(limit, len(batch["images"]))
    if n == 0:
        return None
    plt = _pyplot()
    cols = 1 + 2 * len(tasks)
    fig, axes = plt.subplots(n, cols, figsize=(1.8 * cols, 1.8 * n), squeeze=False)
    for b, box in enumerate(batch["crop_box"][:n].tolist()):
        axes[b, 0].imshow(crop(batch["images"][b:b + 1], box)[0].permute(1, 2, 0).numpy())
        for i, task in enumerate(tasks):
            gt = as_map(crop(batch["targets"][task][b:b + 1], box))[0].float()
            pred = as_map(crop(preds[task][b:b + 1].float().cpu(), box))[0]
            for j, img in enumerate((_show(gt), _show(pred))):
                axes[b, 1 + 2 * i + j].imshow(img, cmap=None if img.dim() == 3 else "viridis")
                axes[0, 1 + 2 * i + j].set_title(f"{task} {'gt' if j == 0 else 'pred'}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _show(x_CHW: Tensor) -> Tensor:
    """A displayable map of a target or an activated prediction: normals as RGB, anything else as one channel with
    ignore pixels (255) shown as 0."""
    if x_CHW.shape[0] == 3:
        valid = (x_CHW != 255).all(0, keepdim=True)
        n = torch.nn.functional.normalize(x_CHW * valid, dim=0)
        return ((n + 1) / 2 * valid).permute(1, 2, 0).clamp(0, 1)
    x = x_CHW[0]
    return torch.where(x == 255, torch.zeros_like(x), x)


def main(cfg: FinetuneConfig) -> int:
    """`pretrain evaluate RUN_DIR` of a fine-tuning run: its latest checkpoint on the val shards, in this process."""
    from pretrain.config.finetuning import enabled_dense_tasks
    from pretrain.finetune.build import build_dense_model, check_dense_shards, make_eval_loader
    from pretrain.finetune.record import read_record
    from pretrain.log import MetricsWriter, setup_logging
    from pretrain.runs.checkpoint import TAG_RE, load_model_weights
    from pretrain.runs.load import find_tag

    info = dist.resolve()
    dist.export(info)
    setup_logging(info.rank)
    run_dir = Path(cfg.output_dir)
    data = check_dense_shards(cfg)
    tag_dir = find_tag(run_dir / "checkpoints", None)
    # the structure from the run's own record, the weights from its checkpoint: `finetune.init_from` is not read
    # (a run started before records existed still rebuilds from it)
    model, _ = build_dense_model(cfg, data, record=read_record(run_dir))
    load_model_weights(tag_dir, model, verify=False)  # find_tag verified it
    if info.world_size > 1:
        dist.init_process_group(cfg.engine.backend, cfg.engine.timeout_s)
    saver = None
    if cfg.finetune.save_predictions:
        from pretrain.metrics.predictions import save_predictions

        out_dir = run_dir / "predictions"

        def saver(batch: dict, preds: dict[str, Tensor]) -> None:
            for b, (key, box) in enumerate(zip(batch["keys"], batch["crop_box"].tolist())):
                save_predictions(out_dir, key, {t: p[b].cpu() for t, p in preds.items()}, crop_box=tuple(box))

    metrics = evaluate_dense(cfg, model, make_eval_loader(cfg, data, info), enabled_dense_tasks(cfg),
                             data.num_classes, info, max_images=cfg.eval.max_samples, on_batch=saver)
    step = int(TAG_RE.match(tag_dir.name).group(1))
    if info.is_main:
        MetricsWriter(run_dir / "eval.jsonl").write(step, metrics)
        print(json.dumps({"step": step, **{k: round(v, 4) for k, v in metrics.items()}}))
    return 0
