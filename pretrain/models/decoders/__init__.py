"""Dense multi-task decoders: `DECODERS = {name: builder}` called by the fine-tuning stage.

Interface (fixed): `DECODERS[name](embed_dim=D, depth=blocks, tasks={task: channels}, **options)` where options
come from the config section `decoder.<name>`. A decoder has
  - `taps`: the 0-based backbone block indices it reads;
  - `forward(feats, out_size)`: feats {task: [one map [B, D, h, w] per tap]} (the same list object for every task
    when the backbone ran once) → ({task: [B, C_t, H, W] at out_size}, {aux loss name: unweighted scalar});
  - `predictor_modules()`: {task: [final output layers]} (counted as "heads", the rest as "decoder");
  - `aux_weights`: {aux loss name: weight};
  - optionally `no_weight_decay()`: names of its parameters (relative to the decoder) to keep out of weight decay.
Normalisation is plain `nn.BatchNorm2d` (converted to SyncBN by the engine on several GPUs).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pretrain.models.decoders.heads import HeadsDecoder
from pretrain.models.decoders.mlore import MLORE_PRESETS, MLoREDecoder, build_mlore, load_strict
from pretrain.models.decoders.mlore_keys import official_to_ours, ours_to_official

DECODERS: dict[str, Callable[..., nn.Module]] = {"heads": HeadsDecoder, "mlore": build_mlore}

__all__ = ["DECODERS", "MLORE_PRESETS", "HeadsDecoder", "MLoREDecoder", "build_mlore", "load_strict",
           "official_to_ours", "ours_to_official"]
