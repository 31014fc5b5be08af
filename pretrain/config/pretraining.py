"""The one run-config schema: dataclass defaults ← YAML overlay ← `key=value` dotlist.

Every default lives here. `configs/**.yaml` are small overlays. `load_config` merges, type-checks (OmegaConf
structured configs) and range-checks, and turns every problem into a `ConfigError` whose message is one line that
names the key, value or file. Derived values (total steps, scaled lr) come from functions and are never written back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pretrain.config.checks import (
    ConfigError,
    check_choices,
    check_tasks,
    check_values,
    need,
)

# The pretraining tasks. Task id = index here: routers, task embeddings and usage buffers have one row per entry, so
# checkpoints keep their shapes when a task is switched off. Per-concern tables keyed by these names live beside the
# code they serve (`data.sources.SOURCES`, `models.HEADS`, `evaluate.EVALUATORS`, ...).
TASKS = ("cls", "det", "seg")
# Keys of `models.BACKBONE_SIZES` (tests/test_config.py checks they agree): an unknown size fails at load, not at build.
MODEL_SIZES = ("vit_debug", "vit_s16", "vit_b16", "vit_l16")


@dataclass
class TaskConfig:
    enabled: bool = True
    shards: str = ""  # folder with _info.json + tars; relative paths resolve against data.root
    val_shards: str = ""
    batch_size: int = 8
    img_size: int = 224
    weight: float = 1.0  # sampling weight when data.sampling == "fixed"
    loss_weight: float = 1.0  # fixed loss weight (ignored by uncertainty weighting)
    eval_batch_size: int = 8
    num_classes: int = 0  # 0 = from the shards' _info.json (det: foreground classes)
    head: str = ""  # the task's head kind: one of HEAD_CHOICES[task]
    aug_range: tuple[float, float] = (0.0, 1.0)  # cls RandomResizedCrop area range, det/seg scale-jitter range


def default_tasks() -> dict[str, TaskConfig]:
    return {
        "cls": TaskConfig(shards="imagenet/train", val_shards="imagenet/val", num_classes=1000, head="project",
                          aug_range=(0.08, 1.0)),
        "det": TaskConfig(shards="coco/train", val_shards="coco/val", batch_size=2, img_size=512, num_classes=0,
                          head="fasterrcnn", aug_range=(0.1, 2.0)),  # large-scale jitter (ViTDet)
        "seg": TaskConfig(shards="ade20k/train", val_shards="ade20k/val", batch_size=4, img_size=512, num_classes=150,
                          head="fpn", aug_range=(0.5, 2.0)),  # mmseg's ADE20K ratio range
    }


@dataclass
class DataConfig:
    root: str = "corpus/shards"
    sampling: str = "size"  # fixed | size | temperature
    temperature: float = 2.0  # p ∝ n^(1/T) when sampling == temperature
    all_tasks_per_step: bool = False  # every task in every step, as per-task sub-batches
    num_workers: int = 2
    shuffle_buffer: int = 1000
    partitions: int = 0  # N > 0: N partitions, order fixed by (seed, step); tasks.*.batch_size is global (DATA.md)


@dataclass
class MoEConfig:
    placement: str = "modsquad"  # modsquad: MoE attn in even blocks, MoE MLP in odd | m3vit: MoE MLP in odd | dense
    num_experts: int = 16
    top_k: int = 4
    expert_hidden: int = 0  # 0 = mlp_ratio·dim/top_k: k active experts cost one dense MLP (Mod-Squad B: 768)
    attn_num_experts: int = 24
    attn_top_k: int = 12
    attn_head_dim: int = 0  # 0 = dim / num_heads
    dense_attn_head_dim: int = 0  # head dim of the dense attention blocks; 0 = dim / num_heads (Mod-Squad B: 128)
    gate: str = "raw"  # raw (Mod-Squad/M3ViT: un-renormalised top-k probs) | renorm
    noisy: bool = False
    # auto = the placement's official init: modsquad trunc_normal (Mod-Squad's zero init is overwritten by its
    # timm _init_weights: std 0.02), m3vit uniform (U(±1/√E)), dense trunc_normal | zero | normal (std 0.02)
    router_init: str = "auto"
    init: str = "auto"  # experts: auto = modsquad→modsquad, m3vit→m3vit, dense→timm | timm | modsquad | m3vit
    prob_eps: float = 0.0  # added to the router probabilities after the softmax (Mod-Squad: 1e-4)
    usage_in_eval: bool = False  # update the usage EMA in eval forwards too (Mod-Squad does)
    backend: str = "native"  # native (dropless, ours) | deepspeed (deepspeed.moe.layer.MoE with a task gate)
    capacity_factor: float = 1.25  # deepspeed backend only
    usage_momentum: float = 0.95
    mi_ema: float = 0.9  # EMA of task×expert statistics across steps; keeps the MI loss alive with one task per step
    w_mi: float = 0.005
    # MI weight schedule: w_mi_start at step 0, cosine-decayed to w_mi at step w_mi_decay_steps, w_mi after;
    # 0 = constant w_mi. A strong early MI weight makes tasks pick distinct experts while the routers are still
    # uniform; decaying it lets the task losses recover (MOE.md, "What makes tasks specialise")
    w_mi_start: float = 0.0
    w_mi_decay_steps: int = 0
    w_cv: float = 0.0
    w_switch: float = 0.0
    w_z: float = 0.0


@dataclass
class ModelConfig:
    size: str = "vit_b16"  # key of models.BACKBONE_SIZES
    patch_size: int = 0  # 0 = the size's default
    img_size: int = 0  # grid the position embedding is stored for (0 = the size's default; 384 for AugReg-384)
    # (rows, cols) of patches the position embedding is stored for, overriding img_size when not (0, 0): a
    # non-square training grid (MLoRE's NYUD 448×576 → 28×36) needs no resampling on the forward
    pos_grid: tuple[int, int] = (0, 0)
    class_token: bool = True  # false: patch tokens only (MLoRE's official ViT; `pretrain import-mlore` sets it)
    drop_path: float = 0.1
    task_embed: bool = True
    # zero (no weight decay: an upcycled model starts as the dense one, no task-constant std-1 offset dominating the
    # residual stream at init) | randn (Mod-Squad: std 1, weight-decayed)
    task_embed_init: str = "zero"
    # std of the randn init (Mod-Squad: 1). What routers read to tell tasks apart in the first blocks, where the
    # tokens carry little else; std 1 dwarfs a small model's patch embeddings (MOE.md, "What makes tasks specialise")
    task_embed_std: float = 1.0
    upcycle_from: str = ""  # dense timm ViT state dict (.safetensors/.pth); empty = random init
    upcycle_mode: str = "copy"
    det_min_size: int = 512
    det_max_size: int = 512
    # Faster R-CNN's box head width, RoIs per image in training, RPN proposals per image in training (torchvision's)
    det_box_fc_dim: int = 1024
    det_rois_per_image: int = 512
    det_proposals: int = 2000
    pyramid_dim: int = 256


@dataclass
class OptimConfig:
    lr: float = 1.5e-4
    min_lr_ratio: float = 1e-2
    warmup_steps: int = 1000
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    loss_weighting: str = "fixed"  # Mod-Squad's AutomaticWeightedLoss is "uncertainty"
    schedule: str = "cosine"  # after linear warmup: cosine to min_lr_ratio, or poly (1 - s/S)^poly_power (MLoRE)
    poly_power: float = 0.9


@dataclass
class EngineConfig:
    zero_stage: int = 1
    precision: str = "bf16"  # fp32 | bf16
    ep_size: int = 1
    grad_accum: int = 1  # task micro-batches accumulated per optimizer step
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    threads: int = 0  # torch intra-op threads per rank on CPU; 0 = leave torch's default
    # DeepSpeed's default: a longer wait on another rank (rendezvous, collective) ends the run with exit 9, not a hang
    timeout_s: float = 600.0


@dataclass
class TrainConfig:
    max_steps: int = 100_000
    ckpt_every: int = 1000
    keep_last: int = 3
    eval_every: int = 5000
    log_every: int = 20
    max_bad_steps: int = 20  # consecutive NaN/inf steps before the run aborts
    # resume although keys that change the model or the data stream differ from the run's config.yaml
    # (pretrain.runs.drift)
    allow_config_change: bool = False


@dataclass
class EvalConfig:
    max_samples: int = 0  # per task; 0 = the whole split
    num_workers: int = 1
    # also evaluate before the first step of a fresh run (logged at step 0): the reference a training's evaluations
    # are compared with (the demo's "better than at step 0" row); a resumed run does not repeat it
    at_start: bool = False


@dataclass
class LoggingConfig:
    wandb: str = "auto"  # auto (offline without WANDB_API_KEY) | online | offline | disabled
    project: str = "pretrain"
    plots: bool = True


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tasks: dict[str, TaskConfig] = field(default_factory=default_tasks)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


HEAD_CHOICES = {"cls": ("project", "modsquad"), "det": ("fasterrcnn", "retinanet"), "seg": ("fpn", "upernet")}

# Allowed values of string/int fields; tests/test_config.py checks these against the tables the values select
# (models.PLACEMENTS, HEADS, ...), so a choice is written once in code and once here, never in a comment.
CHOICES = {
    "model.size": MODEL_SIZES,
    "data.sampling": ("fixed", "size", "temperature"),
    "moe.placement": ("modsquad", "m3vit", "dense"),
    "moe.gate": ("raw", "renorm"),
    "moe.router_init": ("auto", "zero", "normal", "trunc_normal", "uniform"),
    "moe.init": ("auto", "timm", "modsquad", "m3vit"),
    "model.task_embed_init": ("zero", "randn"),
    "moe.backend": ("native", "deepspeed"),
    "model.upcycle_mode": ("copy", "slice"),
    "optim.loss_weighting": ("fixed", "uncertainty"),
    "optim.schedule": ("cosine", "poly"),
    "engine.zero_stage": (0, 1, 2),
    "engine.precision": ("fp32", "bf16"),
    "engine.backend": ("auto", "nccl", "gloo"),
    "logging.wandb": ("auto", "online", "offline", "disabled"),
}


def check_moe(m: MoEConfig, engine: EngineConfig) -> None:
    need(m.num_experts >= 1, "moe.num_experts", m.num_experts, "must be >= 1")
    need(1 <= m.top_k <= m.num_experts, "moe.top_k", m.top_k, f"must be in 1..moe.num_experts={m.num_experts}")
    need(1 <= m.attn_top_k <= m.attn_num_experts, "moe.attn_top_k", m.attn_top_k,
         f"must be in 1..moe.attn_num_experts={m.attn_num_experts}")
    need(0 <= m.usage_momentum < 1, "moe.usage_momentum", m.usage_momentum, "must be in [0, 1)")
    need(0 <= m.mi_ema < 1, "moe.mi_ema", m.mi_ema, "must be in [0, 1)")
    need(m.prob_eps >= 0, "moe.prob_eps", m.prob_eps, "must be >= 0")
    need(m.dense_attn_head_dim >= 0, "moe.dense_attn_head_dim", m.dense_attn_head_dim, "must be >= 0 (0 = dim/heads)")
    for name in ("w_mi", "w_cv", "w_switch", "w_z", "w_mi_start"):
        need(getattr(m, name) >= 0, f"moe.{name}", getattr(m, name), "must be >= 0")
    need(not m.w_mi_start or m.w_mi_decay_steps >= 1, "moe.w_mi_decay_steps", m.w_mi_decay_steps,
         "must be >= 1 when moe.w_mi_start is set")
    need(engine.ep_size >= 1 and m.num_experts % engine.ep_size == 0, "engine.ep_size", engine.ep_size,
         f"must divide moe.num_experts={m.num_experts}")
    need(engine.grad_accum >= 1, "engine.grad_accum", engine.grad_accum, "must be >= 1")
    need(engine.timeout_s > 0, "engine.timeout_s", engine.timeout_s, "must be > 0 (seconds)")


def check_train(t: TrainConfig, o: OptimConfig) -> None:
    need(t.max_steps >= 1, "train.max_steps", t.max_steps, "must be >= 1")
    need(t.ckpt_every >= 1, "train.ckpt_every", t.ckpt_every, "must be >= 1")
    need(t.keep_last >= 1, "train.keep_last", t.keep_last, "must be >= 1")
    need(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    need(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0 (0 = never)")
    need(t.max_bad_steps >= 1, "train.max_bad_steps", t.max_bad_steps, "must be >= 1")
    need(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    need(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    need(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = off)")
    need(o.poly_power > 0, "optim.poly_power", o.poly_power, "must be > 0")


def check_model(m: ModelConfig) -> None:
    rows, cols = m.pos_grid
    need((rows == 0) == (cols == 0), "model.pos_grid", [rows, cols], "must be [0, 0] (from model.img_size) or "
         "[rows, cols] of patches, both >= 1")


def check_run(cfg: RunConfig) -> None:
    check_values(cfg)
    check_choices(cfg, CHOICES)
    check_model(cfg.model)
    check_moe(cfg.moe, cfg.engine)
    check_train(cfg.train, cfg.optim)
    need(cfg.data.temperature > 0, "data.temperature", cfg.data.temperature, "must be > 0")
    need(cfg.data.num_workers >= 0, "data.num_workers", cfg.data.num_workers, "must be >= 0")
    check_tasks(cfg.tasks, TASKS, sampling=cfg.data.sampling, partitions=cfg.data.partitions)
    for name, task in cfg.tasks.items():
        need(task.img_size >= 16, f"tasks.{name}.img_size", task.img_size, "must be >= 16")
        need(task.head in HEAD_CHOICES[name], f"tasks.{name}.head", task.head,
             f"must be one of {', '.join(HEAD_CHOICES[name])}")
        lo, hi = task.aug_range
        need(0 <= lo <= hi, f"tasks.{name}.aug_range", list(task.aug_range), "must be [lo, hi] with 0 <= lo <= hi")




def enabled_tasks(tasks: dict[str, Any], order: tuple[str, ...] = TASKS) -> list[str]:
    """Enabled task names of a `tasks` section in canonical `order` (pretraining ids are `TASKS.index(name)`)."""
    return [name for name in order if name in tasks and tasks[name].enabled]


def task_order(tasks: dict[str, Any]) -> tuple[str, ...]:
    """Every task's row in routers and task embeddings: `TASKS`, then the tasks added to a trained model
    (`pretrain add-task`) in the order of the `tasks` table, which is the order they were added in."""
    return TASKS + tuple(name for name in tasks if name not in TASKS)


def task_kind(name: str, task: TaskConfig) -> str:
    """Which pretraining task a task is (`cls`, `det`, `seg`: its data source, head and forward): its name for the
    pretraining tasks, the kind whose heads include `task.head` for an added task (`HEAD_CHOICES` are disjoint)."""
    if name in TASKS:
        return name
    kinds = [kind for kind, heads in HEAD_CHOICES.items() if task.head in heads]
    if not kinds:
        raise ConfigError(f"tasks.{name}.head={task.head!r}: an added task's head must be one of "
                          f"{', '.join(h for heads in HEAD_CHOICES.values() for h in heads)}")
    return kinds[0]
