"""Checkpoints: DeepSpeed state + every expert under global ids + per-rank state; atomic `latest`; keep last K.

Layout of `<ckpt_dir>/step_{step:08d}/` (the tag):
- DeepSpeed's files (`engine.save_checkpoint(..., save_latest=False)`): `mp_rank_00_model_states.pt` (non-expert
  weights and buffers, rank 0's local native experts, `client_state`, lr schedule, step counters),
  `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt` (ZeRO-1/2: fp32 masters + Adam moments per rank) or
  `expp_rank_{r}_mp_rank_00_optim_states.pt` (ZeRO-0), and for `moe.backend: deepspeed` its per-expert files.
- `experts_ep{r}.safetensors`: written by the expert-data-parallel rank 0 of EP rank r; this rank's experts under
  GLOBAL ids, keys `<layer>.experts.<param>.<id>` (native, one slice of the stacked tensor per expert) or
  `<layer>.deepspeed_moe.experts.deepspeed_experts.<id>.<param>` (DeepSpeed backend). Together the files hold
  every expert for any ep_size, and any ep_size dividing E can load them; each file's metadata holds a CRC-32 per
  expert, checked on every read (`pretrain.runs.expert_files`).
- `optim_dense.safetensors` + `optim_experts_ep{r}.safetensors`: the fp32 masters, Adam moments and step counts per
  parameter / per global expert, independent of the layout: what a resume at another world size or ep_size loads
  (`pretrain.runs.elastic_state`).
- `rank_{r:05d}.json` + `rank_{r:05d}.safetensors`: this rank's `rank_state` (RNG states, stream position...):
  tensors in safetensors, the rest in JSON (`pretrain.runs.rank_state`).
  DeepSpeed saves `client_state` from DP rank 0 only and no RNG state.
- `pretrain_meta.json`: step, world size, ep_size and `files`, the size + CRC-32 manifest of every other file of
  the tag (`pretrain.runs.integrity`). `client_state` sits under one key of DeepSpeed's model file.

Commit protocol: every rank writes its files, barrier, rank 0 lists the tag, writes the metadata with its manifest,
fsyncs the tag and replaces `<ckpt_dir>/latest` (the file DeepSpeed reads: the tag, no newline) atomically (tmp +
fsync + os.replace + directory fsync), then prunes. A kill at any moment leaves `latest` on a complete tag; tags it
does not point to are never loaded and are removed by the next save. A save that fails (disk full) removes its
partial tag and raises `DiskFullError`/`CheckpointError` with `latest` unchanged. Loading verifies the manifest and
falls back to the newest older checkpoint that verifies (`integrity.select_tag`); every read error names the file.
Nothing is unpickled: `load_model_weights` reads DeepSpeed's model file with `weights_only=True` (client_state
must therefore be JSON-like), and resuming goes through DeepSpeed's loader with the weights-only checkpoint engine
that `engine.build_engine` installs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from pretrain.durable import atomic_write, fsync_path
from pretrain.runs.elastic_state import has_state, load_state, save_state
from pretrain.errors import CheckpointError, one_line
from pretrain.runs.expert_files import (
    ExpertFiles,
    expert_id,
    expert_prefix,
    expert_slots,
    load_local_experts,
    local_expert_tensors,
    write_experts,
)
from pretrain.runs.integrity import (
    LATEST,
    META,
    TAG_RE,
    build_manifest,
    read_meta,
    read_pointer,
    save_failure,
    select_tag,
    verify_tag,
)
from pretrain.models.moe_losses import expert_layers
from pretrain.runs.rank_state import capture_rng, json_only, read_rank_state, restore_rng, write_rank_state

logger = logging.getLogger(__name__)

CLIENT_KEY = "pretrain_client_state"
MODEL_FILE = "mp_rank_00_model_states.pt"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def load_module_state(src: dict[str, Tensor], dst: nn.Module, *, tag_dir: Path, all_experts: bool,
                      skip: tuple[str, ...] = ()) -> None:
    """Load non-expert tensors of `src` strictly and the experts from the tag's expert files.

    Args:
        src: a module state dict (DeepSpeed's `module`); its expert entries (local, rank 0's) are ignored.
        dst: the model (any ep_size); raises naming missing/unexpected keys.
        all_experts: also require the files to hold no expert the model lacks (single-process export).
        skip: key prefixes left out on both sides (e.g. `heads.det.` when evaluating without detection).
    """
    prefixes = tuple(expert_prefix(n, m) for n, m in expert_layers(dst))  # () matches nothing
    skipped = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in src if skip and k.startswith(skip)})
    if skipped:
        logger.info("not loading %s from %s (not part of this model)", ", ".join(skipped), tag_dir)
    kept = {k: v for k, v in src.items() if not k.startswith(prefixes) and not (skip and k.startswith(skip))}
    result = dst.load_state_dict(kept, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(prefixes) and not (skip and k.startswith(skip))]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {tag_dir} does not match the model: missing keys {missing}, unexpected keys "
                           f"{result.unexpected_keys}")
    with ExpertFiles(tag_dir) as files:
        extra = files.keys() - {key for key, _, _ in expert_slots(dst)}
        if all_experts and extra:
            raise CheckpointError(f"checkpoint {tag_dir} has experts the model lacks: {sorted(extra)}")
        load_local_experts(dst, files.read)


# ---------------------------------------------------------------- the `latest` pointer and pruning




def read_latest(ckpt_dir: str | Path) -> str | None:
    """The committed tag, or None when there is no `latest`; raises CheckpointError if `latest` is unreadable or
    names a missing tag directory (`integrity.select_tag` falls back instead)."""
    tag, problem = read_pointer(Path(ckpt_dir))
    if problem is not None:
        raise CheckpointError(problem)
    return tag


def write_latest(ckpt_dir: str | Path, tag: str) -> None:
    """Point `latest` at `tag` atomically: a crash leaves either the old or the new pointer, never a partial one."""
    atomic_write(Path(ckpt_dir) / LATEST, tag)


def prune(ckpt_dir: str | Path, keep_last: int) -> list[str]:
    """Remove all but the `keep_last` newest committed tags, and every tag newer than `latest` (a killed save).

    Only `step_XXXXXXXX` directories are touched. Returns the removed tags.
    """
    ckpt_dir = Path(ckpt_dir)
    latest, problem = read_pointer(ckpt_dir)
    if latest is None or problem is not None or not TAG_RE.match(latest):
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


def _from_rank0(value):
    """Rank 0's `value` on every rank (decisions that read files: every rank must take the same branch)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _write_files(engine, ckpt_dir: Path, tag: str, step: int, client_state: dict, rank_state: dict) -> int:
    """This rank's files of the tag (DeepSpeed's, its experts, its rank state); returns ep_size."""
    tag_dir = ckpt_dir / tag
    # one namespaced key: DeepSpeed merges client_state into its own top-level dict (`global_steps`, `module`...)
    engine.save_checkpoint(str(ckpt_dir), tag, client_state={CLIENT_KEY: client_state}, save_latest=False)
    ep_size, ep_rank, expert_writer = _expert_parallel(engine, engine.module)
    if expert_writer:
        write_experts(engine.module, tag_dir, ep_size=ep_size, ep_rank=ep_rank, step=step)
    save_state(engine, tag_dir, dense_writer=tdist.get_rank() == 0, expert_writer=expert_writer, ep_rank=ep_rank)
    write_rank_state(tag_dir, tdist.get_rank(), rank_state)
    return ep_size


