"""Build the data side of a run from the config: shard checks, the task sampler, the mixed stream, eval loaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pretrain.config import RunConfig, enabled_tasks
from pretrain.data.mixture import MixedStream, TaskSampler
from pretrain.data.sources import make_eval_loader, read_shard_info, task_info
from pretrain.dist import DistInfo


@dataclass
class DataSpec:
    """What the shards say: per-task folders, sizes and class counts, and COCO's category mapping."""

    tasks: list[str]
    train_dirs: dict[str, Path]
    val_dirs: dict[str, Path]
    sizes: dict[str, int]
    num_classes: dict[str, int]
    categories: list[dict] = field(default_factory=list)
    contiguous_to_cat_id: list[int] = field(default_factory=list)


def _resolve(root: str, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


def build_data(cfg: RunConfig, *, need_val: bool = False) -> DataSpec:
    """Check every enabled task's shard sets before anything heavy starts (missing/empty sets name their folder)."""
    tasks = enabled_tasks(cfg)
    train_dirs, val_dirs, sizes, num_classes = {}, {}, {}, {}
    spec = DataSpec(tasks, train_dirs, val_dirs, sizes, num_classes)
    for task in tasks:
        tcfg = getattr(cfg.tasks, task)
        train_dirs[task] = _resolve(cfg.data.root, tcfg.shards)
        info = task_info(task, train_dirs[task])  # raises naming the folder
        sizes[task] = info["num_samples"]
        if tcfg.val_shards:
            val_dirs[task] = _resolve(cfg.data.root, tcfg.val_shards)
            if need_val or (val_dirs[task] / "_info.json").is_file():
                read_shard_info(val_dirs[task])
            else:
                del val_dirs[task]
        if task == "det":
            spec.categories, spec.contiguous_to_cat_id = info["categories"], info["contiguous_to_cat_id"]
            num_classes[task] = len(spec.contiguous_to_cat_id)
        elif task == "cls":
            num_classes[task] = cfg.model.cls_classes or info["num_classes"]
        else:
            num_classes[task] = cfg.model.seg_classes or info["num_classes"]
    return spec


def build_sampler(cfg: RunConfig, spec: DataSpec) -> TaskSampler:
    return TaskSampler(spec.tasks, [getattr(cfg.tasks, t).weight for t in spec.tasks], mode=cfg.data.sampling,
                       sizes=[spec.sizes[t] for t in spec.tasks], temperature=cfg.data.temperature, seed=cfg.seed,
                       all_tasks=cfg.data.all_tasks_per_step)


def build_stream(cfg: RunConfig, spec: DataSpec, info: DistInfo, *, start_step: int,
                 sampler: TaskSampler | None = None) -> MixedStream:
    """The per-micro-step (task, batch) stream from `start_step` (micro-steps = optimizer steps × grad_accum)."""
    kwargs = {}
    for task in spec.tasks:
        tcfg = getattr(cfg.tasks, task)
        aug = {"cls": cfg.data.cls_scale, "det": cfg.data.det_jitter, "seg": cfg.data.seg_jitter}[task]
        kwargs[task] = {"shard_dir": spec.train_dirs[task], "batch_size": tcfg.batch_size, "img_size": tcfg.img_size,
                        "shuffle_buffer": cfg.data.shuffle_buffer, "aug_range": tuple(aug)}
    return MixedStream(sampler or build_sampler(cfg, spec), kwargs, rank=info.rank, world_size=info.world_size,
                       num_workers=cfg.data.num_workers, start_step=start_step * cfg.engine.grad_accum,
                       seed=cfg.seed)


def build_eval_loader(cfg: RunConfig, spec: DataSpec, task: str, info: DistInfo):
    if task not in spec.val_dirs:
        raise FileNotFoundError(f"tasks.{task}.val_shards: no validation shards for task {task}")
    tcfg = getattr(cfg.tasks, task)
    return make_eval_loader(task, spec.val_dirs[task], batch_size=tcfg.eval_batch_size, img_size=tcfg.img_size,
                            rank=info.rank, world_size=info.world_size, num_workers=cfg.eval.num_workers)
