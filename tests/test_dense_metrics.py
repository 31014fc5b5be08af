"""Golden-value tests for the dense multi-task meters: hand-computed tiny arrays, cross-rank sync, and independent
transcriptions of the reference meters (MLoRE / TaskPrompter "new", M3ViT / ASTMT "old") run on random arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_metrics import FakeWorld  # tests/ is on sys.path under pytest (rootdir conftest, no package)

from pretrain.metrics import (
    PRIMARY,
    DepthMeter,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
    delta_m,
    primary_metrics,
    save_predictions,
)


def sync_two(meters: list, halves: list[tuple]) -> None:
    """Rank r updates with halves[r], then both sync through a simulated all_reduce(SUM)."""
    for meter, args in zip(meters, halves):
        meter.update(*args)
    FakeWorld(len(meters)).sync_all(meters, "reduce_fn")


# ------------------------------------------------------------------------------------------------------------ depth

# Image A (2×2): gt [[1, 2], [0, 90]], pred [[2, 2], [5, 1]] → valid gt 1 and 2 (0 invalid, 90 ≥ 80): errors −1, 0.
# Image B (1×1): gt 4, pred −1 → clamped to 0 → 1e-9: error ≈ 4.
DEPTH_A = (torch.tensor([[[[2.0, 2.0], [5.0, 1.0]]]]), torch.tensor([[[[1.0, 2.0], [0.0, 90.0]]]]))
DEPTH_B = (torch.tensor([[[[-1.0]]]]), torch.tensor([[[[4.0]]]]))
# pooled: sqrt((1 + 0 + 16) / 3); mean of per-image RMSEs would be (sqrt(1/2) + 4) / 2 = 2.3536
DEPTH_GOLDEN = {
    "rmse": math.sqrt((1 + (4 - 1e-9) ** 2) / 3),
    "log_rmse": math.sqrt((math.log(2) ** 2 + (math.log(4) - math.log(1e-9)) ** 2) / 3),
    "abs_rel": (1 + 0 + (4 - 1e-9) / 4) / 3,
    "sq_rel": (1 + 0 + (4 - 1e-9) ** 2 / 4) / 3,
    "delta1": 100 / 3,  # ratios 2, 1, 4e9: only the exact pixel is within 1.25 (and 1.25², 1.25³ < 2)
    "delta2": 100 / 3,
    "delta3": 100 / 3,
}


def test_depth_golden_pooled_not_mean_of_images():
    meter = DepthMeter()
    meter.update(*DEPTH_A)
    meter.update(*DEPTH_B)
    out = meter.compute()
    assert out == pytest.approx(DEPTH_GOLDEN)
    assert meter.num_pixels == 3
    assert out["rmse"] != pytest.approx((math.sqrt(0.5) + 4) / 2, abs=1e-3)


def test_depth_range_options():
    meter = DepthMeter(min_depth=1.5, max_depth=100.0)  # drops gt 1, keeps 2 and 90 (pred 1 → error 89)
    meter.update(*DEPTH_A)
    assert meter.compute()["rmse"] == pytest.approx(math.sqrt(89**2 / 2))
    with pytest.raises(ValueError, match="max_depth"):
        DepthMeter(min_depth=1.0, max_depth=1.0)


def test_depth_sync_two_ranks_and_bad_input():
    meters = [DepthMeter(), DepthMeter()]
    sync_two(meters, [DEPTH_A, DEPTH_B])
    for meter in meters:
        assert meter.compute() == pytest.approx(DEPTH_GOLDEN)
    with pytest.raises(ValueError, match="crop"):
        DepthMeter().update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
    with pytest.raises(ValueError, match="no valid"):
        DepthMeter().compute()


def reference_depth_new(pairs, max_depth=80.0, min_depth=0.0) -> dict[str, float]:
    """Transcription of MLoRE DepthMeter: per image, float32 maths, Python-float accumulation."""
    n = sq = sq_log = abs_rel = 0.0
    for pred, gt in pairs:
        pred, gt = pred.clamp(min=0.0).squeeze().clone(), gt.squeeze().clone()  # get_output clamps at 0
        mask = (gt < max_depth) & (gt > min_depth)
        n += mask.float().sum().item()
        gt[gt <= 0] = 1e-9
        pred[pred <= 0] = 1e-9
        sq_log += ((gt[mask].log() - pred[mask].log()) ** 2).sum().item()
        sq += ((gt[mask] - pred[mask]) ** 2).sum().item()
        abs_rel += ((gt[mask] - pred[mask]).abs() / gt[mask]).sum().item()
    return {"rmse": math.sqrt(sq / n), "log_rmse": math.sqrt(sq_log / n), "abs_rel": abs_rel / n}


def test_depth_matches_reference_transcription():
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(4):
        gt = torch.rand(1, 1, 12, 16, generator=gen) * 100  # some ≥ 80 (invalid)
        gt[torch.rand(gt.shape, generator=gen) < 0.2] = 0.0  # invalid
        pairs.append((torch.randn(1, 1, 12, 16, generator=gen) * 20 + 40, gt))
    meter = DepthMeter()
    for pred, gt in pairs:
        meter.update(pred, gt)
    expected = reference_depth_new(pairs)
    out = meter.compute()
    assert {k: out[k] for k in expected} == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------- normals

def normals_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """GT (0,0,1) at 5 pixels, one ignored; angles 0°, 45°, 90°, 180° at the other four."""
    gt = torch.tensor([[0.0, 0.0, 1.0]] * 5)
    gt[4] = 255.0
    pred = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, -2.0], [1.0, 0.0, 0.0]])
    return pred.T.reshape(1, 3, 1, 5), gt.T.reshape(1, 3, 1, 5)


NORMALS_GOLDEN = {"mean": (0 + 45 + 90 + 180) / 4, "rmse": math.sqrt((45**2 + 90**2 + 180**2) / 4),
                  "11.25": 25.0, "22.5": 25.0, "30": 25.0}


@pytest.mark.parametrize("mode", ["new", "old"])
def test_normals_golden_with_ignore(mode):
    meter = NormalsMeter(mode=mode)
    meter.update(*normals_batch())
    out = meter.compute()
    assert {k: out[k] for k in NORMALS_GOLDEN} == pytest.approx(NORMALS_GOLDEN, abs=1e-4)
    assert out["median"] == pytest.approx((45 + 90) / 2, abs=0.005 + 1e-4)  # bin centres, 0.01° bins
    assert meter.num_pixels == 4


def test_normals_atan2_vs_acos_near_parallel():
    theta = math.radians(0.01)  # cos θ = 1 − 1.5e-8 rounds to 1.0 in float32: acos sees 0°
    pred = torch.tensor([math.sin(theta), 0.0, math.cos(theta)]).reshape(1, 3, 1, 1)
    gt = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1)
    new, old = NormalsMeter(mode="new"), NormalsMeter(mode="old")
    new.update(pred, gt)
    old.update(pred, gt)
    assert new.compute()["mean"] == pytest.approx(0.01, rel=1e-3)
    assert old.compute()["mean"] == 0.0


def test_normals_median_within_half_bin_and_sync():
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 3, 9, 11, generator=gen)
    gt = torch.nn.functional.normalize(torch.randn(2, 3, 9, 11, generator=gen), dim=1)
    gt[0, :, :2] = 255.0
    whole = NormalsMeter()
    whole.update(pred, gt)
    p, g = torch.nn.functional.normalize(pred, dim=1), gt
    valid = (g != 255).all(dim=1)
    angles = torch.rad2deg(2 * torch.atan2((p - g).norm(dim=1), (p + g).norm(dim=1)))[valid].numpy()
    out = whole.compute()
    assert abs(out["median"] - float(np.median(angles))) <= 0.005 + 1e-6
    assert out["mean"] == pytest.approx(float(angles.mean()), rel=1e-6)
    halves = [NormalsMeter(), NormalsMeter()]
    sync_two(halves, [(pred[:1], gt[:1]), (pred[1:], gt[1:])])
    for meter in halves:
        assert meter.compute() == pytest.approx(out)


def reference_normals_new(batches) -> float:
    """Transcription of MLoRE NormalsMeter: input is get_output's (unit(p) + 1)·255/2, channels last."""

    def unit(x):
        norm = x.norm(p="fro", dim=1, keepdim=True)
        zero = norm == 0
        norm[zero] = 1
        out = x / norm
        out[zero.expand_as(out)] = 0
        return out

    total, count = 0.0, 0
    for pred_raw, gt in batches:
        saved = ((torch.nn.functional.normalize(pred_raw.permute(0, 2, 3, 1), p=2, dim=3) + 1.0) * 255 / 2.0)
        pred = 2 * saved.permute(0, 3, 1, 2) / 255 - 1
        valid = (gt != 255).all(dim=1)
        p, g = unit(pred), unit(gt)
        deg = torch.rad2deg(2 * torch.atan2((p - g).norm(dim=1), (p + g).norm(dim=1)))
        deg = torch.masked_select(deg, valid)
        total += deg.sum().item()
        count += deg.numel()
    return total / count


