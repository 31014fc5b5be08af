"""Experiment tracking with wandb: offline unless an API key is set, one run id per attempt, grouped by run.

Offline wandb runs cannot be resumed (wandb/wandb#2423), so every attempt of a run (each SLURM requeue, each
manual restart) gets its own id `<group>-r<attempt>` and logs with `step=global_step`; runs of one job share a group.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pretrain.config.checks import ConfigError

logger = logging.getLogger(__name__)


MODES = ("online", "offline", "disabled")


def wandb_mode(setting: str, env: dict[str, str] | None = None) -> str:
    """`auto` → the user's WANDB_MODE when set (wandb's own switch: `wandb.init(mode=...)` would override it), else
    online when WANDB_API_KEY is set, else offline. An explicit `logging.wandb` wins over both."""
    env = os.environ if env is None else env
    if setting != "auto":
        return setting
    if env.get("WANDB_MODE"):
        mode = "offline" if env["WANDB_MODE"] == "dryrun" else env["WANDB_MODE"]  # dryrun: wandb's old offline
        if mode not in MODES:
            raise ConfigError(f"environment variable WANDB_MODE={env['WANDB_MODE']!r}: expected one of "
                              f"{', '.join(MODES)} (or dryrun)")
        return mode
    return "online" if env.get("WANDB_API_KEY") else "offline"


def attempt_id(run_dir: Path, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(run id, group) for this attempt: SLURM job id + restart count, else run-dir name + attempt counter."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" in env:
        group = env["SLURM_JOB_ID"]
        return f"{group}-r{env.get('SLURM_RESTART_COUNT', '0')}", group
    group = run_dir.resolve().name
    counter = run_dir / "wandb_attempts.txt"
    attempt = int(counter.read_text().strip() or 0) + 1 if counter.is_file() else 0
    counter.write_text(str(attempt))
    return f"{group}-r{attempt}", group


class Tracker:
    """Thin wrapper: `log(step, metrics)` is a no-op when disabled or off rank 0."""

    def __init__(self, *, run_dir: Path, mode: str, project: str, config: dict[str, Any], enabled: bool):
        self._run = None
        if not enabled or mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        run_id, group = attempt_id(run_dir)
        self._run = wandb.init(project=project, id=run_id, group=group, name=run_id, dir=str(run_dir),
                               mode=mode, config=config, reinit="finish_previous")
        logger.info("wandb %s run %s (group %s) in %s", mode, run_id, group, run_dir / "wandb")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
