"""Sparse upcycling (Komatsuzaki et al. 2023): initialise the MoE ViT from a dense timm ViT state dict file.

Dense parameters (patch embedding, class token, position embedding, norms, dense attention/MLP blocks, final
norm) are copied by name; the position embedding is resampled when the grids differ. A backbone without a class
token (`model.class_token=false`, MLoRE's geometry) ignores the file's `cls_token` and drops the class row of its
position embedding (the row before a square patch grid) before resampling, as MLoRE's `pos_embed[:, 1:]` does.
MoE layers:
- MoE MLP at `blocks.{i}.mlp` from the dense `fc1`/`fc2` of that block. `copy`: every expert is the dense MLP
  (expert hidden H must equal the dense hidden H_d). `slice`: global expert g gets the dense hidden units
  [j·H, (j+1)·H) with j = g mod (H_d/H); exact partition when E·H = H_d. Each slice keeps fc2's bias divided by
  H_d/H, so the sum over one full partition with unit gates reproduces the dense bias.
- MoE attention at `blocks.{i}.attn`: head expert e gets the dense query rows and output-projection columns of
  dense head e mod H (head_dim must match). K/V are one shared head in the MoE layer (multi-query): they start
  as the MEAN of the dense K heads and of the dense V heads (biases likewise). The head experts have no biases,
  so the dense query bias and output-projection bias are dropped. This cannot reproduce dense attention.
- Routers start at zero (uniform routing); the task embedding stays zero; usage/MI buffers start empty.

**Equality condition** (tested in `tests/test_upcycle.py`): the upcycled model computes exactly the dense model
(up to float rounding, ~1e-5) when mode=`copy`, `gate="renorm"` (the top-k gates sum to 1, so the k identical
experts average to the dense MLP), attention is dense (placement `m3vit`, or `dense`), the task embedding is zero,
and drop path is inactive (eval mode). Under copy + renorm the router weights and gating noise do not matter,
since every expert is the same; routers still start at zero (uniform probabilities). With `gate="raw"` each kept
gate is then exactly 1/E, so a MoE MLP outputs k/E × the dense MLP (also tested); training moves away from it.

Files: `.safetensors` (safetensors) or anything else via `torch.load(weights_only=True)`; a top-level
`model`/`state_dict` entry is unwrapped and a `module.` prefix stripped. The dense classifier (`head.*`,
`head_drop.*`, `fc_norm.*`) is ignored: task heads are initialised fresh. Strict by default: missing or unused keys
raise a `ValueError` that names them.
"""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from pretrain.models.moe import MoEMlp
from pretrain.models.moe_attention import MoEAttention
from pretrain.models.vit import VisionTransformer

logger = logging.getLogger(__name__)

MODES = ("copy", "slice")
IGNORED_PREFIXES = ("head.", "head_drop.", "fc_norm.")


def refused_global(exc: Exception) -> str:
    """The one line of torch's multi-paragraph weights-only refusal that matters: the global it refused. Never
    "re-run with weights_only=False", which would run the file's code."""
    text = " ".join(str(exc).split())
    start = text.find("Unsupported global")
    return text[start:].split(" was not an allowed global", 1)[0] if start >= 0 else text[:200]


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a state dict file (safetensors or a weights-only torch file), unwrapped and un-prefixed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"upcycling source not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as exc:  # safetensors raises its own types for a damaged header or a truncated file
            raise ValueError(f"{path}: cannot read as safetensors: {exc}") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # weights_only refused a pickled object: name it, not torch's preamble
            raise ValueError(f"{path}: refused, it pickles more than tensors and nothing here unpickles code "
                             f"({refused_global(exc)})") from None
        except Exception as exc:  # a truncated or foreign file: say which
            raise ValueError(f"{path}: cannot load as a weights-only torch state dict: "
                             f"{' '.join(str(exc).split())[:300]}") from None
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _take(sd: dict[str, Tensor], used: set[str], missing: list[str], key: str) -> Tensor | None:
    if key not in sd:
        missing.append(key)
        return None
    used.add(key)
    return sd[key]


