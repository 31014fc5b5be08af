"""Embedded corpus: determinism, layouts the converters accept, quirks present, labels that make sense."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from pycocotools import mask as mask_utils

from pretrain.prepare import PREPARERS
from pretrain.synth import ADE_CLASS_IDS, ADE_FLOOR_ID, COCO_CATEGORY_IDS, FOLDERS, LAYOUTS, imagenet_wnid, synthesize

TINY = {"imagenet_train": 3, "imagenet_val": 1, "coco_train": 5, "coco_val": 2, "ade_train": 4, "ade_val": 2,
        "num_classes": 4, "image_size": (48, 64), "nyud_train": 3, "nyud_val": 2, "pascal_train": 3, "pascal_val": 2,
        "dense_size": (48, 64)}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "raw"
    return root, synthesize(root, seed=3, **TINY)


def test_same_seed_same_bytes(corpus, tmp_path):
    root, _ = corpus
    again = synthesize(tmp_path / "again", seed=3, **TINY)
    assert _hashes(tmp_path / "again") == _hashes(root)
    assert again["imagenet"] == corpus[1]["imagenet"]
    synthesize(tmp_path / "other", seed=4, **TINY)
    other = _hashes(tmp_path / "other")
    assert other.keys() == _hashes(root).keys() and other != _hashes(root)


def test_layout_and_quirks(corpus):
    root, summary = corpus
    train = root / "imagenet" / "train"
    assert sorted(p.name for p in train.iterdir()) == [imagenet_wnid(c) for c in range(4)]
    mapping = (root / "imagenet" / "LOC_synset_mapping.txt").read_text().splitlines()
    assert mapping[0] == "n90000000 solid circle, circle" and len(mapping) == 4
    # quirk k sits at (class k % 4, image k // 4): CMYK, grayscale, PNG named .JPEG, truncated
    assert Image.open(train / imagenet_wnid(0) / "n90000000_0.JPEG").mode == "CMYK"
    assert Image.open(train / imagenet_wnid(1) / "n90000001_0.JPEG").mode == "L"
    assert (train / imagenet_wnid(2) / "n90000002_0.JPEG").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(OSError):
        Image.open(train / imagenet_wnid(3) / "n90000003_0.JPEG").load()
    assert (train / imagenet_wnid(0) / ".DS_Store").is_file()
    coco = json.loads((root / "coco/annotations/instances_train2017.json").read_text())
    listed = [im["file_name"] for im in coco["images"]]
    assert [(root / "coco/train2017" / n).exists() for n in listed] == [True, False, True, True, True]
    assert not [a for a in coco["annotations"] if a["image_id"] == coco["images"][0]["id"]]
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and isinstance(crowd[0]["segmentation"], dict)
    ade = root / "ade20k/ADEChallengeData2016"
    assert not (ade / "annotations/training/ADE_train_00000001.png").exists()
    assert (ade / "images/training/ADE_train_00000001.jpg").exists()
    assert summary["ade20k"]["train"] == {"files": 4, "expected_samples": 3, "expected_skipped": 1}


def test_coco_labels_consistent(corpus):
    root, _ = corpus
    coco = json.loads((root / "coco/annotations/instances_train2017.json").read_text())
    assert [c["id"] for c in coco["categories"]] == list(COCO_CATEGORY_IDS)
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    for ann in coco["annotations"]:
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = ann["bbox"]
        assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h
        assert min(bw, bh) >= 0.1 * min(h, w)  # large enough to survive downscaling to 64 px
        rle = mask_utils.frPyObjects(ann["segmentation"], h, w)
        area = int(mask_utils.area(mask_utils.merge(rle) if isinstance(rle, list) else rle))
        if ann["iscrowd"]:
            assert area == ann["area"]  # uncompressed RLE of the drawn mask: exact
        else:
            assert abs(area - ann["area"]) <= 0.1 * ann["area"] + 3, ann  # rasterised vs exact polygon area


def test_ade_masks(corpus):
    root, _ = corpus
    allowed = {0, ADE_FLOOR_ID, *ADE_CLASS_IDS}
    for png in sorted((root / "ade20k/ADEChallengeData2016/annotations").rglob("*.png")):
        label = Image.open(png)
        image = Image.open(str(png).replace("annotations", "images").replace(".png", ".jpg"))
        assert label.mode == "L" and label.size == image.size
        ids = np.asarray(label)
        assert set(np.unique(ids).tolist()) <= allowed
        assert np.isin(ids, ADE_CLASS_IDS).mean() > 0.02 and (ids == 0).any()


def test_converters_report_what_synth_expects(corpus, tmp_path):
    root, summary = corpus
    for name in LAYOUTS:
        for split in ("train", "val"):
            out = tmp_path / name / split
            result = PREPARERS[name](root / FOLDERS[name], out, split, progress=False)
            expected = summary[name][split]
            assert (result["written"], result["skipped"]) == (expected["expected_samples"],
                                                              expected["expected_skipped"]), (name, split)
            info = json.loads((out / "_info.json").read_text())
            with tarfile.open(out / info["shards"][0]) as tar:
                names = tar.getnames()
            assert info["num_samples"] == len({n.split(".", 1)[0] for n in names})
    png_sample = tmp_path / "imagenet/train/imagenet-train-000000.tar"
    with tarfile.open(png_sample) as tar:
        data = tar.extractfile("n90000002_0.png").read()
    assert data == (root / "imagenet/train" / imagenet_wnid(2) / "n90000002_0.JPEG").read_bytes()
    assert Image.open(io.BytesIO(data)).format == "PNG"


def test_arguments_checked(tmp_path):
    with pytest.raises(ValueError, match="num_classes=25"):
        synthesize(tmp_path / "a", **{**TINY, "num_classes": 25})
    with pytest.raises(ValueError, match="quirks need >= 4 ImageNet train images"):
        synthesize(tmp_path / "b", **{**TINY, "num_classes": 1, "imagenet_train": 3})
    synthesize(tmp_path / "c", **{**TINY, "num_classes": 1, "imagenet_train": 3, "quirks": False},
               layouts=("imagenet",))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["imagenet"]
    synthesize(tmp_path / "c", **TINY, layouts=("imagenet",))  # synth's own folder (marker): regenerated
    assert len(list((tmp_path / "c/imagenet/train").iterdir())) == 4
    (tmp_path / "c/imagenet/.synth.json").unlink()  # now it looks like someone else's data
    with pytest.raises(FileExistsError, match="not written by pretrain synth.*overwrite"):
        synthesize(tmp_path / "c", **TINY, layouts=("imagenet",))
    synthesize(tmp_path / "c", **TINY, layouts=("imagenet",), overwrite=True)
    small = synthesize(tmp_path / "e", **{**TINY, "scale": 0.1}, layouts=("coco", "ade20k"))
    assert small["coco"]["train"]["files"] == 2 and small["ade20k"]["val"]["files"] == 1  # 3 listed, 1 missing
    with pytest.raises(ValueError, match="unknown layout"):
        synthesize(tmp_path / "d", layouts=("kitti",))


def _png_array(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_dense_labels_agree(corpus):
    """NYUD: normals are the depth planes' normals, every class change is an edge; PASCAL: saliency = objects,
    parts lie on persons only."""
    from scipy import ndimage

    from pretrain.synth.dense import FOCAL

    root, _ = corpus
    nyud = root / "NYUDv2"
    for name in (nyud / "gt_sets/val.txt").read_text().split():
        depth = np.load(nyud / f"depth/{name}.npy", allow_pickle=False)
        normals = 2 * _png_array(nyud / f"normals/{name}.png").astype(np.float64) / 255.0 - 1
        edge = _png_array(nyud / f"edge/{name}.png") > 0
        gy, gx = np.gradient(depth.astype(np.float64))
        from_depth = np.stack([-gx * FOCAL, -gy * FOCAL, np.ones_like(gx)], -1)
        from_depth /= np.linalg.norm(from_depth, axis=-1, keepdims=True)
        inner = ~ndimage.binary_dilation(edge | (depth == 0), iterations=2)
        inner[[0, -1], :] = inner[:, [0, -1]] = False
        cos = np.clip((from_depth * normals).sum(-1) / np.linalg.norm(normals, axis=-1), -1, 1)
        assert inner.mean() > 0.5 and np.degrees(np.arccos(cos[inner])).max() < 2.0, name
    pascal = root / "PASCALContext"
    for name in (pascal / "ImageSets/Context/val.txt").read_text().split():
        folder = "VOC12" if (pascal / f"semseg/VOC12/{name}.png").exists() else "pascal-context"
        semseg = _png_array(pascal / f"semseg/{folder}/{name}.png")
        sal = _png_array(pascal / f"sal_distill/{name}.png")
        assert np.array_equal(sal > 127, semseg != 0)
        objects = scipy.io.loadmat(pascal / f"human_parts/{name}.mat")["anno"][0][0][1][0]
        for obj in objects:
            for part in (obj[3][0] if len(obj[3]) else []):
                assert obj[1][0][0] in (15, 12)  # persons, and the dog whose head must be ignored
                assert np.isin(semseg[part[1].astype(bool)], [obj[1][0][0], 255]).all()
