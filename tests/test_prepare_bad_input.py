"""Converter skeleton byte-identity, and bad input at conversion: damaged PNGs, bad COCO boxes, paths outside
``--src``, directory symlinks."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.prepare import images as images_module
from pretrain.prepare.ade20k import convert_ade20k
from pretrain.prepare.coco import clean_bbox, convert_coco
from pretrain.prepare.imagenet import convert_imagenet
from pretrain.prepare.paths import confined
from pretrain.prepare.pngcheck import PngDamage, verify_png

# sha256 over the sorted "dataset/split/shard:sha256" lines of the conftest `shards` corpus (SMALL, seed 0,
# min_shards=2, max_count=32), computed with the converters as they were BEFORE the skeleton refactor (commit
# e6a7115): the refactor and the hardening must not change a byte of the existing datasets' shards.
SHARDS_SHA256 = "899fa0a599f5adcaccb288e907acb925004aa2ba5d33143d9fb09de5c1439833"
SKIPPED_BEFORE = {
    ("imagenet", "train"): [("train/n90000000/.DS_Store", "not_an_image"),
                            ("train/n90000003/n90000003_0.JPEG", "decode_error")],
    ("coco", "train"): [("train2017/000000000004.jpg", "missing_file")],
    ("ade20k", "train"): [("images/training/ADE_train_00000001.jpg", "missing_annotation")],
}


def test_existing_converters_byte_identical(shards: Path):
    lines = []
    for name in ("imagenet", "coco", "ade20k"):
        for split in ("train", "val"):
            folder = shards / name / split
            for tar in sorted(folder.glob("*.tar")):
                lines.append(f"{name}/{split}/{tar.name}:{hashlib.sha256(tar.read_bytes()).hexdigest()}")
            rows = [json.loads(line) for line in (folder / "skipped.jsonl").read_text().splitlines()]
            assert [(r["file"], r["reason"]) for r in rows] == SKIPPED_BEFORE.get((name, split), [])
    assert hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest() == SHARDS_SHA256


# ---------------------------------------------------------------- A: damaged PNGs


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _edit_idat(png: bytes, edit, *, fix_crc: bool = True) -> bytes:
    """Apply ``edit`` to the first IDAT chunk's data; rewrite its length and (unless told not to) its CRC."""
    pos = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[pos:pos + 4])
    body = edit(png[pos + 8:pos + 8 + length])
    crc = zlib.crc32(b"IDAT" + body) ^ (0 if fix_crc else 1)
    chunk = struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(">I", crc)
    return png[:pos] + chunk + png[pos + 12 + length:]