def _copy(dst: Tensor, src: Tensor, key: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"upcycling: shape mismatch for {key}: model {tuple(dst.shape)}, file {tuple(src.shape)}")
    dst.copy_(src)


def _upcycle_mlp(layer: MoEMlp, sd: dict[str, Tensor], prefix: str, mode: str, used: set[str],
                 missing: list[str]) -> None:
    """Experts of one MoE MLP from the dense `{prefix}fc1/fc2` (module docstring)."""
    w1, b1, w2, b2 = (_take(sd, used, missing, f"{prefix}{n}") for n in
                      ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    layer.router.weight.zero_()
    if layer.router.noise_weight is not None:
        layer.router.noise_weight.zero_()
    if w1 is None or w2 is None:
        return
    ex = layer.experts
    hidden, dense_hidden = ex.w1.shape[-1], w1.shape[0]
    if mode == "copy" and hidden != dense_hidden:
        raise ValueError(f"upcycling {prefix}: mode 'copy' needs expert hidden {hidden} == dense hidden "
                         f"{dense_hidden} (set moe.expert_hidden={dense_hidden}, or use mode 'slice')")
    if mode == "slice" and dense_hidden % hidden:
        raise ValueError(f"upcycling {prefix}: mode 'slice' needs expert hidden {hidden} to divide dense hidden "
                         f"{dense_hidden}")
    num_slices = dense_hidden // hidden
    for i in range(layer.num_local_experts):
        j = (layer.ep_rank * layer.num_local_experts + i) % num_slices  # global expert id → slice
        cols = slice(j * hidden, (j + 1) * hidden)
        _copy(ex.w1[i], w1[cols].t(), f"{prefix}fc1.weight")
        _copy(ex.w2[i], w2[:, cols].t(), f"{prefix}fc2.weight")
        if ex.b1 is not None and b1 is not None:
            _copy(ex.b1[i], b1[cols], f"{prefix}fc1.bias")
        if ex.b2 is not None and b2 is not None:
            _copy(ex.b2[i], b2 / num_slices, f"{prefix}fc2.bias")


def _upcycle_attn(layer: MoEAttention, sd: dict[str, Tensor], prefix: str, num_heads: int, used: set[str],
                  missing: list[str]) -> None:
    """Head experts and the shared K/V head of one MoE attention from the dense `{prefix}qkv/proj`."""
    qkv_w, proj_w = (_take(sd, used, missing, f"{prefix}{n}") for n in ("qkv.weight", "proj.weight"))
    qkv_b = sd.get(f"{prefix}qkv.bias")
    layer.router.weight.zero_()
    if layer.router.noise_weight is not None:
        layer.router.noise_weight.zero_()
    if qkv_w is None or proj_w is None:
        return
    hd, dense_hd = layer.head_dim, qkv_w.shape[0] // (3 * num_heads)
    if hd != dense_hd:
        raise ValueError(f"upcycling {prefix}: MoE head_dim {hd} != dense head dim {dense_hd} "
                         f"(set moe.attn_head_dim={dense_hd})")
    q_w, k_w, v_w = qkv_w.view(3, num_heads, hd, -1).unbind(0)  # [H, hd, D] each
    for e in range(layer.num_experts):
        _copy(layer.heads.q_weight[e], q_w[e % num_heads].t(), f"{prefix}qkv.weight")
        _copy(layer.heads.o_weight[e], proj_w[:, (e % num_heads) * hd:(e % num_heads + 1) * hd].t(),
              f"{prefix}proj.weight")
    _copy(layer.kv_proj.weight, torch.cat([k_w.mean(0), v_w.mean(0)]), f"{prefix}qkv.weight")
    if qkv_b is not None:
        used.add(f"{prefix}qkv.bias")
        if layer.kv_proj.bias is not None:
            k_b, v_b = qkv_b.view(3, num_heads, hd)[1:].mean(1)
            _copy(layer.kv_proj.bias, torch.cat([k_b, v_b]), f"{prefix}qkv.bias")
    if f"{prefix}proj.bias" in sd:
        used.add(f"{prefix}proj.bias")  # no bias in the head experts: the dense output bias is dropped


def _grid_rows(pos: Tensor) -> Tensor:
    """The patch-grid rows [1, h·w, D] of a file's `pos_embed` [1, P + h·w, D]: P = 1 when the grid left after one
    row is square and the whole is not (a class position), else 0."""
    rows = pos.shape[1]
    square = math.isqrt(rows) ** 2 == rows
    return pos[:, 1:] if not square and math.isqrt(rows - 1) ** 2 == rows - 1 else pos


def _dense_key_owner(vit: VisionTransformer, key: str) -> str | None:
    """`blocks.{i}.mlp.` / `blocks.{i}.attn.` when `key` lies inside a MoE layer, else None."""
    parts = key.split(".")
    if parts[0] != "blocks" or len(parts) < 3:
        return None
    block = vit.blocks[int(parts[1])]
    if parts[2] == "mlp" and block.mlp_routed or parts[2] == "attn" and block.attn_routed:
        return ".".join(parts[:3]) + "."
    return None


def _format_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


@torch.no_grad()
def upcycle_vit(vit: VisionTransformer, path: str | Path, *, mode: str = "copy", strict: bool = True
                ) -> dict[str, list[str]]:
    """Initialise `vit` in place from the dense timm ViT state dict at `path` (see module docstring).

    Returns {"missing": [...], "unexpected": [...], "ignored": [...]} (file key names). With `strict`, missing
    or unexpected keys raise `ValueError` naming them.
    """
    if mode not in MODES:
        raise ValueError(f"upcycle mode {mode!r}: expected one of {', '.join(MODES)}")
    sd = load_state_dict_file(path)
    used: set[str] = set()
    missing: list[str] = []
    moe_layers: dict[str, nn.Module] = {}
    for key, param in vit.state_dict(keep_vars=True).items():
        owner = _dense_key_owner(vit, key)
        if owner is not None:
            moe_layers[owner] = vit.get_submodule(owner[:-1])
        elif key == "task_embed":
            param.zero_()
        elif key == "pos_embed" and key in sd and sd[key].shape != param.shape:
            used.add(key)
            grid = vit.patch_embed.grid_size
            src = sd[key] if vit.num_prefix_tokens else _grid_rows(sd[key])  # no class token here: drop its row
            _copy(param, resample_abs_pos_embed(src, new_size=grid, num_prefix_tokens=vit.num_prefix_tokens), key)
        elif (src := _take(sd, used, missing, key)) is not None:
            _copy(param, src, key)
    for prefix, layer in moe_layers.items():
        if prefix.endswith(".mlp."):
            if not isinstance(layer, MoEMlp):
                raise TypeError(f"upcycling {prefix}: expected MoEMlp (native layout), got {type(layer).__name__}")
            _upcycle_mlp(layer, sd, prefix, mode, used, missing)
        else:
            if not isinstance(layer, MoEAttention):
                raise TypeError(f"upcycling {prefix}: expected MoEAttention, got {type(layer).__name__}")
            _upcycle_attn(layer, sd, prefix, vit.num_heads, used, missing)
    # a backbone without a class token has no use for the file's
    ignore = IGNORED_PREFIXES + (("cls_token",) if vit.cls_token is None else ())
    ignored = sorted(k for k in sd if k not in used and k.startswith(ignore))
    unexpected = sorted(k for k in sd if k not in used and not k.startswith(ignore))
    report = {"missing": sorted(missing), "unexpected": unexpected, "ignored": ignored}
    if strict and (missing or unexpected):
        raise ValueError(f"upcycling from {path}: missing keys [{_format_keys(report['missing'])}]; "
                         f"unexpected keys [{_format_keys(unexpected)}]")
    logger.info("upcycled %d MoE layers (%s) from %s; %d dense keys copied, ignored %s", len(moe_layers), mode,
                path, len(used), _format_keys(ignored))
    return report
