"""`pretrain demo`'s pipeline without running it: `--seed N` reaches every training stage (pretraining N, fine-tunings
N and N+1), a folder run with another seed is refused, and the ETA's arithmetic over the stage weights is right
within 25% from the second stage on for the measured reference run (the weights before were up to 2.4× off)."""

import json
import sys
from pathlib import Path

import pytest

from pretrain.demo import SECONDS, check_seeds, pipeline
from pretrain.demo.eta import eta_seconds, etas, format_eta
from pretrain.errors import UsageError

# seconds per stage of the reference run (`pretrain demo --out /tmp/demo_n2 --seed 2`, 2026-12-07 15:58 UTC, idle
# 2-vCPU AMD EPYC; benchmarks/RESULTS.md), in its order: 11.0 min of stages
REFERENCE_RUN = {
    "synth": 5.7, "prepare_imagenet_train": 2.9, "prepare_imagenet_val": 2.7, "prepare_coco_train": 2.6,
    "prepare_coco_val": 2.4, "prepare_ade20k_train": 2.5, "prepare_ade20k_val": 3.0, "prepare_nyud_train": 2.5,
    "prepare_nyud_val": 2.6, "prepare_pascal_context_train": 2.6, "prepare_pascal_context_val": 2.4, "train": 138.9,
    "evaluate": 10.3, "evaluate_random": 13.0, "export": 6.1, "extract_cls": 7.2, "extract_det": 14.7,
    "extract_seg": 6.9, "extract_seg_nyud": 7.7, "extract_seg_sweep": 17.0, "extract_seg_half_healed": 19.6,
    "extract_cls_top1_healed": 17.4, "finetune_extracted_s2": 63.8, "finetune_pretrained_s2": 60.4,
    "finetune_random_s2": 71.0, "finetune_extracted_s3": 56.0, "finetune_pretrained_s3": 55.0,
    "finetune_random_s3": 65.2,
}
OLD_WEIGHTS = {"synth": 1.0, "prepare": 0.3, "train": 12.0, "evaluate": 1.0, "evaluate_random": 1.0, "export": 0.5,
               "extract": 1.5, "finetune": 6.0, "evaluate_finetune": 0.5}  # before issue 24


def _kind(name: str) -> str:
    for prefix in ("prepare", "finetune"):
        if name.startswith(prefix + "_"):
            return prefix
    return name


def _errors(weights: list[float], seconds: list[float]) -> list[float]:
    """Relative error of the ETA printed before each stage from the second on, against the time that was left."""
    left = [sum(seconds[i:]) for i in range(len(seconds))]
    return [eta / truth - 1 for eta, truth in zip(etas(weights, seconds)[1:], left[1:])]


def test_seed_reaches_every_training_stage(tmp_path):
    stages = {s.name: s for s in pipeline(tmp_path, pretrain_config="p.yaml", finetune_config="f.yaml", fast=False,
                                          seed=3)}
    assert "seed=3" in stages["train"].argv and "seed=3" in stages["evaluate_random"].argv
    finetunes = [name for name in stages if name.startswith("finetune_")]
    assert finetunes == [f"finetune_{init}_s{s}" for s in (3, 4) for init in ("extracted", "pretrained", "random")]
    for name in finetunes:
        seed = int(name.rsplit("_s", 1)[1])
        assert f"seed={seed}" in stages[name].argv and stages[name].seed == seed
        assert stages[name].run_dir == tmp_path / "finetune" / name.removeprefix("finetune_")
        assert f"output_dir={stages[name].run_dir}" in stages[name].argv and stages[name].parse == "final_eval"
    assert stages["synth"].seed is None and "--seed" not in stages["synth"].argv  # the corpus is fixed
    assert all(s.weight == SECONDS[_kind(s.name)] for s in stages.values())  # every stage has its measured seconds


def test_a_folder_of_another_seed_is_refused(tmp_path):
    stages = pipeline(tmp_path, pretrain_config="p.yaml", finetune_config="f.yaml", fast=True, seed=1)
    (tmp_path / "synth.json").write_text(json.dumps({"name": "synth", "seconds": 1.0}))
    check_seeds(stages, tmp_path)  # a stage without a seed never conflicts
    (tmp_path / "train.json").write_text(json.dumps({"name": "train", "seconds": 1.0}))  # before --seed: seed 0
    with pytest.raises(UsageError, match="ran with seed 0, this demo's stage train needs seed 1"):
        check_seeds(stages, tmp_path)
    (tmp_path / "train.json").write_text(json.dumps({"name": "train", "seconds": 1.0, "seed": 1}))
    check_seeds(stages, tmp_path)


