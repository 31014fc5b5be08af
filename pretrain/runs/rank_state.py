"""A rank's own checkpoint state: its RNG states and whatever the loop adds (the data stream's position), as
`rank_{r:05d}.safetensors` (the tensors) + `rank_{r:05d}.json` (the rest). DeepSpeed saves `client_state` from one
rank only and no RNG state, so each rank writes this beside DeepSpeed's files (`checkpoint.save`). JSON and
safetensors only: nothing here is ever unpickled.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pretrain.durable import honour_umask
from pretrain.errors import CheckpointError, one_line


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


def json_only(what: str, state: dict) -> None:
    """Raise TypeError naming the first entry of `state` that JSON cannot hold (`what[key]` and its type)."""
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
    json_only("rank_state", plain)
    save_file(tensors, str(tag_dir / f"rank_{rank:05d}.safetensors"))
    honour_umask(tag_dir / f"rank_{rank:05d}.safetensors")
    (tag_dir / f"rank_{rank:05d}.json").write_text(json.dumps({"rank": rank, "state": plain}))


def read_rank_state(tag_dir: Path, rank: int) -> dict:
    """The state `write_rank_state` wrote for `rank`; raises CheckpointError naming an unreadable file."""
    path = tag_dir / f"rank_{rank:05d}.json"
    try:
        plain = json.loads(path.read_text())["state"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable rank state ({type(exc).__name__}: {one_line(exc)}): the "
                              "checkpoint is truncated or corrupt") from None
    path = path.with_suffix(".safetensors")
    try:
        return {**plain, **load_file(str(path))}
    except Exception as exc:  # SafetensorError, OSError
        raise CheckpointError(f"{path}: unreadable rank state ({one_line(exc)}): the checkpoint is truncated or "
                              "corrupt") from None
