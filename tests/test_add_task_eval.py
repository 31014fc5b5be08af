"""Evaluation of tasks added to a trained model (`pretrain add-task`): `pretrain evaluate` of an add-task run and
`pretrain extract`'s report read an added task's own val shards with its kind's evaluator.

The grown model's added tasks start from the trained task of their kind (router rows, task embedding row, head), so
each computes exactly what that old task computes: evaluated on the same val shards, an added task must give the old
task's metrics, key for key and value for value; and the old tasks' metrics are the trained model's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_add_task import STATS

from pretrain import dist
from pretrain.add_task.train import save_grown
from pretrain.config.add_task import AddTaskConfig, AddTaskSection
from pretrain.config.load import load_config, save_resolved
from pretrain.config.pretraining import DataConfig, EvalConfig, TaskConfig
from pretrain.data.build import check_shards
from pretrain.models import build_model
from pretrain.models.grow import grow
from pretrain.models.moe_losses import moe_modules
from pretrain.runs.portable import config_metadata, load_model, load_submodel, write_file
from pretrain.training.evaluate import evaluate_model

TINY = ["model.size=vit_debug", "model.drop_path=0.0", "model.det_min_size=64", "model.det_max_size=64",
        "model.pyramid_dim=32", "moe.num_experts=8", "moe.top_k=2", "moe.attn_num_experts=8", "moe.attn_top_k=2",
        "moe.router_init=normal", "model.task_embed_init=randn", "tasks.cls.num_classes=0",
        "tasks.seg.num_classes=0", "tasks.cls.img_size=32", "tasks.det.img_size=64", "tasks.seg.img_size=32",
        "tasks.cls.eval_batch_size=4", "tasks.det.eval_batch_size=4", "tasks.seg.eval_batch_size=4",
        "eval.num_workers=0", "data.num_workers=0"]
# one added task of each kind, on the shards of the old task of that kind (one run may add one task per kind)
ADDED = {"cls2": TaskConfig(shards="imagenet/train", val_shards="imagenet/val", img_size=32, eval_batch_size=4,
                            head="project"),
         "det2": TaskConfig(shards="coco/train", val_shards="coco/val", img_size=64, eval_batch_size=4,
                            head="fasterrcnn"),
         "ade2": TaskConfig(shards="ade20k/train", val_shards="ade20k/val", img_size=32, eval_batch_size=4,
                            head="fpn")}
OLD_OF = {"cls2": "cls", "det2": "det", "ade2": "seg"}
pytestmark = pytest.mark.slow  # every test builds a tiny grown model and most evaluate it: 2-15 s on 2 loaded cores
SINGLE = dist.DistInfo(rank=0, world_size=1, local_rank=0, master_addr="", master_port=0, launcher="single")


@pytest.fixture()
def grown_run(shards, tmp_path, request) -> tuple[Path, object]:
    """An add-task run directory as the command leaves it (its config.yaml and the grown model file, no training:
    the added tasks are copies of the old tasks of their kind, grown by `request.param` new experts per MoE layer,
    default 0) and the trained model's config."""
    new_experts = getattr(request, "param", 0)
    cfg = load_config(None, [*TINY, f"data.root={shards}"])
    spec = check_shards(cfg.data, cfg.tasks)
    torch.manual_seed(0)
    net = build_model(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks, num_classes=spec.num_classes).eval()
    for _, layer in moe_modules(net):
        for name in STATS:
            getattr(layer, name).uniform_(0.5, 2.0)
    trained_path = tmp_path / "trained.safetensors"
    write_file(trained_path, net.state_dict(), {
        **config_metadata(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks), "task_names": list(net.task_ids),
        "task_ids": net.task_ids, "num_classes": spec.num_classes, "classes": spec.classes, "dtype": "fp32",
        "step": 1, "source": {"data_root": str(shards)}}, kind="model")
    trained = load_model(trained_path)
    run = AddTaskConfig(output_dir=str(tmp_path / "run"), add_task=AddTaskSection(model=str(trained_path)),
                        data=DataConfig(root=str(shards), num_workers=0), tasks=ADDED,
                        eval=EvalConfig(num_workers=0))
    added = check_shards(run.data, run.tasks)
    num_classes = {**trained.meta["num_classes"], **added.num_classes}
    grown = grow(trained.model, model=cfg.model, moe=cfg.moe, tasks=cfg.tasks, new_tasks=ADDED,
                 num_classes=num_classes, start_from=OLD_OF, new_experts=new_experts)
    save_grown(Path(run.output_dir) / run.add_task.out, grown, trained, table={**cfg.tasks, **ADDED},
               num_classes=num_classes, classes={**trained.meta["classes"], **added.classes},
               added={"tasks": list(ADDED), "steps": 3, "model": str(trained_path), "new_experts": new_experts})
    save_resolved(run, run.output_dir)
    return Path(run.output_dir), cfg


