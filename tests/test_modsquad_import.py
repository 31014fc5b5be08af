"""Importing official Mod-Squad checkpoints: names/shapes, strictness, weights-only loading, and equality with an
independent plain-torch transcription of Mod-Squad's forward (`MTVisionTransformerMoETaskGating`, twice_attn +
twice_mlp: MoE attention in even blocks, MoE MLP in odd ones; probs = softmax + 1e-4, raw top-k gates)."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pretrain.cli import main as cli_main
from pretrain.config.load import load_config
from pretrain.models import build_backbone as build_backbone_from_sections
from pretrain.models.heads.cls import ClsHead
from pretrain.models.modsquad import import_modsquad, parse_task_map


def build_backbone(cfg, **kwargs):
    """The backbone of a run config (the builder takes the config's model and moe sections)."""
    return build_backbone_from_sections(cfg.model, cfg.moe, **kwargs)

SMALL = {"dim": 128, "depth": 4, "heads": 4, "head_dim": 64, "tasks": 3, "attn_experts": 6, "mlp_experts": 4,
         "mlp_top_k": 2, "mlp_hidden": 256, "patch": 8, "img": 64}
SMALL_OVERRIDES = ["model.size=vit_debug", "moe.num_experts=4", "moe.top_k=2", "moe.attn_num_experts=6",
                   "moe.attn_top_k=4", "moe.attn_head_dim=64", "moe.dense_attn_head_dim=64", "moe.prob_eps=1e-4",
                   "moe.gate=raw"]


def official_shapes(*, dim, depth, heads, head_dim, tasks, attn_experts, mlp_experts, mlp_hidden, patch, img,
                    noisy=False, classes=5, **_) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of Mod-Squad's model (read from its models_mt.py / models_moe.py / moe.py)."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, (img // patch) ** 2 + 1, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "task_embedding": (1, tasks, dim)}
    gate_rows = 2 if noisy else 1
    for i in range(depth):
        b = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            shapes[f"{b}{norm}.weight"] = shapes[f"{b}{norm}.bias"] = (dim,)
        if i % 2 == 0:  # MoETaskAttention + dense Mlp(dim, 4 * dim)
            shapes[f"{b}attn.q_proj.experts.w"] = (attn_experts, dim, head_dim)
            shapes[f"{b}attn.q_proj.output_experts.w"] = (attn_experts, head_dim, dim)
            shapes.update({f"{b}attn.q_proj.f_gate.{t}.0.weight": (gate_rows * attn_experts, dim)
                           for t in range(tasks)})
            shapes.update({f"{b}attn.kv_proj.0.weight": (2 * head_dim, dim),
                           f"{b}attn.kv_proj.0.bias": (2 * head_dim,)})
            shapes.update({f"{b}mlp.fc1.weight": (4 * dim, dim), f"{b}mlp.fc1.bias": (4 * dim,),
                           f"{b}mlp.fc2.weight": (dim, 4 * dim), f"{b}mlp.fc2.bias": (dim,)})
        else:  # dense Attention with head_dim + TaskMoE with biases
            inner = heads * head_dim
            shapes.update({f"{b}attn.qkv.weight": (3 * inner, dim), f"{b}attn.qkv.bias": (3 * inner,),
                           f"{b}attn.proj.weight": (dim, inner), f"{b}attn.proj.bias": (dim,)})
            shapes.update({f"{b}mlp.experts.w": (mlp_experts, dim, mlp_hidden),
                           f"{b}mlp.experts.b": (mlp_experts, mlp_hidden),
                           f"{b}mlp.output_experts.w": (mlp_experts, mlp_hidden, dim),
                           f"{b}mlp.output_experts.b": (mlp_experts, dim)})
            shapes.update({f"{b}mlp.f_gate.{t}.0.weight": (gate_rows * mlp_experts, dim) for t in range(tasks)})
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,), "fc_norm.weight": (dim,), "fc_norm.bias": (dim,)})
    for t in range(tasks):  # classification heads: LayerNorm -> Linear
        shapes.update({f"task_heads.{t}.0.weight": (dim,), f"task_heads.{t}.0.bias": (dim,),
                       f"task_heads.{t}.1.weight": (classes, dim), f"task_heads.{t}.1.bias": (classes,)})
    return shapes


def official_state_dict(seed: int = 0, **config) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in official_shapes(**config).items():
        x = torch.randn(shape, generator=gen)
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", ".0.weight")) and len(shape) == 1:
            x = 1 + 0.1 * x
        elif "f_gate" in name:
            x = 0.3 * x
        elif len(shape) == 1 or name in ("cls_token", "pos_embed"):
            x = 0.05 * x
        elif name != "task_embedding":
            x = x / shape[-2 if name.endswith("experts.w") else -1] ** 0.5
        sd[name] = x
    return sd


def _gating(h_SD, w_ED, k):
    probs = torch.softmax(h_SD @ w_ED.t(), dim=-1) + 1e-4
    return probs.topk(k, dim=-1)


