"""scripts/compare_runs.py: identical runs compare identical; one changed bit, row or key is named."""

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "scripts" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_runs)


def _run(path: Path) -> Path:
    """A run directory in the layout `pretrain train` writes (metrics, evaluation, one checkpoint tag)."""
    g = torch.Generator().manual_seed(0)
    rows = [{"step": s, "time": 1e9 + s, "loss/cls": 2.0 - s / 100, "img_per_s/cls": 50.0 + s} for s in (10, 20)]
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "eval.jsonl").write_text(json.dumps({"step": 20, "time": 1e9, "eval/cls/top1": 35.0,
                                                 "eval/det/APl": float("nan")}) + "\n")
    tag = path / "checkpoints" / "step_00000020"
    tag.mkdir(parents=True)
    (path / "checkpoints" / "latest").write_text("step_00000020")
    torch.save({"module": {"w": torch.randn(4, 4, generator=g)}, "client": {"step": 20}},
               tag / "mp_rank_00_model_states.pt")
    save_file({"experts.0": torch.randn(2, 3, generator=g)}, str(tag / "experts_ep0.safetensors"))
    rank = {"rank": 0, "state": {"rng.python": [3, [int(torch.randint(0, 2**31, (1,)))]], "stream": {"step": 20}}}
    (tag / "rank_00000.json").write_text(json.dumps(rank))
    return path


def test_identical_runs_ignore_wall_clock_and_the_unseeded_rngs(tmp_path):
    a = _run(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    rows = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # another machine's clock and speed
        r["time"] += 5
        r["img_per_s/cls"] *= 2
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rank = json.loads((b / "checkpoints/step_00000020/rank_00000.json").read_text())
    rank["state"]["rng.python"] = [3, [12345]]
    (b / "checkpoints/step_00000020/rank_00000.json").write_text(json.dumps(rank))
    assert compare_runs.compare(a, b) == []


def test_one_changed_bit_row_or_key_is_named(tmp_path):
    a = _run(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    experts = b / "checkpoints/step_00000020/experts_ep0.safetensors"
    t = load_file(experts)
    t["experts.0"] = t["experts.0"].clone()
    t["experts.0"].view(torch.int32)[0, 0] ^= 1  # one bit of the mantissa
    save_file(t, str(experts))
    (b / "metrics.jsonl").write_text((b / "metrics.jsonl").read_text().replace('"loss/cls": 1.9', '"loss/cls": 1.91'))
    rank = json.loads((b / "checkpoints/step_00000020/rank_00000.json").read_text())
    rank["state"]["stream"]["counts"] = {"cls": 20}
    (b / "checkpoints/step_00000020/rank_00000.json").write_text(json.dumps(rank))
    assert compare_runs.compare(a, b) == [
        "metrics.jsonl step 10: loss/cls 1.9 vs 1.91",
        "checkpoint experts_ep0.safetensors:experts.0: differs",
        "checkpoint rank_00000.json:state.stream.counts.cls: only in the second run",
    ]


def test_a_damaged_or_missing_file_is_named_with_exit_2(tmp_path, capsys, monkeypatch):
    a = _run(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    experts = b / "checkpoints/step_00000020/experts_ep0.safetensors"
    experts.write_bytes(experts.read_bytes()[:40])  # cut off mid-header, as a full disk leaves it
    monkeypatch.setattr("sys.argv", ["compare_runs.py", str(a), str(b)])
    assert compare_runs.main() == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"compare_runs: {experts}: cannot be read (") and "\n" not in err
    monkeypatch.setattr("sys.argv", ["compare_runs.py", str(a), str(tmp_path / "nowhere")])
    assert compare_runs.main() == 2
    assert capsys.readouterr().err.strip() == f"compare_runs: {tmp_path / 'nowhere'}: not a run directory"
    monkeypatch.setattr("sys.argv", ["compare_runs.py", str(a), str(a)])
    assert compare_runs.main() == 0
    assert capsys.readouterr().out.strip() == "identical: 2 training rows, 1 evaluation rows, 5 checkpoint values"


class _Planted:
    def __reduce__(self):
        return (print, ("planted code ran",))


def test_a_checkpoint_that_pickles_code_is_refused_without_running_it(tmp_path, capsys, monkeypatch):
    a = _run(tmp_path / "a")
    model_file = a / "checkpoints/step_00000020/mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(1)}, "x": _Planted()}, model_file)
    monkeypatch.setattr("sys.argv", ["compare_runs.py", str(a), str(a)])
    assert compare_runs.main() == 2
    out, err = capsys.readouterr()
    assert "planted code ran" not in out + err
    assert "mp_rank_00_model_states.pt: refused to load, it pickles more than tensors (Unsupported global" in err
    assert "\n" not in err.strip()
