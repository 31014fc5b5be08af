"""Experts under global ids: which expert tensors a rank holds, the `experts_ep{r}.safetensors` it writes with a
CRC-32 per expert, and the reader that checks every expert it hands out against that checksum.

A global key names one expert of one layer whatever the ep_size: `<layer>.experts.<param>.<id>` (native `MoEMlp`,
one slice of a stacked parameter) or `<layer>.deepspeed_moe.experts.deepspeed_experts.<id>.<param>` (DeepSpeed
backend). The expert-data-parallel rank 0 of EP rank r writes its experts into `experts_ep{r}.safetensors` with
`{key: CRC-32}` in the file's metadata (`integrity.EXPERT_CRC_KEY`), computed from the tensors it held in memory. The
manifest's file CRC proves a file is the one written; the per-expert CRC proves that the tensor read under a key is
the expert that was saved under it, so a file whose slices were exchanged (a faulty save, a hand edit, a tool that
renumbered experts) is refused naming the layer, the expert and the file instead of loading experts into the wrong
slots (DeepSpeed reports such mix-ups under EP: deepspeedai/DeepSpeed#6589).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from pretrain.durable import honour_umask
from pretrain.errors import CheckpointError, one_line
from pretrain.runs.integrity import EXPERT_CRC_KEY, tensor_crc32
from pretrain.models.moe import MoEMlp
from pretrain.models.moe_losses import expert_layers

_NATIVE_KEY = re.compile(r"(?P<layer>.+)\.experts\.[^.]+\.(?P<gid>\d+)$")
_DS_KEY = re.compile(r"(?P<layer>.+)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<gid>\d+)\.")


def expert_prefix(name: str, layer: nn.Module) -> str:
    """The state-dict prefix of layer `name`'s expert tensors."""
    return f"{name}.experts." if isinstance(layer, MoEMlp) else f"{name}.deepspeed_moe.experts."


def expert_slots(model: nn.Module) -> list[tuple[str, nn.Parameter, int | None]]:
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


def expert_id(key: str) -> tuple[str, int]:
    """(layer name, global expert id) of a global expert key (either backend's layout)."""
    match = _NATIVE_KEY.match(key) or _DS_KEY.match(key)
    if match is None:
        raise ValueError(f"{key!r} is not a global expert key")
    return match.group("layer"), int(match.group("gid"))


def local_expert_tensors(model: nn.Module) -> dict[str, Tensor]:
    """This rank's expert tensors under their global keys (copies, CPU, contiguous)."""
    return {key: (p.detach()[i] if i is not None else p.detach()).cpu().clone()
            for key, p, i in expert_slots(model)}


def write_experts(model: nn.Module, tag_dir: Path, *, ep_size: int, ep_rank: int, step: int) -> Path:
    """`experts_ep{ep_rank}.safetensors`: this rank's experts under global keys, a CRC-32 per expert in the
    metadata. Returns the path."""
    experts = local_expert_tensors(model)
    path = tag_dir / f"experts_ep{ep_rank}.safetensors"
    crcs = json.dumps({key: tensor_crc32(value) for key, value in experts.items()})
    save_file(experts, str(path), metadata={"ep_size": str(ep_size), "ep_rank": str(ep_rank), "step": str(step),
                                            EXPERT_CRC_KEY: crcs})
    honour_umask(path)
    return path


class ExpertFiles(contextlib.ExitStack):
    """Lazy reader over a tag's `experts_ep*.safetensors` (or the files `pattern` matches: the optimizer state,
    `pretrain.runs.elastic_state`), reading only the tensors asked for; a context manager.

    `read` checks each tensor against the CRC-32 its writer recorded under the same key (files written before
    per-expert checksums existed, and files without them, are read unchecked).
    """

    def __init__(self, tag_dir: Path, pattern: str = "experts_ep*.safetensors") -> None:
        super().__init__()
        self.tag_dir, self.pattern = tag_dir, pattern
        self._where: dict[str, object] = {}
        self._crc: dict[str, int] = {}
        for path in sorted(tag_dir.glob(pattern)):
            try:
                handle = self.enter_context(safe_open(str(path), framework="pt"))
                self._crc.update(json.loads((handle.metadata() or {}).get(EXPERT_CRC_KEY, "{}")))
            except Exception as exc:  # SafetensorError (truncated header, bad JSON) or OSError
                raise CheckpointError(f"{path}: unreadable expert file ({one_line(exc)}): the checkpoint is "
                                      "truncated or corrupt") from exc
            self._where.update(dict.fromkeys(handle.keys(), (handle, path)))

    def keys(self) -> set[str]:
        return set(self._where)

    def read(self, key: str) -> Tensor:
        if key not in self._where:
            raise CheckpointError(f"tensor {key!r} is in no {self.tag_dir}/{self.pattern}")
        handle, path = self._where[key]
        try:
            value = handle.get_tensor(key)
        except Exception as exc:  # a truncated data section
            raise CheckpointError(f"{path}: cannot read {key} ({one_line(exc)}): the file is truncated or "
                                  "corrupt") from exc
        if key in self._crc and tensor_crc32(value) != self._crc[key]:
            layer, gid = expert_id(key)
            raise CheckpointError(f"{path}: expert {gid} of layer {layer} ({key}) is not the expert saved under this "
                                  "id (its per-expert checksum differs): the file's expert slices were exchanged or "
                                  "corrupted; restore the checkpoint from a copy")
        return value


def load_local_experts(model: nn.Module, read: Callable[[str], Tensor]) -> None:
    """Copy this rank's experts from `read(global key)` into the model (any ep_size that divides E)."""
    with torch.no_grad():
        for key, p, i in expert_slots(model):
            target = p[i] if i is not None else p
            value = read(key)
            if value.shape != target.shape:
                raise CheckpointError(f"expert tensor {key}: checkpoint shape {tuple(value.shape)} != model "
                                      f"{tuple(target.shape)}")
            target.copy_(value)
