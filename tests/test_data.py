"""Data pipelines: decoding safety, batch contract, transform alignment, determinism, splits, bad-sample handling.

Shards are written here with webdataset's TarWriter in the prepare/ schema (tiny images, a few samples per shard).
"""

from __future__ import annotations

import io
import itertools
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.nn.functional import max_pool2d

from pretrain.data.decode import (
    coco_label_maps,
    decode_mask,
    decode_rgb,
    decode_seg_sample,
    is_allowed_member,
)
from pretrain.data.mixture import MixedStream, TaskSampler
from pretrain.data.sources import make_eval_loader, make_train_loader, read_shard_info, task_info
from pretrain.data.transforms import map_boxes, transform_det, transform_seg

torch.set_num_threads(1)
# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; the pinned version is what we test.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
CATEGORIES = [{"id": i, "name": f"c{i}"} for i in (1, 3, 7, 90)]  # non-contiguous like COCO


def _encode(arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _image(rng: np.random.Generator, h: int = 40, w: int = 56) -> np.ndarray:
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def _sample(task: str, i: int, rng: np.random.Generator) -> dict[str, bytes]:
    img = _image(rng)
    out = {"__key__": f"{task}{i:04d}", "jpg": _encode(img)}
    if task == "cls":
        out.update(cls=str(i % 5).encode(), json=json.dumps({"wnid": f"n{i % 5:08d}"}).encode())
    elif task == "det":
        cats = [c["id"] for c in CATEGORIES]
        anns = [{"bbox": [4.0 + j, 5.0, 20.0, 15.0], "category_id": cats[(i + j) % 4], "iscrowd": int(j == 2),
                 "area": 300.0, "segmentation": []} for j in range(3)]
        out["json"] = json.dumps({"image_id": 1000 + i, "width": 56, "height": 40, "annotations": anns}).encode()
    else:
        mask = np.zeros((40, 56), np.uint8)
        mask[10:30, 10:40] = 150
        mask[0:5, :] = 149
        out["seg.png"] = _encode(mask, "PNG", "L")
    return out


def write_split(root: Path, task: str, *, n: int = 12, per_shard: int = 3, extra: list[dict] | None = None) -> Path:
    """Write `n` good samples (+ `extra` raw samples appended to the last shard) as shards + _info.json."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = [_sample(task, i, rng) for i in range(n)]
    chunks = [samples[i:i + per_shard] for i in range(0, n, per_shard)] or [[]]
    chunks[-1] = chunks[-1] + list(extra or [])
    names = []
    for s, chunk in enumerate(chunks):
        names.append(f"{task}-{s:06d}.tar")
        with wds.TarWriter(str(root / names[-1]), encoder=False) as sink:
            for sample in chunk:
                sink.write(sample)
    info = {"num_samples": n + len(extra or []), "shards": names, "shard_lengths": [len(c) for c in chunks]}
    info.update({"cls": {"classes": [{"index": k, "wnid": f"n{k:08d}", "name": str(k)} for k in range(5)]},
                 "det": {"categories": CATEGORIES}, "seg": {"num_classes": 150}}[task])
    (root / "_info.json").write_text(json.dumps(info))
    return root


def _keys(loader, limit: int = 1000) -> list[str]:
    out: list[str] = []
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        out += batch["keys"]
    return out


# ---------------------------------------------------------------- decoding

def test_missing_or_empty_shard_sets_fail_naming_the_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        read_shard_info(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="_info.json"):
        read_shard_info(tmp_path)
    (tmp_path / "_info.json").write_text(json.dumps({"num_samples": 0, "shards": []}))
    with pytest.raises(ValueError, match=str(tmp_path)):
        make_train_loader("cls", tmp_path, batch_size=2, img_size=32, seed=0)
    (tmp_path / "_info.json").write_text(json.dumps({"num_samples": 3, "shards": ["gone-000000.tar"]}))
    with pytest.raises(FileNotFoundError, match="gone-000000.tar"):
        make_eval_loader("cls", tmp_path, batch_size=2, img_size=32)


def test_rgb_decoding_handles_cmyk_gray_palette_png() -> None:
    arr = _image(np.random.default_rng(1), 12, 16)
    for fmt, mode in (("JPEG", "CMYK"), ("JPEG", "L"), ("PNG", "P"), ("PNG", "RGBA"), ("PNG", "L")):
        data = _encode(arr, fmt, mode)
        img = decode_rgb(data)
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert img.dtype == torch.uint8 and img.shape == (3, 12, 16), (fmt, mode)
        assert np.abs(img.permute(1, 2, 0).numpy().astype(int) - ref).max() <= 1, (fmt, mode)


def test_ade_ids_survive_decoding_and_reduce_zero_label() -> None:
    raw = np.array([[0, 1, 149, 150]], np.uint8)
    png = _encode(raw, "PNG", "L")
    assert decode_mask(png).tolist() == [[0, 1, 149, 150]]  # raw ids before reduce-zero-label
    sample = {"jpg": _encode(np.zeros((1, 4, 3), np.uint8)), "seg.png": png}
    assert decode_seg_sample(sample, num_classes=150)["mask"].tolist() == [[255, 0, 148, 149]]
    with pytest.raises(ValueError, match="151"):
        decode_seg_sample({**sample, "seg.png": _encode(np.array([[151]], np.uint8), "PNG", "L")}, num_classes=150)
    with pytest.raises(ValueError, match="mode"):
        decode_mask(_encode(np.zeros((2, 2, 3), np.uint8), "PNG"))  # an RGB label map is refused, not guessed


def test_coco_ids_map_to_contiguous_and_back(tmp_path: Path) -> None:
    to_label, to_cat = coco_label_maps(list(reversed(CATEGORIES)))
    assert to_label == {1: 1, 3: 2, 7: 3, 90: 4} and to_cat == [1, 3, 7, 90]
    assert all(to_cat[to_label[c] - 1] == c for c in to_label)
    root = write_split(tmp_path / "det", "det", n=4, per_shard=2)
    assert task_info("det", root)["contiguous_to_cat_id"] == [1, 3, 7, 90]
    for batch in make_eval_loader("det", root, batch_size=2, img_size=64):
        for target, anns in zip(batch["targets"], batch["annotations"]):
            non_crowd = [a["category_id"] for a in anns if not a["iscrowd"]]
            assert [to_cat[int(lab) - 1] for lab in target["labels"]] == non_crowd


class _Payload:
    """Unpickling this creates a marker file: proves code execution if any decoder unpickles it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickles_in_shards_are_never_read_or_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(str(marker)))
    pickle.loads(payload)  # the payload is live: unpickling it does create the marker
    assert marker.exists()
    marker.unlink()
    rng = np.random.default_rng(5)
    evil = [{**_sample("cls", 90, rng), "pyd": payload, "pth": payload, "pickle": payload},
            {"__key__": "onlypickle", "pyd": payload}]
    root = write_split(tmp_path / "cls", "cls", n=4, per_shard=4, extra=evil)
    batches = list(make_eval_loader("cls", root, batch_size=8, img_size=32))
    assert "cls0090" in batches[0]["keys"] and "onlypickle" not in batches[0]["keys"]
    assert sum(b["skipped"] for b in batches) == 0  # with nothing readable, "onlypickle" never becomes a sample
    assert len(batches[0]["keys"]) == 5
    assert not marker.exists()
    assert not any(is_allowed_member(f"k.{ext}") for ext in ("pyd", "pth", "pickle", "pkl", "npy", "mp"))


