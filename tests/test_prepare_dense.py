"""Dense converters (NYUD-v2, PASCAL-Context): the embedded trees with every quirk, and the .mat derivations on
hand-built files with hand-computed expected maps."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pretrain.data.dense_decode import DENSE_DATASETS, decode_dense_sample
from pretrain.metrics.boundaries import seg2bmap
from pretrain.prepare import LayoutError, PrepareError
from pretrain.prepare.nyud import convert_nyud
from pretrain.prepare.pascal_context import convert_pascal_context
from pretrain.prepare.pascal_labels import LabelFileError, edge_map, edge_regions, normals_valid, parts_map
from pretrain.synth import synthesize
from pretrain.synth.dense_layouts import parts_mat

DENSE = {"nyud_train": 5, "nyud_val": 3, "pascal_train": 7, "pascal_val": 3, "dense_size": (48, 64)}


@pytest.fixture(scope="module")
def dense_raw(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dense") / "raw"
    return root, synthesize(root, seed=1, layouts=("nyud", "pascal_context"), **DENSE)


def _read(out: Path) -> tuple[dict, dict[str, dict[str, bytes]], list[dict]]:
    info = json.loads((out / "_info.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for name in info["shards"]:
        with tarfile.open(out / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    rows = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert info["num_samples"] == len(samples) and info["skipped"] == len(rows)
    return info, samples, rows


def _array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_nyud_tree_quirks_and_members(dense_raw, tmp_path):
    root, expected = dense_raw
    src = root / "NYUDv2"
    summary = convert_nyud(root, tmp_path / "train", "train", progress=False)  # parent of NYUDv2/ works too
    info, samples, rows = _read(tmp_path / "train")
    assert (summary["written"], summary["skipped"]) == (expected["nyud"]["train"]["expected_samples"],
                                                        expected["nyud"]["train"]["expected_skipped"])
    assert [(r["file"], r["reason"]) for r in rows] == [("depth/0002.npy", "missing_file"),
                                                        ("images/0001.png", "oversized")]
    assert info["validation"]["oversized"] == [{"id": "0001", "width": 640, "height": 480, "kept": False}]
    assert info["validation"]["split_counts"] == {"train": {"listed": 5, "release": 795},
                                                  "val": {"listed": 3, "release": 654}}
    assert info["dataset"] == "nyud" and info["tasks"] == ["semseg", "depth", "normals", "edge"]
    assert info["num_classes"] == {"semseg": 40} and len(info["semseg_classes"]) == 40
    sample = samples["0003"]
    assert sample.keys() == {"png", "semseg.png", "depth.npy", "normals.png", "edge.png", "json"}
    assert json.loads(sample["json"]) == {"id": "0003", "width": 64, "height": 48,
                                          "tasks": ["semseg", "depth", "normals", "edge"]}
    for member, rel in (("png", "images"), ("semseg.png", "segmentation"), ("normals.png", "normals"),
                        ("edge.png", "edge")):
        assert sample[member] == (src / rel / "0003.png").read_bytes()  # original bytes
    depth = np.load(io.BytesIO(sample["depth.npy"]), allow_pickle=False)
    assert depth.dtype == np.float32 and np.array_equal(depth, np.load(src / "depth/0003.npy"))
    assert (depth == 0).any() and depth.max() < 10  # the invalid hole, metres
    semseg = _array(sample["semseg.png"])
    assert semseg.max() <= 40 and (semseg[:2] == 0).all()
    edge = _array(sample["edge.png"]) > 0
    class_change = semseg[2:, :-1] != semseg[2:, 1:]  # below the unlabelled strip, every class change is an edge
    assert class_change.any() and not (class_change & ~edge[2:, :-1]).any()


def test_nyud_keep_oversized_and_tasks(dense_raw, tmp_path):
    root, _ = dense_raw
    convert_nyud(root / "NYUDv2", tmp_path / "a", "train", keep_oversized=True, tasks=["semseg", "edge"],
                 progress=False)
    info, samples, rows = _read(tmp_path / "a")
    assert "0001" in samples and info["validation"]["oversized"][0]["kept"] is True
    assert rows == [] and info["tasks"] == ["semseg", "edge"]  # depth not asked: its missing file is no skip
    assert samples["0001"].keys() == {"png", "semseg.png", "edge.png", "json"}
    with pytest.raises(PrepareError, match="expected a non-empty subset"):
        convert_nyud(root / "NYUDv2", tmp_path / "b", "train", tasks=["sal"])


def test_missing_task_folder(dense_raw, tmp_path):
    root, _ = dense_raw
    src = tmp_path / "NYUDv2"
    shutil.copytree(root / "NYUDv2", src)
    shutil.rmtree(src / "normals")
    with pytest.raises(LayoutError, match=r"task 'normals' needs folder\(s\) normals, missing; exclude"):
        convert_nyud(src, tmp_path / "out", "val")
    assert not (tmp_path / "out").exists()
    convert_nyud(src, tmp_path / "out", "val", tasks=["semseg", "depth", "edge"], progress=False)
    info, samples, _ = _read(tmp_path / "out")
    assert info["validation"]["missing_task_folders"] == {"normals": ["normals"]} and len(samples) == 3
    with pytest.raises(LayoutError, match="split list"):
        convert_nyud(tmp_path / "nowhere", tmp_path / "x", "val")


def test_bad_depth_files_are_skipped_not_fatal(dense_raw, tmp_path):
    """An .npz saved under the .npy name, an integer array and a header promising 20000x20000: each one sample
    skipped with its reason (the .npz stopped the whole conversion), nothing allocated for the forged shape."""
    root, _ = dense_raw
    src = tmp_path / "NYUDv2"
    shutil.copytree(root / "NYUDv2", src)
    ids = (src / "gt_sets" / "val.txt").read_text().split()
    archive = io.BytesIO()
    np.savez(archive, depth=np.ones((4, 4)))
    (src / "depth" / f"{ids[0]}.npy").write_bytes(archive.getvalue())
    np.save(src / "depth" / f"{ids[1]}.npy", np.ones((4, 4), dtype=np.int32), allow_pickle=False)
    forged = io.BytesIO()
    np.lib.format.write_array_header_1_0(forged, {"descr": "<f4", "fortran_order": False, "shape": (20000, 20000)})
    (src / "depth" / f"{ids[2]}.npy").write_bytes(forged.getvalue())  # magic + header, no data
    convert_nyud(src, tmp_path / "out", "val", progress=False)
    _, samples, rows = _read(tmp_path / "out")
    reasons = {r["file"]: (r["reason"], r["detail"]) for r in rows}  # keyed by the sample's image
    npz, ints, forged = (reasons[f"images/{i}.png"] for i in ids[:3])
    assert npz[0] == "bad_label_format" and "not a .npy" in npz[1]
    assert ints[0] == "bad_label_format" and "2-D float array, got int32" in ints[1]
    assert forged == ("size_mismatch", f"depth/{ids[2]}.npy is 20000x20000, the image is 64x48")
    assert len(samples) == len(ids) - 3


def test_pascal_tree_quirks_and_members(dense_raw, tmp_path):
    root, expected = dense_raw
    src = root / "PASCALContext"
    summary = convert_pascal_context(src, tmp_path / "train", "train", progress=False)
    info, samples, rows = _read(tmp_path / "train")
    assert summary["written"] == expected["pascal_context"]["train"]["expected_samples"] == 6
    assert [(r["file"], r["reason"]) for r in rows] == [("human_parts/2008_000002.mat", "missing_file")]
    assert info["num_classes"] == {"semseg": 21, "human_parts": 7, "sal": 2}
    assert len(info["normals_valid_classes"]) == 170
    members = {"jpg", "semseg.png", "human_parts.png", "sal.png", "normals.png", "normals_valid.png", "edge.png",
               "edge_regions.png", "json"}
    assert all(s.keys() == members for s in samples.values())
    # image 3 (i % 3 == 2) has no person: all-ignore parts; image 1 has a person with parts
    assert (_array(samples["2008_000003"]["human_parts.png"]) == 255).all()
    parts = _array(samples["2008_000001"]["human_parts.png"])
    assert set(np.unique(parts).tolist()) == {0, 1, 2, 3, 4, 5, 6}
    # image 5 (i % 5 == 4): its only person has no parts -> all-ignore as well
    assert (_array(samples["2008_000005"]["human_parts.png"]) == 255).all()
    # image 4 (i % 4 == 3) has its semseg only in semseg/pascal-context/
    assert samples["2008_000004"]["semseg.png"] == (src / "semseg/pascal-context/2008_000004.png").read_bytes()
    assert samples["2008_000001"]["sal.png"] == (src / "sal_distill/2008_000001.png").read_bytes()
    labels = scipy.io.loadmat(src / "pascal-context/trainval/2008_000001.mat")["LabelMap"]
    assert np.array_equal(_array(samples["2008_000001"]["edge.png"]), edge_map(labels).astype(np.uint8) * 255)
    valid = _array(samples["2008_000001"]["normals_valid.png"])
    # of the classes synth draws, sky (360) and bird (25) are not NYU-compatible
    assert np.array_equal(valid, (~np.isin(labels, [360, 25])).astype(np.uint8))
    # SEISM's edge GT partition: the LabelMap renumbered, the same boundaries; decoded as the evaluation label
    regions = _array(samples["2008_000001"]["edge_regions.png"])
    assert regions.max() == np.unique(labels).size - 1 and np.array_equal(seg2bmap(regions), seg2bmap(labels))
    decoded = decode_dense_sample(samples["2008_000001"], dataset=DENSE_DATASETS["pascal_context"], tasks=("edge",))
    assert decoded["targets"]["edge_regions"].tolist() == [regions.astype(np.float32).tolist()]
    assert decoded["targets"]["edge"].tolist() == [edge_map(labels).astype(np.float32).tolist()]


def test_dense_workers_give_identical_shards(dense_raw, tmp_path):
    root, _ = dense_raw
    convert_pascal_context(root / "PASCALContext", tmp_path / "w0", "train", max_count=3, progress=False)
    convert_pascal_context(root / "PASCALContext", tmp_path / "w2", "train", max_count=3, workers=2, progress=False)
    names = sorted(p.name for p in (tmp_path / "w0").iterdir() if p.name != "_info.json")
    assert len(names) == 3 and names == sorted(p.name for p in (tmp_path / "w2").iterdir() if p.name != "_info.json")
    for name in names:
        assert (tmp_path / "w0" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_pascal_bad_label_files(dense_raw, tmp_path):
    root, _ = dense_raw
    src = tmp_path / "PASCALContext"
    shutil.copytree(root / "PASCALContext", src)
    (src / "human_parts/2009_000001.mat").write_bytes(b"not a mat file")
    scipy.io.savemat(src / "pascal-context/trainval/2009_000002.mat", {"LabelMap": np.zeros((5, 5), np.uint16)})
    semseg = src / "semseg/VOC12/2009_000003.png"
    values = _array(semseg.read_bytes())
    Image.open(semseg).convert("P").save(semseg)  # a palette PNG: its indices are the labels
    assert Image.open(semseg).mode == "P" and np.array_equal(_array(semseg.read_bytes()), values)
    (src / "ImageSets/Context/val.txt").write_text("2009_000001\n2009_000002\n2009_000003\n../../../etc/passwd\n")
    convert_pascal_context(src, tmp_path / "out", "val", progress=False)
    _, samples, rows = _read(tmp_path / "out")
    assert list(samples) == ["2009_000003"]
    stored = Image.open(io.BytesIO(samples["2009_000003"]["semseg.png"]))
    assert stored.mode == "L" and np.array_equal(np.asarray(stored), values)
    assert [(r["file"], r["reason"]) for r in rows] == [
        ("JPEGImages/../../../etc/passwd.jpg", "outside_src"), ("JPEGImages/2009_000001.jpg", "unreadable_mat"),
        ("JPEGImages/2009_000002.jpg", "size_mismatch")]


def test_pascal_mat_declaring_huge_arrays_is_skipped_before_decoding(dense_raw, tmp_path, monkeypatch):
    """A LabelMap and a parts annotation of 2000x2000 (4 MB; the release's are one 64x48 image's size): each sample
    skipped as `too_large` from the .mat's element tags, compressed or not, without scipy decoding the file."""
    root, _ = dense_raw
    src = tmp_path / "PASCALContext"
    shutil.copytree(root / "PASCALContext", src)
    huge = np.zeros((2000, 2000), np.uint8)
    scipy.io.savemat(src / "pascal-context/trainval/2009_000001.mat", {"LabelMap": huge}, do_compression=True)
    scipy.io.savemat(src / "human_parts/2009_000002.mat", {"anno": huge}, do_compression=False)
    (src / "ImageSets/Context/val.txt").write_text("2009_000001\n2009_000002\n2009_000003\n")
    decoded, loadmat = [], scipy.io.loadmat  # the size of every file scipy decodes

    def counted(f, *args, **kwargs):
        decoded.append(len(f.getvalue()))
        return loadmat(f, *args, **kwargs)

    monkeypatch.setattr(scipy.io, "loadmat", counted)
    convert_pascal_context(src, tmp_path / "out", "val", progress=False)
    _, samples, rows = _read(tmp_path / "out")
    assert list(samples) == ["2009_000003"] and decoded and max(decoded) < 2**20
    assert [(r["file"], r["reason"]) for r in rows] == [("JPEGImages/2009_000001.jpg", "too_large"),
                                                        ("JPEGImages/2009_000002.jpg", "too_large")]
    assert rows[0]["detail"].startswith("pascal-context/trainval/2009_000001.mat holds at least 4000064 bytes")
    assert "human_parts/2009_000002.mat holds at least" in rows[1]["detail"] and "its 64x48 image" in rows[1]["detail"]