def reference_normals_old(images) -> dict[str, float]:
    """Transcription of M3ViT offline eval_normals (numpy, H×W×3, per image; zero-norm GT is invalid)."""
    diffs = []
    for pred, label in images:
        pred = pred / (np.linalg.norm(pred, ord=2, axis=2)[..., None] + 1e-12)
        valid = np.linalg.norm(label, ord=2, axis=2) != 0
        pred[~valid], label = 0.0, label.copy()
        label[~valid] = 0.0
        label = label / (np.linalg.norm(label, ord=2, axis=2)[..., None] + 1e-12)
        deg = np.rad2deg(np.arccos(np.clip(np.sum(pred * label, axis=2), -1, 1)))
        diffs.extend(deg[valid])
    d = np.array(diffs)
    return {"mean": d.mean(), "median": np.median(d), "rmse": np.mean(d**2) ** 0.5, "11.25": np.mean(d < 11.25) * 100,
            "22.5": np.mean(d < 22.5) * 100, "30": np.mean(d < 30) * 100}


def test_normals_match_reference_transcriptions():
    gen = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(3):
        gt = 2 * torch.randint(0, 256, (2, 3, 8, 10), generator=gen).float() / 255 - 1
        gt[:, :, :3, :2] = 255.0
        batches.append((torch.randn(2, 3, 8, 10, generator=gen), gt))
    new, old = NormalsMeter(mode="new"), NormalsMeter(mode="old")
    images = []
    for pred, gt in batches:
        new.update(pred, gt)
        old.update(pred, gt)
        for b in range(2):
            label = gt[b].permute(1, 2, 0).numpy().astype(np.float32).copy()
            label[(label == 255).any(axis=2)] = 0.0  # the old loader's ignore is a zero vector
            images.append((pred[b].permute(1, 2, 0).numpy().astype(np.float32).copy(), label))
    assert new.compute()["mean"] == pytest.approx(reference_normals_new(batches), rel=1e-5)
    expected, out = reference_normals_old(images), old.compute()
    assert out["median"] == pytest.approx(expected.pop("median"), abs=0.0051)
    assert {k: out[k] for k in expected} == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------------------- saliency

