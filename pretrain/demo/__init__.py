"""Stage 4: `pretrain demo` — the whole pipeline on the embedded corpus, as the commands a user would type.

synth → prepare (five datasets) → train → evaluate (and the same model at random init) → export → extract (one
submodel per pretraining task, and `seg` calibrated on NYUD) → finetune on NYUD-v2 with MLoRE from (a) the extracted
submodel, (b) the full pretrained model, (c) random initialisation → evaluate → `report.md`.

Each stage runs one user-facing command in a subprocess (printed first, so it can be repeated by hand) and, when it
succeeds, leaves `stages/<name>.json` (command, seconds, parsed output). A re-run skips every stage whose record
exists; a killed demo resumes at the stage it was in, and the commands themselves resume (training continues from
its last checkpoint). Nothing here reaches into the package's internals: the report reads the files the commands wrote.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.durable import atomic_write

PRETRAIN_TASKS = ("cls", "det", "seg")
DENSE = ("nyud", "pascal_context")
RAW_DIRS = {"imagenet": "imagenet", "coco": "coco", "ade20k": "ade20k", "nyud": "NYUDv2",
            "pascal_context": "PASCALContext"}
INITS = {"extracted": "extract/seg_nyud.safetensors", "pretrained": "model.safetensors", "random": ""}


@dataclass
class Stage:
    """One command of the pipeline. `name` names its record; `parse` turns its stdout into the record's data."""

    name: str
    argv: list[str]
    weight: float = 1.0  # expected share of the demo's time (for the overall ETA)
    parse: str = ""  # "json_last_line": the command prints one JSON object last
    env: dict[str, str] = field(default_factory=dict)


def pipeline(out: Path, *, pretrain_config: str, finetune_config: str, fast: bool) -> list[Stage]:
    """Every stage in order (paths inside `out`)."""
    p = [sys.executable, "-m", "pretrain"]
    shards, raw = out / "shards", out / "raw"
    # no --overwrite: synth then regenerates only the folders it wrote itself (its marker file) and refuses a
    # user's folder under raw/ before writing anything; prepare's --overwrite only ever replaces shards
    stages = [Stage("synth", [*p, "synth", "--out", str(raw), *(["--scale", "0.4"] if fast else [])], 1.0)]
    for dataset, folder in RAW_DIRS.items():  # 4 shards per split, as the debug config's reference run used
        for split in ("train", "val"):
            stages.append(Stage(f"prepare_{dataset}_{split}", [
                *p, "prepare", dataset, "--src", str(raw / folder), "--out", str(shards / dataset / split),
                "--split", split, "--overwrite", "--min-shards", "4"], 0.3))
    # --fast checks that every stage runs and the report fills (the demo test): few steps, 16 images per evaluation
    quick = ["train.max_steps=40", "train.ckpt_every=20"] if fast else []
    few = ["eval.max_samples=16"] if fast else []
    run = out / "pretrain"
    stages += [
        Stage("train", [*p, "train", pretrain_config, f"data.root={shards}", f"output_dir={run}", *quick], 12.0),
        Stage("evaluate", [*p, "evaluate", str(run), *few], 1.0, "json_last_line"),
        Stage("evaluate_random", [*p, "evaluate", pretrain_config, f"data.root={shards}",
                                  f"output_dir={out / 'random_init'}", *few, "--random-init"], 1.0, "json_last_line"),
        Stage("export", [*p, "export", str(run), "--out", str(out / "model.safetensors")], 0.5),
    ]
    # the report's metric on 32 val images and latency at batch 1 and 8 keep each extraction under a minute
    report = ["--data-root", str(shards), "--eval-images", "32", "--latency-runs", "3", "--latency-batches", "1,8"]
    if fast:
        report = ["--data-root", str(shards), "--eval-images", "8", "--latency-runs", "1", "--latency-batches", "1"]
    for task in PRETRAIN_TASKS:
        stages.append(Stage(f"extract_{task}", [*p, "extract", str(out / "model.safetensors"), "--task", task,
                                                "--out", str(out / "extract" / f"{task}.safetensors"), *report], 1.5))
    stages.append(Stage("extract_seg_nyud", [*p, "extract", str(out / "model.safetensors"), "--task", "seg",
                                             "--calibrate", str(shards / "nyud" / "train"),
                                             "--out", str(out / INITS["extracted"]), *report], 1.5))
    stages += smaller_submodels(out, report, fast)
    ft_quick = ["train.max_steps=10", "train.ckpt_every=5", "train.eval_every=0", *few] if fast else []
    for init, source in INITS.items():
        ft = out / "finetune" / init
        init_arg = [f"finetune.init_from={out / source}"] if source else []  # the config's default: random init
        stages.append(Stage(f"finetune_{init}", [*p, "finetune", finetune_config, f"data.root={shards}",
                                                 f"output_dir={ft}", *init_arg, *ft_quick], 6.0))
        stages.append(Stage(f"evaluate_finetune_{init}", [*p, "evaluate", str(ft)], 0.5, "json_last_line"))
    return stages