def test_mat_size_counts_what_a_compressed_element_inflates_to():
    """A compressed element whose inner tag claims 100 bytes but inflates to 4 MB counts as what it inflates to
    (counting stops just past the limit); files without a level-5 header are left to scipy's reader."""
    import struct
    import zlib

    from pretrain.prepare.matfile import declared_bytes

    plain = io.BytesIO()
    scipy.io.savemat(plain, {"LabelMap": np.zeros((2000, 2000), np.uint8)}, do_compression=False)
    data = plain.getvalue()
    inner = bytearray(data[128:])
    struct.pack_into("<II", inner, 0, 14, 100)  # the lie
    packed = zlib.compress(bytes(inner))
    forged = data[:128] + struct.pack("<II", 15, len(packed)) + packed
    assert declared_bytes(data, 2**30) == declared_bytes(forged, 2**30) == 4000064
    assert 2**20 < declared_bytes(forged, 2**20) <= 2**21
    assert declared_bytes(b"not a mat file", 2**20) is None and declared_bytes(b"MATLAB 7.3" + data[10:], 1) is None


# ---------------------------------------------------------------- .mat derivations, hand-computed


def _mat_roundtrip(content: dict, tmp_path: Path) -> dict:
    scipy.io.savemat(tmp_path / "x.mat", content)
    return scipy.io.loadmat(tmp_path / "x.mat")


