"""`pretrain evaluate`: ImageNet top-1/5, COCO box AP, ADE20K mIoU on the val shards, correct across ranks.

Every rank evaluates its disjoint part of each val shard set (uneven last batches included); meters hold counts
(or per-image detections) that are summed or gathered across ranks before the metric is computed, so the
result does not depend on the number of ranks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain import dist
from pretrain.config import RunConfig, enabled_tasks
from pretrain.data.build import DataSpec, build_data, build_eval_loader
from pretrain.log import MetricsWriter, progress, setup_logging
from pretrain.metrics import ClassificationMeter, CocoDetectionMeter, SegmentationMeter

logger = logging.getLogger(__name__)


def _seg_update(meter: SegmentationMeter, logits_BCHW: torch.Tensor, batch: dict) -> None:
    """Compare at the original label resolution: crop the padding, resize logits to the GT size (mmseg protocol)."""
    for b, gt_hw in enumerate(batch["orig_masks"]):
        vh, vw = batch["valid_hw"][b].tolist()
        logits_1CHW = logits_BCHW[b:b + 1, :, :vh, :vw]
        logits_1CHW = F.interpolate(logits_1CHW.float(), size=tuple(gt_hw.shape), mode="bilinear", align_corners=False)
        meter.update(logits_1CHW.argmax(1), gt_hw.unsqueeze(0).to(logits_1CHW.device))


def _det_update(dets: list, gt_images: dict, gt_anns: list, batch: dict, dets_out: list) -> None:
    for b, det in enumerate(dets):
        scale = float(batch["scales"][b])
        image_id = int(batch["image_ids"][b])
        h, w = batch["orig_sizes"][b].tolist()
        gt_images[image_id] = {"id": image_id, "height": h, "width": w}
        gt_anns.extend({**a, "image_id": image_id} for a in batch["annotations"][b])
        dets_out.append((image_id, {k: (v / scale if k == "boxes" else v).cpu() for k, v in det.items()}))


@torch.no_grad()
def evaluate_task(cfg: RunConfig, model: torch.nn.Module, task: str, spec: DataSpec, info: dist.DistInfo) -> dict:
    """Evaluate one task on its val shards; returns metrics (identical on every rank)."""
    device = next(model.parameters()).device
    loader = build_eval_loader(cfg, spec, task, info)
    limit = cfg.eval.max_samples or None
    seen, gt_images, gt_anns, dets = 0, {}, [], []
    meter = ClassificationMeter() if task == "cls" else None
    if task == "seg":
        meter = SegmentationMeter(num_classes=spec.num_classes["seg"])
    size = getattr(cfg.tasks, task).img_size
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
        out = model(task, images)
        if task == "cls":
            meter.update(out, batch["labels"].to(device))
        elif task == "seg":
            _seg_update(meter, out, batch)
        else:
            _det_update(out, gt_images, gt_anns, batch, dets)
        seen += len(images)
    if task == "det":
        return _coco_metrics(spec, gt_images, gt_anns, dets)
    meter.sync(dist.all_reduce_sum)
    return meter.compute()


def _coco_metrics(spec: DataSpec, gt_images: dict, gt_anns: list, dets: list) -> dict:
    gathered = dist.all_gather_objects((list(gt_images.values()), gt_anns))
    images = {img["id"]: img for part_images, _ in gathered for img in part_images}
    anns = [a for _, part_anns in gathered for a in part_anns]
    for i, ann in enumerate(anns, 1):
        ann.setdefault("id", i)
    gt = {"images": list(images.values()), "annotations": anns, "categories": spec.categories}
    meter = CocoDetectionMeter(gt=gt, contiguous_to_cat_id=spec.contiguous_to_cat_id)
    for image_id, det in dets:
        meter.update([image_id], [det])
    meter.sync(dist.all_gather_objects)
    return meter.compute()


def evaluate_model(cfg: RunConfig, model: torch.nn.Module, spec: DataSpec, info: dist.DistInfo) -> dict[str, float]:
    """All enabled tasks; returns flat metrics `eval/<task>/<metric>`."""
    was_training = model.training
    model.eval()
    metrics = {}
    for task in enabled_tasks(cfg):
        for key, value in evaluate_task(cfg, model, task, spec, info).items():
            metrics[f"eval/{task}/{key}"] = value
    model.train(was_training)
    logger.info("evaluation: %s", json.dumps({k: round(v, 2) for k, v in metrics.items()}))
    return metrics


def main(cfg: RunConfig) -> int:
    """Load the latest checkpoint of `cfg.output_dir` (without DeepSpeed) and evaluate every enabled task."""
    from pretrain.checkpoint import load_model_weights
    from pretrain.models import build_model
    from pretrain.tasks import build_task_loss

    info = dist.resolve()
    dist.export(info)
    setup_logging(info.rank)
    run_dir = Path(cfg.output_dir)
    spec = build_data(cfg)
    from pretrain.engine import moe_mlp_factory

    # every process holds all experts here (ep_size=1), whatever the run's EP size: checkpoints store global ids
    single = replace(cfg, engine=replace(cfg.engine, ep_size=1))
    model = build_model(single, num_classes=spec.num_classes, moe_mlp_layer=moe_mlp_factory(single, rank=0))
    model.task_loss = build_task_loss(cfg)  # part of the checkpointed state (uncertainty weights)
    ckpt = run_dir / "checkpoints"
    if not (ckpt / "latest").is_file():
        raise FileNotFoundError(f"{ckpt}: no checkpoint to evaluate (no 'latest' file)")
    tag_dir = load_model_weights(ckpt, model)
    step = int(tag_dir.name.split("_")[-1])
    if info.world_size > 1:
        from pretrain.engine import init_distributed

        init_distributed(cfg.engine.backend)
    metrics = evaluate_model(cfg, model, spec, info)
    if info.is_main:
        MetricsWriter(run_dir / "eval.jsonl").write(step, metrics)
        print(json.dumps({"step": step, **{k: round(v, 3) for k, v in metrics.items()}}))
    return 0
