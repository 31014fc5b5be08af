"""The report of `pretrain extract`: full model vs submodel, side by side.

Parameters (total, backbone / decoder / heads as `MultiTaskModel.param_counts`, and the MoE layers alone), FLOPs per
image (`torch.utils.flop_counter.FlopCounterMode`, one image at the task's size), CPU latency (median of paired
runs, full and submodel alternating), experts kept per layer, the share of the full model's token-routes (token × k)
that go to dropped experts, and the task metric of both models on the same val images (`pretrain.training.evaluate`'s
evaluators). Written as `NAME.report.json`, printed as a table, and drawn as `NAME.report.png` (usage heatmaps
with the kept experts marked).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config.pretraining import DataConfig, EvalConfig, RunConfig
from pretrain.data.dense import DENSE_DATASETS
from pretrain.errors import UsageError
from pretrain.extraction.extract import Extraction, count_routes, routed_layers
from pretrain.runs.portable import config_sections

logger = logging.getLogger(__name__)


def param_parts(model: nn.Module) -> dict[str, int]:
    """`param_counts()` of a `MultiTaskModel` plus `moe_layers`: the routed layers' parameters (experts, routers)."""
    moe = {id(p): p.numel() for m in routed_layers(model).values() for p in m.parameters()}
    return {**model.param_counts(), "moe_layers": sum(moe.values())}