_LABELS = (np.arange(12 * 16).reshape(12, 16) % 7).astype(np.uint8)
_PIXELS = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
DAMAGE = {  # name -> (edit, fix_crc, reason, detail fragment)
    "bad_idat_crc": (lambda b: b, False, "png_crc", "CRC mismatch in PNG chunk 'IDAT'"),
    "bad_adler32": (lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]), True, "decode_error", "damaged PNG zlib stream"),
    "cut_zlib": (lambda b: b[:-6], True, "decode_error", "zlib stream ends early"),
    "garbled_deflate": (lambda b: b[:2] + bytes([0xFF] * 6) + b[8:], True, "decode_error", "zlib"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_png_image_and_mask_skipped(damage, tmp_path):
    edit, fix_crc, reason, fragment = DAMAGE[damage]
    bad_image = _edit_idat(_png(_PIXELS), edit, fix_crc=fix_crc)
    bad_mask = _edit_idat(_png(_LABELS), edit, fix_crc=fix_crc)
    if damage == "bad_idat_crc":
        Image.open(io.BytesIO(bad_image)).load()  # PIL alone lets this through: the reason for pngcheck
    imagenet = tmp_path / "imagenet"
    _put(imagenet / "train/n01/good.JPEG", _png(_PIXELS))
    _put(imagenet / "train/n01/bad.JPEG", bad_image)
    convert_imagenet(imagenet, tmp_path / "out_in", "train", progress=False)
    rows = _rows(tmp_path / "out_in")
    assert [(r["file"], r["reason"]) for r in rows] == [("train/n01/bad.JPEG", reason)]
    assert fragment in rows[0]["detail"]
    ade = tmp_path / "ade/ADEChallengeData2016"
    for stem, mask in (("a", _png(_LABELS)), ("b", bad_mask)):
        _put(ade / f"images/training/{stem}.png", _png(_PIXELS))
        _put(ade / f"annotations/training/{stem}.png", mask)
    summary = convert_ade20k(ade, tmp_path / "out_ade", "train", progress=False)
    rows = _rows(tmp_path / "out_ade")
    assert summary["written"] == 1 and [(r["file"], r["reason"]) for r in rows] == [("images/training/b.png", reason)]


def test_valid_pngs_pass_the_check():
    for array in (_LABELS, _PIXELS, np.zeros((3, 70), np.uint16), _LABELS.astype(bool)):
        for interlace in (0, 1):
            buf = io.BytesIO()
            Image.fromarray(array).save(buf, "PNG", interlace=interlace)
            verify_png(buf.getvalue(), name="x")
    with pytest.raises(PngDamage, match="no IEND"):
        verify_png(_png(_LABELS)[:-12], name="x")


# ---------------------------------------------------------------- B: COCO boxes


BOXES = [  # bbox in a 40x30 image -> kept box (None = dropped as bad_bbox)
    ([1, 2, 3, 4], [1, 2, 3, 4]),
    ([1.5, 0, 38.5, 30], [1.5, 0, 38.5, 30]),
    ([-5, 2, 10, 4], [0.0, 2.0, 5.0, 4.0]),
    ([35, 25, 10, 10], [35.0, 25.0, 5.0, 5.0]),
    ([-1, -1, 50, 50], [0.0, 0.0, 40.0, 30.0]),
    ([0, 0, 0, 4], None),
    ([0, 0, 3, -4], None),
    (["1", 0, 3, 4], None),
    ([True, 0, 3, 4], None),
    ([float("nan"), 0, 3, 4], None),
    ([0, 0, float("inf"), 4], None),
    ([50, 5, 5, 5], None),
    ([0, 0, 3], None),
    ("0 0 3 4", None),
]


@pytest.mark.parametrize(("bbox", "kept"), BOXES)
def test_clean_bbox_rule(bbox, kept):
    box, why = clean_bbox(bbox, 40, 30)
    assert box == kept and (why is None) == (kept is not None)
    if kept == bbox:
        assert box is bbox  # unchanged boxes keep their JSON values exactly


def _coco(tmp_path: Path, bboxes: list, file_names: dict[int, str] | None = None) -> Path:
    src = tmp_path / "coco"
    names = file_names or {}
    images = [{"id": i, "file_name": names.get(i, f"{i:012d}.jpg"), "width": 40, "height": 30} for i in (1, 2)]
    anns = [{"id": 100 + k, "image_id": 1, "category_id": 3, "bbox": b, "iscrowd": 0, "area": 1.0,
             "segmentation": [[0, 0, 1, 0, 1, 1]]} for k, b in enumerate(bboxes)]
    doc = {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "car"}]}
    _put(src / "annotations/instances_val2017.json", json.dumps(doc).encode())  # NaN/Infinity as JSON allows
    for i in (1, 2):
        _put(src / f"val2017/{i:012d}.jpg", _png(_PIXELS.repeat(3, 0).repeat(3, 1)[:30, :40]))
    return src


