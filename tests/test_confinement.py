"""Confinement: a converter opens only regular files whose real path lies inside ``--src`` (a symlink out of it, a
FIFO, a socket or a device is skipped unopened, in every converter and for every file a sample reads), and
``pretrain demo`` deletes only what synth wrote."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import timeout_scale

from pretrain.prepare import PREPARERS, LayoutError
from pretrain.prepare.paths import NOT_REGULAR, OUTSIDE_SRC, SYMLINKED_DIR, SourceTree, confined
from pretrain.synth import synthesize

TINY = {"imagenet_train": 1, "imagenet_val": 1, "coco_train": 1, "coco_val": 2, "ade_train": 1, "ade_val": 2,
        "nyud_train": 1, "nyud_val": 2, "pascal_train": 1, "pascal_val": 2, "num_classes": 2, "image_size": (32, 48),
        "dense_size": (32, 48), "quirks": False}
ADE = "ADEChallengeData2016"
# case -> (converter, folder under raw/, the file a test replaces (relative to that folder), its name in
# skipped.jsonl when that differs); every kind of file a sample reads: images, label maps, depth .npy, .mat files
VICTIMS = {
    "imagenet_image": ("imagenet", "imagenet", "val/n90000000/ILSVRC2012_val_00000001.JPEG", None),
    "coco_image": ("coco", "coco", "val2017/000000900001.jpg", None),
    "ade20k_image": ("ade20k", "ade20k", f"{ADE}/images/validation/ADE_val_00000001.jpg",
                     "images/validation/ADE_val_00000001.jpg"),
    "ade20k_annotation": ("ade20k", "ade20k", f"{ADE}/annotations/validation/ADE_val_00000001.png",
                          "annotations/validation/ADE_val_00000001.png"),
    "nyud_image": ("nyud", "NYUDv2", "images/5001.png", None),
    "nyud_depth": ("nyud", "NYUDv2", "depth/5001.npy", None),
    "pascal_image": ("pascal_context", "PASCALContext", "JPEGImages/2009_000001.jpg", None),
    "pascal_parts_mat": ("pascal_context", "PASCALContext", "human_parts/2009_000001.mat", None),
    "pascal_labelmap_mat": ("pascal_context", "PASCALContext", "pascal-context/trainval/2009_000001.mat", None),
}

_WATCHERS: list[list] = []  # the `watching` blocks open now; an audit hook cannot be removed


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCHERS and isinstance(args[0], (str, bytes, os.PathLike)):
        for seen in _WATCHERS:
            seen.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextlib.contextmanager
def watching() -> Iterator[list[str]]:
    """Every path opened (builtin open and os.open) inside the block; workers=0 keeps decoding in-process."""
    seen: list[str] = []
    _WATCHERS.append(seen)
    try:
        yield seen
    finally:
        _WATCHERS.remove(seen)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("confine") / "raw"
    synthesize(raw, seed=3, **TINY)
    return raw


def _tree(corpus: Path, tmp_path: Path, folder: str) -> Path:
    src = tmp_path / "src" / folder
    shutil.copytree(corpus / folder, src, symlinks=True)
    return src


def _convert(dataset: str, src: Path, out: Path, opened: list[str]) -> tuple[dict, list[tuple[str, str]]]:
    """Convert the val split; the paths opened meanwhile are appended to ``opened``."""
    with watching() as seen:
        summary = PREPARERS[dataset](src, out, "val", progress=False)
    opened.extend(seen)
    rows = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    return summary, [(r["file"], r["reason"]) for r in rows]


def _under(paths: list[str], folder: Path) -> list[str]:
    real = os.path.realpath(folder)
    return [p for p in paths if os.path.realpath(p).startswith(real + os.sep)]


@pytest.mark.parametrize("name", list(VICTIMS))
def test_file_symlink_out_of_src_is_skipped_unread(name, corpus, tmp_path):
    dataset, folder, rel, listed = VICTIMS[name]
    src = _tree(corpus, tmp_path, folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    (src / rel).rename(outside / Path(rel).name)  # the real, valid file: converted if the link were followed
    (src / rel).symlink_to(outside / Path(rel).name)
    opened: list[str] = []
    summary, rows = _convert(dataset, src, tmp_path / "out", opened)
    assert rows == [(listed or rel, OUTSIDE_SRC)]
    assert _under(opened, outside) == []
    assert summary["written"] == 1  # the other sample of the split


@pytest.mark.parametrize("name", list(VICTIMS))
def test_fifo_is_skipped_unopened(name, corpus, tmp_path):
    dataset, folder, rel, listed = VICTIMS[name]
    src = _tree(corpus, tmp_path, folder)
    (src / rel).unlink()
    os.mkfifo(src / rel)

    def unblock() -> None:  # a reader stuck in open() gets EOF, so a regression fails here instead of hanging
        try:
            os.close(os.open(src / rel, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader: nothing hangs

    watchdog, opened = threading.Timer(10 * timeout_scale(), unblock), []
    watchdog.start()
    try:
        summary, rows = _convert(dataset, src, tmp_path / "out", opened)
    finally:
        watchdog.cancel()
    assert rows == [(listed or rel, NOT_REGULAR)]
    assert str(src / rel) not in opened and summary["written"] == 1


def test_directory_symlinks_out_of_src(corpus, tmp_path):
    opened: list[str] = []
    outside = tmp_path / "outside"
    shutil.copytree(corpus / "imagenet/val/n90000001", outside / "n90000009")
    imagenet = _tree(corpus, tmp_path, "imagenet")
    (imagenet / "val/n90000000/more").symlink_to(outside / "n90000009", target_is_directory=True)
    (imagenet / "val/n90000000/again").symlink_to(imagenet / "val/n90000001", target_is_directory=True)
    _, rows = _convert("imagenet", imagenet, tmp_path / "out_in", opened)
    assert rows == [("val/n90000000/again", SYMLINKED_DIR), ("val/n90000000/more", OUTSIDE_SRC)]
    coco = _tree(corpus, tmp_path, "coco")  # a file name through a folder link: only the real path tells
    (coco / "val2017/sub").symlink_to(outside / "n90000009", target_is_directory=True)
    ann = json.loads((coco / "annotations/instances_val2017.json").read_text())
    ann["images"][0]["file_name"] = f"sub/{os.listdir(outside / 'n90000009')[0]}"
    (coco / "annotations/instances_val2017.json").write_text(json.dumps(ann))
    _, rows = _convert("coco", coco, tmp_path / "out_coco", opened)
    assert rows[-1] == (f"val2017/{ann['images'][0]['file_name']}", OUTSIDE_SRC)
    nyud = _tree(corpus, tmp_path, "NYUDv2")  # a whole label folder elsewhere: every id skipped
    (nyud / "depth").rename(outside / "depth")
    (nyud / "depth").symlink_to(outside / "depth", target_is_directory=True)
    summary, rows = _convert("nyud", nyud, tmp_path / "out_nyud", opened)
    assert summary["written"] == 0 and {reason for _, reason in rows} == {OUTSIDE_SRC}
    assert [file for file, _ in rows] == ["depth/5001.npy", "depth/5002.npy"]
    assert _under(opened, outside) == []


def test_links_inside_src_hard_links_and_a_symlinked_src_convert(corpus, tmp_path):
    imagenet = _tree(corpus, tmp_path, "imagenet")
    first = imagenet / "val/n90000000/ILSVRC2012_val_00000001.JPEG"
    (imagenet / "val/n90000000/relative.JPEG").symlink_to(first.name)
    (imagenet / "val/n90000001/absolute.JPEG").symlink_to(first)
    outside = tmp_path / "outside.JPEG"
    shutil.copy(first, outside)
    os.link(outside, imagenet / "val/n90000001/hard.JPEG")  # a real file under src: allowed (paths.py says why)
    link = tmp_path / "src_link"
    link.symlink_to(imagenet, target_is_directory=True)  # --src itself may be a symlink
    summary, rows = _convert("imagenet", link, tmp_path / "out", [])
    assert rows == [] and summary["written"] == 5


@pytest.mark.parametrize("case", ["coco_json_outside", "coco_folder_outside", "imagenet_mapping_fifo",
                                  "nyud_split_list_outside"])
def test_layout_files_and_folders_must_be_inside_and_regular(case, corpus, tmp_path):
    folder, rel, name, fragment = {
        "coco_json_outside": ("coco", "annotations/instances_val2017.json", "coco", "resolves outside --src"),
        "coco_folder_outside": ("coco", "val2017", "coco", "resolves outside --src"),
        "imagenet_mapping_fifo": ("imagenet", "LOC_synset_mapping.txt", "imagenet", r"is a FIFO \(named pipe\)"),
        "nyud_split_list_outside": ("NYUDv2", "gt_sets/val.txt", "nyud", "resolves outside --src"),
    }[case]
    src = _tree(corpus, tmp_path, folder)
    if case.endswith("fifo"):
        (src / rel).unlink()
        os.mkfifo(src / rel)
    else:
        (src / rel).rename(tmp_path / "moved")
        (src / rel).symlink_to(tmp_path / "moved")
    with pytest.raises(LayoutError, match=fragment):
        PREPARERS[name](src, tmp_path / "out", "val", progress=False)
    assert not (tmp_path / "out").exists()  # refused before the output directory is touched


def test_source_tree_resolves_like_the_kernel(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    (outside / "deep/dir").mkdir(parents=True)
    (outside / "deep/secret.jpg").write_bytes(b"x")
    src.mkdir()
    (src / "link").symlink_to(outside / "deep/dir", target_is_directory=True)
    (src / "dangling.jpg").symlink_to(src / "nowhere.jpg")
    (src / "folder.jpg").mkdir()
    tree = SourceTree(src)
    name = "link/../secret.jpg"  # the kernel resolves the link first, then "..": outside/deep/secret.jpg
    assert confined(src, name) is not None  # lexically inside: why every opened path is also resolved
    assert tree.refusal(src / name)[0] == OUTSIDE_SRC
    assert tree.refusal(src / "dangling.jpg") is None  # left to the reader: "unreadable", as before
    assert tree.refusal(src / "folder.jpg") == (NOT_REGULAR, f"{src / 'folder.jpg'} is a directory, not a regular "
                                                             "file: not opened")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "s.jpg"))
        assert tree.refusal(src / "s.jpg")[0] == NOT_REGULAR and "a socket" in tree.refusal(src / "s.jpg")[1]
    assert tree.refusal("/dev/null")[0] == OUTSIDE_SRC and SourceTree("/").refusal("/dev/null")[0] == NOT_REGULAR


def test_demo_keeps_a_users_files_under_raw(tmp_path):
    from pretrain import cli
    from pretrain.demo import pipeline

    mine = tmp_path / "raw/coco/mine.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"a user's file")
    (synth,) = [s for s in pipeline(tmp_path, pretrain_config="p.yaml", finetune_config="f.yaml", fast=True)
                if s.name == "synth"]
    assert synth.argv[3] == "synth" and "--overwrite" not in synth.argv
    assert cli.main(synth.argv[3:]) == 2  # the demo's stage fails with synth's one-line refusal
    assert mine.read_bytes() == b"a user's file"
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["coco"]  # refused before writing anything
