"""The fine-tuning run from its config: shard checks (`DenseData`), the dense model (backbone + decoder + objective,
frozen parts), the resumable training stream and the eval loader."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pretrain import dist
from pretrain.catalog import DATASETS, out_channels
from pretrain.config.finetuning import DENSE_TASKS, FinetuneConfig, dense_size, enabled_dense_tasks
from pretrain.data.build import resolve_shards
from pretrain.data.dense import make_dense_eval_loader, make_dense_train_loader
from pretrain.data.mixture import MixedStream, TaskSampler
from pretrain.data.sources import read_shard_info
from pretrain.dist import DistInfo
from pretrain.finetune.init import build_finetune_backbone, load_source_decoder_
from pretrain.finetune.losses import build_losses
from pretrain.finetune.record import BackboneRecord
from pretrain.models.decoders import DECODERS
from pretrain.models.dense import DenseModel
from pretrain.models.moe_losses import moe_modules
from pretrain.models.moe_routing import TaskRouter
from pretrain.training.objective import build_objective

logger = logging.getLogger(__name__)

# output channels of each task's prediction, the catalog's (semseg / human_parts: the dataset's class count, absent)


@dataclass
class DenseData:
    """What the dense shards say: folders, sizes, class counts per task."""

    dataset: str
    train_dir: Path
    val_dir: Path
    num_samples: int
    num_classes: dict[str, int]


def check_dense_shards(cfg: FinetuneConfig) -> DenseData:
    """Check the train/val shard sets and that they hold every enabled task (errors name the folder and task)."""
    d = cfg.data
    train_dir = resolve_shards(d.root, d.train_shards or f"{d.dataset}/train")
    val_dir = resolve_shards(d.root, d.val_shards or f"{d.dataset}/val")
    info = read_shard_info(train_dir)
    read_shard_info(val_dir)
    have = set(info.get("tasks", DATASETS[d.dataset].tasks))
    missing = [t for t in enabled_dense_tasks(cfg) if t not in have]
    if missing:
        raise ValueError(f"{train_dir}: the shards hold no {', '.join(missing)} labels (tasks {sorted(have)}); "
                         f"disable them with tasks.<task>.enabled=false")
    return DenseData(d.dataset, train_dir, val_dir, int(info["num_samples"]), dict(info.get("num_classes", {})))


def apply_trainable_(model: DenseModel, trainable: str) -> None:
    """Freeze what `finetune.trainable` leaves out (frozen parameters get no gradient and no optimizer state)."""
    if trainable == "all":
        return
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    if trainable == "routers+decoder":
        for _, layer in moe_modules(model.backbone):
            # every router of the layer: its own, or an exact-routing submodel layer's `full_routing.router`
            for router in (m for m in layer.modules() if isinstance(m, TaskRouter)):
                router.requires_grad_(True)


def build_dense_model(cfg: FinetuneConfig, data: DenseData, *, depth_bias: float | None = None,
                      record: BackboneRecord | None = None) -> tuple[DenseModel, BackboneRecord]:
    """Backbone (with one router row per dense task, or one shared) + decoder + objective, frozen parts applied, and
    the backbone's record (`finetune.record`).

    `depth_bias`: the depth output's starting bias (`data_depth_bias`); a decoder loaded from the source file keeps
    its own. `record`: None at a run's first start (the backbone, and an imported decoder, come from
    `finetune.init_from`); the run's own record on resume and evaluation (only the structure: the run's checkpoint
    brings every weight, and `init_from` is not read).
    """
    tasks = enabled_dense_tasks(cfg)
    first_start = record is None
    backbone, record = build_finetune_backbone(cfg, tasks, record)
    channels = {t: out_channels(t, cfg.data.dataset) for t in tasks}
    decoder = DECODERS[cfg.finetune.decoder](embed_dim=backbone.embed_dim, depth=backbone.depth, tasks=channels,
                                             **cfg.finetune.decoder_options)
    if depth_bias is not None:
        with torch.no_grad():
            decoder.heads["depth"].pred.bias.fill_(depth_bias)
    if first_start:  # an imported official MLoRE file (`pretrain import-mlore`) brings its decoder
        load_source_decoder_(cfg, decoder)
    objective = build_objective(cfg.tasks, cfg.optim, cfg.moe, extra_aux=decoder.aux_weights, order=DENSE_TASKS)
    model = DenseModel(backbone=backbone, decoder=decoder, tasks=tasks, routing=cfg.finetune.routing,
                       losses=build_losses(tasks, edge_pos_weight=cfg.finetune.edge_pos_weight), objective=objective)
    apply_trainable_(model, cfg.finetune.trainable)
    # every source trains in train mode: a trained backbone arrives in eval mode (`load_model`, `load_run`), and
    # nothing switched it before the first periodic evaluation, so a pretrained or extracted backbone fine-tuned
    # without routing noise, MoE auxiliary losses or usage updates while a random one had all three
    model.train()
    if torch.cuda.is_available() and dist.resolve().world_size > 1 and cfg.engine.backend != "gloo":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over every GPU, as the references do
    return model, record


@torch.no_grad()
def data_depth_bias(cfg: FinetuneConfig, data: DenseData) -> float | None:
    """The mean valid depth (metres) of the first `finetune.depth_bias_samples` training images (the training crops
    of this seed, read as rank 0 of 1 reads them, so every rank gets the same value): the depth output's starting
    bias for `build_dense_model`. None when the option is off or depth is not trained."""
    count = cfg.finetune.depth_bias_samples
    if not count or "depth" not in enabled_dense_tasks(cfg):
        return None
    d = cfg.data
    loader = make_dense_train_loader(data.dataset, data.train_dir, tasks=["depth"], batch_size=d.batch_size,
                                     crop_size=dense_size(d, "train"), seed=cfg.seed, shuffle_buffer=d.shuffle_buffer,
                                     protocol=d.protocol, scale_range=tuple(d.scale_range))
    total, pixels, seen = 0.0, 0, 0
    for batch in loader:
        depth = batch["targets"]["depth"][: count - seen].float()
        valid = (depth != 0) & (depth != 255)  # depth_l1's rule: 0 is no measurement (and padding)
        total, pixels, seen = total + float(depth[valid].sum()), pixels + int(valid.sum()), seen + len(depth)
        if seen >= count:
            break
    if not pixels:
        raise ValueError(f"{data.train_dir}: no valid depth pixel in the first {seen} training images "
                         "(finetune.depth_bias_samples)")
    logger.info("depth output bias: %.3f m, the mean valid depth of %d training images", total / pixels, seen)
    return total / pixels


def make_stream(cfg: FinetuneConfig, data: DenseData, info: DistInfo, *, start_micro_step: int) -> MixedStream:
    """The resumable training stream (one dataset: every step draws it) from `start_micro_step`."""
    d = cfg.data
    kwargs = {data.dataset: {"shard_dir": data.train_dir, "tasks": enabled_dense_tasks(cfg),
                             "batch_size": d.batch_size, "crop_size": dense_size(d, "train"),
                             "shuffle_buffer": d.shuffle_buffer, "protocol": d.protocol,
                             "scale_range": tuple(d.scale_range)}}
    sampler = TaskSampler([data.dataset], [1.0], seed=cfg.seed)
    return MixedStream(sampler, kwargs, rank=info.rank, world_size=info.world_size, num_workers=d.num_workers,
                       start_step=start_micro_step, seed=cfg.seed, make_loader=make_dense_train_loader)


def make_eval_loader(cfg: FinetuneConfig, data: DenseData, info: DistInfo):
    d = cfg.data
    return make_dense_eval_loader(data.dataset, data.val_dir, tasks=enabled_dense_tasks(cfg),
                                  batch_size=d.eval_batch_size, eval_size=dense_size(d, "val"), protocol=d.protocol,
                                  rank=info.rank, world_size=info.world_size, num_workers=cfg.eval.num_workers)


