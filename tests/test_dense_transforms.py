"""Dense multi-task transforms, both protocols: scaling divides depth, flips negate normals' x, per-task padding,
exact eval crops, cat-max-ratio redraws, photometric distortion on the image alone with OpenCV's HSV convention,
ignore regions, and the old (ASTMT) protocol's cv2 scale-rotate geometry. Samples come from test_dense_data's
raw-sample writer, decoded.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from pretrain.data.dense import DENSE_DATASETS
from pretrain.data.dense_transforms import (
    add_ignore_regions,
    crop_params,
    hsv_cv_to_rgb,
    photometric_distortion,
    rgb_to_hsv_cv,
    scale_rotate,
    transform_dense,
)
from pretrain.data.transforms import PAD_RGB

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_dense_data import H, W, _decoded  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
NYUD, PASCAL = DENSE_DATASETS["nyud"], DENSE_DATASETS["pascal_context"]


def _constant_sample(h: int = 20, w: int = 24) -> dict:
    """Sample whose maps make geometry visible: edge = column index / 100, depth 4 m, parts with a person."""
    cols = torch.arange(w, dtype=torch.float32).expand(h, w)
    normals = torch.stack([torch.full((h, w), 0.6), torch.full((h, w), -0.8), torch.zeros(h, w)])
    semseg = torch.zeros(1, h, w, dtype=torch.uint8)
    semseg[:, :, w // 2:] = 3
    parts = torch.zeros(1, h, w, dtype=torch.uint8)
    parts[:, 2:6, 2:6] = 4
    return {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
            "targets": {"semseg": semseg, "depth": torch.full((1, h, w), 4.0), "normals": normals,
                        "edge": (cols / 100)[None], "human_parts": parts, "sal": (semseg > 0).to(torch.uint8)}}


def test_random_scaling_divides_depth_by_the_scale() -> None:
    for s, expected in ((2.0, 2.0), (0.5, 8.0)):
        out = transform_dense(_constant_sample(), rng=random.Random(0), size=(16, 16), train=True,
                              scale_range=(s, s), cat_max_ratio=1.0)
        depth = out["targets"]["depth"]
        assert set(depth.unique().tolist()) == ({expected} if s > 1 else {expected, 0.0})  # 0 = padding


def test_flip_negates_normals_x_and_moves_every_map() -> None:
    sample, flips = _constant_sample(), 0
    for seed in range(12):
        out = transform_dense(sample, rng=random.Random(seed), size=(20, 24), train=True, scale_range=(1.0, 1.0),
                              cat_max_ratio=1.0)
        t = out["targets"]
        flipped = bool(t["edge"][0, 0, 0] > t["edge"][0, 0, -1])
        flips += flipped
        ref = {k: v.flip(-1) if flipped else v for k, v in sample["targets"].items()}
        assert torch.equal(t["normals"][0], -ref["normals"][0] if flipped else ref["normals"][0])
        assert torch.equal(t["normals"][1:], ref["normals"][1:]) and torch.equal(t["semseg"], ref["semseg"])
        assert torch.equal(t["edge"], ref["edge"]) and torch.equal(t["human_parts"], ref["human_parts"])
    assert 0 < flips < 12


def test_padding_values_per_task_centred() -> None:
    out = transform_dense(_constant_sample(), rng=random.Random(3), size=(30, 40), train=True,
                          scale_range=(0.5, 0.5), cat_max_ratio=1.0)  # 20×24 → 10×12 inside 30×40
    top, left = (30 - 10) // 2, (40 - 12) // 2
    inside = torch.zeros(30, 40, dtype=torch.bool)
    inside[top:top + 10, left:left + 12] = True
    t, img = out["targets"], out["image"]
    assert (img[:, ~inside] == torch.tensor(PAD_RGB)[:, None]).all()
    for name, value in (("semseg", 255), ("human_parts", 255), ("sal", 255), ("edge", 255.0), ("depth", 0.0)):
        assert (t[name][:, ~inside] == value).all() and not (t[name][:, inside] == value).all(), name
    assert (t["normals"][:, ~inside] == 255.0).all() and (t["normals"][:, inside].abs() <= 1).all()


def test_eval_crop_box_restores_the_original_exactly() -> None:
    sample = _decoded("pascal_context", 4)
    out = transform_dense(sample, rng=random.Random(0), size=(40, 47), train=False)
    top, left, h, w = out["crop_box"]
    assert (top, left, h, w) == ((40 - H) // 2, (47 - W) // 2, H, W) and out["orig_size"] == (H, W)
    assert torch.equal(out["image"][:, top:top + h, left:left + w], sample["image"])
    ignored = add_ignore_regions(sample["targets"])
    for name, x in out["targets"].items():
        assert torch.equal(x[:, top:top + h, left:left + w], ignored[name]), name
    with pytest.raises(ValueError, match="larger than the eval pad size"):
        transform_dense(sample, rng=random.Random(0), size=(H - 1, W), train=False)


def test_cat_max_ratio_redraws_dominated_windows() -> None:
    semseg = torch.ones(1, 40, 40, dtype=torch.uint8)
    semseg[:, :10, :10] = 2  # only windows overlapping the top-left block hold two classes
    semseg[:, :10, :5] = 3
    mixed = {1.0: 0, 0.75: 0}
    for seed in range(40):
        for ratio in mixed:
            top, left = crop_params(random.Random(seed), (40, 40), (10, 10), semseg_1HW=semseg, cat_max_ratio=ratio)
            window = semseg[0, top:top + 10, left:left + 10]
            counts = torch.bincount(window.flatten())
            mixed[ratio] += int(counts.max() < 0.75 * 100 and (counts > 0).sum() > 1)
    assert mixed[1.0] <= 6 and mixed[0.75] >= mixed[1.0] + 8
    # a map no window can satisfy: the first draw plus exactly 10 re-draws, the last one kept
    rng, ref = random.Random(7), random.Random(7)
    got = crop_params(rng, (40, 40), (10, 10), semseg_1HW=torch.ones(1, 40, 40, dtype=torch.uint8),
                      cat_max_ratio=0.75)
    draws = [(ref.randint(0, 30), ref.randint(0, 30)) for _ in range(11)]
    assert got == draws[-1] and rng.getstate() == ref.getstate()


def test_photometric_distortion_touches_only_the_image() -> None:
    sample = _constant_sample()
    changed = 0
    for seed in range(8):
        out = transform_dense(sample, rng=random.Random(seed), size=(20, 24), train=True, scale_range=(1.0, 1.0),
                              cat_max_ratio=1.0)
        flipped = bool(out["targets"]["edge"][0, 0, 0] > out["targets"]["edge"][0, 0, -1])
        geometric = sample["image"].flip(-1) if flipped else sample["image"]
        changed += not torch.equal(out["image"], geometric)
        for name, x in add_ignore_regions(sample["targets"]).items():
            ref = x.flip(-1) if flipped else x
            if name == "normals" and flipped:
                ref = torch.cat([-ref[:1], ref[1:]])
            assert torch.equal(out["targets"][name], ref), (seed, name)
    assert changed >= 6  # P(no step fires) = 1/32 per sample


def test_opencv_hsv_convention_golden_values() -> None:
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [255, 128, 128]],
                           dtype=torch.uint8).T.reshape(3, 1, 6)
    hsv = rgb_to_hsv_cv(colours)
    # OpenCV 8-bit HSV: red 0°, green 120° → 60, blue 240° → 120; S = 255·(max − min)/max; V = max
    assert hsv[:, 0].T.tolist() == [[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 255], [0, 0, 0],
                                    [0, 127, 255]]
    assert torch.equal(hsv_cv_to_rgb(hsv)[:, 0, :5], colours[:, 0, :5])
    assert hsv_cv_to_rgb(hsv)[:, 0, 5].tolist() == [255, 128, 128]  # 255·(1 − 127/255) = 128
    red = torch.tensor([[[0]], [[255]], [[255]]], dtype=torch.uint8)
    red[0] = 60  # hue + 60 units = +120°: red becomes green
    assert hsv_cv_to_rgb(red)[:, 0, 0].tolist() == [0, 255, 0]
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert (hsv_cv_to_rgb(rgb_to_hsv_cv(img)).int() - img.int()).abs().max() <= 4  # 2° hue steps, like OpenCV
    out = photometric_distortion(img, random.Random(0))
    assert out.dtype == torch.uint8 and out.shape == img.shape


def test_add_ignore_regions() -> None:
    normals = torch.tensor([[[0.0, 0.5]], [[0.0, 0.0]], [[0.0, 0.0]]])  # pixel 0 zero vector, pixel 1 valid
    parts_none = torch.tensor([[[0, 0, 255]]], dtype=torch.uint8)
    parts_some = torch.tensor([[[0, 3, 255]]], dtype=torch.uint8)
    out = add_ignore_regions({"normals": normals, "human_parts": parts_none, "semseg": parts_none.clone()})
    assert out["normals"][:, 0, 0].tolist() == [255.0] * 3 and out["normals"][:, 0, 1].tolist() == [0.5, 0.0, 0.0]
    assert out["human_parts"].tolist() == [[[255, 255, 255]]]
    assert out["semseg"].tolist() == [[[0, 0, 255]]]  # only parts maps lose their background
    assert add_ignore_regions({"human_parts": parts_some})["human_parts"].tolist() == [[[0, 3, 255]]]


def test_scale_rotate_matches_cv2_warp_affine_geometry() -> None:
    """Hand-derived cv2.getRotationMatrix2D((w/2, h/2), angle, scale) + warpAffine outputs on a 5×5 label map."""
    src = (torch.arange(5)[:, None] * 10 + torch.arange(5)[None]).to(torch.uint8)[None]  # value = 10·row + col
    image = torch.zeros(3, 5, 5, dtype=torch.uint8)
    _, zoom = scale_rotate(image, {"semseg": src}, angle=0.0, scale=2.0)
    near = [1, 2, 2, 3, 3]  # output x samples (x − 2.5)/2 + 2.5 → 1.25, 1.75, 2.25, 2.75, 3.25 → nearest
    assert zoom["semseg"][0].tolist() == [[10 * r + c for c in near] for r in near]
    _, rot = scale_rotate(image, {"semseg": src}, angle=90.0, scale=1.0)
    # M = [[0, 1, 0], [-1, 0, 5]]: output (x, y) samples source column 5 − y, row x; column 5 is outside → 0
    assert rot["semseg"][0, 0].tolist() == [0] * 5
    assert rot["semseg"][0, 1:].tolist() == [[int(src[0, x, 5 - y]) for x in range(5)] for y in range(1, 5)]
    normals = torch.tensor([0.6, 0.0, 0.8])[:, None, None].expand(3, 5, 5).clone()
    _, out = scale_rotate(image, {"normals": normals}, angle=90.0, scale=1.0)
    assert torch.allclose(out["normals"][:, 2, 2], torch.tensor([0.0, -0.6, 0.8]), atol=1e-5)  # in-plane rotation
    assert (out["normals"][:, 0] == 0).all()  # outside the source: zero vector (then ignored)


def test_old_protocol_training_draws_astmt_ranges() -> None:
    sample = _decoded("pascal_context", 1)
    outs = [transform_dense(sample, rng=random.Random(seed), size=(20, 24), train=True, protocol="old",
                            scale_rotate_ranges=PASCAL.old_scale_rotate) for seed in range(6)]
    plain = [transform_dense(sample, rng=random.Random(seed), size=(20, 24), train=True, protocol="old")
             for seed in range(6)]
    assert all(a["image"].shape == (3, 20, 24) and a["targets"]["sal"].shape == (1, 20, 24) for a in outs)
    assert sum(not torch.equal(a["image"], b["image"]) for a, b in zip(outs, plain)) == 6  # U(−20°, 20°) ≠ 0
    nyud = NYUD.old_scale_rotate
    assert nyud.discrete and nyud.rotations == (0.0,) and nyud.scales == (1.0, 1.2, 1.5)
