"""Sparse upcycling from a dense timm ViT state dict file.

Equality condition (see `pretrain/models/upcycle.py`): mode `copy`, `gate="renorm"`, dense attention (placement
`m3vit`), zero task embedding, eval mode → the upcycled model equals the dense timm model (routers start at zero).
"""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT

from pretrain.config.pretraining import RunConfig
from pretrain.models import build_backbone as build_backbone_from_sections
from pretrain.models.moe import MoEMlp
from pretrain.models.upcycle import load_state_dict_file, upcycle_vit


def build_backbone(cfg, **kwargs):
    """The backbone of a run config (the builder takes the config's model and moe sections)."""
    return build_backbone_from_sections(cfg.model, cfg.moe, **kwargs)


def cfg_for(size: str, placement: str = "m3vit", **moe) -> RunConfig:
    cfg = RunConfig()
    cfg.model.size, cfg.model.drop_path, cfg.moe.placement = size, 0.1, placement
    for key, value in moe.items():
        setattr(cfg.moe, key, value)
    return cfg


def tiny_timm() -> TimmViT:
    """A timm ViT with vit_debug's shape (patch 8, dim 128, depth 4, heads 4, 64 px)."""
    return TimmViT(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, num_classes=10).eval()


def save(model: torch.nn.Module, path) -> str:
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path)) if str(path).endswith(".safetensors") else torch.save(sd, path)
    return str(path)


def test_equals_dense_timm_vit_small_under_the_condition(tmp_path):
    """copy + renorm gates + dense attention + zero task embedding + eval ⇒ equal (routers zeroed by upcycling)."""
    torch.manual_seed(0)
    # dynamic_img_size: timm resamples its position embedding like ours, so a 112 px input keeps the test fast
    dense = timm.create_model("vit_small_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    path = save(dense, tmp_path / "vit_s16.safetensors")
    cfg = cfg_for("vit_s16", num_experts=4, top_k=2, expert_hidden=1536, gate="renorm", router_init="normal")
    cfg.model.upcycle_from, cfg.model.upcycle_mode = path, "copy"
    vit = build_backbone(cfg).eval()  # router_init=normal: upcycling must zero the routers itself
    assert vit.task_embed is not None and not vit.task_embed.any()
    assert not any(b.mlp.router.weight.any() for b in vit.blocks if b.mlp_routed)
    with torch.no_grad():
        for x in (torch.randn(1, 3, 224, 224), torch.randn(2, 3, 112, 96)):
            ours = vit.forward_features(x, torch.tensor([0, 2])[: len(x)])
            torch.testing.assert_close(ours, dense.forward_features(x), atol=1e-5, rtol=1e-4)


def test_raw_gates_scale_the_mlp_by_k_over_e(tmp_path):
    torch.manual_seed(0)
    dense = tiny_timm()
    path = save(dense, tmp_path / "tiny.pth")
    vit = build_backbone(cfg_for("vit_debug", num_experts=4, top_k=2, expert_hidden=512, gate="raw",
                                 router_init="normal")).eval()  # upcycling zeroes routers: uniform probs 1/E
    upcycle_vit(vit, path, mode="copy")
    x_BND = torch.randn(2, 5, 128)
    with torch.no_grad():
        moe_out = vit.blocks[1].mlp(x_BND, torch.tensor([0, 1]))
        torch.testing.assert_close(moe_out, dense.blocks[1].mlp(x_BND) * 2 / 4, atol=1e-5, rtol=1e-4)


def test_slice_mode_partitions_the_dense_hidden_units(tmp_path):
    """E·h = dense hidden: expert e holds units [e·h, (e+1)·h); with all E experts kept (renorm gates 1/E)
    the layer outputs dense/E, since the fc2 bias is split evenly over the slices."""
    torch.manual_seed(0)
    dense = tiny_timm()
    path = save(dense, tmp_path / "tiny.safetensors")
    vit = build_backbone(cfg_for("vit_debug", num_experts=4, top_k=4, expert_hidden=128, gate="renorm")).eval()
    upcycle_vit(vit, path, mode="slice")
    layer: MoEMlp = vit.blocks[3].mlp
    fc1 = dense.blocks[3].mlp.fc1
    torch.testing.assert_close(layer.experts.w1[2], fc1.weight[256:384].t())
    torch.testing.assert_close(layer.experts.b1[2], fc1.bias[256:384])
    x_BND = torch.randn(2, 5, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x_BND, torch.tensor([1, 2])) * 4, dense.blocks[3].mlp(x_BND), atol=1e-5,
                                   rtol=1e-4)


