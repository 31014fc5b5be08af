"""MLoRE merged (re-parameterised) inference: the default of every eval forward, equal to the unmerged form, and its
cached fold never stale (methods.md §1 "Re-parameterisation").

Tolerance: fp32, max |merged − unmerged| / max |unmerged| < 1e-5 per prediction (observed ~1e-6 here, 5e-6 for
the full PASCAL ViT-S decoder in benchmarks/bench_mlore_merge.py): the two forms differ only in summation order.
"""

from __future__ import annotations

import pytest
import torch
from mlore_testing import one_thread, randomize_bn, rel_err  # noqa: F401 - one_thread: an autouse fixture
from torch import nn

from pretrain.config.load import load_config
from pretrain.models import build_backbone
from pretrain.models.decoders import DECODERS, MLORE_PRESETS, build_mlore, load_strict
from pretrain.models.decoders.mlore_block import MLoREBlock
from pretrain.models.dense import DenseModel, use_float_batchnorm_

TOL = 1e-5
SMALL = {"channels": 16, "ranks": (2, 3, 4, 5, 6), "spe_rank": 3, "top_k": 3}
TASKS = {"pascal": {"semseg": 21, "human_parts": 7, "sal": 2, "normals": 3, "edge": 1},
         "nyud": {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}}


def pair(**options) -> tuple[nn.Module, nn.Module]:
    """(default decoder, unmerged twin with the same weights), both in eval mode."""
    torch.manual_seed(0)
    merged = build_mlore(**options)
    randomize_bn(merged)
    unmerged = build_mlore(**options, inference_form="unmerged")
    load_strict(unmerged, merged.state_dict())
    return merged.eval(), unmerged.eval()


