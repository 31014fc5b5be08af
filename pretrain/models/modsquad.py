"""Import an official Mod-Squad checkpoint (`MTVisionTransformerMoETaskGating`, UMass-Foundation-Model/Mod-Squad)
onto this project's backbone.

Official names and shapes (D = embed dim, T = its task count, hd = head_dim, E = experts, H = expert hidden):
- `patch_embed.proj.{weight,bias}`, `cls_token` [1, 1, D], `pos_embed` [1, 1 + N, D], `norm.*`,
  `blocks.{i}.norm1.*`, `blocks.{i}.norm2.*`: same names here.
- `task_embedding` [1, T, D] -> `task_embed` [T_ours, D] (rows picked by the task map).
- MoE attention (`MoETaskAttention`): `attn.q_proj.experts.w` [E, D, hd] -> `attn.heads.q_weight`,
  `attn.q_proj.output_experts.w` [E, hd, D] -> `attn.heads.o_weight`, `attn.kv_proj.0.{weight [2hd, D], bias}` ->
  `attn.kv_proj.*`, `attn.q_proj.f_gate.{t}.0.weight` [E or 2E, D] -> `attn.router.weight[t]` (rows :E) and, with
  noisy gating, `attn.router.noise_weight[t]` (rows E:).
- MoE MLP (`TaskMoE`): `mlp.experts.{w [E, D, H], b [E, H]}` -> `mlp.experts.{w1, b1}`,
  `mlp.output_experts.{w [E, H, D], b [E, D]}` -> `mlp.experts.{w2, b2}`, `mlp.f_gate.{t}.0.weight` -> routers.
- Dense blocks: `attn.qkv.*`, `attn.proj.*` (timm layout, head dim 128 in ViT-B: set `moe.dense_attn_head_dim`),
  `mlp.fc1.*`, `mlp.fc2.*`: same names.
- `fc_norm.*`, `task_heads.*` (Taskonomy heads) are not backbone: reported as ignored.

The weights then compute Mod-Squad's forward when the model is built with its options: `moe.prob_eps=1e-4`,
`moe.gate=raw`, no noise at eval (Mod-Squad samples gate noise at eval too; its ViT-B config has none), the
class path through `ClsHead(order="modsquad")` (tests/test_fidelity.py checks this against a transcription).
Files are read weights-only (safetensors, or `torch.load(weights_only=True)`); nothing is unpickled.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import Tensor

from pretrain.models.moe import TaskRoutedLayer
from pretrain.models.upcycle import load_state_dict_file
from pretrain.models.vit import VisionTransformer

logger = logging.getLogger(__name__)

IGNORED_PREFIXES = ("fc_norm.", "task_heads.", "head.")
# official suffix inside a block -> ours (router rows are handled separately)
RENAMES = {
    "attn.q_proj.experts.w": "attn.heads.q_weight",
    "attn.q_proj.output_experts.w": "attn.heads.o_weight",
    "attn.kv_proj.0.weight": "attn.kv_proj.weight",
    "attn.kv_proj.0.bias": "attn.kv_proj.bias",
    "mlp.experts.w": "mlp.experts.w1",
    "mlp.experts.b": "mlp.experts.b1",
    "mlp.output_experts.w": "mlp.experts.w2",
    "mlp.output_experts.b": "mlp.experts.b2",
}
_GATE = re.compile(r"^(blocks\.\d+\.(?:attn\.q_proj|mlp))\.f_gate\.(\d+)\.0\.weight$")


def _router_prefix(official_prefix: str) -> str:
    return official_prefix.replace(".attn.q_proj", ".attn") + "."


def _map_routers(sd: dict[str, Tensor], vit: VisionTransformer, task_map: list[int], out: dict[str, Tensor],
                 used: set[str], dropped: list[str]) -> None:
    """Stack each layer's per-task `f_gate.{t}.0.weight` [E or 2E, D] into router.weight / noise_weight [T, E, D]."""
    gates: dict[str, dict[int, Tensor]] = {}
    for key, value in sd.items():
        if (match := _GATE.match(key)) is not None:
            gates.setdefault(match.group(1), {})[int(match.group(2))] = value
            (used.add(key) if int(match.group(2)) in task_map else dropped.append(key))
    for official, rows in gates.items():
        prefix = _router_prefix(official)
        layer = vit.get_submodule(prefix[:-1]) if _has_module(vit, prefix[:-1]) else None
        if not isinstance(layer, TaskRoutedLayer):  # a dense layer here: keep the official names (-> unexpected)
            out.update({f"{official}.f_gate.{t}.0.weight": w for t, w in rows.items() if t in task_map})
            continue
        num_e = layer.num_experts
        missing_tasks = [t for t in task_map if t not in rows]
        if missing_tasks:
            raise ValueError(f"Mod-Squad checkpoint has no {official}.f_gate.{{{missing_tasks}}}.0.weight")
        stacked = torch.stack([rows[t] for t in task_map])  # [T_ours, E or 2E, D]
        out[prefix + "router.weight"] = stacked[:, :num_e]
        if stacked.shape[1] == 2 * num_e:  # noisy gating: the second half are the noise-std rows
            out[prefix + "router.noise_weight"] = stacked[:, num_e:]


