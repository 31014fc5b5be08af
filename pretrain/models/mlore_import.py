"""Import an official MLoRE checkpoint (YuqiYang213/MLoRE: `checkpoint.pth.tar`, `model` = the DDP-wrapped
`MLoREWrapper.state_dict()`) into this project's dense model: the ViT half into a `VisionTransformer`, the decoder
half into `MLoREDecoder`. `pretrain import-mlore` (finetune/init.py) builds both from a fine-tuning config and writes
them to one file that `finetune.init_from` takes.

The official ViT (models/transformers/MLoRE.py for ViT-L/S, MLoRE_vitB.py for ViT-B; timm parts, LayerNorm eps
1e-6, qkv bias) has no class token, and its position embedding lives at the training grid:
- `backbone.patch_embed.proj.*`, `backbone.blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*`,
  `backbone.norm.*` -> the same names without `backbone.`.
- `backbone.pos_embed` [1, 1 + h·w, D], created at the training size (PASCAL 512² -> 32×32, NYUD 448×576 -> 28×36);
  the forward adds `pos_embed[:, 1:]` only. Row 0 is the class position of the ImageNet weights it was initialised
  from, carried along and never used: it is dropped, and the h·w grid rows become `pos_embed` [1, h·w, D] of a
  backbone built with `model.class_token=false, model.pos_grid=[h, w]` (no resampling at that grid).
- Taps: after blocks 6/12/18 (ViT-L) or 3/6/9 (ViT-B/S), and the last block after `norm` = `default_taps(depth)`
  and DenseModel's final-norm convention.
The decoder half maps with `mlore_keys.official_to_ours` (its router pooling is `Linear(h·w, 1)`: the decoder is
built with `router_pool="linear"`, `router_hw=(h, w)`, which ties the checkpoint to its training grid).

Dropped, with the reason in the report: the `mlore_keys.UNUSED_OFFICIAL` groups (`q_fuse`, `classify_route_{1,2}`,
`aux_heads`: built, never called), and the per-task modules of official tasks the target decoder leaves out. Every
other key must land (strict both ways, shapes checked); files are read weights-only, nothing is unpickled.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pretrain.models.decoders.mlore_keys import UNUSED_OFFICIAL, official_to_ours, unused_official_group
from pretrain.models.upcycle import load_state_dict_file
from pretrain.models.vit import VisionTransformer

logger = logging.getLogger(__name__)

_VIT = re.compile(r"^backbone\.(patch_embed\.|blocks\.\d+\.|norm\.|pos_embed$|cls_token$)")
_HEAD = re.compile(r"^heads\.(?P<t>[^.]+)\.linear_pred\.weight$")
_BLOCK = re.compile(r"^backbone\.blocks\.(\d+)\.")
CLASS_ROW_REASON = ("row 0 of backbone.pos_embed: the class position of the ImageNet init; the official forward "
                    "adds pos_embed[:, 1:] only")
TASK_REASON = "per-task modules of official tasks the target decoder leaves out (disabled in the config)"


@dataclass(frozen=True)
class OfficialShape:
    """What an official checkpoint fixes: ViT width/depth/patch, grid tokens h·w, decoder width C, task outputs."""

    embed_dim: int
    depth: int
    patch_size: int
    tokens: int
    channels: int
    tasks: dict[str, int]


def read_official(path: str | Path) -> dict[str, Tensor]:
    """An official checkpoint's tensors (weights-only: `model` unwrapped, `module.` stripped; a file holding pickled
    objects is refused with one line naming it)."""
    return load_state_dict_file(path)


def _need(sd: dict[str, Tensor], key: str, source: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"{source}: not an official MLoRE checkpoint: no {key}")
    return sd[key]


def official_shape(sd: dict[str, Tensor], source: str = "official MLoRE checkpoint") -> OfficialShape:
    """The sizes an official state dict (keys without `module.`) fixes; raises naming the first missing key."""
    proj = _need(sd, "backbone.patch_embed.proj.weight", source)  # [D, 3, p, p]
    pos = _need(sd, "backbone.pos_embed", source)  # [1, 1 + h·w, D]
    fuse = _need(sd, "backbone.fea_fuse.0.weight", source)  # [C, D, 1, 1]
    depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK.match(k))), default=-1)
    tasks = {m.group("t"): int(v.shape[0]) for k, v in sd.items() if (m := _HEAD.match(k))}
    if depth < 1 or not tasks:
        lacking = "backbone.blocks.*" if depth < 1 else "heads.*.linear_pred.weight"
        raise ValueError(f"{source}: not an official MLoRE checkpoint: no {lacking}")
    return OfficialShape(embed_dim=int(proj.shape[0]), depth=depth, patch_size=int(proj.shape[-1]),
                         tokens=int(pos.shape[1]) - 1, channels=int(fuse.shape[0]), tasks=tasks)


def _task_of(key: str, tasks: set[str]) -> str | None:
    """The official task a per-task key belongs to (`MLoRE_1.0.conv1.semseg.weight`, `heads.sal.*`), if any."""
    return next((part for part in key.split(".") if part in tasks), None)


def split_official(sd: dict[str, Tensor], keep_tasks: set[str]) -> tuple[dict[str, Tensor], dict[str, Tensor],
                                                                         dict[str, list[str]]]:
    """(ViT tensors under our names, decoder tensors under official names, {dropped group: official keys}).

    Args:
        sd: official state dict without `module.`.
        keep_tasks: the tasks the target decoder has; other official tasks' per-task modules are dropped.
    """
    official_tasks = {m.group("t") for k in sd if (m := _HEAD.match(k))}
    vit, decoder, dropped = {}, {}, {group: [] for group in (*UNUSED_OFFICIAL, "tasks_left_out")}
    for key, value in sd.items():
        group = unused_official_group(key)
        if group is not None:
            dropped[group].append(key)
        elif _VIT.match(key):
            name = key.removeprefix("backbone.")
            # the official model has no class token: its pos_embed's first row is never added (module docstring)
            vit[name] = value[:, 1:] if name == "pos_embed" else value
        elif (task := _task_of(key, official_tasks)) is not None and task not in keep_tasks:
            dropped["tasks_left_out"].append(key)
        else:
            decoder[key] = value
    return vit, decoder, dropped


def _load_exact(module: nn.Module, tensors: dict[str, Tensor], what: str, source: str) -> None:
    """Load `tensors` into `module` only if the names and shapes match its state dict exactly; else one line."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: the {what} does not match: {len(missing)} missing keys {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}, {len(unexpected)} unknown keys {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
    for key, value in tensors.items():
        if value.shape != own[key].shape:
            raise ValueError(f"{source}: {what} key {key} has shape {tuple(value.shape)} in the checkpoint, "
                             f"{tuple(own[key].shape)} in the model (check the config's model.size and "
                             "finetune.decoder_options.preset)")
    module.load_state_dict(tensors, strict=True)


