"""Layout-free optimizer state: what lets a checkpoint resume at another world size or ep_size with its optimizer.

DeepSpeed's optimizer files hold each rank's flat partition of the fp32 master weights and Adam moments, laid out
for the world size, ep_size and parameter groups that wrote them: DeepSpeed refuses them at another data-parallel
size, fails at another ep_size, and its converters (`ds_to_universal.py`, `zero_to_fp32.py`) fail on native MoE
(stack.md). So every checkpoint also holds, beside DeepSpeed's files (`checkpoint.save`):
- `optim_dense.safetensors` (rank 0): for every trainable non-expert parameter `<name>` (its `named_parameters`
  name), `<name>.fp32` (the fp32 master), `<name>.exp_avg`, `<name>.exp_avg_sq` (the Adam moments) and
  `<name>.step` (its Adam step count, a scalar), full tensors in the parameter's shape;
- `optim_experts_ep{r}.safetensors` (the expert-data-parallel rank 0 of EP rank r): the same four entries for each
  of its experts, under the expert's GLOBAL key of `experts_ep{r}.safetensors` (`<layer>.experts.w1.<id>`: one
  slice of a stacked parameter), so any ep_size dividing E can take its share.
Before the optimizer's first step only the `.fp32` entries exist. Where the full tensors come from depends on what
DeepSpeed wrapped the torch AdamW in (`_access`): ZeRO-1/2 keep one flat fp32 partition per parameter group on each
rank, and the tensor-fragment API that DeepSpeed attaches to every parameter maps a parameter to its slice
(`param.get_full_hp_param(key)` all-reduces the full tensor over the parameter's ZeRO group, which for experts is the
expert-data-parallel group; `set_full_hp_param` copies this rank's slice, no communication: the calls behind
`deepspeed.utils.safe_get_full_optimizer_state` / `safe_set_full_optimizer_state`). ZeRO-0 keeps everything on
every rank, per parameter: with bf16 in DeepSpeed's FP16_UnfusedOptimizer (an fp32 copy per parameter), with fp32
in the torch optimizer (the parameter is its own master). Another optimizer (none this project builds) gets a
warning at save time and no layout-free state: its checkpoints resume at another layout with a fresh optimizer.

Loading (`load_state`, only when the layout changed: the same layout takes DeepSpeed's own files, bit-exact) runs
after DeepSpeed loaded the weights, the lr schedule and the step counters, and copies every value: the state after
the resume equals the saved state bit for bit, re-sliced for the new ranks. Training on differs from an
uninterrupted run only by the order in which other ranks sum gradients (tests/test_elastic.py measures it).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from pretrain.durable import honour_umask
from pretrain.errors import CheckpointError
from pretrain.runs.expert_files import ExpertFiles, expert_slots

logger = logging.getLogger(__name__)

DENSE_FILE = "optim_dense.safetensors"
EXPERT_FILE = "optim_experts_ep{}.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")


class _Fragments:
    """ZeRO-1/2 (and DeepSpeed's BF16_Optimizer): a flat fp32 partition per group, DeepSpeed's fragment API."""

    collective = True  # reading a full tensor is an all-reduce: every rank reads every parameter, in one order

    def __init__(self, opt, lp_groups: list[list[nn.Parameter]], flats: list[Tensor]) -> None:
        self.opt, self.base, self.flats = opt, opt.optimizer, flats
        self.flat_of = {id(p): flat for lps, flat in zip(lp_groups, flats) for p in lps}
        self.steps: dict[int, list[Tensor]] = {}

    def stepped(self) -> bool:
        return all(self.base.state.get(flat) for flat in self.flats)

    def link(self) -> None:
        """Point every fragment at the current moment tensors (DeepSpeed links them after the first step only,
        and a load replaces them)."""
        self.opt._hp_optimizer_states_linked = False
        self.opt._lazy_init_hp_params_optimizer_state()

    def get(self, p: nn.Parameter, key: str) -> Tensor:
        return p.get_full_hp_param(None if key == "fp32" else key)

    def set(self, p: nn.Parameter, key: str, value: Tensor) -> None:
        p.set_full_hp_param(value.to(torch.float32), None if key == "fp32" else key)

    def step(self, p: nn.Parameter) -> Tensor:
        return self.base.state[self.flat_of[id(p)]]["step"]

    def set_step(self, p: nn.Parameter, value: Tensor) -> None:
        self.steps.setdefault(id(self.flat_of[id(p)]), []).append(value)

    def create_state(self) -> None:
        for flat in self.flats:
            if not self.base.state.get(flat):  # what torch's AdamW creates at its first step
                self.base.state[flat] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in MOMENTS}}
        self.link()

    def finish(self) -> None:
        for flat in self.flats:
            values = self.steps.get(id(flat))
            if values:
                self.base.state[flat]["step"] = _one_step(values)


class _PerParam:
    """ZeRO-0: an fp32 master and an optimizer state per parameter, whole on every rank. fp32: the torch optimizer
    itself, a parameter is its own master; bf16: DeepSpeed's FP16_UnfusedOptimizer (what it wraps a torch optimizer
    in), whose torch optimizer steps an fp32 copy of each parameter (`fp32_groups`, in `fp16_groups` order)."""

    collective = False

    def __init__(self, base: torch.optim.Optimizer, masters: dict[int, Tensor]) -> None:
        self.base, self.flat_of = base, masters

    def stepped(self) -> bool:
        return any(self.base.state.get(m) for m in self.flat_of.values())

    def link(self) -> None:
        pass

    def get(self, p: nn.Parameter, key: str) -> Tensor | None:
        master = self.flat_of[id(p)]
        return master.detach().float().clone() if key == "fp32" else self.base.state.get(master, {}).get(key)

    def step(self, p: nn.Parameter) -> Tensor | None:
        return self.base.state.get(self.flat_of[id(p)], {}).get("step")  # None: never had a gradient

    def set(self, p: nn.Parameter, key: str, value: Tensor) -> None:
        master = self.flat_of[id(p)]
        with torch.no_grad():
            if key == "fp32":
                master.copy_(value)
            else:
                self.base.state[master][key] = value.to(device=master.device, dtype=torch.float32).clone()

    def set_step(self, p: nn.Parameter, value: Tensor) -> None:
        self.base.state[self.flat_of[id(p)]]["step"] = value.to(torch.float32).clone()

    def create_state(self) -> None:
        pass

    def finish(self) -> None:
        pass


def _one_step(values: list[Tensor]) -> Tensor:
    """The step count of a flat group from its parameters' saved counts (equal unless the checkpoint came from
    ZeRO-0, where a parameter without a gradient in a step does not count it: the largest is kept, warned)."""
    if len({float(v) for v in values}) > 1:
        logger.warning("parameters saved with different Adam step counts %s share one optimizer group here: using "
                       "the largest", sorted({int(v) for v in values}))
    return max(values, key=float).to(torch.float32).clone()


def _access(engine) -> _Fragments | _PerParam | None:
    """The adapter for what DeepSpeed wrapped the torch AdamW in (duck-typed: no DeepSpeed import here), or None."""
    opt = getattr(engine, "optimizer", None)  # None: an engine without one (a test double): nothing to carry
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return _Fragments(opt, opt.bit16_groups, opt.single_partition_of_fp32_groups)
    if hasattr(opt, "fp32_groups_flat_partition"):  # BF16_Optimizer (bf16 weights, fp32 gradient accumulation)
        return _Fragments(opt, opt.bf16_groups, opt.fp32_groups_flat_partition)
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):  # ZeRO-0 bf16
        return _PerParam(opt.optimizer, {id(lp): master for lps, masters in zip(opt.fp16_groups, opt.fp32_groups)
                                         for lp, master in zip(lps, masters)})
    if isinstance(opt, torch.optim.Optimizer):  # ZeRO-0 fp32
        return _PerParam(opt, {id(p): p for group in opt.param_groups for p in group["params"]})
    return None


def _params(model: nn.Module, access) -> list[tuple[str, nn.Parameter, list[str] | None, bool]]:
    """(name, parameter, global expert keys or None, stacked?) of every optimized parameter, in one order on every
    rank: a dense parameter is saved under its name, an expert parameter under the global key of each expert it
    holds (the slices of a stacked parameter, in local order)."""
    by_param: dict[int, list[tuple[int | None, str]]] = {}
    for key, p, i in expert_slots(model):
        by_param.setdefault(id(p), []).append((i, key))
    out = []
    for name, p in model.named_parameters():
        if id(p) not in access.flat_of:
            continue  # frozen: in no optimizer group
        experts = sorted(by_param.get(id(p), []), key=lambda item: item[0] or 0)
        out.append((name, p, [key for _, key in experts] or None, bool(experts) and experts[0][0] is not None))
    return out


def save_state(engine, tag_dir: Path, *, dense_writer: bool, expert_writer: bool, ep_rank: int) -> None:
    """Collective under ZeRO-1/2: write this rank's share of the layout-free state (see the module docstring).

    Args:
        dense_writer: this rank writes `optim_dense.safetensors` (rank 0).
        expert_writer: this rank writes `optim_experts_ep{ep_rank}.safetensors` (expert-DP rank 0 of its EP rank).
    """
    access = _access(engine)
    if access is None:
        logger.warning("%s: no layout-free optimizer state written (%s is not an optimizer it knows): resuming this "
                       "checkpoint at another world size or ep_size restarts the optimizer", tag_dir,
                       type(getattr(engine, "optimizer", None)).__name__)
        return
    stepped = access.stepped()
    if stepped:
        access.link()
    keys = ("fp32", *MOMENTS) if stepped else ("fp32",)
    dense: dict[str, Tensor] = {}
    experts: dict[str, Tensor] = {}
    for name, p, expert_keys, stacked in _params(engine.module, access):
        writer = expert_writer if expert_keys else dense_writer
        if not (writer or access.collective):
            continue
        out, saved_as = (experts, expert_keys) if expert_keys else (dense, [name])
        for key in keys:
            full = access.get(p, key)  # collective under ZeRO: called on every rank
            if writer and full is not None:
                for i, global_key in enumerate(saved_as):
                    out[f"{global_key}.{key}"] = (full[i] if stacked else full).detach().cpu().contiguous()
        step = access.step(p) if stepped else None
        if writer and step is not None:
            out.update({f"{global_key}.step": step.detach().cpu().reshape(()).clone() for global_key in saved_as})
    meta = {"moments": ",".join(MOMENTS) if stepped else ""}
    for write, tensors, file_name in ((dense_writer, dense, DENSE_FILE),
                                      (expert_writer, experts, EXPERT_FILE.format(ep_rank))):
        if write:
            save_file(tensors, str(tag_dir / file_name), metadata=meta)
            honour_umask(tag_dir / file_name)


def has_state(tag_dir: Path) -> bool:
    """Whether the tag holds the layout-free optimizer state (checkpoints written before it existed do not)."""
    return (tag_dir / DENSE_FILE).is_file()


def _read_param(files: ExpertFiles, name: str, p: nn.Parameter, saved_as: list[str], stacked: bool, key: str) -> Tensor:
    """Parameter `name`'s saved `key` in its shape here (expert slices stacked in local order)."""
    parts = [files.read(f"{k}.{key}") for k in saved_as]
    value = torch.stack(parts) if stacked else parts[0]
    if value.shape != p.shape:
        raise CheckpointError(f"{files.tag_dir}: saved optimizer state {saved_as[0]}.{key} has shape "
                              f"{tuple(value.shape)}, the model's {name} {tuple(p.shape)}")
    return value


