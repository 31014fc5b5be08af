"""The bad-input matrix: for every command, the input, the exit code and a fragment of the one-line message.

Rows run the CLI in this process (`cli.main`, stderr captured) or call the failing function; the slow rows (real
training in subprocesses, one process and two torchrun ranks) are in test_bad_input_runs.py, and real failures
mapped to exit codes (full disk, Ctrl-C, a loader worker, a signal during the op build) in
test_bad_input_failures.py. No row may print a traceback unless --debug is given, and every row names a non-empty
message fragment (`test_every_row_expects_a_message`). The exit codes are `pretrain.errors.EXIT_CODES`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config.load import load_config, save_resolved
from pretrain.config.pretraining import ConfigError
from pretrain.runs import checkpoint
from pretrain.runs.integrity import META, build_manifest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_decode_bad_input import bad_crc_png, bad_zlib_png, png_bomb  # noqa: E402
from test_drift import _fake_run  # noqa: E402
from test_prepare_bad_input import _coco, _png, _put, _rows  # noqa: E402
from test_runs import SMALL, write_checkpoint  # noqa: E402

DEBUG_PRETRAIN = str(ROOT / "configs/debug/pretrain.yaml")
DEBUG_FINETUNE = str(ROOT / "configs/debug/finetune.yaml")
PIXELS = torch.randint(0, 255, (12, 16, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy()


def check(code: int, err: str, want_code: int, fragment: str) -> None:
    assert fragment.strip(), "a row must name the message it expects (an empty fragment matches anything)"
    assert code == want_code, err[-3000:]
    assert fragment in err, err[-3000:]
    assert "Traceback" not in err


# ---------------------------------------------------------------- configs (train / finetune / evaluate)

YAML_FILES = {  # name -> file content
    "list.yaml": b"- train\n- optim\n",
    "scalar.yaml": b"hello\n",
    "number.yaml": b"5\n",
    "dup.yaml": b"optim:\n  lr: 0.1\n  lr: 0.2\n",
    "unclosed.yaml": b"optim:\n  betas: [0.9, 0.99\ntrain:\n  max_steps: 3\n",
    "binary.yaml": b"optim: \xff\xfe\x00\n",
}

CONFIG_CASES = [  # (command, config, overrides, code, fragment)
    ("train", "missing.yaml", [], 2, "config file not found"),
    ("train", "list.yaml", [], 2, "top level must be a mapping of sections (e.g. `train:`), got a list at line 1"),
    ("train", "scalar.yaml", [], 2, "got a scalar at line 1"),
    ("train", "number.yaml", [], 2, "got a scalar"),
    ("train", "dup.yaml", [], 2, "dup.yaml:3:3: cannot parse YAML: found duplicate key lr"),
    ("train", "unclosed.yaml", [], 2, "unclosed.yaml:3:6: cannot parse YAML: expected ',' or ']'"),
    ("train", "binary.yaml", [], 2, "not a UTF-8 text file"),
    ("train", DEBUG_PRETRAIN, ["optim.lrr=0.1"], 2, "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("train", DEBUG_PRETRAIN, ["train.max_steps=abc"], 2, "bad value for 'train.max_steps'"),
    ("train", DEBUG_PRETRAIN, ["train.max_steps"], 2, "is not of the form key=value"),
    ("train", DEBUG_PRETRAIN, ["model.size=vit_bogus"], 2, "model.size='vit_bogus' is out of range: must be one of"),
    ("train", DEBUG_PRETRAIN, ["optim.lr=inf"], 2, "optim.lr=inf is out of range: must be a finite number"),
    ("train", DEBUG_PRETRAIN, ["optim.lr=nan"], 2, "optim.lr=nan is out of range"),
    ("train", DEBUG_PRETRAIN, ["model.drop_path=1.0"], 2, "model.drop_path=1.0 is out of range: must be in [0, 1)"),
    ("train", DEBUG_PRETRAIN, ["model.drop_path=-0.1"], 2, "model.drop_path=-0.1"),
    ("train", DEBUG_PRETRAIN, ["model.patch_size=-16"], 2, "model.patch_size=-16 is out of range: must be >= 0"),
    ("train", DEBUG_PRETRAIN, ["seed=-1"], 2, "seed=-1 is out of range: must be >= 0"),
    ("train", DEBUG_PRETRAIN, ["data.shuffle_buffer=-5"], 2, "data.shuffle_buffer=-5"),
    ("train", DEBUG_PRETRAIN, ["optim.betas=[0.9,1.5]"], 2, "optim.betas.1=1.5 is out of range"),
    ("train", DEBUG_PRETRAIN, ["moe.top_k=99"], 2, "moe.top_k=99 is out of range"),
    ("train", DEBUG_PRETRAIN, ["tasks.cls.enabled=false", "tasks.det.enabled=false", "tasks.seg.enabled=false"], 2,
     "enable at least one of"),
    ("evaluate", DEBUG_PRETRAIN, ["tasks.cls.eval_batch_size=0"], 2, "tasks.cls.eval_batch_size=0 is out of range"),
    ("finetune", DEBUG_FINETUNE, ["optim.lr=inf"], 2, "optim.lr=inf"),
    ("finetune", DEBUG_FINETUNE, ["model.drop_path=2"], 2, "model.drop_path=2.0"),
    ("finetune", DEBUG_FINETUNE, ["data.batch_size=0"], 2, "data.batch_size=0"),
    ("finetune", DEBUG_FINETUNE, ["model.size=vit_bogus"], 2, "model.size='vit_bogus'"),
    ("finetune", DEBUG_FINETUNE, ["finetune.baselines.semseg=inf"], 2, "finetune.baselines.semseg=inf"),
]


@pytest.mark.parametrize(("command", "config", "overrides", "code", "fragment"), CONFIG_CASES,
                         ids=[f"{c[0]}:{Path(c[1]).name}:{' '.join(c[2])}" for c in CONFIG_CASES])
def test_config_errors(cli, tmp_path, command, config, overrides, code, fragment):
    for name, content in YAML_FILES.items():
        (tmp_path / name).write_bytes(content)
    path = config if Path(config).is_absolute() else tmp_path / config
    check(*cli(command, path, *overrides), code, fragment)


def test_debug_shows_the_traceback(cli, tmp_path, monkeypatch):
    (tmp_path / "list.yaml").write_bytes(YAML_FILES["list.yaml"])
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        cli("train", tmp_path / "list.yaml", "--debug")
    monkeypatch.setenv("PRETRAIN_DEBUG", "1")
    with pytest.raises(Exception, match="top level must be a mapping"):
        cli("train", tmp_path / "list.yaml")


# ---------------------------------------------------------------- inputs before training: shards, run dirs


def test_missing_shards_and_not_a_run_dir(cli, tmp_path, shards):
    check(*cli("train", DEBUG_PRETRAIN, f"data.root={tmp_path}/nothing"), 2, "nothing/imagenet/train")
    check(*cli("evaluate", tmp_path), 2, "is not a run directory: no config.yaml in it")
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    (broken / "coco" / "train" / "_info.json").write_bytes(b"{\"shards\": [")
    check(*cli("train", DEBUG_PRETRAIN, f"data.root={broken}", f"output_dir={tmp_path / 'run'}"), 6,
          "coco/train/_info.json: unreadable JSON")


# ---------------------------------------------------------------- checkpoints (evaluate a run directory)


def _manifest(tag_dir: Path, step: int) -> None:
    meta = {"step": step, "world_size": 1, "ep_size": 1, "files": build_manifest(tag_dir)}
    (tag_dir / META).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def template_run(shards, tmp_path_factory):
    """A run directory with intact checkpoints at steps 5 and 7 (manifests included) in the saved layout."""
    from pretrain.data.build import check_shards
    from pretrain.runs.load import build_run_model

    out = tmp_path_factory.mktemp("bad_input_run") / "run"
    cfg = load_config(None, [f"data.root={shards}", f"output_dir={out}", "optim.loss_weighting=uncertainty", *SMALL])
    torch.manual_seed(3)
    model = build_run_model(cfg, num_classes=check_shards(cfg.data, cfg.tasks).num_classes, rank=0)
    save_resolved(cfg, out)
    for step in (5, 7):
        _manifest(write_checkpoint(out, model, step), step)
    return out


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _plant_pickle(path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    torch.save({**state, "extra": _Planted()}, path)


class _Planted:
    def __reduce__(self):
        return (print, ("planted code ran",))


def _drop_manifest(tag: Path) -> None:
    (tag / META).unlink()


def _drop_manifests(ckpt: Path) -> None:
    for tag in ckpt.glob("step_*"):
        _drop_manifest(tag)


def _link_outside(ckpt: Path, name: str) -> None:
    """`latest` names a link to an intact copy of the newest tag outside the checkpoint directory."""
    shutil.copytree(ckpt / "step_00000007", ckpt.parent / name)
    (ckpt / name).symlink_to(ckpt.parent / name, target_is_directory=True)
    (ckpt / "latest").write_text(name)


DAMAGE = {  # name -> (damage(ckpt dir), code, fragment)
    "intact": (lambda c: None, 0, "not loading objective.sigma"),
    "latest_missing_tag_falls_back": (lambda c: (c / "latest").write_text("step_00000009"), 0, "falling back to"),
    "latest_garbage_falls_back": (lambda c: (c / "latest").write_bytes(b"\xff\xfe\x00garbage"), 0, "not text"),
    "newest_truncated_model_falls_back": (lambda c: _truncate(c / "step_00000007" / checkpoint.MODEL_FILE), 0,
                                          "mp_rank_00_model_states.pt has"),
    "newest_truncated_experts_falls_back": (lambda c: _truncate(c / "step_00000007" / "experts_ep0.safetensors"), 0,
                                            "experts_ep0.safetensors has"),
    "newest_bitflip_falls_back": (lambda c: _flip(c / "step_00000007" / "experts_ep0.safetensors"), 0,
                                  "fails its checksum"),
    "every_checkpoint_damaged": (lambda c: [_truncate(c / t / checkpoint.MODEL_FILE) for t in ("step_00000005",
                                                                                              "step_00000007")],
                                 5, "no checkpoint verifies (step_00000007: mp_rank_00_model_states.pt has"),
    "only_tag_missing": (lambda c: [shutil.rmtree(c / "step_00000005"), (c / "latest").write_text("step_00000009"),
                                    shutil.rmtree(c / "step_00000007")], 5, "names tag 'step_00000009'"),
    # `latest` leaving the checkpoint directory, and a newest tag that lost its metadata: damage like the above
    "latest_dotdot_falls_back": (lambda c: (c / "latest").write_text(".."), 0, "holds '..', which leaves"),
    "latest_link_outside_falls_back": (lambda c: _link_outside(c, "elsewhere"), 0, "holds 'elsewhere', which leaves"),
    "newest_meta_removed_falls_back": (lambda c: _drop_manifest(c / "step_00000007"), 0,
                                       "step_00000007: pretrain_meta.json is missing"),
    # no tag has metadata (hand-made): the newest is loaded unverified and the loader's own checks name the damage
    "no_manifest_truncated_model": (lambda c: _drop_manifests(c) or
                                    _truncate(c / "step_00000007" / checkpoint.MODEL_FILE), 5,
                                    "mp_rank_00_model_states.pt: unreadable"),
    "no_manifest_truncated_experts": (lambda c: _drop_manifests(c) or
                                      _truncate(c / "step_00000007" / "experts_ep0.safetensors", 0.001), 5,
                                      "experts_ep0.safetensors: unreadable expert file"),
    "no_manifest_planted_pickle": (lambda c: _drop_manifests(c) or
                                   _plant_pickle(c / "step_00000007" / checkpoint.MODEL_FILE), 5,
                                   "refused to load, it pickles more than tensors"),
    "no_checkpoint": (lambda c: shutil.rmtree(c), 2, "no checkpoint (no 'latest' file)"),
}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_evaluate_damaged_checkpoints(cli, template_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(template_run, run)
    fn, code, fragment = DAMAGE[damage]
    fn(run / "checkpoints")
    got, err = cli("evaluate", run, "eval.max_samples=2", "eval.num_workers=0")
    check(got, err, code, fragment)
    assert "planted code ran" not in err
    if code == 0:  # the newest intact checkpoint: step 7 unless its own files are damaged
        step = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])["step"]
        assert step == (5 if damage.startswith("newest_") else 7)
    if damage.startswith(("latest_dotdot", "latest_link", "newest_meta")):  # export falls back the same way
        check(*cli("export", run, "--out", tmp_path / "m.safetensors"), 0, "falling back to")


def test_evaluate_fewer_tasks_than_trained(cli, template_run, tmp_path, capsys):
    """Trained with three tasks (uncertainty weighting: σ has 3 entries); evaluated on cls + seg only."""
    run = tmp_path / "run"
    shutil.copytree(template_run, run)
    code, err = cli("evaluate", run, "tasks.det.enabled=false", "eval.max_samples=2", "eval.num_workers=0")
    check(code, err, 0, "not loading heads.det, objective.sigma")
    metrics = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert metrics["step"] == 7 and "eval/seg/mIoU" in metrics and not any("det" in k for k in metrics)


# ---------------------------------------------------------------- A-E: bad raw data at `pretrain prepare`


def _bad_png_imagenet(src: Path) -> None:
    _put(src / "train/n01/good.JPEG", _png(PIXELS))
    _put(src / "train/n01/bad.JPEG", bad_crc_png(PIXELS))


def _zlib_png_imagenet(src: Path) -> None:
    _put(src / "train/n01/good.JPEG", _png(PIXELS))
    _put(src / "train/n01/bad.JPEG", bad_zlib_png(PIXELS))


def _symlinks_imagenet(src: Path) -> None:
    _put(src / "train/n01/a.JPEG", _png(PIXELS))
    (src / "train/n01/loop").symlink_to(src / "train", target_is_directory=True)


PREPARE = {  # name -> (dataset, split, build(src or tmp), code, skipped reason or message fragment)
    "A_png_crc": ("imagenet", "train", _bad_png_imagenet, 0, "png_crc"),
    "A_png_zlib": ("imagenet", "train", _zlib_png_imagenet, 0, "decode_error"),
    "C_symlink_loop": ("imagenet", "train", _symlinks_imagenet, 0, "symlinked_dir"),
    "B_coco_bad_boxes": ("coco", "val", None, 0, "bad_bbox"),
    "D_path_outside_src": ("coco", "val", None, 0, "outside_src"),
    "missing_src": ("imagenet", "train", lambda src: None, 2, "imagenet"),
}


@pytest.mark.parametrize("name", list(PREPARE))
def test_prepare_bad_raw_data(cli, tmp_path, name):
    dataset, split, build, code, fragment = PREPARE[name]
    src = tmp_path / dataset
    if name == "B_coco_bad_boxes":
        src = _coco(tmp_path, [[1, 2, 3, 4], [0, 0, 0, 4], [float("nan"), 0, 3, 4]])
    elif name == "D_path_outside_src":
        src = _coco(tmp_path, [[1, 2, 3, 4]], {1: "../../secret.jpg"})
    else:
        build(src)
    got, err = cli("prepare", dataset, "--src", src, "--out", tmp_path / "out", "--split", split)
    assert got == code and "Traceback" not in err, err[-3000:]
    if code == 0:
        rows = _rows(tmp_path / "out")
        assert any(fragment in r["reason"] or fragment in r.get("detail", "") for r in rows), rows
    else:
        assert fragment in err


DECODE = {  # name -> (bytes, decoder name, message fragment): the loader skips and counts these samples
    "E_png_bomb_rgb": (png_bomb(), "decode_rgb", "30000x30000"),
    "E_png_bomb_mask": (png_bomb(colour=0), "decode_mask", "over the limit"),
    "A_png_crc_rgb": (bad_crc_png(PIXELS), "decode_rgb", "CRC"),
    "A_png_zlib_rgb": (bad_zlib_png(PIXELS), "decode_rgb", "broken data stream"),  # PIL's zlib error
}


@pytest.mark.parametrize("name", list(DECODE))
def test_loader_refuses_bad_images_with_a_message(name):
    from pretrain.data import decode

    data, fn, fragment = DECODE[name]
    with pytest.raises((ValueError, OSError), match=fragment):  # what the loader's skip handler counts
        getattr(decode, fn)(data)


# ---------------------------------------------------------------- resume with a changed config


DRIFT = {  # name -> (overrides on resume, code, fragment)
    "num_experts": (["moe.num_experts=4"], 2, "moe.num_experts: 8 -> 4"),
    "lr_and_grad_accum": (["optim.lr=0.5", "engine.grad_accum=2"], 2, "engine.grad_accum: 1 -> 2, optim.lr:"),
    "data_stream": (["data.num_workers=3"], 2, "data.num_workers"),
}


@pytest.mark.parametrize("name", list(DRIFT))
def test_resume_with_a_changed_config_is_refused_before_writing(cli, tmp_path, name, shards):
    run = _fake_run(tmp_path, f"data.root={shards}")
    saved = (run / "config.yaml").read_bytes()
    overrides, code, fragment = DRIFT[name]
    check(*cli("train", DEBUG_PRETRAIN, f"output_dir={run}", f"data.root={shards}", *overrides), code, fragment)
    assert (run / "config.yaml").read_bytes() == saved


# ---------------------------------------------------------------- the matrix itself


def empty_fragments(tables: dict[str, list[tuple[str, object]]]) -> list[str]:
    """`table[row]` for each row whose expected message fragment is not a non-empty string."""
    return [f"{table}[{row}]" for table, rows in tables.items() for row, fragment in rows
            if not isinstance(fragment, str) or not fragment.strip()]


def test_every_row_expects_a_message():
    """An empty fragment is in every message, so its row could never fail: each row must name what it expects."""
    import test_bad_input_failures
    import test_bad_input_runs
    import test_prepare_bad_input

    assert empty_fragments({"T": [("a", ""), ("b", " "), ("c", None), ("d", "x")]}) == ["T[a]", "T[b]", "T[c]"]
    tables = {"CONFIG_CASES": [(f"{c[0]} {c[1]} {c[2]}", c[4]) for c in CONFIG_CASES],
              "DAMAGE": [(k, v[2]) for k, v in DAMAGE.items()],
              "PREPARE": [(k, v[4]) for k, v in PREPARE.items()], "DECODE": [(k, v[2]) for k, v in DECODE.items()],
              "DRIFT": [(k, v[2]) for k, v in DRIFT.items()],
              "FAILURES": [(k, v[2]) for k, v in test_bad_input_failures.FAILURES.items()],
              "TWO_RANK_CASES": test_bad_input_runs.TWO_RANK_CASES,
              "test_prepare_bad_input.DAMAGE": [(k, v[3]) for k, v in test_prepare_bad_input.DAMAGE.items()]}
    assert not empty_fragments(tables), f"rows whose expected message is empty: {empty_fragments(tables)}"
