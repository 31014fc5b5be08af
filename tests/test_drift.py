"""Resume safety (`pretrain.runs.drift.check_resume`): which config keys may change when a run resumes (logged), which
need `train.allow_config_change`, and that a run without a checkpoint has nothing to refuse. The CLI rows (a changed
key refused before anything is written, exit 2) are in test_bad_input.py."""

from __future__ import annotations

import shutil
from pathlib import Path

from pretrain.config.load import load_config, save_resolved
from pretrain.runs import checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEBUG_PRETRAIN = str(ROOT / "configs/debug/pretrain.yaml")


def _fake_run(tmp_path: Path, *overrides: str) -> Path:
    run = tmp_path / "run"
    save_resolved(load_config(DEBUG_PRETRAIN, [f"output_dir={run}", *overrides]), run)
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    checkpoint.write_latest(run / "checkpoints", "step_00000002")
    return run


def test_resume_drift_rules(tmp_path, caplog):
    from pretrain.runs.drift import check_resume

    run = _fake_run(tmp_path)
    safe = ["train.max_steps=7", "train.ckpt_every=3", "eval.max_samples=2", "logging.wandb=disabled",
            "data.root=/elsewhere", "engine.threads=2", "tasks.det.eval_batch_size=3"]
    diff = check_resume(load_config(DEBUG_PRETRAIN, [f"output_dir={run}", *safe]), run)
    assert sorted(diff) == sorted(s.split("=")[0] for s in safe)
    forced = load_config(DEBUG_PRETRAIN, [f"output_dir={run}", "moe.top_k=1", "train.allow_config_change=true"])
    assert check_resume(forced, run) == {"moe.top_k": (2, 1), "train.allow_config_change": (False, True)}
    assert "resuming" in caplog.text and "moe.top_k" in caplog.text
    shutil.rmtree(run / "checkpoints")  # no checkpoint: nothing to resume, nothing to refuse
    assert check_resume(load_config(DEBUG_PRETRAIN, [f"output_dir={run}", "moe.top_k=1"]), run) == {}