def load_state(engine, tag_dir: Path) -> dict:
    """Set this rank's fp32 masters, Adam moments and step counts from the tag's layout-free state (no
    communication). Call after `engine.load_checkpoint(..., load_optimizer_states=False)`.

    Returns {"tensors": parameters set, "experts": expert slices among them, "moments": bool, "adam_step": int|None}.
    Raises CheckpointError naming the file or key that is missing, unreadable or of the wrong shape.
    """
    access = _access(engine)
    if access is None:
        raise CheckpointError(f"{tag_dir}: cannot set the optimizer state of a {type(engine.optimizer).__name__}")
    summary = {"tensors": 0, "experts": 0, "moments": False, "adam_step": None}
    with ExpertFiles(tag_dir, pattern="optim_*.safetensors") as files:
        saved, params = files.keys(), _params(engine.module, access)
        summary["moments"] = any(f"{(keys or [name])[0]}.exp_avg" in saved for name, _, keys, _ in params)
        if summary["moments"]:
            access.create_state()
        for name, p, expert_keys, stacked in params:
            saved_as = expert_keys or [name]
            read = functools.partial(_read_param, files, name, p, saved_as, stacked)
            access.set(p, "fp32", read("fp32"))
            if f"{saved_as[0]}.exp_avg" in saved:  # ZeRO-0: a parameter that never had a gradient has none
                for key in MOMENTS:
                    access.set(p, key, read(key))
                step = files.read(f"{saved_as[0]}.step")
                access.set_step(p, step)
                summary["adam_step"] = max(summary["adam_step"] or 0, int(step))
            summary["tensors"] += 1
            summary["experts"] += len(expert_keys or ())
        access.finish()
    return summary