def _has_module(vit: VisionTransformer, name: str) -> bool:
    try:
        vit.get_submodule(name)
    except AttributeError:
        return False
    return True


def map_state_dict(sd: dict[str, Tensor], vit: VisionTransformer, task_map: list[int] | None = None
                   ) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """Official Mod-Squad tensors -> this backbone's names (module docstring).

    Args:
        sd: the official state dict (unwrapped, no `module.` prefix).
        vit: the target backbone (decides which layers are MoE and whether routers are noisy).
        task_map: official task index of each of our task ids (len = vit.num_tasks); None = identity, which needs
            the same task count.
    Returns:
        (mapped tensors by our names, {"ignored": head keys, "dropped": routers of unmapped official tasks});
        official keys without a counterpart keep their names (so `import_modsquad` reports them as unexpected).
    """
    official_tasks = sd["task_embedding"].shape[1] if "task_embedding" in sd else None
    if task_map is None:
        if official_tasks is not None and official_tasks != vit.num_tasks:
            raise ValueError(f"the checkpoint has {official_tasks} tasks, this model {vit.num_tasks}: pass a task map "
                             "(official index for each of our tasks)")
        task_map = list(range(vit.num_tasks))
    if len(task_map) != vit.num_tasks:
        raise ValueError(f"task map {task_map} must give one official task per model task ({vit.num_tasks})")
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    report: dict[str, list[str]] = {"ignored": [], "dropped": []}
    _map_routers(sd, vit, task_map, out, used, report["dropped"])
    for key, value in sd.items():
        if key in used or _GATE.match(key):
            continue
        if key.startswith(IGNORED_PREFIXES):
            report["ignored"].append(key)
        elif key == "task_embedding":
            if max(task_map) >= value.shape[1]:
                raise ValueError(f"task map {task_map} points past the checkpoint's {value.shape[1]} tasks")
            out["task_embed"] = value[0, task_map]
        elif key.startswith("blocks.") and key.count(".") >= 2:
            first, index, suffix = key.split(".", 2)  # blocks.3.mlp.experts.w -> blocks, 3, mlp.experts.w
            out[f"{first}.{index}.{RENAMES.get(suffix, suffix)}"] = value
        else:
            out[key] = value
    return out, report


@torch.no_grad()
def import_modsquad(vit: VisionTransformer, source: str | Path | dict[str, Tensor], *,
                    task_map: list[int] | None = None, strict: bool = True) -> dict[str, list[str]]:
    """Load an official Mod-Squad checkpoint (file or state dict) into `vit` in place.

    Every backbone parameter must come from the checkpoint and every checkpoint tensor must land somewhere
    (heads and unmapped tasks' routers are reported, not loaded). Buffers (usage, MI EMA) keep their values.
    Returns {"missing", "unexpected", "ignored", "dropped"} key lists; with `strict`, missing or unexpected keys
    raise `ValueError` naming them, as do shape mismatches.
    """
    sd = source if isinstance(source, dict) else load_state_dict_file(source)
    mapped, report = map_state_dict(sd, vit, task_map)
    params = dict(vit.named_parameters())
    missing = sorted(k for k in params if k not in mapped)
    unexpected = sorted(k for k in mapped if k not in params)
    for key in sorted(set(mapped) & set(params)):
        if mapped[key].shape != params[key].shape:
            raise ValueError(f"Mod-Squad import: {key} has shape {tuple(mapped[key].shape)} in the checkpoint, "
                             f"{tuple(params[key].shape)} in the model (check the config: moe.attn_head_dim, "
                             "moe.dense_attn_head_dim, expert counts, moe.noisy)")
    if strict and (missing or unexpected):
        raise ValueError(f"Mod-Squad import: missing keys {missing[:12]}{' ...' if len(missing) > 12 else ''}; "
                         f"unexpected keys {unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}")
    for key in set(mapped) & set(params):
        params[key].copy_(mapped[key])
    logger.info("imported %d Mod-Squad tensors; ignored %d head keys, dropped %d routers of unmapped tasks",
                len(mapped) - len(unexpected), len(report["ignored"]), len(report["dropped"]))
    return {"missing": missing, "unexpected": unexpected, "ignored": report["ignored"], "dropped": report["dropped"]}


def parse_task_map(text: str, task_names: tuple[str, ...]) -> list[int]:
    """`cls=0,det=3,seg=5` -> official index per task id (every task in `task_names` must appear once)."""
    pairs = dict(item.split("=", 1) for item in text.split(",") if item)
    if set(pairs) != set(task_names) or not all(v.isdigit() for v in pairs.values()):
        raise ValueError(f"task map {text!r}: give NAME=INDEX for each of {', '.join(task_names)}")
    return [int(pairs[name]) for name in task_names]
