"""Stage 4: `pretrain demo` — the whole pipeline on the embedded corpus, as the commands a user would type.

synth → prepare (five datasets) → train → evaluate (and the same model at random init) → export → extract (one
submodel per pretraining task, and `seg` calibrated on NYUD) → finetune on NYUD-v2 with MLoRE from (a) the extracted
submodel, (b) the full pretrained model, (c) random initialisation, each with seeds N … N+3 (each fine-tuning
evaluates at its last step: the record takes that evaluation from the run's metrics.jsonl, which is what
`pretrain evaluate` of the run would print) → `report.md` + `report.json` (the fine-tuning verdict from the four
seeds: `verdict.py`).

`--seed N` is every training seed of the run: the pretraining run and its random-init evaluation (`seed=N`) and the
fine-tunings (`seed=N` … `seed=N+3`). The corpus does not follow it: it stands in for fixed public datasets, so two
seeds compare training randomness on the same data.

The twelve fine-tunings run `--jobs` at a time (default: 2 on a machine with 2 or more cores), each on cores / jobs
threads: this small model's step does not scale from one thread to two (a fine-tuning took 55-71 s on 2 threads
alone and 53-76 s on 1 thread beside another, 2-vCPU AMD EPYC), so two at a time do the work of four seeds in the
time two took. A parallel stage's progress output goes to `stages/<name>.log` instead of the terminal.

Each stage runs one user-facing command in a subprocess (printed first, so it can be repeated by hand) and, when it
succeeds, leaves `stages/<name>.json` (command, seconds, the seed it ran with, parsed output). A re-run skips every
stage whose record exists (and refuses a folder whose records name another seed); a killed demo resumes at the
stage it was in, and the commands themselves resume (training continues from its last checkpoint). Nothing here
reaches into the package's internals: the report reads the files the commands wrote.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.catalog import DATASETS, dense_datasets
from pretrain.demo.eta import Progress
from pretrain.durable import atomic_write
from pretrain.errors import UsageError

PRETRAIN_TASKS = ("cls", "det", "seg")
DENSE = tuple(dense_datasets())
RAW_DIRS = {name: d.folder for name, d in DATASETS.items()}  # what `pretrain synth` writes, the catalog's
INITS = {"extracted": "extract/seg_nyud.safetensors", "pretrained": "model.safetensors", "random": ""}
FINETUNE_SEEDS = 4  # per initialisation (verdict.py: with two the extracted verdict flipped between demo seeds)
FAST_FINETUNE_SEEDS = 2  # --fast (the demo test): the fewest the verdict takes
REFERENCE_JOBS = 2  # fine-tunings at a time in the reference run: a fine-tuning's weight is its share of the wall
# Stage weights: each stage's seconds in the reference run (`pretrain demo --seed 0`, 2026-12-07 20:33 UTC, the idle
# 2-vCPU AMD EPYC dev machine: benchmarks/RESULTS.md, "pretrain demo with the 0.67-1.5 scale range"); the ETA scales
# what is left by the pace so far (eta.py). A fine-tuning's weight is its seconds / REFERENCE_JOBS: its share of the
# wall when two run at once. The guessed weights before issue 24 (prepare 0.3, train 12, finetune 6) put a
# fine-tuning at half the training's time (it takes 0.15×): on that run the ETA read 37% low at stage 2 and 2.4×
# high after training.
SECONDS = {"synth": 6.4, "prepare": 2.8, "train": 133.2, "evaluate": 10.9, "evaluate_random": 14.2, "export": 6.3,
           "extract_cls": 7.0, "extract_det": 13.9, "extract_seg": 7.8, "extract_seg_nyud": 8.3,
           "extract_seg_sweep": 16.0, "extract_seg_half_healed": 18.5, "extract_cls_top1_healed": 16.9,
           "finetune": 58.0}  # 635 s in all (10.6 min)
# (a fine-tuning took 55.5 s on average there, 64.9 s in the seed-4 run after it: 58 keeps the ETA replayed on both
# runs' timelines within 21% and 24%; tests/test_demo_pipeline.py)


@dataclass
class Stage:
    """One command of the pipeline. `name` names its record; `parse` turns its stdout into the record's data."""

    name: str
    argv: list[str]
    weight: float = 1.0  # its seconds on the reference machine (eta.py): the demo's ETA scales them by the pace so far
    parse: str = ""  # "json_last_line": the command prints one JSON object last; "final_eval": see `final_eval`
    env: dict[str, str] = field(default_factory=dict)
    seed: int | None = None  # the training seed the stage runs with (recorded; None: the stage takes none)
    parallel: bool = False  # may run beside its parallel neighbours (the fine-tunings: they read, never write, shared
    # files)
    run_dir: Path | None = None  # "final_eval": the run directory the command writes