# One image, GT [1, 1, 0], prob [0.9, 0.52, 0.47]. A plain threshold at 0.5 separates it perfectly (maxF 100), but the
# new protocol's second sigmoid maps the probs to [0.711, 0.627, 0.615]: thresholds ≤ 0.60 take all three
# (P 2/3, R 1 → F = 1.3·(2/3)/(0.3·(2/3) + 1) = 0.7222), 0.65 and 0.70 take the first only (P 1, R 1/2 →
# F = 1.3·0.5/(0.3 + 0.5) = 0.8125), ≥ 0.75 none (F 0). maxF 81.25. The old mode (no extra sigmoid, prob > 0.5)
# reaches 100.
SAL_ONE = (torch.tensor([[[0.9, 0.52, 0.47]]]), torch.tensor([[[1, 1, 0]]]))


def test_saliency_new_double_sigmoid_golden():
    meter = SaliencyMeter(mode="new")
    meter.update(*SAL_ONE)
    assert meter.compute() == pytest.approx({"maxF": 81.25})
    no_second_sigmoid = reference_saliency_new([(SAL_ONE[0] * 255, SAL_ONE[1])], double_sigmoid=False)
    assert no_second_sigmoid == pytest.approx(100.0)
    old = SaliencyMeter(mode="old")
    old.update(*SAL_ONE)
    assert old.compute() == pytest.approx({"maxF": 100.0, "mIoU": 100.0})


# Two images, 4 pixels each; one extra ignored pixel each (its prediction must not count).
# img1 GT [1,0,0,0] prob [.77,.77,.77,.77]; img2 GT [1,1,1,1] prob [.77,.77,.77,.1].
# old (per image, β² = 1): t ≤ 0.75 → img1 P 1/4 R 1, img2 P 1 R 3/4 → P̄ .625, R̄ .875 → F = 0.729167;
#   t ≥ 0.8 nothing positive → F 0. Jaccard: 1/4 and 3/4 → mIoU 50.
# new (pooled, sigmoid(.77) = .6835, sigmoid(.1) = .525): t ≤ 0.5 all positive: TP 5 PP 8 AP 5 →
#   F = 1.3·.625/(.3·.625 + 1) = 0.684211; t 0.55..0.65: TP 4 PP 7 → F = 0.611765; t ≥ 0.70: none.
SAL_TWO = (
    torch.tensor([[0.77, 0.77, 0.77, 0.77, 0.99], [0.77, 0.77, 0.77, 0.1, 0.01]]).reshape(2, 1, 5),
    torch.tensor([[1, 0, 0, 0, 255], [1, 1, 1, 1, 255]]).reshape(2, 1, 5),
)


