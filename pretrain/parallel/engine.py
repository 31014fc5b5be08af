"""DeepSpeed integration: generated ds_config, optimizer param groups, expert-parallel wiring, `deepspeed.initialize`.

The only module that imports DeepSpeed besides `ds_moe.py` (the `moe.backend: deepspeed` layer).

How DeepSpeed is made to treat our native `MoEMlp` experts as expert-parallel parameters (DeepSpeed 0.19.8 source):
- The engine sets `has_moe_layers` only when the model contains a `deepspeed.moe.layer.MoE` instance
  (`_configure_distributed_model`). Without it ZeRO-1/2 skips `_configure_moe_settings` and partitions/reduces
  every group over the whole data-parallel world, and ZeRO-0 crashes on marked params. `apply_expert_marking`
  therefore marks every parameter under a `MoEMlp.experts` child like DeepSpeed's `Experts` does
  (`allreduce=False`, `group_name="ep_size_{ep}"`, also for ep=1 so every topology takes the same path) and attaches
  `DeepSpeedMoEMarker`: a parameter-free `MoE` subclass (`model.ds_moe_marker`) whose only effect is
  `has_moe_layers=True`. It holds no experts, so DeepSpeed writes no expert files for it and
  `_get_non_moe_state_dict` strips nothing: `mp_rank_00_model_states.pt` holds every non-expert tensor plus rank 0's
  local experts; `checkpoint.py` writes all experts itself under global ids.
- With `has_moe_layers`, ZeRO-1/2 maps each `moe=True` optimizer group (from
  `split_params_into_different_moe_groups_for_optimizer`) to the expert-data-parallel group of its name: expert
  gradients are summed only over ranks holding the same experts and divided by the full DP size (the all-to-all
  backward already summed the gradient contributions of the EP group), the expert grad norm counts every expert
  once. tests/dist_scripts/engine_parity.py checks ep=2 against ep=1 on 2 ranks with different data per rank.
- Marked params are also broadcast at start-up only within their expert-data-parallel group
  (`_broadcast_model`); unmarked, rank 0's experts would overwrite every other rank's.
- ZeRO-0's clip norm averages per-rank norms over ranks (`runtime/utils.py:clip_grad_norm_`), which is wrong when
  ranks hold different experts: `build_engine` refuses ep_size > 1 with zero_stage 0 and clipping on.
- Loading: DeepSpeed 0.19.8's `TorchCheckpointEngine.load` unpickles with `weights_only=False`, which would run any
  code a tampered checkpoint carries. `build_engine` swaps in `WeightsOnlyCheckpointEngine` (every load DeepSpeed
  does for `load_checkpoint`: model, ZeRO optimizer and expert files): tensors and containers only, plus the three
  plain DeepSpeed classes its files hold (`DS_SAFE_GLOBALS`).
- EP groups are DeepSpeed's (`groups._create_expert_and_data_parallel`): consecutive ranks [0..ep-1], [ep..2ep-1]…
  form an EP group, so this rank's expert-parallel rank is `rank % ep_size` (`layers.moe_mlp_factory` binds it).
"""

# ruff: noqa: E402  (prepare_op_build sets DS_ACCELERATOR before DeepSpeed is first imported)
from __future__ import annotations

import datetime
import functools
import hashlib
import logging
import os
import pickle
import sys
import time
from collections.abc import Mapping, MutableMapping

import torch
from torch.utils.cpp_extension import get_default_build_root

OP_CACHE_VAR = "TORCH_EXTENSIONS_DIR"  # where torch builds and caches JIT-compiled ops (DeepSpeed's included)


