"""wandb's mode: the config's explicit setting, else the user's WANDB_MODE, else online with an API key, else
offline."""

import pytest

from pretrain.config.checks import ConfigError
from pretrain.training.tracking import wandb_mode


@pytest.mark.parametrize(("setting", "env", "mode"), [
    ("auto", {}, "offline"),
    ("auto", {"WANDB_API_KEY": "k"}, "online"),
    ("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}, "disabled"),  # the user's switch beats the key
    ("auto", {"WANDB_MODE": "dryrun"}, "offline"),
    ("offline", {"WANDB_MODE": "disabled"}, "offline"),  # an explicit logging.wandb beats the environment
    ("disabled", {"WANDB_API_KEY": "k"}, "disabled"),
])
def test_mode(setting, env, mode):
    assert wandb_mode(setting, env) == mode


def test_a_wrong_wandb_mode_names_the_variable():
    with pytest.raises(ConfigError, match="WANDB_MODE='of'"):
        wandb_mode("auto", {"WANDB_MODE": "of"})


def test_a_bad_wandb_mode_stops_before_the_engine_starts(monkeypatch, tmp_path):
    """start_engine (every loop's start-up) reads WANDB_MODE first: a typo is one line before the process group,
    the config files and DeepSpeed, not after minutes of start-up."""
    import torch

    import pretrain.parallel.engine as engine
    from pretrain.config.load import load_config
    from pretrain.dist import DistInfo
    from pretrain.training.lifecycle import start_engine

    started = []
    monkeypatch.setattr(engine, "init_distributed", lambda *a, **k: started.append("init"))
    monkeypatch.setattr(engine, "build_engine", lambda *a, **k: started.append("build"))
    monkeypatch.setenv("WANDB_MODE", "of")
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="WANDB_MODE='of'"):
        start_engine(cfg, torch.nn.Linear(1, 1), DistInfo(0, 1, 0, "127.0.0.1", 0, "single"))
    assert started == [] and not (tmp_path / "run").exists()
