"""The MoE ViT backbone: placement, intermediates, dynamic image size, task routing, sizes."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from pretrain.config.pretraining import TASKS, RunConfig
from pretrain.models import BACKBONE_SIZES
from pretrain.models import build_backbone as build_backbone_from_sections
from pretrain.models.moe import MoEMlp
from pretrain.models.vit import VisionTransformer, moe_layout, take_indices


def build_backbone(cfg, **kwargs):
    """The backbone of a run config (the builder takes the config's model and moe sections)."""
    return build_backbone_from_sections(cfg.model, cfg.moe, **kwargs)

TIMM_NAMES = {"vit_s16": "vit_small_patch16_224", "vit_b16": "vit_base_patch16_224", "vit_l16": "vit_large_patch16_224"}


def debug_cfg(placement: str = "m3vit", **moe) -> RunConfig:
    cfg = RunConfig()
    cfg.model.size = "vit_debug"
    cfg.model.drop_path = 0.0
    cfg.moe.placement = placement
    cfg.moe.num_experts, cfg.moe.top_k = 4, 2
    cfg.moe.attn_num_experts, cfg.moe.attn_top_k = 8, 4
    for key, value in moe.items():
        setattr(cfg.moe, key, value)
    return cfg


def tasks(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def test_moe_layout_per_placement():
    assert moe_layout("modsquad", 4) == [(True, False), (False, True), (True, False), (False, True)]
    assert moe_layout("m3vit", 4) == [(False, False), (False, True), (False, False), (False, True)]
    assert moe_layout("dense", 3) == [(False, False)] * 3
    with pytest.raises(ValueError, match="unknown MoE placement 'moe'"):
        moe_layout("moe", 4)


def test_blocks_follow_placement():
    vit = build_backbone(debug_cfg("m3vit"))
    assert [type(b.mlp) is MoEMlp for b in vit.blocks] == [False, True, False, True]
    assert [b.mlp_routed for b in vit.blocks] == [False, True, False, True]
    assert not any(b.attn_routed for b in vit.blocks)
    dense = build_backbone(debug_cfg("dense"))
    assert not any(isinstance(m, MoEMlp) for m in dense.modules())


def test_take_indices_follows_timm_convention():
    assert take_indices(4, None) == [0, 1, 2, 3]
    assert take_indices(4, 2) == [2, 3]
    assert take_indices(4, [0, -1]) == [0, 3]
    with pytest.raises(ValueError, match="out of range"):
        take_indices(4, [4])
    with pytest.raises(ValueError, match="between 1 and depth=4"):
        take_indices(4, 5)


@pytest.mark.parametrize("size", [(64, 64), (96, 80)])
def test_forward_intermediates_shapes_any_resolution(size):
    torch.manual_seed(0)
    vit = build_backbone(debug_cfg()).eval()
    x = torch.randn(2, 3, *size)
    h, w = size[0] // 8, size[1] // 8
    maps = vit.forward_intermediates(x, tasks(0, 2), indices=[0, 1, 2, 3], intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(2, 128, h, w)] * 4
    final, nlc = vit.forward_intermediates(x, tasks(0, 2), indices=2, output_fmt="NLC", norm=True)
    assert final.shape == (2, 1 + h * w, 128) and [tuple(m.shape) for m in nlc] == [(2, h * w, 128)] * 2
    # the last normed intermediate is forward_features without the class token
    torch.testing.assert_close(nlc[-1], vit.forward_features(x, tasks(0, 2))[:, 1:])
    torch.testing.assert_close(final, vit.forward_features(x, tasks(0, 2)))
    early = vit.forward_intermediates(x, tasks(0, 2), indices=[1], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early[0], maps[1])


def test_pos_embed_is_resampled_and_inputs_are_padded():
    vit = build_backbone(debug_cfg("dense"))
    assert vit.pos_embed.shape == (1, 1 + 8 * 8, 128)  # stored for 64 px at patch 8
    maps = vit.forward_intermediates(torch.randn(1, 3, 70, 50), tasks(1), indices=1, intermediates_only=True)
    assert maps[0].shape == (1, 128, 9, 7)  # padded up to whole patches


def test_task_embedding_zero_init_then_task_specific():
    torch.manual_seed(0)
    vit = build_backbone(debug_cfg("dense")).eval()
    assert vit.task_embed.shape == (len(TASKS), 128) and not vit.task_embed.any()
    x = torch.randn(1, 3, 64, 64).expand(3, -1, -1, -1)
    out = vit.forward_features(x, tasks(0, 1, 2))
    torch.testing.assert_close(out[0], out[1])
    with torch.no_grad():
        vit.task_embed[1].normal_()
    out2 = vit.forward_features(x, tasks(0, 1, 2))
    torch.testing.assert_close(out2[0], out[0])
    torch.testing.assert_close(out2[2], out[2])
    assert (out2[1] - out[1]).abs().max() > 1e-3


def test_each_sample_routed_by_its_own_task():
    torch.manual_seed(0)
    vit = build_backbone(debug_cfg("m3vit", router_init="normal")).eval()
    x = torch.randn(2, 3, 64, 64)
    both = vit.forward_features(x, tasks(0, 2))
    torch.testing.assert_close(both[:1], vit.forward_features(x[:1], tasks(0)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1:], vit.forward_features(x[1:], tasks(2)), atol=1e-5, rtol=1e-5)
    other = vit.forward_features(x[:1], tasks(1))
    assert (other - both[:1]).abs().max() > 1e-4  # a different task's router gives a different output


def test_bad_task_ids_are_rejected():
    vit = build_backbone(debug_cfg("dense"))
    with pytest.raises(ValueError, match="task_B must be int64 of shape"):
        vit.forward_features(torch.randn(2, 3, 64, 64), torch.zeros(2, dtype=torch.int32))


def test_no_weight_decay_names_exist():
    vit = build_backbone(debug_cfg())
    names = dict(vit.named_parameters())
    assert vit.no_weight_decay() == {"pos_embed", "cls_token", "task_embed"}
    assert vit.no_weight_decay() <= set(names)


def test_moe_mlp_factory_is_injectable():
    seen = []

    class FakeMoE(nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            seen.append(kwargs)
            self.fc = nn.Linear(kwargs["dim"], kwargs["dim"])

        def forward(self, x_BND, task_B):
            return self.fc(x_BND) * (1 + task_B.view(-1, 1, 1))

    vit = build_backbone(debug_cfg("m3vit"), moe_mlp_layer=FakeMoE)
    assert len(seen) == 2 and isinstance(vit.blocks[1].mlp, FakeMoE)
    assert seen[0] == {"dim": 128, "num_tasks": 3, "act_layer": nn.GELU, "bias": True, "hidden_dim": 256,
                       "num_experts": 4, "top_k": 2, "gate": "raw", "noisy": False, "router_init": "uniform",
                       "usage_momentum": 0.95, "mi_ema": 0.9, "init": "m3vit"}  # hidden 4·128·2/4 = 256
    # m3vit placement, `auto` inits: M3ViT's U(±1/√E) routers and FastMoE experts
    assert vit.forward_features(torch.randn(1, 3, 64, 64), tasks(1)).shape == (1, 65, 128)


def test_missing_factory_is_an_error():
    with pytest.raises(ValueError, match="no moe_mlp_layer factory"):
        VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, placement="m3vit")


@pytest.mark.parametrize("name", [n for n in BACKBONE_SIZES if n != "vit_debug"])
def test_sizes_match_timm_and_moe_counts(name):
    """Dense: same parameter names and count as timm's ViT (without classifier). m3vit: analytic MoE count."""
    cfg = debug_cfg("dense")
    cfg.model.size, cfg.model.task_embed = name, False
    with torch.device("meta"):
        dense = build_backbone(cfg)
        ref = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=0)
    assert sorted(dense.state_dict()) == sorted(ref.state_dict())
    n_dense = sum(p.numel() for p in dense.parameters())
    assert n_dense == sum(p.numel() for p in ref.parameters())
    cfg.moe.placement, cfg.model.task_embed = "m3vit", True
    cfg.moe.num_experts, cfg.moe.top_k = 16, 4
    with torch.device("meta"):
        moe = build_backbone(cfg)
    d, depth = BACKBONE_SIZES[name]["embed_dim"], BACKBONE_SIZES[name]["depth"]
    e, h = 16, 4 * d * 4 // 16
    moe_layer = e * (2 * d * h + h + d) + len(TASKS) * e * d
    dense_mlp = 2 * d * 4 * d + 4 * d + d
    expected = n_dense + (depth // 2) * (moe_layer - dense_mlp) + len(TASKS) * d
    assert sum(p.numel() for p in moe.parameters()) == expected


def test_dense_attention_head_dim_and_randn_task_embedding():
    """Mod-Squad's dense attention keeps its 12 heads at head dim 128 (inner 1536 > 768); its task embedding is
    randn and weight-decayed."""
    cfg = debug_cfg("modsquad", dense_attn_head_dim=64)
    cfg.model.task_embed_init = "randn"
    torch.manual_seed(0)
    vit = build_backbone(cfg).eval()
    attn = vit.blocks[1].attn
    assert attn.qkv.weight.shape == (3 * 4 * 64, 128) and attn.proj.weight.shape == (128, 4 * 64)
    assert attn.scale == 64**-0.5
    assert vit.forward_features(torch.randn(1, 3, 64, 64), tasks(2)).shape == (1, 65, 128)
    assert vit.task_embed.std().item() == pytest.approx(1.0, rel=0.1)
    assert vit.no_weight_decay() == {"pos_embed", "cls_token"}
    cfg.model.task_embed_std = 0.1
    assert build_backbone(cfg).task_embed.std().item() == pytest.approx(0.1, rel=0.1)
    with pytest.raises(ValueError, match="task_embed_init='ones'"):
        VisionTransformer(embed_dim=32, depth=1, num_heads=2, task_embed=True, task_embed_init="ones")
