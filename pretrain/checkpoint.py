"""Checkpoints: DeepSpeed state + every expert under global ids + per-rank state; atomic `latest`; keep last K.

Layout of `<ckpt_dir>/step_{step:08d}/` (the tag):
- DeepSpeed's files (`engine.save_checkpoint(..., save_latest=False)`): `mp_rank_00_model_states.pt` (non-expert
  weights and buffers, rank 0's local native experts, `client_state`, lr schedule, step counters),
  `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt` (ZeRO-1/2: fp32 masters + Adam moments per rank) or
  `expp_rank_{r}_mp_rank_00_optim_states.pt` (ZeRO-0), and for `moe.backend: deepspeed` its per-expert files.
- `experts_ep{r}.safetensors`: written by the expert-data-parallel rank 0 of EP rank r; this rank's experts under
  GLOBAL ids, keys `<layer>.experts.<param>.<id>` (native, one slice of the stacked tensor per expert) or
  `<layer>.deepspeed_moe.experts.deepspeed_experts.<id>.<param>` (DeepSpeed backend). Together the files hold
  every expert for any ep_size, and any ep_size dividing E can load them.
- `rank_{r:05d}.json` + `rank_{r:05d}.safetensors`: this rank's `rank_state` (RNG states, stream position...):
  tensors in safetensors, the rest in JSON. DeepSpeed saves `client_state` from DP rank 0 only and no RNG state.
- `pretrain_meta.json`: step, world size, ep_size. `client_state` sits under one key of DeepSpeed's model file.

Commit protocol: every rank writes its files, barrier, rank 0 fsyncs the tag and replaces `<ckpt_dir>/latest`
(the file DeepSpeed reads: the tag, no newline) atomically (tmp + fsync + os.replace + directory fsync), then
prunes. A kill at any moment leaves `latest` on a complete tag; tags it does not point to are never loaded and
are removed by the next save. Nothing is unpickled: `load_model_weights` reads DeepSpeed's model file with
`weights_only=True` (client_state must therefore be JSON-like), and resuming goes through DeepSpeed's loader with
the weights-only checkpoint engine that `engine.build_engine` installs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pretrain.durable import atomic_write, fsync_path
from pretrain.models.moe import MoEMlp
from pretrain.models.moe_losses import expert_layers

logger = logging.getLogger(__name__)

LATEST = "latest"
META = "pretrain_meta.json"
CLIENT_KEY = "pretrain_client_state"
MODEL_FILE = "mp_rank_00_model_states.pt"
TAG_RE = re.compile(r"step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------- experts under global ids


def _expert_prefix(name: str, layer: nn.Module) -> str:
    return f"{name}.experts." if isinstance(layer, MoEMlp) else f"{name}.deepspeed_moe.experts."


def _expert_slots(model: nn.Module) -> list[tuple[str, nn.Parameter, int | None]]:
    """(global key, parameter, local index into a stacked parameter or None) for every local expert tensor."""
    slots = []
    for name, m in expert_layers(model):
        first = m.ep_rank * m.num_local_experts
        if isinstance(m, MoEMlp):
            for pname, p in m.experts.named_parameters():
                slots += [(f"{name}.experts.{pname}.{first + i}", p, i) for i in range(m.num_local_experts)]
        else:
            for i, expert in enumerate(m.deepspeed_moe.experts.deepspeed_experts):
                slots += [(f"{name}.deepspeed_moe.experts.deepspeed_experts.{first + i}.{pname}", p, None)
                          for pname, p in expert.named_parameters()]
    return slots


def local_expert_tensors(model: nn.Module) -> dict[str, Tensor]:
    """This rank's expert tensors under their global keys (copies, CPU, contiguous)."""
    return {key: (p.detach()[i] if i is not None else p.detach()).cpu().clone()
            for key, p, i in _expert_slots(model)}


class ExpertFiles(contextlib.ExitStack):
    """Lazy reader over a tag's `experts_ep*.safetensors` (reads only the tensors asked for); a context manager."""

    def __init__(self, tag_dir: Path) -> None:
        super().__init__()
        self.tag_dir = tag_dir
        self._where: dict[str, object] = {}
        for path in sorted(tag_dir.glob("experts_ep*.safetensors")):
            handle = self.enter_context(safe_open(str(path), framework="pt"))
            self._where.update(dict.fromkeys(handle.keys(), handle))

    def keys(self) -> set[str]:
        return set(self._where)

    def read(self, key: str) -> Tensor:
        if key not in self._where:
            raise KeyError(f"expert tensor {key!r} is in no experts_ep*.safetensors of {self.tag_dir}")
        return self._where[key].get_tensor(key)


def load_local_experts(model: nn.Module, read: Callable[[str], Tensor]) -> None:
    """Copy this rank's experts from `read(global key)` into the model (any ep_size that divides E)."""
    with torch.no_grad():
        for key, p, i in _expert_slots(model):
            target = p[i] if i is not None else p
            value = read(key)
            if value.shape != target.shape:
                raise ValueError(f"expert tensor {key}: checkpoint shape {tuple(value.shape)} != model "
                                 f"{tuple(target.shape)}")
            target.copy_(value)


