"""`pretrain demo --fast` end to end: killed in the middle of pretraining, re-run, it skips the finished stages,
resumes the killed one from its checkpoint and writes a report with every section."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## Pretraining", "## Extraction", "## Fine-tuning on NYUD-v2", "## What ran", "Δm", "random init")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_"))}
    return {**env, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}


@pytest.mark.slow
def test_fast_demo_resumes_after_a_kill_and_reports(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "pretrain", "demo", "--out", str(out), "--fast"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 1800
    ckpt = out / "pretrain" / "checkpoints" / "latest"
    while time.time() < deadline and proc.poll() is None and not ckpt.exists():
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the demo and its running stage
    proc.wait()
    assert not (out / "stages" / "train.json").exists()
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=3600)
    assert again.returncode == 0, again.stdout[-4000:]
    assert "synth: done earlier, skipped" in again.stdout
    assert "resumed from step" in again.stdout  # the killed stage continued from its checkpoint
    report = (out / "report.md").read_text()
    missing = [s for s in SECTIONS if s not in report]
    assert not missing, missing
    for line in report.splitlines():
        if line.startswith("![") and "](" in line:
            assert (out / line.split("](")[1].rstrip(")")).is_file(), line
