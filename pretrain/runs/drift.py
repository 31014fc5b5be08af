"""Resume safety: compare a config with the `config.yaml` of the run it resumes, before anything is built or written.

A resumed run is exact only if the model and the data stream are the same. Keys that change neither (how long to
train, how often to log, checkpoint and evaluate, where the shards live, evaluation settings) may differ; every
other difference is refused with one line listing the keys, old → new, unless `train.allow_config_change=true`
(then each difference is logged and a pretraining run's `config.yaml` is rewritten with the new values; a
fine-tuning run's is written once, by its first start). The table of safe keys is data: `SAFE_KEYS` (fnmatch
patterns over dotted keys).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pretrain.config.pretraining import ConfigError
from pretrain.runs.integrity import LATEST, TAG_RE

logger = logging.getLogger(__name__)

# Keys whose change keeps a resume exact: run length and cadence, evaluation, logging, where things live, and the
# process layout the checkpoint loader adapts to (ep_size/world size: weights, fp32 masters, Adam moments, lr schedule
# and counters carried over, re-sliced by `checkpoint.load_latest` / `elastic_state`; logged there).
SAFE_KEYS = (
    "output_dir",
    "train.max_steps",
    "train.ckpt_every",
    "train.keep_last",
    "train.eval_every",
    "train.log_every",
    "train.max_bad_steps",
    "train.allow_config_change",
    "eval.*",
    "logging.*",
    "data.root",
    "tasks.*.val_shards",
    "tasks.*.eval_batch_size",
    "engine.threads",
    "engine.backend",
    "engine.ep_size",
    "finetune.save_predictions",
    "finetune.grid_images",
    "finetune.baselines*",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()} \
            or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): list(tree) if isinstance(tree, tuple) else tree}  # YAML has no tuples


ABSENT = "<absent>"


def config_diff(saved: dict, new: dict, defaults: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} of the leaves that differ (`ABSENT` for a key one side lacks). A key
    only the new config has is no difference when it holds the schema default: a field added since the run
    started, whose default is what the older code did."""
    old, cur, default = _flat(saved), _flat(new), _flat(defaults)
    diff = {k: (old.get(k, ABSENT), cur.get(k, ABSENT)) for k in sorted(set(old) | set(cur))
            if old.get(k, ABSENT) != cur.get(k, ABSENT)}
    return {k: v for k, v in diff.items() if not (v[0] is ABSENT and k in default and default[k] == v[1])}


def is_safe(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in SAFE_KEYS)


def has_checkpoint(run_dir: Path) -> bool:
    ckpt = run_dir / "checkpoints"
    return os.path.lexists(ckpt / LATEST) or (ckpt.is_dir() and any(TAG_RE.match(p.name) for p in ckpt.iterdir()))


def check_resume(cfg: Any, run_dir: str | Path, *, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume a run whose checkpoint was trained under a different model or data stream.

    Args:
        cfg: the new config (a schema object: RunConfig or FinetuneConfig).
        run_dir: its output directory; nothing to check unless it holds `config.yaml` and a checkpoint.
        ignore: extra fnmatch patterns of keys derived elsewhere (fine-tuning from a run dir takes model/moe from it).
    Returns the differences (all safe, or allowed by `train.allow_config_change`).
    Raises ConfigError listing the unsafe keys, old → new, and the override.
    """
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file() or not has_checkpoint(run_dir):
        return {}
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_path))
    except Exception as exc:  # a damaged config.yaml must not be silently replaced either
        raise ConfigError(f"{saved_path}: cannot read the run's saved config ({str(exc).splitlines()[0]}): restore "
                          "it, or start a new run in another output_dir") from None
    new = OmegaConf.to_container(OmegaConf.structured(cfg))
    defaults = OmegaConf.to_container(OmegaConf.structured(type(cfg)))
    diff = config_diff(saved if isinstance(saved, dict) else {}, new, defaults)
    unsafe = {k: v for k, v in diff.items() if not is_safe(k) and not any(fnmatch.fnmatchcase(k, p) for p in ignore)}
    listing = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in unsafe.items())
    if unsafe and not cfg.train.allow_config_change:
        raise ConfigError(f"{run_dir} was trained with a different config and resuming would not be exact "
                          f"({listing}): use the run's values, start a new output_dir, or pass "
                          "train.allow_config_change=true to resume anyway")
    if unsafe:
        logger.warning("resuming %s with a changed config (train.allow_config_change=true): %s", run_dir, listing)
    for key, (a, b) in diff.items():
        if key not in unsafe:
            logger.info("config change on resume: %s: %r -> %r", key, a, b)
    return diff
