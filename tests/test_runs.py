"""Run loading without DeepSpeed: `pretrain evaluate` and `runs.load_run` on a checkpoint in the saved format."""

import json
import sys
from pathlib import Path

import pytest
import torch
from harness import run
from safetensors.torch import save_file

from pretrain.config.load import load_config, save_resolved
from pretrain.runs import checkpoint
from pretrain.runs.load import build_run_model, find_tag, load_run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.size=vit_debug", "model.drop_path=0.0", "model.det_min_size=64", "model.det_max_size=64",
         "model.pyramid_dim=32", "moe.num_experts=4", "moe.top_k=2", "moe.attn_num_experts=4", "moe.attn_top_k=2",
         "tasks.cls.img_size=32", "tasks.det.img_size=64", "tasks.seg.img_size=32", "tasks.cls.num_classes=0",
         "tasks.seg.num_classes=0", "eval.num_workers=0", "logging.wandb=disabled"]


def write_checkpoint(run_dir: Path, model: torch.nn.Module, step: int) -> Path:
    """A checkpoint laid out as `checkpoint.save` writes it (DeepSpeed's model file + our expert files)."""
    ckpt = run_dir / "checkpoints"
    tag_dir = ckpt / checkpoint.tag_for(step)
    tag_dir.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag_dir / checkpoint.MODEL_FILE)
    save_file(checkpoint.local_expert_tensors(model), str(tag_dir / "experts_ep0.safetensors"))
    checkpoint.write_latest(ckpt, tag_dir.name)
    return tag_dir


@pytest.fixture()
def run_dir(shards, tmp_path):
    cfg = load_config(None, [f"data.root={shards}", f"output_dir={tmp_path / 'run'}", *SMALL])
    from pretrain.data.build import check_shards

    torch.manual_seed(3)
    model = build_run_model(cfg, num_classes=check_shards(cfg.data, cfg.tasks).num_classes, rank=0)
    save_resolved(cfg, cfg.output_dir)
    write_checkpoint(Path(cfg.output_dir), model, 7)
    return Path(cfg.output_dir), model


def test_load_run_restores_the_saved_weights(run_dir):
    path, model = run_dir
    loaded = load_run(path)
    assert loaded.step == 7 and not loaded.model.training
    saved = model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.model.state_dict().items())
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 8 \(have steps \[7\]\)"):
        find_tag(path / "checkpoints", 8)
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        load_run(path / "checkpoints")


def test_evaluate_never_imports_deepspeed(run_dir):
    """A single-process `pretrain evaluate` of a native-backend run runs without DeepSpeed (and so do its imports)."""
    path, _ = run_dir
    code = ("import sys; from pretrain.cli import main; rc = main(['evaluate', sys.argv[1], 'eval.max_samples=4']); "
            "print('DS', 'deepspeed' in sys.modules); sys.exit(rc)")
    out = run([sys.executable, "-c", code, str(path)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "DS False"
    metrics = json.loads(lines[-2])
    assert metrics["step"] == 7 and {"eval/cls/top1", "eval/det/AP", "eval/seg/mIoU"} <= set(metrics)
