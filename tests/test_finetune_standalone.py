"""A fine-tuning run stands on its own: its first start writes `backbone.json` (`finetune.record`) and config.yaml
once; resume and `pretrain evaluate RUN` rebuild the model from the run directory and its checkpoint, so deleting
or replacing `finetune.init_from` afterwards changes neither."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_extract import model_file
from test_finetune import CONFIG, _cmd, _run, _weights, dense_root  # noqa: F401  (dense_root: the module's fixture)

from pretrain.config.finetuning import FinetuneConfig
from pretrain.config.load import load_config
from pretrain.finetune.init import build_finetune_backbone
from pretrain.finetune.record import RECORD, described_backbone, read_record, write_record

STEPS = ["train.eval_every=0", "finetune.grid_images=0", "eval.max_samples=4", "train.ckpt_every=2"]


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("source", ["model", "random"])
def test_the_record_rebuilds_the_backbone_without_its_source(tmp_path, source):
    """The record round-trips through JSON, and the backbone it describes has the source-built one's structure
    (every key and shape, router rows selected), its mode and the config sections, with the source file gone."""
    path, _ = model_file(tmp_path / "model.safetensors")
    init = [f"finetune.init_from={path}"] if source == "model" else []
    cfg = load_config(CONFIG, [*init, f"output_dir={tmp_path / 'run'}"], schema=FinetuneConfig)
    built, record = build_finetune_backbone(cfg, ["semseg", "depth"])
    write_record(tmp_path / "run", record)
    path.unlink()
    again = read_record(tmp_path / "run")
    assert again == record
    fresh = load_config(CONFIG, [*init, f"output_dir={tmp_path / 'run'}"], schema=FinetuneConfig)
    rebuilt, _ = build_finetune_backbone(fresh, ["semseg", "depth"], again)
    assert _shapes(rebuilt) == _shapes(built)
    assert rebuilt.num_tasks == built.num_tasks  # (train/eval mode: `build_dense_model` sets the whole model's)
    assert (fresh.model, fresh.moe) == (cfg.model, cfg.moe)
    assert described_backbone(fresh, again).num_tasks == record.num_tasks
    body = json.loads((tmp_path / "run" / RECORD).read_text())
    assert body["kind"] == source and "classes" not in body["meta"]


@pytest.mark.slow
def test_resume_and_evaluate_ignore_a_deleted_or_replaced_init_from(dense_root, tmp_path):  # noqa: F811
    source, _ = model_file(tmp_path / "source.safetensors")
    first = tmp_path / "first"
    out = _run(_cmd(dense_root, first, f"finetune.init_from={source}", "train.max_steps=2", *STEPS))
    assert out.returncode == 0, out.stderr[-3000:]
    assert read_record(first).kind == "model"
    config = (first / "config.yaml").read_bytes()
    runs = {case: tmp_path / case for case in ("untouched", "deleted", "replaced")}
    for run in runs.values():
        shutil.copytree(first, run)
    results = {}
    for case, run in runs.items():
        if case == "deleted":
            source.unlink()
        if case == "replaced":  # another architecture and other weights under the same name
            model_file(source, "moe.num_experts=4", seed=1)
        resumed = _run(_cmd(dense_root, run, f"finetune.init_from={source}", "train.max_steps=4", *STEPS))
        assert resumed.returncode == 0 and "resumed from step 2" in resumed.stderr, (case, resumed.stderr[-3000:])
        assert (run / "config.yaml").read_bytes() == config, case
        ev = _run([sys.executable, "-m", "pretrain", "evaluate", str(run), "eval.max_samples=4", "eval.num_workers=0"])
        assert ev.returncode == 0, (case, ev.stderr[-3000:])
        results[case] = (_weights(run), json.loads(ev.stdout.strip().splitlines()[-1]))
    weights, metrics = results["untouched"]
    assert metrics["step"] == 4
    for case in ("deleted", "replaced"):
        other, other_metrics = results[case]
        assert other.keys() == weights.keys() and not [k for k in weights if not torch.equal(weights[k], other[k])]
        assert other_metrics == metrics, case
    assert Path(source).is_file()