def _commit(ckpt_dir: Path, tag: str, meta: dict) -> None:
    """Rank 0, after every rank wrote: the metadata with the manifest of the tag's files, fsync, then `latest`."""
    tag_dir = ckpt_dir / tag
    atomic_write(tag_dir / META, json.dumps({**meta, "files": build_manifest(tag_dir)}, indent=1))
    for path in tag_dir.iterdir():
        fsync_path(path)
    write_latest(ckpt_dir, tag)


def save(engine, ckpt_dir: str | Path, step: int, *, client_state: dict, rank_state: dict, keep_last: int) -> Path:
    """Collective: write tag `step_{step:08d}` (DeepSpeed state, expert files, per-rank state), commit `latest`,
    prune to `keep_last` tags. Returns the tag directory. A tag already committed and intact is left as it is.

    Raises DiskFullError / CheckpointError after removing the partial tag (`latest` unchanged) when writing fails.
    """
    ckpt_dir = Path(ckpt_dir)
    tag, rank = tag_for(step), tdist.get_rank()
    tag_dir = ckpt_dir / tag
    json_only("client_state", client_state)
    intact = rank == 0 and read_pointer(ckpt_dir) == (tag, None) and verify_tag(tag_dir, require_meta=False) is None
    if _from_rank0(intact):
        logger.warning("checkpoint %s is already committed; not overwriting it", tag_dir)
        return tag_dir
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # left by a save that was killed before its commit, or a damaged committed one
    tdist.barrier()
    try:
        ep_size = _write_files(engine, ckpt_dir, tag, step, client_state, rank_state)
        tdist.barrier()
        if rank == 0:
            _commit(ckpt_dir, tag, {"step": step, "world_size": tdist.get_world_size(), "ep_size": ep_size})
    except Exception as exc:
        raise save_failure(exc, ckpt_dir, tag_dir, remove=rank == 0) from exc
    if rank == 0:
        removed = prune(ckpt_dir, keep_last)
        logger.info("saved checkpoint %s%s", tag_dir, f" (removed {', '.join(removed)})" if removed else "")
    tdist.barrier()
    return tag_dir