def pipeline(out: Path, *, pretrain_config: str, finetune_config: str, fast: bool, seed: int = 0) -> list[Stage]:
    """Every stage in order (paths inside `out`); `seed`: the run's training seed (module doc)."""
    p, s = [sys.executable, "-m", "pretrain"], SECONDS
    shards, raw = out / "shards", out / "raw"
    # no --overwrite: synth then regenerates only the folders it wrote itself (its marker file) and refuses a
    # user's folder under raw/ before writing anything; prepare's --overwrite only ever replaces shards
    stages = [Stage("synth", [*p, "synth", "--out", str(raw), *(["--scale", "0.4"] if fast else [])], s["synth"])]
    for dataset, folder in RAW_DIRS.items():  # 4 shards per split, as the debug config's reference run used
        for split in ("train", "val"):
            stages.append(Stage(f"prepare_{dataset}_{split}", [
                *p, "prepare", dataset, "--src", str(raw / folder), "--out", str(shards / dataset / split),
                "--split", split, "--overwrite", "--min-shards", "4"], s["prepare"]))
    # --fast checks that every stage runs and the report fills (the demo test): few steps, 16 images per evaluation
    quick = ["train.max_steps=40", "train.ckpt_every=20"] if fast else []
    few = ["eval.max_samples=16"] if fast else []
    run = out / "pretrain"
    stages += [
        Stage("train", [*p, "train", pretrain_config, f"data.root={shards}", f"output_dir={run}", f"seed={seed}",
                        *quick], s["train"], seed=seed),
        Stage("evaluate", [*p, "evaluate", str(run), *few], s["evaluate"], "json_last_line", seed=seed),
        # the same seed: the weights `pretrain train` started from
        Stage("evaluate_random", [*p, "evaluate", pretrain_config, f"data.root={shards}", f"seed={seed}",
                                  f"output_dir={out / 'random_init'}", *few, "--random-init"], s["evaluate_random"],
              "json_last_line", seed=seed),
        Stage("export", [*p, "export", str(run), "--out", str(out / "model.safetensors")], s["export"]),
    ]
    # the report's metric on 32 val images and latency at batch 1 and 8 keep each extraction under a minute
    report = ["--data-root", str(shards), "--eval-images", "32", "--latency-runs", "3", "--latency-batches", "1,8"]
    if fast:
        report = ["--data-root", str(shards), "--eval-images", "8", "--latency-runs", "1", "--latency-batches", "1"]
    for task in PRETRAIN_TASKS:
        stages.append(Stage(f"extract_{task}", [*p, "extract", str(out / "model.safetensors"), "--task", task,
                                                "--out", str(out / "extract" / f"{task}.safetensors"), *report],
                            s[f"extract_{task}"]))
    stages.append(Stage("extract_seg_nyud", [*p, "extract", str(out / "model.safetensors"), "--task", "seg",
                                             "--calibrate", str(shards / "nyud" / "train"),
                                             "--out", str(out / INITS["extracted"]), *report], s["extract_seg_nyud"]))
    stages += smaller_submodels(out, report, fast)
    return stages + finetunings(out, finetune_config, fast=fast, seeds=finetune_seeds(seed, fast))


def finetune_seeds(seed: int, fast: bool) -> tuple[int, ...]:
    """The fine-tunings' seeds of a demo run with `--seed seed`: N … N+3 (--fast: N, N+1)."""
    return tuple(range(seed, seed + (FAST_FINETUNE_SEEDS if fast else FINETUNE_SEEDS)))


def finetunings(out: Path, finetune_config: str, *, fast: bool, seeds: tuple[int, ...]) -> list[Stage]:
    """Every initialisation fine-tuned once per seed (`finetune_<init>_s<seed>`, its record holding the evaluation at
    the last step): the seeds give the report its spread. Seed-major order, so the first seed's three runs are
    comparable as soon as they are done."""
    p, shards = [sys.executable, "-m", "pretrain"], out / "shards"
    quick = ["train.max_steps=10", "train.ckpt_every=5", "train.eval_every=0", "eval.max_samples=16"] if fast else []
    stages = []
    for seed in seeds:
        for init, source in INITS.items():
            ft, name = out / "finetune" / f"{init}_s{seed}", f"{init}_s{seed}"
            init_arg = [f"finetune.init_from={out / source}"] if source else []  # the config's default: random init
            # the first random-init run also evaluates before its first step: the report's "step 0" column, what
            # every fine-tuning must clearly beat (one is enough: at step 0 every decoder is an untrained one)
            start = ["eval.at_start=true"] if init == "random" and seed == seeds[0] else []
            stages.append(Stage(f"finetune_{name}", [*p, "finetune", finetune_config, f"data.root={shards}",
                                                     f"output_dir={ft}", f"seed={seed}", *init_arg, *quick, *start],
                                SECONDS["finetune"] / REFERENCE_JOBS, "final_eval", seed=seed, run_dir=ft,
                                parallel=True))
    return stages