def predict(decoder: nn.Module, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return decoder(dict.fromkeys(decoder.tasks, feats), (16, 16))[0]


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for t in want:
        assert rel_err(got[t], want[t]) < TOL, t


@pytest.mark.parametrize("pre_softmax", [True, False])
@pytest.mark.parametrize("preset", ["pascal_vits", "nyud_vitl"])
def test_merged_equals_unmerged_at_both_presets_shapes(preset, pre_softmax):
    """The preset's experts (15 ranks, spe_rank, top-9) and task set, at 16 channels and 4×4 taps."""
    p = MLORE_PRESETS[preset]
    merged, unmerged = pair(embed_dim=24, depth=8, tasks=TASKS[preset.split("_")[0]], preset=preset, channels=16,
                            pre_softmax=pre_softmax)
    assert merged.blocks[0][0].experts.ranks == p["ranks"] and merged.blocks[0][0].router["semseg"].top_k == 9
    feats = [torch.randn(2, 24, 4, 4) for _ in range(4)]
    assert_close(predict(merged, feats), predict(unmerged, feats))


def tiny_dense_model(**decoder_options) -> DenseModel:
    cfg = load_config(None, ["model.size=vit_debug"])
    vit = build_backbone(cfg.model, cfg.moe)
    tasks = {"semseg": 5, "depth": 1}
    decoder = DECODERS["mlore"](embed_dim=vit.embed_dim, depth=vit.depth, tasks=tasks, **SMALL, **decoder_options)
    randomize_bn(decoder)
    return DenseModel(backbone=vit, decoder=decoder, tasks=list(tasks), routing="shared",
                      losses=dict.fromkeys(tasks, lambda pred, target: pred.mean()))


def test_default_eval_forward_is_the_merged_one(monkeypatch):
    """What every caller gets (evaluation, loaded and exported models call `DenseModel.eval()` + forward): no
    expert, task-expert or generic conv runs, one merged conv per task and block, same predictions."""
    torch.manual_seed(0)
    model = tiny_dense_model().eval()
    blocks = [m for m in model.modules() if isinstance(m, MLoREBlock)]
    calls = {"unmerged": 0, "merged": 0}
    for block in blocks:
        for part in (block.generic, *block.task_expert.values()):
            part.register_forward_hook(lambda *_: calls.__setitem__("unmerged", calls["unmerged"] + 1))
    real = MLoREBlock.merged_mix

    def spy(self, *args):
        calls["merged"] += 1
        return real(self, *args)

    monkeypatch.setattr(MLoREBlock, "merged_mix", spy)
    monkeypatch.setattr(MLoREBlock, "expert_mix", lambda *_: pytest.fail("eval ran the unmerged expert sum"))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        got = model(images)
    assert calls == {"unmerged": 0, "merged": 8} and all(b.merged_inference for b in blocks)
    monkeypatch.undo()
    for block in blocks:
        block.inference_form = "unmerged"
    with torch.no_grad():
        want = model(images)
    assert calls["unmerged"] == 8 * 4  # per block and task (2 tasks): the generic conv and the task expert
    assert_close(got, want)


def test_fold_cache_is_reused_and_never_stale():
    """Rebuilt after any weight or statistics change (an optimizer step with no train() between, fused or not,
    load_state_dict, in-place writes, .to()); reused while nothing changes; no cache with gradients on."""
    torch.manual_seed(0)
    block = MLoREBlock(tasks=["a", "b"], pre_softmax=False, **SMALL)
    randomize_bn(block)
    block.eval()
    x = {t: torch.randn(2, 16, 5, 5) for t in ("a", "b")}
    folds = []
    real_fold = block.fold
    block.fold = lambda: folds.append(1) or real_fold()

    def run(form: str = "merged") -> dict[str, torch.Tensor]:
        block.inference_form = form
        with torch.no_grad():
            return block(x)[0]

    run()
    run()
    assert len(folds) == 1 and block._fold_cache is not None
    for options in ({"foreach": True}, {"foreach": False}, {"fused": True}):
        optimizer = torch.optim.AdamW(block.parameters(), lr=0.05, **options)
        run()
        block.inference_form = "merged"
        out = block(x)[0]  # eval mode with gradients (frozen BN): built under autograd, the cache dropped
        assert block._fold_cache is None  # (a fused optimizer step bumps no version counter)
        sum(y.pow(2).mean() for y in out.values()).backward()
        assert all(p.grad is not None for p in block.parameters())
        if "fused" not in options:
            run()  # cached between backward and step: the step's version bumps invalidate it
        optimizer.step()
        optimizer.zero_grad()
        assert_close(run(), run("unmerged"))
    other = MLoREBlock(tasks=["a", "b"], pre_softmax=False, **SMALL)
    randomize_bn(other, seed=1)
    run()
    block.load_state_dict(other.state_dict())
    assert block._fold_cache is None
    assert_close(run(), run("unmerged"))
    with torch.no_grad():
        for bn in block.expert_norm.values():
            bn.running_var.mul_(3.0)
        block.task_expert["b"].m.bias.add_(1.0)
    assert_close(run(), run("unmerged"))
    block.to(torch.float64)
    x = {t: v.double() for t, v in x.items()}
    assert_close(run(), run("unmerged"))
    block.train()
    assert block._fold_cache is None


def test_state_dict_stays_training_form_and_eval_only():
    block = MLoREBlock(tasks=["a"], pre_softmax=False, **SMALL)
    keys = set(block.state_dict())
    x = {"a": torch.randn(2, 16, 5, 5)}
    assert not block.merged_inference  # training mode: BN batch statistics cannot be folded
    block.eval()
    assert block.merged_inference
    with torch.no_grad():
        block(x)
    assert set(block.state_dict()) == keys
    with pytest.raises(ValueError, match="inference_form"):
        MLoREBlock(tasks=["a"], pre_softmax=False, inference_form="fast", **SMALL)


def test_merged_in_bf16_with_float_batchnorm_is_as_close_as_unmerged():
    """The configs fine-tune and evaluate in bf16: the fold runs in fp32 from bf16 weights and fp32 statistics."""
    merged, unmerged = pair(embed_dim=24, depth=8, tasks={"semseg": 5, "depth": 1}, pre_softmax=True, **SMALL)
    feats = [torch.randn(2, 24, 4, 4) for _ in range(4)]
    want = predict(unmerged, feats)
    for dec in (merged, unmerged):
        use_float_batchnorm_(dec)  # as DenseModel does: BN in fp32; DeepSpeed's bf16 casts parameters only
        for param in dec.parameters():
            param.data = param.data.bfloat16()
    got_merged = predict(merged, [f.bfloat16() for f in feats])
    got_unmerged = predict(unmerged, [f.bfloat16() for f in feats])
    for t in want:
        assert got_merged[t].dtype == torch.bfloat16
        assert rel_err(got_merged[t].float(), want[t]) < max(5e-2, 2 * rel_err(got_unmerged[t].float(), want[t]))


@pytest.mark.slow  # ViT-L widths: 13 s
@pytest.mark.parametrize("preset", list(MLORE_PRESETS))
def test_block_merged_equals_unmerged_at_every_preset_width(preset):
    p = MLORE_PRESETS[preset]
    torch.manual_seed(0)
    block = MLoREBlock(channels=p["channels"], tasks=["a"], ranks=p["ranks"], spe_rank=p["spe_rank"],
                       top_k=p["top_k"], pre_softmax=p["pre_softmax"])
    x = {"a": torch.randn(2, p["channels"], 3, 3)}
    out, gates = block(x)
    assert out["a"].shape == (2, p["channels"], 3, 3) and gates["a"].shape == (2, 15)
    assert ((gates["a"] > 0).sum(1) == p["top_k"]).all()
    randomize_bn(block)
    block.eval()
    with torch.no_grad():
        merged = block(x)[0]["a"]
        block.inference_form = "unmerged"
        unmerged = block(x)[0]["a"]
    assert rel_err(merged, unmerged) < TOL


@pytest.mark.slow  # 1.2 s
def test_saved_in_training_form_then_loaded_eval_is_merged_and_equal():
    torch.manual_seed(0)
    options = {"embed_dim": 24, "depth": 8, "tasks": {"semseg": 5, "depth": 1}, **SMALL}
    dec = build_mlore(**options, inference_form="unmerged")
    feats = [torch.randn(2, 24, 4, 4) for _ in range(4)]
    for _ in range(2):  # a few training steps: BN statistics and weights move away from their init
        preds, aux = dec(dict.fromkeys(dec.tasks, feats), (16, 16))
        (sum(p.pow(2).mean() for p in preds.values()) + aux["mlore_balance"]).backward()
        with torch.no_grad():
            for p in dec.parameters():
                p -= 0.01 * p.grad
                p.grad = None
    fresh = build_mlore(**options)
    load_strict(fresh, dec.state_dict())
    assert_close(predict(fresh.eval(), feats), predict(dec.eval(), feats))


def test_dense_model_passes_the_decoders_no_weight_decay_names_to_the_optimizer():
    from pretrain.parallel.engine import param_groups

    model = tiny_dense_model()
    skip = model.no_weight_decay()
    assert {n for n in skip if n.startswith("decoder.")} == {f"decoder.{n}" for n in model.decoder.no_weight_decay()}
    m_bias = dict(model.named_parameters())[next(n for n in skip if n.endswith("m_bias"))]
    decayed = next(g for g in param_groups(model, 0.05) if g["weight_decay"] > 0)
    assert all(p is not m_bias for p in decayed["params"])
