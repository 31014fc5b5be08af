"""Converters: layouts, every quirk, skipped accounting, label preservation, `_info.json` vs the tars."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.prepare import PREPARERS, LayoutError, OutputNotEmptyError, PrepareError
from pretrain.prepare import shards as shards_module
from pretrain.prepare.ade20k import convert_ade20k
from pretrain.prepare.coco import convert_coco
from pretrain.prepare.imagenet import convert_imagenet
from pretrain.prepare.nyud import convert_nyud
from pretrain.prepare.pascal_context import convert_pascal_context


def _image_bytes(w: int, h: int, *, mode: str = "RGB", fmt: str = "JPEG", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").convert(mode).save(buf, fmt)
    return buf.getvalue()


def _label_png(labels_HW: np.ndarray, mode: str = "L") -> bytes:
    image = Image.fromarray(labels_HW.astype(np.uint8), "L")
    if mode == "P":
        image = image.convert("P")
    elif mode != "L":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _put(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def read_split(out: Path) -> tuple[dict, dict[str, dict[str, bytes]], list[dict]]:
    """(_info.json, {key: {ext: bytes}} in tar order over all shards, skipped.jsonl rows); checks info vs tars."""
    info = json.loads((out / "_info.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for name, length in zip(info["shards"], info["shard_lengths"], strict=True):
        keys = []
        with tarfile.open(out / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if key not in samples:
                    keys.append(key)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        assert len(keys) == length, f"{name}: _info.json says {length} samples, tar holds {len(keys)}"
    assert info["num_samples"] == len(samples) == sum(info["shard_lengths"])
    assert info["splits"][info["split"]]["filenames"] == info["shards"]
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(info["shards"])
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert info["skipped"] == len(skipped) == sum(info["skipped_by_reason"].values())
    return info, samples, skipped


# ---------------------------------------------------------------- ImageNet


@pytest.fixture
def imagenet_src(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """Three classes created out of order, every quirk of the real release; returns (src, {rel: bytes})."""
    src = tmp_path / "imagenet"
    files = {
        "train/n03/n03_0.JPEG": _image_bytes(40, 30, seed=1),
        "train/n01/n01_0.JPEG": _image_bytes(32, 32, mode="CMYK", seed=2),
        "train/n01/n01_1.JPEG": _image_bytes(20, 36, mode="L", seed=3),
        "train/n02/n02_0.JPEG": _image_bytes(24, 24, fmt="PNG", seed=4),  # PNG named .JPEG
        "train/n02/n02_1.JPEG": _image_bytes(64, 64, seed=5)[:300],  # truncated
        "train/n02/n02_2.JPEG": b"",  # empty
        "train/n02/n02_3.JPEG": b"this is not an image at all",
        "train/n03/n03_2.JPEG": b"\xff\xd8\xff" + bytes(range(256)),  # JPEG magic, garbage header
        "train/n02/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "train/n03/notes.txt": b"stray",
        "train/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "val/n01/ILSVRC2012_val_00000001.JPEG": _image_bytes(30, 30, seed=6),
        "val/n03/ILSVRC2012_val_00000002.JPEG": _image_bytes(30, 30, seed=7),
    }
    for rel, data in files.items():
        _put(src / rel, data)
    (src / "train/n03/n03_1.JPEG").symlink_to(src / "does-not-exist.JPEG")  # unreadable
    return src, files


def test_imagenet_quirks_bytes_and_labels(imagenet_src, tmp_path):
    src, files = imagenet_src
    out = tmp_path / "out"
    summary = convert_imagenet(src, out, "train", progress=False)
    info, samples, skipped = read_split(out)
    assert summary["written"] == 4 and summary["skipped"] == 8 and summary["shards"] == 1
    assert {s["file"]: s["reason"] for s in skipped} == {
        "train/.DS_Store": "not_an_image",
        "train/n02/.DS_Store": "not_an_image",
        "train/n03/notes.txt": "not_an_image",
        "train/n02/n02_1.JPEG": "decode_error",
        "train/n02/n02_2.JPEG": "empty_file",
        "train/n02/n02_3.JPEG": "unsupported_format",
        "train/n03/n03_1.JPEG": "unreadable",
        "train/n03/n03_2.JPEG": "decode_error",
    }
    assert "cannot identify image file" in skipped[-1]["detail"]
    assert sorted(samples) == ["n01_0", "n01_1", "n02_0", "n03_0"]  # written in a fixed shuffled order
    assert samples["n02_0"].keys() == {"png", "cls", "json"}  # detected by magic bytes
    for key, wnid, ext in [("n01_0", "n01", "jpg"), ("n01_1", "n01", "jpg"), ("n02_0", "n02", "png"),
                           ("n03_0", "n03", "jpg")]:
        sample = samples[key]
        assert sample[ext] == files[f"train/{wnid}/{key}.JPEG"]  # original bytes, never re-encoded
        assert int(sample["cls"]) == ["n01", "n02", "n03"].index(wnid)
        assert json.loads(sample["json"]) == {"wnid": wnid, "file": f"train/{wnid}/{key}.JPEG"}
    assert Image.open(io.BytesIO(samples["n01_0"]["jpg"])).mode == "CMYK"
    assert Image.open(io.BytesIO(samples["n01_1"]["jpg"])).mode == "L"
    assert [c["wnid"] for c in info["classes"]] == ["n01", "n02", "n03"] and info["num_classes"] == 3
    assert info["image_kinds"] == {"jpg/CMYK": 1, "jpg/L": 1, "jpg/RGB": 1, "png/RGB": 1}


def test_imagenet_val_uses_train_class_indices(imagenet_src, tmp_path):
    src, _ = imagenet_src  # val lacks n02: its n03 must still be index 2
    convert_imagenet(src, tmp_path / "val", "val", progress=False)
    _, samples, skipped = read_split(tmp_path / "val")
    assert {k: int(s["cls"]) for k, s in samples.items()} == {"ILSVRC2012_val_00000001": 0,
                                                               "ILSVRC2012_val_00000002": 2}
    assert skipped == []


def test_imagenet_synset_mapping(imagenet_src, tmp_path):
    src, _ = imagenet_src
    (src / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish\nn03 shark\nn04 extra\n")
    convert_imagenet(src, tmp_path / "a", "val", progress=False)
    info, samples, _ = read_split(tmp_path / "a")
    assert info["classes"][0] == {"index": 0, "wnid": "n01", "name": "tench, Tinca tinca"}
    assert info["num_classes"] == 4
    (src / "LOC_synset_mapping.txt").write_text("n01 tench\nn03 shark\n")
    with pytest.raises(LayoutError, match=r"n02: class folder not listed in .*LOC_synset_mapping.txt"):
        convert_imagenet(src, tmp_path / "b", "train", progress=False)
    (src / "LOC_synset_mapping.txt").write_text("n01 tench\nbroken\n")
    with pytest.raises(LayoutError, match=r"LOC_synset_mapping.txt:2: expected"):
        convert_imagenet(src, tmp_path / "c", "train", progress=False)


def test_imagenet_layout_errors(tmp_path):
    with pytest.raises(LayoutError, match=r"expected ImageNet layout .*/train/<wnid>/\*\.JPEG.*not a directory"):
        convert_imagenet(tmp_path / "nothing", tmp_path / "out", "train")
    _put(tmp_path / "flat/val/ILSVRC2012_val_00000001.JPEG", _image_bytes(8, 8))
    with pytest.raises(LayoutError, match="sorted into <wnid>/ folders"):
        convert_imagenet(tmp_path / "flat", tmp_path / "out", "val")
    with pytest.raises(PrepareError, match="unknown split 'test'"):
        convert_imagenet(tmp_path / "flat", tmp_path / "out", "test")
    assert not (tmp_path / "out").exists()  # layout is checked before the output is touched


def test_output_dir_policy_and_sharding(imagenet_src, tmp_path, caplog):
    src, _ = imagenet_src
    out = tmp_path / "out"
    summary = convert_imagenet(src, out, "train", max_count=2, progress=False)
    info, _, _ = read_split(out)
    assert info["shards"] == ["imagenet-train-000000.tar", "imagenet-train-000001.tar"]
    assert info["shard_lengths"] == [2, 2] and summary["shards"] == 2
    with pytest.raises(OutputNotEmptyError, match="is not empty.*--overwrite"):
        convert_imagenet(src, out, "train", progress=False)
    convert_imagenet(src, out, "train", overwrite=True, max_bytes=1, progress=False)  # one sample per shard
    info, _, _ = read_split(out)  # also checks that no stale shard survived
    assert info["shard_lengths"] == [1, 1, 1, 1]
    convert_imagenet(src, out, "train", overwrite=True, min_shards=3, progress=False)
    # 9 image-named candidates // 3 -> 3 per shard; skips leave only 4 samples, hence 2 shards and a warning
    assert read_split(out)[0]["shard_lengths"] == [3, 1]
    assert "only 2 shards (< min_shards=3)" in caplog.text
    (out / "mine.txt").write_text("not a shard")
    with pytest.raises(OutputNotEmptyError, match="mine.txt"):
        convert_imagenet(src, out, "train", overwrite=True, progress=False)
    assert (out / "_info.json").exists()  # refused before deleting anything
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputNotEmptyError, match="not a directory"):
        convert_imagenet(src, tmp_path / "file", "train", overwrite=True, progress=False)


def test_workers_give_identical_shards(imagenet_src, tmp_path):
    src, _ = imagenet_src
    convert_imagenet(src, tmp_path / "w0", "train", max_count=3, progress=False)
    convert_imagenet(src, tmp_path / "w2", "train", max_count=3, workers=2, progress=False)
    for name in ("imagenet-train-000000.tar", "imagenet-train-000001.tar", "skipped.jsonl"):
        assert (tmp_path / "w0" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_crash_leaves_no_info(imagenet_src, tmp_path, monkeypatch):
    src, _ = imagenet_src
    out = tmp_path / "out"
    convert_imagenet(src, out, "train", max_count=1, progress=False)
    calls = []

    def failing_write(self, key, fields):
        calls.append(key)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(self, key, fields)

    original = shards_module.ShardSink.write
    monkeypatch.setattr(shards_module.ShardSink, "write", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_imagenet(src, out, "train", overwrite=True, max_count=1, progress=False)
    assert not (out / "_info.json").exists()  # the old index went first, the new one was never written


# ---------------------------------------------------------------- COCO


@pytest.fixture
def coco_src(tmp_path: Path) -> tuple[Path, dict]:
    src = tmp_path / "coco"
    rle = {"counts": [2, 3, 7, 4], "size": [4, 4]}
    doc = {
        "images": [
            {"id": 42, "file_name": "000000000042.jpg", "width": 40, "height": 30},
            {"id": 7, "file_name": "000000000007.jpg", "width": 20, "height": 20},  # no annotations
            {"id": 9, "file_name": "000000000009.jpg", "width": 20, "height": 20},  # file missing
            {"id": 11, "file_name": "000000000011.jpg", "width": 99, "height": 20},  # size mismatch
            {"id": 12, "file_name": "000000000012.jpg", "width": 20, "height": 20},  # truncated
        ],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 88, "bbox": [1.5, 2.0, 10.0, 5.25], "iscrowd": 0,
             "area": 40.5, "segmentation": [[1.5, 2.0, 11.5, 2.0, 11.5, 7.25]]},
            {"id": 2, "image_id": 42, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 1, "area": 7.0,
             "segmentation": rle},
            {"id": 3, "image_id": 9, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 0, "area": 16.0,
             "segmentation": [[0, 0, 4, 0, 4, 4]]},
            {"id": 4, "image_id": 555, "category_id": 3, "bbox": [0, 0, 1, 1], "iscrowd": 0, "area": 1.0,
             "segmentation": [[0, 0, 1, 0, 1, 1]]},  # refers to no image
        ],
        "categories": [{"id": 3, "name": "car"}, {"id": 88, "name": "teddy bear"}],
    }
    _put(src / "annotations/instances_val2017.json", json.dumps(doc).encode())
    files = {
        "000000000042.jpg": _image_bytes(40, 30, seed=1),
        "000000000007.jpg": _image_bytes(20, 20, fmt="PNG", seed=2),
        "000000000011.jpg": _image_bytes(20, 20, seed=3),
        "000000000012.jpg": _image_bytes(20, 20, seed=4)[:200],
    }
    for name, data in files.items():
        _put(src / "val2017" / name, data)
    return src, {"doc": doc, "files": files}


def test_coco_annotations_survive(coco_src, tmp_path):
    src, ref = coco_src
    summary = convert_coco(src, tmp_path / "out", "val", progress=False)
    info, samples, skipped = read_split(tmp_path / "out")
    assert sorted(samples) == ["000000000007", "000000000042"]
    assert summary["images_without_annotations"] == info["images_without_annotations"] == 1
    assert {s["file"]: s["reason"] for s in skipped} == {"val2017/000000000009.jpg": "missing_file",
                                                         "val2017/000000000011.jpg": "size_mismatch",
                                                         "val2017/000000000012.jpg": "decode_error"}
    assert info["categories"] == ref["doc"]["categories"] and info["orphan_annotations"] == 1
    sample = json.loads(samples["000000000042"]["json"])
    assert (sample["image_id"], sample["width"], sample["height"]) == (42, 40, 30)
    expected = [{k: v for k, v in a.items() if k != "image_id"} for a in ref["doc"]["annotations"][:2]]
    assert sample["annotations"] == expected  # original ids, boxes, iscrowd, area, polygon and RLE
    assert samples["000000000042"]["jpg"] == ref["files"]["000000000042.jpg"]
    assert samples["000000000007"]["png"] == ref["files"]["000000000007.jpg"]
    assert json.loads(samples["000000000007"]["json"])["annotations"] == []


def test_coco_drop_unannotated(coco_src, tmp_path):
    src, _ = coco_src
    summary = convert_coco(src, tmp_path / "out", "val", keep_unannotated=False, progress=False)
    _, samples, skipped = read_split(tmp_path / "out")
    assert list(samples) == ["000000000042"] and summary["images_without_annotations"] == 0
    assert {"file": "val2017/000000000007.jpg", "reason": "no_annotations"} in [
        {k: s[k] for k in ("file", "reason")} for s in skipped]


def test_coco_layout_errors(coco_src, tmp_path):
    src, ref = coco_src
    with pytest.raises(LayoutError, match=r"expected COCO layout .*instances_train2017.json.*is missing"):
        convert_coco(src, tmp_path / "out", "train")
    ann = src / "annotations/instances_val2017.json"
    ann.write_text(json.dumps({"images": []}))
    with pytest.raises(LayoutError, match="lists 'images', 'annotations', 'categories'"):
        convert_coco(src, tmp_path / "out", "val")
    doc = ref["doc"]
    doc["annotations"][0]["category_id"] = 5
    ann.write_text(json.dumps(doc))
    with pytest.raises(LayoutError, match=r"annotations\[0\] \(id 1\): category_id 5 is not in 'categories'"):
        convert_coco(src, tmp_path / "out", "val")
    del doc["images"][0]["width"]
    ann.write_text(json.dumps(doc))
    with pytest.raises(LayoutError, match=r"images\[0\]: missing field\(s\) width"):
        convert_coco(src, tmp_path / "out", "val")


# ---------------------------------------------------------------- ADE20K


@pytest.fixture
def ade_src(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "ade" / "ADEChallengeData2016"
    labels_HW = np.zeros((12, 16), np.uint8)
    labels_HW[:, 4:] = 150
    labels_HW[:6, :2] = 1
    labels_HW[0, 0] = 37
    files = {
        "images/training/ADE_train_1.jpg": _image_bytes(16, 12, seed=1),
        "annotations/training/ADE_train_1.png": _label_png(labels_HW),
        "images/training/ADE_train_2.jpg": _image_bytes(16, 12, seed=2),  # no annotation
        "annotations/training/ADE_train_3.png": _label_png(labels_HW),  # no image
        "images/training/ADE_train_4.jpg": _image_bytes(17, 12, seed=4),
        "annotations/training/ADE_train_4.png": _label_png(labels_HW),  # size mismatch
        "images/training/ADE_train_5.jpg": _image_bytes(16, 12, seed=5),
        "annotations/training/ADE_train_5.png": _label_png(labels_HW, mode="P"),  # palette: refused
        "images/training/ADE_train_6.jpg": _image_bytes(16, 12, seed=6),
        "annotations/training/ADE_train_6.png": _label_png(labels_HW, mode="RGB"),  # RGB: refused
        "images/training/ADE_train_7.jpg": _image_bytes(16, 12, seed=7),
        "annotations/training/ADE_train_7.png": _label_png(np.full((12, 16), 151)),  # out of range
        "images/validation/ADE_val_1.jpg": _image_bytes(16, 12, seed=8),
        "annotations/validation/ADE_val_1.png": _label_png(labels_HW),
    }
    for rel, data in files.items():
        _put(root / rel, data)
    return root.parent, files


def test_ade20k_masks_byte_identical_and_quirks(ade_src, tmp_path):
    src, files = ade_src
    convert_ade20k(src, tmp_path / "out", "train", progress=False)
    info, samples, skipped = read_split(tmp_path / "out")
    assert list(samples) == ["ADE_train_1"]
    sample = samples["ADE_train_1"]
    assert sample["seg.png"] == files["annotations/training/ADE_train_1.png"]
    assert sample["jpg"] == files["images/training/ADE_train_1.jpg"]
    ids = np.asarray(Image.open(io.BytesIO(sample["seg.png"])))
    assert ids.dtype == np.uint8 and set(np.unique(ids).tolist()) == {0, 1, 37, 150}
    assert {s["file"]: s["reason"] for s in skipped} == {
        "images/training/ADE_train_2.jpg": "missing_annotation",
        "annotations/training/ADE_train_3.png": "annotation_without_image",
        "images/training/ADE_train_4.jpg": "size_mismatch",
        "images/training/ADE_train_5.jpg": "bad_label_format",
        "images/training/ADE_train_6.jpg": "bad_label_format",
        "images/training/ADE_train_7.jpg": "label_out_of_range",
    }
    assert info["num_classes"] == 150 and info["reduce_zero_label"] is True


def test_ade20k_val_and_root_forms(ade_src, tmp_path):
    src, files = ade_src
    convert_ade20k(src / "ADEChallengeData2016", tmp_path / "out", "val", progress=False)  # root given directly
    _, samples, skipped = read_split(tmp_path / "out")
    assert list(samples) == ["ADE_val_1"] and skipped == []
    assert samples["ADE_val_1"]["seg.png"] == files["annotations/validation/ADE_val_1.png"]
    with pytest.raises(LayoutError, match=r"expected ADE20K layout .*ADEChallengeData2016/images/"):
        convert_ade20k(tmp_path / "elsewhere", tmp_path / "out2", "train")


def test_preparers_dict():
    assert PREPARERS == {"imagenet": convert_imagenet, "coco": convert_coco, "ade20k": convert_ade20k,
                         "nyud": convert_nyud, "pascal_context": convert_pascal_context}
    assert issubclass(LayoutError, ValueError) and issubclass(OutputNotEmptyError, PrepareError)


def test_datasets_folder_is_not_a_package():
    # an importable `datasets` package would shadow Hugging Face's `datasets`
    assert not (Path(__file__).resolve().parents[1] / "datasets" / "__init__.py").exists()


def test_shards_are_not_class_sorted():
    """Release layouts are class-sorted; shards must mix classes or resampled readers see few-class batches."""
    from pretrain.prepare.shards import shuffled

    jobs = [(c, i) for c in range(10) for i in range(50)]
    order = shuffled(jobs)
    assert order == shuffled(jobs) and sorted(order) == jobs  # deterministic permutation
    assert len({c for c, _ in order[:50]}) >= 8  # the first shard's worth holds most classes
