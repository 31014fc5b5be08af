"""The demo report's tables come from the files the commands wrote: the smaller-submodel table reads each extract
report (experts kept, top-k, ratios, the metric before and after healing) without recomputing anything; the
fine-tuning verdict of report.md and report.json follows from the per-seed numbers they state (verdict.py's rule)."""

import json

import pytest

from pretrain.demo.report import _smaller_section, _wall_seconds, write_report
from pretrain.demo.verdict import RULE, decide, mean_spread


def _report(*, kept: int, top_k: int, heal_before: float, after: float) -> dict:
    return {"tasks": ["cls"],
            "experts_kept": {"blocks.1.mlp": {"kept": list(range(kept)), "of": 8},
                             "blocks.3.mlp": {"kept": list(range(kept)), "of": 8}},
            "top_k": {"blocks.1.mlp": {"full": 2, "sub": top_k}, "blocks.3.mlp": {"full": 2, "sub": top_k}},
            "params": {"full": {"moe_layers": 1000, "total": 4000}, "sub": {"moe_layers": 250, "total": 2000}},
            "flops_per_image": {"cls": {"full": 100.0, "sub": 80.0}},
            "latency_ms": {"cls": {"batch1": {"full": 2.0, "sub": 1.9, "paired_ratio": 0.95},
                                   "batch32": {"full": 40.0, "sub": 30.0, "paired_ratio": 0.75}}},
            "metrics": {"cls": {"full": {"top1": 34.0, "top5": 80.0}, "sub": {"top1": after, "top5": 79.0}}},
            "heal": {"steps": 40, "metric_before": {"cls": {"top1": heal_before, "top5": 70.0}}}}