def smaller_submodels(out: Path, report: list[str], fast: bool) -> list[Stage]:
    """seg's size/accuracy curve and half its experts healed by distillation; cls with one MLP expert per token
    (healed): what a user trades for a smaller or faster submodel, with batch-32 latency for throughput."""
    p, model, folder = [sys.executable, "-m", "pretrain"], str(out / "model.safetensors"), out / "extract" / "smaller"
    latency = ["--latency-batches", "1" if fast else "1,32"]
    heal = ["--heal", "2" if fast else "40"]
    return [
        Stage("extract_seg_sweep", [*p, "extract", model, "--task", "seg", "--sweep", "0.25,0.5,0.75",
                                    "--out", str(folder / "seg.safetensors"), *report, *latency], 2.0),
        Stage("extract_seg_half_healed", [*p, "extract", model, "--task", "seg", "--rule", "share", "--share", "0.5",
                                          *heal, "--out", str(folder / "seg_half_healed.safetensors"), *report,
                                          *latency], 2.0),
        # cls: its cost is the backbone's (seg's is mostly its FPN decoder, which top-k does not touch)
        Stage("extract_cls_top1_healed", [*p, "extract", model, "--task", "cls", "--top-k", "1", *heal,
                                          "--out", str(folder / "cls_top1_healed.safetensors"), *report, *latency,
                                          *([] if fast else ["--eval-images", "100"])], 2.0),
    ]


def run_stage(stage: Stage, records: Path, index: int, total: int, eta: float | None) -> dict:
    """Run one stage (skipped when its record exists); returns its record."""
    record_path = records / f"{stage.name}.json"
    if record_path.is_file():
        print(f"[{index}/{total}] {stage.name}: done earlier, skipped", flush=True)
        return json.loads(record_path.read_text())
    eta_text = f", demo ETA {eta / 60:.1f} min" if eta is not None else ""
    print(f"[{index}/{total}] {stage.name}{eta_text}\n  $ {shlex.join(stage.argv)}", flush=True)
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **stage.env}
    proc = subprocess.run(stage.argv, env=env, stdout=subprocess.PIPE, text=True)  # stderr (progress bars) shows
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise DemoError(f"stage {stage.name} failed (exit {proc.returncode}); re-run `pretrain demo` to resume "
                        f"from it, or run the command above by hand to see the problem")
    record = {"name": stage.name, "command": shlex.join(stage.argv), "seconds": round(time.monotonic() - start, 1)}
    if stage.parse == "json_last_line":
        record["output"] = json.loads(proc.stdout.strip().splitlines()[-1])
    atomic_write(record_path, json.dumps(record, indent=1))
    return record


class DemoError(RuntimeError):
    """A stage failed: one line naming it (exit code 4)."""


def main(out: Path, *, pretrain_config: str, finetune_config: str, fast: bool = False) -> int:
    from pretrain.config import load_config
    from pretrain.demo.report import write_report
    from pretrain.finetune.config import FinetuneConfig

    # a wrong config is one line and exit 2 now, not after minutes of data stages
    load_config(pretrain_config)
    load_config(finetune_config, schema=FinetuneConfig)
    out.mkdir(parents=True, exist_ok=True)
    records = out / "stages"
    records.mkdir(exist_ok=True)
    stages = pipeline(out, pretrain_config=pretrain_config, finetune_config=finetune_config, fast=fast)
    done, spent, weight_done = {}, 0.0, 0.0
    total_weight = sum(s.weight for s in stages)
    for i, stage in enumerate(stages, 1):
        eta = spent / weight_done * (total_weight - weight_done) if weight_done else None
        done[stage.name] = run_stage(stage, records, i, len(stages), eta)
        spent += done[stage.name]["seconds"]
        weight_done += stage.weight
    report = write_report(out, done)
    print(f"report: {report}")
    return 0
