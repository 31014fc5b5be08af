"""PNG plots: per-task loss curves and task×expert usage heatmaps (run directory), the extraction sweep."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless clusters have no display
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: list[dict], out: Path, smooth: int = 5) -> Path | None:
    """One curve per `loss/<task>` key of the JSONL records (moving average over `smooth` points)."""
    keys = sorted({k for r in records for k in r if k.startswith("loss/") and k.count("/") == 1})
    if not keys:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        steps, values = map(np.asarray, zip(*points))
        if len(values) >= smooth:
            values = np.convolve(values, np.ones(smooth) / smooth, mode="valid")
            steps = steps[smooth - 1:]
        ax.plot(steps, values, label=key.split("/", 1)[1])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_usage(usage: dict[str, np.ndarray], tasks: list[str], out: Path, *,
               kept: dict[str, list[int]] | None = None, marked: tuple[str, ...] = ()) -> Path | None:
    """Heatmaps of per-task expert usage (%, rows sum to 100) for every MoE layer.

    Args: usage {layer name: array [T, E]} (Mod-Squad usage EMA, any scale), tasks: row labels; `kept` {layer: kept
    expert ids} marks those experts (red dots) on the rows of the `marked` tasks (an extracted submodel's).
    """
    if not usage:
        return None
    plt = _pyplot()
    names = list(usage)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 1.0 + 0.45 * len(tasks) * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        u_TE = np.asarray(usage[name], dtype=np.float64)[: len(tasks)]
        pct_TE = 100 * u_TE / np.maximum(u_TE.sum(axis=1, keepdims=True), 1e-12)
        im = ax.imshow(pct_TE, aspect="auto", cmap="viridis", vmin=0)
        for task in marked if kept is not None else ():
            ax.scatter(kept[name], [tasks.index(task)] * len(kept[name]), s=12, c="red", marker="o")
        ax.set_title(name if kept is None else f"{name} ({len(kept[name])}/{u_TE.shape[1]} kept)", fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_xlabel("expert", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_sweep(rows: list[dict], task: str, out: Path) -> Path:
    """`pretrain extract --sweep`: the task metric and the latency ratios against the share of experts kept."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    shares = [100.0 * r["experts_kept"] / r["experts"] for r in rows]
    if rows and rows[0]["value"] is not None:
        ax.plot(shares, [r["value"] for r in rows], "o-", label=f"{task} {rows[0]['metric']} (submodel)")
        ax.axhline(rows[0]["value_full"], ls="--", color="gray", label="full model")
        ax.set_ylabel(rows[0]["metric"])
    ax.set_xlabel("MoE-layer experts kept (%)")
    right = ax.twinx()
    for batch in rows[0]["latency_ratio"] if rows else []:
        right.plot(shares, [r["latency_ratio"][batch] for r in rows], "s:", label=f"latency ratio {batch}")
    right.set_ylabel("latency / full model")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
