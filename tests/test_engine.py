"""DeepSpeed integration: generated config, param groups, factories, the DeepSpeed-backend layer, and 2-rank runs.

The 2-rank tests launch tests/dist_scripts/engine_*.py with torchrun on gloo (DS_ACCELERATOR=cpu).
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from harness import run_ranks, summary
from safetensors import safe_open
from safetensors.torch import load_file

import pretrain.parallel.engine as engine_mod
from pretrain.config.load import load_config
from pretrain.models import build_model as build_from_sections
from pretrain.models.moe import MoEMlp
from pretrain.parallel.ds_moe import DeepSpeedMoEMlp
from pretrain.parallel.engine import apply_expert_marking, build_engine, make_ds_config, param_groups
from pretrain.parallel.layers import moe_mlp_factory
from pretrain.runs import checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "dist_scripts"
sys.path.insert(0, str(SCRIPTS))
from engine_common import eval_logits, make_cfg  # noqa: E402


def build_model(cfg, **kwargs):
    return build_from_sections(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks, **kwargs)


def run_dist(script: str, *args: str, timeout: float = 600) -> dict:
    """Run tests/dist_scripts/<script> on 2 gloo ranks; its JSON summary. A mismatch fails the launch, and the
    AssertionError shows each rank's output (the script names the tensor, step and difference)."""
    return summary(run_ranks(script, *args, timeout=timeout).stdout)


# ---------------------------------------------------------------- generated DeepSpeed config


def test_ds_config_is_generated_from_the_schema():
    cfg = load_config(None, ["engine.zero_stage=2", "engine.precision=bf16", "engine.grad_accum=3",
                             "optim.warmup_steps=7", "optim.min_lr_ratio=0.05", "optim.grad_clip=0.5",
                             "train.max_steps=123"])
    ds = make_ds_config(cfg.engine, cfg.optim, max_steps=cfg.train.max_steps, world_size=4)
    batch_keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    assert [ds[k] for k in batch_keys] == [1, 3, 12]
    assert ds["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True}
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 0.5 and not ds["wall_clock_breakdown"]
    assert ds["steps_per_print"] >= 10**9
    assert ds["scheduler"] == {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 123, "warmup_min_ratio": 0.0, "warmup_num_steps": 7, "warmup_type": "linear",
        "cos_min_ratio": 0.05}}
    assert "optimizer" not in ds  # AdamW is built by build_engine (no JIT-compiled CPU FusedAdam)
    fp32_cfg = load_config(None, ["engine.precision=fp32", "optim.warmup_steps=0"])
    fp32 = make_ds_config(fp32_cfg.engine, fp32_cfg.optim, max_steps=fp32_cfg.train.max_steps, world_size=1)
    assert fp32["bf16"] == {"enabled": False}
    assert fp32["scheduler"]["params"]["warmup_min_ratio"] == 1.0  # no warmup: the ramp starts at the full lr


def test_ds_config_is_accepted_by_deepspeed():
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config(None, ["engine.zero_stage=1", "engine.grad_accum=2"])
    parsed = DeepSpeedConfig(make_ds_config(cfg.engine, cfg.optim, max_steps=cfg.train.max_steps, world_size=1))
    assert (parsed.train_batch_size, parsed.zero_optimization_stage, parsed.scheduler_name) == (2, 1, "WarmupCosineLR")
    assert parsed.scheduler_params["warmup_type"] == "linear" and parsed.checkpoint_tag_validation_fail


# ---------------------------------------------------------------- param groups and expert marking


def test_param_groups_names_weight_decay_and_moe_split():
    cfg = make_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    assert apply_expert_marking(model, ep_size=1) > 0
    groups = param_groups(model, weight_decay=0.05)
    assert all("name" in g for g in groups)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter exactly once
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    for name in ("backbone.pos_embed", "backbone.cls_token", "backbone.task_embed", "backbone.norm.weight",
                 "backbone.blocks.1.mlp.experts.b1", "backbone.blocks.1.mlp.experts.b2",
                 "backbone.blocks.0.norm1.bias"):
        assert name in no_decay, name
    for name in ("backbone.blocks.1.mlp.experts.w1", "backbone.blocks.1.mlp.router.weight",
                 "backbone.patch_embed.proj.weight", "heads.cls.fc.weight"):
        assert name in decay, name
    moe = [g for g in groups if g.get("moe")]
    assert {g["name"] for g in moe} == {"ep_size_1"}
    assert {names[id(p)] for g in moe for p in g["params"]} == {
        n for n in names.values() if ".mlp.experts." in n}
    assert isinstance(model.ds_moe_marker, engine_mod.MoE) and not list(model.ds_moe_marker.parameters())


def test_moe_mlp_factory_initialises_identically_for_every_ep_size():
    cfg1, cfg2 = make_cfg("engine.ep_size=1"), make_cfg("engine.ep_size=2")
    torch.manual_seed(0)
    full = build_model(cfg1, moe_mlp_layer=moe_mlp_factory(cfg1.moe, cfg1.engine, rank=0)).state_dict()
    for rank in (0, 1):
        torch.manual_seed(0)
        part = build_model(cfg2, moe_mlp_layer=moe_mlp_factory(cfg2.moe, cfg2.engine, rank=rank)).state_dict()
        assert part.keys() == full.keys()
        for key, value in part.items():
            expect = full[key][2 * rank:2 * rank + 2] if ".mlp.experts." in key else full[key]
            assert torch.equal(value, expect), key


