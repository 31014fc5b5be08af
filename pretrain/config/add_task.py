"""The `pretrain add-task` schema: the tasks to add (the pretraining task table's fields; a task's kind, hence its data
source, head and forward, is the one its `head` belongs to: `config.task_kind`), where to start from, and the
training sections shared with pretraining. The model's own sections (`model`, `moe`, its tasks) come from MODEL.

Listed in `pretrain.config.load.SCHEMAS` / `VALIDATORS` under its section name `add_task`, so a file with an
`add_task:` section is recognised as this command's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.config.checks import ConfigError, check_choices, check_values, need
from pretrain.config.pretraining import CHOICES as CORE_CHOICES
from pretrain.config.pretraining import (
    TASKS,
    DataConfig,
    EngineConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    TaskConfig,
    TrainConfig,
    check_train,
    task_kind,
)


@dataclass
class AddTaskSection:
    model: str = ""  # the trained model: a pretraining run directory or a `pretrain export` file (MODEL)
    # kind: each added task starts from the trained task of its kind (its router and task-embedding rows, and every
    # head tensor of the same shape: all but a classifier whose class count differs) | fresh: the model's init
    start: str = "kind"
    out: str = "model.safetensors"  # the grown model file, relative to output_dir
    # N experts added to every MoE layer (MLP experts, and head experts where the placement has MoE attention),
    # trained with the added tasks, whose routers see all E + N; the old tasks' routers never see them. 0: the added
    # tasks route over the frozen experts only
    new_experts: int = 0
    # for measurements only (RESULTS.md): full = every parameter of the trained model trains with the added tasks
    # (the old tasks change: a fine-tuned copy); scratch = the same from the model's random init
    baseline: str = "none"


@dataclass
class AddTaskConfig:
    output_dir: str = "runs/add_task"
    seed: int = 0
    add_task: AddTaskSection = field(default_factory=AddTaskSection)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: dict[str, TaskConfig] = field(default_factory=dict)  # the tasks to add, in the order they get rows
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(precision="fp32"))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    **{key: allowed for key, allowed in CORE_CHOICES.items() if key.split(".")[0] in ("data", "engine", "logging",
                                                                                      "optim")},
    "add_task.start": ("kind", "fresh"),
    "add_task.baseline": ("none", "full", "scratch"),
}


def check_add_task(cfg: AddTaskConfig) -> None:
    check_values(cfg)
    check_choices(cfg, CHOICES)
    check_train(cfg.train, cfg.optim)
    need(bool(cfg.tasks), "tasks", "{}", "name at least one task to add")
    # bf16 weights would round the frozen fp32 tensors: the old tasks would change
    need(cfg.engine.precision == "fp32", "engine.precision", cfg.engine.precision,
         "must be fp32: the old tasks' weights stay exactly as trained")
    # the frozen experts are in no optimizer group and the added ones train as ordinary parameters: nothing to split
    need(cfg.engine.ep_size == 1, "engine.ep_size", cfg.engine.ep_size, "must be 1 (the old experts are frozen)")
    need(0 <= cfg.add_task.new_experts <= 256, "add_task.new_experts", cfg.add_task.new_experts,
         "must be between 0 and 256")
    need(cfg.engine.grad_accum == 1, "engine.grad_accum", cfg.engine.grad_accum, "must be 1")
    need(not cfg.data.all_tasks_per_step, "data.all_tasks_per_step", True, "must be false")
    # the add-task loop evaluates nowhere (`pretrain evaluate RUN` does, after it): a start evaluation would be a
    # setting that silently does nothing
    need(not cfg.eval.at_start, "eval.at_start", True, "must be false: evaluate the run with `pretrain evaluate RUN`")
    need(cfg.add_task.out.endswith(".safetensors"), "add_task.out", cfg.add_task.out, "must end in .safetensors")
    kinds: dict[str, str] = {}
    for name, task in cfg.tasks.items():
        if name in TASKS:
            raise ConfigError(f"tasks.{name}: every pretraining model already has a task {name!r}: choose another "
                              "name")
        need(task.enabled, f"tasks.{name}.enabled", False, "an added task is trained: remove it instead")
        need(task.img_size >= 16, f"tasks.{name}.img_size", task.img_size, "must be >= 16")
        need(task.batch_size >= 1, f"tasks.{name}.batch_size", task.batch_size, "must be >= 1")
        need(task.weight >= 0 and task.loss_weight >= 0, f"tasks.{name}.weight", task.weight, "must be >= 0")
        kind = task_kind(name, task)
        # the data layer keys its streams by kind (`data.sources.SOURCES`): one added task of each kind per run
        if kind in kinds.values():
            raise ConfigError(f"tasks.{name}: a second {kind} task in one run: add it in another run (one added "
                              "task of each kind per run: the data streams are keyed by kind)")
        kinds[name] = kind


def data_tasks(tasks: dict[str, TaskConfig]) -> tuple[dict[str, TaskConfig], dict[str, str]]:
    """The added tasks as the data layer's table (keyed by kind) and kind → added task name."""
    names = {task_kind(name, t): name for name, t in tasks.items()}
    return {kind: tasks[name] for kind, name in names.items()}, names

