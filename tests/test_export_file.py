"""`pretrain export` writes a complete file: every task's class names (ADE20K's too), without the training shards on
disk (the run saved its class lists), with the permissions the user's umask gives."""

import os
import stat
from pathlib import Path

import pytest
from test_extract import native_run

from pretrain.cli import main as cli_main
from pretrain.config.load import load_config
from pretrain.data.build import check_shards, save_class_lists
from pretrain.prepare.ade20k import CLASS_NAMES, NUM_CLASSES
from pretrain.runs.portable import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_ade20k_has_one_name_per_class():
    assert len(CLASS_NAMES) == NUM_CLASSES == len(set(CLASS_NAMES))
    assert CLASS_NAMES[0] == "wall" and CLASS_NAMES[12] == "person" and CLASS_NAMES[-1] == "flag"


def moved_shards(run: Path) -> None:
    """The run's config now names a data.root that does not exist (shards moved or deleted)."""
    config = run / "config.yaml"
    cfg = load_config(config)
    config.write_text(config.read_text().replace(f"root: {cfg.data.root}", "root: /nonexistent/shards"))


def test_export_needs_no_shards_once_the_run_saved_its_class_lists(shards, tmp_path, capsys):
    run = tmp_path / "run"
    native_run(run, shards)
    moved_shards(run)
    out = tmp_path / "m.safetensors"
    assert cli_main(["export", str(run), "--out", str(out)]) == 2  # a run from before classes.json: says what to do
    err = capsys.readouterr().err
    assert "/nonexistent/shards" in err and "pass --data-root" in err and not out.exists()
    cfg = load_config(run / "config.yaml", [f"data.root={shards}"])
    save_class_lists(run, check_shards(cfg.data, cfg.tasks))
    assert cli_main(["export", str(run), "--out", str(out)]) == 0  # as `pretrain train` writes it at start
    meta = load_model(out).meta
    assert meta["classes"]["seg"] == list(CLASS_NAMES)
    assert [c["wnid"] for c in meta["classes"]["cls"]][:2] == ["n90000000", "n90000001"]
    assert len(meta["classes"]["det"]["categories"]) == meta["num_classes"]["det"]
    assert cli_main(["export", str(run), "--out", str(out), "--data-root", str(shards)]) == 0  # shards win if given


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_honour_the_umask(shards, tmp_path, mask):
    run = tmp_path / "run"
    native_run(run, shards)
    old = os.umask(mask)
    try:
        assert cli_main(["export", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
        assert cli_main(["extract", str(tmp_path / "m.safetensors"), "--task", "cls", "--no-report",
                         "--out", str(tmp_path / "cls.safetensors")]) == 0
    finally:
        os.umask(old)
    for name in ("m.safetensors", "cls.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask


def test_wrong_inputs_are_one_line_and_exit_2(shards, tmp_path, capsys):
    """A fine-tuning run given to export/extract, --out under a file, garbage weights as init_from / upcycle_from."""
    finetune_run = tmp_path / "ft"
    finetune_run.mkdir()
    (finetune_run / "config.yaml").write_text((ROOT / "configs/debug/finetune.yaml").read_text())
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    (tmp_path / "afile").write_text("")
    run = tmp_path / "run"
    native_run(run, shards)
    cases = [
        (["export", str(finetune_run), "--out", str(tmp_path / "m.safetensors")], "is a fine-tuning run"),
        (["extract", str(finetune_run), "--task", "cls", "--out", str(tmp_path / "m.safetensors")],
         "is a fine-tuning run"),
        (["export", str(run), "--out", str(tmp_path / "afile" / "m.safetensors")], "afile is not a folder"),
        (["finetune", str(ROOT / "configs/debug/finetune.yaml"), f"finetune.init_from={garbage}",
          f"output_dir={tmp_path / 'f'}", "--dry-run"], f"finetune.init_from={garbage}: neither a pretrain model"),
        (["train", str(ROOT / "configs/debug/pretrain.yaml"), f"data.root={shards}", f"output_dir={tmp_path / 't'}",
          f"model.upcycle_from={garbage}", "model.size=vit_debug"], f"model.upcycle_from={garbage}: "),
    ]
    for args, fragment in cases:
        assert cli_main(args) == 2, args
        err = capsys.readouterr().err
        assert fragment in err.strip().splitlines()[-1] and "Traceback" not in err, (args, err[-2000:])


def test_evaluation_says_when_damaged_images_were_skipped(shards, tmp_path, capsys):
    """One undecodable val image: the metrics carry `skipped_samples` and a warning says they cover fewer images."""
    import io
    import json
    import shutil
    import tarfile

    run = tmp_path / "run"
    native_run(run, shards)
    val = tmp_path / "val"
    shutil.copytree(shards / "imagenet" / "val", val)
    tar_path = sorted(val.glob("*.tar"))[0]
    with tarfile.open(tar_path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = next(name for name, _ in members if name.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png"))
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members:
            data = b"not an image" if name == first else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert cli_main(["evaluate", str(run), f"tasks.cls.val_shards={val}", "tasks.det.enabled=false",
                     "tasks.seg.enabled=false", "eval.num_workers=0"]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["eval/cls/skipped_samples"] == 1.0 and "1 damaged val sample(s) skipped" in err
