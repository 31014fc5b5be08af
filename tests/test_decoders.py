"""The dense-decoder interface (`DECODERS`) and the baseline per-task PUP heads."""

from __future__ import annotations

import pytest
import torch
from mlore_testing import one_thread  # noqa: F401 - an autouse fixture
from torch import nn

from pretrain.models.decoders import DECODERS
from pretrain.models.decoders.heads import HeadsDecoder

TASKS = {"semseg": 5, "depth": 1, "normals": 3}
SMALL_MLORE = {"channels": 16, "ranks": (2, 3, 4), "spe_rank": 2, "top_k": 2}
SMALL = {"mlore": SMALL_MLORE}  # options that keep a decoder small; a decoder without an entry is built as it comes
# what each decoder says about itself: its taps at depth 12 and 24, its auxiliary losses' weights (every decoder of
# `DECODERS` has a row: `test_every_decoder_has_a_row`)
TAPS = {"heads": {12: (11,), 24: (23,)}, "mlore": {12: (2, 5, 8, 11), 24: (5, 11, 17, 23)}}
AUX_WEIGHTS = {"heads": {}, "mlore": {"mlore_balance": 1e-4}}


def build(name: str, depth: int = 8, **options) -> nn.Module:
    return DECODERS[name](embed_dim=24, depth=depth, tasks=TASKS, **{**SMALL.get(name, {}), **options})


def tapped(decoder: nn.Module, batch: int = 2, hw: int = 4) -> list[torch.Tensor]:
    return [torch.randn(batch, 24, hw, hw) for _ in decoder.taps]


def test_every_decoder_has_a_row():
    assert set(TAPS) == set(AUX_WEIGHTS) == set(DECODERS)


@pytest.mark.parametrize("name", DECODERS)
def test_taps_are_blocks_ending_at_the_last(name):
    for depth, taps in TAPS[name].items():
        got = build(name, depth=depth).taps
        assert got == taps and list(got) == sorted(set(got)) and got[-1] == depth - 1, (depth, got)


@pytest.mark.parametrize("name", DECODERS)
def test_shapes_aux_and_predictor_modules(name):
    decoder = build(name)
    feats = tapped(decoder)
    preds, aux = decoder({t: feats for t in TASKS}, (40, 48))
    assert {t: tuple(p.shape) for t, p in preds.items()} == {t: (2, n, 40, 48) for t, n in TASKS.items()}
    assert set(aux) == set(decoder.aux_weights)
    assert all(a.dim() == 0 and torch.isfinite(a) for a in aux.values())
    predictors = decoder.predictor_modules()
    assert set(predictors) == set(TASKS)
    # heads: the final 1×1 conv; mlore: the whole ConvHead (official count of "heads"); each ends in C_t channels
    last = [[m for m in mods[-1].modules() if isinstance(m, nn.Conv2d)][-1] for mods in predictors.values()]
    assert [(m.out_channels, m.kernel_size) for m in last] == [(n, (1, 1)) for n in TASKS.values()]
    assert decoder.aux_weights == AUX_WEIGHTS[name]


def test_heads_decoder_layout_is_m3vit_pup():
    head = HeadsDecoder(embed_dim=24, depth=4, tasks={"semseg": 5}).heads["semseg"]
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == \
        [(24, 256, (3, 3))] + [(256, 256, (3, 3))] * 3 + [(256, 5, (1, 1))]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in head.modules()) == 4
    out = head(torch.randn(1, 24, 3, 5))
    assert out.shape == (1, 5, 48, 80)  # four ×2 upsamplings


@pytest.mark.parametrize(("name", "options"), [*((name, {}) for name in DECODERS),
                                               ("mlore", {"train_form": "merged"}),
                                               ("mlore", {"train_form": "lowrank"}),
                                               ("mlore", {"router_pool": "linear", "router_hw": (4, 4)}),
                                               ("mlore", {"router_pool": "mean", "pre_softmax": True})])
def test_every_parameter_gets_a_gradient(name, options):
    torch.manual_seed(0)
    decoder = build(name, **options)
    feats = {t: tapped(decoder) for t in TASKS}  # one backbone pass per task: separate lists
    preds, aux = decoder(feats, (16, 16))
    loss = sum(p.pow(2).mean() for p in preds.values())
    loss = loss + sum(decoder.aux_weights[k] * v for k, v in aux.items())
    loss.backward()
    missing = [n for n, p in decoder.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_shared_tap_list_is_projected_once_per_level():
    decoder = build("mlore")
    calls = []
    for proj in decoder.proj:
        proj.register_forward_hook(lambda *_: calls.append(1))
    shared = tapped(decoder)
    decoder({t: shared for t in TASKS}, (16, 16))
    assert len(calls) == 4
    decoder({t: tapped(decoder) for t in TASKS}, (16, 16))
    assert len(calls) == 4 + 4 * len(TASKS)


def test_bad_options_and_inputs_are_named():
    with pytest.raises(ValueError, match="preset"):
        build("mlore", preset="pascal_vitx")
    with pytest.raises(ValueError, match="train_form"):
        build("mlore", train_form="fast")
    with pytest.raises(ValueError, match="router_pool"):
        build("mlore", router_pool="max")
    decoder = build("mlore")
    with pytest.raises(ValueError, match="4 tapped maps"):
        decoder({t: tapped(decoder)[:3] for t in TASKS}, (16, 16))
    heads = build("heads")
    with pytest.raises(ValueError, match="one tapped map"):
        heads({"semseg": tapped(heads)}, (16, 16))


def test_mlore_keeps_its_expert_biases_out_of_weight_decay():
    """The optimizer groups decay every ≥ 2-D parameter not named by `no_weight_decay()`; the shared experts' biases
    are stored [E, C], so the decoder names them, and only them (every other bias is 1-D)."""
    decoder = build("mlore")
    stacked_biases = {n for n, p in decoder.named_parameters() if n.endswith("bias") and p.ndim > 1}
    assert len(stacked_biases) == 8 and decoder.no_weight_decay() == stacked_biases
    with pytest.raises(ValueError, match="inference_form"):
        build("mlore", inference_form="fast")


def test_mlore_options_override_preset_defaults():
    decoder = DECODERS["mlore"](embed_dim=24, depth=12, tasks={"semseg": 5}, preset="nyud_vitl", channels=16,
                                ranks=(2, 4, 6), spe_rank=2, top_k=2)
    block = decoder.blocks[0][0]
    assert block.experts.ranks == (2, 4, 6) and block.router["semseg"].pre_softmax is True
    assert decoder.aux_weights == {"mlore_balance": 5e-4}
    default = DECODERS["mlore"](embed_dim=24, depth=12, tasks={"semseg": 5}, channels=16, ranks=(2, 4, 6),
                                spe_rank=2, top_k=2)
    assert default.aux_weights == {"mlore_balance": 1e-4}  # PASCAL ViT-S config
    assert default.blocks[0][0].router["semseg"].pre_softmax is False
