"""Added tasks on a dense dataset's shards (NYUD-v2, PASCAL-Context: `pretrain prepare nyud|pascal_context`): the
dataset's semantic segmentation learnt by a pretraining segmentation head (`head: fpn | upernet`, kind `seg`).

An added task's model side is its kind's (head, forward, loss: `models.HEADS`, `multitask.FORWARDS`); only where
its pixels come from differs. Which reader a task's shards need is a fact of the shards (`_info.json`'s `dataset`,
written by the dense converters), so the config names no reader: `source_of` looks it up, `LOADERS` maps it to the
training reader and `evaluate_semseg` scores a dense task. Sizes: `tasks.<t>.img_size` is the crop height; the width
follows the dataset's training aspect, rounded to 16 pixels (NYUD 448×576: img_size 96 → 96×128, the embedded
corpus's image size; 448 → 448×576); evaluation pads to the same size (the current protocol: pad, never resize, score
the original region), so val images must fit in it. The meter is the official dense meters' (`empty_classes="zero"`:
a class absent from GT and prediction counts 0), as `pretrain finetune` scores NYUD / PASCAL semseg.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain import dist
from pretrain.config.checks import ConfigError
from pretrain.config.pretraining import DataConfig, TaskConfig, task_kind
from pretrain.data.build import DataSpec, build_sampler, check_shards, resolve_shards
from pretrain.data.dense import DENSE_DATASETS, dense_info, make_dense_eval_loader, make_dense_train_loader
from pretrain.data.mixture import MixedStream
from pretrain.data.sources import make_train_loader, read_shard_info
from pretrain.log import progress
from pretrain.metrics.segmentation import SegmentationMeter

DENSE_TASK = "semseg"  # the dense dataset's task an added task learns
DENSE_KINDS = ("seg",)  # the pretraining kinds whose heads learn it


@dataclass
class AddedData:
    """What the added tasks' shards say (keyed by kind, as the data layer keys its streams) and which of them are a
    dense dataset's (kind → dataset name)."""

    spec: DataSpec
    dense: dict[str, str]


def source_of(data: DataConfig, task: TaskConfig) -> str | None:
    """The dense dataset whose shards `task.shards` are (`_info.json`'s `dataset`), or None for pretraining shards.
    Raises naming the folder when it is missing."""
    info = read_shard_info(resolve_shards(data.root, task.shards))
    dataset = info.get("dataset")
    return dataset if dataset in DENSE_DATASETS else None


def dense_size(dataset: str, img_size: int) -> tuple[int, int]:
    """(h, w) of a dense task's crop and eval pad: height `img_size`, the dataset's training aspect."""
    h, w = DENSE_DATASETS[dataset].train_size
    return img_size, max(16, round(img_size * w / h / 16) * 16)


def check_added_shards(data: DataConfig, by_kind: dict[str, TaskConfig], names: Mapping[str, str]) -> AddedData:
    """Every added task's shard sets checked before anything heavy starts: pretraining shards by `check_shards`, a
    dense dataset's by `dense_info` (its semseg labels; a task on them must be of a kind in `DENSE_KINDS`).
    Raises naming the task, folder or key."""
    dense: dict[str, str] = {}
    for kind, task in by_kind.items():
        dataset = source_of(data, task)
        if dataset is None:
            continue
        if task_kind(names[kind], task) not in DENSE_KINDS:
            raise ConfigError(f"tasks.{names[kind]}.head={task.head!r}: {task.shards} holds {dataset} (dense) shards, "
                              "whose semantic segmentation a segmentation head learns: head fpn or upernet")
        dense[kind] = dataset
    if dense and getattr(data, "partitions", 0):  # the dense reader has no partitioned stream
        dense_names = ", ".join(names[k] for k in dense)
        raise ConfigError(f"data.partitions={data.partitions}: tasks on dense shards ({dense_names}) read resampled "
                          "streams per rank: set data.partitions=0")
    spec = check_shards(data, {k: t for k, t in by_kind.items() if k not in dense})
    for kind, dataset in dense.items():
        task = by_kind[kind]
        train_dir = resolve_shards(data.root, task.shards)
        info = dense_info(dataset, train_dir, [DENSE_TASK])  # raises naming the folder without semseg labels
        spec.tasks.append(kind)
        spec.train_dirs[kind] = train_dir
        spec.sizes[kind] = int(info["num_samples"])
        spec.num_classes[kind] = task.num_classes or DENSE_DATASETS[dataset].num_classes[DENSE_TASK]
        if info.get(f"{DENSE_TASK}_classes"):
            spec.classes[kind] = info[f"{DENSE_TASK}_classes"]
        if task.val_shards:
            val_dir = resolve_shards(data.root, task.val_shards)
            if (val_dir / "_info.json").is_file():
                dense_info(dataset, val_dir, [DENSE_TASK])
                spec.val_dirs[kind] = val_dir
    return AddedData(spec, dense)