def _choose_tag(ckpt_dir: Path) -> str:
    """Rank 0 verifies and chooses (`integrity.select_tag`), every rank loads that tag or raises its error."""
    choice = None
    if tdist.get_rank() == 0:
        try:
            choice = ("tag", select_tag(ckpt_dir))
        except CheckpointError as exc:
            choice = ("error", str(exc))
    kind, value = _from_rank0(choice)
    if kind == "error":
        raise CheckpointError(value)
    return value


def load_latest(engine, ckpt_dir: str | Path) -> tuple[int, dict, dict] | None:
    """Resume from the committed tag: (step, client_state, rank_state), or None without a checkpoint.

    The tag `latest` names if its manifest verifies, else the newest older one that does (warned). Same world size
    and ep_size: everything through DeepSpeed's own files, bit-exact (weights, fp32 masters, Adam moments, lr
    schedule, step counters). Another layout: DeepSpeed loads weights, lr schedule and counters, and
    `pretrain.runs.elastic_state` sets the fp32 masters, Adam moments and step counts re-sliced for this layout (logged;
    a checkpoint older than that state restarts the optimizer, warned). Ranks beyond the old world take rank 0's
    rank_state. Raises CheckpointError naming the file that cannot be read.
    """
    ckpt_dir = Path(ckpt_dir)
    # lexists: a dangling `latest` link is damage to report (or fall back from), not "no checkpoint, start over"
    if not os.path.lexists(ckpt_dir / LATEST):
        return None
    tag = _choose_tag(ckpt_dir)
    tag_dir = ckpt_dir / tag
    meta = read_meta(tag_dir)
    rank, world = tdist.get_rank(), tdist.get_world_size()
    ep_size = _expert_parallel(engine, engine.module)[0]
    if not {"step", "world_size", "ep_size"} <= set(meta):
        raise CheckpointError(f"{tag_dir / META}: lacks step/world_size/ep_size (has {sorted(meta)})")
    same = (meta["world_size"], meta["ep_size"]) == (world, ep_size)
    load_fn = functools.partial(load_module_state, tag_dir=tag_dir, all_experts=False)
    try:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag, load_optimizer_states=same,
                                              load_lr_scheduler_states=True, custom_load_fn=load_fn)
        carried = load_state(engine, tag_dir) if not same and has_state(tag_dir) else None
        if not same and carried is None and hasattr(engine.optimizer, "refresh_fp32_params"):
            engine.optimizer.refresh_fp32_params()  # masters from the loaded weights (ZeRO-0 bf16 kept its own)
    except CheckpointError:
        raise
    except Exception as exc:  # torch's zip reader, DeepSpeed's loader: say which checkpoint
        raise CheckpointError(f"{tag_dir}: cannot load ({type(exc).__name__}: {one_line(exc)[:300]})") from exc
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag_dir}")
    engine.lr_scheduler.step(engine.lr_scheduler.last_batch_iteration)  # optimizer lr = restored schedule point
    if not same:
        _log_layout_change(engine, tag_dir, meta, carried)
    source = rank if rank < meta["world_size"] else 0
    if source != rank:
        logger.warning("rank %d uses rank 0's saved rank_state (checkpoint world size %d)", rank, meta["world_size"])
    return meta["step"], client[CLIENT_KEY], read_rank_state(tag_dir, source)


