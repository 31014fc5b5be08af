"""The fine-tuning schema: the core's shared sections (model, moe, optim, engine, train, eval, logging) plus the dense
data, the dense task table and the fine-tuning choices (initialisation, routing, what trains, decoder).

Listed in `pretrain.config.load.SCHEMAS` / `VALIDATORS`, so `load_config(path, overrides,
schema=FinetuneConfig)` merges, checks and reports errors exactly as for pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pretrain import catalog
from pretrain.config.checks import ConfigError, check_choices, check_tasks, check_values, need
from pretrain.config.pretraining import CHOICES as CORE_CHOICES
from pretrain.config.pretraining import (
    EngineConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    TrainConfig,
    check_model,
    check_moe,
    check_train,
)

# every dense task the fine-tuning stage knows, in id order (the dense model's router rows follow the enabled ones):
# the catalog's, as it stood at import (the checks below read the catalog itself)
DENSE_TASKS = tuple(catalog.DENSE_TASKS)


@dataclass
class DenseTaskConfig:
    enabled: bool = True
    loss_weight: float = 1.0
    # unused by dense tasks, present so the shared task checks apply to both schemas
    weight: float = 1.0
    batch_size: int = 1
    num_classes: int = 0


def nyud_tasks() -> dict[str, DenseTaskConfig]:
    """NYUD-v2's four tasks with the current protocol's loss weights (evaluation.md §4)."""
    return {"semseg": DenseTaskConfig(loss_weight=1.0), "depth": DenseTaskConfig(loss_weight=1.0),
            "normals": DenseTaskConfig(loss_weight=10.0), "edge": DenseTaskConfig(loss_weight=50.0)}


@dataclass
class DenseDataConfig:
    root: str = "corpus/shards"
    dataset: str = "nyud"  # a dense dataset of `pretrain.catalog.DATASETS`: nyud | pascal_context
    train_shards: str = ""  # "" = <dataset>/train under root
    val_shards: str = ""  # "" = <dataset>/val under root
    protocol: str = "new"  # new: pad to eval_size, random scale/crop (InvPT/MLoRE); old: fixed resize (ASTMT/M3ViT)
    # (h, w); [0, 0] = the dataset's size for the protocol (its catalog record: `dense_size`), never another's
    train_size: tuple[int, int] = (0, 0)  # crop (new) or resize (old) size
    eval_size: tuple[int, int] = (0, 0)  # pad-to (new) or resize (old) size
    # new protocol: RandomScaling's factor range before the crop (depth is divided by the factor); the official one
    # (data.dense_transforms.SCALE_RANGE)
    scale_range: tuple[float, float] = (0.5, 2.0)
    batch_size: int = 2
    eval_batch_size: int = 2
    num_workers: int = 2
    shuffle_buffer: int = 500


@dataclass
class FinetuneSection:
    init_from: str = ""  # run dir | exported/extracted .safetensors | dense timm ViT (.safetensors/.pth) | "" = random
    router_from: str = "seg"  # pretraining task whose router (and task embedding) each dense task's router starts from
    routing: str = "per_task"  # per_task: a router per dense task, the backbone runs once per task | shared: once
    trainable: str = "all"  # all | decoder (backbone frozen) | routers+decoder (Mod-Squad's cheap adaptation)
    decoder: str = "heads"  # key of pretrain.models.decoders.DECODERS
    decoder_options: dict[str, Any] = field(default_factory=dict)  # keyword options of that decoder's builder
    edge_pos_weight: float = 0.95  # balanced BCE weight w of the edge loss (MLoRE: 0.95 PASCAL, 0.88 NYUD)
    # N > 0: the depth output's bias starts at the mean valid depth (metres) of the first N training images (the
    # seed's order, every rank alike); 0: PyTorch's default init, as the official code. Adam moves that bias about lr
    # per step, so a short run from 0 never reaches metres (the debug config's 40 steps at lr 3e-3: ~0.1 m; its depth
    # delta1 was 0.03%); a long run does not need it.
    depth_bias_samples: int = 0
    baselines: dict[str, float] = field(default_factory=dict)  # single-task metrics for Δm, keyed by task
    save_predictions: bool = False  # write 8-bit PNGs per task at original size in `pretrain evaluate`
    grid_images: int = 4  # val images in the prediction grid PNG (0 = none)


@dataclass
class FinetuneConfig:
    output_dir: str = "runs/finetune"
    seed: int = 0
    data: DenseDataConfig = field(default_factory=DenseDataConfig)
    tasks: dict[str, DenseTaskConfig] = field(default_factory=nyud_tasks)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# the shared sections' choices are the core's (one list each); the fine-tuning sections add their own
CHOICES = {
    **{key: allowed for key, allowed in CORE_CHOICES.items() if key.split(".")[0] in ("moe", "engine", "logging",
                                                                                      "optim", "model")},
    "data.protocol": ("new", "old"),
    "finetune.router_from": ("cls", "det", "seg"),
    "finetune.routing": ("per_task", "shared"),
    "finetune.trainable": ("all", "decoder", "routers+decoder"),
    "finetune.decoder": ("heads", "mlore"),
}


def choices() -> dict[str, tuple]:
    """`CHOICES` plus the dense datasets (`data.dataset`), read from the catalog when asked."""
    return {**CHOICES, "data.dataset": tuple(catalog.dense_datasets())}


def dense_size(data: DenseDataConfig, split: str) -> tuple[int, int]:
    """(h, w) of `split` ("train" / "val"): `data.train_size` / `data.eval_size`, or the dataset's own size for
    `data.protocol` where that is [0, 0] (its catalog record)."""
    h, w = data.train_size if split == "train" else data.eval_size
    return (h, w) if (h, w) != (0, 0) else catalog.DATASETS[data.dataset].size(data.protocol, split)


def check_finetune(cfg: FinetuneConfig) -> None:
    known = tuple(catalog.DENSE_TASKS)
    check_values(cfg)
    check_choices(cfg, choices())
    check_model(cfg.model)
    check_moe(cfg.moe, cfg.engine)
    check_train(cfg.train, cfg.optim)
    check_tasks(cfg.tasks, known)
    need(cfg.engine.ep_size == 1, "engine.ep_size", cfg.engine.ep_size,
         "fine-tuning holds every expert on every rank: must be 1")
    d = cfg.data
    need(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    need(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "must be >= 1")
    need(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    for key in ("train_size", "eval_size"):
        h, w = getattr(d, key)
        need((h, w) == (0, 0) or (h >= 16 and w >= 16), f"data.{key}", [h, w],
             "must be [h, w] with both >= 16, or [0, 0] for the dataset's size")
    lo, hi = d.scale_range
    need(0 < lo <= hi, "data.scale_range", [lo, hi], "must be [low, high] with 0 < low <= high")
    need(0 < cfg.finetune.edge_pos_weight < 1, "finetune.edge_pos_weight", cfg.finetune.edge_pos_weight,
         "must be in (0, 1)")
    unknown = sorted(set(cfg.finetune.baselines) - set(known))
    need(not unknown, "finetune.baselines", unknown, f"unknown task(s); expected {', '.join(known)}")
    check_dataset_tasks(cfg)
    check_decoder(cfg)


def check_dataset_tasks(cfg: FinetuneConfig) -> None:
    """Every enabled task has labels in `data.dataset`'s release (PASCAL-Context has no depth)."""
    labelled = catalog.DATASETS[cfg.data.dataset].tasks
    for task in enabled_dense_tasks(cfg):
        need(task in labelled, f"tasks.{task}.enabled", True,
             f"data.dataset={cfg.data.dataset} has no {task} labels (it has {', '.join(labelled)}): disable it")


