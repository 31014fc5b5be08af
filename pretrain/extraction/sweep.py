"""`pretrain extract ... --sweep SHARES`: submodels at several sizes in one call, so a user can pick one.

Each size keeps the same share of every MoE layer's experts (`keep_rules.keep_share`: the most used ones, at least
the layer's k), from one usage table (the training EMA, or one calibration pass). Every size is a submodel file
`NAME.share<S>.safetensors` with its full report (`extraction.report`), and one table (`NAME.sweep.json`, `.md`) and one
plot (`NAME.sweep.png`) put the sizes side by side: experts kept, MoE-layer and total parameters, FLOPs, batch-1 and
batch-32 latency (median of paired ratios against the full model, measured alternately in this process) and the
task metric on the same val images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pretrain.extraction.extract import extract_with_usage, load_source, save_submodel, task_usage
from pretrain.training.plots import plot_sweep

logger = logging.getLogger(__name__)

# the metric a sweep row shows per task (the first of the evaluator's keys otherwise)
PRIMARY = {"cls": "top1", "det": "AP", "seg": "mIoU"}


def parse_shares(text: str) -> list[float]:
    """`0.25,0.5,1` → [0.25, 0.5, 1.0]; raises naming a value outside (0, 1]."""
    try:
        shares = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep {text!r}: expected comma-separated shares in (0, 1], e.g. 0.25,0.5,0.75,1") from None
    bad = [s for s in shares if not 0.0 < s <= 1.0]
    if not shares or bad:
        raise ValueError(f"--sweep {text!r}: every share must be in (0, 1] (got {bad or 'none'})")
    return sorted(set(shares))


def sweep_row(share: float, report: dict[str, Any], task: str) -> dict[str, Any]:
    """One line of the table from one size's report (`report.build_report`)."""
    kept = sum(len(v["kept"]) for v in report["experts_kept"].values())
    total = sum(v["of"] for v in report["experts_kept"].values())
    sub, full = report["params"]["sub"], report["params"]["full"]
    metric = report["metrics"].get(task, {})
    key = PRIMARY.get(task) if PRIMARY.get(task) in metric.get("sub", {}) else next(iter(metric.get("sub", {})), "")
    return {"share": share, "experts_kept": kept, "experts": total, "moe_params": sub["moe_layers"],
            "moe_params_full": full["moe_layers"], "params": sub["total"], "params_full": full["total"],
            "flops": report["flops_per_image"][task]["sub"], "flops_full": report["flops_per_image"][task]["full"],
            "latency_ms": {b: ms["sub"] for b, ms in report["latency_ms"][task].items()},
            "latency_ratio": {b: ms["paired_ratio"] for b, ms in report["latency_ms"][task].items()},
            "metric": key, "value": metric.get("sub", {}).get(key), "value_full": metric.get("full", {}).get(key)}


def format_sweep(rows: list[dict[str, Any]], task: str) -> str:
    """The sweep as a Markdown table (ratios are the submodel's over the full model's)."""
    batches = list(rows[0]["latency_ms"]) if rows else []
    metric = rows[0]["metric"] if rows else ""
    head = ["share", "experts kept", "MoE params", "params", "FLOPs/image"] + [f"latency {b} (ratio)" for b in batches]
    head.append(f"{task} {metric} (full)" if metric else "metric")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['share']:g}", f"{r['experts_kept']}/{r['experts']}",
                 f"{r['moe_params'] / 1e6:.3f} M ({r['moe_params'] / r['moe_params_full']:.2f})",
                 f"{r['params'] / 1e6:.3f} M ({r['params'] / r['params_full']:.2f})",
                 f"{r['flops'] / 1e6:.1f} M ({r['flops'] / r['flops_full']:.2f})"]
        cells += [f"{r['latency_ms'][b]:.2f} ms ({r['latency_ratio'][b]:.2f})" for b in batches]
        cells.append("–" if r["value"] is None else f"{r['value']:.2f} ({r['value_full']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(source: str, tasks: list[str], out: str, shares: list[float], *, step: int | None = None,
         data_root: str | None = None, eval_images: int = 64, latency_runs: int = 5,
         latency_batches: tuple[int, ...] = (1, 32), calibrate: list[str] | None = None, calibrate_images: int = 64,
         exact_routing: bool = False, top_k: int = 0, attn_top_k: int = 0, **ignored_rule_args) -> list[dict]:
    """Every size's submodel and report, then the table and the plot; returns the rows (one task: the first)."""
    from pretrain.extraction.report import build_report, write_report

    if Path(out).resolve() == Path(source).resolve():
        raise ValueError(f"--out {out} is the source model: choose another file name (nothing was written)")
    full = load_source(source, step=step, data_root=data_root)
    usage, usage_source = task_usage(full, tasks, calibrate, calibrate_images)
    stem, rows = Path(out).with_suffix(""), []
    for share in shares:
        extraction = extract_with_usage(full, tasks, usage, usage_source, rule="share", share=share,
                                        calibrate=calibrate, calibrate_images=calibrate_images,
                                        exact_routing=exact_routing, top_k=top_k, attn_top_k=attn_top_k)
        path = save_submodel(extraction, Path(f"{stem}.share{share:g}.safetensors"))
        report = build_report(extraction, source=str(source), out=path, data_root=data_root,
                              eval_images=eval_images, latency_runs=latency_runs, latency_batches=latency_batches)
        write_report(report, extraction, path)
        rows.append(sweep_row(share, report, tasks[0]))
    Path(f"{stem}.sweep.json").write_text(json.dumps({"source": str(source), "tasks": tasks, "rows": rows}, indent=1))
    table = format_sweep(rows, tasks[0])
    Path(f"{stem}.sweep.md").write_text(table + "\n")
    plot_sweep(rows, tasks[0], Path(f"{stem}.sweep.png"))
    print(table)
    return rows
