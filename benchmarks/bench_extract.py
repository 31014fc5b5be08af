"""Extracted submodel vs full model: parameters, FLOPs, peak memory, CPU latency (ViT-S Mod-Squad, cls task).

    python benchmarks/bench_extract.py [--threads 2] [--rounds 3] [--json out.json]

Model: vit_s16 @224, Mod-Squad placement (MoE attention in even blocks: 12 head experts, top-6, head_dim 64; MoE MLP
in odd blocks: 16 experts, top-4, hidden 384), per-task routers (router_init normal), cls head only, random weights.
Usage table: in every layer a random half of the experts gets the cls task's usage (the other half 0.1 % each), so
`--rule modsquad` (usage% > 3/k) keeps half: 8/16 MLP experts, 6/12 head experts. Both models are loaded from their
files (`pretrain.load_model` / `pretrain.load_submodel`), as a user would.
- parameters: total and the MoE layers' (experts + routers); FLOPs: FlopCounterMode, one 224² image;
- peak memory: peak RSS (VmHWM, reset through /proc/self/clear_refs after the imports) of a fresh process that
  loads the file and runs one batch-1 forward, minus its RSS before loading. tracemalloc does not see torch's
  allocator, and `ru_maxrss` keeps the peak of the imports;
- latency: `harness.interleaved` (full and submodel alternate, order reversed every other round), batch 1 and 32,
  eval mode, no_grad; medians of per-round paired ratios of wall time and of this process's CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import interleaved, report, write_results

ROOT = Path(__file__).resolve().parents[1]
CFG = ["model.size=vit_s16", "model.drop_path=0.0", "moe.num_experts=16", "moe.top_k=4", "moe.attn_num_experts=12",
       "moe.attn_top_k=6", "moe.router_init=normal", "tasks.det.enabled=false", "tasks.seg.enabled=false",
       "tasks.cls.num_classes=1000", "tasks.cls.img_size=224"]


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def child(kind: str, path: str) -> None:
    """Peak RSS growth (MB) of loading `path` and one batch-1 forward, printed as JSON."""
    import pretrain.models.submodel  # noqa: F401  (torch, timm, torchvision, the model code: before the baseline)
    from pretrain import load_model, load_submodel

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = status_kb("VmRSS")
    model = (load_model if kind == "full" else load_submodel)(path)
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224, dtype=torch.uint8), task="cls")
    print(json.dumps({"peak_rss_delta_mb": (status_kb("VmHWM") - base) / 1024}))


def build_files(folder: Path) -> tuple[Path, Path, dict]:
    from pretrain.config.load import load_config
    from pretrain.extraction.extract import extract_submodel, routed_layers, save_submodel
    from pretrain.models import build_model
    from pretrain.runs.portable import config_metadata, load_model, write_file

    cfg = load_config(None, CFG)
    torch.manual_seed(0)
    model = build_model(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in routed_layers(model).values():
            num = layer.num_experts
            used = torch.randperm(num, generator=g)[: num // 2]
            layer.usage_TE.fill_(0.001)
            layer.usage_TE[0, used] = 1.0
    meta = {**config_metadata(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks), "task_names": ["cls"],
            "task_ids": model.task_ids, "num_classes": {"cls": 1000}, "classes": {}, "dtype": "fp32", "step": 0}
    full_path = write_file(folder / "full.safetensors", model.state_dict(), meta, kind="model")
    extraction = extract_submodel(load_model(full_path), ["cls"], rule="modsquad")
    sub_path = save_submodel(extraction, folder / "sub.safetensors")
    kept = {n: f"{len(v)}/{routed_layers(model)[n].num_experts}" for n, v in extraction.kept.items()}
    return full_path, sub_path, kept


def peak_memory(kind: str, path: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(path)], env=env, capture_output=True,
                         text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_delta_mb"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--max-batch", type=int, default=32, help="skip the batch-32 latency with 1")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    torch.set_num_threads(args.threads)
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain import load_model, load_submodel
    from pretrain.extraction.report import param_parts

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        full_path, sub_path, kept = build_files(Path(tmp))
        full, sub = load_model(full_path).model, load_submodel(sub_path).model
        out: dict = {"kept": kept, "file_mb": {"full": full_path.stat().st_size / 2**20,
                                               "sub": sub_path.stat().st_size / 2**20}}
        out["params"] = {"full": param_parts(full), "sub": param_parts(sub)}
        flops = {}
        for name, model in (("full", full), ("sub", sub)):
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model("cls", torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
            flops[name] = counter.get_total_flops()
        out["gflops_per_image"] = {k: v / 1e9 for k, v in flops.items()}
        out["peak_rss_delta_mb"] = {kind: peak_memory(kind, p) for kind, p in (("full", full_path), ("sub", sub_path))}
        for batch, rounds in ((1, 2 * args.rounds + 1), (32, args.rounds)):
            if batch > args.max_batch:
                continue
            x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)

            cpu: dict[str, list[float]] = {"full": [], "sub": []}

            def run(name, m, x=x, cpu=cpu):
                t0 = time.process_time()
                with torch.no_grad():
                    m("cls", x)
                cpu[name].append(time.process_time() - t0)

            res = interleaved({"full": lambda: run("full", full), "sub": lambda: run("sub", sub)}, baseline="full",
                              rounds=rounds)
            report(f"batch {batch}", res)
            # CPU seconds of this process per forward (warm-up dropped): less sensitive to other processes than
            # wall time on an oversubscribed machine, and equal to the work done with 1 thread
            cpu_ratio = statistics.median(s / f for f, s in zip(cpu["full"][1:], cpu["sub"][1:]))
            out[f"latency_b{batch}"] = {"ms": res["ms"], "ratio": res["ratio"]["sub"], "clean": res["clean_rounds"],
                                        "rounds": rounds, "other_load": res["other_load"], "cpu_time_ratio": cpu_ratio}
            print(f"  CPU-time ratio sub/full: {cpu_ratio:.3f}")
    p = out["params"]
    out["moe_param_ratio"] = p["sub"]["moe_layers"] / p["full"]["moe_layers"]
    out["seconds"] = time.time() - t0
    write_results(out, args.json, threads=args.threads, loadavg=os.getloadavg())


if __name__ == "__main__":
    main()