def check_decoder(cfg: FinetuneConfig) -> None:
    """Build `finetune.decoder` with `finetune.decoder_options` on the meta device (no memory, no weights), so an
    option the decoder does not take or a value out of its range is a config error now, not a failure at start-up.
    The configured backbone size gives the widths (a run or file in `finetune.init_from` brings its own later)."""
    import torch

    from pretrain.models import backbone_size
    from pretrain.models.decoders import DECODERS

    size = backbone_size(cfg.model)
    channels = {t: catalog.out_channels(t, cfg.data.dataset) for t in enabled_dense_tasks(cfg)}
    try:
        with torch.device("meta"):
            DECODERS[cfg.finetune.decoder](embed_dim=size["embed_dim"], depth=size["depth"], tasks=channels,
                                           **cfg.finetune.decoder_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"finetune.decoder_options={dict(cfg.finetune.decoder_options)} for finetune.decoder="
                          f"{cfg.finetune.decoder}: {exc} (options of a config file stay when an override changes "
                          "the decoder: set the file's decoder_options to match)") from None


def enabled_dense_tasks(cfg: FinetuneConfig) -> list[str]:
    """Enabled dense tasks in the catalog's order (the dense model's router row order)."""
    return [t for t in catalog.DENSE_TASKS if t in cfg.tasks and cfg.tasks[t].enabled]