def test_build_engine_refuses_zero0_clipping_under_ep():
    cfg = make_cfg("engine.ep_size=2", "engine.zero_stage=0", "optim.grad_clip=1.0")
    with pytest.raises(ValueError, match="zero_stage=0 with engine.ep_size>1"):
        build_engine(torch.nn.Linear(2, 2), engine=cfg.engine, optim=cfg.optim, max_steps=1, world_size=2)
    cfg = make_cfg("engine.ep_size=2")
    with pytest.raises(ValueError, match="must divide the world size 3"):
        build_engine(torch.nn.Linear(2, 2), engine=cfg.engine, optim=cfg.optim, max_steps=1, world_size=3)


# ---------------------------------------------------------------- DeepSpeed backend layer (one process)


@pytest.mark.parametrize("top_k,gate", [(1, "raw"), (2, "raw"), (3, "renorm")])
def test_deepspeed_backend_equals_native_layer_when_nothing_is_dropped(top_k, gate):
    kw = dict(dim=8, hidden_dim=16, num_experts=4, top_k=top_k, num_tasks=3, gate=gate, router_init="normal")
    torch.manual_seed(0)
    native = MoEMlp(**kw)
    torch.manual_seed(0)
    ds = DeepSpeedMoEMlp(**kw, capacity_factor=100.0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    task = torch.tensor([0, 2])
    y_native, y_ds = native(x, task), ds(x, task)
    torch.testing.assert_close(y_ds, y_native, rtol=0, atol=1e-6)
    assert float(ds.gate.drop_fraction) == 0.0
    g_native = torch.autograd.grad(y_native.square().sum(), [x, native.router.weight])
    g_ds = torch.autograd.grad(y_ds.square().sum(), [x, ds.routing.router.weight])
    for a, b in zip(g_native, g_ds):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert ds.routing.aux.keys() == native.aux.keys()
    torch.testing.assert_close(ds.routing.aux["mi"], native.aux["mi"])
    assert torch.equal(ds.routing.last_counts_TE, native.last_counts_TE)


def test_deepspeed_backend_drops_over_capacity_and_passes_them_as_zero():
    torch.manual_seed(0)
    layer = DeepSpeedMoEMlp(dim=8, hidden_dim=16, num_experts=4, top_k=1, num_tasks=1, router_init="zero",
                            capacity_factor=0.5, min_capacity=1)
    x = torch.randn(1, 16, 8)
    y = layer(x, torch.tensor([0]))  # zero router: every token picks the same expert, capacity 2 of 16
    assert float(layer.gate.drop_fraction) == pytest.approx(14 / 16)
    assert int((y.abs().sum(-1) == 0).sum()) == 14
    with pytest.raises(RuntimeError, match="TaskGate has no routing"):
        layer.gate(x.view(-1, 8), None, True)


# ---------------------------------------------------------------- two gloo ranks


def test_ep2_matches_ep1_through_deepspeed_zero012():
    """One EP=2 step and parity with EP=1 (different data per rank) for ZeRO-0, 1 and 2 (see engine_parity.py)."""
    result = run_dist("engine_parity.py", "0,1,2")
    assert sorted(result["stages"]) == ["0", "1", "2"] and (result["tol"], result["weight_tol"]) == (1e-5, 1e-4)
    for zero, stage in result["stages"].items():
        assert stage["max_loss_diff"] <= 1e-5 and stage["max_weight_diff"] <= 1e-4, (zero, stage)
        assert stage["experts_moved"] > 0 and stage["losses"][0] != stage["losses"][-1], (zero, stage)


def test_deepspeed_backend_trains_on_two_ranks_and_checkpoints_every_expert(tmp_path):
    result = run_dist("engine_ds_backend.py", str(tmp_path))
    assert len(result["losses"]) == 2 and all(map(math.isfinite, result["losses"])) and len(result["changed"]) == 2
    tag_dir = tmp_path / "ckpt" / checkpoint.read_latest(tmp_path / "ckpt")
    keys = set()
    for path in tag_dir.glob("experts_ep*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            keys |= set(f.keys())
    for layer in ("backbone.blocks.1.mlp", "backbone.blocks.3.mlp"):
        ids = {int(k.split(".deepspeed_experts.")[1].split(".")[0]) for k in keys if k.startswith(layer)}
        assert ids == {0, 1, 2, 3}, (layer, ids)
    cfg = make_cfg("moe.backend=deepspeed", "engine.ep_size=1", "moe.capacity_factor=1.0")
    torch.manual_seed(123)
    model = build_model(cfg, moe_mlp_layer=moe_mlp_factory(cfg.moe, cfg.engine, rank=0))
    checkpoint.load_model_weights(tmp_path / "ckpt", model)
    ref = load_file(str(tmp_path / "ref_ds.safetensors"))["logits"]
    torch.testing.assert_close(eval_logits(model), ref, rtol=0, atol=1e-5)


def test_deepspeed_builds_its_op_with_the_interpreters_ninja():
    """An activated venv and `.venv/bin/pretrain` must find the same ninja, or each rebuilds the other's cached op."""
    import os

    venv_bin = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(venv_bin, "ninja")):
        pytest.skip(f"no ninja beside {sys.executable}")
    assert os.environ["PATH"].split(os.pathsep)[0] == venv_bin  # set when pretrain.parallel.engine was imported