def _moe_attention(sd, p, h_BND, t, heads, hd):
    b, n, d = h_BND.shape
    h_SD = h_BND.reshape(-1, d)
    num_e = sd[p + "q_proj.experts.w"].shape[0]
    gates_SK, idx_SK = _gating(h_SD, sd[f"{p}q_proj.f_gate.{t}.0.weight"][:num_e], heads)
    q_SEH = torch.einsum("sd,edh->seh", h_SD, sd[p + "q_proj.experts.w"])
    q = q_SEH.gather(1, idx_SK[..., None].expand(-1, -1, hd)).view(b, n, heads, hd)
    k, v = (h_BND @ sd[p + "kv_proj.0.weight"].t() + sd[p + "kv_proj.0.bias"]).chunk(2, dim=-1)
    attn = (torch.einsum("bihd,bjd->bhij", q, k) * hd**-0.5).softmax(dim=-1)
    o_SKH = torch.einsum("bhij,bjd->bihd", attn, v).reshape(-1, heads, hd)
    y_SKD = torch.einsum("skh,skhd->skd", o_SKH, sd[p + "q_proj.output_experts.w"][idx_SK])
    return (y_SKD * gates_SK[..., None]).sum(1).view(b, n, d)


def _moe_mlp(sd, p, h_BND, t, k):
    h_SD = h_BND.reshape(-1, h_BND.shape[-1])
    num_e = sd[p + "experts.w"].shape[0]
    gates_SK, idx_SK = _gating(h_SD, sd[f"{p}f_gate.{t}.0.weight"][:num_e], k)
    hid = F.gelu(torch.einsum("sd,skdh->skh", h_SD, sd[p + "experts.w"][idx_SK]) + sd[p + "experts.b"][idx_SK])
    out = torch.einsum("skh,skhd->skd", hid, sd[p + "output_experts.w"][idx_SK]) + sd[p + "output_experts.b"][idx_SK]
    return (out * gates_SK[..., None]).sum(1).view_as(h_BND)


def _dense_attention(sd, p, h_BND, heads, hd):
    b, n, _ = h_BND.shape
    q, k, v = F.linear(h_BND, sd[p + "qkv.weight"], sd[p + "qkv.bias"]).view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    o = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(dim=-1) @ v
    return F.linear(o.transpose(1, 2).reshape(b, n, heads * hd), sd[p + "proj.weight"], sd[p + "proj.bias"])


def modsquad_forward(sd, images, t, *, heads, head_dim, mlp_top_k, depth, patch, **_):
    """Mod-Squad's tokens for task t: (final-normed patch tokens [B, N, D], class logits [B, C])."""
    def ln(x, name, eps=1e-6):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)

    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    for i in range(depth):
        b = f"blocks.{i}."
        x = x + sd["task_embedding"][:, t:t + 1]
        h = ln(x, b + "norm1")
        x = x + (_moe_attention(sd, b + "attn.", h, t, heads, head_dim) if i % 2 == 0
                 else _dense_attention(sd, b + "attn.", h, heads, head_dim))
        h = ln(x, b + "norm2")
        if i % 2 == 1:
            x = x + _moe_mlp(sd, b + "mlp.", h, t, mlp_top_k)
        else:
            x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                             sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    pooled = ln(x[:, 1:].mean(dim=1), "fc_norm")
    logits = F.linear(ln(pooled, f"task_heads.{t}.0", eps=1e-5), sd[f"task_heads.{t}.1.weight"],
                      sd[f"task_heads.{t}.1.bias"])
    return ln(x, "norm")[:, 1:], logits