@torch.no_grad()
def import_mlore(source: str | Path | dict[str, Tensor], vit: VisionTransformer, decoder: nn.Module, *,
                 name: str | None = None) -> dict:
    """Load an official MLoRE checkpoint (file or state dict) into `vit` and `decoder` in place, strictly.

    Args:
        source: the official checkpoint file (`.pth.tar` / `.pth` weights-only, or `.safetensors`) or its state dict.
        vit: built with `class_token=False` at the checkpoint's grid (module docstring), dense placement.
        decoder: `MLoREDecoder` with `router_pool="linear"`, `router_hw` = the grid, the checkpoint's widths and a
            subset of its tasks (`decoder.tasks`).
        name: what errors call the source (default: the file path).
    Returns:
        {"official_keys": n, "mapped": {"backbone": n, "decoder": n} (official keys that landed),
        "dropped": {group: {"keys": n, "reason": str}} (groups with keys, plus the class row of pos_embed)}.
    Raises ValueError (one line naming the file and key) on a missing, unknown or mis-shaped key.
    """
    name = name or (str(source) if not isinstance(source, dict) else "official MLoRE state dict")
    sd = source if isinstance(source, dict) else read_official(source)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    official_shape(sd, name)  # a file of another kind fails here, naming the key it lacks
    vit_sd, decoder_sd, dropped = split_official(sd, set(decoder.tasks))
    _load_exact(vit, vit_sd, "backbone", name)
    try:
        ours = official_to_ours(decoder_sd)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    _load_exact(decoder, ours, "decoder", name)
    reasons = {group: reason for group, (_, reason) in UNUSED_OFFICIAL.items()} | {"tasks_left_out": TASK_REASON}
    report = {"official_keys": len(sd), "mapped": {"backbone": len(vit_sd), "decoder": len(decoder_sd)},
              "dropped": {group: {"keys": len(keys), "reason": reasons[group]} for group, keys in dropped.items()
                          if keys}}
    report["dropped"]["pos_embed_class_row"] = {"keys": 0, "rows": 1, "reason": CLASS_ROW_REASON}
    logger.info("imported %s: %s", name, report)
    return report