def smaller_submodels(out: Path, report: list[str], fast: bool) -> list[Stage]:
    """seg's size/accuracy curve and half its experts healed by distillation; cls with one MLP expert per token
    (healed): what a user trades for a smaller or faster submodel, with batch-32 latency for throughput."""
    p, model, folder = [sys.executable, "-m", "pretrain"], str(out / "model.safetensors"), out / "extract" / "smaller"
    s = SECONDS
    latency = ["--latency-batches", "1" if fast else "1,32"]
    heal = ["--heal", "2" if fast else "40"]
    return [
        Stage("extract_seg_sweep", [*p, "extract", model, "--task", "seg", "--sweep", "0.25,0.5,0.75",
                                    "--out", str(folder / "seg.safetensors"), *report, *latency],
              s["extract_seg_sweep"]),
        Stage("extract_seg_half_healed", [*p, "extract", model, "--task", "seg", "--rule", "share", "--share", "0.5",
                                          *heal, "--out", str(folder / "seg_half_healed.safetensors"), *report,
                                          *latency], s["extract_seg_half_healed"]),
        # cls: its cost is the backbone's (seg's is mostly its FPN decoder, which top-k does not touch)
        Stage("extract_cls_top1_healed", [*p, "extract", model, "--task", "cls", "--top-k", "1", *heal,
                                          "--out", str(folder / "cls_top1_healed.safetensors"), *report, *latency,
                                          *([] if fast else ["--eval-images", "100"])], s["extract_cls_top1_healed"]),
    ]


def _evals(run_dir: Path) -> list[dict]:
    from pretrain.log import read_metrics

    path = run_dir / "metrics.jsonl"
    return [r for r in read_metrics(path) if any(k.startswith("eval/") for k in r)] if path.is_file() else []


def _rounded(record: dict) -> dict:
    """`{"step", "eval/...": value}`, rounded as `pretrain evaluate` prints them."""
    return {"step": record["step"], **{k: round(v, 4) for k, v in record.items() if k.startswith("eval/")}}


def eval_record(run_dir: Path) -> dict:
    """A fine-tuning stage's record data from one read of `run_dir/metrics.jsonl`: `output`, the evaluation it ran at
    its last step, and `start`, the one before its first step (`eval.at_start`) when it made one."""
    evals = _evals(run_dir)
    if not evals:
        raise DemoError(f"{run_dir / 'metrics.jsonl'}: no evaluation record; the stage's command ended without "
                        "evaluating")
    start = {"start": _rounded(evals[0])} if evals[0]["step"] == 0 and len(evals) > 1 else {}
    return {"output": _rounded(evals[-1]), **start}


def final_eval(run_dir: Path) -> dict:
    """The evaluation a training command ran at its last step (`eval_record`'s `output`)."""
    return eval_record(run_dir)["output"]


