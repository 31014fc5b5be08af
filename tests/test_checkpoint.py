"""Checkpoints: atomic `latest`, pruning, per-rank state files, and 2-rank save/resume/export (ckpt_resume.py)."""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pretrain.runs import checkpoint
from pretrain.runs.load import build_run_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests" / "dist_scripts"))
from engine_common import eval_logits, make_cfg  # noqa: E402
from test_engine import run_dist  # noqa: E402


def make_tags(ckpt: Path, *steps: int) -> None:
    for step in steps:
        (ckpt / checkpoint.tag_for(step)).mkdir(parents=True)
        (ckpt / checkpoint.tag_for(step) / "mp_rank_00_model_states.pt").write_bytes(b"x")


def test_latest_is_replaced_atomically(tmp_path, monkeypatch):
    make_tags(tmp_path, 1, 2)
    checkpoint.write_latest(tmp_path, "step_00000001")
    assert (tmp_path / "latest").read_text() == "step_00000001"  # DeepSpeed's format: the tag, no newline

    def crash(src, dst):
        raise OSError("killed")

    import pretrain.durable

    monkeypatch.setattr(pretrain.durable.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        checkpoint.write_latest(tmp_path, "step_00000002")
    assert checkpoint.read_latest(tmp_path) == "step_00000001"


def test_uncommitted_tags_are_ignored_and_pruned(tmp_path):
    make_tags(tmp_path, 1, 2, 3, 4)
    (tmp_path / "other").mkdir()
    checkpoint.write_latest(tmp_path, "step_00000003")  # step 4: a save killed before its commit
    assert checkpoint.read_latest(tmp_path) == "step_00000003"
    assert checkpoint.load_latest(None, tmp_path / "missing") is None
    removed = checkpoint.prune(tmp_path, keep_last=2)
    assert sorted(removed) == ["step_00000001", "step_00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "other", "step_00000002", "step_00000003"]
    (tmp_path / "latest").write_text("step_00000009")
    with pytest.raises(RuntimeError, match="step_00000009.*does not exist"):
        checkpoint.read_latest(tmp_path)


@pytest.mark.parametrize("pointer", ["..", ".", "../step_00000003", "/etc", "step_00000003/..", "outside",
                                     "as_directory", "meta_removed", "notes"])
def test_a_latest_leaving_the_run_or_a_tag_without_metadata_falls_back(tmp_path, pointer, caplog):
    """`latest` naming something that is not one of this run's tags, or the newest tag without its metadata: the
    newest older tag that verifies is loaded, with a warning naming what was skipped."""
    from pretrain.runs.integrity import META, build_manifest, select_tag

    ckpt = tmp_path / "run" / "checkpoints"
    make_tags(ckpt, 2, 3)
    for step in (2, 3):
        tag = ckpt / checkpoint.tag_for(step)
        (tag / META).write_text(json.dumps({"step": step, "files": build_manifest(tag)}))
    (ckpt / "notes").mkdir()  # not a checkpoint: no metadata
    (tmp_path / "outside").mkdir()
    (ckpt / "outside").symlink_to(tmp_path / "outside", target_is_directory=True)
    if pointer == "as_directory":
        (ckpt / "latest").mkdir()
    elif pointer == "meta_removed":
        (ckpt / "latest").write_text("step_00000003")
        (ckpt / "step_00000003" / META).unlink()
    else:
        (ckpt / "latest").write_text(pointer)
    want = "step_00000002" if pointer == "meta_removed" else "step_00000003"
    assert select_tag(ckpt) == want
    named = {"meta_removed": "step_00000003: pretrain_meta.json is missing", "as_directory": "latest is not a file",
             "notes": "notes: pretrain_meta.json is missing"}
    assert f"falling back to {ckpt / want}" in caplog.text and named.get(pointer, f"holds {pointer!r}") in caplog.text


def test_a_dangling_latest_link_is_damage_not_a_fresh_start(tmp_path, monkeypatch):
    """A `latest` symlink to nothing was "no checkpoint" for resume (`exists()` follows links), so training would
    have started over beside the run's tags; now it is a pointer to fall back from, or an error naming it."""
    from pretrain.errors import CheckpointError
    from pretrain.runs.drift import has_checkpoint
    from pretrain.runs.integrity import select_tag

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "latest").symlink_to(tmp_path / "gone")
    with pytest.raises(CheckpointError, match="no checkpoint verifies.*latest is not a file holding a tag name"):
        select_tag(ckpt)
    assert has_checkpoint(tmp_path)  # a resume's drift check still compares configs

    def chosen(ckpt_dir):  # stands in for rank 0's choice (it needs a process group): load_latest got this far
        raise CheckpointError(f"chose in {ckpt_dir}")

    monkeypatch.setattr(checkpoint, "_choose_tag", chosen)
    with pytest.raises(CheckpointError, match="chose in"):
        checkpoint.load_latest(None, ckpt)


def test_a_hand_made_tag_takes_its_step_from_its_metadata(tmp_path):
    from pretrain.errors import CheckpointError
    from pretrain.runs.integrity import META, tag_step

    (tmp_path / "best").mkdir()
    with pytest.raises(CheckpointError, match="best/pretrain_meta.json is missing"):
        tag_step(tmp_path / "best")
    (tmp_path / "best" / META).write_text(json.dumps({"step": 12}))
    assert tag_step(tmp_path / "best") == 12 and tag_step(tmp_path / "step_00000034") == 34


def test_rank_state_roundtrip_restores_every_rng(tmp_path):
    state = {**checkpoint.capture_rng(), "stream": {"step": 3, "tasks": ["cls"]}}
    expect = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    checkpoint.write_rank_state(tmp_path, 1, state)
    assert json.loads((tmp_path / "rank_00001.json").read_text())["state"]["stream"] == {"step": 3, "tasks": ["cls"]}
    loaded = checkpoint.read_rank_state(tmp_path, 1)
    checkpoint.restore_rng(loaded)
    assert torch.equal(torch.rand(3), expect[0]) and np.array_equal(np.random.rand(3), expect[1])
    assert [random.random() for _ in range(3)] == expect[2]
    with pytest.raises(TypeError, match=r"rank_state\['bad'\] is a set"):
        checkpoint.write_rank_state(tmp_path, 0, {"bad": {1, 2}})
    with pytest.raises(KeyError, match="no RNG"):
        checkpoint.restore_rng({"stream": 1})


def test_checkpoint_and_models_do_not_import_deepspeed():
    code = "import sys, pretrain.runs.checkpoint, pretrain.models; assert 'deepspeed' not in sys.modules, 'deepspeed'"
    proc = run([sys.executable, "-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_save_resume_bit_exact_and_single_process_export(tmp_path):
    """ZeRO-1/2, EP=2: bit-exact resume, keep_last, EP change (ckpt_resume.py); then export into ONE process."""
    result = run_dist("ckpt_resume.py", "1,2", str(tmp_path))
    for zero in ("1", "2"):
        stage = result["stages"][zero]
        assert stage["differing"] == 0 and stage["resume_max_diff"] == 0.0 and stage["compared"] > 90, stage
        assert stage["ep_change_logit_diff"] < 1e-5, stage
    cfg = make_cfg("engine.ep_size=1", "moe.noisy=true", "model.drop_path=0.1")
    for zero in (1, 2):
        ckpt = tmp_path / f"zero{zero}" / "ckpt"
        tag_dir = ckpt / checkpoint.read_latest(ckpt)
        with safe_open(str(tag_dir / "experts_ep1.safetensors"), framework="pt") as f:
            assert "backbone.blocks.1.mlp.experts.w1.3" in f.keys() and f.metadata()["ep_rank"] == "1"
        torch.manual_seed(99)  # other weights than the checkpoint's
        model = build_run_model(cfg, num_classes=None, rank=0)
        assert checkpoint.load_model_weights(ckpt, model) == tag_dir
        ref = load_file(str(tmp_path / f"ref_zero{zero}.safetensors"))["logits"]
        torch.testing.assert_close(eval_logits(model), ref, rtol=0, atol=1e-5)
    # no noise routers: the checkpoint has extra keys
    strict = build_run_model(make_cfg("engine.ep_size=1"), num_classes=None, rank=0)
    with pytest.raises(RuntimeError, match="unexpected keys.*noise_weight"):
        checkpoint.load_model_weights(tmp_path / "zero1" / "ckpt", strict)
    check_weights_only_loading(tmp_path)


class _Planted:
    """Unpickling this runs `Path.touch(marker)`: what a tampered checkpoint could do with any callable."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def check_weights_only_loading(tmp_path: Path) -> None:
    """The run's DeepSpeed files load weights-only (its resume already went through `WeightsOnlyCheckpointEngine`,
    which `build_engine` installs); a file that pickles a callable is refused naming it, and the callable never runs."""
    from pretrain.parallel.engine import WeightsOnlyCheckpointEngine

    files = sorted(tmp_path.glob("zero*/ckpt/step_*/*.pt"))
    assert {f.name for f in files} >= {"mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    loader = WeightsOnlyCheckpointEngine()
    for f in files:
        assert isinstance(loader.load(str(f), map_location="cpu"), dict), f
    marker = tmp_path / "code_ran"
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    torch.save({**state, "extra": _Planted(marker)}, files[0], _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError, match=rf"{files[0].name}: refused to load"):
        loader.load(str(files[0]), map_location="cpu")
    assert not marker.exists()


def test_an_expert_file_with_exchanged_slices_is_refused_naming_the_expert(tmp_path):
    """The rank holding experts 2 and 3 (EP 2, rank 1) loads its experts from an experts_ep1 file whose slices of
    experts 2 and 3 were exchanged after the save (file CRC recomputed, metadata kept): refused naming the layer, the
    expert and the file, exit 5; the intact file loads every expert into its slot."""
    from pretrain.errors import EXIT_CHECKPOINT, CheckpointError
    from pretrain.runs.integrity import build_manifest, verify_tag

    cfg = make_cfg("engine.ep_size=2")
    torch.manual_seed(0)
    saved = build_run_model(cfg, num_classes=None, rank=1)
    tag_dir = tmp_path / "step_00000003"
    tag_dir.mkdir()
    path = checkpoint.write_experts(saved, tag_dir, ep_size=2, ep_rank=1, step=3)
    loaded = build_run_model(cfg, num_classes=None, rank=1)
    with checkpoint.ExpertFiles(tag_dir) as files:
        checkpoint.load_local_experts(loaded, files.read)
    assert all(torch.equal(a, b) for a, b in zip(checkpoint.local_expert_tensors(saved).values(),
                                                   checkpoint.local_expert_tensors(loaded).values()))
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    first, second = "backbone.blocks.1.mlp.experts.w2.2", "backbone.blocks.1.mlp.experts.w2.3"
    tensors[first], tensors[second] = tensors[second], tensors[first]
    save_file(tensors, str(path), metadata=metadata)
    (tag_dir / checkpoint.META).write_text(json.dumps({"step": 3, "files": build_manifest(tag_dir)}))
    assert verify_tag(tag_dir) is None  # the file checksums agree: only the per-expert check can tell
    with checkpoint.ExpertFiles(tag_dir) as files, pytest.raises(CheckpointError) as err:
        checkpoint.load_local_experts(build_run_model(cfg, num_classes=None, rank=1), files.read)
    assert str(err.value).startswith(f"{path}: expert 2 of layer backbone.blocks.1.mlp ({first}) is not the expert "
                                     "saved under this id"), err.value
    assert err.value.exit_code == EXIT_CHECKPOINT
