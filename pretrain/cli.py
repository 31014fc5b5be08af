"""The `pretrain` console script.

Subcommands exist only once they work. Heavy imports (torch, deepspeed) happen inside the handlers so that
`pretrain --help` and config errors answer at once. Every failure is one line on stderr (rank 0) with an exit
code that says what kind it was (`pretrain.errors`); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2  # the exit codes and what each means: pretrain.errors.EXIT_CODES
EXIT_DEMO_STAGE = 4  # a stage of `pretrain demo` failed (its own message is above)


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
        extra = ({"tasks": args.tasks, "keep_oversized": args.keep_oversized}
                 if args.dataset in ("nyud", "pascal_context") else {})
        PREPARERS[args.dataset](
            Path(args.src), Path(args.out), args.split, overwrite=args.overwrite, workers=args.workers,
            max_count=args.shard_max_count, max_bytes=args.shard_max_bytes, min_shards=args.min_shards, **extra,
        )
    except PrepareError as exc:
        raise UserError(str(exc)) from None
    return 0  # the converter logs its summary


def _train(args: argparse.Namespace) -> int:
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors surface before the heavy imports
    from pretrain.train import main as train_main

    return train_main(cfg, dry_run=args.dry_run)


def _finetune(args: argparse.Namespace) -> int:
    from pretrain.config import load_config
    from pretrain.finetune.config import FinetuneConfig

    cfg = load_config(args.config, args.overrides, schema=FinetuneConfig)  # errors surface before heavy imports
    from pretrain.finetune.train import main as finetune_main

    return finetune_main(cfg, dry_run=args.dry_run)


def _is_finetune_config(path: Path) -> bool:
    """A fine-tuning config has a top-level `finetune:` section (pretraining configs never do)."""
    from omegaconf import OmegaConf

    try:
        loaded = OmegaConf.load(path)
    except Exception:  # a broken file: load_config reports it with its line number
        return False
    return hasattr(loaded, "keys") and "finetune" in loaded.keys()


def _evaluate(args: argparse.Namespace) -> int:
    from pretrain.config import load_config

    target = Path(args.target)
    overrides = list(args.overrides)
    if target.is_dir():
        if not (target / "config.yaml").is_file():
            raise UserError(f"{target} is not a run directory: no config.yaml in it")
        target, overrides = target / "config.yaml", [f"output_dir={target}", *overrides]
    if _is_finetune_config(target):
        from pretrain.finetune.config import FinetuneConfig

        cfg = load_config(target, overrides, schema=FinetuneConfig)
        from pretrain.finetune.evaluate import main as finetune_evaluate

        return finetune_evaluate(cfg)
    cfg = load_config(target, overrides)
    from pretrain.evaluate import main as evaluate_main

    return evaluate_main(cfg, random_init=args.random_init)


def _demo(args: argparse.Namespace) -> int:
    from pretrain.demo import DemoError
    from pretrain.demo import main as demo_main

    try:
        return demo_main(Path(args.out), pretrain_config=args.pretrain_config, finetune_config=args.finetune_config,
                         fast=args.fast)
    except DemoError as exc:
        print(f"pretrain demo: error: {exc}", file=sys.stderr)
        return EXIT_DEMO_STAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of a failure (also PRETRAIN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write the embedded corpus (raw layouts of all five datasets)")
    p.add_argument("--out", required=True, help="output folder for the raw layouts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the default dataset sizes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-synth folder in --out")
    p.set_defaults(func=_synth)

    p = sub.add_parser("prepare", help="convert a raw dataset layout into WebDataset shards")
    p.add_argument("dataset", choices=["imagenet", "coco", "ade20k", "nyud", "pascal_context"])
    p.add_argument("--src", required=True, help="dataset root in its standard release layout")
    p.add_argument("--out", required=True, help="output folder for shards + _info.json")
    p.add_argument("--split", required=True, choices=["train", "val"])
    p.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty --out")
    p.add_argument("--workers", type=int, default=0, help="decode/verify worker processes (0 = in process)")
    p.add_argument("--shard-max-count", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--shard-max-bytes", type=int, default=512 * 2**20, help="bytes per shard at most")
    p.add_argument("--min-shards", type=int, default=1,
                   help="at least this many shards (readers need >= ranks × workers shards per split)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="nyud/pascal_context: convert only these tasks (a missing task folder is an error otherwise)")
    p.add_argument("--keep-oversized", action="store_true",
                   help="nyud/pascal_context: keep images larger than the pad target (reported either way)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="pretrain on the task mixture with DeepSpeed")
    p.add_argument("config", help="YAML overlay, e.g. configs/debug/pretrain.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--dry-run", action="store_true", help="build everything, print the config and parameter counts")
    p.set_defaults(func=_train)

    p = sub.add_parser("finetune", help="fine-tune a backbone on a dense multi-task dataset (NYUD-v2, PASCAL-Context)")
    p.add_argument("config", help="YAML overlay, e.g. configs/debug/finetune.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. finetune.init_from=runs/debug")
    p.add_argument("--dry-run", action="store_true", help="build everything, print the config and parameter counts")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded corpus, ending in a report.md")
    p.add_argument("--out", default="runs/demo", help="folder for everything the demo writes (re-runs resume)")
    p.add_argument("--pretrain-config", default="configs/debug/pretrain.yaml")
    p.add_argument("--finetune-config", default="configs/debug/finetune.yaml")
    p.add_argument("--fast", action="store_true", help="few steps per stage (a smoke test of the pipeline)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("evaluate", help="evaluate a run directory (its latest checkpoint) or a config")
    p.add_argument("target", help="RUN_DIR or CONFIG")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate the model at its random initialisation (a baseline; no checkpoint needed)")
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; any failure ends as one line on stderr (rank 0) and its exit code (`pretrain.errors`).

    `--debug` or PRETRAIN_DEBUG=1 re-raises instead, for the full traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted after the subcommand too (`pretrain train cfg.yaml --debug`)
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    from pretrain import errors

    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as exc:
        if errors.debug_requested(debug):
            raise
        return errors.report(*errors.describe(exc, args.command))

if __name__ == "__main__":
    sys.exit(main())