def test_saliency_old_vs_new_golden_with_ignore():
    new, old = SaliencyMeter(mode="new"), SaliencyMeter(mode="old")
    new.update(*SAL_TWO)
    old.update(*SAL_TWO)
    assert new.compute() == pytest.approx({"maxF": 100 * 0.8125 / 1.1875})
    assert old.compute() == pytest.approx({"maxF": 100 * 2 * 0.625 * 0.875 / 1.5, "mIoU": 50.0})


@pytest.mark.parametrize("mode", ["new", "old"])
def test_saliency_sync_two_ranks_and_bad_input(mode):
    whole = SaliencyMeter(mode=mode)
    whole.update(*SAL_TWO)
    halves = [SaliencyMeter(mode=mode), SaliencyMeter(mode=mode)]
    sync_two(halves, [(SAL_TWO[0][:1], SAL_TWO[1][:1]), (SAL_TWO[0][1:], SAL_TWO[1][1:])])
    for meter in halves:
        assert meter.compute() == pytest.approx(whole.compute())
    with pytest.raises(ValueError, match="probability"):
        whole.update(SAL_TWO[0] * 255, SAL_TWO[1])
    with pytest.raises(ValueError, match="GT value 2"):
        whole.update(SAL_TWO[0], SAL_TWO[1] * 2)
    with pytest.raises(ValueError, match="no"):
        SaliencyMeter(mode=mode).compute()


def reference_saliency_new(batches, double_sigmoid: bool = True) -> float:
    """Transcription of MLoRE SaliencyMeter(threshold_step=0.05, beta_squared=0.3) fed get_output's prob×255."""
    thresholds = torch.arange(0.05, 1, 0.05)
    tp, pp, ap = (torch.zeros(len(thresholds)) for _ in range(3))
    for preds, target in batches:
        preds = preds.float() / 255.0
        if double_sigmoid:  # same ndim as the target → the reference "squashes logits"
            preds = torch.sigmoid(preds)
        valid = target != 255
        for i, t in enumerate(thresholds):
            f_preds = torch.masked_select((preds >= t).long(), valid)
            f_target = torch.masked_select(target.long(), valid)
            tp[i] += torch.sum(f_preds * f_target)
            pp[i] += torch.sum(f_preds)
            ap[i] += torch.sum(f_target)
    precision, recall = tp / pp, tp / ap
    f = (1 + 0.3) * precision * recall / (0.3 * precision + recall)
    f[f != f] = 0
    return f.max().item() * 100


def reference_saliency_old(images) -> dict[str, float]:
    """Transcription of M3ViT SaliencyMeter + ASTMT jaccard / precision_recall (no void pixels)."""
    thresholds = np.linspace(0.2, 0.9, 15)
    jac, prec, rec = (np.zeros((len(images), 15)) for _ in range(3))
    for i, (prob255, gt) in enumerate(images):
        pred = prob255.float() / 255.0
        g = gt.numpy().astype(bool)
        for j, t in enumerate(thresholds):
            m = (pred > t).numpy()
            both_empty = g.sum() == 0 and m.sum() == 0
            jac[i, j] = 1 if both_empty else np.sum(g & m) / np.sum(g | m, dtype=np.float32)
            tp, fn, fp = (m & g).sum(), (~m & g).sum(), (m & ~g).sum()
            prec[i, j], rec[i, j] = tp / (tp + fp + 1e-12), tp / (tp + fn + 1e-12)
    mp, mr = prec.mean(0), rec.mean(0)
    return {"maxF": 100 * np.max(2 * mp * mr / (mp + mr + 1e-12)), "mIoU": 100 * np.max(jac.mean(0))}


def test_saliency_matches_reference_transcriptions():
    gen = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        logits = torch.randn(2, 2, 10, 12, generator=gen) * 2
        prob = torch.softmax(logits, dim=1)[:, 1]
        gt = (torch.rand(2, 10, 12, generator=gen) < prob * 0.8 + 0.1).long()
        batches.append((prob, gt))
    new, old = SaliencyMeter(mode="new"), SaliencyMeter(mode="old")
    for prob, gt in batches:
        new.update(prob, gt)
        old.update(prob, gt)
    ref_batches = [(prob * 255, gt) for prob, gt in batches]
    assert new.compute()["maxF"] == pytest.approx(reference_saliency_new(ref_batches), rel=1e-6)
    images = [(prob[b] * 255, gt[b]) for prob, gt in batches for b in range(2)]
    assert old.compute() == pytest.approx(reference_saliency_old(images), rel=1e-6)