def test_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    good = _sample("det", 77, np.random.default_rng(3))
    bad = [{**good, "__key__": "badjpg", "jpg": b"\xff\xd8garbage"},
           {**good, "__key__": "badjson", "json": b"{not json"},
           {**good, "__key__": "badcat", "json": json.dumps({"image_id": 1, "annotations": [
               {"bbox": [0, 0, 5, 5], "category_id": 2, "iscrowd": 0}]}).encode()}]
    root = write_split(tmp_path / "det", "det", n=5, per_shard=5, extra=bad)
    batches = list(make_eval_loader("det", root, batch_size=3, img_size=32))
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == 5 and not {"badjpg", "badjson", "badcat"} & set(keys)
    assert sum(b["skipped"] for b in batches) == 3
    train = iter(make_train_loader("det", root, batch_size=4, img_size=32, seed=0, shuffle_buffer=4))
    assert sum(next(train)["skipped"] for _ in range(6)) > 0  # resampled stream passes the bad ones too


def test_a_shard_set_of_only_bad_samples_raises_instead_of_spinning(tmp_path: Path) -> None:
    bad = [{"__key__": f"b{i}", "jpg": b"junk", "cls": b"1"} for i in range(5)]
    undecodable = write_split(tmp_path / "bad", "cls", n=0, extra=bad)
    unreadable = write_split(tmp_path / "junk", "cls", n=2, per_shard=2)
    (unreadable / "cls-000000.tar").write_bytes(b"not a tar file at all" * 100)
    for root in (undecodable, unreadable):
        loader = make_train_loader("cls", root, batch_size=2, img_size=32, seed=0, max_consecutive_errors=20)
        with pytest.raises(RuntimeError, match="consecutive"):
            next(iter(loader))