def op_cache_dir(environ: Mapping[str, str], prefix: str, *, writable: bool, user_cache: str) -> str:
    """The folder DeepSpeed's JIT-built ops are cached in for the Python environment at `prefix` (`sys.prefix`).

    torch's default, `~/.cache/torch_extensions/py311_cu130`, is per Python and CUDA version: two environments on
    one machine shared it, each wrote its own paths into the op's build.ninja, and every start rebuilt the other's
    op (2.5-5.5 min on 2 cores). So: the user's TORCH_EXTENSIONS_DIR if set; else the environment's own
    `<prefix>/torch_extensions` (goes away with the venv); else, for a prefix we cannot write (a system Python in a
    container), one folder per prefix under `user_cache` (torch's default root).
    """
    if environ.get(OP_CACHE_VAR):
        return environ[OP_CACHE_VAR]
    if writable:
        return os.path.join(prefix, "torch_extensions")
    return os.path.join(user_cache, "env-" + hashlib.sha256(prefix.encode()).hexdigest()[:12])


STALE_LOCK_S = 30 * 60  # no first build of the op takes this long, even on a loaded 2-core machine (3.5 min here)
# With the op already built, a start holds the lock for the second ninja needs to find nothing to do; a rebuild over
# a built op (after a DeepSpeed or torch upgrade) takes minutes, once. A lock older than this beside a built op was
# left by a start that was killed (SIGKILL at a SLURM time limit) while it held the lock.
STALE_LOCK_BUILT_S = 5 * 60


def clear_stale_build_lock(build_dir: str, *, now: float) -> bool:
    """Remove a build directory's `lock` left by a build that was killed; returns whether one was removed.

    torch's JIT build waits, with no timeout, for that file to disappear, and it takes the lock at every start
    (the build is a no-op when the op is current): one start killed while holding it made every later start hang.
    A lock older than the op it guards (a finished build removes its lock; a new build makes a fresh one) is
    stale, and so is one older than `STALE_LOCK_BUILT_S` beside a built op or `STALE_LOCK_S` before the first
    build.
    """
    lock = os.path.join(build_dir, "lock")
    try:
        locked = os.stat(lock).st_mtime
    except FileNotFoundError:
        return False
    built = [os.stat(os.path.join(build_dir, f)).st_mtime for f in os.listdir(build_dir) if f.endswith(".so")]
    age_limit = STALE_LOCK_BUILT_S if built else STALE_LOCK_S
    if not (any(t > locked for t in built) or now - locked > age_limit):
        return False
    try:
        os.unlink(lock)
    except FileNotFoundError:  # another process cleared it first
        return False
    logging.getLogger(__name__).warning("removed a stale op build lock %s (a build was killed before it released "
                                        "it; torch would wait for it forever)", lock)
    return True


def prepare_op_build(environ: MutableMapping[str, str] = os.environ) -> str:
    """Set up `environ` (this process's, inherited by ranks and ninja) for DeepSpeed's op builds; returns the cache.

    Every process that starts DeepSpeed imports this module first (scripts/setup.sh too), so all of them build into
    and load from the same per-environment cache (`op_cache_dir`) with the same ninja: the interpreter's own, first
    on PATH. The venv's ninja (pip) and a system one log build commands differently, so a run from an activated venv
    and one from `.venv/bin/pretrain` rebuilt each other's cached op (~80 s per start on 2 cores).
    """
    if not torch.cuda.is_available():
        environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator when first imported
    bin_dir = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(bin_dir, "ninja")) and environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        environ["PATH"] = os.pathsep.join([bin_dir, environ.get("PATH", "")])
    environ[OP_CACHE_VAR] = op_cache_dir(environ, sys.prefix, writable=os.access(sys.prefix, os.W_OK),
                                         user_cache=get_default_build_root())
    if os.path.isdir(environ[OP_CACHE_VAR]):
        for name in os.listdir(environ[OP_CACHE_VAR]):
            if os.path.isdir(os.path.join(environ[OP_CACHE_VAR], name)):
                clear_stale_build_lock(os.path.join(environ[OP_CACHE_VAR], name), now=time.time())
    return environ[OP_CACHE_VAR]


prepare_op_build()

