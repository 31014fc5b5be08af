"""`pretrain demo --fast` end to end: killed in the middle of pretraining, re-run, it skips the finished stages,
resumes the killed one from its checkpoint, runs the fine-tunings two at a time and writes a report with every section
and report.json's verdicts."""

import json
import subprocess
import sys
import time

import pytest
from harness import kill_group, popen, run, scaled

SECTIONS = ("## Pretraining", "## Extraction", "## Smaller and faster submodels", "_healed",
            "## Fine-tuning on NYUD-v2", "## What ran", "Δm", "random init")
# on top of harness.child_env (no rank variables, CPU DeepSpeed). One thread per stage: CI runs the slow half on 3
# workers on 2 cores, and with torch's default 2 threads spinning beside two busy workers this test took 1233 s there
# against 276 s alone (benchmarks/RESULTS.md); what it checks (stages, resume, report) does not depend on threads
ENV = {"WANDB_MODE": "disabled"}  # child_env's OMP_NUM_THREADS=1 stays


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_shm_op")  # the demo's train and finetune stages start DeepSpeed
def test_fast_demo_resumes_after_a_kill_and_reports(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "pretrain", "demo", "--out", str(out), "--fast"]
    first = tmp_path / "first.log"  # a file, not a pipe: nobody reads while it runs, and a full pipe would block it
    with first.open("w") as log:
        proc = popen(cmd, ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + scaled(1800)
        ckpt = out / "pretrain" / "checkpoints" / "latest"
        while time.time() < deadline and proc.poll() is None and not ckpt.exists():
            time.sleep(0.2)
        assert proc.poll() is None and ckpt.exists(), first.read_text()[-3000:]
    finally:
        kill_group(proc)  # SIGKILL to the demo and its running stage
        proc.wait()
    assert not (out / "stages" / "train.json").exists()
    again = run(cmd, timeout=3600, env=ENV)
    text = again.stdout + again.stderr  # the demo's lines and its stages' logs
    assert again.returncode == 0, text[-4000:]
    assert "synth: done earlier, skipped" in text
    assert "resumed from step" in text  # the killed stage continued from its checkpoint
    report = (out / "report.md").read_text()
    missing = [s for s in SECTIONS if s not in report]
    assert not missing, missing
    verdicts = json.loads((out / "report.json").read_text())["verdicts"]  # --fast: two seeds per initialisation
    assert set(verdicts) == {"extracted", "pretrained"}, verdicts
    assert json.loads((out / "stages" / "finetune_random_s1.json").read_text())["seed"] == 1
    # the fine-tunings ran two at a time (2+ cores): their progress went to per-stage logs, and the report's total
    # counts the overlapping spans once
    assert (out / "stages" / "finetune_random_s1.log").is_file()
    for line in report.splitlines():
        if line.startswith("![") and "](" in line:
            assert (out / line.split("](")[1].rstrip(")")).is_file(), line
