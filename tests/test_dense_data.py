"""Dense multi-task data: decoders, the two protocols' transforms, loaders and the batch contract.

Shards are hand-written here in the DENSE_SCHEMA layout with webdataset's TarWriter (tiny images).
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pretrain.data.decode import is_allowed_member
from pretrain.data.dense import DENSE_DATASETS, make_dense_eval_loader, make_dense_train_loader
from pretrain.data.dense_decode import DENSE_TASKS, decode_dense_sample, decode_npy_depth
from pretrain.data.sources import TASK_IDS

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
NYUD, PASCAL = DENSE_DATASETS["nyud"], DENSE_DATASETS["pascal_context"]
H, W = 30, 36


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _jpg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def raw_sample(dataset: str, i: int, *, h: int = H, w: int = W) -> dict[str, bytes]:
    """One sample in the schema: images and maps with distinct, checkable content."""
    rng = np.random.default_rng(i)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    sem = np.zeros((h, w), np.uint8)
    sem[:, w // 3:] = 5
    sem[h // 2:, : w // 2] = 12
    normals = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    edge = np.zeros((h, w), np.uint8)
    edge[:, ::5] = 255
    out = {"__key__": f"{dataset}{i:04d}", "normals.png": _png(normals), "edge.png": _png(edge)}
    if dataset == "nyud":
        depth = np.linspace(0.5, 4.0, h * w, dtype=np.float32).reshape(h, w)
        depth[:3] = 0.0
        out.update({"png": _png(image), "semseg.png": _png(sem), "depth.npy": _npy(depth)})
    else:
        sem[0] = 255
        parts = np.zeros((h, w), np.uint8)
        parts[5:15, 5:15] = (i % 6) + 1 if i % 3 else 0  # every third image has no person
        valid = np.ones((h, w), np.uint8)
        valid[:, :4] = 0
        sal = np.tile(np.arange(w, dtype=np.uint8) * 7, (h, 1))
        out.update({"jpg": _jpg(image), "semseg.png": _png(sem), "human_parts.png": _png(parts),
                    "sal.png": _png(sal), "normals_valid.png": _png(valid)})
    tasks = list(DENSE_DATASETS[dataset].tasks)
    out["json"] = json.dumps({"id": f"img{i}", "width": w, "height": h, "tasks": tasks}).encode()
    return out


def write_dense_split(root: Path, dataset: str, *, n: int = 8, per_shard: int = 2,
                      extra: list[dict] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    samples = [raw_sample(dataset, i) for i in range(n)] + list(extra or [])
    names = []
    for s in range(0, len(samples), per_shard):
        names.append(f"{dataset}-{s // per_shard:06d}.tar")
        with wds.TarWriter(str(root / names[-1]), encoder=False) as sink:
            for sample in samples[s:s + per_shard]:
                sink.write(sample)
    spec = DENSE_DATASETS[dataset]
    info = {"num_samples": len(samples), "shards": names, "shard_lengths": [per_shard] * len(names),
            "dataset": dataset, "tasks": list(spec.tasks), "num_classes": spec.num_classes}
    (root / "_info.json").write_text(json.dumps(info))
    return root


def _decoded(dataset: str, i: int = 1, **kw) -> dict:
    spec = DENSE_DATASETS[dataset]
    return decode_dense_sample(raw_sample(dataset, i, **kw), dataset=spec, tasks=spec.tasks)


# ---------------------------------------------------------------- tables and decoding

def test_tables_are_consistent_and_members_whitelisted() -> None:
    for name, spec in DENSE_DATASETS.items():
        assert name in TASK_IDS and spec.name == name and set(spec.tasks) <= set(DENSE_TASKS)
    assert len(set(TASK_IDS.values())) == len(TASK_IDS)
    for task in DENSE_TASKS.values():
        assert is_allowed_member(f"dir/k0001.{task.member}")
    assert is_allowed_member("k.normals_valid.png")
    assert not any(is_allowed_member(f"k.{ext}") for ext in ("npy", "depth.pkl", "depth.npz", "semseg.pyd"))


def test_decoders_follow_the_release_conventions() -> None:
    nyud = _decoded("nyud")
    sem = nyud["targets"]["semseg"][0]
    assert nyud["image"].shape == (3, H, W) and sem.dtype == torch.uint8
    assert sem[0, 0] == 255 and sem[0, W - 1] == 4 and sem[H - 1, 0] == 11  # raw 0 → 255, c → c − 1
    assert nyud["targets"]["depth"].shape == (1, H, W) and nyud["targets"]["depth"][0, 0, 0] == 0.0
    assert torch.equal(nyud["targets"]["edge"][0, 0, :6], torch.tensor([1.0, 0, 0, 0, 0, 1.0]))
    raw_normals = np.asarray(Image.open(io.BytesIO(raw_sample("nyud", 1)["normals.png"])), dtype=np.float32)
    expect = torch.from_numpy(raw_normals.transpose(2, 0, 1) * 2 / 255 - 1)
    assert torch.allclose(nyud["targets"]["normals"], expect, atol=1e-6)
    pascal = _decoded("pascal_context")
    t = pascal["targets"]
    assert t["semseg"][0, 0, 0] == 255 and t["semseg"][0, 1, W - 1] == 5 and t["semseg"][0, 1, 0] == 0
    assert t["sal"][0, 0, :20].tolist() == [0] * 19 + [1]  # v = 7·col: 126 → 0, 133 → 1 (v/255 > 0.5)
    assert (t["normals"][:, :, :4] == 0).all() and torch.allclose(t["normals"][:, :, 4:], expect_p := (
        torch.from_numpy(np.asarray(Image.open(io.BytesIO(raw_sample("pascal_context", 1)["normals.png"])),
                                    dtype=np.float32).transpose(2, 0, 1) * 2 / 255 - 1)[:, :, 4:]), atol=1e-6)
    assert expect_p.abs().min() > 0  # 8-bit normals are never exactly 0: only invalid classes are


def test_decoders_refuse_bad_labels_and_unsafe_arrays() -> None:
    good = raw_sample("nyud", 2)

    def decode(**members) -> dict:
        return decode_dense_sample({**good, **members}, dataset=NYUD, tasks=NYUD.tasks)

    with pytest.raises(ValueError, match="41 outside 0..40"):
        decode(**{"semseg.png": _png(np.full((H, W), 41, np.uint8))})
    with pytest.raises(ValueError, match="21 outside 0..20"):
        decode_dense_sample({**raw_sample("pascal_context", 2), "semseg.png": _png(np.full((H, W), 21, np.uint8))},
                            dataset=PASCAL, tasks=("semseg",))
    with pytest.raises(ValueError, match="Object arrays cannot be loaded"):
        decode(**{"depth.npy": _npy(np.array([{"evil": 1}], dtype=object))})
    zipped = io.BytesIO()
    np.savez(zipped, depth=np.ones((H, W), np.float32))
    for bad, match in ((zipped.getvalue(), "not a .npy"), (pickle.dumps(np.ones((H, W))), "not a .npy"),
                       (_npy(np.ones((H, W), np.int32)), "dtype int32"), (_npy(np.ones((2, H, W), np.float32)),
                                                                           "shape"),
                       (_npy(np.full((H, W), np.nan, np.float32)), "non-finite")):
        with pytest.raises(ValueError, match=match):
            decode_npy_depth(bad)
    with pytest.raises(ValueError, match=r"depth.npy is \(4, 4\), image is \(30, 36\)"):
        decode(**{"depth.npy": _npy(np.ones((4, 4), np.float32))})
    missing = {k: v for k, v in good.items() if k != "edge.png"}
    with pytest.raises(KeyError, match="edge.png"):
        decode_dense_sample(missing, dataset=NYUD, tasks=NYUD.tasks)
    unlisted = {**missing, "json": json.dumps({"id": "x", "tasks": ["semseg", "depth", "normals"]}).encode()}
    edge = decode_dense_sample(unlisted, dataset=NYUD, tasks=NYUD.tasks)["targets"]["edge"]
    assert edge.shape == (1, H, W) and (edge == 255.0).all()  # a task the sample lacks is all ignore
    with pytest.raises(ValueError, match="no 'tasks' list"):
        decode(json=json.dumps({"id": "x"}).encode())


# ---------------------------------------------------------------- loaders and batch contract

def test_train_batches_follow_the_contract_and_are_deterministic(tmp_path: Path) -> None:
    root = write_dense_split(tmp_path / "p", "pascal_context")

    def batches(n: int = 3, **kw) -> list[dict]:
        args = {"batch_size": 2, "crop_size": (24, 28), "seed": 5, "shuffle_buffer": 4, **kw}
        it = iter(make_dense_train_loader("pascal_context", root, **args))
        return [next(it) for _ in range(n)]

    a, b = batches(), batches()
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and torch.equal(x["images"], y["images"])
        assert all(torch.equal(x["targets"][t], y["targets"][t]) for t in PASCAL.tasks)
    keys = lambda bs: [k for x in bs for k in x["keys"]]  # noqa: E731
    r1, r2 = batches(start_step=40), batches(start_step=40)
    assert keys(r1) == keys(r2) and keys(r1) != keys(a) and keys(batches(seed=6)) != keys(a)
    batch = a[0]
    assert batch["dataset"] == "pascal_context" and batch["skipped"] == 0
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (2, 3, 24, 28)
    t = batch["targets"]
    for name in ("semseg", "human_parts", "sal"):
        assert t[name].dtype == torch.int64 and t[name].shape == (2, 24, 28), name
    assert set(t["semseg"].unique().tolist()) <= {0, 5, 12, 255} and set(t["sal"].unique().tolist()) <= {0, 1, 255}
    assert set(t["human_parts"].unique().tolist()) <= {0, 1, 2, 3, 4, 5, 6, 255}
    assert t["normals"].dtype == torch.float32 and t["normals"].shape == (2, 3, 24, 28)
    ign = t["normals"] == 255.0
    assert (ign.all(1) == ign.any(1)).all() and (t["normals"][~ign].abs() <= 1).all()
    assert t["edge"].dtype == torch.float32 and t["edge"].shape == (2, 1, 24, 28)
    assert set(t["edge"].unique().tolist()) <= {0.0, 1.0, 255.0} and "crop_box" not in batch


def test_eval_partitions_exactly_once_over_two_ranks(tmp_path: Path) -> None:
    root = write_dense_split(tmp_path / "n", "nyud", n=7, per_shard=2)  # 4 shards, last one partial
    seen, sizes = [], []
    for rank in range(2):
        for batch in make_dense_eval_loader("nyud", root, batch_size=3, eval_size=(32, 40), rank=rank, world_size=2):
            seen += batch["keys"]
            sizes.append(len(batch["keys"]))
            assert batch["crop_box"].tolist() == [[1, 2, H, W]] * len(batch["keys"])
            assert batch["orig_sizes"].tolist() == [[H, W]] * len(batch["keys"])
            t = batch["targets"]
            assert t["depth"].shape == (len(batch["keys"]), 1, 32, 40) and t["depth"].dtype == torch.float32
            assert (t["depth"][:, :, 0] == 0).all() and (t["semseg"][:, 0] == 255).all()  # padding
            assert t["semseg"].dtype == torch.int64 and set(t["semseg"].unique().tolist()) <= {4, 11, 255}
    assert sorted(seen) == [f"nyud{i:04d}" for i in range(7)] and sizes == [3, 1, 3]


def test_old_protocol_resizes_and_keeps_original_targets(tmp_path: Path) -> None:
    root = write_dense_split(tmp_path / "p", "pascal_context", n=2)
    batch = next(iter(make_dense_eval_loader("pascal_context", root, batch_size=2, protocol="old",
                                             eval_size=(20, 24))))
    assert batch["images"].shape == (2, 3, 20, 24) and batch["crop_box"].tolist() == [[0, 0, 20, 24]] * 2
    orig = batch["orig_targets"][0]
    assert orig["semseg"].shape == (H, W) and orig["semseg"].dtype == torch.int64 and orig["normals"].shape == (3, H, W)
    assert (orig["human_parts"] == 255).all()  # sample 0 has no person: the whole map is ignored
    normals = batch["targets"]["normals"]  # bicubic, then unit length (ASTMT FixedResize); invalid class → 255
    valid = (normals != 255.0).all(1)
    assert valid.float().mean() > 0.5 and ((normals != 255.0).any(1) == valid).all()
    assert torch.allclose(normals.norm(dim=1)[valid], torch.ones(int(valid.sum())), atol=1e-4)
    train = next(iter(make_dense_train_loader("pascal_context", root, batch_size=2, seed=0, protocol="old",
                                              crop_size=(20, 24), shuffle_buffer=2)))
    assert train["images"].shape == (2, 3, 20, 24) and train["targets"]["normals"].shape == (2, 3, 20, 24)


def test_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    good = raw_sample("nyud", 90)
    crc = bytearray(good["normals.png"])
    crc[-20] ^= 0xFF  # inside the last IDAT: CRC mismatch
    bad = [{**good, "__key__": "badsem", "semseg.png": _png(np.full((H, W), 41, np.uint8))},
           {**good, "__key__": "pickled", "depth.npy": pickle.dumps(np.ones((H, W), np.float32))},
           {**{k: v for k, v in good.items() if k != "edge.png"}, "__key__": "noedge"},
           {**good, "__key__": "badcrc", "normals.png": bytes(crc)},
           {**good, "__key__": "ok"}]
    root = write_dense_split(tmp_path / "n", "nyud", n=4, per_shard=3, extra=bad)
    batches = list(make_dense_eval_loader("nyud", root, batch_size=4, eval_size=(32, 40)))
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == ["nyud0000", "nyud0001", "nyud0002", "nyud0003", "ok"]
    assert sum(b["skipped"] for b in batches) == 4
    train = iter(make_dense_train_loader("nyud", root, batch_size=2, crop_size=(16, 16), seed=1, shuffle_buffer=3))
    assert sum(next(train)["skipped"] for _ in range(8)) > 0


def test_loader_arguments_are_checked(tmp_path: Path) -> None:
    root = write_dense_split(tmp_path / "n", "nyud", n=2)
    with pytest.raises(ValueError, match="expected 'pascal_context'"):
        make_dense_eval_loader("pascal_context", root, batch_size=1)
    with pytest.raises(ValueError, match="sal"):
        make_dense_eval_loader("nyud", root, batch_size=1, tasks=("semseg", "sal"))
    with pytest.raises(ValueError, match="unknown dense dataset"):
        make_dense_eval_loader("cityscapes", root, batch_size=1)
    with pytest.raises(ValueError, match="protocol"):
        make_dense_train_loader("nyud", root, batch_size=1, seed=0, protocol="newest")
    batch = next(iter(make_dense_eval_loader("nyud", root, batch_size=2, tasks=("depth",))))
    assert list(batch["targets"]) == ["depth"] and batch["images"].shape == (2, 3, 448, 576)  # the default size


def test_shards_from_the_dense_converters_load_without_skips(tmp_path: Path) -> None:
    """The converters' real output (synth release trees → prepare) through both loaders: nothing skipped, ids in
    range, crop boxes give back the original size."""
    from pretrain.prepare.nyud import convert_nyud
    from pretrain.prepare.pascal_context import convert_pascal_context
    from pretrain.synth import synthesize

    synthesize(tmp_path / "raw", seed=1, layouts=("nyud", "pascal_context"), nyud_train=2, nyud_val=3,
               pascal_train=2, pascal_val=3, dense_size=(48, 64))
    convert_nyud(tmp_path / "raw", tmp_path / "nyud", "val", progress=False)
    convert_pascal_context(tmp_path / "raw", tmp_path / "pascal", "val", progress=False)
    for dataset, top in (("nyud", 39), ("pascal_context", 20)):
        root = tmp_path / ("nyud" if dataset == "nyud" else "pascal")
        batches = list(make_dense_eval_loader(dataset, root, batch_size=2, eval_size=(64, 80)))
        assert sum(b["skipped"] for b in batches) == 0 and sum(len(b["keys"]) for b in batches) >= 2
        for b in batches:
            sem = b["targets"]["semseg"]
            assert ((sem <= top) | (sem == 255)).all() and (b["crop_box"][:, 2:] == b["orig_sizes"]).all()
            valid = (b["targets"]["normals"] != 255).all(1)
            assert valid.any() and (b["targets"]["normals"].permute(1, 0, 2, 3)[:, valid].abs() <= 1).all()
        train = next(iter(make_dense_train_loader(dataset, root, batch_size=2, crop_size=(32, 32), seed=0,
                                                  shuffle_buffer=2)))
        assert train["skipped"] == 0 and train["images"].shape == (2, 3, 32, 32)
