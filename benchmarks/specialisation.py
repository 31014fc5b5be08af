"""How distinct the tasks' experts are in trained runs: per task, the share of MoE-layer experts the default keep rule
(Mod-Squad's, thresh 3) keeps, the overlap of the tasks' kept sets, and MI(T;E) of the usage EMA.

    python benchmarks/specialisation.py RUN_DIR [RUN_DIR ...] [--thresh 3]

Prints one JSON line per run (MOE.md, "What makes tasks specialise", records the figures).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.extraction.export import consolidate  # noqa: E402
from pretrain.extraction.extract import routed_layers  # noqa: E402
from pretrain.extraction.keep_rules import choose_experts  # noqa: E402


def mutual_information(usage_TE: torch.Tensor) -> float:
    """MI(T;E) in nats of a usage table, tasks weighted equally (each row normalised)."""
    p_TE = usage_TE.double() / usage_TE.double().sum(dim=1, keepdim=True).clamp_min(1e-12) / usage_TE.shape[0]
    p_E = p_TE.sum(dim=0)
    ratio = p_TE / (p_TE.sum(dim=1, keepdim=True) * p_E).clamp_min(1e-12)
    return float((p_TE * ratio.clamp_min(1e-12).log()).sum())


def measure(run_dir: Path, thresh: float) -> dict:
    full = consolidate(run_dir)
    layers = routed_layers(full.model)
    usage = {n: m.usage_TE.detach().double() for n, m in layers.items()}
    top_k = {n: m.top_k for n, m in layers.items()}
    total = sum(m.num_experts for m in layers.values())
    kept = {t: choose_experts(usage, top_k, [full.model.task_ids[t]], "modsquad", thresh=thresh) for t in full.tasks}
    share = {t: sum(len(v) for v in k.values()) / total for t, k in kept.items()}
    pairs = {}
    tasks = list(kept)
    for i, a in enumerate(tasks):
        for b in tasks[i + 1:]:
            inter = sum(len(set(kept[a][n]) & set(kept[b][n])) for n in layers)
            union = sum(len(set(kept[a][n]) | set(kept[b][n])) for n in layers)
            pairs[f"{a}-{b}"] = inter / union
    mi = {n: mutual_information(u[[full.model.task_ids[t] for t in tasks]]) for n, u in usage.items()}
    return {"run": str(run_dir), "step": full.meta["step"], "thresh": thresh, "kept_share": share,
            "jaccard": pairs, "mi_nats_mean": sum(mi.values()) / len(mi), "mi_max_nats": math.log(len(tasks))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--thresh", type=float, default=3.0)
    args = parser.parse_args()
    for run in args.runs:
        print(json.dumps(measure(run, args.thresh)))


if __name__ == "__main__":
    main()
