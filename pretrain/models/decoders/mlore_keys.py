"""Key map between official MLoRE checkpoints (YuqiYang213/MLoRE, `MLoREWrapper.state_dict()`) and MLoREDecoder.

Official names (training form, models/transformers/MLoRE.py): the decoder lives inside the backbone module
(`backbone.fea_fuse.{l}`, `backbone.MLoRE_{1,2}.{l}.*`, `backbone.task_mask.{t}.{0,1,3}`) next to the ViT
(`backbone.blocks.*`, `patch_embed`, `pos_embed`, `norm`); heads are `heads.{t}.mt_proj.{0,1}` and
`heads.{t}.linear_pred`. Differences in shape: the shared experts `lora_list_1.{i}.{W,M}` are stacked here along
the rank axis (`experts.{w,m}_{weight,bias}`), and the router's 1×1 convs on pooled vectors are `nn.Linear`
here ([o, i, 1, 1] ↔ [o, i]). Official `router_1.{t}.0.convsp` (Linear(H·W, 1)) maps to `router.{t}.pool`, which
exists only with `router_pool="linear"`.

Modules of the official checkpoints that take no part in the official forward or loss (`UNUSED_OFFICIAL`) are
dropped by `official_to_ours` rather than refused: the ViT-B model file (`MLoRE_vitB.py`) builds `q_fuse` and
`classify_route_{1,2}`, and `utils/common_config.py` builds `aux_heads` that the ViT-B wrapper keeps.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

_PARAM = r"(?P<param>weight|bias|running_mean|running_var|num_batches_tracked)"
_VIT_KEYS = re.compile(r"^backbone\.(blocks\.|patch_embed\.|pos_embed$|cls_token$|norm\.)")
# (official module path, our module path, 1×1 conv stored as Linear here)
_BLOCK_RULES = [
    ("conv1.{t}", "task_in.{t}", False), ("conv2.{t}.W", "task_expert.{t}.w", False),
    ("conv2.{t}.M", "task_expert.{t}.m", False), ("conv3.{t}", "tail_proj.{t}", False),
    ("share_conv", "generic", False), ("bn.{t}", "tail_norm.{t}", False), ("bn_all.{t}", "expert_norm.{t}", False),
    ("router_1.{t}.0.conv1", "router.{t}.feat_in", True), ("router_1.{t}.0.ln", "router.{t}.feat_norm", False),
    ("router_1.{t}.0.conv3", "router.{t}.feat_out", True), ("router_1.{t}.0.convsp", "router.{t}.pool", False),
    ("router_1.{t}.0.ln_sp", "router.{t}.pool_norm", False), ("router_1.{t}.0.conv2", "router.{t}.pool_out", True),
    ("router_1.{t}.1", "router.{t}.logits", True),
]
_RULES = [("backbone.fea_fuse.{l}", "proj.{l}", False), ("backbone.task_mask.{t}.0", "fusion.{t}.reduce", False),
          ("backbone.task_mask.{t}.1", "fusion.{t}.norm", False),
          ("backbone.task_mask.{t}.3", "fusion.{t}.score", False),
          ("heads.{t}.mt_proj.0", "heads.{t}.conv", False), ("heads.{t}.mt_proj.1", "heads.{t}.norm", False),
          ("heads.{t}.linear_pred", "heads.{t}.pred", False)]
_RULES += [(f"backbone.MLoRE_{j + 1}.{{l}}.{off}", f"blocks.{{l}}.{j}.{ours}", lin)
           for j in (0, 1) for off, ours, lin in _BLOCK_RULES]
# group → (official key pattern, why it is dropped): read in MLoRE_vitB.py (`MLoRE.__init__`, `forward`),
# MLoRE_wrapper_vitb.py, utils/common_config.py (`get_model`) and losses/loss_schemes.py (`MultiTaskLoss`)
UNUSED_OFFICIAL: dict[str, tuple[re.Pattern, str]] = {
    "q_fuse": (re.compile(r"^(backbone\.)?q_fuse\."),
               "ViT-B only: a per-task 1x1 conv 4C->C built and never called (task_mask fuses the levels)"),
    "classify_route": (re.compile(r"^(backbone\.)?classify_route_[12]\."),
                       "ViT-B only: two 1x1 convs C/2->T built and never called, by the forward or by the loss"),
    "aux_heads": (re.compile(r"^aux_heads\."),
                  "a second ConvHead per task, built by get_model and kept by the ViT-B wrapper; never called"),
}
_OFFICIAL_EXPERT = re.compile(r"^backbone\.MLoRE_(?P<j>[12])\.(?P<l>\d+)\.lora_list_1\.(?P<i>\d+)\.(?P<wm>[WM])\."
                              r"(?P<param>weight|bias)$")
_OUR_EXPERT = re.compile(r"^blocks\.(?P<l>\d+)\.(?P<j>[01])\.experts\.(?P<wm>[wm])_(?P<param>weight|bias)$")


def _regex(template: str) -> re.Pattern:
    pattern = template.replace(".", r"\.").replace("{t}", r"(?P<t>[^.]+)").replace("{l}", r"(?P<l>\d+)")
    return re.compile(f"^{pattern}\\.{_PARAM}$")


_OFFICIAL_RX = [(_regex(off), ours, lin) for off, ours, lin in _RULES]
_OURS_RX = [(_regex(ours), off, lin) for off, ours, lin in _RULES]


def _rename(key: str, rules, tensor: Tensor, to_linear: bool) -> tuple[str, Tensor] | None:
    for rx, template, lin in rules:
        match = rx.match(key)
        if match:
            groups = match.groupdict()
            name = template.format(**{k: v for k, v in groups.items() if k != "param"}) + "." + groups["param"]
            if lin and groups["param"] == "weight":
                tensor = tensor.flatten(1) if to_linear else tensor[:, :, None, None]
            return name, tensor
    return None


def unused_official_group(key: str) -> str | None:
    """The `UNUSED_OFFICIAL` group an official key (without `module.`) belongs to, or None."""
    return next((group for group, (rx, _) in UNUSED_OFFICIAL.items() if rx.match(key)), None)


def official_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official MLoRE checkpoint → MLoREDecoder state dict (load it with `load_strict`).

    Args: state_dict: official `model` state dict; a leading `module.` is stripped and a bare decoder (keys
        without `backbone.`) is accepted. ViT keys (`backbone.blocks.*`, `patch_embed`, `pos_embed`, `norm`) are
        left out: they belong to the backbone; so are the `UNUSED_OFFICIAL` modules. Returns: the decoder's keys.
        Raises ValueError on any other key.
    """
    out, experts, unknown = {}, {}, []
    for key, tensor in state_dict.items():
        key = key.removeprefix("module.")
        if unused_official_group(key) is not None:
            continue
        if not key.startswith(("backbone.", "heads.")):
            key = "backbone." + key
        if _VIT_KEYS.match(key):
            continue
        expert = _OFFICIAL_EXPERT.match(key)
        if expert:
            g = expert.groupdict()
            experts.setdefault((g["l"], int(g["j"]) - 1, g["wm"].lower(), g["param"]), {})[int(g["i"])] = tensor
            continue
        renamed = _rename(key, _OFFICIAL_RX, tensor, to_linear=True)
        if renamed is None:
            unknown.append(key)
        else:
            out[renamed[0]] = renamed[1]
    if unknown:
        raise ValueError(f"official MLoRE state dict has keys this decoder does not know: {unknown}")
    for (lvl, j, wm, param), parts in experts.items():
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"official MLoRE_{j + 1}.{lvl} experts {sorted(parts)} are not numbered 0..E-1")
        tensors = [parts[i] for i in range(len(parts))]
        if (wm, param) == ("m", "weight"):
            stacked = torch.cat([t.flatten(1) for t in tensors], dim=1)
        elif (wm, param) == ("m", "bias"):
            stacked = torch.stack(tensors)
        else:
            stacked = torch.cat(tensors, dim=0)
        out[f"blocks.{lvl}.{j}.experts.{wm}_{param}"] = stacked
    return out


