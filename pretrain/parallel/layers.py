"""The MoE MLP factory a model is built with: backend, expert-parallel size and this rank's expert slice.

Lives apart from `engine.py` so that building a model (evaluation, export, extraction, fine-tuning from a file)
never imports DeepSpeed: only `moe.backend=deepspeed` imports it, lazily, through `ds_moe.py`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from pretrain import dist
from pretrain.config.pretraining import EngineConfig, MoEConfig
from pretrain.models.moe import MoEMlp


def build_native_moe_mlp(*, ep_size: int, ep_rank: int, **kwargs) -> MoEMlp:
    """`MoEMlp` holding this rank's experts, initialised as the slice of an ep_size=1 layer.

    The full layer is built first so the RNG stream (and hence every weight of the model) is the same for every
    ep_size; the EP layer itself is built under a forked RNG.
    """
    full = MoEMlp(**kwargs)
    if ep_size == 1:
        return full
    with torch.random.fork_rng(devices=[]):
        layer = MoEMlp(**kwargs, ep_size=ep_size, ep_rank=ep_rank)
    first = ep_rank * layer.num_local_experts
    state = {k: v[first:first + layer.num_local_experts] if k.startswith("experts.") else v
             for k, v in full.state_dict().items()}
    layer.load_state_dict(state)
    return layer


def moe_mlp_factory(moe: MoEConfig, engine: EngineConfig, *, rank: int | None = None) -> Callable[..., nn.Module]:
    """The MoE MLP factory `build_model(..., moe_mlp_layer=...)` needs: backend, ep_size and this rank's EP rank bound.

    Args:
        moe: reads `backend`, `capacity_factor`. engine: reads `ep_size`.
        rank: global rank (default: from the environment, `dist.resolve()`); EP rank = rank % ep_size (DeepSpeed's
            EP groups are consecutive ranks).
    """
    ep_size = engine.ep_size
    ep_rank = (dist.resolve().rank if rank is None else rank) % ep_size
    if moe.backend == "deepspeed":
        from pretrain.parallel.ds_moe import DeepSpeedMoEMlp  # imports DeepSpeed: only for this backend

        return functools.partial(DeepSpeedMoEMlp, ep_size=ep_size, ep_rank=ep_rank,
                                 capacity_factor=moe.capacity_factor)
    return functools.partial(build_native_moe_mlp, ep_size=ep_size, ep_rank=ep_rank)
