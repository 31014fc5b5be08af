"""Task heads and the multi-task model: shapes, losses, gradients, parameter accounting, build_model."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config.pretraining import TASKS, RunConfig
from pretrain.models import DET_HEADS, SEG_HEADS
from pretrain.models import build_model as build_from_sections
from pretrain.models.heads import ClsHead, SegHead, SimpleFeaturePyramid
from pretrain.models.moe import MoEMlp
from pretrain.models.moe_attention import MoEAttention


def small_cfg(placement: str = "modsquad", det_head: str = "fasterrcnn", seg_head: str = "fpn") -> RunConfig:
    cfg = RunConfig()
    cfg.model.size, cfg.model.drop_path = "vit_debug", 0.0
    cfg.moe.placement = placement
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.attn_num_experts, cfg.moe.attn_top_k = 4, 2, 8, 4
    cfg.tasks["det"].head, cfg.tasks["seg"].head = det_head, seg_head
    cfg.model.det_min_size = cfg.model.det_max_size = 96
    cfg.model.pyramid_dim = 64
    for task, classes in {"cls": 10, "det": 5, "seg": 150}.items():
        cfg.tasks[task].num_classes = classes
    return cfg


def build_model(cfg: RunConfig, **kwargs):
    return build_from_sections(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks, **kwargs)


def images(b: int = 2, h: int = 64, w: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8)


def det_targets() -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 60.0, 44.0]]), "labels": torch.tensor([1, 5])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]


def all_task_targets() -> dict:
    return {"cls": torch.tensor([3, 9]), "det": det_targets(), "seg": torch.randint(0, 150, (2, 64, 64))}


def test_pyramid_strides_and_widths():
    pyr = SimpleFeaturePyramid(in_dim=128, out_channels=32)
    out = pyr(torch.randn(2, 128, 8, 6))
    assert list(out) == ["0", "1", "2", "3"]
    assert [tuple(v.shape) for v in out.values()] == [(2, 32, 32, 24), (2, 32, 16, 12), (2, 32, 8, 6), (2, 32, 4, 3)]
    assert SimpleFeaturePyramid(in_dim=128, out_channels=32, norm="gn")(torch.randn(1, 128, 4, 4))["3"].shape[-1] == 2
    with pytest.raises(ValueError, match="divisible by 4"):
        SimpleFeaturePyramid(in_dim=130)


def test_cls_head_shapes_and_loss():
    head = ClsHead(dim=32, num_classes=7, label_smoothing=0.1)
    logits = head(torch.randn(4, 1 + 16, 32))
    assert logits.shape == (4, 7)
    loss = head.loss(logits, torch.tensor([0, 1, 6, 2]))["cls"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"cls labels must lie in \[0, 7\)"):
        head.loss(logits, torch.tensor([0, 1, 7, 2]))


@pytest.mark.parametrize("kind", sorted(SEG_HEADS))
def test_seg_head_logits_at_input_size(kind):
    head = SegHead(in_dim=128, num_classes=150, kind=kind, pyramid_dim=64, decoder_dim=32)
    logits = head(torch.randn(2, 128, 9, 7), (72, 56))  # odd grid: the 2p level floors to 4×3
    assert logits.shape == (2, 150, 72, 56)
    masks = torch.randint(0, 150, (2, 72, 56))
    masks[0, :10] = 255
    loss = head.loss(logits, masks)["seg"]
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0


def test_seg_loss_ignores_255_and_checks_labels():
    logits = torch.randn(1, 5, 4, 4, requires_grad=True)
    masks = torch.full((1, 4, 4), 255)
    loss = SegHead.loss(logits, masks)["seg"]
    assert loss.item() == 0.0  # nothing labelled: 0, not NaN
    masks[0, 0, 0] = 2
    expected = torch.nn.functional.cross_entropy(logits[:, :, 0, 0], torch.tensor([2]))
    torch.testing.assert_close(SegHead.loss(logits, masks)["seg"], expected)
    masks[0, 0, 1] = 5
    with pytest.raises(ValueError, match=r"seg mask values must lie in \[0, 5\) or be 255"):
        SegHead.loss(logits, masks)


@pytest.mark.parametrize("det_head", sorted(DET_HEADS))
def test_detector_train_losses_and_eval_boxes(det_head):
    torch.manual_seed(0)
    model = build_model(small_cfg("m3vit", det_head=det_head))
    losses = model("det", images(), det_targets())
    assert losses and all(k.startswith("det_") for k in losses)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        preds = model("det", images(2, 64, 48))  # resized to 96 inside, boxes mapped back to 64×48
    assert len(preds) == 2
    for p in preds:
        assert p["boxes"].shape[1] == 4 and p["boxes"].shape[0] == p["scores"].shape[0] == p["labels"].shape[0]
        if len(p["boxes"]):
            assert p["boxes"][:, 2].max() <= 48 + 1e-3 and p["boxes"][:, 3].max() <= 64 + 1e-3
            assert 1 <= int(p["labels"].min()) and int(p["labels"].max()) <= 5
    with pytest.raises(ValueError, match=r"labels must lie in 1\.\.5"):
        model.train()("det", images(1), [{"boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0]]), "labels": torch.tensor([0])}])


def test_eval_outputs_of_cls_and_seg():
    model = build_model(small_cfg("m3vit", seg_head="upernet")).eval()
    with torch.no_grad():
        assert model("cls", images(3)).shape == (3, 10)
        assert model("seg", images(2, 80, 64)).shape == (2, 150, 80, 64)


def test_every_parameter_gets_a_gradient_over_all_tasks():
    """One step covering cls, det and seg (modsquad: MoE attention and MoE MLP) reaches every parameter.

    Routers start at zero: every token then ties, top-k picks the same experts, and unselected experts get no
    gradient. The router itself still does: with raw gates the kept gates are softmax probabilities, whose
    derivative p_i(δ_ij − p_j) is non-zero at uniform p. So experts are checked per expert with normal-init
    routers (many tokens, random routing), and zero-init routers separately.
    """
    torch.manual_seed(0)
    cfg = small_cfg("modsquad")
    cfg.moe.router_init = "normal"
    model = build_model(cfg)
    targets = all_task_targets()
    total = sum(sum(model(task, images(), targets[task]).values()) for task in TASKS)
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    for name, mod in model.named_modules():
        if isinstance(mod, MoEMlp):
            per_expert = mod.experts.w1.grad.abs().sum(dim=(1, 2))
        elif isinstance(mod, MoEAttention):
            per_expert = mod.heads.q_weight.grad.abs().sum(dim=(1, 2))
        else:
            continue
        assert (per_expert > 0).all(), f"{name}: experts without gradient {per_expert.tolist()}"
    assert (model.backbone.task_embed.grad.abs().sum(dim=1) > 0).all()  # every task's row


def test_zero_init_routers_get_gradients_with_raw_gates():
    torch.manual_seed(0)
    cfg = small_cfg("modsquad")
    cfg.moe.w_mi = 0.0  # no aux loss in this sum: the gradient must come through the gates alone
    model = build_model(cfg)
    loss = model("cls", images(), torch.tensor([1, 2]))["cls"]
    loss.backward()
    routers = [m.router.weight for m in model.modules() if isinstance(m, (MoEMlp, MoEAttention))]
    assert len(routers) == 4
    for w in routers:
        assert w.grad[TASKS.index("cls")].abs().sum() > 0
        assert w.grad[TASKS.index("det")].abs().sum() == 0  # other tasks' routers untouched by a cls batch


def test_param_counts_partition_the_model():
    model = build_model(small_cfg("m3vit"))
    counts = model.param_counts()
    assert counts["backbone"] + counts["decoder"] + counts["heads"] == counts["total"]
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["backbone"] == sum(p.numel() for p in model.backbone.parameters())
    box_predictor = model.heads["det"].detector.roi_heads.box_predictor
    expected_heads = (128 * 2 + 128 * 10 + 10) + sum(p.numel() for p in box_predictor.parameters()) + (128 * 150 + 150)
    assert counts["heads"] == expected_heads  # cls LN+Linear, det box predictor, seg 1×1 classifier (FPN width 128)


def test_state_dict_holds_the_backbone_once():
    model = build_model(small_cfg("m3vit"))
    keys = list(model.state_dict())
    assert "backbone.pos_embed" in keys
    assert not any(k.startswith("heads.det") and "pos_embed" in k for k in keys)
    assert model.no_weight_decay() == {"backbone.pos_embed", "backbone.cls_token", "backbone.task_embed"}


def test_build_model_enabled_tasks_and_class_counts():
    cfg = small_cfg("dense")
    cfg.tasks["det"].enabled = False
    cfg.tasks["cls"].num_classes = cfg.tasks["seg"].num_classes = 0
    with pytest.raises(ValueError, match="task 'cls' has no class count"):
        build_model(cfg)
    model = build_model(cfg, num_classes={"cls": 4, "seg": 3})
    assert sorted(model.heads) == ["cls", "seg"] and model.task_ids == {"cls": 0, "seg": 2}
    assert model.heads["cls"].fc.out_features == 4 and model.heads["seg"].classifier.out_channels == 3
    with pytest.raises(ValueError, match="task 'det' has no head"):
        model.eval()("det", images())


def test_forward_input_checks():
    model = build_model(small_cfg("dense"))
    with pytest.raises(ValueError, match="images must be uint8"):
        model("cls", images().float(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs targets"):
        model("seg", images())


def test_normalisation_matches_imagenet_stats():
    model = build_model(small_cfg("dense"))
    img = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = model.normalize(img)[0, :, 0, 0]
    torch.testing.assert_close(out, (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
    assert math.isclose(float(model.normalize(torch.zeros_like(img))[0, 0, 0, 0]), -0.485 / 0.229, rel_tol=1e-5)


def test_faster_rcnn_two_stage_settings_reach_the_detector():
    cfg = small_cfg()
    default = build_model(cfg).heads["det"].detector
    assert default.roi_heads.fg_bg_sampler.batch_size_per_image == 512  # torchvision's defaults stay the defaults
    assert default.roi_heads.box_head.fc7.out_features == 1024
    cfg.model.det_box_fc_dim, cfg.model.det_rois_per_image, cfg.model.det_proposals = 96, 64, 150
    det = build_model(cfg).heads["det"].detector
    assert det.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert det.roi_heads.box_head.fc7.out_features == det.roi_heads.box_predictor.cls_score.in_features == 96
    assert det.rpn._pre_nms_top_n["training"] == det.rpn._post_nms_top_n["training"] == 150
    assert det.rpn._post_nms_top_n["testing"] == 1000  # inference keeps torchvision's proposal count
    det.train()
    losses = det([torch.rand(3, 96, 96), torch.rand(3, 96, 96)], det_targets())
    assert all(torch.isfinite(v) for v in losses.values())