def load_module_state(src: dict[str, Tensor], dst: nn.Module, *, tag_dir: Path, all_experts: bool) -> None:
    """Load non-expert tensors of `src` strictly and the experts from the tag's expert files.

    Args:
        src: a module state dict (DeepSpeed's `module`); its expert entries (local, rank 0's) are ignored.
        dst: the model (any ep_size); raises naming missing/unexpected keys.
        all_experts: also require the files to hold no expert the model lacks (single-process export).
    """
    prefixes = tuple(_expert_prefix(n, m) for n, m in expert_layers(dst))  # () matches nothing
    result = dst.load_state_dict({k: v for k, v in src.items() if not k.startswith(prefixes)}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint {tag_dir} does not match the model: missing keys {missing}, unexpected keys "
                           f"{result.unexpected_keys}")
    with ExpertFiles(tag_dir) as files:
        extra = files.keys() - {key for key, _, _ in _expert_slots(dst)}
        if all_experts and extra:
            raise RuntimeError(f"checkpoint {tag_dir} has experts the model lacks: {sorted(extra)}")
        load_local_experts(dst, files.read)


# ---------------------------------------------------------------- per-rank state (JSON + safetensors)


def capture_rng() -> dict:
    """This process's torch (CPU and CUDA), numpy and Python RNG states as a `rank_state` dict."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"rng.torch": torch.get_rng_state(), "rng.numpy.keys": torch.from_numpy(keys.astype(np.int64)),
             "rng.numpy": [int(pos), int(has_gauss), float(cached)],
             "rng.python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def restore_rng(state: dict) -> None:
    """Restore the RNG states `capture_rng` put into `state` (other keys are ignored)."""
    if "rng.torch" not in state:
        raise KeyError(f"rank state has no RNG (keys {sorted(state)}): save it with rank_state=capture_rng()")
    torch.set_rng_state(state["rng.torch"])
    pos, has_gauss, cached = state["rng.numpy"]
    np.random.set_state(("MT19937", state["rng.numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["rng.python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda_keys = sorted((k for k in state if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda = [state[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _json_only(what: str, state: dict) -> None:
    for key, value in state.items():
        try:
            json.dumps(value)
        except TypeError:
            raise TypeError(f"{what}[{key!r}] is a {type(value).__name__}: checkpoints take tensors (rank_state only) "
                            "and JSON values") from None


def write_rank_state(tag_dir: Path, rank: int, state: dict) -> None:
    """`rank_{r}.safetensors` (the tensors of `state`) and `rank_{r}.json` (everything else)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, Tensor)}
    plain = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
    _json_only("rank_state", plain)
    save_file(tensors, str(tag_dir / f"rank_{rank:05d}.safetensors"))
    (tag_dir / f"rank_{rank:05d}.json").write_text(json.dumps({"rank": rank, "state": plain}))


def read_rank_state(tag_dir: Path, rank: int) -> dict:
    """The state `write_rank_state` wrote for `rank`."""
    plain = json.loads((tag_dir / f"rank_{rank:05d}.json").read_text())["state"]
    return {**plain, **load_file(str(tag_dir / f"rank_{rank:05d}.safetensors"))}


# ---------------------------------------------------------------- the `latest` pointer and pruning