def test_coco_bad_boxes_dropped_and_listed(tmp_path):
    src = _coco(tmp_path, [b for b, _ in BOXES])
    convert_coco(src, tmp_path / "out", "val", progress=False)
    rows = _rows(tmp_path / "out")
    dropped = [k for k, (_, kept) in enumerate(BOXES) if kept is None]
    assert [r["reason"] for r in rows] == ["bad_bbox"] * len(dropped)
    assert all(r["file"] == "val2017/000000000001.jpg" for r in rows)
    assert [r["detail"].split(":")[0] for r in rows] == [f"image id 1, annotation id {100 + k}" for k in dropped]
    assert "'1'" in rows[dropped.index(7)]["detail"] and "nan" in rows[dropped.index(9)]["detail"]
    sample = json.loads(_samples(tmp_path / "out")["000000000001"]["json"])
    assert [a["bbox"] for a in sample["annotations"]] == [kept for _, kept in BOXES if kept is not None]
    info = json.loads((tmp_path / "out/_info.json").read_text())
    assert info["clipped_boxes"] == 3 and info["skipped_by_reason"] == {"bad_bbox": len(dropped)}


# ---------------------------------------------------------------- D: paths outside --src


@pytest.mark.parametrize(("parts", "inside"), [
    (("val2017", "a.jpg"), True), (("val2017", "sub/../a.jpg"), True), (("val2017", "../../secret.jpg"), False),
    (("val2017", "/etc/passwd"), False), (("..",), False), ((".",), False), (("val2017", "../../coco/x.jpg"), True),
])
def test_confined(parts, inside, tmp_path):
    got = confined(tmp_path / "coco", *parts)
    assert (got is not None) == inside
    if inside:
        assert got.is_relative_to(tmp_path / "coco")


def test_coco_file_names_outside_src_never_read(tmp_path, monkeypatch):
    names = {1: "../../secret.jpg", 2: "/etc/passwd"}
    src = _coco(tmp_path, [[1, 2, 3, 4]], names)
    _put(tmp_path / "secret.jpg", _png(_PIXELS))  # a valid image: written if the name were followed
    opened = []
    real = images_module.read_bytes
    monkeypatch.setattr(images_module, "read_bytes", lambda p: opened.append(Path(p)) or real(p))
    summary = convert_coco(src, tmp_path / "out", "val", progress=False)
    rows = _rows(tmp_path / "out")
    assert summary["written"] == 0 and opened == []
    assert [(r["file"], r["reason"]) for r in rows] == [("val2017/../../secret.jpg", "outside_src"),
                                                        ("val2017//etc/passwd", "outside_src")]


# ---------------------------------------------------------------- 7: directory symlinks


def test_directory_symlinks_not_followed(tmp_path):
    src = tmp_path / "imagenet"
    _put(src / "train/n01/a.JPEG", _png(_PIXELS))
    (src / "train/n01/loop").symlink_to(src / "train", target_is_directory=True)  # a loop if followed
    (src / "train/n02").symlink_to(src / "train/n01", target_is_directory=True)  # a class folder twice
    (src / "train/n01/self.JPEG").symlink_to(src / "train/n01/self.JPEG")  # a looping file link
    summary = convert_imagenet(src, tmp_path / "out", "train", progress=False)
    rows = {r["file"]: r["reason"] for r in _rows(tmp_path / "out")}
    assert summary["written"] == 1
    assert rows == {"train/n02": "symlinked_dir", "train/n01/loop": "symlinked_dir", "train/n01/self.JPEG":
                    "unreadable"}
    assert json.loads((tmp_path / "out/_info.json").read_text())["num_classes"] == 1
    ade = tmp_path / "ade/ADEChallengeData2016"
    _put(ade / "images/training/a.png", _png(_PIXELS))
    _put(ade / "annotations/training/a.png", _png(_LABELS))
    (ade / "images/training/again").symlink_to(ade / "images", target_is_directory=True)
    convert_ade20k(ade, tmp_path / "out_ade", "train", progress=False)
    assert {r["file"]: r["reason"] for r in _rows(tmp_path / "out_ade")} == {
        "images/training/again": "symlinked_dir"}


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples
