"""`pretrain extract`: the command (load → keep → optionally heal → save → report), on the pieces of `extract.py`
(usage and the submodel), `heal.py` (distillation) and `report.py` (full vs submodel)."""

from __future__ import annotations

import logging
from pathlib import Path

from pretrain.extraction.extract import Extraction, extract_submodel, load_source, save_submodel
from pretrain.runs.portable import check_out

logger = logging.getLogger(__name__)


def main(source: str, tasks: list[str], out: str, *, step: int | None = None, data_root: str | None = None,
         report: bool = True, eval_images: int = 64, latency_runs: int = 5, latency_batches: tuple[int, ...] = (1, 32),
         heal: int = 0, heal_lr: float = 1e-4, **rule_args) -> dict:
    """`pretrain extract`: build, (with `heal` > 0) distil for that many steps (`extraction.heal`), save, and (unless
    `report=False`) write `NAME.report.json` / `.png` and print the comparison table. Returns the report (or the
    kept experts without a report)."""
    if Path(out).resolve() == Path(source).resolve():
        raise ValueError(f"--out {out} is the source model: choose another file name (nothing was written)")
    check_out(out)  # an unwritable --out fails before the extraction (and --heal) runs
    full = load_source(source, step=step, data_root=data_root)
    extraction = extract_submodel(full, tasks, **rule_args)
    healed = heal_submodel(extraction, out, data_root=data_root, steps=heal, lr=heal_lr,
                           eval_images=eval_images if report else 0) if heal else None
    path = save_submodel(extraction, out)
    logger.info("wrote %s (%d bytes)", path, path.stat().st_size)
    if not report:
        return {"kept": extraction.kept}
    from pretrain.extraction.report import build_report, write_report

    result = build_report(extraction, source=str(source), out=path, data_root=data_root, eval_images=eval_images,
                          latency_runs=latency_runs, latency_batches=latency_batches)
    if healed is not None:
        result["heal"] = healed
    write_report(result, extraction, path)
    return result


def heal_submodel(extraction: Extraction, out: str | Path, *, data_root: str | None, steps: int, lr: float,
                  eval_images: int) -> dict:
    """Distil the submodel from the full model in `NAME.heal/` (`extraction.heal`); with `eval_images`, the tasks'
    metric of the unhealed submodel first (the report then has before and after)."""
    from pretrain.data.build import check_shards
    from pretrain.extraction.heal import heal, heal_config
    from pretrain.extraction.report import evaluate_pair

    root = data_root or extraction.full.meta.get("source", {}).get("data_root", "")
    out_dir = Path(out).with_suffix(".heal")
    # unreachable shards (a wrong --data-root) fail here, before `heal` starts NAME.heal/
    cfg = heal_config(extraction.full, extraction.tasks, out_dir=out_dir, data_root=root, steps=steps, lr=lr)
    check_shards(cfg.data, cfg.tasks)
    before = {t: evaluate_pair(extraction, t, data_root=root, eval_images=eval_images)["sub"]
              for t in extraction.tasks} if eval_images else {}
    result = heal(extraction.full, extraction.sub, extraction.tasks, out_dir=out_dir, data_root=root, steps=steps,
                  lr=lr)
    extraction.sub.meta["healed"] = {"steps": steps, "lr": lr}
    return {**result, "metric_before": before}
