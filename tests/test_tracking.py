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