# ---------------------------------------------------------------- batch contract

def test_train_batches_follow_the_contract(tmp_path: Path) -> None:
    b = next(iter(make_train_loader("cls", write_split(tmp_path / "c", "cls"), batch_size=4, img_size=32, seed=1)))
    assert b["task"] == "cls" and b["images"].dtype == torch.uint8 and b["images"].shape == (4, 3, 32, 32)
    assert b["labels"].dtype == torch.int64 and b["labels"].shape == (4,) and b["skipped"] == 0
    b = next(iter(make_train_loader("det", write_split(tmp_path / "d", "det"), batch_size=3, img_size=48, seed=1,
                                    aug_range=(0.5, 1.5))))
    assert b["images"].shape == (3, 3, 48, 48) and b["images"].dtype == torch.uint8
    assert b["image_ids"].dtype == torch.int64 and b["scales"].dtype == torch.float32
    assert b["orig_sizes"].tolist() == [[40, 56]] * 3
    for t in b["targets"]:
        assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
        assert len(t["labels"]) <= 2  # the crowd box (j == 2) is dropped in training
        assert ((t["labels"] >= 1) & (t["labels"] <= 4)).all() and (t["boxes"] >= 0).all() and (t["boxes"] <= 48).all()
        assert ((t["boxes"][:, 2:] - t["boxes"][:, :2]) >= 1).all()
    b = next(iter(make_train_loader("seg", write_split(tmp_path / "s", "seg"), batch_size=2, img_size=64, seed=1)))
    assert b["masks"].dtype == torch.int64 and b["masks"].shape == (2, 64, 64)
    assert set(b["masks"].unique().tolist()) <= {148, 149, 255}


def test_eval_batches_are_deterministic_and_keep_the_partial_batch(tmp_path: Path) -> None:
    root = write_split(tmp_path / "s", "seg", n=7, per_shard=3)
    runs = [list(make_eval_loader("seg", root, batch_size=3, img_size=64)) for _ in range(2)]
    assert [len(b["keys"]) for b in runs[0]] == [3, 3, 1]
    b = runs[0][0]
    assert torch.equal(b["images"], runs[1][0]["images"]) and torch.equal(b["masks"], runs[1][0]["masks"])
    assert b["valid_hw"].tolist() == [[46, 64]] * 3 and b["orig_sizes"].tolist() == [[40, 56]] * 3
    assert (b["masks"][:, 46:, :] == 255).all()  # padding is ignored by the metric
    assert b["orig_masks"][0].shape == (40, 56) and b["orig_masks"][0][20, 20] == 149


# ---------------------------------------------------------------- transforms keep boxes, masks, pixels aligned

