"""Config schema: every overlay loads, overrides round-trip, and every error is one clear line (exit 2)."""

import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, RunConfig, load_config, save_resolved, to_yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert any("debug" in str(p) for p in CONFIGS) and any("pretrain/" in str(p) for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_loads_and_has_header(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run:"), f"{path} must start with the command that runs it"
    assert "Expect" in path.read_text() or "Targets" in path.read_text()


def test_overrides_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs/debug/pretrain.yaml",
                      ["moe.top_k=3", "tasks.det.batch_size=5", "train.max_steps=7", "optim.betas=[0.9,0.95]"])
    assert (cfg.moe.top_k, cfg.tasks["det"].batch_size, cfg.train.max_steps) == (3, 5, 7)
    assert tuple(cfg.optim.betas) == (0.9, 0.95)
    saved = save_resolved(cfg, tmp_path)
    again = load_config(saved)
    assert to_yaml(again) == to_yaml(cfg)


def test_defaults_are_complete():
    cfg = load_config(None)
    assert cfg.output_dir and cfg.train.max_steps > 0 and cfg.train.ckpt_every > 0


@pytest.mark.parametrize("override, needle", [
    ("model.nm_experts=4", "moe.num_experts"),
    ("moe.topk=2", "moe.top_k"),
    ("train.max_step=3", "train.max_steps"),
])
def test_unknown_key_suggests(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert override.split("=")[0] in msg and needle in msg and "\n" not in msg


@pytest.mark.parametrize("override, needle", [
    ("train.max_steps=abc", "train.max_steps"),
    ("moe.top_k=20", "moe.top_k"),
    ("tasks.cls.weight=-1", "tasks.cls.weight"),
    ("engine.zero_stage=3", "engine.zero_stage"),
    ("moe.gate=soft", "moe.gate"),
    ("engine.ep_size=3", "engine.ep_size"),
    ("train.ckpt_every=0", "train.ckpt_every"),
])
def test_bad_values(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("moe: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("moe:\n  num_expert: 4\n")
    with pytest.raises(ConfigError, match="wrong.yaml.*num_expert.*moe.num_experts"):
        load_config(wrong)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pretrain", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_cli_missing_config_exits_2():
    out = _cli("train", "configs/missing.yaml")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "configs/missing.yaml" in out.stderr


def test_cli_unknown_key_exits_2():
    out = _cli("train", "configs/debug/pretrain.yaml", "model.nm_experts=4")
    assert out.returncode == 2, out.stderr
    assert "nm_experts" in out.stderr and "moe.num_experts" in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr


def test_cli_help_lists_commands():
    out = _cli("--help")
    assert out.returncode == 0
    for command in ("synth", "prepare", "train", "evaluate"):
        assert command in out.stdout