def _images(batch: int, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def flops_per_image(model: nn.Module, task: str, size: int) -> int:
    """FLOPs of one eval forward of one `size`² image (FlopCounterMode counts matmuls, convs, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(task, _images(1, size))
    return int(counter.get_total_flops())


@torch.no_grad()
def paired_latency_ms(models: dict[str, nn.Module], task: str, size: int, batch: int, runs: int) -> dict[str, float]:
    """Median ms per forward of each model, the models alternating every run (order reversed every other run) so
    that load changes on a shared machine hit both alike, one warm-up forward each; `paired_ratio`: the median over
    runs of time[last model] / time[first model] (steadier than the ratio of the medians)."""
    images, times = _images(batch, size), {name: [] for name in models}
    names = list(models)
    for name in names:
        models[name](task, images)
    for r in range(runs):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            models[name](task, images)
            times[name].append(1e3 * (time.perf_counter() - t0))
    paired = statistics.median(b / a for a, b in zip(times[names[0]], times[names[-1]]))
    return {**{name: statistics.median(v) for name, v in times.items()}, "paired_ratio": paired}


def _spec(task: str, meta: dict, val_dir: Path):
    """What the evaluator of `task` needs, from the model file: its val folder, class counts and class lists (a det
    task's categories); a task added to the model (`pretrain add-task`) is in these like any other."""
    from pretrain.data.build import DataSpec

    return DataSpec([task], {}, {task: val_dir}, {}, dict(meta["num_classes"]), classes=dict(meta.get("classes", {})))


def evaluate_pair(extraction: Extraction, task: str, *, data_root: str, eval_images: int) -> dict[str, Any]:
    """The task metric of the full model and the submodel on the same first `eval_images` val images, and the full
    model's top-k selection counts there (for the dropped-route share)."""
    from pretrain import dist
    from pretrain.data.build import resolve_shards
    from pretrain.training.evaluate import evaluate_task

    _, _, table = config_sections("metadata", extraction.full.meta)
    val_dir = resolve_shards(data_root, table[task].val_shards)
    if not (val_dir / "_info.json").is_file():
        raise FileNotFoundError(f"no val shards for {task} at {val_dir}: pass --data-root, or --eval-images 0 to skip "
                                "the metric")
    dataset = json.loads((val_dir / "_info.json").read_text()).get("dataset")
    if dataset in DENSE_DATASETS:  # an added task on NYUD/PASCAL shards: its evaluator lives in pretrain.add_task
        raise UsageError(f"{task} is scored on {dataset} dense shards ({val_dir}), which the extract report's metric "
                         "does not read: pass --eval-images 0 for the report without it (`pretrain evaluate` of the "
                         "add-task run scores the whole grown model)")
    # evaluate_task stops after the batch that reaches max_samples: a batch size dividing it sees exactly that many
    batch = max(d for d in range(1, table[task].eval_batch_size + 1) if eval_images % d == 0)
    table = {**table, task: replace(table[task], eval_batch_size=batch)}
    cfg = RunConfig(data=DataConfig(root=data_root), tasks=table, eval=EvalConfig(max_samples=eval_images,
                                                                                    num_workers=0))
    info = dist.DistInfo(rank=0, world_size=1, local_rank=0, master_addr="", master_port=0, launcher="single")
    with count_routes(extraction.full.model) as counts:
        full = evaluate_task(cfg, extraction.full.model, task, _spec(task, extraction.full.meta, val_dir), info)
    sub = evaluate_task(cfg, extraction.sub.model, task, _spec(task, extraction.sub.meta, val_dir), info)
    return {"full": full, "sub": sub, "counts": counts}


def dropped_routes(counts: dict[str, torch.Tensor], kept: dict[str, list[int]], rows: list[int]) -> dict[str, float]:
    """Share of the tasks' token-routes (token × k) that the full model sent to experts the submodel dropped:
    per layer and `overall` (all layers' routes together)."""
    out, hit, total = {}, 0.0, 0.0
    for name, counts_TE in counts.items():
        routes_E = counts_TE[rows].sum(dim=0)
        dropped = float(routes_E.sum() - routes_E[kept[name]].sum())
        out[name] = dropped / max(float(routes_E.sum()), 1.0)
        hit, total = hit + dropped, total + float(routes_E.sum())
    return {"overall": hit / max(total, 1.0), **out}


def build_report(extraction: Extraction, *, source: str, out: Path, data_root: str | None, eval_images: int,
                 latency_runs: int, latency_batches: tuple[int, ...]) -> dict[str, Any]:
    """Every figure of the module docstring for the extraction's tasks (see `format_table` for the layout)."""
    full, sub = extraction.full, extraction.sub
    _, _, table = config_sections("metadata", full.meta)
    rows = [full.model.task_ids[t] for t in extraction.tasks]
    report: dict[str, Any] = {
        "source": source, "out": str(out), "tasks": extraction.tasks, "rule": sub.meta["rule"],
        "exact_routing": sub.meta["exact_routing"], "folded_layers": [], "usage_source": extraction.usage_source,
        "file_bytes": out.stat().st_size, "params": {"full": param_parts(full.model), "sub": param_parts(sub.model)},
        "experts_kept": {n: {"kept": ids, "of": sub.meta["num_experts_full"][n]} for n, ids in extraction.kept.items()},
        "top_k": {n: {"full": m.top_k, "sub": routed_layers(sub.model)[n].top_k}
                  for n, m in routed_layers(full.model).items()},
        "flops_per_image": {}, "latency_ms": {}, "metrics": {}, "dropped_routes": {},
        "threads": torch.get_num_threads()}
    pair = {"full": full.model, "sub": sub.model}
    for task in extraction.tasks:
        size = table[task].img_size
        report["flops_per_image"][task] = {k: flops_per_image(m, task, size) for k, m in pair.items()}
        report["latency_ms"][task] = {f"batch{b}": paired_latency_ms(pair, task, size, b, latency_runs)
                                      for b in latency_batches}
        if eval_images > 0:
            root = data_root or full.meta.get("source", {}).get("data_root", "")
            result = evaluate_pair(extraction, task, data_root=root, eval_images=eval_images)
            report["metrics"][task] = {"full": result["full"], "sub": result["sub"], "images": eval_images}
            report["dropped_routes"][task] = dropped_routes(result["counts"], extraction.kept,
                                                            [full.model.task_ids[task]])
    if extraction.usage_source == "calibration":
        report["dropped_routes"]["calibration"] = dropped_routes(extraction.usage, extraction.kept, rows)
    return report


def _fmt(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.3g}"


def format_table(report: dict[str, Any]) -> str:
    """The printed comparison: one line per figure, full | submodel | ratio."""
    lines = [f"{'':<34}{'full':>12}{'submodel':>12}{'ratio':>8}"]  # latency: median of paired ratios

    def row(label: str, a: float, b: float, ratio: float | None = None) -> None:
        ratio = ratio if ratio is not None else (b / a if a else float("nan"))
        lines.append(f"{label:<34}{_fmt(a):>12}{_fmt(b):>12}{ratio:>8.3f}")

    for part in ("total", "backbone", "moe_layers", "decoder", "heads"):
        row(f"params {part}", report["params"]["full"][part], report["params"]["sub"][part])
    for task, flops in report["flops_per_image"].items():
        row(f"{task} FLOPs/image", flops["full"], flops["sub"])
        for batch, ms in report["latency_ms"][task].items():
            row(f"{task} latency ms ({batch})", ms["full"], ms["sub"], ms["paired_ratio"])
        for key, value in report["metrics"].get(task, {}).get("full", {}).items():
            row(f"{task} {key} ({report['metrics'][task]['images']} val images)", value,
                report["metrics"][task]["sub"][key])
    for task, share in report["dropped_routes"].items():
        lines.append(f"{'routes to dropped experts (' + task + ')':<34}{share['overall']:>32.4f}")
    kept = ", ".join(f"{n}: {len(v['kept'])}/{v['of']}" for n, v in report["experts_kept"].items())
    lines.append(f"experts kept: {kept}")
    healed = report.get("heal")
    if healed:
        lines.append(f"healed: {healed['steps']} distillation steps, loss {healed['loss_first']} -> "
                     f"{healed['loss_last']}; submodel before healing: {healed['metric_before']}")
    changed = {n: k for n, k in report.get("top_k", {}).items() if k["sub"] != k["full"]}
    if changed:
        lines.append("experts per token: " + ", ".join(f"{n}: {k['sub']} of {k['full']}" for n, k in changed.items()))
    return "\n".join(lines)


def plot_kept(usage: dict[str, torch.Tensor], kept: dict[str, list[int]], task_ids: dict[str, int],
              chosen: list[str], out: Path) -> Path:
    """Usage (% per task row) heatmap per MoE layer; kept experts of the chosen tasks' rows marked with dots."""
    from pretrain.training.plots import plot_usage

    tasks = sorted(task_ids, key=task_ids.get)
    rows = {name: u.double().numpy()[[task_ids[t] for t in tasks]] for name, u in usage.items()}
    return plot_usage(rows, tasks, out, kept=kept, marked=tuple(chosen))


def write_report(report: dict[str, Any], extraction: Extraction, out: Path) -> None:
    """`NAME.report.json` and `NAME.report.png` beside `NAME.safetensors`; prints the table."""
    stem = out.with_suffix("")
    Path(f"{stem}.report.json").write_text(json.dumps(report, indent=1))
    plot_kept(extraction.usage, extraction.kept, extraction.full.model.task_ids, extraction.tasks,
              Path(f"{stem}.report.png"))
    print(format_table(report))