def kind_metrics(metrics: dict[str, float], task: str) -> dict[str, float]:
    return {key.split("/")[-1]: value for key, value in metrics.items() if key.startswith(f"eval/{task}/")}


def test_evaluate_of_an_add_task_run_gives_each_added_task_its_kinds_metrics(grown_run, cli):
    run_dir, cfg = grown_run
    code, err = cli("evaluate", run_dir)
    assert code == 0, err
    written = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert written["step"] == 3
    # the old tasks' metrics of the trained model, through the pretraining path (its own task table)
    trained = load_model(run_dir.parent / "trained.safetensors")
    old = evaluate_model(cfg, trained.model, check_shards(cfg.data, cfg.tasks), SINGLE)
    assert {key.split("/")[1] for key in old} == {"cls", "det", "seg"}
    assert {key.split("/")[1] for key in written if key.startswith("eval/")} == set(ADDED)
    for new, kind in OLD_OF.items():
        got, want = kind_metrics(written, new), kind_metrics(old, kind)
        # eval.jsonl writes a non-finite value (COCO's AP of an absent size range) as its string
        want = {k: v if math.isfinite(v) else str(v) for k, v in want.items()}
        assert got and got == want, (new, got, want)
    assert {"top1", "mIoU"} <= set(kind_metrics(written, "cls2")) | set(kind_metrics(written, "ade2"))


@pytest.mark.parametrize("grown_run", [0, 2], indirect=True, ids=["0_new_experts", "2_new_experts"])
def test_the_old_tasks_evaluate_as_before_in_the_grown_model(grown_run):
    run_dir, cfg = grown_run
    trained, grown = load_model(run_dir.parent / "trained.safetensors"), load_model(run_dir / "model.safetensors")
    spec = check_shards(cfg.data, cfg.tasks)
    assert evaluate_model(cfg, grown.model, spec, SINGLE) == evaluate_model(cfg, trained.model, spec, SINGLE)


@pytest.mark.parametrize("grown_run", [0, 2], indirect=True, ids=["0_new_experts", "2_new_experts"])
def test_the_extract_report_of_an_added_task_has_its_metric(grown_run, shards, tmp_path, cli):
    run_dir, _ = grown_run
    new_experts = load_model(run_dir / "model.safetensors").meta["added"][-1]["new_experts"]
    out = tmp_path / "ade2.safetensors"
    code, err = cli("extract", run_dir / "model.safetensors", "--task", "ade2", "--out", out, "--data-root", shards,
                    "--eval-images", 4, "--calibrate", shards / "ade20k" / "val", "--calibrate-images", 4,
                    "--latency-runs", 1, "--latency-batches", 1)
    assert code == 0, err
    report = json.loads(out.with_suffix(".report.json").read_text())
    metrics = report["metrics"]["ade2"]
    assert metrics["images"] == 4 and {"mIoU", "mAcc", "aAcc"} == metrics["full"].keys() == metrics["sub"].keys()
    assert 0.0 <= metrics["full"]["mIoU"] <= 100.0 and report["dropped_routes"]["ade2"]["overall"] >= 0.0
    sub = load_submodel(out)  # the added task alone, its experts chosen among the old and the added ones
    assert sub.tasks == ["ade2"] and set(sub.meta["num_experts_full"].values()) == {8 + new_experts}
    assert sub(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[-2:] == (32, 32)


def test_an_add_task_run_is_named_as_one_by_export(grown_run, cli):
    run_dir, _ = grown_run
    code, err = cli("export", run_dir, "--out", run_dir / "x.safetensors")
    assert code == 2 and "is an add-task run" in err and "pretrain evaluate" in err, err


def test_evaluate_of_an_unfinished_add_task_run_is_one_line(grown_run, cli):
    run_dir, _ = grown_run
    (run_dir / "model.safetensors").unlink()
    code, err = cli("evaluate", run_dir)
    assert code == 2 and "has not finished" in err and "Traceback" not in err, err
