"""`pretrain demo`'s pipeline without running it: `--seed N` reaches every training stage (pretraining N, fine-tunings
N and N+1), a folder run with another seed is refused, and the ETA's arithmetic over the stage weights is right
within 25% from the second stage on for the measured reference run (the weights before were up to 2.4× off)."""

import json

import pytest

from pretrain.demo import SECONDS, check_seeds, pipeline
from pretrain.demo.eta import eta_seconds, etas, format_eta
from pretrain.errors import UsageError

# seconds per stage of the reference run (`pretrain demo --out /tmp/demo2`, 2026-12-07 04:22 UTC, idle 2-vCPU AMD
# EPYC; benchmarks/RESULTS.md), in its order: the pipeline of that day (one seed, no smaller-submodel stages)
REFERENCE_RUN = {
    "synth": 7.0, "prepare_imagenet_train": 2.8, "prepare_imagenet_val": 2.6, "prepare_coco_train": 2.9,
    "prepare_coco_val": 3.0, "prepare_ade20k_train": 3.0, "prepare_ade20k_val": 2.7, "prepare_nyud_train": 3.0,
    "prepare_nyud_val": 3.0, "prepare_pascal_context_train": 2.9, "prepare_pascal_context_val": 2.7,
    "train": 245.4, "evaluate": 10.6, "evaluate_random": 13.3, "export": 5.8, "extract_cls": 7.2, "extract_det": 14.0,
    "extract_seg": 7.8, "extract_seg_nyud": 8.4,
    "finetune_extracted": 36.2, "evaluate_finetune_extracted": 10.6, "finetune_pretrained": 37.0,
    "evaluate_finetune_pretrained": 9.5, "finetune_random": 36.5, "evaluate_finetune_random": 10.2,
}
OLD_WEIGHTS = {"synth": 1.0, "prepare": 0.3, "train": 12.0, "evaluate": 1.0, "evaluate_random": 1.0, "export": 0.5,
               "extract": 1.5, "finetune": 6.0, "evaluate_finetune": 0.5}  # before issue 24


def _kind(name: str) -> str:
    for prefix in ("prepare", "evaluate_finetune", "finetune"):
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
        assert str(tmp_path / "finetune" / name.removeprefix("finetune_")) in stages[f"evaluate_{name}"].argv[-1]
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
    assert "~8 min on the reference machine" in format_eta(None, sum(weights))
    assert format_eta(270.0, 0.0) == ", demo ETA 4.5 min"


def test_eta_within_a_quarter_on_the_reference_run():
    seconds = list(REFERENCE_RUN.values())
    new = _errors([SECONDS[_kind(n)] for n in REFERENCE_RUN], seconds)
    assert max(abs(e) for e in new) < 0.25, new
    old = _errors([OLD_WEIGHTS[_kind(n).split("_")[0] if n.startswith("extract") else _kind(n)]
                   for n in REFERENCE_RUN], seconds)
    assert old[0] < -0.35 and max(old) > 1.3  # the weights before: 37% low at stage 2, 2.4× high after training
