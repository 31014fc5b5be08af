"""Golden-value tests for the boundary ODS meter (EdgeMeter) and its map operations: hand-built line images, the
scikit-image thinning, a per-pixel transcription of SEISM's NMS and correspondPixels' assignment formulation."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage
from test_dense_metrics import sync_two

from pretrain.finetune.evaluate import evaluate_dense
from pretrain.metrics import EDGE_DATASETS, EdgeMeter
from pretrain.metrics.boundaries import edge_nms, match_count, seg2bmap, thin
from pretrain.metrics.edges import GT_BOUNDARIES, HED_THRESHOLDS
from pretrain.prepare.pascal_labels import edge_map

# ------------------------------------------------------------------------------------------------------------ edges

def test_thin_golden_and_matches_scikit_image():
    bar = np.zeros((7, 12), dtype=bool)
    bar[2:5, 2:10] = True  # a 3-pixel-wide bar thins to a 1-pixel line along its middle row
    out = thin(bar)
    assert out[3, 3:9].all() and out.sum() <= 8 and not out[[2, 4]].any()
    skimage_morphology = pytest.importorskip("skimage.morphology")
    rng = np.random.default_rng(4)
    for _ in range(20):
        mask = rng.random((30, 40)) < 0.35
        assert np.array_equal(thin(mask), skimage_morphology.thin(mask))


def test_seg2bmap_golden():
    labels = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]])
    # (0,0): E 1, S 1, SE 1 → no; (0,1): E 2 → yes; (1,0): S 3 → yes; (1,1): E 2 → yes;
    # last column compares with S only: (0,2) S 2 → no, (1,2) S 3 → yes; last row compares with E only: no; (2,2) 0
    assert seg2bmap(labels).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 0, 0]]


def reference_correspond_count(pred: np.ndarray, gt: np.ndarray, radius: float) -> int:
    """correspondPixels' graph with every outlier edge present (CSA samples a few at random): min-cost perfect
    assignment, real pairs cost their distance (<= radius); any pixel may go to any outlier node of the other side,
    and outlier nodes pair with each other, each such edge costing outlierCost = 100·radius."""
    from scipy.optimize import linear_sum_assignment

    p, g = np.argwhere(pred), np.argwhere(gt)
    n1, n2 = len(p), len(g)
    oc, forbidden = 100 * radius, 1e9
    cost = np.zeros((n1 + n2, n2 + n1))
    dist = np.linalg.norm(p[:, None, :] - g[None, :, :], axis=2)
    cost[:n1, :n2] = np.where(dist <= radius, dist, forbidden)
    cost[:n1, n2:] = oc
    cost[n1:, :n2] = oc
    cost[n1:, n2:] = oc
    rows, cols = linear_sum_assignment(cost)
    return int(((rows < n1) & (cols < n2)).sum())


def test_match_count_equals_min_cost_assignment():
    rng = np.random.default_rng(5)
    for density in (0.05, 0.12, 0.3):
        for _ in range(4):
            pred, gt = rng.random((16, 18)) < density, rng.random((16, 18)) < density
            assert match_count(pred, gt, 2.2) == reference_correspond_count(pred, gt, 2.2)
    # pairing predicted (0,1) with GT (0,2) would leave predicted (0,3) without a partner; the optimum pairs both
    pred, gt = np.zeros((1, 5), dtype=bool), np.zeros((1, 5), dtype=bool)
    pred[0, [1, 3]], gt[0, [0, 2]] = True, True
    assert match_count(pred, gt, 1.0) == 2


def reference_edge_nms(edges: np.ndarray) -> np.ndarray:
    """Per-pixel transcription of SEISM read_one_cont_png's convTri(E,4) → gradient2 → orientation → edgesNmsMex."""
    h, w = edges.shape
    f = np.array([1, 2, 3, 4, 5, 4, 3, 2, 1], dtype=np.float64) / 25
    padded = np.pad(edges.astype(np.float64), 4, mode="symmetric")
    rows_done = np.array([[f @ padded[y : y + 9, x] for x in range(w + 8)] for y in range(h)])
    smooth = np.array([[f @ rows_done[y, x : x + 9] for x in range(w)] for y in range(h)])

    def grad(a, axis):  # MATLAB gradient: one-sided at the ends, central inside
        a = np.moveaxis(a, axis, 0)
        out = np.empty_like(a)
        out[0], out[-1] = a[1] - a[0], a[-1] - a[-2]
        out[1:-1] = (a[2:] - a[:-2]) / 2
        return np.moveaxis(out, 0, axis)

    ox, oy = grad(smooth, 1), grad(smooth, 0)
    oxx, oxy, oyy = grad(ox, 1), grad(oy, 1), grad(oy, 0)
    orient = np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + 1e-5)), np.pi)

    def interp(x, y):
        x, y = min(max(x, 0), w - 1.001), min(max(y, 0), h - 1.001)
        x0, y0 = int(x), int(y)
        dx, dy = x - x0, y - y0
        return (edges[y0, x0] * (1 - dx) * (1 - dy) + edges[y0, x0 + 1] * dx * (1 - dy)
                + edges[y0 + 1, x0] * (1 - dx) * dy + edges[y0 + 1, x0 + 1] * dx * dy)

    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            e = edges[y, x]
            if e and not any(e * 1.01 < interp(x + d * math.cos(orient[y, x]), y + d * math.sin(orient[y, x]))
                             for d in (-1, 1)):
                out[y, x] = e
    s = min(5, w // 2, h // 2)
    for i in range(s):
        out[:, i] *= i / s
        out[:, w - 1 - i] *= i / s
    for i in range(s):
        out[i, :] *= i / s
        out[h - 1 - i, :] *= i / s
    return out


def test_edge_nms_matches_transcription():
    rng = np.random.default_rng(6)
    edges = np.floor(255 * ndimage.gaussian_filter(rng.random((20, 24)), 1.2) ** 2).astype(np.float32) / 255
    edges[rng.random(edges.shape) < 0.2] = 0
    ours, ref = edge_nms(edges), reference_edge_nms(edges)
    assert np.array_equal(ours > 0, ref > 0)
    assert np.allclose(ours, ref, atol=1e-6)


def line_image(size: int = 200, col: int = 100, rows: slice = slice(None), value: float = 1.0) -> np.ndarray:
    img = np.zeros((size, size), dtype=np.float32)
    img[rows, col] = value
    return img


def edge_update(meter: EdgeMeter, prob: np.ndarray, gt: np.ndarray) -> None:
    meter.update(torch.from_numpy(prob)[None, None], torch.from_numpy(gt)[None, None])


@pytest.mark.parametrize(("shift", "expected"), [(1, 100.0), (2, 100.0), (3, 0.0)])
def test_edges_shift_within_and_beyond_tolerance(shift, expected):
    # 200×200: r = 0.0075·200·√2 = 2.12 px, so a 1- or 2-pixel shift matches and a 3-pixel one does not
    meter = EdgeMeter(mode="old", max_dist=0.0075)
    edge_update(meter, line_image(col=100 + shift, value=0.9), line_image())
    assert meter.compute()["odsF"] == pytest.approx(expected)


def test_edges_partial_match_golden_and_quantisation():
    # prediction: 100 px of the GT line shifted by 1 (prob 0.9) + a 50-px spurious line (prob 0.5);
    # GT: a 200-px line. At t <= 0.49: P = 100/150, R = 100/200 → F = 4/7. The prob 0.5 is stored as
    # trunc(127.5)/255 = 0.498, so from t = 0.50 on only the true line is left: P = 1, R = 1/2 → F = 2/3 (the ODS).
    prob = line_image(col=101, rows=slice(0, 100), value=0.9) + line_image(col=20, rows=slice(0, 50), value=0.5)
    meter = EdgeMeter(mode="old")
    edge_update(meter, prob, line_image())
    out = meter.compute()
    assert out == pytest.approx({"odsF": 100 * 2 / 3, "ods_precision": 100.0, "ods_recall": 50.0,
                                 "ods_threshold": 0.50})
    raw = EdgeMeter(mode="old", quantize=False)  # without the 8-bit round trip 0.5 survives t = 0.50
    edge_update(raw, prob, line_image())
    assert raw.compute()["ods_threshold"] == pytest.approx(0.51)


def test_edges_new_mode_nms_and_border_golden():
    # a 3-pixel ridge 0.5 / 0.9 / 0.5 (stored 0.498 / 0.898 / 0.498): NMS keeps the centre column only, and the
    # border suppression scales rows 0..4 and 195..199 by 0, .2, .4, .6, .8. At t = 0.001 rows 1..198 survive:
    # P = 1, R = 198/200 → F = 2·0.99/1.99.
    prob = line_image(value=0.9) + line_image(col=99, value=0.5) + line_image(col=101, value=0.5)
    meter = EdgeMeter(mode="new")
    edge_update(meter, prob, line_image())
    out = meter.compute()
    assert out == pytest.approx({"odsF": 100 * 2 * 0.99 / 1.99, "ods_precision": 100.0, "ods_recall": 99.0,
                                 "ods_threshold": 0.001})


def test_edges_bipartite_vs_distance_matching():
    # one GT pixel with a predicted pixel on each side: one-to-one matching pairs only one of them
    gt = np.zeros((200, 200), dtype=np.float32)
    gt[100, 100] = 1
    prob = np.zeros_like(gt)
    prob[100, 99] = prob[100, 101] = 1.0
    exact, approx = EdgeMeter(mode="old"), EdgeMeter(mode="old", matching="distance")
    edge_update(exact, prob, gt)
    edge_update(approx, prob, gt)
    assert exact.compute()["odsF"] == pytest.approx(100 * 2 / 3)  # P 1/2, R 1
    assert approx.compute()["odsF"] == pytest.approx(100.0)  # P 2/2: over-counts


def test_edges_seg2bmap_gt_sync_and_bad_input():
    labels = np.zeros((200, 200), dtype=np.float32)
    labels[:, 100:] = 1  # seg2bmap puts the boundary on column 99
    whole = EdgeMeter(mode="old", gt_boundary="seg2bmap")
    images = [(line_image(col=99, value=0.9), labels), (line_image(col=104, value=0.9), labels)]
    for prob, gt in images:
        edge_update(whole, prob, gt)
    assert whole.compute()["odsF"] == pytest.approx(50.0)  # P = R = 200/400
    halves = [EdgeMeter(mode="old", gt_boundary="seg2bmap") for _ in range(2)]
    sync_two(halves, [tuple(torch.from_numpy(a)[None, None] for a in pair) for pair in images])
    for meter in halves:
        assert meter.compute() == pytest.approx(whole.compute())
    with pytest.raises(ValueError, match="crop"):
        edge_update(whole, line_image(), np.full((200, 200), 255.0, dtype=np.float32))
    with pytest.raises(ValueError, match="matching"):
        EdgeMeter(matching="csa")
    assert EDGE_DATASETS["pascal_context"]["max_dist"] == 0.0075 and EDGE_DATASETS["nyud"]["max_dist"] == 0.011
    assert len(HED_THRESHOLDS) == 101 and HED_THRESHOLDS[:2] == (0.001, 0.01) and HED_THRESHOLDS[-1] == 0.999


# ------------------------------------------------------------------- PASCAL-Context GT: SEISM's vs the training edge

# A LabelMap of three 2-pixel-wide stripes, 4 × 6. r = 0.0075 · √(4² + 6²) = 0.054 px: only coincident pixels match.
STRIPES = np.tile(np.array([1, 1, 2, 2, 3, 3], dtype=np.float32), (4, 1))
SEISM_LINES = np.zeros((4, 6), dtype=np.float32)
SEISM_LINES[:, [1, 3]] = 1.0


def test_pascal_seism_gt_differs_from_training_edge():
    # SEISM: seg2bmap marks a pixel whose east (or south, south-east) neighbour differs: columns 1 (1|2) and 3 (2|3)
    # in every row (the last row compares east only, the last column south only: never); thinning keeps 1-px lines.
    assert GT_BOUNDARIES["seg2bmap"](STRIPES).astype(int).tolist() == SEISM_LINES.astype(int).tolist()
    # training target thin(|Laplacian| > 0): +1, −1, +1, −1 on columns 1..4 (both sides of each step; columns 0 and 5
    # cancel by mirroring), a solid 4 × 4 block that thinning shrinks to one pixel
    training = edge_map(STRIPES).astype(np.float32)
    assert training.sum() == 1 and training[2, 2] == 1
    # a prediction on SEISM's lines: 8 of 8 matched under SEISM's GT (F = 1); under the old convention its only GT
    # pixel (2, 2) lies between the lines: nothing matched, P = R = 0, F = 0
    seism, old = EdgeMeter(mode="old", gt_boundary="seg2bmap"), EdgeMeter(mode="old", gt_boundary="thin")
    edge_update(seism, 0.9 * SEISM_LINES, STRIPES)
    edge_update(old, 0.9 * SEISM_LINES, training)
    assert seism.compute()["odsF"] == pytest.approx(100.0) and old.compute()["odsF"] == 0.0
    assert EDGE_DATASETS["pascal_context"]["gt_boundary"] == EDGE_DATASETS["nyud"]["gt_boundary"] == "seg2bmap"


class _FixedEdgeModel(torch.nn.Module):
    """Predicts edge probability 0.9 on SEISM_LINES (logit log 9) and ~0 elsewhere (−30), whatever the image."""

    def __init__(self) -> None:
        super().__init__()
        logits_HW = np.where(SEISM_LINES > 0, math.log(9), -30.0).astype(np.float32)
        self.logits_11HW = torch.nn.Parameter(torch.from_numpy(logits_HW)[None, None])

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"edge": self.logits_11HW.expand(len(images), -1, -1, -1)}


