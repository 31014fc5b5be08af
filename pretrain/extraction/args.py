"""The `pretrain export` and `pretrain extract` command lines: their options and the checks of their values (the
handlers that run them are in `pretrain.cli`). Light: argparse only, so `pretrain --help` answers at once."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


def check_extract_args(args: argparse.Namespace) -> None:
    """ValueError naming the first `pretrain extract` option whose value cannot mean anything."""
    checks = [("--thresh", args.thresh, math.isfinite(args.thresh) and args.thresh >= 0, "a number >= 0"),
              ("--mass", args.mass, 0 < args.mass <= 1, "in (0, 1]"),
              ("--share", args.share, 0 < args.share <= 1, "in (0, 1]"),
              ("--eval-images", args.eval_images, args.eval_images >= 0, "an image count >= 0 (0 skips the metric)"),
              ("--calibrate-images", args.calibrate_images, args.calibrate_images >= 1, "an image count >= 1"),
              ("--latency-runs", args.latency_runs, args.latency_runs >= 1, "a run count >= 1"),
              ("--latency-batches", args.latency_batches,
               all(b.strip().isdigit() and int(b) >= 1 for b in args.latency_batches.split(",")),
               "comma-separated batch sizes >= 1, e.g. 1,32")]
    # None = left out (as trained); a given K must route somewhere (the upper bound is the model's: `with_top_k`)
    checks += [(flag, k, k is None or k >= 1, "between 1 and the trained k (leave it out to keep the trained k)")
               for flag, k in (("--top-k", args.top_k), ("--attn-top-k", args.attn_top_k))]
    for flag, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"{flag} {value}: expected {expected}")
    if args.heal < 0 or not (math.isfinite(args.heal_lr) and args.heal_lr > 0):
        raise ValueError(f"--heal {args.heal} --heal-lr {args.heal_lr}: expected steps >= 0 and a learning rate > 0")
    if args.sweep and args.heal:
        raise ValueError("--sweep with --heal: heal the size you pick, one extraction at a time")
    if args.sweep and args.rule not in ("modsquad", "share"):
        raise ValueError(f"--sweep keeps a share of each layer's experts: it does not combine with --rule {args.rule}")


def add_export_extract(sub: argparse._SubParsersAction, *, export: Handler, extract: Handler) -> None:
    """The `export` and `extract` subcommands on `sub`, run by the `export` / `extract` handlers."""
    p = sub.add_parser("export", help="consolidate a run's checkpoint into one portable .safetensors model file")
    p.add_argument("run_dir", help="RUN_DIR (its config.yaml and checkpoints/)")
    p.add_argument("--out", required=True, help="FILE.safetensors")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: the training precision")
    p.add_argument("--data-root", default=None, help="where the run's shards are now (class lists)")
    p.set_defaults(func=export)

    p = sub.add_parser("extract", help="keep the experts some tasks use: a standalone submodel + report")
    p.add_argument("source", help="RUN_DIR or a FILE.safetensors written by `pretrain export`")
    p.add_argument("--task", required=True, help="task or comma-separated tasks (their experts' union is kept)")
    p.add_argument("--out", required=True, help="NAME.safetensors (report: NAME.report.json/.png beside it)")
    p.add_argument("--rule", choices=["modsquad", "topn", "mass", "share"], default="modsquad")
    p.add_argument("--thresh", type=float, default=3.0, help="modsquad: keep usage%% > thresh / k")
    p.add_argument("--keep", type=int, default=0, help="topn: experts kept per layer (at least the layer's k)")
    p.add_argument("--mass", type=float, default=0.9, help="mass: fraction of the task's usage kept")
    p.add_argument("--share", type=float, default=1.0, help="share: fraction of each layer's experts kept")
    p.add_argument("--sweep", default="", metavar="SHARES",
                   help="several sizes in one call (e.g. 0.25,0.5,0.75,1): a submodel and report per share, one "
                        "table NAME.sweep.md/.json and one plot NAME.sweep.png")
    p.add_argument("--calibrate", default=None, help="shard folder(s), one per task: usage = top-k counts there")
    p.add_argument("--calibrate-images", type=int, default=64)
    p.add_argument("--exact-routing", action="store_true",
                   help="softmax over all E logits, top-k among the kept experts (default: softmax over kept only)")
    p.add_argument("--top-k", type=int, default=None,
                   help="route each token to K MLP experts, below the trained k: fewer FLOPs (default: as trained)")
    p.add_argument("--attn-top-k", type=int, default=None, help="the same for the MoE attention's head experts")
    p.add_argument("--heal", type=int, default=0, metavar="STEPS",
                   help="distil the submodel from the full model for STEPS steps on the tasks' training shards "
                        "(run directory NAME.heal/, resumable; the report gives the metric before and after)")
    p.add_argument("--heal-lr", type=float, default=1e-4, help="learning rate of --heal")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a RUN_DIR (default: latest)")
    p.add_argument("--data-root", default=None, help="shard root for the val metric (default: the run's data.root)")
    p.add_argument("--eval-images", type=int, default=64, help="val images per task for the metric (0 = skip)")
    p.add_argument("--latency-runs", type=int, default=5, help="paired timed runs per batch size")
    p.add_argument("--latency-batches", default="1,32", help="comma-separated batch sizes for the latency")
    p.add_argument("--no-report", action="store_true", help="write the submodel only")
    p.set_defaults(func=extract)