def test_imported_backbone_computes_modsquads_forward():
    sd = official_state_dict(**SMALL)
    vit = build_backbone(load_config(None, SMALL_OVERRIDES)).eval()
    report = import_modsquad(vit, sd)
    assert report["missing"] == [] and report["unexpected"] == [] and report["dropped"] == []
    assert sorted(report["ignored"]) == sorted(k for k in sd if k.startswith(("fc_norm.", "task_heads.")))
    images = torch.randn(2, 3, SMALL["img"], SMALL["img"], generator=torch.Generator().manual_seed(3))
    for t in range(SMALL["tasks"]):
        head = ClsHead(dim=SMALL["dim"], num_classes=5, order="modsquad").eval()
        head.load_state_dict({"fc_norm.weight": sd["fc_norm.weight"], "fc_norm.bias": sd["fc_norm.bias"],
                              "head_norm.weight": sd[f"task_heads.{t}.0.weight"],
                              "head_norm.bias": sd[f"task_heads.{t}.0.bias"],
                              "fc.weight": sd[f"task_heads.{t}.1.weight"], "fc.bias": sd[f"task_heads.{t}.1.bias"]})
        task_B = torch.full((2,), t)
        with torch.no_grad():
            raw = vit.forward_features(images, task_B, norm=head.backbone_norm)  # un-normed: Mod-Squad's class path
            tokens, logits = vit.norm(raw)[:, 1:], head(raw)
            ref_tokens, ref_logits = modsquad_forward(sd, images, t, **SMALL)
        torch.testing.assert_close(tokens, ref_tokens, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_without_prob_eps_the_outputs_differ_slightly():
    sd = official_state_dict(**SMALL)
    vit = build_backbone(load_config(None, [*SMALL_OVERRIDES, "moe.prob_eps=0"])).eval()
    import_modsquad(vit, sd)
    images = torch.randn(1, 3, SMALL["img"], SMALL["img"])
    with torch.no_grad():
        diff = (vit.forward_features(images, torch.tensor([1]))[:, 1:] - modsquad_forward(sd, images, 1, **SMALL)[0])
    assert 1e-5 < diff.abs().max() < 0.1


def test_strict_import_names_missing_unexpected_and_bad_shapes():
    sd = official_state_dict(**SMALL)
    vit = build_backbone(load_config(None, SMALL_OVERRIDES))
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.mlp.experts.b2'\]"):
        import_modsquad(vit, {k: v for k, v in sd.items() if k != "blocks.1.mlp.output_experts.b"})
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.0.attn.extra'\]"):
        import_modsquad(vit, {**sd, "blocks.0.attn.extra": torch.zeros(1)})
    small_heads = build_backbone(load_config(None, [*SMALL_OVERRIDES, "moe.dense_attn_head_dim=0"]))
    with pytest.raises(ValueError, match=r"blocks.1.attn.proj.weight has shape \(128, 256\).*moe.dense_attn_head_dim"):
        import_modsquad(small_heads, sd)
    report = import_modsquad(vit, {k: v for k, v in sd.items() if k != "pos_embed"}, strict=False)
    assert report["missing"] == ["pos_embed"]


def test_noisy_gate_rows_and_task_map():
    sd = official_state_dict(**{**SMALL, "tasks": 5}, noisy=True)
    vit = build_backbone(load_config(None, [*SMALL_OVERRIDES, "moe.noisy=true"]))
    with pytest.raises(ValueError, match="5 tasks, this model 3"):
        import_modsquad(vit, sd)
    task_map = parse_task_map("cls=4,det=0,seg=2", ("cls", "det", "seg"))
    report = import_modsquad(vit, sd, task_map=task_map)
    assert len(report["dropped"]) == 2 * 4  # tasks 1 and 3 in each of the 4 MoE layers
    gate = sd["blocks.1.mlp.f_gate.4.0.weight"]
    assert torch.equal(vit.blocks[1].mlp.router.weight[0], gate[:4])  # clean logits: rows :E
    assert torch.equal(vit.blocks[1].mlp.router.noise_weight[0], gate[4:])  # noise std: rows E:
    assert torch.equal(vit.task_embed, sd["task_embedding"][0, [4, 0, 2]])
    with pytest.raises(ValueError, match="NAME=INDEX"):
        parse_task_map("cls=1", ("cls", "det", "seg"))


def test_files_are_read_weights_only_and_the_cli_writes_safetensors(tmp_path):
    sd = official_state_dict(**SMALL)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1.0)}, pickled)  # what MAE-style trainers save
    vit = build_backbone(load_config(None, SMALL_OVERRIDES))
    with pytest.raises(ValueError, match="refused, it pickles more than tensors .*Unsupported global"):
        import_modsquad(vit, pickled)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "epoch": torch.tensor(99)}, ckpt)
    config = tmp_path / "small.yaml"
    config.write_text("model: {size: vit_debug}\nmoe: {num_experts: 4, top_k: 2, attn_num_experts: 6, attn_top_k: 4, "
                      "attn_head_dim: 64, dense_attn_head_dim: 64, prob_eps: 1.0e-4, gate: raw}\n")
    out = tmp_path / "backbone.safetensors"
    assert cli_main(["import-modsquad", str(ckpt), "--config", str(config), "--out", str(out)]) == 0
    imported = load_file(str(out))
    import_modsquad(vit, sd)
    assert imported.keys() == vit.state_dict().keys()
    assert all(torch.equal(imported[k], v) for k, v in vit.state_dict().items())
    assert cli_main(["import-modsquad", str(pickled), "--config", str(config), "--out", str(out)]) == 2


def test_vitb16_modsquad_config_has_modsquads_backbone_parameter_count():
    """Mod-Squad's mtvit_taskgate_att_mlp_base_MI_twice backbone at T=3 (heads and fc_norm excluded)."""
    base = {"dim": 768, "depth": 12, "heads": 12, "head_dim": 128, "tasks": 3, "attn_experts": 24,
            "mlp_experts": 16, "mlp_hidden": 768, "patch": 16, "img": 224}
    shapes = official_shapes(**base)
    official = sum(torch.Size(s).numel() for k, s in shapes.items() if not k.startswith(("fc_norm.", "task_heads.")))
    cfg = load_config("configs/pretrain/vitb16_modsquad_hetero.yaml")
    with torch.device("meta"):
        ours = sum(p.numel() for p in build_backbone(cfg).parameters())
        narrow = sum(p.numel() for p in build_backbone(
            load_config("configs/pretrain/vitb16_modsquad_hetero.yaml", ["moe.dense_attn_head_dim=0"])).parameters())
    assert ours == official == 200_901_120
    assert official - narrow == 6 * (3 * 768 * 768 + 768 * 768 + 3 * 768)  # 14.2 M: the six dense blocks' heads
