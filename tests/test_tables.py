"""Tasks and choices are table entries: every per-task table covers exactly the task list, and every choice list in
the config schemas equals the table (or tuple) that the value selects from, so a choice is never written twice."""

from pretrain.config import finetuning as ft_config
from pretrain.config import pretraining as config
from pretrain.data.collate import COLLATE, TARGET_KEYS
from pretrain.data.sources import SOURCES
from pretrain.finetune.evaluate import DENSE_METERS
from pretrain.finetune.losses import build_losses
from pretrain.models import HEADS
from pretrain.models.heads import DET_HEADS, SEG_HEADS
from pretrain.models.heads.cls import ORDERS
from pretrain.models.multitask import FORWARDS
from pretrain.models.vit import PLACEMENTS
from pretrain.training.evaluate import EVALUATORS
from pretrain.training.objective import WEIGHTINGS


def test_every_pretraining_table_covers_the_tasks():
    for table in (SOURCES, COLLATE, TARGET_KEYS, EVALUATORS, HEADS, FORWARDS, config.HEAD_CHOICES):
        assert tuple(table) == config.TASKS, table


def test_every_dense_table_covers_the_dense_tasks():
    assert set(DENSE_METERS) == set(ft_config.DENSE_TASKS)
    assert set(build_losses(list(ft_config.DENSE_TASKS), edge_pos_weight=0.9)) == set(ft_config.DENSE_TASKS)


def test_choices_equal_the_tables_they_select_from():
    assert config.CHOICES["moe.placement"] == PLACEMENTS
    assert config.CHOICES["optim.loss_weighting"] == WEIGHTINGS == ft_config.CHOICES["optim.loss_weighting"]
    assert config.HEAD_CHOICES["det"] == tuple(DET_HEADS) and config.HEAD_CHOICES["seg"] == tuple(SEG_HEADS)
    assert config.HEAD_CHOICES["cls"] == ORDERS
    shared = set(config.CHOICES) & set(ft_config.CHOICES)
    assert shared and all(config.CHOICES[k] == ft_config.CHOICES[k] for k in shared)


def test_fine_tuning_choices_equal_their_tables():
    from pretrain.data.dense import DENSE_DATASETS
    from pretrain.models.decoders import DECODERS
    from pretrain.models.dense import ROUTINGS

    c = ft_config.choices()
    assert c["data.dataset"] == tuple(DENSE_DATASETS) and c["finetune.decoder"] == tuple(DECODERS)
    assert c["finetune.router_from"] == config.TASKS and c["finetune.routing"] == ROUTINGS
