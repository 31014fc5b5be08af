"""The checks every config schema shares, over any dataclass config: reading a YAML overlay and turning YAML's and
OmegaConf's errors into the one-line `ConfigError` that names the file and key (`load_overlay`, `omegaconf_error`),
`need`, `check_values` (every number finite, every count >= 0, plus the per-key `RANGES`), `check_choices` and
`check_tasks`. Every schema (`pretraining.py`, which adds the checks of its shared sections, `finetuning.py`,
`add_task.py`) validates with these, so a key is checked and reported the same way whichever command loads
it.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A config problem, reported to the user as one line (CLI exit code 2)."""


# ---------------------------------------------------------------- reading an overlay; OmegaConf's errors as one line


def _all_keys(schema: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        value = getattr(schema, f.name)
        keys += _all_keys(value, key + ".") if is_dataclass(value) else [key]
    return keys


def _suggest(bad_key: str, schema: type) -> str:
    valid = _all_keys(schema())
    leaf = bad_key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(bad_key, valid, n=1, cutoff=0.6)
    close = close or [k for k in valid if k.rsplit(".", 1)[-1] in difflib.get_close_matches(leaf, [
        v.rsplit(".", 1)[-1] for v in valid], n=1, cutoff=0.6)][:1]
    return f"; did you mean '{close[0]}'?" if close else ""


def omegaconf_error(exc: OmegaConfBaseException, source: str, schema: type, key_hint: str = "") -> ConfigError:
    """`exc` as the one-line ConfigError: `source` (the file or the override), the key, the problem; an unknown key
    gets the closest key of `schema`. `key_hint` names the key where OmegaConf leaves `full_key` empty (a tuple of the
    wrong length)."""
    key = getattr(exc, "full_key", "") or key_hint
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        return ConfigError(f"{source}: unknown config key '{key}'{_suggest(key, schema)}")
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return ConfigError(f"{source}: bad value for '{key}': {msg}")
    return ConfigError(f"{source}: {str(exc).splitlines()[0]}")


def failing_key(base: DictConfig, overlay: DictConfig) -> str:
    """The dotted key of the first overlay leaf that does not merge into `base` alone ("" if none): for the errors
    OmegaConf reports without a key."""
    def walk(node: dict, path: tuple[str, ...]) -> str:
        for k, v in node.items():
            if isinstance(v, dict):
                found = walk(v, (*path, k))
            else:
                alone = v
                for part in reversed((*path, k)):
                    alone = {part: alone}
                try:
                    OmegaConf.merge(base, alone)
                    found = ""
                except OmegaConfBaseException:
                    found = ".".join((*path, k))
            if found:
                return found
        return ""

    return walk(OmegaConf.to_container(overlay), ())


def _yaml_message(path: Path, exc: yaml.YAMLError) -> str:
    """`file:line:col: cannot parse YAML: problem (context at line N)`: PyYAML's problem says what (`found
    duplicate key lr`), its marks say where; str(exc) would put them on four lines."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    extra = f" ({context} at line {cmark.line + 1})" if context and cmark is not None else ""
    return f"{where}: cannot parse YAML: {problem}{extra}"


def load_overlay(path: Path) -> DictConfig:
    """The YAML file as a DictConfig; the top level must be a mapping (an empty file is an empty overlay)."""
    try:
        # the node tree first: OmegaConf.load would turn a top-level scalar `foo` into {foo: None}
        top = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        if top is not None and not isinstance(top, yaml.MappingNode):
            kind = "list" if isinstance(top, yaml.SequenceNode) else "scalar"
            raise ConfigError(f"{path}: the top level must be a mapping of sections (e.g. `train:`), got a {kind} "
                              f"at line {top.start_mark.line + 1}")
        overlay = OmegaConf.load(path)  # its own loader, which also rejects duplicate keys
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_message(path, exc)) from None
    except (OSError, OmegaConfBaseException) as exc:
        raise ConfigError(f"{path}: cannot load YAML: {str(exc).splitlines()[0]}") from None
    return overlay


# ---------------------------------------------------------------- range and choice checks


def need(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise the one-line `ConfigError` for `key=value` unless `ok`."""
    if not ok:
        raise ConfigError(f"config value {key}={value!r} is out of range: {rule}")


def check_choices(cfg: Any, choices: dict[str, tuple]) -> None:
    """Every `section.name` in `choices` holds one of its allowed values."""
    for key, allowed in choices.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        need(value in allowed, key, value, f"must be one of {', '.join(map(str, allowed))}")


def _leaves(value: Any, key: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a config object; tuple/list items as `key.0`, dict entries as `key.name`."""
    if is_dataclass(value):
        return [leaf for f in fields(value) for leaf in _leaves(getattr(value, f.name), f"{key}{f.name}.")]
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{key}{k}.")]
    if isinstance(value, (list, tuple)):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{key}{i}.")]
    return [(key.rstrip("."), value)]


Rule = tuple[Callable[[Any], bool], str]
# What `check_values` asks beyond "every float finite, every int >= 0" (which holds for every field of both schemas);
# fnmatch patterns over dotted keys. Checks that relate two fields stay in check_moe/check_train/check_tasks.
RANGES: dict[str, Rule] = {
    "seed": (lambda v: v < 2**32, "must be in [0, 2**32)"),
    "model.drop_path": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "model.task_embed_std": (lambda v: v > 0, "must be > 0"),
    "model.patch_size": (lambda v: v == 0 or v >= 2, "must be 0 (the size's default) or >= 2"),
    "model.img_size": (lambda v: v == 0 or v >= 16, "must be 0 (the size's default) or >= 16"),
    "model.det_min_size": (lambda v: v >= 16, "must be >= 16"),
    "model.det_max_size": (lambda v: v >= 16, "must be >= 16"),
    "model.pyramid_dim": (lambda v: v >= 1, "must be >= 1"),
    "model.det_box_fc_dim": (lambda v: v >= 1, "must be >= 1"),
    "model.det_rois_per_image": (lambda v: v >= 1, "must be >= 1"),
    "model.det_proposals": (lambda v: v >= 1, "must be >= 1"),
    "moe.attn_num_experts": (lambda v: v >= 1, "must be >= 1"),
    "moe.capacity_factor": (lambda v: v > 0, "must be > 0"),
    "optim.eps": (lambda v: v > 0, "must be > 0"),
    "optim.weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "optim.betas.*": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "tasks.*.eval_batch_size": (lambda v: v >= 1, "must be >= 1"),
    "tasks.*.aug_range.*": (lambda v: v >= 0, "must be >= 0"),
    "finetune.edge_pos_weight": (lambda v: 0 < v < 1, "must be in (0, 1)"),
}


def check_values(cfg: Any, ranges: dict[str, Rule] = RANGES) -> None:
    """Every leaf of `cfg` in range: floats finite, ints >= 0 (none of our counts, sizes or seeds is signed), plus
    the rules of `ranges` whose pattern matches the key. Raises the one-line `ConfigError` naming the key."""
    for key, value in _leaves(cfg):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        need(math.isfinite(value), key, value, "must be a finite number")
        need(not isinstance(value, int) or value >= 0, key, value, "must be >= 0")
        for pattern, (ok, rule) in ranges.items():
            if fnmatch.fnmatchcase(key, pattern):
                need(ok(value), key, value, rule)


def check_tasks(tasks: dict[str, Any], known: tuple[str, ...], *, sampling: str | None = None,
                partitions: int = 0) -> None:
    """Task names are known, at least one is enabled, per-task values in range; with `partitions` (data.partitions)
    each enabled task's batch size, its global batch, splits evenly over them."""
    unknown = sorted(set(tasks) - set(known))
    need(not unknown, "tasks", unknown, f"unknown task(s); expected {', '.join(known)}")
    enabled = [name for name in known if name in tasks and tasks[name].enabled]
    need(bool(enabled), "tasks", "all disabled", f"enable at least one of {', '.join(known)}")
    for name, task in tasks.items():
        need(task.weight >= 0, f"tasks.{name}.weight", task.weight, "sampling weights must be >= 0")
        need(task.loss_weight >= 0, f"tasks.{name}.loss_weight", task.loss_weight, "must be >= 0")
        need(task.batch_size >= 1, f"tasks.{name}.batch_size", task.batch_size, "must be >= 1")
        need(task.num_classes >= 0, f"tasks.{name}.num_classes", task.num_classes, "must be >= 0 (0 = from shards)")
        need(not (partitions and task.enabled) or task.batch_size % partitions == 0, f"tasks.{name}.batch_size",
             task.batch_size, f"must be a multiple of data.partitions={partitions} (it is the task's global batch)")
    if sampling == "fixed":
        need(sum(tasks[n].weight for n in enabled) > 0, "tasks.*.weight", 0,
             "fixed sampling needs a positive weight on an enabled task")
