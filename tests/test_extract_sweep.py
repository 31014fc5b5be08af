"""`pretrain extract --sweep`: several sizes in one call, one table and one plot; the share rule; options that
cannot mean anything are refused before any work."""

import json

import pytest
import torch
from test_extract import native_run
from test_submodel_build import portable

from pretrain.cli import main as cli_main
from pretrain.extraction.keep_rules import keep_share
from pretrain.runs.portable import load_submodel, write_file


def test_share_keeps_the_same_fraction_of_every_layer():
    u = torch.tensor([50.0, 30, 10, 6, 3, 1, 0, 0, 0, 0])
    assert keep_share(u, top_k=2, share=0.3) == [0, 1, 2]  # 0.3 * 10 = 3, not 4 (float rounding)
    assert keep_share(u, top_k=2, share=0.05) == [0, 1]  # floor k
    assert keep_share(u[:8], top_k=2, share=0.5) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="--share 0"):
        keep_share(u, top_k=2, share=0.0)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny three-task model file (built once: a model built inside a test logs to an earlier test's stderr)."""
    tmp = tmp_path_factory.mktemp("model")
    full = portable(tmp)
    return write_file(tmp / "full.safetensors", full.model.state_dict(), full.meta, kind="model")


def test_sweep_writes_a_submodel_per_size_a_table_and_a_plot(model_file, tmp_path, capsys):
    source = model_file
    out = tmp_path / "sweep" / "seg.safetensors"
    code = cli_main(["extract", str(source), "--task", "seg", "--out", str(out), "--sweep", "1,0.5,0.25",
                     "--eval-images", "0", "--latency-runs", "1", "--latency-batches", "1,2"])
    assert code == 0
    rows = json.loads((tmp_path / "sweep" / "seg.sweep.json").read_text())["rows"]
    assert [r["share"] for r in rows] == [0.25, 0.5, 1.0]
    # 8 experts per layer, k = 2: 25 % keeps 2, 50 % keeps 4, all keeps 8 (two attention + two MLP layers)
    assert [r["experts_kept"] for r in rows] == [8, 16, 32] and rows[0]["experts"] == 32
    # all experts kept: the MoE layers lose only the other tasks' router rows
    assert rows[0]["moe_params"] < rows[1]["moe_params"] < rows[2]["moe_params"] < rows[2]["moe_params_full"]
    assert rows[0]["moe_params"] / rows[2]["moe_params"] == pytest.approx(0.26, abs=0.01)
    assert set(rows[0]["latency_ratio"]) == {"batch1", "batch2"}
    table = (tmp_path / "sweep" / "seg.sweep.md").read_text()
    assert "| 0.25 | 8/32 |" in table and table in capsys.readouterr().out
    assert (tmp_path / "sweep" / "seg.sweep.png").stat().st_size > 0
    for share in ("0.25", "0.5", "1"):
        sub = load_submodel(tmp_path / "sweep" / f"seg.share{share}.safetensors")
        assert sub.meta["rule"]["name"] == "share" and sub.meta["rule"]["share"] == float(share)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--thresh", "nan"], "--thresh nan: expected a number >= 0"),
    (["--eval-images", "-5"], "--eval-images -5"),
    (["--latency-batches", "abc"], "--latency-batches abc"),
    (["--calibrate-images", "0"], "--calibrate-images 0"),
    (["--sweep", "0.5,2"], "every share must be in (0, 1]"),
    (["--sweep", "0,2"], "--sweep '0,2': every share must be in (0, 1] (got [0.0, 2.0])"),
    (["--sweep", "abc"], "--sweep 'abc': expected comma-separated shares in (0, 1]"),
    (["--sweep", "0.5", "--rule", "topn"], "does not combine with --rule topn"),
    (["--heal", "-1"], "--heal -1 --heal-lr 0.0001: expected steps >= 0"),
    (["--top-k", "9"], "--top-k 9: must be between 1 and the trained k (2)"),
    (["--top-k", "0"], "--top-k 0: expected between 1 and the trained k (leave it out to keep the trained k)"),
    (["--attn-top-k", "0"], "--attn-top-k 0: expected between 1 and the trained k"),
])
def test_bad_extract_options_are_one_line_and_exit_2(model_file, tmp_path, capsys, args, fragment):
    source, before = model_file, model_file.read_bytes()
    code = cli_main(["extract", str(source), "--task", "seg", "--out", str(tmp_path / "s.safetensors"),
                     "--no-report", *args])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert source.read_bytes() == before and not (tmp_path / "s.safetensors").exists()


def test_out_equal_to_the_source_is_refused(shards, tmp_path, capsys):
    native_run(tmp_path / "run", shards)
    model = tmp_path / "m.safetensors"
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(model)]) == 0
    before = model.read_bytes()
    for extra in ([], ["--sweep", "0.5"]):
        assert cli_main(["extract", str(model), "--task", "cls", "--out", str(model), "--no-report", *extra]) == 2
        assert "is the source model" in capsys.readouterr().err and model.read_bytes() == before


@pytest.mark.parametrize(("args", "fragment", "unfinished"), [
    (["--heal", "5", "--no-report"], "ade20k/train does not exist", "s.heal"),
    (["--sweep", "0.5", "--eval-images", "2"], "no val shards for seg at", "s.sweep.json"),
])
def test_heal_or_sweep_without_reachable_shards_leaves_nothing_behind(model_file, tmp_path, capsys, args, fragment,
                                                                      unfinished):
    """A wrong --data-root: --heal fails before it starts NAME.heal/, a sweep before NAME.sweep.json (written last,
    after every size): one line naming the folder, exit 2, and nothing that could pass for a finished result."""
    missing = tmp_path / "no_shards"
    code = cli_main(["extract", str(model_file), "--task", "seg", "--out", str(tmp_path / "s.safetensors"),
                     "--data-root", str(missing), *args])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and fragment in last and str(missing) in last, last
    assert not (tmp_path / unfinished).exists() and not (tmp_path / "s.safetensors").exists()