def test_eta_arithmetic():
    assert eta_seconds(0.0, 0.0, 100.0) is None  # before the first stage: no pace yet
    assert etas([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == [None, 2.0 / 1.0 * 5.0, 6.0 / 3.0 * 3.0]
    # a machine uniformly 1.7× slower than the reference: right from the second stage on
    weights = list(REFERENCE_RUN.values())
    assert _errors(weights, [1.7 * w for w in weights]) == pytest.approx([0.0] * (len(weights) - 1))
    assert "~11 min on the reference machine" in format_eta(None, sum(weights))
    assert format_eta(270.0, 0.0) == ", demo ETA 4.5 min"


def test_eta_within_a_quarter_on_the_reference_run():
    seconds = list(REFERENCE_RUN.values())
    new = _errors([SECONDS[_kind(n)] for n in REFERENCE_RUN], seconds)
    assert max(abs(e) for e in new) < 0.25, new
    old = _errors([OLD_WEIGHTS[_kind(n).split("_")[0] if n.startswith("extract") else _kind(n)]
                   for n in REFERENCE_RUN], seconds)
    assert max(abs(e) for e in old) > 0.25  # the weights before issue 24 miss the target on the same run


def test_a_bad_seed_is_refused_before_any_stage(tmp_path):
    from pretrain.config.pretraining import ConfigError
    from pretrain.demo import main

    root = Path(__file__).resolve().parents[1] / "configs" / "debug"
    for seed in (-1, 2**32 - 1):  # the fine-tunings also run at seed + 1
        with pytest.raises(ConfigError, match="seed="):
            main(tmp_path / "demo", pretrain_config=str(root / "pretrain.yaml"),
                 finetune_config=str(root / "finetune.yaml"), seed=seed)
    assert not (tmp_path / "demo").exists()  # nothing was started


def test_a_finetuning_record_holds_its_last_evaluation(tmp_path):
    """The report reads each fine-tuning's evaluation at its last step from the run's metrics.jsonl (what
    `pretrain evaluate RUN` prints, rounded alike); a run that never evaluated is a stage failure, not an empty row."""
    from pretrain.demo import DemoError, Stage, final_eval, run_stage

    run_dir = tmp_path / "ft"
    run_dir.mkdir()
    lines = [{"step": 1, "loss/total": 2.0}, {"step": 2, "eval/semseg/mIoU": 1.0},
             {"step": 4, "loss/total": 1.5}, {"step": 4, "eval/semseg/mIoU": 3.123456, "eval/depth/rmse": 0.5}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "ev')
    assert final_eval(run_dir) == {"step": 4, "eval/semseg/mIoU": 3.1235, "eval/depth/rmse": 0.5}
    records = tmp_path / "stages"
    records.mkdir()
    stage = Stage("finetune_random_s0", [sys.executable, "-c", "pass"], parse="final_eval", seed=0, run_dir=run_dir)
    record = run_stage(stage, records, 1, 1, "")
    assert record["output"]["eval/semseg/mIoU"] == 3.1235 and record["seed"] == 0
    # a record from before fine-tuning records held the evaluation gets it when the demo is resumed
    (records / "finetune_random_s0.json").write_text(json.dumps({"name": "finetune_random_s0", "seconds": 1.0}))
    assert run_stage(stage, records, 1, 1, "")["output"]["step"] == 4
    assert "output" in json.loads((records / "finetune_random_s0.json").read_text())
    assert "start" not in record  # no evaluation at step 0
    at_start = [{"step": 0, "eval/semseg/mIoU": 0.51234}, *lines]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in at_start))
    (records / "finetune_random_s0.json").unlink()
    assert run_stage(stage, records, 1, 1, "")["start"] == {"step": 0, "eval/semseg/mIoU": 0.5123}
    (run_dir / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(DemoError, match="no evaluation record"):
        final_eval(run_dir)
