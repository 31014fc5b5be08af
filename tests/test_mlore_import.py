"""`pretrain import-mlore`: an official-format MLoRE checkpoint (official names and shapes, random values, tiny width)
imports into the dense model and computes the official forward; bad checkpoints are one line and exit 2. Also the
no-class-token backbone geometry (`model.class_token`, `model.pos_grid`) on its own.

The official model is rebuilt here from its two halves: timm's VisionTransformer (`class_token=False`,
`global_pool=''`) for the ViT, with the official `pos_embed` [1, 1 + h·w, D] whose row 0 the forward skips, and the
in-tree transcription `OfficialMoEBlock` (decoders/mlore_official.py) for the decoder; the ViT-B extras (`q_fuse`,
`classify_route_{1,2}`, `aux_heads`) are present and unused, as in the official code. Tolerance: predictions within
1e-5 of the largest official output (float32 on CPU; the decoder runs its merged inference form here).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from mlore_testing import OfficialConvHead, one_thread  # noqa: F401 - one_thread: an autouse fixture
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from pretrain.cli import main as cli_main
from pretrain.config.finetuning import FinetuneConfig, enabled_dense_tasks
from pretrain.config.load import load_config
from pretrain.config.pretraining import ConfigError, ModelConfig, MoEConfig
from pretrain.finetune.init import build_finetune_backbone, load_source_decoder_, mlore_import_target
from pretrain.models import build_backbone
from pretrain.models.decoders import MLORE_PRESETS, build_mlore, official_to_ours
from pretrain.models.decoders.mlore import default_taps
from pretrain.models.decoders.mlore_keys import unused_official_group
from pretrain.models.decoders.mlore_official import OfficialMoEBlock
from pretrain.models.dense import DenseModel
from pretrain.models.heads.det import IMAGENET_MEAN, IMAGENET_STD
from pretrain.models.mlore_import import official_shape, split_official
from pretrain.models.upcycle import upcycle_vit
from pretrain.models.vit import VisionTransformer

PASCAL = {"semseg": 21, "human_parts": 7, "sal": 2, "normals": 3, "edge": 1}
DEC = {"channels": 16, "ranks": (2, 3, 4, 5, 6), "spe_rank": 3, "top_k": 3, "pre_softmax": False}
IMG, PATCH, DIM, DEPTH = (32, 48), 8, 128, 4  # vit_debug: patch 8, width 128, 4 blocks, 4 heads; a 4×6 grid
GRID = (IMG[0] // PATCH, IMG[1] // PATCH)
CONFIG = f"""
data: {{dataset: pascal_context, train_size: [{IMG[0]}, {IMG[1]}], eval_size: [{IMG[0]}, {IMG[1]}]}}
tasks: {{semseg: {{}}, human_parts: {{}}, normals: {{}}, edge: {{}}, sal: {{enabled: false}},
        depth: {{enabled: false}}}}
finetune: {{decoder: mlore, routing: shared, decoder_options: {{channels: 16, ranks: [2, 3, 4, 5, 6], spe_rank: 3,
            top_k: 3, pre_softmax: false}}}}