# ------------------------------------------------------------------------------------------- human parts (person-only)

def test_parts_miou_ignores_images_without_person():
    """An image without person parts is all 255 (loader rule), so SegmentationMeter counts nothing for it."""
    person_pred, person_gt = torch.tensor([[0, 1, 2], [2, 2, 0]]), torch.tensor([[0, 1, 1], [2, 2, 255]])
    only_person, with_empty = SegmentationMeter(num_classes=7), SegmentationMeter(num_classes=7)
    only_person.update(person_pred, person_gt)
    no_person_pred, no_person_gt = torch.full((2, 3), 4), torch.full((2, 3), 255)  # predictions there are ignored
    with_empty.update(torch.stack([person_pred, no_person_pred]), torch.stack([person_gt, no_person_gt]))
    assert torch.equal(with_empty.confusion, only_person.confusion)
    # pairs (0,0) (1,1) (1,2) (2,2) (2,2): IoU 0 = 1, 1 = 1/2, 2 = 2/3; classes 3..6 empty: 0 each (HumanPartsMeter)
    assert with_empty.compute()["mIoU"] == pytest.approx(100 * (1 + 0.5 + 2 / 3 + 0 * 4) / 7)


# ------------------------------------------------------------------------------------------------------ multi-task

def test_delta_m_signs_and_lower_is_better():
    base = {"semseg": 60.0, "depth": 0.6}
    # semseg +10/60, depth lower by 0.1 → +0.1/0.6: both improvements
    assert delta_m({"semseg": 70.0, "depth": 0.5}, base, {"depth"}) == pytest.approx(100 * (1 / 6 + 1 / 6) / 2)
    # depth worse (0.66): −0.06/0.6 = −0.1
    assert delta_m({"semseg": 70.0, "depth": 0.66}, base, {"depth"}) == pytest.approx(100 * (1 / 6 - 0.1) / 2)
    # treating depth as higher-is-better would flip its sign
    assert delta_m({"semseg": 70.0, "depth": 0.66}, base, set()) == pytest.approx(100 * (1 / 6 + 0.1) / 2)
    with pytest.raises(ValueError, match="tasks differ"):
        delta_m({"semseg": 1.0}, base, set())
    with pytest.raises(ValueError, match="baseline"):
        delta_m({"semseg": 1.0}, {"semseg": 0.0}, set())


def test_primary_metrics_per_protocol():
    results = {"sal": {"maxF": 80.0, "mIoU": 66.0}, "normals": {"mean": 14.0, "median": 12.0}}
    assert primary_metrics(results, mode="new") == ({"sal": 80.0, "normals": 14.0}, {"normals"})
    assert primary_metrics(results, mode="old") == ({"sal": 66.0, "normals": 14.0}, {"normals"})
    assert PRIMARY["new"]["depth"] == ("rmse", True) and PRIMARY["old"]["edge"] == ("odsF", False)
    with pytest.raises(ValueError, match="lack"):
        primary_metrics({"depth": {"log_rmse": 1.0}}, mode="new")


# ----------------------------------------------------------------------------------------------------- predictions

def test_save_predictions_encodings_and_crop(tmp_path):
    preds = {
        "semseg": torch.tensor([[9, 9, 9], [9, 3, 39], [9, 9, 9]]),
        "sal": torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.999, 1.0], [0.0, 0.0, 0.0]]]),
        "normals": torch.zeros(3, 3, 3),
        "depth": torch.full((1, 3, 3), 1.2346),
    }
    preds["normals"][2] = 2.0  # (0, 0, 2) → unit (0, 0, 1) → RGB (127, 127, 255): truncation of 127.5
    paths = save_predictions(tmp_path, "img_1", preds, crop_box=(1, 1, 1, 2))
    assert np.asarray(Image.open(paths["semseg"])).tolist() == [[3, 39]]
    assert np.asarray(Image.open(paths["sal"])).tolist() == [[254, 255]]  # trunc(0.999·255 = 254.7)
    assert np.asarray(Image.open(paths["normals"])).tolist() == [[[127, 127, 255], [127, 127, 255]]]
    depth = Image.open(paths["depth"])
    assert depth.mode.startswith("I;16") and np.asarray(depth).tolist() == [[1235, 1235]]
    assert paths["sal"] == tmp_path / "sal" / "img_1.png"
    with pytest.raises(ValueError, match="file stem"):
        save_predictions(tmp_path, "../x", preds)
    with pytest.raises(ValueError, match="argmax"):
        save_predictions(tmp_path, "k", {"semseg": torch.zeros(2, 2)})