def test_dense_eval_scores_pascal_edge_on_regions_and_falls_back(caplog):
    training = torch.from_numpy(edge_map(STRIPES).astype(np.float32))[None, None]
    regions = torch.from_numpy(STRIPES)[None, None]
    box = torch.tensor([[0, 0, 4, 6]])
    batches = [{"images": torch.zeros(1, 3, 4, 6), "crop_box": box,
                "targets": {"edge": training, "edge_regions": regions}},
               {"images": torch.zeros(1, 3, 4, 6), "crop_box": box, "targets": {"edge": training}}]  # old shards
    cfg = SimpleNamespace(data=SimpleNamespace(dataset="pascal_context", protocol="old"),
                          finetune=SimpleNamespace(baselines={}))
    with caplog.at_level(logging.WARNING, logger="pretrain.finetune.evaluate"):
        out = evaluate_dense(cfg, _FixedEdgeModel(), batches, ["edge"], {}, SimpleNamespace(is_main=False))
    # image 1 on edge_regions (SEISM): 8 predicted, 8 GT, 8 matched; image 2 falls back to the training target
    # ("thin"): 8 predicted, 1 GT, 0 matched. Pooled for t = 0.01 .. 0.89 (0.9 is stored as 229/255 = 0.898):
    # P = 8/16, R = 8/9 → F = 2 · (1/2) · (8/9) / (1/2 + 8/9) = 16/25
    assert out == pytest.approx({"eval/edge/odsF": 64.0, "eval/edge/ods_precision": 50.0,
                                 "eval/edge/ods_recall": 100 * 8 / 9, "eval/edge/ods_threshold": 0.01})
    assert "edge: 1 image(s) lack the evaluation GT 'edge_regions'" in caplog.text
