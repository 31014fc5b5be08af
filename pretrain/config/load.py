"""The config mechanism: dataclass defaults ← YAML overlay ← `key=value` dotlist, for every command's schema.

Every default lives in the schemas (`pretraining.py`, `finetuning.py`, `add_task.py`); `configs/**.yaml` are small
overlays. `load_config` merges, type-checks (OmegaConf structured configs) and range-checks, and turns every problem
into a `ConfigError` whose message is one line that names the key, value or file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config.add_task import AddTaskConfig, check_add_task
from pretrain.config.checks import ConfigError, failing_key, load_overlay, omegaconf_error
from pretrain.config.finetuning import FinetuneConfig, check_finetune
from pretrain.config.pretraining import TASKS, RunConfig, check_run
from pretrain.durable import atomic_write


@functools.cache
def _defaults(schema: type) -> DictConfig:
    # Building a structured config from the dataclasses is most of a load's cost (~40 ms); merges and to_object
    # copy rather than modify their inputs, so one per schema serves every load.
    return OmegaConf.structured(schema)


# a config file with one of these top-level sections is that stage's (its command; `add_task` → `pretrain add-task`)
STAGE_SECTIONS = ("finetune", "add_task")


def stage_of_file(path: str | Path) -> str | None:
    """The stage a config file is written for (`finetune` for a file with a `finetune:` section), None for a
    pretraining file or one that cannot be read (`load_config` reports that properly)."""
    try:
        keys = set(OmegaConf.load(path).keys())
    except Exception:
        return None
    return next((stage for stage in STAGE_SECTIONS if stage in keys), None)


def check_schema_of(path: Path, overlay: DictConfig, schema: type) -> None:
    """ConfigError naming the mix-up when a file written for one command is given to another (a fine-tuning file to
    `pretrain train` reported `unknown config key 'data.dataset'`)."""
    names = {f.name for f in fields(schema)}
    keys = set(overlay.keys()) if isinstance(overlay, DictConfig) else set()
    stage = next((k for k in STAGE_SECTIONS if k in keys and k not in names), None)
    if stage is not None:
        command = stage.replace("_", "-")
        raise ConfigError(f"{path} is a `pretrain {command}` config (it has a '{stage}:' section): run "
                          f"`pretrain {command} {path}`")
    missing = next((k for k in STAGE_SECTIONS if k in names and k not in keys), None)
    tasks = set(overlay.get("tasks", None) or {}) if keys else set()
    if missing is not None and tasks & set(TASKS):
        raise ConfigError(f"{path} is a pretraining config (tasks {sorted(tasks & set(TASKS))}, no '{missing}:' "
                          f"section): run `pretrain train {path}`")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
                schema: type | None = None) -> Any:
    """Merge `schema` defaults ← YAML file ← `key=value` overrides, then validate.

    Args:
        schema: a dataclass schema (default `RunConfig`); its validator is `VALIDATORS[schema]`.
    Raises `ConfigError` (one line naming the file, key or value) on any problem.
    """
    schema = schema or RunConfig
    merged: DictConfig = _defaults(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        overlay = load_overlay(path)
        check_schema_of(path, overlay, schema)
        try:
            merged = OmegaConf.merge(merged, overlay)
        except OmegaConfBaseException as exc:
            hint = "" if getattr(exc, "full_key", "") else failing_key(merged, overlay)  # one merge per leaf
            raise omegaconf_error(exc, str(path), schema, hint) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise omegaconf_error(exc, f"override '{item}'", schema, item.split("=", 1)[0].strip()) from None
    cfg = OmegaConf.to_object(merged)
    VALIDATORS[schema](cfg)
    return cfg


# command → the schema of its config, and each schema's checks. Every schema is data (dataclasses and checks) in this
# package, so the core loads any run's config without importing the stage that runs it, and no import registers
# anything; a stage's configs carry a top-level section of the same name (`finetune:`), which is how a file's schema
# is recognised (`stage_of_file`).
SCHEMAS: dict[str, type] = {"train": RunConfig, "finetune": FinetuneConfig, "add_task": AddTaskConfig}
VALIDATORS: dict[type, Callable[[Any], None]] = {RunConfig: check_run, FinetuneConfig: check_finetune,
                                                 AddTaskConfig: check_add_task}


def schema_of_file(path: str | Path) -> type:
    """The schema a config file is written for (a `finetune:` section → fine-tuning), else RunConfig."""
    stage = stage_of_file(path)
    return SCHEMAS.get(stage, RunConfig) if stage else RunConfig


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what `save_resolved` writes into the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved(cfg: Any, run_dir: str | Path) -> Path:
    """Write `config.yaml` (the fully resolved config) atomically into the run directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    atomic_write(out, to_yaml(cfg))
    return out
