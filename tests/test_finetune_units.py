"""Fine-tuning pieces that need no data: the schema, the dense losses (hand-computed values), router-row selection,
frozen parts."""

import math

import pytest
import torch

from pretrain.config.finetuning import FinetuneConfig
from pretrain.config.load import load_config
from pretrain.config.pretraining import ConfigError
from pretrain.data.dense_transforms import SCALE_RANGE
from pretrain.finetune import losses
from pretrain.finetune.init import select_task_rows_
from pretrain.models import build_backbone
from pretrain.models.moe_losses import moe_modules


def test_schema_shares_sections_and_reports_errors():
    cfg = load_config(None, ["optim.lr=2e-5", "finetune.decoder=mlore", "tasks.depth.enabled=false"],
                      schema=FinetuneConfig)
    assert cfg.optim.lr == 2e-5 and cfg.finetune.decoder == "mlore" and not cfg.tasks["depth"].enabled
    for bad, fragment in [("finetune.routing=sometimes", "finetune.routing"),
                          ("tasks.cls.enabled=true", "unknown task"), ("data.train_size=[8,8]", "data.train_size"),
                          ("engine.ep_size=2", "engine.ep_size"),
                          ("finetune.edge_pos_weight=1.0", "edge_pos_weight"), ("finetune.nope=1", "finetune.nope"),
                          ("data.scale_range=[0,2]", "data.scale_range"),
                          ("data.scale_range=[2,1]", "data.scale_range")]:
        with pytest.raises(ConfigError, match=fragment):
            load_config(None, [bad], schema=FinetuneConfig)


def test_scale_range_defaults_to_the_protocol():
    cfg = load_config(None, [], schema=FinetuneConfig)
    assert tuple(cfg.data.scale_range) == SCALE_RANGE
    narrow = load_config(None, ["data.scale_range=[0.67,1.5]"], schema=FinetuneConfig)
    assert tuple(narrow.data.scale_range) == (0.67, 1.5)


