"""The `pretrain` console script.

Subcommands exist only once they work. Heavy imports (torch, deepspeed) happen inside the handlers so that
`pretrain --help` and config errors answer at once. Every user error (bad config, missing file, wrong dataset
layout) is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2


class UserError(Exception):
    """An error in the user's input, printed as one line (exit 2)."""


def _synth(args: argparse.Namespace) -> int:
    from pretrain.synth import synthesize

    summary = synthesize(Path(args.out), seed=args.seed, scale=args.scale, overwrite=args.overwrite)
    for dataset, splits in summary.items():
        if isinstance(splits, dict):
            print(f"{dataset}: " + ", ".join(f"{k}={v.get('files', v) if isinstance(v, dict) else v}"
                                             for k, v in splits.items()))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from pretrain.log import setup_logging
    from pretrain.prepare import PREPARERS, PrepareError

    setup_logging()
    try:
        PREPARERS[args.dataset](
            Path(args.src), Path(args.out), args.split, overwrite=args.overwrite, workers=args.workers,
            max_count=args.shard_max_count, max_bytes=args.shard_max_bytes, min_shards=args.min_shards,
        )
    except PrepareError as exc:
        raise UserError(str(exc)) from None
    return 0  # the converter logs its summary


def _train(args: argparse.Namespace) -> int:
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors surface before the heavy imports
    from pretrain.train import main as train_main

    return train_main(cfg, dry_run=args.dry_run)


def _evaluate(args: argparse.Namespace) -> int:
    from pretrain.config import load_config

    target = Path(args.target)
    if target.is_dir():
        if not (target / "config.yaml").is_file():
            raise UserError(f"{target} is not a run directory: no config.yaml in it")
        cfg = load_config(target / "config.yaml", [f"output_dir={target}", *args.overrides])
    else:
        cfg = load_config(target, args.overrides)
    from pretrain.evaluate import main as evaluate_main

    return evaluate_main(cfg)


def _export(args: argparse.Namespace) -> int:
    from pretrain.export import export_run
    from pretrain.log import setup_logging

    setup_logging()
    try:
        path = export_run(args.run_dir, args.out, step=args.step, dtype=args.dtype, data_root=args.data_root)
    except (ValueError, RuntimeError) as exc:
        raise UserError(str(exc)) from None
    print(path)
    return 0


def _extract(args: argparse.Namespace) -> int:
    from pretrain.extract import main as extract_main
    from pretrain.log import setup_logging

    setup_logging()
    rule = {"rule": args.rule, "thresh": args.thresh, "keep": args.keep, "mass": args.mass,
            "calibrate": args.calibrate.split(",") if args.calibrate else None,
            "calibrate_images": args.calibrate_images, "exact_routing": args.exact_routing}
    try:
        extract_main(args.source, args.task.split(","), args.out, step=args.step, data_root=args.data_root,
                     report=not args.no_report, eval_images=args.eval_images, latency_runs=args.latency_runs,
                     latency_batches=tuple(int(b) for b in args.latency_batches.split(",")), **rule)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise UserError(str(exc).strip("'\"")) from None
    return 0


def _add_export_extract(sub) -> None:
    p = sub.add_parser("export", help="consolidate a run's checkpoint into one portable .safetensors model file")
    p.add_argument("run_dir", help="RUN_DIR (its config.yaml and checkpoints/)")
    p.add_argument("--out", required=True, help="FILE.safetensors")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: the training precision")
    p.add_argument("--data-root", default=None, help="where the run's shards are now (class lists)")
    p.set_defaults(func=_export)

    p = sub.add_parser("extract", help="keep the experts some tasks use: a standalone submodel + report")
    p.add_argument("source", help="RUN_DIR or a FILE.safetensors written by `pretrain export`")
    p.add_argument("--task", required=True, help="task or comma-separated tasks (their experts' union is kept)")
    p.add_argument("--out", required=True, help="NAME.safetensors (report: NAME.report.json/.png beside it)")
    p.add_argument("--rule", choices=["modsquad", "topn", "mass"], default="modsquad")
    p.add_argument("--thresh", type=float, default=3.0, help="modsquad: keep usage%% > thresh / k")
    p.add_argument("--keep", type=int, default=0, help="topn: experts kept per layer (at least the layer's k)")
    p.add_argument("--mass", type=float, default=0.9, help="mass: fraction of the task's usage kept")
    p.add_argument("--calibrate", default=None, help="shard folder(s), one per task: usage = top-k counts there")
    p.add_argument("--calibrate-images", type=int, default=64)
    p.add_argument("--exact-routing", action="store_true",
                   help="softmax over all E logits, top-k among the kept experts (default: softmax over kept only)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a RUN_DIR (default: latest)")
    p.add_argument("--data-root", default=None, help="shard root for the val metric (default: the run's data.root)")
    p.add_argument("--eval-images", type=int, default=64, help="val images per task for the metric (0 = skip)")
    p.add_argument("--latency-runs", type=int, default=5, help="paired timed runs per batch size")
    p.add_argument("--latency-batches", default="1,32", help="comma-separated batch sizes for the latency")
    p.add_argument("--no-report", action="store_true", help="write the submodel only")
    p.set_defaults(func=_extract)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write the embedded corpus (ImageNet/COCO/ADE20K raw layouts)")
    p.add_argument("--out", required=True, help="output folder for the raw layouts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the default dataset sizes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-synth folder in --out")
    p.set_defaults(func=_synth)

    p = sub.add_parser("prepare", help="convert a raw dataset layout into WebDataset shards")
    p.add_argument("dataset", choices=["imagenet", "coco", "ade20k"])
    p.add_argument("--src", required=True, help="dataset root in its standard release layout")
    p.add_argument("--out", required=True, help="output folder for shards + _info.json")
    p.add_argument("--split", required=True, choices=["train", "val"])
    p.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty --out")
    p.add_argument("--workers", type=int, default=0, help="decode/verify worker processes (0 = in process)")
    p.add_argument("--shard-max-count", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--shard-max-bytes", type=int, default=512 * 2**20, help="bytes per shard at most")
    p.add_argument("--min-shards", type=int, default=1,
                   help="at least this many shards (readers need >= ranks × workers shards per split)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="pretrain on the task mixture with DeepSpeed")
    p.add_argument("config", help="YAML overlay, e.g. configs/debug/pretrain.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--dry-run", action="store_true", help="build everything, print the config and parameter counts")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="evaluate a run directory (its latest checkpoint) or a config")
    p.add_argument("target", help="RUN_DIR or CONFIG")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.set_defaults(func=_evaluate)
    _add_export_extract(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pretrain.config import ConfigError

    expected = (ConfigError, UserError, FileNotFoundError, FileExistsError)
    try:
        return args.func(args)
    except expected as exc:
        print(f"pretrain {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
