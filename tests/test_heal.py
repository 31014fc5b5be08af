"""`pretrain extract --heal STEPS`: distillation of a submodel from the full model on the training engine, resumable
(a heal of 2 steps continued to 4 ends bit for bit where a 4-step heal ends), refusing another extraction's
directory, and changing what it should (the kept experts and routers) but not the heads."""

import sys
from pathlib import Path

import pytest
import torch
from harness import run
from safetensors.torch import load_file
from test_extract import native_run

from pretrain.cli import main as cli_main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_shm_op")]  # DeepSpeed in the children


def extract(model: Path, out: Path, *extra: str):
    cmd = [sys.executable, "-m", "pretrain", "extract", str(model), "--task", "seg", "--rule", "share", "--share",
           "0.5", "--out", str(out), "--no-report", *extra]
    return run(cmd, timeout=600)


def test_heal_resumes_exactly_and_leaves_the_heads(shards, tmp_path):
    native_run(tmp_path / "run", shards)
    model = tmp_path / "m.safetensors"
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(model)]) == 0
    plain = extract(model, tmp_path / "plain.safetensors")
    straight = extract(model, tmp_path / "a.safetensors", "--heal", "4")
    assert plain.returncode == 0 and straight.returncode == 0, straight.stderr[-3000:]
    first = extract(model, tmp_path / "b.safetensors", "--heal", "2")
    resumed = extract(model, tmp_path / "b.safetensors", "--heal", "4")
    assert first.returncode == 0 and resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stderr
    a, b, p = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("a", "b", "plain"))
    assert a.keys() == b.keys() == p.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = {k for k in a if not torch.equal(a[k], p[k])}
    assert any(".experts." in k for k in changed) and not any(k.startswith("heads.") for k in changed)
    # a heal that diverges stops with exit 3 and one line naming --heal-lr; no submodel file is written
    diverged = extract(model, tmp_path / "c.safetensors", "--heal", "3", "--heal-lr", "1e30")
    assert diverged.returncode == 3, diverged.stderr[-3000:]
    assert "non-finite distillation loss (--heal-lr 1e+30); lower --heal-lr" in diverged.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "c.safetensors").exists()
    # another extraction into the same heal directory is refused, nothing overwritten
    other = extract(model, tmp_path / "b.safetensors", "--heal", "4", "--share", "0.25")
    assert other.returncode == 2 and "was started for another extraction" in other.stderr
    assert all(torch.equal(v, b[k]) for k, v in load_file(str(tmp_path / "b.safetensors")).items())
