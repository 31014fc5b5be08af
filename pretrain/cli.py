"""The `pretrain` console script.

Subcommands exist only once they work. Heavy imports (torch, deepspeed) happen inside the handlers so that
`pretrain --help` and config errors answer at once. Every user error (bad config, missing file, wrong dataset
layout) is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
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


def _submit(args: argparse.Namespace) -> int:
    from pretrain.submit import JobOptions, SubmitError, submit, summary

    names = [f.name for f in fields(JobOptions)]
    opts = JobOptions(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})
    try:
        run_dir, job_ids = submit(args.subcommand, args.config, args.overrides, opts, chain=args.chain,
                                  dependency=args.dependency, dry_run=args.dry_run, force=args.force,
                                  argv=sys.argv)
    except SubmitError as exc:
        raise UserError(str(exc)) from None
    if job_ids:
        print(summary(run_dir, job_ids))
    return 0


def _status(args: argparse.Namespace) -> int:
    from pretrain.status import collect, format_report

    if not Path(args.run_dir).is_dir():
        raise UserError(f"{args.run_dir} is not a directory")
    report = collect(args.run_dir)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0



# `pretrain submit` options: (flag, type, help); defaults live in pretrain.submit.JobOptions
SUBMIT_OPTIONS = [
    ("--nodes", int, "nodes (default 1)"),
    ("--gpus-per-node", str, "[TYPE:]COUNT GPUs per node = tasks per node (default 8; 0 = CPU-only job)"),
    ("--tasks-per-node", int, "ranks per node of a CPU-only job (--gpus-per-node 0; default 1)"),
    ("--cpus-per-task", int, "CPUs per rank (default data.num_workers + 1)"),
    ("--mem", str, "memory per node, e.g. 400G"),
    ("--time", str, "time limit per attempt, e.g. 24:00:00 (default: the partition's)"),
    ("--partition", str, None), ("--account", str, None), ("--qos", str, None), ("--constraint", str, None),
    ("--exclude", str, "nodes to avoid"),
    ("--job-name", str, "default <subcommand>-<output_dir name>"),
    ("--signal-grace", int, "seconds before the time limit that USR1 asks for a checkpoint (default 300)"),
    ("--max-requeues", int, "requeue at most this many times (default 20)"),
    ("--python", str, "interpreter command the job runs `-m pretrain` with (default: this one)"),
    ("--template", str, "job script template (default slurm/train.sbatch)"),
]

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

    p = sub.add_parser("submit", help="submit a requeueable SLURM job (slurm/train.sbatch) for a config")
    p.add_argument("subcommand", choices=["train", "finetune"], help="what the job runs")
    p.add_argument("config", help="YAML overlay; validated and frozen into output_dir/config.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    for flag, kind, text in SUBMIT_OPTIONS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--sbatch-arg", dest="sbatch_args", action="append", metavar="KEY=VALUE",
                   help="any other sbatch option, written as `#SBATCH --KEY=VALUE` (repeatable)")
    p.add_argument("--dependency", help="sbatch --dependency of the (first) job, e.g. afterok:123")
    p.add_argument("--chain", type=int, default=1, help="submit N jobs, each after the previous one ends")
    p.add_argument("--force", action="store_true", help="submit even if the run dir is finished or has a live job")
    p.add_argument("--dry-run", action="store_true", help="print the job script and the sbatch command only")
    p.set_defaults(func=_submit)

    p = sub.add_parser("status", help="where is my run: checkpoint, metrics, speed/ETA, SLURM jobs, verdict")
    p.add_argument("run_dir", help="the run's output_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)
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