def _box_of(mask_HW: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask_HW, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_det_transform_boxes_follow_the_pixels() -> None:
    img = torch.zeros(3, 90, 120, dtype=torch.uint8)
    img[:, 20:60, 30:100] = 255
    sample = {"image": img, "boxes": torch.tensor([[30.0, 20.0, 100.0, 60.0]]), "labels": torch.tensor([1]),
              "iscrowd": torch.tensor([False]), "image_id": 1, "annotations": []}
    kept = 0
    for seed in range(40):  # flips (p = 0.5), crops and pads all occur; the rectangle is off-centre
        out = transform_det(sample, rng=random.Random(seed), size=64, train=True, jitter=(0.3, 2.0))
        bright = out["image"].float().mean(0) > 160
        if len(out["boxes"]) == 0:
            assert bright.sum() <= 64, seed  # dropped only when (almost) nothing of it is visible
            continue
        kept += 1
        assert np.abs(np.array(_box_of(bright)) - out["boxes"][0].numpy()).max() <= 1.5, seed
    assert kept >= 20
    ev = transform_det(sample, rng=random.Random(0), size=64, train=False)
    assert torch.allclose(ev["boxes"][0] / ev["scale"], sample["boxes"][0], atol=1.0)  # evaluator's inverse


def test_map_boxes_flip_and_crop_exact() -> None:
    box = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    out = map_boxes(box, src_hw=(50, 100), dst_hw=(100, 200), flip=True, top=10, left=20, size=64)
    assert out.tolist() == [[64.0, 0.0, 64.0, 40.0]]  # x: 200-60-20=120→clip 64, 200-20-20=160→64; y: 10-10, 50-10
    out = map_boxes(box, src_hw=(50, 100), dst_hw=(100, 200), flip=False, top=0, left=0, size=64)
    assert out.tolist() == [[20.0, 10.0, 60.0, 50.0]]


def test_seg_transform_keeps_mask_and_image_aligned() -> None:
    img = torch.zeros(3, 60, 80, dtype=torch.uint8)
    mask = torch.full((60, 80), 7, dtype=torch.uint8)
    img[:, 15:45, 10:50] = 255
    mask[15:45, 10:50] = 3
    for seed in range(30):
        out = transform_seg({"image": img, "mask": mask}, rng=random.Random(seed), size=48, train=True)
        m, bright = out["mask"], out["image"].float().mean(0) > 127
        pad = (out["image"] == torch.tensor([124, 116, 104])[:, None, None]).all(0)
        assert ((m == 255) == pad).all(), seed  # mask ignore exactly where the image is padding
        disagree = ((m == 3) != bright) & (m != 255)
        region = (m == 3).float()[None]
        boundary = (max_pool2d(region, 3, 1, 1) != -max_pool2d(-region, 3, 1, 1))[0]
        assert not (disagree & ~boundary).any(), seed  # image and mask differ at most on the 1-px boundary


# ---------------------------------------------------------------- determinism, resume, rank/worker streams

def test_train_streams_are_deterministic_per_seed_rank_and_resume_step(tmp_path: Path) -> None:
    root = write_split(tmp_path / "c", "cls", n=24, per_shard=4)

    def first(n_batches: int = 3, **kw) -> list[dict]:
        args = {"batch_size": 4, "img_size": 32, "seed": 7, "shuffle_buffer": 6, **kw}
        it = iter(make_train_loader("cls", root, **args))
        return [next(it) for _ in range(n_batches)]

    a, b = first(), first()
    assert all(x["keys"] == y["keys"] and torch.equal(x["images"], y["images"]) for x, y in zip(a, b))
    r1, r2 = first(start_step=50), first(start_step=50)  # resumed twice from the same step: identical
    assert all(x["keys"] == y["keys"] and torch.equal(x["images"], y["images"]) for x, y in zip(r1, r2))
    keys = lambda batches: [k for x in batches for k in x["keys"]]  # noqa: E731
    assert keys(r1) != keys(a) and keys(first(seed=8)) != keys(a) and keys(first(rank=1, world_size=2)) != keys(a)


def test_deferred_image_reads_give_the_same_batches(tmp_path: Path, monkeypatch) -> None:
    """Images read right before decoding (tar.MemberRef) or with their headers: the same stream, byte for byte."""
    import pretrain.data.sources as sources

    root = write_split(tmp_path / "s", "seg", n=12, per_shard=4)
    batches = {}
    for defer in (1, 1 << 30):  # every member deferred / none
        monkeypatch.setattr(sources, "_DEFER_BYTES", defer)
        it = iter(make_train_loader("seg", root, batch_size=4, img_size=32, seed=5, shuffle_buffer=6))
        batches[defer] = [next(it) for _ in range(4)]
    for a, b in zip(*batches.values()):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"]) and torch.equal(a["masks"], b["masks"])


def test_two_workers_partition_eval_and_draw_distinct_train_streams(tmp_path: Path) -> None:
    root = write_split(tmp_path / "c", "cls", n=20, per_shard=2)  # 10 shards
    seen = []
    for rank in range(2):
        seen += _keys(make_eval_loader("cls", root, batch_size=3, img_size=16, rank=rank, world_size=2,
                                       num_workers=2))
    seen += _keys(make_eval_loader("cls", root, batch_size=3, img_size=16, rank=0, world_size=3))
    seen += _keys(make_eval_loader("cls", root, batch_size=3, img_size=16, rank=1, world_size=3))
    seen += _keys(make_eval_loader("cls", root, batch_size=3, img_size=16, rank=2, world_size=3))
    assert sorted(seen) == sorted([f"cls{i:04d}" for i in range(20)] * 2)  # each sample once per world size
    kw = {"batch_size": 4, "img_size": 16, "seed": 3, "shuffle_buffer": 4, "num_workers": 2}
    runs = [_keys(make_train_loader("cls", root, **kw), limit=4) for _ in range(2)]
    assert runs[0] == runs[1]  # deterministic with workers too
    assert runs[0][0:4] != runs[0][4:8]  # batches 0 and 1 come from workers 0 and 1: distinct streams


def test_mixed_stream_over_real_loaders_resumes_repeatably(tmp_path: Path) -> None:
    kwargs = {"cls": {"shard_dir": write_split(tmp_path / "c", "cls"), "batch_size": 4, "img_size": 32,
                      "shuffle_buffer": 4},
              "seg": {"shard_dir": write_split(tmp_path / "s", "seg"), "batch_size": 2, "img_size": 48,
                      "shuffle_buffer": 4}}

    def run(start: int, steps: int) -> list[tuple[int, str, list[str], torch.Tensor]]:
        stream = MixedStream(TaskSampler(["cls", "seg"], weights=[1, 1], seed=4), kwargs, start_step=start)
        return [(s, t, b["keys"], b["images"]) for s, t, b in itertools.islice(stream, steps)]

    full, r1, r2 = run(0, 12), run(6, 6), run(6, 6)
    assert [(s, t) for s, t, _, _ in r1] == [(s, t) for s, t, _, _ in full[6:]]
    assert all(a[2] == b[2] and torch.equal(a[3], b[3]) for a, b in zip(r1, r2))
    assert {b[3].shape[-1] for b in full} == {32, 48}  # per-task resolution


def test_shards_from_synth_and_prepare_keep_ade_ids(tmp_path: Path) -> None:
    synth = pytest.importorskip("pretrain.synth")
    prepare = pytest.importorskip("pretrain.prepare")
    synth.synthesize(tmp_path / "raw", seed=0, scale=0.05, image_size=(32, 48), layouts=("ade20k",), quirks=False)
    prepare.PREPARERS["ade20k"](tmp_path / "raw" / "ade20k", tmp_path / "val", "val", progress=False)
    seen: set[int] = set()
    for batch in make_eval_loader("seg", tmp_path / "val", batch_size=2, img_size=32):
        assert batch["skipped"] == 0
        seen |= {int(v) for m in batch["orig_masks"] for v in m.unique()}
    allowed = {c - 1 for c in (*synth.ADE_CLASS_IDS, synth.ADE_FLOOR_ID)} | {255}
    assert seen <= allowed and len(seen & {c - 1 for c in synth.ADE_CLASS_IDS}) >= 1
