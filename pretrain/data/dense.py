"""Dense multi-task loaders (NYUD-v2, PASCAL-Context) for fine-tuning: one batch = images + every task's maps.

Built from the pretraining pipeline's pieces (sources.py): training = ResampledShards (deterministic) → tar samples
(whitelisted members only) → shuffle buffer → decode + joint transform → full batches, every random choice seeded
from (seed, dataset id, rank, worker, start_step, purpose, epoch); evaluation = the sorted shard list split by rank,
then by worker, each sample exactly once, partial last batch kept. Bad samples are skipped and counted (`skipped`).
Decoding: dense_decode.py; transforms and the two protocols: dense_transforms.py.

Batch contract:
    {"dataset": str, "images": uint8 [B,3,H,W], "targets": {task: tensor}, "keys": list[str], "skipped": int,
     eval only: "crop_box": int64 [B,4] (top, left, height, width of the original image in the batch image),
                "orig_sizes": int64 [B,2] (H, W); old protocol eval also "orig_targets": list of {task: map}}
    semseg / human_parts / sal: int64 [B,H,W], 255 = ignore (and padding)
    depth: float32 [B,1,H,W] metres, 0 = invalid / padding
    normals: float32 [B,3,H,W] in [-1, 1]; 255.0 on all channels where ignored
    edge: float32 [B,1,H,W] in 0..1; 255.0 where padding
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from pretrain.catalog import DATASETS, dense_datasets
from pretrain.data.decode import is_allowed_member
from pretrain.data.dense_decode import DENSE_DATASETS, DENSE_TASKS, DenseDataset, decode_dense_sample
from pretrain.data.dense_transforms import CAT_MAX_RATIO, PROTOCOLS, SCALE_RANGE, transform_dense
from pretrain.data.sources import (
    _DEFER_BYTES,
    ErrorCounter,
    Source,
    StreamId,
    _Batch,
    _DecodeTransform,
    _loader,
    _Shuffle,
    _SplitByRank,
    read_shard_info,
)
from pretrain.data.tar import TarSamples

logger = logging.getLogger(__name__)

__all__ = ["DENSE_DATASETS", "collate_dense", "dense_info", "make_dense_eval_loader", "make_dense_train_loader"]


def _batch_target(name: str, maps: list[torch.Tensor]) -> torch.Tensor:
    stacked_BCHW = torch.stack(maps)
    if DENSE_TASKS[name].index_map:
        return stacked_BCHW[:, 0].to(torch.int64)
    return stacked_BCHW


def collate_dense(samples: Sequence[Mapping[str, Any]], *, dataset: str) -> dict[str, Any]:
    """Transformed samples → the batch contract (module docstring). All samples share one size and task set."""
    tasks = list(samples[0]["targets"])
    batch = {"dataset": dataset, "images": torch.stack([s["image"] for s in samples]),
             "targets": {t: _batch_target(t, [s["targets"][t] for s in samples]) for t in tasks},
             "keys": [s["key"] for s in samples]}
    if "crop_box" in samples[0]:
        batch["crop_box"] = torch.tensor([s["crop_box"] for s in samples], dtype=torch.int64).reshape(-1, 4)
        batch["orig_sizes"] = torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64).reshape(-1, 2)
    if "orig_targets" in samples[0]:
        batch["orig_targets"] = [{t: _batch_target(t, [m])[0] for t, m in s["orig_targets"].items()}
                                 for s in samples]
    return batch


def _decoder_kwargs(info: Mapping[str, Any], *, spec: DenseDataset, tasks: tuple[str, ...]) -> dict[str, Any]:
    return {"dataset": spec, "tasks": tasks}


def _describe(info: Mapping[str, Any], *, spec: DenseDataset, tasks: tuple[str, ...]) -> dict[str, Any]:
    return {"tasks": list(tasks), "num_classes": {t: n for t, n in spec.num_classes.items() if t in tasks}}


def _source(spec: DenseDataset, tasks: tuple[str, ...]) -> Source:
    return Source(decode_dense_sample, partial(_decoder_kwargs, spec=spec, tasks=tasks), transform_dense,
                  "scale_range", partial(collate_dense, dataset=spec.name), partial(_describe, spec=spec, tasks=tasks))


def dense_info(dataset: str, shard_dir: str | Path, tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """`_info.json` of a dense shard set, checked against the dataset table; adds "tasks" (resolved) and "urls".

    Raises ValueError naming the folder when the set is of another dataset or lacks a requested task.
    """
    if dataset not in dense_datasets():
        raise ValueError(f"unknown dense dataset {dataset!r}; expected one of {sorted(dense_datasets())}")
    spec = DATASETS[dataset]
    info = read_shard_info(shard_dir)
    if info.get("dataset") != dataset:
        raise ValueError(f"{shard_dir}: _info.json says dataset {info.get('dataset')!r}, expected {dataset!r}")
    wanted = tuple(tasks) if tasks is not None else tuple(t for t in spec.tasks if t in info.get("tasks", ()))
    unknown = [t for t in wanted if t not in spec.tasks]
    missing = [t for t in wanted if t not in info.get("tasks", ())]
    if unknown or missing or not wanted:
        raise ValueError(f"{shard_dir}: tasks {list(wanted)} not usable: unknown for {dataset} {unknown}, absent "
                         f"from the shards {missing} (shards have {info.get('tasks')}, {dataset} has {spec.tasks})")
    info["tasks"] = wanted
    return info


def _check(dataset: str, *, batch_size: int, size: tuple[int, int], rank: int, world_size: int, num_workers: int,
           protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"{dataset}: unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{dataset}: size must be (h, w) >= 1, got {size}")
    for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                             ("num_workers", num_workers, 0)):
        if value < low:
            raise ValueError(f"{dataset}: {name} must be >= {low}, got {value}")
    if not 0 <= rank < world_size:
        raise ValueError(f"{dataset}: rank {rank} outside [0, world_size={world_size})")


def make_dense_train_loader(dataset: str, shard_dir: str | Path, *, tasks: Sequence[str] | None = None,
                            batch_size: int, crop_size: tuple[int, int] | None = None, seed: int, rank: int = 0,
                            world_size: int = 1, num_workers: int = 0, start_step: int = 0,
                            shuffle_buffer: int = 1000, protocol: str = "new",
                            scale_range: tuple[float, float] = SCALE_RANGE, cat_max_ratio: float = CAT_MAX_RATIO,
                            max_consecutive_errors: int = 100) -> Iterable[dict[str, Any]]:
    """Infinite training batches (contract: module docstring), deterministic in (seed, dataset, rank, start_step,
    num_workers).

    Args:
        tasks: subset of the dataset's tasks (default: all the shards have).
        crop_size: (h, w) of the batch; default the dataset's train size ("new") or its FixedResize size ("old").
        start_step: the global step this loader starts at (resume); enters every seed.
        scale_range / cat_max_ratio: the new protocol's RandomScaling range and RandomCrop class-dominance limit.
    """
    info = dense_info(dataset, shard_dir, tasks)
    spec = DATASETS[dataset]
    size = tuple(crop_size or spec.size(protocol, "train"))
    _check(dataset, batch_size=batch_size, size=size, rank=rank, world_size=world_size, num_workers=num_workers,
           protocol=protocol)
    if seed < 0 or start_step < 0:
        raise ValueError(f"{dataset}: seed and start_step must be >= 0, got {seed}, {start_step}")
    source = _source(spec, info["tasks"])
    stream = StreamId(seed=seed, task=dataset, rank=rank, start_step=start_step)
    counter = ErrorCounter(dataset, max_consecutive=max_consecutive_errors)
    aug = {"protocol": protocol, "scale_range": tuple(scale_range), "cat_max_ratio": cat_max_ratio,
           "scale_rotate_ranges": spec.old_scale_rotate}
    pipeline = wds.DataPipeline(
        wds.ResampledShards(info["urls"], seed=seed, worker_seed=stream.shard_seed, deterministic=True),
        TarSamples(select=is_allowed_member, handler=counter, defer_bytes=_DEFER_BYTES),
        _Shuffle(shuffle_buffer, stream),
        _DecodeTransform(source, decoder_kwargs=source.decoder_kwargs(info), train=True, img_size=size, aug=aug,
                         stream=stream, counter=counter),
        _Batch(batch_size, source.collate, partial=False, counter=counter),
    )
    return _loader(pipeline, num_workers, persistent=True)


def make_dense_eval_loader(dataset: str, shard_dir: str | Path, *, tasks: Sequence[str] | None = None,
                           batch_size: int, eval_size: tuple[int, int] | None = None, rank: int = 0,
                           world_size: int = 1, num_workers: int = 0, protocol: str = "new",
                           max_consecutive_errors: int = 100) -> wds.WebLoader:
    """Finite, deterministic eval batches; ranks × workers partition the shard set exactly once (shard i → rank
    i % world_size → that rank's worker (i // world_size) % num_workers); the last partial batch is kept.

    Args:
        eval_size: (h, w); default the dataset's pad target ("new": NYUD 448×576, PASCAL 512×512) or its
            FixedResize size ("old": NYUD 480×640, PASCAL 512×512).
    """
    info = dense_info(dataset, shard_dir, tasks)
    spec = DATASETS[dataset]
    size = tuple(eval_size or spec.size(protocol, "val"))
    _check(dataset, batch_size=batch_size, size=size, rank=rank, world_size=world_size, num_workers=num_workers,
           protocol=protocol)
    if len(info["urls"]) < world_size * max(1, num_workers):
        logger.warning("%s: %d eval shards for %d ranks × %d workers: some get no data", shard_dir,
                       len(info["urls"]), world_size, max(1, num_workers))
    source = _source(spec, info["tasks"])
    counter = ErrorCounter(dataset, max_consecutive=max_consecutive_errors)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(info["urls"]),
        _SplitByRank(rank, world_size),
        wds.split_by_worker,
        TarSamples(select=is_allowed_member, handler=counter, defer_bytes=_DEFER_BYTES),
        _DecodeTransform(source, decoder_kwargs=source.decoder_kwargs(info), train=False, img_size=size,
                         aug={"protocol": protocol}, stream=None, counter=counter),
        _Batch(batch_size, source.collate, partial=True, counter=counter),
    )
    return _loader(pipeline, num_workers, persistent=False)
