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


def _import_modsquad(args: argparse.Namespace) -> int:
    from pretrain.config import TASKS, load_config

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: must end in .safetensors")
    import json

    from safetensors.torch import save_file

    from pretrain.models import build_backbone
    from pretrain.models.modsquad import import_modsquad, parse_task_map

    try:
        task_map = parse_task_map(args.tasks, TASKS) if args.tasks else None
        vit = build_backbone(cfg)
        report = import_modsquad(vit, args.checkpoint, task_map=task_map)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(out))
    print(json.dumps({"out": str(out), "ignored": len(report["ignored"]), "dropped": len(report["dropped"])}))
    return 0


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

    p = sub.add_parser("import-modsquad", help="map an official Mod-Squad checkpoint onto this backbone (safetensors)")
    p.add_argument("checkpoint", help="official state dict (.pth read weights-only, or .safetensors)")
    p.add_argument("--config", required=True, help="config whose backbone matches the checkpoint, e.g. "
                   "configs/pretrain/vitb16_modsquad_hetero.yaml")
    p.add_argument("--out", required=True, help="FILE.safetensors with this project's backbone names")
    p.add_argument("--tasks", default="", help="official task index per task, e.g. cls=0,det=1,seg=2 "
                   "(default: identity; required when the task counts differ)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.set_defaults(func=_import_modsquad)
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
