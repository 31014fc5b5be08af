"""`--dry-run` of every shipped config needs no data on disk and prints the parameter counts its header states
(`# Dry-run: params total 229.3 M, backbone 200.9 M; params_per_rank ...`, millions to one decimal)."""

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pretrain.config.finetuning import FinetuneConfig
from pretrain.config.load import load_config

ROOT = Path(__file__).resolve().parents[1]
# `pretrain add-task` has no --dry-run: its model is the trained MODEL's, so its configs state no parameter counts
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")
                 if "add_task" not in OmegaConf.load(p))


def stated(config: Path) -> dict[str, dict[str, float]]:
    """{"params": {"total": 229.3, ...}, "params_per_rank": {...}} from the header's `Dry-run:` lines."""
    header = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# "))
    text = " ".join(header)
    match = re.search(r"Dry-run: (.*?)(?:\(|$)", text)
    assert match, f"{config}: its header has no `# Dry-run: params ...` line"
    out: dict[str, dict[str, float]] = {}
    for group in match.group(1).split(";"):
        words = group.replace(",", " ").split()
        section, rest = words[0], words[1:]
        out[section] = {rest[i]: float(rest[i + 1]) for i in range(0, len(rest) - 2, 3) if rest[i + 2] == "M"}
    return out


@pytest.mark.parametrize("config", CONFIGS)
def test_dry_run_prints_what_the_header_states(config, tmp_path, capsys, monkeypatch):
    finetune = "finetune" in config
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'no_data'}"]
    if finetune:
        from pretrain.finetune.train import print_dry_run

        cfg = load_config(ROOT / config, [*overrides, "finetune.init_from=''"], schema=FinetuneConfig)
    else:
        from pretrain.training.train import print_dry_run

        cfg = load_config(ROOT / config, overrides)
    assert print_dry_run(cfg) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["class_counts_from"].startswith("release")  # no shards were read
    for section, counts in stated(ROOT / config).items():
        for part, millions in counts.items():
            assert round(printed[section][part] / 1e6, 1) == millions, (section, part, printed[section][part])
