"""`pretrain export` / `pretrain extract`: portable files, keep rules, submodels that reproduce the full model."""

import json
import sys
from pathlib import Path

import pytest
import torch
from harness import run as run_cmd
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pretrain.cli import main as cli_main
from pretrain.config.load import load_config
from pretrain.extraction.extract import count_routes, extract_submodel, make_submodel, routed_layers, save_submodel
from pretrain.extraction.keep_rules import choose_experts, keep_mass, keep_modsquad, keep_topn
from pretrain.models import build_model
from pretrain.runs import checkpoint
from pretrain.runs.portable import config_metadata, load_model, write_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.size=vit_debug", "model.drop_path=0.0", "model.det_min_size=64", "model.det_max_size=64",
        "model.pyramid_dim=32", "moe.num_experts=8", "moe.top_k=2", "moe.attn_num_experts=8", "moe.attn_top_k=2",
        "moe.router_init=normal", "tasks.cls.num_classes=0", "tasks.seg.num_classes=0", "tasks.cls.img_size=32",
        "tasks.det.img_size=64", "tasks.seg.img_size=32"]
CLASSES = {"cls": 5, "det": 3, "seg": 4}


def images(size: int = 32, batch: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def model_file(path: Path, *overrides: str, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A `kind=model` file of a tiny three-task model with random weights and a random usage table."""
    cfg = load_config(None, [*TINY, *overrides])
    torch.manual_seed(seed)
    model = build_model(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks, num_classes=CLASSES).eval()
    with torch.no_grad():
        for layer in routed_layers(model).values():
            layer.usage_TE.copy_(torch.rand(layer.usage_TE.shape) ** 3)
    meta = {**config_metadata(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks), "task_names": list(model.task_ids),
            "task_ids": model.task_ids, "num_classes": CLASSES, "classes": {}, "dtype": "fp32", "step": 3}
    return write_file(path, model.state_dict(), meta, kind="model"), model


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    path, model = model_file(tmp_path_factory.mktemp("full") / "full.safetensors")
    return path, model, load_model(path)


def same_outputs(a, b, task: str, x: torch.Tensor) -> None:
    with torch.no_grad():
        out_a, out_b = a(x, task=task), b(x, task=task)
    if task == "det":
        for da, db in zip(out_a, out_b):
            assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
    else:
        assert torch.equal(out_a, out_b), (out_a - out_b).abs().max()


class Direct(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, task):
        return self.model(task, x)


# ---------------------------------------------------------------- keep rules


def test_keep_rules_on_a_hand_built_usage_row():
    u = torch.tensor([50.0, 30, 10, 6, 3, 1, 0, 0])  # percent already; k = 2
    assert keep_modsquad(u, top_k=2, thresh=3) == [0, 1, 2, 3, 4]  # > 1.5 %: the 1 % expert goes
    assert keep_modsquad(u * 7, top_k=2, thresh=3) == [0, 1, 2, 3, 4]  # scale-free
    assert keep_modsquad(u, top_k=2, thresh=30) == [0, 1]  # > 15 %
    assert keep_modsquad(u, top_k=2, thresh=100) == [0, 1]  # > 50 %: nobody; floor = the 2 most used
    assert keep_topn(u, top_k=2, keep=3) == [0, 1, 2]
    assert keep_topn(u, top_k=2, keep=1) == [0, 1]  # floor k
    assert keep_mass(u, top_k=2, mass=0.8) == [0, 1]  # 80 % exactly
    assert keep_mass(u, top_k=2, mass=0.85) == [0, 1, 2]
    assert keep_mass(u, top_k=2, mass=1.0) == [0, 1, 2, 3, 4, 5]  # every used expert, none unused
    assert keep_topn(torch.ones(4), top_k=1, keep=2) == [0, 1]  # ties: lower id
    with pytest.raises(ValueError, match="--keep 9 is more than the layer's 8 experts"):
        keep_topn(u, top_k=2, keep=9)
    with pytest.raises(ValueError, match="--mass 1.5"):
        keep_mass(u, top_k=2, mass=1.5)


def test_several_tasks_keep_the_union():
    usage = {"l": torch.tensor([[9.0, 1, 0, 0], [0, 0, 1, 9], [5, 5, 5, 5]])}
    assert choose_experts(usage, {"l": 1}, [0], "topn", keep=1) == {"l": [0]}
    assert choose_experts(usage, {"l": 1}, [0, 1], "topn", keep=1) == {"l": [0, 3]}
    assert choose_experts(usage, {"l": 1}, [0, 1], "mass", mass=0.9) == {"l": [0, 3]}
    assert choose_experts(usage, {"l": 1}, [0, 1], "modsquad", thresh=5) == {"l": [0, 1, 2, 3]}  # > 5 %: 10 % ones


# ---------------------------------------------------------------- model files and submodels


def test_model_file_rebuilds_the_model(full):
    _, model, loaded = full
    assert loaded.tasks == ["cls", "det", "seg"] and not loaded.training
    for task, size in (("cls", 32), ("det", 64), ("seg", 32)):
        same_outputs(loaded, Direct(model), task, images(size))
    with pytest.raises(ValueError, match="pass task="):
        loaded(images())


def test_topn_keeping_every_expert_reproduces_the_full_model(full):
    _, model, loaded = full
    for tasks in (["cls"], ["det", "seg"]):
        for exact in (False, True):
            sub = extract_submodel(loaded, tasks, rule="topn", keep=8, exact_routing=exact).sub
            for task in tasks:
                same_outputs(sub, Direct(model), task, images(64 if task == "det" else 32))
    sub = extract_submodel(loaded, ["cls"], rule="topn", keep=8).sub
    assert torch.equal(sub(images()), model("cls", images()))  # single task: no task= needed


def test_exact_routing_reproduces_the_full_model_when_no_route_is_dropped(full):
    _, model, loaded = full
    x = images(16, batch=1)  # 5 tokens × k=2: most layers leave experts unused
    with torch.no_grad(), count_routes(loaded.model) as counts:
        reference = model("cls", x)
        loaded(x, task="cls")
    kept = choose_experts(counts, {n: 2 for n in counts}, [0], "mass", mass=1.0)  # every expert these images use
    assert sum(8 - len(ids) for ids in kept.values()) >= 4, kept  # the test drops experts
    exact = make_submodel(loaded, ["cls"], kept, exact_routing=True)
    assert torch.equal(exact(x), reference)
    modsquad = make_submodel(loaded, ["cls"], kept, exact_routing=False)  # softmax over fewer experts: other gates
    assert not torch.allclose(modsquad(x), reference, atol=1e-6)
    other = images(32, seed=9)  # routes to dropped experts: exact routing no longer exact
    assert not torch.allclose(exact(other), model("cls", other), atol=1e-6)


def permuted(model: torch.nn.Module, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full model's state with each MoE layer's experts reordered: new expert j = old expert perm[j]."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, perm in perms.items():
        prefix = f"backbone.{name}."
        for key in [k for k in state if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if rest.startswith(("experts.", "heads.")):
                state[key] = state[key][perm]
            elif rest.startswith("router.") or rest.endswith("_TE"):
                state[key] = state[key][:, perm]
    return state


@pytest.mark.parametrize("exact", [False, True])
def test_expert_order_does_not_change_the_submodel(full, tmp_path, exact):
    _, model, loaded = full
    g = torch.Generator().manual_seed(1)
    perms = {name: torch.randperm(8, generator=g) for name in routed_layers(model)}
    _, twin = model_file(tmp_path / "scratch.safetensors")  # same seed: the same structure
    twin.load_state_dict(permuted(model, perms))
    meta = {k: v for k, v in loaded.meta.items() if k not in ("format", "format_version", "kind", "pretrain_version")}
    twin_path = write_file(tmp_path / "twin.safetensors", twin.state_dict(), meta, kind="model")
    a = extract_submodel(loaded, ["seg"], rule="modsquad", thresh=20, exact_routing=exact)
    b = extract_submodel(load_model(twin_path), ["seg"], rule="modsquad", thresh=20, exact_routing=exact)
    assert any(len(ids) < 8 for ids in a.kept.values())
    for name, perm in perms.items():
        assert sorted(perm[b.kept[name]].tolist()) == a.kept[name]
    x = images(32, seed=2)
    # equal up to float rounding: the softmax sums the same logits in another order
    torch.testing.assert_close(b.sub(x), a.sub(x), rtol=0, atol=1e-5)


def test_multi_task_submodel_and_its_file(full, tmp_path):
    path, model, loaded = full
    both = extract_submodel(loaded, ["seg", "cls"], rule="modsquad", thresh=15)
    singles = [extract_submodel(loaded, [t], rule="modsquad", thresh=15) for t in ("seg", "cls")]
    assert both.kept == {n: sorted(set(singles[0].kept[n]) | set(singles[1].kept[n])) for n in both.kept}
    out = save_submodel(both, tmp_path / "sub.safetensors")
    from pretrain import load_submodel

    sub = load_submodel(out)
    assert sub.tasks == ["seg", "cls"] and sub.model.task_ids == {"seg": 0, "cls": 1}
    for task in ("seg", "cls"):
        same_outputs(sub, both.sub, task, images())
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
        assert not any(k.startswith("heads.det.") for k in keys)
        for name, ids in both.kept.items():
            stacked = "experts.w1" if name.endswith("mlp") else "heads.q_weight"
            assert f.get_slice(f"backbone.{name}.{stacked}").get_shape()[0] == len(ids)
            assert f.get_slice(f"backbone.{name}.router.weight").get_shape()[:2] == [2, len(ids)]
        assert f.get_slice("backbone.task_embed").get_shape()[0] == 2
        assert json.loads(f.metadata()["kept"]) == both.kept
    assert out.stat().st_size < path.stat().st_size
    with pytest.raises(ValueError, match="pass task="):
        sub(images())


def test_bad_requests_are_refused_with_clear_messages(full, tmp_path, capsys):
    path, _, loaded = full
    out = str(tmp_path / "x.safetensors")
    cases = [(["--task", "depth"], "unknown task(s) ['depth']; this model has ['cls', 'det', 'seg']"),
             (["--task", "cls", "--rule", "topn", "--keep", "9"], "--keep 9 is more than the experts of layers"),
             (["--task", "cls", "--step", "3"], "--step applies to a run directory")]
    for args, message in cases:
        assert cli_main(["extract", str(path), "--out", out, "--no-report", *args]) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # info logs of the model build come before it
        assert message in last and last.startswith("pretrain extract: error:") and "Traceback" not in err, err
    dense, _ = model_file(tmp_path / "dense.safetensors", "moe.placement=dense")
    assert cli_main(["extract", str(dense), "--task", "cls", "--out", out, "--no-report"]) == 2
    assert "no MoE layers (placement 'dense'): nothing to extract" in capsys.readouterr().err
    assert cli_main(["extract", str(tmp_path / "none.safetensors"), "--task", "cls", "--out", out]) == 2
    assert "no such model file" in capsys.readouterr().err


# ---------------------------------------------------------------- export from run directories


def native_run(run_dir: Path, shards: Path, *overrides: str, seed: int = 3):
    from test_runs import write_checkpoint

    from pretrain.config.load import save_resolved
    from pretrain.data.build import check_shards
    from pretrain.runs.load import build_run_model

    cfg = load_config(None, [f"data.root={shards}", f"output_dir={run_dir}", *TINY, "engine.precision=fp32",
                             *overrides])
    torch.manual_seed(seed)
    model = build_run_model(cfg, num_classes=check_shards(cfg.data, cfg.tasks).num_classes, rank=0, single_process=True)
    save_resolved(cfg, run_dir)
    write_checkpoint(run_dir, model, 7)
    return model.eval()


def test_export_refuses_incomplete_runs(shards, tmp_path, capsys):
    run = tmp_path / "run"
    native_run(run, shards)
    out = str(tmp_path / "m.safetensors")
    assert cli_main(["export", str(run), "--step", "8", "--out", out]) == 2
    assert "no checkpoint for step 8 (have steps [7])" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path), "--out", out]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    tag = run / "checkpoints" / "step_00000007"
    (tag / checkpoint.META).write_text(json.dumps({"step": 7, "world_size": 2, "ep_size": 2}))
    assert cli_main(["export", str(run), "--out", out]) == 2
    assert "missing expert files ['experts_ep1.safetensors']" in capsys.readouterr().err
    (tag / checkpoint.META).unlink()
    experts = load_file(str(tag / "experts_ep0.safetensors"))
    save_file({k: v for k, v in experts.items() if not k.endswith(".2")}, str(tag / "experts_ep0.safetensors"))
    assert cli_main(["export", str(run), "--out", out]) == 2
    assert "experts [2] of backbone.blocks.1.mlp" in capsys.readouterr().err
    (run / "checkpoints" / "latest").unlink()
    assert cli_main(["export", str(run), "--out", out]) == 2
    assert "no checkpoint (no 'latest' file)" in capsys.readouterr().err


def test_deepspeed_backend_checkpoint_exports_to_the_native_layout(shards, tmp_path):
    """A `moe.backend=deepspeed` model starts from the native model's weights for the same seed (ds_moe.py); its
    checkpoint exports into a file whose native model holds exactly those weights and computes the same outputs."""
    # the DeepSpeed backend's experts take timm's init (moe.init=auto picks Mod-Squad's for the native layer)
    native = native_run(tmp_path / "native", shards, "moe.init=timm")
    native_run(tmp_path / "ds", shards, "moe.backend=deepspeed", "moe.init=timm")
    keys = load_file(str(tmp_path / "ds/checkpoints/step_00000007/experts_ep0.safetensors"))
    assert "backbone.blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.3.0.weight" in keys
    out = cli_main(["export", str(tmp_path / "ds"), "--out", str(tmp_path / "ds.safetensors"), "--dtype", "fp32"])
    assert out == 0
    loaded = load_model(tmp_path / "ds.safetensors")
    state = native.state_dict()
    assert {k: v for k, v in state.items() if not k.startswith("objective.")}.keys() == loaded.model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    meta = loaded.meta
    assert meta["source"]["backend"] == "deepspeed" and meta["moe"]["backend"] == "native" and meta["step"] == 7
    assert [c["wnid"] for c in meta["classes"]["cls"]][:2] == ["n90000000", "n90000001"]
    assert len(meta["classes"]["det"]["categories"]) == meta["num_classes"]["det"]
    same_outputs(loaded, Direct(native), "seg", images())


def test_load_backbone_from_a_run_directory_a_model_file_and_a_submodel_file(shards, tmp_path):
    from pretrain import load_backbone

    native = native_run(tmp_path / "run", shards)
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.safetensors")]) == 0
    assert cli_main(["extract", str(tmp_path / "m.safetensors"), "--task", "seg", "--out",
                     str(tmp_path / "s.safetensors"), "--no-report", "--rule", "topn", "--keep", "8"]) == 0
    want = native.backbone.state_dict()
    for source in (tmp_path / "run", tmp_path / "m.safetensors"):
        got = load_backbone(source).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in got.items())
    sub = load_backbone(tmp_path / "s.safetensors")  # every expert kept: only the seg task's rows remain
    assert torch.equal(sub.task_embed, want["task_embed"][2:3])
    assert torch.equal(sub.blocks[1].mlp.router.weight, want["blocks.1.mlp.router.weight"][2:3])


@pytest.mark.slow  # a fresh interpreter importing torch: ~30 s on the shared machine
def test_files_load_without_deepspeed_or_a_process_group(shards, tmp_path):
    native_run(tmp_path / "run", shards)
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.safetensors"), "--dtype",
                     "bf16"]) == 0
    saved = load_file(tmp_path / "m.safetensors")  # routing statistics stay fp32 in a bf16 file (moe_routing.py)
    assert {str(t.dtype) for k, t in saved.items() if k.endswith("_TE")} == {"torch.float32"}
    assert saved["backbone.patch_embed.proj.weight"].dtype == torch.bfloat16
    assert cli_main(["extract", str(tmp_path / "m.safetensors"), "--task", "cls", "--out",
                     str(tmp_path / "s.safetensors"), "--no-report", "--rule", "topn", "--keep", "3"]) == 0
    code = ("import sys, torch, pretrain; m = pretrain.load_model(sys.argv[1]);"
            "s = pretrain.load_submodel(sys.argv[2]);"
            "b = pretrain.load_backbone(sys.argv[2]); x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8);"
            "print(s(x).shape[-1], m(x, task='seg').shape[1], type(b).__name__, b.patch_embed.proj.weight.dtype,"
            "{b.dtype for n, b in m.named_buffers() if n.endswith('usage_TE')},"
            "'deepspeed' in sys.modules, torch.distributed.is_initialized())")
    files = [str(tmp_path / "m.safetensors"), str(tmp_path / "s.safetensors")]
    proc = run_cmd([sys.executable, "-c", code, *files], timeout=300)  # harness.child_env: this checkout first
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["4", "150", "VisionTransformer", "torch.bfloat16", "{torch.float32}", "False",
                                   "False"]


@pytest.mark.slow
def test_extract_report_from_a_run_directory(shards, tmp_path, capsys):
    native_run(tmp_path / "run", shards)
    out = tmp_path / "cls.safetensors"
    assert cli_main(["extract", str(tmp_path / "run"), "--task", "cls", "--out", str(out), "--eval-images", "4",
                     "--latency-runs", "1", "--latency-batches", "1,2", "--calibrate",
                     str(shards / "imagenet" / "val"), "--calibrate-images", "4", "--rule", "mass", "--mass", "1",
                     "--exact-routing"]) == 0
    table = capsys.readouterr().out
    assert "params moe_layers" in table and "cls top1 (4 val images)" in table
    report = json.loads((tmp_path / "cls.report.json").read_text())
    assert (tmp_path / "cls.report.png").stat().st_size > 0
    # calibrated on the 4 images it is evaluated on, keeping every expert they use, routed exactly: the same model
    assert report["usage_source"] == "calibration" and report["dropped_routes"]["calibration"]["overall"] == 0.0
    assert report["dropped_routes"]["cls"]["overall"] == 0.0
    assert report["metrics"]["cls"]["full"] == report["metrics"]["cls"]["sub"]
    assert report["params"]["sub"]["moe_layers"] < report["params"]["full"]["moe_layers"]
    assert set(report["latency_ms"]["cls"]) == {"batch1", "batch2"} and report["flops_per_image"]["cls"]["sub"] > 0


@pytest.mark.slow
def test_ep2_run_exports_to_a_model_with_the_training_outputs(shards, tmp_path):
    """2 gloo ranks, EP=2, ZeRO-1: one step, checkpoint, eval outputs of every task (export_ep2.py); the exported
    file, loaded in this process, gives the same outputs up to float summation order: under EP an expert's GEMM
    runs over both ranks' tokens in one call, here over this process's, and oneDNN/MKL pick kernels (and thread
    splits) by shape, so logits move by ~1 ulp (measured: ≤ 2e-6 on seg logits of magnitude ~1). Anything real
    (a wrong or missing expert, a misplaced router row) moves them by orders of magnitude more."""
    from harness import run_ranks

    sys.path.insert(0, str(ROOT / "tests" / "dist_scripts"))
    from export_ep2 import outputs

    out = run_ranks("export_ep2.py", str(shards), str(tmp_path / "run"), timeout=900)
    assert "EXPORT EP2 OK" in out.stdout, out.stdout[-3000:]
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.safetensors")]) == 0
    ref = load_file(str(tmp_path / "run" / "ref.safetensors"))
    got = outputs(load_model(tmp_path / "m.safetensors").model)
    assert ref.keys() == got.keys()
    for key, value in ref.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)
        else:
            assert torch.equal(value, got[key]), key
