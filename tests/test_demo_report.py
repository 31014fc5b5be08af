"""The demo report's tables come from the files the commands wrote: the smaller-submodel table reads each extract
report (experts kept, top-k, ratios, the metric before and after healing) without recomputing anything."""

import json

from pretrain.demo.report import _smaller_section


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