def _log_layout_change(engine, tag_dir: Path, meta: dict, carried: dict | None) -> None:
    """Say what a resume at another layout carried over (rank 0), or that the optimizer restarts."""
    layout = (f"checkpoint {tag_dir} was saved with world size {meta['world_size']}, ep_size {meta['ep_size']}; "
              f"now {tdist.get_world_size()}, {_expert_parallel(engine, engine.module)[0]}")
    if carried is None:
        logger.warning("%s: it has no layout-free optimizer state (written before it existed): loading weights, lr "
                       "schedule and step counters; the optimizer state restarts", layout)
    elif tdist.get_rank() == 0:
        what = ("fp32 master weights, Adam moments (exp_avg, exp_avg_sq) and Adam step counts (step "
                f"{carried['adam_step']})" if carried["moments"] else "fp32 master weights (no optimizer step yet)")
        logger.info("%s: carried over weights, %s of %d parameters (this rank's %d expert slices re-sliced by global "
                    "id), the lr schedule (lr %s) and the step counters (global step %d); from here the run differs "
                    "from an uninterrupted one only by the new layout's arithmetic (gradient reduction order, "
                    "per-rank batch shapes)", layout, what, carried["tensors"],
                    carried["experts"], ", ".join(f"{lr:.6g}" for lr in sorted(set(engine.get_lr()))),
                    engine.global_steps)


def load_model_weights(ckpt_dir_or_tag: str | Path, model: nn.Module, *, skip: tuple[str, ...] = (),
                       verify: bool = True) -> Path:
    """Load a checkpoint (a run's checkpoint dir → the tag `integrity.select_tag` picks, or a tag dir) into a
    plain model, no DeepSpeed.

    Works for any ep_size the checkpoint was saved with and any ep_size of `model` (typically 1, one process).
    Strict: raises naming missing/unexpected keys, except under the `skip` prefixes (see `load_module_state`).
    `verify`: check a tag dir's manifest first (False when the caller just chose it with `select_tag`).
    Returns the tag directory read.
    """
    path = Path(ckpt_dir_or_tag)
    if os.path.lexists(path / LATEST):
        tag_dir = path / select_tag(path)
    else:
        tag_dir = path
        problem = verify_tag(tag_dir, require_meta=False) if verify and tag_dir.is_dir() else None
        if problem:
            raise CheckpointError(f"{tag_dir}: {problem}")
    model_file = tag_dir / MODEL_FILE
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} not found: pass a checkpoint dir with `latest` or a tag dir")
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{model_file}: refused to load, it pickles more than tensors (a tampered or foreign "
                              f"checkpoint?): {one_line(exc)[:200]}") from exc
    except Exception as exc:  # PytorchStreamReader: truncated zip; KeyError: no `module`
        raise CheckpointError(f"{model_file}: unreadable ({type(exc).__name__}: {one_line(exc)[:200]}): the file is "
                              "truncated or corrupt") from exc
    load_module_state(state, model, tag_dir=tag_dir, all_experts=True, skip=skip)
    return tag_dir