def test_cross_entropy_ignores_255_and_all_ignored_is_zero():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # [1, 2 classes, 1, 2]
    target = torch.tensor([[[0, 255]]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert math.isclose(float(losses.cross_entropy(logits, target)), expected, rel_tol=1e-6)
    assert float(losses.cross_entropy(logits, torch.full_like(target, 255))) == 0.0


def test_balanced_cross_entropy_weights_from_the_batch():
    logits = torch.zeros(1, 2, 1, 4)  # p = 0.5 everywhere: per-pixel NLL = log 2
    target = torch.tensor([[[1, 0, 0, 255]]])  # 1 of 3 labelled pixels is foreground: w = 2/3
    # class 1 pixels weigh w = 2/3, class 0 pixels 1 - w = 1/3; mean over the 3 labelled pixels
    expected = (2 / 3 + 1 / 3 + 1 / 3) * math.log(2) / 3
    assert math.isclose(float(losses.balanced_cross_entropy(logits, target)), expected, rel_tol=1e-6)


def test_balanced_bce_scales_positives():
    pred = torch.zeros(1, 1, 1, 3)
    target = torch.tensor([[[[1.0, 0.0, 255.0]]]])
    w = 0.95
    expected = (w / (1 - w) * math.log(2) + math.log(2)) / 2 * (1 - w)
    assert math.isclose(float(losses.balanced_bce(pred, target, pos_weight=w)), expected, rel_tol=1e-6)


def test_normals_l1_normalises_and_ignores():
    pred = torch.tensor([[[[2.0, 1.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])  # both normalise to (1, 0, 0)
    target = torch.tensor([[[[0.0, 255.0]], [[1.0, 255.0]], [[0.0, 255.0]]]])
    assert math.isclose(float(losses.normals_l1(pred, target)), 2.0 / 3, rel_tol=1e-6)  # |1-0| + |0-1| + 0 over 3


def test_depth_l1_ignores_invalid():
    pred = torch.tensor([[[[1.0, 5.0, 2.0]]]])
    target = torch.tensor([[[[2.0, 0.0, 2.5]]]])
    assert math.isclose(float(losses.depth_l1(pred, target)), 0.75, rel_tol=1e-6)


def test_select_task_rows_copies_one_pretraining_router():
    cfg = load_config(None, ["model.size=vit_debug", "moe.num_experts=4", "moe.top_k=2", "moe.attn_num_experts=4",
                             "moe.attn_top_k=2", "moe.router_init=normal"])
    torch.manual_seed(0)
    vit = build_backbone(cfg.model, cfg.moe)
    seg_rows = {name: m.router.weight[2].clone() for name, m in moe_modules(vit)}
    seg_embed = vit.task_embed[2].clone()
    select_task_rows_(vit, [2, 2, 2, 2])
    assert vit.num_tasks == 4 and vit.task_embed.shape[0] == 4
    for name, m in moe_modules(vit):
        assert m.router.weight.shape[0] == 4 and m.usage_TE.shape[0] == 4 and m.num_tasks == 4
        assert all(torch.equal(m.router.weight[t], seg_rows[name]) for t in range(4))
    assert torch.equal(vit.task_embed[3], seg_embed)
    x = torch.randn(2, 3, 32, 32)
    out = vit.forward_features(x, torch.tensor([0, 3]))  # every new row routes
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_select_task_rows_keeps_a_grown_model_expert_limits():
    """A model grown by `pretrain add-task` with new experts: old tasks route over their first E experts only; the
    rows copied for fine-tuning keep the limit of the row they copy (the buffer once kept the old tasks' count)."""
    from pretrain.models.grow_layers import LimitedRouting, layer_factories

    cfg = load_config(None, ["model.size=vit_debug", "moe.num_experts=6", "moe.top_k=2", "moe.attn_num_experts=6",
                             "moe.attn_top_k=2"])
    meta = {"task_experts": {"mlp": {"cls": 4, "det": 4, "seg": 4}, "attn": {"cls": 4, "det": 4, "seg": 4}}}
    factories = layer_factories(meta, ("cls", "det", "seg", "new"), cfg.moe)
    vit = build_backbone(cfg.model, cfg.moe, num_tasks=4, **factories)
    layers = [m for _, m in moe_modules(vit) if isinstance(m, LimitedRouting)]
    assert layers and all(m.task_experts == [4, 4, 4, 6] for m in layers)
    select_task_rows_(vit, [3, 2, 3])  # two dense tasks from the added task's row, one from seg's
    for m in layers:
        assert m.task_experts == [6, 4, 6] and m.task_experts_T.tolist() == [6, 4, 6]
    out = vit.forward_features(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    assert torch.isfinite(out).all()


def test_a_trained_backbone_fine_tunes_in_train_mode(tmp_path):
    """A model file's backbone comes in eval mode (`load_model`); the fine-tuning model trains every part in train
    mode, as one from random init does (routing noise, MoE auxiliary losses and usage updates are train-mode only)."""
    from test_extract import model_file

    from pretrain.finetune.build import DenseData, build_dense_model

    path, _ = model_file(tmp_path / "model.safetensors")
    cfg = load_config(None, [f"finetune.init_from={path}", "data.dataset=nyud", "finetune.decoder=heads"],
                      schema=FinetuneConfig)
    data = DenseData("nyud", tmp_path, tmp_path, 0, {"semseg": 40})
    model, _ = build_dense_model(cfg, data)
    assert all(m.training for m in model.modules())


def test_a_model_file_defines_the_backbone_and_a_conflicting_override_is_refused(tmp_path, capsys):
    """`finetune.init_from=MODEL` (vit_debug, 8 experts, top-2, attention top-2): the config's model/moe fields take
    the file's values, from the schema's defaults or the overlay's (the saved config tells the truth); a key=value
    override that contradicts the file is refused with one line naming both values, before anything is written."""
    from pathlib import Path

    import yaml
    from test_extract import model_file

    from pretrain.cli import main as cli_main
    from pretrain.finetune.init import build_finetune_backbone

    path, _ = model_file(tmp_path / "model.safetensors")
    cfg = load_config(None, [f"finetune.init_from={path}"], schema=FinetuneConfig)
    assert (cfg.model.size, cfg.moe.num_experts, cfg.moe.top_k) == ("vit_b16", 16, 4)  # the schema's defaults
    vit, _ = build_finetune_backbone(cfg, ["semseg"])
    assert (cfg.model.size, cfg.moe.num_experts, cfg.moe.top_k) == ("vit_debug", 8, 2)
    assert {m.num_experts for _, m in moe_modules(vit)} == {8}
    config = str(Path(__file__).resolve().parents[1] / "configs/debug/finetune.yaml")  # moe.attn_top_k: 4
    assert cli_main(["finetune", config, f"finetune.init_from={path}", f"output_dir={tmp_path / 'ok'}",
                     "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out.split("\n{")[0])  # the resolved config, then the counts
    assert (printed["moe"]["attn_top_k"], printed["moe"]["num_experts"]) == (2, 8)
    for override, source in (("moe.num_experts=4", 8), ("moe.attn_top_k=4", 2), ("model.size=vit_s16", "vit_debug")):
        code = cli_main(["finetune", config, f"finetune.init_from={path}", override,
                         f"output_dir={tmp_path / 'run'}", "--dry-run"])
        err = capsys.readouterr().err
        key = override.split("=")[0]
        assert code == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == (
            f"pretrain finetune: error: {override} conflicts with finetune.init_from={path}, whose backbone has "
            f"{key}={source}: the source defines the architecture; drop the override")
    assert not (tmp_path / "run").exists()


def test_a_damaged_backbone_record_is_a_checkpoint_error_naming_it(tmp_path):
    """`backbone.json` cut short or from a newer version: exit 5's error naming the file, never a traceback."""
    from pretrain.errors import CheckpointError
    from pretrain.finetune.record import RECORD, read_record

    assert read_record(tmp_path) is None  # a run from before records
    (tmp_path / RECORD).write_text('{"version": 1, "kind": ')
    with pytest.raises(CheckpointError, match=f"{tmp_path / RECORD}: not a readable backbone record"):
        read_record(tmp_path)
    (tmp_path / RECORD).write_text('{"version": 99}')
    with pytest.raises(CheckpointError, match="version 99 is newer"):
        read_record(tmp_path)