def ours_to_official(state_dict: Mapping[str, Tensor], ranks: Sequence[int]) -> dict[str, Tensor]:
    """MLoREDecoder state dict → official names and shapes (`backbone.*`, `heads.*`); inverse of official_to_ours.

    Args: state_dict: MLoREDecoder.state_dict(). ranks: the shared experts' ranks (to unstack them).
    """
    out, unknown = {}, []
    for key, tensor in state_dict.items():
        expert = _OUR_EXPERT.match(key)
        if expert:
            g = expert.groupdict()
            prefix = f"backbone.MLoRE_{int(g['j']) + 1}.{g['l']}.lora_list_1"
            if (g["wm"], g["param"]) == ("m", "weight"):
                parts = [p[:, :, None, None] for p in tensor.split(list(ranks), dim=1)]
            elif (g["wm"], g["param"]) == ("m", "bias"):
                parts = list(tensor.unbind(0))
            else:
                parts = list(tensor.split(list(ranks), dim=0))
            for i, part in enumerate(parts):
                out[f"{prefix}.{i}.{g['wm'].upper()}.{g['param']}"] = part
            continue
        renamed = _rename(key, _OURS_RX, tensor, to_linear=False)
        # attention pooling's 1×1 conv has no official counterpart
        if renamed is None or (key.endswith(".pool.weight") and tensor.dim() != 2):
            unknown.append(key)
        else:
            out[renamed[0]] = renamed[1]
    if unknown:
        raise ValueError(f"MLoREDecoder keys without an official name: {unknown} (router_pool must be 'linear')")
    return out