import deepspeed
import torch.distributed as tdist
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import groups
from deepspeed.utils.tensor_fragment import fragment_address
from torch import nn

from pretrain import dist
from pretrain.config.pretraining import EngineConfig, OptimConfig
from pretrain.errors import CheckpointError, SetupError
from pretrain.models.moe import MoEMlp
from pretrain.models.moe_losses import expert_layers, moe_modules
from pretrain.parallel.ds_moe import DeepSpeedMoEMlp
from pretrain.parallel.expert_parallel import ExpertComm, apply_expert_parallel, make_stats_reducer

logger = logging.getLogger(__name__)

STEPS_PER_PRINT = 1 << 30  # DeepSpeed's own progress print is off; the training loop logs


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed through DeepSpeed from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (`dist.export`);
    `timeout_s` (`engine.timeout_s`) bounds the rendezvous and every collective (`dist.rendezvous`)."""
    with dist.rendezvous(timeout_s):
        deepspeed.init_distributed(dist_backend=dist.resolve_backend(backend), auto_mpi_discovery=False,
                                   verbose=False, timeout=datetime.timedelta(seconds=timeout_s))


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert-parallel group family (also the `moe=True` optimizer group name)."""
    return f"ep_size_{ep_size}"


def make_ds_config(engine: EngineConfig, optim: OptimConfig, *, max_steps: int, world_size: int) -> dict:
    """The DeepSpeed JSON for this run, generated from the config (never hand-kept).

    Batches are per task and vary in size, so DeepSpeed's batch bookkeeping is nominal: one "micro-batch" is one
    task batch per rank (`train_micro_batch_size_per_gpu=1`) and `gradient_accumulation_steps = engine.grad_accum`
    task micro-batches make an optimizer step. The loss is an average per micro-batch, which DeepSpeed divides by
    the accumulation steps. WarmupCosineLR's values are ratios of the optimizer's lr; `warmup_steps=0` becomes a
    warmup starting at ratio 1 (DeepSpeed requires a positive warmup length).
    """
    o, e = optim, engine
    warmup = max(o.warmup_steps, 1)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": e.grad_accum,
        "train_batch_size": e.grad_accum * world_size,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": False},
        # ZeRO-2 with MoE asserts contiguous gradients and reduce-scatter (stage_1_and_2._configure_moe_settings)
        "zero_optimization": {"stage": e.zero_stage, "contiguous_gradients": True, "reduce_scatter": True},
        "checkpoint": {"tag_validation": "Fail"},
    }
    if o.schedule == "poly":
        return config  # WarmupPolyLR is passed to deepspeed.initialize (DeepSpeed has no polynomial schedule)
    config["scheduler"] = {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": max_steps,
            "warmup_min_ratio": 0.0 if o.warmup_steps > 0 else 1.0,
            "warmup_num_steps": warmup,
            "warmup_type": "linear",
            "cos_min_ratio": o.min_lr_ratio,
        },
    }
    return config


class WarmupPolyLR:
    """lr = base · w(s) · (1 − s/S)^power, w a linear warmup from 0 over `warmup_num_steps` (1 when 0): the poly
    schedule of the dense multi-task references (MLoRE/TaskPrompter: power 0.9, no warmup).

    Follows DeepSpeed's scheduler interface (`step(last_batch_iteration)`, `get_lr`, `last_batch_iteration`,
    `state_dict`), so the engine checkpoints and resumes it like its own schedules.
    """

    def __init__(self, optimizer, *, total_num_steps: int, warmup_num_steps: int, power: float) -> None:
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.total, self.warmup, self.power = total_num_steps, warmup_num_steps, power
        self.last_batch_iteration = -1

    def factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else 1.0
        return warm * max(0.0, 1.0 - step / self.total) ** self.power

    def get_lr(self) -> list[float]:
        return [lr * self.factor(max(self.last_batch_iteration, 0)) for lr in self.base_lrs]

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def step(self, last_batch_iteration: int | None = None) -> None:
        self.last_batch_iteration = self.last_batch_iteration + 1 if last_batch_iteration is None \
            else last_batch_iteration
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict) -> None:
        self.last_batch_iteration = int(state["last_batch_iteration"])


