"""`pretrain evaluate`: ImageNet top-1/5, COCO box AP, ADE20K mIoU on the val shards, correct across ranks.

Every rank evaluates its disjoint part of each val shard set (uneven last batches included); meters hold counts
(or per-image detections) that are summed or gathered across ranks before the metric is computed, so the
result does not depend on the number of ranks. Which meter a task uses and how a batch updates it is the
`EVALUATORS` table, keyed by kind (`config.task_kind`): a task added to a trained model (`pretrain add-task`) is
evaluated by its kind's evaluator on its own val shards.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from pretrain import dist
from pretrain.config.pretraining import EvalConfig, RunConfig, TaskConfig, enabled_tasks, task_kind, task_order
from pretrain.data.build import DataSpec, build_eval_loader, check_shards
from pretrain.log import MetricsWriter, progress, setup_logging
from pretrain.metrics import ClassificationMeter, CocoDetectionMeter, SegmentationMeter

logger = logging.getLogger(__name__)


class EvalSections(Protocol):
    """What evaluation reads of a config (the pretraining and the add-task schemas both have these sections)."""

    tasks: dict[str, TaskConfig]
    eval: EvalConfig


class ClsEval:
    """Top-1/top-5 of logits [B,C] against the batch's labels."""

    def __init__(self, spec: DataSpec, task: str) -> None:
        self.meter = ClassificationMeter()

    def update(self, logits_BC: torch.Tensor, batch: dict) -> None:
        self.meter.update(logits_BC, batch["labels"].to(logits_BC.device))

    def compute(self) -> dict[str, float]:
        self.meter.sync(dist.all_reduce_sum)
        return self.meter.compute()


class SegEval:
    """mIoU at the original label resolution: crop the padding, resize logits to the GT size (mmseg protocol, whose
    mIoU leaves out classes absent from both GT and prediction: `empty_classes="skip"`)."""

    def __init__(self, spec: DataSpec, task: str) -> None:
        self.meter = SegmentationMeter(num_classes=spec.num_classes[task], empty_classes="skip")

    def update(self, logits_BCHW: torch.Tensor, batch: dict) -> None:
        for b, gt_hw in enumerate(batch["orig_masks"]):
            vh, vw = batch["valid_hw"][b].tolist()
            logits_1CHW = logits_BCHW[b:b + 1, :, :vh, :vw].float()
            logits_1CHW = F.interpolate(logits_1CHW, size=tuple(gt_hw.shape), mode="bilinear", align_corners=False)
            self.meter.update(logits_1CHW.argmax(1), gt_hw.unsqueeze(0).to(logits_1CHW.device))

    def compute(self) -> dict[str, float]:
        self.meter.sync(dist.all_reduce_sum)
        return self.meter.compute()


class DetEval:
    """COCO box AP: detections back in original pixels; the GT of the images seen is gathered from every rank."""

    def __init__(self, spec: DataSpec, task: str) -> None:
        if task not in spec.classes:
            raise ValueError(f"{task}: no COCO categories for this task (its shards' _info.json or the model file's "
                             "class lists hold them)")
        det = spec.classes[task]  # per task: an added det task's categories are its own shards'
        self.categories, self.contiguous_to_cat_id = det["categories"], det["contiguous_to_cat_id"]
        self.gt_images: dict[int, dict] = {}
        self.gt_anns: list[dict] = []
        self.dets: list[tuple[int, dict]] = []

    def update(self, dets: list[dict], batch: dict) -> None:
        for b, det in enumerate(dets):
            scale = float(batch["scales"][b])
            image_id = int(batch["image_ids"][b])
            h, w = batch["orig_sizes"][b].tolist()
            self.gt_images[image_id] = {"id": image_id, "height": h, "width": w}
            self.gt_anns.extend({**a, "image_id": image_id} for a in batch["annotations"][b])
            self.dets.append((image_id, {k: (v / scale if k == "boxes" else v).cpu() for k, v in det.items()}))

    def compute(self) -> dict[str, float]:
        gathered = dist.all_gather_objects((list(self.gt_images.values()), self.gt_anns))
        images = {img["id"]: img for part_images, _ in gathered for img in part_images}
        anns = [a for _, part_anns in gathered for a in part_anns]
        for i, ann in enumerate(anns, 1):
            ann.setdefault("id", i)
        gt = {"images": list(images.values()), "annotations": anns, "categories": self.categories}
        meter = CocoDetectionMeter(gt=gt, contiguous_to_cat_id=self.contiguous_to_cat_id)
        for image_id, det in self.dets:
            meter.update([image_id], [det])
        meter.sync(dist.all_gather_objects)
        return meter.compute()