def run_stage(stage: Stage, records: Path, index: int, total: int, eta_text: str) -> dict:
    """Run one stage (skipped when its record exists); returns its record. A parallel stage's stderr goes to
    `records/<name>.log` (two progress bars would interleave), its tail printed when the stage fails."""
    record_path = records / f"{stage.name}.json"
    if record_path.is_file():
        print(f"[{index}/{total}] {stage.name}: done earlier, skipped", flush=True)
        record = json.loads(record_path.read_text())
        if stage.parse == "final_eval" and "output" not in record:  # a record written before fine-tunings held it
            record.update(eval_record(stage.run_dir))
            atomic_write(record_path, json.dumps(record, indent=1))
        return record
    print(f"[{index}/{total}] {stage.name}{eta_text}\n  $ {shlex.join(stage.argv)}", flush=True)
    start, started = time.monotonic(), time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **stage.env}
    log = records / f"{stage.name}.log"
    # a stage alone keeps stderr on the terminal (None): its progress bars show there
    with open(log, "w") if stage.parallel else nullcontext() as stderr:
        proc = subprocess.run(stage.argv, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:]) if stage.parallel else ""
        raise DemoError(f"stage {stage.name} failed (exit {proc.returncode}); re-run `pretrain demo` to resume "
                        f"from it, or run the command above by hand to see the problem"
                        + (f"; the end of {log}:\n{tail}" if tail else ""))
    record = {"name": stage.name, "command": shlex.join(stage.argv), "seconds": round(time.monotonic() - start, 1),
              "started": round(started, 1), "ended": round(time.time(), 1)}
    if stage.seed is not None:
        record["seed"] = stage.seed
    if stage.parse == "json_last_line":
        record["output"] = json.loads(proc.stdout.strip().splitlines()[-1])
    elif stage.parse == "final_eval":
        record.update(eval_record(stage.run_dir))
    atomic_write(record_path, json.dumps(record, indent=1))
    return record


def run_all(stages: list[Stage], records: Path, jobs: int) -> dict[str, dict]:
    """Run every stage in order; consecutive parallel stages `jobs` at a time, each on cores / jobs threads.
    Returns {name: record} in pipeline order."""
    progress, done = Progress(sum(s.weight for s in stages), jobs), {}
    threads = str(max(1, (os.cpu_count() or 1) // jobs))

    def one(i: int, stage: Stage) -> dict:
        ran = not (records / f"{stage.name}.json").is_file()
        if stage.parallel and jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            stage.env.setdefault("OMP_NUM_THREADS", threads)
        eta = progress.eta_text()
        progress.started(stage.name, stage.weight)
        record = run_stage(stage, records, i, len(stages), eta)
        progress.finished(stage.name, record["seconds"], ran, stage.parallel)
        return record

    i = 0
    while i < len(stages):
        group = [stages[i]]
        while stages[i].parallel and i + len(group) < len(stages) and stages[i + len(group)].parallel:
            group.append(stages[i + len(group)])
        with ThreadPoolExecutor(max_workers=jobs if len(group) > 1 else 1) as pool:
            futures = [pool.submit(one, i + k + 1, stage) for k, stage in enumerate(group)]
            try:
                for stage, future in zip(group, futures, strict=True):
                    done[stage.name] = future.result()
            except BaseException:  # the first failure: stages not started yet never start, running ones finish
                for future in futures:
                    future.cancel()
                raise
        i += len(group)
    return done


def default_jobs() -> int:
    """Fine-tunings at a time: two on a machine with two or more cores (module doc), else one."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


class DemoError(RuntimeError):
    """A stage failed: one line naming it (exit code 4)."""


def check_seeds(stages: list[Stage], records: Path) -> None:
    """Refuse, before any stage runs, a folder whose records ran with another seed: skipping them would mix two
    seeds in one report. A record from before `--seed` ran with the configs' default, 0."""
    for stage in stages:
        path = records / f"{stage.name}.json"
        if stage.seed is not None and path.is_file():
            seed = json.loads(path.read_text()).get("seed", 0)
            if seed != stage.seed:
                raise UsageError(f"{path} ran with seed {seed}, this demo's stage {stage.name} needs seed "
                                 f"{stage.seed}: one folder holds one --seed, use another --out")


def main(out: Path, *, pretrain_config: str, finetune_config: str, fast: bool = False, seed: int = 0,
         jobs: int = 0) -> int:
    """Run (or resume) the demo in `out`; `jobs`: fine-tunings at a time (0: `default_jobs()`)."""
    from pretrain.config.finetuning import FinetuneConfig
    from pretrain.config.load import load_config
    from pretrain.demo.report import write_report

    # a wrong config or seed is one line and exit 2 now, not after minutes of data stages (N+3: the last seed)
    if jobs < 0:
        raise UsageError(f"--jobs {jobs}: must be >= 1 (or 0: the default)")
    load_config(pretrain_config, [f"seed={seed}"])
    load_config(finetune_config, [f"seed={finetune_seeds(seed, fast)[-1]}"], schema=FinetuneConfig)
    out.mkdir(parents=True, exist_ok=True)
    records = out / "stages"
    records.mkdir(exist_ok=True)
    stages = pipeline(out, pretrain_config=pretrain_config, finetune_config=finetune_config, fast=fast, seed=seed)
    check_seeds(stages, records)
    done = run_all(stages, records, jobs or default_jobs())
    report = write_report(out, done)
    print(f"report: {report}")
    return 0
