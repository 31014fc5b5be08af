"""A dense task added to a trained pretraining model (`pretrain add-task`, `pretrain/add_task/dense.py`): NYUD-v2
semantic segmentation read from the dense converter's shards, learnt by a seg head with new experts, evaluated with
the official dense meter; the old tasks stay bit-identical and a wrong head is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_add_task import add_task, add_task_config, served

from pretrain.add_task.dense import dense_size

NYUD_SEG = "  nyud_seg: {{shards: {root}/train, val_shards: {root}/val, batch_size: 2, img_size: 48, " \
           "eval_batch_size: 2, head: {head}}}\n"


@pytest.fixture(scope="module")
def nyud(tmp_path_factory) -> Path:
    """NYUD-v2 shards (`<root>/{train,val}`) from the real converter over a tiny synth release tree (48×64)."""
    from pretrain.prepare.nyud import convert_nyud
    from pretrain.synth import synthesize

    root = tmp_path_factory.mktemp("nyud")
    synthesize(root / "raw", seed=1, layouts=("nyud",), nyud_train=4, nyud_val=2, dense_size=(48, 64))
    for split in ("train", "val"):
        convert_nyud(root / "raw", root / "shards" / split, split, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """An exported tiny pretraining model (cls/det/seg)."""
    from test_extract import native_run

    from pretrain.cli import main as cli_main

    base = tmp_path_factory.mktemp("trained")
    native_run(base / "run", shards, "tasks.det.num_classes=0")
    assert cli_main(["export", str(base / "run"), "--out", str(base / "m.safetensors")]) == 0
    return base / "m.safetensors"


def test_the_crop_keeps_the_datasets_aspect():
    assert dense_size("nyud", 448) == (448, 576) and dense_size("nyud", 96) == (96, 128)
    assert dense_size("nyud", 48) == (48, 64) and dense_size("pascal_context", 64) == (64, 64)


@pytest.mark.slow  # the add-task command in a child (DeepSpeed engine) and an evaluation: ~40-90 s on 2 loaded cores
@pytest.mark.usefixtures("deepspeed_shm_op")
def test_nyud_semseg_is_added_with_new_experts_and_evaluated(shards, nyud, trained, tmp_path, cli):
    from pretrain.runs.portable import load_model, load_submodel

    before = served(trained, ["cls", "det", "seg"])
    config = add_task_config(tmp_path / "n.yaml", shards, tmp_path / "n", NYUD_SEG.format(root=nyud, head="fpn"))
    add_task(trained, config, "train.max_steps=2", "add_task.new_experts=2", "add_task.start=fresh")
    grown = load_model(tmp_path / "n" / "model.safetensors")
    assert grown.tasks == ["cls", "det", "seg", "nyud_seg"] and grown.meta["num_classes"]["nyud_seg"] == 40
    assert grown.classes["nyud_seg"][0] == "wall" and grown.meta["moe"]["num_experts"] == 10
    after = served(tmp_path / "n" / "model.safetensors", ["cls", "det", "seg"])
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert grown(torch.zeros(1, 3, 48, 64, dtype=torch.uint8), task="nyud_seg").shape == (1, 40, 48, 64)
    code, err = cli("evaluate", tmp_path / "n")
    assert code == 0, err
    metrics = json.loads((tmp_path / "n" / "eval.jsonl").read_text().splitlines()[-1])
    assert metrics["step"] == 2 and {k for k in metrics if k.startswith("eval/")} == {
        "eval/nyud_seg/mIoU", "eval/nyud_seg/mAcc", "eval/nyud_seg/aAcc"}
    assert 0.0 <= metrics["eval/nyud_seg/mIoU"] <= 100.0
    # a submodel of the dense task alone, its experts chosen among the 8 old and the 2 added ones
    out = tmp_path / "nyud_seg.safetensors"
    code, err = cli("extract", tmp_path / "n" / "model.safetensors", "--task", "nyud_seg", "--out", out,
                    "--rule", "topn", "--keep", 10, "--no-report")
    assert code == 0, err
    sub = load_submodel(out)
    assert sub.tasks == ["nyud_seg"] and all(len(kept) == 10 for kept in sub.meta["kept"].values())
    image = torch.randint(0, 256, (1, 3, 48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sub(image), grown(image, task="nyud_seg"))  # every expert kept: the same function
    # an old task routes over its 8 experts only: keeping 10 for it is refused in one line, naming its limit
    code, err = cli("extract", tmp_path / "n" / "model.safetensors", "--task", "seg", "--out",
                    tmp_path / "seg.safetensors", "--rule", "topn", "--keep", 10, "--no-report")
    assert code == 2 and "--task seg routes over" in err and ": 8" in err, err
    assert not (tmp_path / "seg.safetensors").exists()
    # the extract report's metric reads pretraining shards only: asked for it, one line naming the way round
    code, err = cli("extract", tmp_path / "n" / "model.safetensors", "--task", "nyud_seg", "--out",
                    tmp_path / "with_report.safetensors", "--data-root", shards, "--eval-images", 2)
    assert code == 2 and "nyud dense shards" in err and "--eval-images 0" in err, err


@pytest.mark.slow  # the CLI (config and shard checks before any model is built): ~5 s
def test_a_dense_task_needs_a_segmentation_head(shards, nyud, trained, tmp_path, cli):
    config = add_task_config(tmp_path / "x.yaml", shards, tmp_path / "x", NYUD_SEG.format(root=nyud, head="project"))
    code, err = cli("add-task", trained, config)
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1, err
    assert "tasks.nyud_seg.head='project'" in errors[0] and "head fpn or upernet" in errors[0], err
    assert not (tmp_path / "x" / "model.safetensors").exists()