# kind → its evaluator: (spec, task) → object with update(model output, batch) and compute() (collective)
EVALUATORS = {"cls": ClsEval, "det": DetEval, "seg": SegEval}


@torch.no_grad()
def evaluate_task(cfg: EvalSections, model: torch.nn.Module, task: str, spec: DataSpec, info: dist.DistInfo) -> dict:
    """Evaluate one task (a pretraining or an added one) on its val shards; returns metrics (identical on every
    rank), those of the task's kind."""
    device = next(model.parameters()).device
    loader = build_eval_loader(task, cfg.tasks[task], spec, info, num_workers=cfg.eval.num_workers)
    limit = cfg.eval.max_samples or None
    evaluator = EVALUATORS[task_kind(task, cfg.tasks[task])](spec, task)
    seen, skipped, size = 0, 0, cfg.tasks[task].img_size
    batches = iter(progress(loader, desc=f"eval {task}", enabled=info.is_main))
    while True:
        batch = next(batches, None) if limit is None or seen < limit else None
        # ranks hold different numbers of batches; under expert parallelism every forward is collective, so a
        # rank that is done runs throw-away forwards until every rank is done
        if dist.all_reduce_max(torch.tensor([float(batch is not None)]))[0] == 0:
            break
        if batch is None:
            model(task, torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device))
            continue
        images = batch["images"].to(device)
        evaluator.update(model(task, images), batch)
        seen, skipped = seen + len(images), skipped + int(batch.get("skipped", 0))
    metrics = evaluator.compute()
    seen, skipped = (int(v) for v in dist.all_reduce_sum(torch.tensor([float(seen), float(skipped)])))
    if skipped:  # the metric is over fewer images than the val set holds: say so where the number is read
        logger.warning("eval %s: %d damaged val sample(s) skipped (warnings above name them): the metrics are over "
                       "the %d images that decoded", task, skipped, seen)
        metrics["skipped_samples"] = float(skipped)
    return metrics


def evaluate_model(cfg: EvalSections, model: torch.nn.Module, spec: DataSpec,
                   info: dist.DistInfo) -> dict[str, float]:
    """All enabled tasks of `cfg.tasks` (in row order); returns flat metrics `eval/<task>/<metric>`."""
    was_training = model.training
    model.eval()
    metrics = {}
    for task in enabled_tasks(cfg.tasks, task_order(cfg.tasks)):
        for key, value in evaluate_task(cfg, model, task, spec, info).items():
            metrics[f"eval/{task}/{key}"] = value
    model.train(was_training)
    logger.info("evaluation: %s", json.dumps({k: round(v, 2) for k, v in metrics.items()}))
    return metrics


def main(cfg: RunConfig, *, random_init: bool = False) -> int:
    """Load the latest checkpoint of `cfg.output_dir` in this process (no DeepSpeed for the native MoE backend) and
    evaluate every enabled task; `random_init`: the config's model as initialised from `seed` (a baseline, step 0)."""
    from pretrain.runs.load import build_run_model, find_tag, unused_prefixes

    info = dist.resolve()
    dist.export(info)
    setup_logging(info.rank)
    run_dir = Path(cfg.output_dir)
    spec = check_shards(cfg.data, cfg.tasks)
    torch.manual_seed(cfg.seed)  # the same initial weights `pretrain train` starts from
    model = build_run_model(cfg, num_classes=spec.num_classes, rank=0, single_process=True)
    step = 0
    if not random_init:
        from pretrain.runs.checkpoint import load_model_weights
        from pretrain.runs.integrity import tag_step

        tag_dir = find_tag(run_dir / "checkpoints", None)
        load_model_weights(tag_dir, model, skip=unused_prefixes(cfg), verify=False)  # find_tag verified it
        step = tag_step(tag_dir)
    if info.world_size > 1:  # metrics are reduced across ranks: that needs a process group
        dist.init_process_group(cfg.engine.backend, cfg.engine.timeout_s)
    metrics = evaluate_model(cfg, model, spec, info)
    if info.is_main:
        MetricsWriter(run_dir / "eval.jsonl").write(step, metrics)
        print(json.dumps({"step": step, **{k: round(v, 3) for k, v in metrics.items()}}))
    return 0