def stacked_expert_params(model: nn.Module) -> set[int]:
    """ids of the parameters stacked over experts (leading dim E_local) under native `MoEMlp.experts` children."""
    return {id(p) for m in model.modules() if isinstance(m, MoEMlp) for p in m.experts.parameters()}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: decayed weights, un-decayed rest, each split into dense and `moe=True` expert groups.

    No weight decay for biases and norms (1-D per parameter; per expert for stacked expert tensors, so expert
    biases [E, H] count as 1-D) and for `model.no_weight_decay()` names (position embedding, class token, task
    embedding). Every group has a `name` (DeepSpeed's splitter requires it); expert params must already be marked
    (`apply_expert_marking`) to land in the `ep_size_{N}` groups.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    stacked = stacked_expert_params(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        per_item_ndim = p.ndim - 1 if id(p) in stacked else p.ndim
        (no_decay if per_item_ndim <= 1 or name in skip else decay).append(p)
    groups_ = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
               {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer([g for g in groups_ if g["params"]])


class DeepSpeedMoEMarker(MoE):
    """Parameter-free `MoE` instance that switches on DeepSpeed's MoE handling for our native expert params.

    `set_deepspeed_parallelism` (called by the engine on every module that has it) only makes sure the EP groups
    exist; `num_local_experts = 0` keeps DeepSpeed's expert checkpoint loops empty for it.
    """

    def __init__(self, *, ep_size: int, num_experts: int) -> None:
        nn.Module.__init__(self)  # MoE.__init__ would build experts and a gate
        self.group_ep_size = ep_size  # not `ep_size`: layers with ep_size > 1 get an ExpertComm injected
        self.num_experts = num_experts
        self.num_local_experts = 0
        self.expert_group_name = expert_group_name(ep_size)
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        ensure_expert_groups(self.group_ep_size, use_data_before_expert_parallel_)

    def forward(self, *args, **kwargs):
        raise RuntimeError("DeepSpeedMoEMarker is a marker for DeepSpeed's engine and has no forward")


def ensure_expert_groups(ep_size: int, data_before_expert: bool = False) -> None:
    """Create DeepSpeed's expert-parallel and expert-data-parallel groups for `ep_size` once (collective)."""
    if expert_group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size, use_data_before_expert_parallel_=data_before_expert)


def apply_expert_marking(model: nn.Module, *, ep_size: int) -> int:
    """Mark native expert params as DeepSpeed expert params and attach the marker; returns the marked count.

    Frozen experts (fine-tuning with the backbone frozen) are left unmarked: they are in no optimizer group, and
    ZeRO refuses a model with MoE layers whose optimizer holds no expert group.
    """
    layers = [m for m in model.modules()
              if isinstance(m, MoEMlp) and any(p.requires_grad for p in m.experts.parameters())]
    for m in layers:
        for p in m.experts.parameters():
            p.allreduce = False
            p.group_name = expert_group_name(ep_size)
    if layers:
        model.ds_moe_marker = DeepSpeedMoEMarker(ep_size=ep_size, num_experts=layers[0].num_experts)
    return sum(1 for m in layers for _ in m.experts.parameters())


def check_expert_layers(model: nn.Module, *, ep_size: int, ep_rank: int) -> int:
    """Raise unless every expert layer was built for this rank's place; returns the number of expert layers."""
    layers = expert_layers(model)
    for name, m in layers:
        if (m.ep_size, m.ep_rank) != (ep_size, ep_rank):
            raise ValueError(f"MoE layer {name} was built with ep_size={m.ep_size}, ep_rank={m.ep_rank} but this rank "
                             f"needs ep_size={ep_size}, ep_rank={ep_rank}: build the model with "
                             "moe_mlp_layer=moe_mlp_factory(cfg, rank=RANK)")
    return len(layers)


def _wire_expert_parallel(model: nn.Module, *, ep_size: int, world_size: int) -> None:
    """EP groups, layer checks, expert marking, and comm / stats-reducer injection (before `deepspeed.initialize`)."""
    ensure_expert_groups(ep_size)
    name = expert_group_name(ep_size)
    check_expert_layers(model, ep_size=ep_size, ep_rank=groups._get_expert_parallel_rank(name))
    reducer = make_stats_reducer(None) if world_size > 1 else None  # data-parallel world = all ranks (no TP/PP)
    if any(isinstance(m, DeepSpeedMoEMlp) for m in model.modules()):
        for _, m in moe_modules(model):  # DeepSpeed's MoE layers bring their own all-to-all and marking
            m.stats_reducer = reducer
        return
    apply_expert_marking(model, ep_size=ep_size)
    comm = ExpertComm(groups._get_expert_parallel_group(name)) if ep_size > 1 else None
    apply_expert_parallel(model, comm=comm, stats_reducer=reducer)


# What DeepSpeed's own checkpoint files pickle besides tensors and containers (ZeRO-0/1/2, fp32/bf16, both MoE
# backends: every file the test suite's runs write loads with exactly these).
DS_SAFE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True`: resuming never runs pickled code."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(DS_SAFE_GLOBALS):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(f"{path}: refused to load, it pickles more than tensors and DeepSpeed's plain "
                                   f"state classes (a tampered or foreign checkpoint?): {exc}") from exc


def build_engine(model: nn.Module, *, engine: EngineConfig, optim: OptimConfig, max_steps: int,
                 world_size: int) -> deepspeed.DeepSpeedEngine:
    """Wire expert parallelism into `model`, build AdamW over `param_groups`, and return the DeepSpeed engine.

    torch.distributed must be initialised (`init_distributed`). The lr schedule is advanced once so that
    optimizer step s (0-based) runs at schedule iteration s (DeepSpeed's scheduler starts at iteration -1).
    """
    e, o = engine, optim
    if e.ep_size > 1 and e.zero_stage == 0 and o.grad_clip > 0:
        raise SetupError("engine.zero_stage=0 with engine.ep_size>1 clips by DeepSpeed's per-rank norm average, which "
                         "is wrong when ranks hold different experts: use zero_stage 1 or 2, or optim.grad_clip=0")
    if world_size % e.ep_size:
        raise SetupError(f"engine.ep_size={e.ep_size} must divide the world size {world_size} (the number of "
                         "processes): launch a multiple of ep_size processes, or set engine.ep_size to a divisor")
    if not tdist.is_initialized():
        raise RuntimeError("build_engine needs torch.distributed initialised: call engine.init_distributed first")
    if tdist.get_world_size() != world_size:
        raise SetupError(f"world_size={world_size} but torch.distributed has {tdist.get_world_size()} ranks")
    _wire_expert_parallel(model, ep_size=e.ep_size, world_size=world_size)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    ds_config = make_ds_config(e, o, max_steps=max_steps, world_size=world_size)
    scheduler = None
    if o.schedule == "poly":
        scheduler = functools.partial(WarmupPolyLR, total_num_steps=max_steps, warmup_num_steps=o.warmup_steps,
                                      power=o.poly_power)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                              lr_scheduler=scheduler)
    if type(ds_engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError("expected DeepSpeed's TorchCheckpointEngine, got "
                           f"{type(ds_engine.checkpoint_engine).__name__}")
    ds_engine.checkpoint_engine = WeightsOnlyCheckpointEngine(ds_engine._config)
    ds_engine.lr_scheduler.step()
    logger.info("DeepSpeed engine: ZeRO-%d, %s, ep_size=%d, world=%d, grad_accum=%d", e.zero_stage, e.precision,
                e.ep_size, world_size, e.grad_accum)
    return ds_engine
