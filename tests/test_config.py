"""Config schema: every overlay loads and means what it says, resolved configs round-trip, every error is one line
naming the key (CLI exit 2), and the generated DeepSpeed JSON of the debug config equals a hand-written reference."""

import sys
from pathlib import Path

import pytest
from harness import run
from omegaconf import OmegaConf

from pretrain.config.add_task import AddTaskConfig
from pretrain.config.finetuning import FinetuneConfig
from pretrain.config.load import load_config, save_resolved, schema_of_file, to_yaml
from pretrain.config.pretraining import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
DEBUG = ROOT / "configs/debug/pretrain.yaml"
IDS = [str(p.relative_to(ROOT)) for p in CONFIGS]


def schema_of(path: Path) -> type:
    """Fine-tuning overlays have a top-level `finetune:` section (what `pretrain evaluate` dispatches on), add-task
    overlays an `add_task:` one."""
    schema = schema_of_file(path)
    sections = OmegaConf.load(path)
    assert schema is (FinetuneConfig if "finetune" in sections else AddTaskConfig if "add_task" in sections
                      else RunConfig)
    return schema


def _leaves(node, prefix=""):
    """`{dotted key: value}` of every leaf of a mapping (lists and tuples are leaves, as lists)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(node) if isinstance(node, tuple) else node}


def test_configs_exist():
    assert DEBUG in CONFIGS and any(p.parent.name == "pretrain" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_every_overlay_loads_and_every_key_takes_effect(path):
    schema = schema_of(path)
    cfg = load_config(path, schema=schema)
    assert isinstance(cfg, schema)
    resolved = _leaves(OmegaConf.to_container(OmegaConf.structured(cfg)))
    overlay = _leaves(OmegaConf.to_container(OmegaConf.load(path)))
    assert overlay, f"{path} is empty"
    wrong = {k: (v, resolved.get(k, "<missing>")) for k, v in overlay.items() if resolved.get(k) != v}
    assert not wrong, f"{path}: overlay value vs resolved value: {wrong}"
    text = path.read_text()
    assert text.startswith("# Run:"), f"{path} must start with the command that runs it"
    assert "Expect" in text or "Targets" in text, f"{path} must say what a run should reach"


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_resolved_config_round_trips(path, tmp_path):
    schema = schema_of(path)
    task, knob = ("det", "aug_range") if schema is RunConfig else ("normals", "loss_weight")
    if schema is AddTaskConfig:  # its tasks are the file's; model and moe sections come from MODEL
        task = next(iter(OmegaConf.load(path).tasks))
    value = [0.5, 1.0] if knob == "aug_range" else 5.0
    overrides = ["moe.top_k=3"] * (schema is not AddTaskConfig) + [
        f"tasks.{task}.{knob}={value}".replace(" ", ""), "train.max_steps=7", "optim.betas=[0.9,0.95]",
        "logging.wandb=disabled"]
    cfg = load_config(path, overrides, schema=schema)
    assert (cfg.train.max_steps, cfg.logging.wandb) == (7, "disabled")
    assert schema is AddTaskConfig or cfg.moe.top_k == 3
    got = getattr(cfg.tasks[task], knob)
    assert (list(got) if isinstance(got, tuple) else got) == value
    assert tuple(cfg.optim.betas) == (0.9, 0.95)
    again = load_config(save_resolved(cfg, tmp_path), schema=schema)
    assert again == cfg  # dataclass equality: every field
    assert to_yaml(again) == to_yaml(cfg) == (tmp_path / "config.yaml").read_text()


def test_later_overrides_win_and_defaults_are_the_schemas():
    cfg = load_config(DEBUG, ["train.max_steps=9", "train.max_steps=11"])
    assert cfg.train.max_steps == 11
    assert load_config(None) == RunConfig()  # and the defaults every load starts from were not modified by it


# (override, the whole one-line message)
ERRORS = [
    ("model.nm_experts=4", "override 'model.nm_experts=4': unknown config key 'model.nm_experts'; "
                           "did you mean 'moe.num_experts'?"),
    ("moe.topk=2", "override 'moe.topk=2': unknown config key 'moe.topk'; did you mean 'moe.top_k'?"),
    ("train.max_step=3", "override 'train.max_step=3': unknown config key 'train.max_step'; "
                         "did you mean 'train.max_steps'?"),
    ("nosuch=1", "override 'nosuch=1': unknown config key 'nosuch'"),
    ("train.max_steps=abc", "override 'train.max_steps=abc': bad value for 'train.max_steps': Value 'abc' of type "
                            "'str' could not be converted to Integer"),
    ("moe.noisy=maybe", "override 'moe.noisy=maybe': bad value for 'moe.noisy': Value 'maybe' is not a valid bool "
                        "(type str)"),
    ("tasks.cls.aug_range=0.5", "override 'tasks.cls.aug_range=0.5': bad value for 'tasks.cls.aug_range': Invalid "
                                "value assigned: float is not a TupleConfig, ListConfig, list, or tuple."),
    ("moe.top_k=20", "config value moe.top_k=20 is out of range: must be in 1..moe.num_experts=16"),
    ("tasks.cls.weight=-1", "config value tasks.cls.weight=-1.0 is out of range: sampling weights must be >= 0"),
    ("engine.zero_stage=3", "config value engine.zero_stage=3 is out of range: must be one of 0, 1, 2"),
    ("moe.gate=soft", "config value moe.gate='soft' is out of range: must be one of raw, renorm"),
    ("engine.ep_size=3", "config value engine.ep_size=3 is out of range: must divide moe.num_experts=16"),
    ("train.ckpt_every=0", "config value train.ckpt_every=0 is out of range: must be >= 1"),
    ("optim.lr=0", "config value optim.lr=0.0 is out of range: must be > 0"),
    ("moe.mi_ema=1", "config value moe.mi_ema=1.0 is out of range: must be in [0, 1)"),
    ("model.task_embed_std=0", "config value model.task_embed_std=0.0 is out of range: must be > 0"),
    ("moe.w_mi_start=0.5",
     "config value moe.w_mi_decay_steps=0 is out of range: must be >= 1 when moe.w_mi_start is set"),
    ("foo", "override 'foo' is not of the form key=value"),
]


@pytest.mark.parametrize("override, message", ERRORS, ids=[o for o, _ in ERRORS])
def test_bad_override_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


@pytest.mark.parametrize("override, key", [
    ("optim.betas=[1,2,3]", "optim.betas"),  # OmegaConf gives no key for this one: the override's own is used
    ("tasks=3", "tasks"),
])
def test_bad_value_names_its_key_in_the_reason(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"bad value for '{key}'" in str(err.value)


def test_every_task_disabled_is_refused():
    with pytest.raises(ConfigError, match="^config value tasks='all disabled' is out of range: enable at least one"):
        load_config(None, [f"tasks.{t}.enabled=false" for t in ("cls", "det", "seg")])


@pytest.mark.parametrize("text, message", [
    ("moe:\n  num_expert: 4\n", "{path}: unknown config key 'moe.num_expert'; did you mean 'moe.num_experts'?"),
    ("moe:\n  top_k: abc\n", "{path}: bad value for 'moe.top_k': Value 'abc' of type 'str' could not be converted to "
                             "Integer"),
    ("moe: [unclosed\n", "{path}:2:1: cannot parse YAML: expected ',' or ']', but got '<stream end>' (while parsing "
                          "a flow sequence at line 1)"),
    ("- a\n- b\n", "{path}: the top level must be a mapping of sections (e.g. `train:`), got a list at line 1"),
    ("optim:\n  lr: 0.1\n  betas: [0.9, 0.9, 0.9]\n", "{path}: bad value for 'optim.betas': TupleConfig length 3 "
                                                    "does not match type hint length 2"),  # OmegaConf names no key
])
def test_bad_file_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(message.format(path=path)) and "\n" not in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml")
    assert str(err.value) == f"config file not found: {tmp_path / 'nope.yaml'}"


def test_debug_deepspeed_json_matches_the_reference():
    from pretrain.parallel.engine import make_ds_config

    reference = {  # written out from configs/debug/pretrain.yaml by hand: fp32, ZeRO-1, 450 steps, warmup 20
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
        "steps_per_print": 2**30, "wall_clock_breakdown": False, "gradient_clipping": 1.0,
        "bf16": {"enabled": False}, "fp16": {"enabled": False},
        "zero_optimization": {"stage": 1, "contiguous_gradients": True, "reduce_scatter": True},
        "checkpoint": {"tag_validation": "Fail"},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": 450, "warmup_min_ratio": 0.0, "warmup_num_steps": 20, "warmup_type": "linear",
            "cos_min_ratio": 0.01}},
    }
    cfg = load_config(DEBUG)
    assert make_ds_config(cfg.engine, cfg.optim, max_steps=cfg.train.max_steps, world_size=2) == reference
    cfg = load_config(DEBUG, ["engine.grad_accum=3", "engine.precision=bf16"])
    accum = make_ds_config(cfg.engine, cfg.optim, max_steps=cfg.train.max_steps, world_size=4)
    assert {k: accum[k] for k in ("gradient_accumulation_steps", "train_batch_size", "bf16")} == {
        "gradient_accumulation_steps": 3, "train_batch_size": 12, "bf16": {"enabled": True}}


def _cli(*args):
    return run([sys.executable, "-m", "pretrain", *args], timeout=120)


def test_cli_missing_config_exits_2():
    out = _cli("train", "configs/missing.yaml")
    assert (out.returncode, out.stderr.strip().splitlines()) == (2, [out.stderr.strip()])
    assert "configs/missing.yaml" in out.stderr


def test_cli_unknown_key_exits_2_with_one_line():
    out = _cli("train", "configs/debug/pretrain.yaml", "model.nm_experts=4")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().endswith(ERRORS[0][1]) and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_cli_help_lists_commands():
    out = _cli("--help")
    assert out.returncode == 0
    for command in ("synth", "prepare", "train", "evaluate"):
        assert command in out.stdout
