"""The data side of a run from its config sections: shard checks (`check_shards` → `DataSpec`), the task sampler, the
mixed training stream and the eval loaders."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.catalog import DATASETS
from pretrain.config.pretraining import DataConfig, TaskConfig, enabled_tasks, task_kind, task_order
from pretrain.data.mixture import MixedStream, PartitionStream, TaskSampler
from pretrain.data.partitions import check_layout, make_partition_loader
from pretrain.data.sources import make_eval_loader, read_shard_info, task_info
from pretrain.dist import DistInfo
from pretrain.durable import atomic_write


@dataclass
class DataSpec:
    """What the shards say: per-task folders, sizes, class counts and class lists (a det task's: COCO's categories
    and their contiguous mapping), keyed by task name (added tasks included)."""

    tasks: list[str]
    train_dirs: dict[str, Path]
    val_dirs: dict[str, Path]
    sizes: dict[str, int]
    num_classes: dict[str, int]
    classes: dict[str, object] = field(default_factory=dict)  # task → class list, as a model file carries it


# Class counts of the releases (ImageNet-1k, COCO 2017's 80 categories, ADE20K's 150): a dry run without shards on
# disk counts the heads' parameters with these (`tasks.<t>.num_classes` wins when set).
RELEASE_CLASSES = {d.stream: d.num_classes[d.stream] for d in DATASETS.values() if not d.dense}  # catalog

CLASSES_FILE = "classes.json"  # in a run directory: what export needs from the shards, so it needs no shards


def save_class_lists(run_dir: Path, spec: DataSpec) -> None:
    """Write the run's class counts and lists (`run_dir/classes.json`, atomically) for `pretrain export`."""
    atomic_write(run_dir / CLASSES_FILE, json.dumps({"num_classes": spec.num_classes, "classes": spec.classes}))


def load_class_lists(run_dir: Path) -> tuple[dict[str, int], dict[str, object]] | None:
    """(class counts, class lists) a run saved, or None for a run that saved none (written before they were)."""
    path = run_dir / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        return {t: int(n) for t, n in saved["num_classes"].items()}, dict(saved["classes"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a class list this pretrain wrote ({exc}); delete it to read the shards' "
                         f"_info.json instead") from None


def resolve_shards(root: str, path: str) -> Path:
    """A shard folder from the config: absolute, or relative to `data.root`."""
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


def check_shards(data: DataConfig, tasks: dict[str, TaskConfig], *, need_val: bool = False) -> DataSpec:
    """Check every enabled task's shard sets before anything heavy starts (missing/empty sets name their folder)
    and collect what they say; an added task's shards read like its kind's (`config.task_kind`). A config class
    count (`tasks.<t>.num_classes`) wins over the shards'."""
    names = enabled_tasks(tasks, task_order(tasks))
    spec = DataSpec(names, {}, {}, {}, {})
    for task in names:
        tcfg = tasks[task]
        spec.train_dirs[task] = resolve_shards(data.root, tcfg.shards)
        info = task_info(task_kind(task, tcfg), spec.train_dirs[task])  # raises naming the folder
        spec.sizes[task] = info["num_samples"]
        spec.num_classes[task] = tcfg.num_classes or info["num_classes"]
        if "categories" in info:
            spec.classes[task] = {key: info[key] for key in ("categories", "contiguous_to_cat_id")}
        elif "classes" in (raw := read_shard_info(spec.train_dirs[task])):
            spec.classes[task] = raw["classes"]  # ImageNet {index, wnid, name}; ADE20K names
        if tcfg.val_shards:
            val_dir = resolve_shards(data.root, tcfg.val_shards)
            if need_val or (val_dir / "_info.json").is_file():
                read_shard_info(val_dir)
                spec.val_dirs[task] = val_dir
    return spec


def build_sampler(data: DataConfig, tasks: dict[str, TaskConfig], spec: DataSpec, *, seed: int) -> TaskSampler:
    return TaskSampler(spec.tasks, [tasks[t].weight for t in spec.tasks], mode=data.sampling,
                       sizes=[spec.sizes[t] for t in spec.tasks], temperature=data.temperature, seed=seed,
                       all_tasks=data.all_tasks_per_step)


def build_stream(data: DataConfig, tasks: dict[str, TaskConfig], spec: DataSpec, info: DistInfo, *, seed: int,
                 start_micro_step: int, sampler: TaskSampler) -> MixedStream:
    """The per-micro-step (task, batch) stream from `start_micro_step` (= optimizer steps × grad_accum).

    `data.partitions` > 0: the partitioned stream (partitions.py), whose batch sizes are global (each rank gets
    batch_size / world_size) and whose order does not depend on the world size or the workers; 0: one resampled
    stream per rank and worker (sources.py).
    """
    if data.partitions:
        check_layout(data.partitions, info.world_size)
        kwargs = {task: {"shard_dir": spec.train_dirs[task], "batch_size": tasks[task].batch_size,
                         "img_size": tasks[task].img_size, "aug_range": tuple(tasks[task].aug_range)}
                  for task in spec.tasks}
        return PartitionStream(sampler, kwargs, partitions=data.partitions, make_loader=make_partition_loader,
                               rank=info.rank, world_size=info.world_size, num_workers=data.num_workers,
                               start_step=start_micro_step, seed=seed)
    kwargs = {task: {"shard_dir": spec.train_dirs[task], "batch_size": tasks[task].batch_size,
                     "img_size": tasks[task].img_size, "shuffle_buffer": data.shuffle_buffer,
                     "aug_range": tuple(tasks[task].aug_range)}
              for task in spec.tasks}
    return MixedStream(sampler, kwargs, rank=info.rank, world_size=info.world_size, num_workers=data.num_workers,
                       start_step=start_micro_step, seed=seed)


def build_eval_loader(task: str, tcfg: TaskConfig, spec: DataSpec, info: DistInfo, *, num_workers: int):
    if task not in spec.val_dirs:
        raise FileNotFoundError(f"tasks.{task}.val_shards: no validation shards for task {task}")
    return make_eval_loader(task, spec.val_dirs[task], batch_size=tcfg.eval_batch_size, img_size=tcfg.img_size,
                            rank=info.rank, world_size=info.world_size, num_workers=num_workers,
                            kind=task_kind(task, tcfg))