def as_seg_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A dense batch (`data.dense` contract) → the seg kind's: images, `masks` [B,H,W] int64 (255 ignored)."""
    return {"images": batch["images"], "masks": batch["targets"][DENSE_TASK], "skipped": batch.get("skipped", 0)}


def _dense_loader(kind: str, *, dataset: str, shard_dir: Path, batch_size: int, img_size: int, seed: int, rank: int,
                  world_size: int, num_workers: int, start_step: int, shuffle_buffer: int) -> Iterator[dict]:
    loader = make_dense_train_loader(dataset, shard_dir, tasks=[DENSE_TASK], batch_size=batch_size,
                                     crop_size=dense_size(dataset, img_size), seed=seed, rank=rank,
                                     world_size=world_size, num_workers=num_workers, start_step=start_step,
                                     shuffle_buffer=shuffle_buffer)
    return (as_seg_batch(batch) for batch in loader)


# the format of a task's shards → its training reader (`kind`, seed=, rank=, ..., **loader kwargs) → batches of its
# kind's contract (`data.collate`)
LOADERS = {"pretrain": make_train_loader, "dense": _dense_loader}


def make_loader(kind: str, *, reader: str, **kwargs: Any) -> Any:
    """`MixedStream`'s loader factory for added tasks: `loader_kwargs[kind]["reader"]` picks the reader."""
    return LOADERS[reader](kind, **kwargs)


def build_added_stream(data: DataConfig, by_kind: dict[str, TaskConfig], added: AddedData, info: dist.DistInfo, *,
                       seed: int, start_micro_step: int) -> MixedStream:
    """The added tasks' resumable (kind, batch) stream when some read a dense dataset (the others as
    `data.build.build_stream` reads them: one resampled stream per rank and worker)."""
    kwargs = {kind: {"reader": "dense" if kind in added.dense else "pretrain", "shard_dir": added.spec.train_dirs[kind],
                     "batch_size": task.batch_size, "img_size": task.img_size, "shuffle_buffer": data.shuffle_buffer,
                     **({"dataset": added.dense[kind]} if kind in added.dense else
                        {"aug_range": tuple(task.aug_range)})}
              for kind, task in by_kind.items()}
    return MixedStream(build_sampler(data, by_kind, added.spec, seed=seed), kwargs, rank=info.rank,
                       world_size=info.world_size, num_workers=data.num_workers, start_step=start_micro_step,
                       seed=seed, make_loader=make_loader)


@torch.no_grad()
def evaluate_semseg(model: torch.nn.Module, task: str, dataset: str, val_dir: Path, tcfg: TaskConfig,
                    num_classes: int, info: dist.DistInfo, *, num_workers: int = 0,
                    max_samples: int = 0) -> dict[str, float]:
    """mIoU (and mAcc, aAcc) of `task` on a dense val set: each image padded to `dense_size`, the prediction's
    original region scored with the official dense meters' rule; metrics identical on every rank."""
    loader = make_dense_eval_loader(dataset, val_dir, tasks=[DENSE_TASK], batch_size=tcfg.eval_batch_size,
                                    eval_size=dense_size(dataset, tcfg.img_size), rank=info.rank,
                                    world_size=info.world_size, num_workers=num_workers)
    meter = SegmentationMeter(num_classes=num_classes, empty_classes="zero")
    device, seen = next(model.parameters()).device, 0
    for batch in progress(loader, desc=f"eval {task}", enabled=info.is_main):
        if max_samples and seen >= max_samples:
            break
        logits_BCHW = model(task, batch["images"].to(device))
        for b, (top, left, h, w) in enumerate(batch["crop_box"].tolist()):
            label_HW = batch["targets"][DENSE_TASK][b, top:top + h, left:left + w].to(device)
            meter.update(logits_BCHW[b, :, top:top + h, left:left + w].argmax(0), label_HW)
        seen += len(batch["images"])
    meter.sync(dist.all_reduce_sum)
    return meter.compute()