model: {{size: vit_debug, task_embed: false, drop_path: 0.0}}
moe: {{placement: dense}}
"""


OfficialHead = OfficialConvHead


class OfficialBackbone(nn.Module):
    """`MLoRE` (ViT-B file: with q_fuse and classify_route) in its checkpoint names; eval forward (tiny sizes)."""

    def __init__(self, tasks: dict[str, int], *, img=IMG, patch=PATCH, dim=DIM, depth=DEPTH, heads=4,
                 dec=DEC) -> None:
        super().__init__()
        vit = TimmViT(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, class_token=False,
                      global_pool="", num_classes=0)
        self.patch_embed, self.blocks, self.norm = vit.patch_embed, vit.blocks, vit.norm
        self.pos_embed = nn.Parameter(torch.cat([torch.randn(1, 1, dim), vit.pos_embed.detach()], dim=1))
        hw = vit.patch_embed.grid_size[0] * vit.patch_embed.grid_size[1]
        c, kw = dec["channels"], {"tasks": list(tasks), "hw": hw, **dec}
        self.fea_fuse = nn.ModuleList(nn.Conv2d(dim, c, 1) for _ in range(4))
        self.MLoRE_1 = nn.ModuleList(OfficialMoEBlock(**kw) for _ in range(4))
        self.MLoRE_2 = nn.ModuleList(OfficialMoEBlock(**kw) for _ in range(4))
        self.task_mask = nn.ModuleDict({t: nn.Sequential(nn.Conv2d(4 * c, c, 1), nn.BatchNorm2d(c), nn.GELU(),
                                                         nn.Conv2d(c, 4, 3, padding=1)) for t in tasks})
        self.q_fuse = nn.ModuleDict({t: nn.Conv2d(4 * c, c, 1) for t in tasks})
        self.classify_route_1 = nn.Conv2d(c // 2, len(tasks), 1)
        self.classify_route_2 = nn.Conv2d(c // 2, len(tasks), 1)

    def level(self, x: torch.Tensor, lvl: int) -> dict[str, torch.Tensor]:
        fea = self.fea_fuse[lvl](x.transpose(1, 2).reshape(x.shape[0], DIM, *GRID))
        return {t: self.MLoRE_2[lvl](self.MLoRE_1[lvl](fea, t)[0], t)[0] for t in self.task_mask}

    def forward(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch_embed(img) + self.pos_embed[:, 1:]  # the official forward skips row 0
        levels = []
        for idx, blk in enumerate(self.blocks):
            x = blk(x)
            if idx + 1 in (1, 2, 3):  # select_list of a 4-block model: taps 0, 1, 2 (+ the last, normed)
                levels.append(self.level(x, len(levels)))
        levels.append(self.level(self.norm(x), 3))
        out = {}
        for t in self.task_mask:
            feats = [lv[t] for lv in levels]
            mask = torch.softmax(self.task_mask[t](torch.cat(feats, dim=1)), dim=1)
            out[t] = F.interpolate(sum(mask[:, i:i + 1] * feats[i] for i in range(4)), scale_factor=4,
                                   mode="bilinear")
        return out


class OfficialWrapper(nn.Module):
    """`MLoREWrapper` (ViT-B: keeps `aux_heads`, never calls them)."""

    def __init__(self, tasks: dict[str, int], **sizes) -> None:
        super().__init__()
        self.backbone = OfficialBackbone(tasks, **sizes)
        c = sizes.get("dec", DEC)["channels"]
        self.heads = nn.ModuleDict({t: OfficialHead(c, n) for t, n in tasks.items()})
        self.aux_heads = nn.ModuleDict({t: OfficialHead(c, n) for t, n in tasks.items()})
        if next(self.parameters()).is_meta:
            return
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # non-trivial BN statistics, so folding and loading them is really tested
            for bn in (m for m in self.modules() if isinstance(m, nn.BatchNorm2d)):
                bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)

    def forward(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(img)
        return {t: F.interpolate(h.linear_pred(h.mt_proj(feats[t])), img.shape[-2:], mode="bilinear")
                for t, h in self.heads.items()}


@pytest.fixture(scope="module")
def official() -> OfficialWrapper:
    torch.manual_seed(0)
    return OfficialWrapper(PASCAL).eval()


def save_checkpoint(path, sd: dict[str, torch.Tensor], **extra) -> str:
    """As main.py saves it: DDP `module.` names under `model`, with counters."""
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3, "iter_count": 2000, **extra}, path)
    return str(path)


def run_import(tmp_path, capsys, sd, *overrides, name="ckpt.pth.tar", **extra) -> tuple[int, str, str]:
    config = tmp_path / "mlore.yaml"
    config.write_text(CONFIG)
    ckpt = save_checkpoint(tmp_path / name, sd, **extra)
    capsys.readouterr()
    rc = cli_main(["import-mlore", ckpt, *overrides, "--config", str(config), "--out",
                   str(tmp_path / "dense.safetensors")])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_official_taps_are_the_default_taps():
    # official select_list: ViT-L range(6, 24, 6), ViT-B/S range(3, 12, 3) (1-based block counts) + the last block
    assert default_taps(24) == (5, 11, 17, 23) and default_taps(12) == (2, 5, 8, 11)


def test_import_then_finetune_init_computes_the_official_forward(tmp_path, capsys, official):
    sd = official.state_dict()
    rc, out, err = run_import(tmp_path, capsys, sd)
    assert rc == 0, err
    report = json.loads(out)
    dropped = {group: entry["keys"] for group, entry in report["dropped"].items()}
    assert dropped == {"q_fuse": 2 * 5, "classify_route": 4, "aux_heads": 9 * 5,
                       "tasks_left_out": dropped["tasks_left_out"], "pos_embed_class_row": 0}
    unused = ("aux_heads.", "backbone.q_fuse.")
    assert dropped["tasks_left_out"] == len([k for k in sd if ".sal." in k and not k.startswith(unused)])
    assert report["mapped"]["backbone"] == 2 + 12 * DEPTH + 1 + 2  # patch 2, 12 per block, pos_embed, norm 2
    assert report["official_keys"] == sum(report["mapped"].values()) + sum(dropped.values())
    assert report["grid"] == list(GRID) and "finetune.decoder_options.router_hw=[4,6]" in report["finetune_overrides"]

    cfg = load_config(tmp_path / "mlore.yaml", [f"finetune.init_from={report['out']}",
                                                "finetune.decoder_options.router_pool=linear",
                                                "finetune.decoder_options.router_hw=[4,6]"], schema=FinetuneConfig)
    tasks = enabled_dense_tasks(cfg)
    backbone, _ = build_finetune_backbone(cfg, tasks)
    assert backbone.cls_token is None and backbone.pos_embed.shape == (1, GRID[0] * GRID[1], DIM)
    assert torch.equal(backbone.pos_embed, sd["backbone.pos_embed"][:, 1:])
    decoder = build_mlore(embed_dim=DIM, depth=DEPTH, tasks={t: PASCAL[t] for t in tasks},
                          **cfg.finetune.decoder_options)
    assert load_source_decoder_(cfg, decoder)
    model = DenseModel(backbone=backbone, decoder=decoder, tasks=tasks, routing="shared",
                       losses=dict.fromkeys(tasks, F.l1_loss)).eval()
    images = torch.randint(0, 256, (2, 3, *IMG), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        want = official((images.float() - mean) / std)
        got = model(images)
    for t in tasks:
        err_t = float((got[t] - want[t]).abs().max() / want[t].abs().max())
        assert err_t < 1e-5, (t, err_t)

    heads_cfg = replace(cfg, finetune=replace(cfg.finetune, decoder="heads", decoder_options={}))
    assert not load_source_decoder_(heads_cfg, decoder)  # another decoder: only the backbone is taken
    attention = build_mlore(embed_dim=DIM, depth=DEPTH, tasks={t: PASCAL[t] for t in tasks}, **DEC)
    with pytest.raises(ValueError, match="set them to the file's"):  # router_pool=attention: options differ
        load_source_decoder_(cfg, attention)


@pytest.mark.parametrize("config, tasks, sizes", [
    ("pascal_vitl", PASCAL, {"img": (512, 512), "patch": 16, "dim": 1024, "depth": 24, "heads": 16}),
    ("pascal_vitb", PASCAL, {"img": (512, 512), "patch": 16, "dim": 768, "depth": 12, "heads": 12}),
    ("nyud_vitl", {"semseg": 40, "depth": 1, "normals": 3, "edge": 1},
     {"img": (448, 576), "patch": 16, "dim": 1024, "depth": 24, "heads": 16}),
])
def test_official_names_and_shapes_at_full_size_fit_the_shipped_configs(config, tasks, sizes):
    """Every key of an official-format state dict at the real sizes lands on a same-shaped tensor (meta device)."""
    cfg = load_config(f"configs/finetune/{config}_mlore.yaml", schema=FinetuneConfig)
    preset = MLORE_PRESETS[config]
    dec = {k: preset[k] for k in ("channels", "ranks", "spe_rank", "top_k", "pre_softmax")}
    with torch.device("meta"):
        sd = OfficialWrapper(tasks, dec=dec, **sizes).state_dict()
        if config != "pascal_vitb":  # only the ViT-B model file and wrapper build the unused modules
            sd = {k: v for k, v in sd.items() if unused_official_group(k) is None}
        _, vit, decoder, options = mlore_import_target(cfg, official_shape(sd), config)
    vit_sd, decoder_sd, dropped = split_official(sd, set(tasks))
    ours = official_to_ours(decoder_sd)
    for module, mapped in ((vit, vit_sd), (decoder, ours)):
        own = module.state_dict()
        assert own.keys() == mapped.keys()
        assert all(own[k].shape == mapped[k].shape for k in own)
    assert options["router_hw"] == [sizes["img"][0] // 16, sizes["img"][1] // 16]
    assert sum(map(len, dropped.values())) == (len(tasks) * 11 + 4 if config == "pascal_vitb" else 0)


@pytest.mark.parametrize("damage, fragment", [
    ("missing", "missing keys ['blocks.1.1.tail_proj.semseg.weight']"),
    ("unknown_decoder", "does not know: ['backbone.mystery.weight']"),
    ("unknown_vit", "1 unknown keys ['blocks.0.attn.extra']"),
    ("shape", "backbone key blocks.2.mlp.fc1.weight has shape"),
    ("pickle", "refused, it pickles more than tensors"),
    ("grid", "position embedding holds 24 patches"),
    ("not_mlore", "not an official MLoRE checkpoint: no backbone.patch_embed.proj.weight"),
])
def test_bad_checkpoints_are_one_line_and_exit_2(tmp_path, capsys, official, damage, fragment):
    sd = dict(official.state_dict())
    extra, overrides = {}, []
    if damage == "missing":
        del sd["backbone.MLoRE_2.1.conv3.semseg.weight"]
    elif damage == "unknown_decoder":
        sd["backbone.mystery.weight"] = torch.zeros(1)
    elif damage == "unknown_vit":
        sd["backbone.blocks.0.attn.extra"] = torch.zeros(1)
    elif damage == "shape":
        sd["backbone.blocks.2.mlp.fc1.weight"] = torch.zeros(7, DIM)
    elif damage == "pickle":
        extra = {"args": argparse.Namespace(lr=2e-5)}  # a pickled object: torch.load(weights_only=True) refuses it
    elif damage == "grid":
        overrides = ["data.train_size=[32,32]"]
    elif damage == "not_mlore":
        sd = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4).state_dict()
    rc, _, err = run_import(tmp_path, capsys, sd, *overrides, **extra)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("pretrain import-mlore: error:"), err
    assert fragment in err, err
    assert not (tmp_path / "dense.safetensors").exists()


def test_no_class_token_backbone_equals_timm_at_a_non_square_stored_grid():
    model = ModelConfig(size="vit_debug", task_embed=False, drop_path=0.0, class_token=False, pos_grid=GRID)
    ours = build_backbone(model, MoEConfig(placement="dense")).eval()
    timm_vit = TimmViT(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=4, class_token=False,
                       global_pool="", num_classes=0).eval()
    assert ours.state_dict().keys() == timm_vit.state_dict().keys() and ours.num_prefix_tokens == 0
    ours.load_state_dict(timm_vit.state_dict())
    x = torch.randn(2, 3, *IMG)
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(x, torch.zeros(2, dtype=torch.long)), timm_vit.forward_features(x),
                              atol=1e-5)
        maps = ours.forward_intermediates(x, torch.zeros(2, dtype=torch.long), indices=[1, 3], intermediates_only=True)
    assert [m.shape for m in maps] == [(2, DIM, *GRID)] * 2
    assert "cls_token" not in ours.no_weight_decay()


def test_upcycling_a_timm_vit_into_the_no_class_token_geometry(tmp_path):
    timm_vit = TimmViT(img_size=32, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=4)  # 4×4 grid + class
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in timm_vit.state_dict().items()}, str(path))
    vit = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=4, class_token=False)
    report = upcycle_vit(vit, path)
    assert "cls_token" in report["ignored"] and not report["unexpected"]
    grid = timm_vit.pos_embed.detach()[:, 1:].reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=GRID, mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, -1, DIM)
    assert torch.allclose(vit.pos_embed, want, atol=1e-6)
    assert {"head.weight", "head.bias"} <= set(report["ignored"])


def test_pos_grid_must_give_both_sides():
    with pytest.raises(ConfigError, match="model.pos_grid"):
        load_config(None, ["model.pos_grid=[0,4]"])
    with pytest.raises(ValueError, match="model.pos_grid"):
        build_backbone(ModelConfig(size="vit_debug", pos_grid=(3, 0)), MoEConfig(placement="dense"))
