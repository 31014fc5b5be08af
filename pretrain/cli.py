"""The `pretrain` console script.

Subcommands exist only once they work. Heavy imports (torch, deepspeed) happen inside the handlers so that
`pretrain --help` and config errors answer at once. Every failure is one line on stderr (rank 0) with an exit
code that says what kind it was (`pretrain.errors`); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from pretrain import catalog
from pretrain.cluster.render import SUBMIT_OPTIONS, JobOptions, SubmitError
from pretrain.errors import EXIT_DEMO_STAGE, EXIT_USAGE, PretrainError, UsageError  # noqa: F401 - codes: errors.EXIT_CODES
from pretrain.extraction.args import add_export_extract, check_extract_args


class UserError(UsageError):
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
                 if catalog.DATASETS[args.dataset].dense else {})
        PREPARERS[args.dataset](
            Path(args.src), Path(args.out), args.split, overwrite=args.overwrite, workers=args.workers,
            max_count=args.shard_max_count, max_bytes=args.shard_max_bytes, min_shards=args.min_shards, **extra,
        )
    except PrepareError as exc:
        raise UserError(str(exc)) from None
    return 0  # the converter logs its summary


def _train(args: argparse.Namespace) -> int:
    from pretrain.config.load import load_config
    from pretrain.training.signals import stop_flag

    stop_flag()  # SIGUSR1/SIGTERM from here on ask for a checkpoint and exit 75 instead of killing the rank

    cfg = load_config(args.config, args.overrides)  # config errors surface before the heavy imports
    from pretrain.training.train import main as train_main

    return train_main(cfg, dry_run=args.dry_run)


def _add_task(args: argparse.Namespace) -> int:
    from pretrain.config.load import load_config
    from pretrain.training.signals import stop_flag

    stop_flag()  # SIGUSR1/SIGTERM from here on ask for a checkpoint and exit 75 instead of killing the rank
    from pretrain.config.add_task import AddTaskConfig

    # absolute, as `pretrain submit add-task` freezes it: a run started here with a relative MODEL and resubmitted
    # through SLURM would otherwise differ in spelling only and be refused as a changed model
    model = os.path.abspath(args.model) if args.model else args.model
    cfg = load_config(args.config, [*args.overrides, f"add_task.model={model}"], schema=AddTaskConfig)
    from pretrain.add_task.train import main as add_task_main

    return add_task_main(cfg)


def _finetune(args: argparse.Namespace) -> int:
    from pretrain.config.load import load_config
    from pretrain.training.signals import stop_flag

    stop_flag()  # SIGUSR1/SIGTERM from here on ask for a checkpoint and exit 75 instead of killing the rank
    from pretrain.config.finetuning import FinetuneConfig

    cfg = load_config(args.config, args.overrides, schema=FinetuneConfig)  # errors surface before heavy imports
    from pretrain.finetune.init import check_source_overrides
    from pretrain.finetune.train import main as finetune_main

    check_source_overrides(cfg, args.overrides)  # the init_from source defines the architecture

    return finetune_main(cfg, dry_run=args.dry_run)


def _evaluate(args: argparse.Namespace) -> int:
    from pretrain.config.load import load_config

    target = Path(args.target)
    overrides = list(args.overrides)
    if target.is_dir():
        if not (target / "config.yaml").is_file():
            raise UserError(f"{target} is not a run directory: no config.yaml in it")
        target, overrides = target / "config.yaml", [f"output_dir={target}", *overrides]
    from importlib import import_module

    from pretrain.config.load import SCHEMAS, stage_of_file

    stage = stage_of_file(target)
    if stage is not None:  # a fine-tuning or add-task run: its stage's own evaluation, `pretrain.<stage>.evaluate`
        cfg = load_config(target, overrides, schema=SCHEMAS[stage])
        return import_module(f"pretrain.{stage}.evaluate").main(cfg)
    cfg = load_config(target, overrides)
    from pretrain.training.evaluate import main as evaluate_main

    return evaluate_main(cfg, random_init=args.random_init)


def _demo(args: argparse.Namespace) -> int:
    from pretrain.demo import DemoError
    from pretrain.demo import main as demo_main

    try:
        return demo_main(Path(args.out), pretrain_config=args.pretrain_config, finetune_config=args.finetune_config,
                         fast=args.fast, seed=args.seed, jobs=args.jobs)
    except DemoError as exc:
        print(f"pretrain demo: error: {exc}", file=sys.stderr)
        return EXIT_DEMO_STAGE


def _import_modsquad(args: argparse.Namespace) -> int:
    from pretrain.config.load import load_config
    from pretrain.config.pretraining import TASKS

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: must end in .safetensors")
    from safetensors.torch import save_file

    from pretrain.durable import honour_umask
    from pretrain.models import build_backbone
    from pretrain.models.modsquad import import_modsquad, parse_task_map

    try:
        task_map = parse_task_map(args.tasks, TASKS) if args.tasks else None
        vit = build_backbone(cfg.model, cfg.moe)
        report = import_modsquad(vit, args.checkpoint, task_map=task_map)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(out))
    honour_umask(out)
    print(json.dumps({"out": str(out), "ignored": len(report["ignored"]), "dropped": len(report["dropped"])}))
    return 0


def _import_mlore(args: argparse.Namespace) -> int:
    from pretrain.config.finetuning import FinetuneConfig
    from pretrain.config.load import load_config
    from pretrain.finetune.init import import_mlore_file

    cfg = load_config(args.config, args.overrides, schema=FinetuneConfig)
    try:
        print(json.dumps(import_mlore_file(cfg, args.checkpoint, args.out)))
    except ValueError as exc:  # a bad checkpoint or a config that does not describe it: one line, exit 2
        raise UserError(str(exc)) from None
    return 0


def _finetune_resume_view(cfg, run_dir: Path) -> tuple[str, ...]:
    """`pretrain finetune`'s view of its config before its drift check, for a resubmission (`cluster.submit`'s
    `view`: the core never imports the stage); `finetune.init.resume_view`, which the loop runs too."""
    from pretrain.finetune.init import resume_view

    return resume_view(cfg, run_dir)[1]


def _submit(args: argparse.Namespace) -> int:
    from pretrain.cluster.submit import submit, summary

    names = [f.name for f in fields(JobOptions)]
    opts = JobOptions(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})
    config, overrides = args.config, list(args.overrides)
    if args.subcommand == "add-task" and overrides and "=" not in overrides[0]:
        # `submit add-task MODEL CONFIG ...`, spelled as `pretrain add-task MODEL CONFIG` is: an override always has
        # a `=`, so a second word without one is CONFIG; MODEL goes last, as `pretrain add-task` passes it
        config, overrides = overrides[0], [*overrides[1:], f"add_task.model={config}"]
    view = _finetune_resume_view if args.subcommand == "finetune" else None
    try:
        run_dir, job_ids = submit(args.subcommand, config, overrides, opts, chain=args.chain,
                                  dependency=args.dependency, dry_run=args.dry_run, force=args.force,
                                  argv=sys.argv, view=view)
    except SubmitError as exc:
        raise UserError(str(exc)) from None
    if job_ids:
        print(summary(run_dir, job_ids))
    return 0


def _status(args: argparse.Namespace) -> int:
    from pretrain.cluster.status import collect, format_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{args.run_dir} is not a directory")
    marks = ("config.yaml", "checkpoints", "logs", "slurm", "metrics.jsonl")
    if not any((run_dir / mark).exists() for mark in marks):  # not "nothing written yet": nothing ever was
        raise UserError(f"{args.run_dir} is not a run directory (none of {', '.join(marks)} in it)")
    report = collect(args.run_dir)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _export(args: argparse.Namespace) -> int:
    from pretrain.extraction.export import export_run
    from pretrain.log import setup_logging

    setup_logging()
    try:
        path = export_run(args.run_dir, args.out, step=args.step, dtype=args.dtype, data_root=args.data_root)
    except PretrainError:
        raise  # typed failures keep their own exit code (a damaged checkpoint is 5, not a usage error)
    except (ValueError, RuntimeError) as exc:
        raise UserError(str(exc)) from None
    print(path)
    return 0


def _extract(args: argparse.Namespace) -> int:
    from pretrain.extraction.command import main as extract_main
    from pretrain.log import setup_logging

    setup_logging()
    rule = {"rule": args.rule, "thresh": args.thresh, "keep": args.keep, "mass": args.mass, "share": args.share,
            "calibrate": args.calibrate.split(",") if args.calibrate else None,
            "calibrate_images": args.calibrate_images, "exact_routing": args.exact_routing, "top_k": args.top_k or 0,
            "attn_top_k": args.attn_top_k or 0}  # 0 = as trained
    try:
        check_extract_args(args)
        batches = tuple(int(b) for b in args.latency_batches.split(","))
        common = {"step": args.step, "data_root": args.data_root, "eval_images": args.eval_images,
                  "latency_runs": args.latency_runs, "latency_batches": batches}
        if args.sweep:
            from pretrain.extraction.sweep import main as sweep_main
            from pretrain.extraction.sweep import parse_shares

            sweep_main(args.source, args.task.split(","), args.out, parse_shares(args.sweep), **common, **rule)
        else:
            extract_main(args.source, args.task.split(","), args.out, report=not args.no_report, heal=args.heal,
                         heal_lr=args.heal_lr, **common, **rule)
    except PretrainError:
        raise  # typed failures keep their own exit code
    except (ValueError, RuntimeError, KeyError) as exc:
        raise UserError(str(exc).strip("'\"")) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of a failure (also PRETRAIN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dense = "/".join(catalog.dense_datasets())

    p = sub.add_parser("synth", help="write the embedded corpus (raw layouts of all five datasets)")
    p.add_argument("--out", required=True, help="output folder for the raw layouts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the default dataset sizes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-synth folder in --out")
    p.set_defaults(func=_synth)

    p = sub.add_parser("prepare", help="convert a raw dataset layout into WebDataset shards")
    p.add_argument("dataset", choices=list(catalog.DATASETS))
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
                   help=f"{dense}: convert only these tasks (a missing task folder is an error otherwise)")
    p.add_argument("--keep-oversized", action="store_true",
                   help=f"{dense}: keep images larger than the pad target (reported either way)")
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

    p = sub.add_parser("add-task", help="train new tasks into a trained model; the old tasks stay bit-identical")
    p.add_argument("model", help="the trained model: a pretraining run directory or a `pretrain export` file")
    p.add_argument("config", help="YAML overlay with an add_task: section, e.g. configs/debug/add_task.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.set_defaults(func=_add_task)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded corpus, ending in a report.md")
    p.add_argument("--out", default="runs/demo", help="folder for everything the demo writes (re-runs resume)")
    p.add_argument("--pretrain-config", default="configs/debug/pretrain.yaml")
    p.add_argument("--finetune-config", default="configs/debug/finetune.yaml")
    p.add_argument("--fast", action="store_true", help="few steps per stage (a smoke test of the pipeline)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="training seed: pretraining and its random-init evaluation use N, the fine-tunings N..N+3")
    p.add_argument("--jobs", type=int, default=0, help="fine-tunings at a time (default: 2 on 2+ cores, else 1)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("evaluate", help="evaluate a run directory (its latest checkpoint) or a config")
    p.add_argument("target", help="RUN_DIR or CONFIG")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate the model at its random initialisation (a baseline; no checkpoint needed)")
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
    p = sub.add_parser("import-mlore", help="an official MLoRE checkpoint -> backbone + decoder file for "
                       "finetune.init_from")
    p.add_argument("checkpoint", help="official checkpoint.pth.tar (read weights-only) or .safetensors")
    p.add_argument("--config", required=True, help="fine-tuning config of the checkpoint's recipe, e.g. "
                   "configs/finetune/pascal_vitl_mlore.yaml")
    p.add_argument("--out", required=True, help="FILE.safetensors (backbone.* + decoder.*, kind 'dense')")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of --config, next to CHECKPOINT")
    p.set_defaults(func=_import_mlore)
    p = sub.add_parser("submit", help="submit a requeueable SLURM job (slurm/train.sbatch) for a config")
    p.add_argument("subcommand", choices=["train", "finetune", "add-task"], help="what the job runs")
    p.add_argument("config", help="YAML overlay; validated and frozen into output_dir/config.yaml (add-task: MODEL "
                   "CONFIG as `pretrain add-task` takes them, or CONFIG add_task.model=MODEL)")
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
    add_export_extract(sub, export=_export, extract=_extract)
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