def _mask(rows: slice, cols: slice, shape=(4, 5)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[rows, cols] = True
    return m


def test_parts_map_person_only_and_overwrite(tmp_path):
    person = _mask(slice(0, 4), slice(1, 4))
    objects = [
        ("dog", 12, _mask(slice(0, 2), slice(3, 5)), [("head", _mask(slice(0, 2), slice(3, 5)))]),  # not a person
        ("person", 15, person, [("head", _mask(slice(0, 1), slice(1, 4))),
                                ("torso", _mask(slice(1, 3), slice(1, 4))),
                                ("luarm", _mask(slice(1, 2), slice(1, 2))),  # overwrites torso at (1, 1)
                                ("rlleg", _mask(slice(3, 4), slice(2, 3))),
                                ("lhand", _mask(slice(2, 3), slice(3, 4)))]),
        ("person", 15, _mask(slice(0, 1), slice(0, 1)), []),  # a person without parts adds nothing
    ]
    got = parts_map(_mat_roundtrip(parts_mat("x", objects), tmp_path), (4, 5))
    assert got.tolist() == [[0, 1, 1, 1, 0],
                            [0, 3, 2, 2, 0],
                            [0, 2, 2, 4, 0],
                            [0, 0, 6, 0, 0]]


def test_parts_map_without_person_parts_is_ignore(tmp_path):
    for objects in ([("dog", 12, _mask(slice(0, 2), slice(0, 2)), [("head", _mask(slice(0, 1), slice(0, 1)))])],
                    [("person", 15, _mask(slice(0, 2), slice(0, 2)), [])],
                    [("person", 15, np.zeros((4, 5), bool), [("head", _mask(slice(0, 1), slice(0, 1)))])]):
        assert (parts_map(_mat_roundtrip(parts_mat("x", objects), tmp_path), (4, 5)) == 255).all()
    bad = [("person", 15, _mask(slice(0, 2), slice(0, 2)), [("tail", _mask(slice(0, 1), slice(0, 1)))])]
    with pytest.raises(LabelFileError, match="unknown person part name 'tail'"):
        parts_map(_mat_roundtrip(parts_mat("x", bad), tmp_path), (4, 5))
    good = [("person", 15, _mask(slice(0, 2), slice(0, 2)), [("head", _mask(slice(0, 1), slice(0, 1)))])]
    with pytest.raises(LabelFileError, match=r"mask is \(4, 5\), image is \(3, 5\)") as err:
        parts_map(_mat_roundtrip(parts_mat("x", good), tmp_path), (3, 5))
    assert err.value.reason == "size_mismatch"


def test_edge_map_transcribes_laplacian_and_thinning():
    # rows of 1 1 2 3 3: the Laplacian is +1 at column 1, 0 at column 2 (1 + 3 - 2*2 cancels), -1 at column 3
    labels = np.tile(np.array([1, 1, 2, 3, 3]), (4, 1))
    assert edge_map(labels).astype(int).tolist() == [[0, 1, 0, 1, 0]] * 4
    # a 1 | 2 step gives a 2-pixel-wide |Laplacian| > 0 band; thinning leaves at most one pixel per row inside it
    step = np.tile(np.array([1, 1, 1, 2, 2, 2]), (6, 1))
    edge = edge_map(step)
    assert (edge.sum(1) <= 1).all() and edge.sum() >= 5 and not edge[:, [0, 1, 4, 5]].any()
    assert not edge_map(np.full((3, 3), 7)).any()


def test_edge_regions_renumber_classes():
    labels = np.array([[440, 0, 440], [25, 25, 0]])  # classes 0 < 25 < 440 → regions 0, 1, 2
    assert edge_regions(labels).tolist() == [[2, 0, 2], [1, 1, 0]] and edge_regions(labels).dtype == np.uint8
    with pytest.raises(LabelFileError, match="256 classes"):  # 255 must stay free: it is the padding value
        edge_regions(np.arange(256).reshape(16, 16))


def test_normals_valid_classes():
    labels = np.array([[440, 360, 427], [284, 0, 158]])  # wall, sky, tvmonitor / person, none, floor
    assert normals_valid(labels).tolist() == [[1, 0, 1], [1, 0, 1]]


# rows of a 12x14 LabelMap (w = 440) and thin(|cv2.Laplacian(labels, cv2.CV_64F)| > 0) computed with OpenCV
# 4.14 + scikit-image 0.26 (the reference's own calls; OpenCV is not a dependency here, so the result is stored)
_CV2_LABELS = ["1111111111wwww", "1111111111wwww", "1112222221wwww", "11122222211111", "11122222211111",
               "11122233333311", "11122233333311", "11122233333311", "11111133333311", "22221133333311",
               "22221133333311", "22221111111111"]
_CV2_EDGE = ["..............", "..............", "...#####......", "..#.....#..##.", "..#....#.##...",
             "..#...###..#..", "..#..#.....#..", "...##.#....#..", "..#..#.....#..", "##...#.....#..",
             "....#.#....#..", "...#...####..."]


def test_edge_map_matches_opencv_reference():
    labels = np.array([[440 if c == "w" else int(c) for c in row] for row in _CV2_LABELS], np.uint16)
    assert ["".join("#" if v else "." for v in row) for row in edge_map(labels)] == _CV2_EDGE