def test_smaller_section_reads_the_extract_reports(tmp_path):
    assert _smaller_section(tmp_path) == []  # a demo from before these stages: no section
    folder = tmp_path / "extract" / "smaller"
    folder.mkdir(parents=True)
    (folder / "cls_top1_healed.report.json").write_text(json.dumps(_report(kept=2, top_k=1, heal_before=30.0,
                                                                              after=33.0)))
    (folder / "seg.sweep.md").write_text("| share | experts kept |\n|---|---|\n| 0.5 | 16/32 |\n")
    text = "\n".join(_smaller_section(tmp_path))
    assert "| 0.5 | 16/32 |" in text and "extract/smaller/seg.sweep.png" in text
    row = next(line for line in text.splitlines() if line.startswith("| cls_top1_healed"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["cls_top1_healed", "4/16", "1/1", "0.25×", "0.80×", "0.75× (32)", "top1 34.00", "30.00", "33.00"]


# --- the fine-tuning verdict follows from the report's own numbers (issue 24) ---------------------------------------

# random init, seeds 0 and 1: seed 1 against seed 0 moves Δm by (+5 − 1 − 2.083 + 2.857) / 4 = +1.19%, seed 0
# against seed 1 by (−4.762 + 0.990 + 2.128 − 2.941) / 4 = −1.146%: reseeding, their root mean square, is 1.17%
RANDOM = {0: {"semseg/mIoU": 4.0, "normals/mean": 30.0, "edge/odsF": 24.0, "depth/rmse": 3.5},
          1: {"semseg/mIoU": 4.2, "normals/mean": 30.3, "edge/odsF": 23.5, "depth/rmse": 3.4},
          2: {"semseg/mIoU": 3.8, "normals/mean": 29.0, "edge/odsF": 25.0, "depth/rmse": 3.6},
          3: {"semseg/mIoU": 4.4, "normals/mean": 31.0, "edge/odsF": 22.0, "depth/rmse": 3.3}}
LOWER = ("normals/mean", "depth/rmse")
RESEED = (5.0 - 1.0 - 0.5 / 24 * 100 + 0.1 / 3.5 * 100) / 4
RESEED_BACK = (-0.2 / 4.2 * 100 + 0.3 / 30.3 * 100 + 0.5 / 23.5 * 100 - 0.1 / 3.4 * 100) / 4
RESEED_RMS = ((RESEED**2 + RESEED_BACK**2) / 2) ** 0.5


def _scaled(metrics: dict, gain: float) -> dict:
    """`metrics` better by the fraction `gain` in every task (worse when negative): Δm against them = 100 × gain."""
    return {k: v * (1 - gain if k in LOWER else 1 + gain) for k, v in metrics.items()}


def _records(gains: dict[str, tuple[float, ...]]) -> dict:
    """Stage records of a demo (seed 0) whose fine-tunings beat random init by `gains[init]` per seed (seeds 0, 1,
    …, one per gain); no training."""
    done = {"train": {"command": "pretrain train ...", "seconds": 1.0, "seed": 0},
            "evaluate": {"command": "pretrain evaluate run", "seconds": 1.0, "seed": 0,
                         "output": {"step": 450, "eval/cls/top1": 34.0, "eval/det/APl": float("nan")}},
            "evaluate_random": {"command": "pretrain evaluate cfg --random-init", "seconds": 1.0, "seed": 0,
                                "output": {"step": 0, "eval/cls/top1": 1.0}}}
    for seed in range(len(gains["pretrained"])):
        for init in ("extracted", "pretrained", "random"):
            gain = gains[init][seed] if init != "random" else 0.0
            out = {f"eval/{k}": v for k, v in _scaled(RANDOM[seed], gain).items()}
            done[f"finetune_{init}_s{seed}"] = {"command": "pretrain finetune cfg", "seconds": 1.0, "seed": seed,
                                                "output": {"step": 40, **out}}
    return done


CASES = {  # pretrained's per-seed gains → its verdict (extracted: always within the noise)
    "helped": ((0.10, 0.08), "helped by +9.00 ± 1.00%"),  # mean 9 > max(2 × 1, 1.17)
    "hurt": ((-0.10, -0.08), "hurt by -9.00 ± 1.00%"),
    "no measurable difference": ((0.10, -0.02), "no measurable difference (+4.00 ± 6.00%)"),  # signs disagree
}


@pytest.mark.parametrize("expected", list(CASES))
def test_verdict_follows_from_the_reports_numbers(tmp_path, expected):
    gains, text = CASES[expected]
    # extracted: both seeds positive and close (spread 0.1) but smaller than what reseeding alone does (1.17)
    write_report(tmp_path, _records({"extracted": (0.01, 0.012), "pretrained": gains}))
    report = (tmp_path / "report.md").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["seed"] == 0 and data["finetune"]["seeds"] == [0, 1] and data["finetune"]["rule"] == RULE
    assert data["verdicts"] == {"extracted": "no measurable difference", "pretrained": expected}
    assert data["finetune"]["reseed_delta_m"] == pytest.approx(RESEED_RMS)
    assert data["finetune"]["reseed_pairs"] == pytest.approx({"1 vs 0": RESEED, "0 vs 1": RESEED_BACK})
    for init, want in (("extracted", (1.0, 1.2)), ("pretrained", tuple(100 * g for g in gains))):
        d = data["finetune"]["delta_m"][init]
        assert list(d["per_seed"].values()) == pytest.approx(list(want))
        # the verdict is the rule applied to the numbers the report states, nothing else
        margin = max(2 * d["spread"], abs(data["finetune"]["reseed_delta_m"]))
        stated = "helped" if d["mean"] > margin else "hurt" if d["mean"] < -margin else "no measurable difference"
        assert stated == data["verdicts"][init]
    headline = next(line for line in report.splitlines() if line.startswith("**Fine-tuning on NYUD-v2"))
    assert f"pretrained: {text}" in headline and "extracted: no measurable difference (+1.10 ± 0.10%)" in headline
    assert "reseeding alone moves Δm by 1.17%" in headline and RULE in report
    row = next(line for line in report.splitlines() if line.startswith("| semseg/mIoU |"))
    a, b = 4.0 * (1 + gains[0]), 4.2 * (1 + gains[1])  # pretrained's mIoU, seeds 0 and 1
    assert row.split("|")[3].strip() == f"{(a + b) / 2:.2f} ± {abs(a - b) / 2:.2f}"
    assert data["pretraining"]["pretrained"]["eval/det/APl"] is None  # NaN as null: report.json is strict JSON


def test_decide_at_its_margins():
    assert decide([3.0, 1.0], reseed=0.5) == "no measurable difference"  # mean 2 = 2 × spread 1: not more
    assert decide([3.1, 1.1], reseed=0.5) == "helped"
    assert decide([2.0, 2.0], reseed=2.5) == "no measurable difference"  # inside what reseeding alone does
    assert decide([-2.0, -2.0], reseed=1.5) == "hurt"
    assert decide([5.0, -1.0], reseed=0.0) == "no measurable difference"


def test_mean_spread_is_the_mean_and_its_standard_error():
    assert mean_spread([3.0, 1.0]) == (2.0, 1.0)  # two seeds: half their difference
    mean, spread = mean_spread([1.0, 2.0, 3.0, 4.0])  # sd √(5/3), over √4
    assert mean == 2.5 and spread == pytest.approx((5 / 3) ** 0.5 / 2, rel=1e-12)
    assert mean_spread([7.0]) == (7.0, 0.0)
    with pytest.raises(ValueError, match="no values"):
        mean_spread([])


def test_four_seeds_give_the_standard_error_and_the_rms_reseeding(tmp_path):
    """With n seeds the spread is sd / √n of the per-seed Δm and the reseeding Δm the root mean square of random
    init's Δm over the 12 ordered pairs of seeds; the verdict is the rule on those stated numbers."""
    pretrained = (0.16, 0.08, 0.12, 0.04)  # Δm 16, 8, 12, 4: mean 10, sd √(80/3), spread √(80/3) / 2 = 2.58
    write_report(tmp_path, _records({"extracted": (0.05, -0.05, 0.07, -0.03), "pretrained": pretrained}))
    data = json.loads((tmp_path / "report.json").read_text())
    ft = data["finetune"]
    assert ft["seeds"] == [0, 1, 2, 3]
    d = ft["delta_m"]["pretrained"]
    assert d["mean"] == pytest.approx(10.0) and d["spread"] == pytest.approx((80 / 3) ** 0.5 / 2)
    reseeds = ft["reseed_pairs"]
    assert len(reseeds) == 12 and reseeds["1 vs 0"] == pytest.approx(RESEED)
    assert ft["reseed_delta_m"] == pytest.approx((sum(r * r for r in reseeds.values()) / 12) ** 0.5)
    for init, want in (("pretrained", "helped"), ("extracted", "no measurable difference")):
        d = ft["delta_m"][init]
        assert decide(list(d["per_seed"].values()), ft["reseed_delta_m"]) == want == data["verdicts"][init]
    report = (tmp_path / "report.md").read_text()
    assert "fine-tuning runs with seeds 0, 1, 2 and 3" in report and "over seeds 0–3" in report
    row = next(line for line in report.splitlines() if line.startswith("| semseg/mIoU |"))
    values = [RANDOM[s]["semseg/mIoU"] * (1 + g) for s, g in enumerate(pretrained)]
    mean = sum(values) / 4
    se = (sum((v - mean) ** 2 for v in values) / 3 / 4) ** 0.5
    assert row.split("|")[3].strip() == f"{mean:.2f} ± {se:.2f}"


def test_report_without_a_second_seed_says_so(tmp_path):
    done = _records({"extracted": (0.1, 0.1), "pretrained": (0.1, 0.1)})
    for init in ("extracted", "pretrained", "random"):
        del done[f"finetune_{init}_s1"]
    write_report(tmp_path, done)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["verdicts"] == {} and "second seed is missing" in data["verdict"]


def test_step0_column_and_which_runs_do_not_beat_it(tmp_path):
    """The random-init run's evaluation before its first step is the step-0 column; the report names every run
    whose primary metric is not better than it (by each metric's direction)."""
    done = _records({"extracted": (0.1, 0.1), "pretrained": (0.1, 0.1)})
    write_report(tmp_path, done)
    assert "step0" not in json.loads((tmp_path / "report.json").read_text())["finetune"]  # none made: no column
    # step 0 worse than every run except extracted seed 1's normals (lower is better: 20 beats its 27)
    step0 = {"eval/semseg/mIoU": 1.0, "eval/normals/mean": 50.0, "eval/edge/odsF": 10.0, "eval/depth/rmse": 9.0}
    done["finetune_random_s0"]["start"] = {"step": 0, **step0}
    done["finetune_extracted_s1"]["output"]["eval/normals/mean"] = 60.0
    write_report(tmp_path, done)
    data = json.loads((tmp_path / "report.json").read_text())["finetune"]
    assert data["step0"]["semseg/mIoU"] == 1.0
    assert data["not_better_than_step0"] == {"extracted": ["normals seed 1"], "pretrained": [], "random": []}
    report = (tmp_path / "report.md").read_text()
    assert next(line for line in report.splitlines() if line.startswith("| depth/rmse |")).endswith("| 9.00 |")
    assert "not better in extracted: normals seed 1." in report
    done["finetune_extracted_s1"]["output"]["eval/normals/mean"] = 20.0
    write_report(tmp_path, done)
    assert "every initialisation and seed is better on every task" in (tmp_path / "report.md").read_text()


def test_total_time_counts_stages_that_ran_at_once_once():
    done = {"train": {"seconds": 10.0, "started": 100.0, "ended": 110.0},
            "a": {"seconds": 60.0, "started": 110.0, "ended": 170.0},  # a and b two at a time
            "b": {"seconds": 50.0, "started": 110.0, "ended": 160.0},
            "c": {"seconds": 30.0, "started": 160.0, "ended": 190.0},
            "old": {"seconds": 5.0}}  # a record from before the spans: its seconds
    assert _wall_seconds(done) == pytest.approx(10.0 + 80.0 + 5.0)
