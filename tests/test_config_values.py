"""`check_values`: every numeric field of both schemas (RunConfig, FinetuneConfig) is range-checked at load.

The field lists are read from the schemas themselves, so a field added later is covered by the generic rules
(finite floats, non-negative ints) without touching this file; the specific ranges are tested row by row.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from pretrain.config.checks import RANGES, _leaves
from pretrain.config.finetuning import FinetuneConfig
from pretrain.config.load import load_config
from pretrain.config.pretraining import MODEL_SIZES, ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]

SCHEMAS = {"run": RunConfig, "finetune": FinetuneConfig}


def _numeric_fields(schema: type) -> list[tuple[str, object]]:
    return [(k, v) for k, v in _leaves(schema()) if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _override(key: str, value: object, schema: type) -> list[str]:
    """A dotlist override setting one leaf (a tuple item is set by rewriting the whole tuple)."""
    head, _, last = key.rpartition(".")
    if last.isdigit():
        items = list(dict(_leaves(schema()))[f"{head}.{i}"] for i in range(2))
        items[int(last)] = value
        return [f"{head}=[{items[0]},{items[1]}]"]
    return [f"{key}={value}"]


CASES = [(name, key, bad) for name, schema in SCHEMAS.items() for key, default in _numeric_fields(schema)
         for bad in ([math.inf, math.nan] if isinstance(default, float) else [-1])]


@pytest.mark.parametrize(("schema", "key", "bad"), CASES, ids=[f"{s}:{k}={b}" for s, k, b in CASES])
def test_every_numeric_field_is_checked(schema, key, bad):
    with pytest.raises(ConfigError, match=f"config value {key}="):
        load_config(None, _override(key, bad, SCHEMAS[schema]), schema=SCHEMAS[schema])


def test_defaults_pass_and_every_field_is_reached():
    for schema in SCHEMAS.values():
        load_config(None, [], schema=schema)
    keys = {k for k, _ in _numeric_fields(RunConfig)}
    assert {"seed", "model.drop_path", "model.patch_size", "data.shuffle_buffer", "optim.lr", "optim.betas.1",
            "tasks.det.eval_batch_size", "tasks.seg.aug_range.0"} <= keys
    assert {"finetune.edge_pos_weight", "data.train_size.0", "tasks.depth.loss_weight"} <= {
        k for k, _ in _numeric_fields(FinetuneConfig)}


RANGE_CASES = [  # (override, key in the message, rule fragment); the value just outside each range in RANGES
    ("model.drop_path=1.0", "model.drop_path", "[0, 1)"),
    ("model.patch_size=1", "model.patch_size", ">= 2"),
    ("model.img_size=8", "model.img_size", ">= 16"),
    ("model.det_min_size=8", "model.det_min_size", ">= 16"),
    ("model.det_max_size=8", "model.det_max_size", ">= 16"),
    ("model.pyramid_dim=0", "model.pyramid_dim", ">= 1"),
    ("moe.attn_num_experts=0", "moe.attn_num_experts", ">= 1"),
    ("moe.capacity_factor=0", "moe.capacity_factor", "> 0"),
    ("optim.eps=0", "optim.eps", "> 0"),
    ("optim.betas=[0.9,1.0]", "optim.betas.1", "[0, 1)"),
    ("optim.weight_decay=-0.1", "optim.weight_decay", ">= 0"),
    ("tasks.cls.eval_batch_size=0", "tasks.cls.eval_batch_size", ">= 1"),
    ("tasks.det.aug_range=[-0.5,1.0]", "tasks.det.aug_range.0", ">= 0"),
    ("seed=4294967296", "seed", "2**32"),
    ("engine.timeout_s=0", "engine.timeout_s", "> 0"),
]


@pytest.mark.parametrize(("override", "key", "rule"), RANGE_CASES, ids=[c[0] for c in RANGE_CASES])
def test_specific_ranges(override, key, rule):
    with pytest.raises(ConfigError, match=f"config value {re.escape(key)}=.*{re.escape(rule)}"):
        load_config(None, [override])
    load_config(None, [])  # and the default passes


def test_every_range_pattern_matches_a_field():
    keys = {k for schema in SCHEMAS.values() for k, _ in _numeric_fields(schema)}
    import fnmatch

    assert all(any(fnmatch.fnmatchcase(k, pattern) for k in keys) for pattern in RANGES), RANGES


def test_model_sizes_are_the_backbone_table():
    from pretrain.models import BACKBONE_SIZES

    assert MODEL_SIZES == tuple(BACKBONE_SIZES)


@pytest.mark.parametrize(("config", "overrides", "fragment"), [
    ("configs/debug/finetune.yaml", ["finetune.decoder_options.bogus=1"], "unexpected keyword argument 'bogus'"),
    ("configs/debug/finetune.yaml", ["finetune.decoder_options.top_k=99"], "top_k=99 must lie in [1, 15]"),
    ("configs/debug/finetune.yaml", ["finetune.decoder=heads"], "unexpected keyword argument 'ranks'"),
    ("configs/debug/finetune.yaml", ["data.dataset=pascal_context"], "pascal_context has no depth labels"),
])
def test_finetune_config_errors_are_found_at_load(config, overrides, fragment):
    """Decoder options against the decoder (built on the meta device), task sets against the dataset: at load time,
    one ConfigError, not a failure after start-up."""
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(ROOT / config, overrides, schema=FinetuneConfig)


def test_a_config_given_to_the_wrong_command_is_named():
    with pytest.raises(ConfigError, match=r"finetune.yaml is a `pretrain finetune` config .*run `pretrain finetune"):
        load_config(ROOT / "configs/debug/finetune.yaml")
    with pytest.raises(ConfigError, match=r"pretrain.yaml is a pretraining config .*run `pretrain train"):
        load_config(ROOT / "configs/debug/pretrain.yaml", schema=FinetuneConfig)