def read_latest(ckpt_dir: str | Path) -> str | None:
    """The committed tag, or None when there is no `latest`; raises if it names a missing tag directory."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / LATEST).is_file():
        return None
    tag = (ckpt_dir / LATEST).read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise RuntimeError(f"{ckpt_dir / LATEST} names tag {tag!r}, but {ckpt_dir / tag} does not exist")
    return tag


def write_latest(ckpt_dir: str | Path, tag: str) -> None:
    """Point `latest` at `tag` atomically: a crash leaves either the old or the new pointer, never a partial one."""
    atomic_write(Path(ckpt_dir) / LATEST, tag)


def prune(ckpt_dir: str | Path, keep_last: int) -> list[str]:
    """Remove all but the `keep_last` newest committed tags, and every tag newer than `latest` (a killed save).

    Only `step_XXXXXXXX` directories are touched. Returns the removed tags.
    """
    ckpt_dir = Path(ckpt_dir)
    latest = read_latest(ckpt_dir)
    if latest is None or not TAG_RE.match(latest):
        return []
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    committed = [t for t in tags if t <= latest]
    doomed = committed[:-keep_last] + [t for t in tags if t > latest]
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag)
    return doomed


# ---------------------------------------------------------------- save / load


def _expert_parallel(engine, model: nn.Module) -> tuple[int, int, bool]:
    """(ep_size, ep_rank, writes this EP rank's expert file) from the layers and DeepSpeed's expert-DP group."""
    layers = expert_layers(model)
    sizes = {m.ep_size for _, m in layers}
    if len(sizes) > 1:
        raise ValueError(f"MoE layers disagree on ep_size: {sorted(sizes)}")
    if not layers:
        return 1, 0, False
    ep_size, ep_rank = sizes.pop(), layers[0][1].ep_rank
    group = engine.expert_data_parallel_group.get(f"ep_size_{ep_size}")
    return ep_size, ep_rank, tdist.get_rank(group=group) == 0


def save(engine, ckpt_dir: str | Path, step: int, *, client_state: dict, rank_state: dict, keep_last: int) -> Path:
    """Collective: write tag `step_{step:08d}` (DeepSpeed state, expert files, per-rank state), commit `latest`,
    prune to `keep_last` tags. Returns the tag directory. A tag already committed is left as it is."""
    ckpt_dir = Path(ckpt_dir)
    tag, rank = tag_for(step), tdist.get_rank()
    tag_dir = ckpt_dir / tag
    _json_only("client_state", client_state)
    if read_latest(ckpt_dir) == tag:
        logger.warning("checkpoint %s is already committed; not overwriting it", tag_dir)
        return tag_dir
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # left by a save that was killed before its commit
    tdist.barrier()
    # one namespaced key: DeepSpeed merges client_state into its own top-level dict (`global_steps`, `module`...)
    engine.save_checkpoint(str(ckpt_dir), tag, client_state={CLIENT_KEY: client_state}, save_latest=False)
    ep_size, ep_rank, expert_writer = _expert_parallel(engine, engine.module)
    if expert_writer:
        save_file(local_expert_tensors(engine.module), str(tag_dir / f"experts_ep{ep_rank}.safetensors"),
                  metadata={"ep_size": str(ep_size), "ep_rank": str(ep_rank), "step": str(step)})
    write_rank_state(tag_dir, rank, rank_state)
    if rank == 0:
        meta = {"step": step, "world_size": tdist.get_world_size(), "ep_size": ep_size}
        (tag_dir / META).write_text(json.dumps(meta, indent=1))
    tdist.barrier()
    if rank == 0:
        for path in tag_dir.iterdir():
            fsync_path(path)
        write_latest(ckpt_dir, tag)
        removed = prune(ckpt_dir, keep_last)
        logger.info("saved checkpoint %s%s", tag_dir, f" (removed {', '.join(removed)})" if removed else "")
    tdist.barrier()
    return tag_dir


def load_latest(engine, ckpt_dir: str | Path) -> tuple[int, dict, dict] | None:
    """Resume from the committed tag: (step, client_state, rank_state), or None without a checkpoint.

    Same world size and ep_size: everything (weights, optimizer moments and fp32 masters, lr schedule, step
    counters). Otherwise weights, lr schedule and counters only (optimizer state restarts; logged), and ranks
    beyond the old world take rank 0's rank_state.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None
    tag_dir = ckpt_dir / tag
    if not (tag_dir / META).is_file():
        raise FileNotFoundError(f"{tag_dir / META} is missing: {tag_dir} was not written by pretrain.checkpoint.save")
    meta = json.loads((tag_dir / META).read_text())
    rank, world = tdist.get_rank(), tdist.get_world_size()
    ep_size = _expert_parallel(engine, engine.module)[0]
    same = (meta["world_size"], meta["ep_size"]) == (world, ep_size)
    if not same:
        logger.warning("checkpoint %s was saved with world size %d, ep_size %d; now %d, %d: loading weights, lr "
                       "schedule and step counters; optimizer state restarts", tag_dir, meta["world_size"],
                       meta["ep_size"], world, ep_size)
    load_fn = functools.partial(load_module_state, tag_dir=tag_dir, all_experts=False)
    path, client = engine.load_checkpoint(str(ckpt_dir), tag, load_optimizer_states=same,
                                          load_lr_scheduler_states=True, custom_load_fn=load_fn)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {tag_dir}")
    engine.lr_scheduler.step(engine.lr_scheduler.last_batch_iteration)  # optimizer lr = restored schedule point
    source = rank if rank < meta["world_size"] else 0
    if source != rank:
        logger.warning("rank %d uses rank 0's saved rank_state (checkpoint world size %d)", rank, meta["world_size"])
    return meta["step"], client[CLIENT_KEY], read_rank_state(tag_dir, source)


def load_model_weights(ckpt_dir_or_tag: str | Path, model: nn.Module) -> Path:
    """Load a checkpoint (a run's checkpoint dir → its `latest`, or a tag dir) into a plain model, no DeepSpeed.

    Works for any ep_size the checkpoint was saved with and any ep_size of `model` (typically 1, one process).
    Strict: raises naming missing/unexpected keys. Returns the tag directory read.
    """
    path = Path(ckpt_dir_or_tag)
    tag = read_latest(path)
    tag_dir = path / tag if tag is not None else path
    if not (tag_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{tag_dir / MODEL_FILE} not found: pass a checkpoint dir with `latest` or a tag dir")
    state = torch.load(tag_dir / MODEL_FILE, map_location="cpu", weights_only=True)["module"]
    load_module_state(state, model, tag_dir=tag_dir, all_experts=True)
    return tag_dir