def test_slices_follow_global_expert_ids_under_expert_parallelism(tmp_path):
    dense = tiny_timm()
    path = save(dense, tmp_path / "tiny.pth")
    factory = partial(MoEMlp, ep_size=2, ep_rank=1)  # what the engine injects on rank 1 of an EP group of 2
    vit = build_backbone(cfg_for("vit_debug", num_experts=4, top_k=2, expert_hidden=128), moe_mlp_layer=factory)
    upcycle_vit(vit, path, mode="slice")
    layer = vit.blocks[1].mlp
    assert layer.num_local_experts == 2  # local experts 0, 1 = global experts 2, 3
    torch.testing.assert_close(layer.experts.w1[0], dense.blocks[1].mlp.fc1.weight[256:384].t())
    torch.testing.assert_close(layer.experts.w2[1], dense.blocks[1].mlp.fc2.weight[:, 384:512].t())


def test_moe_attention_heads_come_from_dense_heads(tmp_path):
    torch.manual_seed(0)
    dense = tiny_timm()
    path = save(dense, tmp_path / "tiny.pth")
    vit = build_backbone(cfg_for("vit_debug", "modsquad", num_experts=4, top_k=2, attn_num_experts=6, attn_top_k=4,
                                 router_init="normal"))
    upcycle_vit(vit, path, mode="slice")
    attn, ref = vit.blocks[0].attn, dense.blocks[0].attn
    hd = 32
    q_w, k_w, v_w = ref.qkv.weight.view(3, 4, hd, 128)
    for e in range(6):  # head expert e ← dense head e mod 4
        torch.testing.assert_close(attn.heads.q_weight[e], q_w[e % 4].t())
        torch.testing.assert_close(attn.heads.o_weight[e], ref.proj.weight[:, (e % 4) * hd:(e % 4 + 1) * hd].t())
    torch.testing.assert_close(attn.kv_proj.weight, torch.cat([k_w.mean(0), v_w.mean(0)]))
    assert not attn.router.weight.any() and not vit.blocks[1].mlp.router.weight.any()
    torch.testing.assert_close(vit.blocks[0].mlp.fc1.weight, dense.blocks[0].mlp.fc1.weight)  # dense MLP copied


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = {k: v.clone() for k, v in tiny_timm().state_dict().items()}
    del sd["blocks.3.mlp.fc1.weight"], sd["norm.weight"]
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    vit = build_backbone(cfg_for("vit_debug", num_experts=4, top_k=2, expert_hidden=512))
    with pytest.raises(ValueError, match=r"missing keys \[blocks\.3\.mlp\.fc1\.weight, norm\.weight\]; "
                                         r"unexpected keys \[extra\.weight\]"):
        upcycle_vit(vit, path)
    report = upcycle_vit(vit, path, strict=False)
    assert report["missing"] == ["blocks.3.mlp.fc1.weight", "norm.weight"]
    assert report["unexpected"] == ["extra.weight"] and report["ignored"] == ["head.bias", "head.weight"]


def test_incompatible_shapes_are_explained(tmp_path):
    path = save(tiny_timm(), tmp_path / "tiny.pth")
    vit = build_backbone(cfg_for("vit_debug", num_experts=4, top_k=2))  # expert hidden 256 ≠ dense 512
    with pytest.raises(ValueError, match=r"mode 'copy' needs expert hidden 256 == dense hidden 512 "
                                         r"\(set moe.expert_hidden=512"):
        upcycle_vit(vit, path, mode="copy")
    wide = TimmViT(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=4)
    with pytest.raises(ValueError, match=r"shape mismatch for cls_token"):
        upcycle_vit(vit, save(wide, tmp_path / "wide.pth"), mode="slice")


def test_pos_embed_is_resampled_to_the_model_grid(tmp_path):
    src = TimmViT(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4, num_classes=0)
    vit = build_backbone(cfg_for("vit_debug", "dense"))
    upcycle_vit(vit, save(src, tmp_path / "small_grid.pth"))
    assert vit.pos_embed.shape == (1, 65, 128)
    torch.testing.assert_close(vit.pos_embed[:, 0], src.pos_embed[:, 0])  # class position kept


def test_files_must_hold_only_tensors(tmp_path):
    bad = tmp_path / "pickled.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "fn": print}, bad)
    with pytest.raises(ValueError, match="pickled.pth: refused, it pickles more than tensors"):
        load_state_dict_file(bad)
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {"module.w": torch.ones(2)}}, nested)
    assert list(load_state_dict_file(nested)) == ["w"]
    with pytest.raises(FileNotFoundError, match="upcycling source not found"):
        load_state_dict_file(tmp_path / "nope.safetensors")


def test_a_pickle_that_runs_code_is_refused_in_one_line_naming_the_global(tmp_path, capsys):
    """torch's weights-only refusal is paragraphs long and ends in "re-run with weights_only=False": users see one
    line naming what the file tried to import, and the file's code never runs."""
    from pretrain.models.upcycle import load_state_dict_file

    class Evil:
        def __reduce__(self):
            return (print, ("the file's code ran",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError) as info:
        load_state_dict_file(tmp_path / "evil.pth")
    message = str(info.value)
    assert "Unsupported global: GLOBAL print" in message and "weights_only" not in message
    assert len(message.splitlines()) == 1 and "the file's code ran" not in capsys.readouterr().out
