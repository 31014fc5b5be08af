"""MLoRE decoder: router invariants and ties, inits, equality with a transcription of the official block and decoder,
load-balance loss, official key map, parameter counts (methods.md §1). Merged inference: test_mlore_merge.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mlore_testing import OfficialConvHead, one_thread, randomize_bn, rel_err  # noqa: F401 - one_thread: an autouse fixture
from torch import nn

from pretrain.models.decoders import build_mlore, load_strict, official_to_ours, ours_to_official
from pretrain.models.decoders.lowrank import ExpertKernels, LowRankConv, LowRankExperts
from pretrain.models.decoders.mlore_block import MLoREBlock
from pretrain.models.decoders.mlore_official import OfficialLora, OfficialMoEBlock
from pretrain.models.decoders.router import balance_loss, route_top_k

PASCAL = {"semseg": 21, "human_parts": 7, "sal": 2, "normals": 3, "edge": 1}
SMALL = {"channels": 16, "ranks": (2, 3, 4, 5, 6), "spe_rank": 3, "top_k": 3}


# ---------------------------------------------------------------- low-rank experts


def test_expert_kernels_gradcheck_and_equal_to_the_product():
    ranks = (2, 3, 1)
    w = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    m = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    want = torch.stack([m_e @ w_e for m_e, w_e in zip(m.split(ranks, 1), w.split(ranks, 0))])
    assert torch.equal(ExpertKernels.apply(w, m, ranks), want)
    assert torch.autograd.gradcheck(lambda a, b: ExpertKernels.apply(a, b, ranks), (w, m))


def test_lowrank_form_equals_per_expert_convs():
    torch.manual_seed(0)
    experts = LowRankExperts(channels=8, ranks=(1, 2, 3))
    with torch.no_grad():
        experts.w_bias.normal_()
        experts.m_bias.normal_()
    x, gates = torch.randn(2, 8, 5, 5), torch.rand(2, 3)
    want = 0
    for e, (w, b, m) in enumerate(zip(experts.w_weight.split(experts.ranks), experts.w_bias.split(experts.ranks),
                                      experts.m_weight.split(experts.ranks, dim=1))):
        y = F.conv2d(F.conv2d(x, w, b, padding=1), m[:, :, None, None], experts.m_bias[e])
        want = want + gates[:, e, None, None, None] * y
    assert rel_err(experts.forward_lowrank(x, gates), want) < 1e-5


# ---------------------------------------------------------------- router


def test_route_top_k_golden_both_normalisations():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    std = torch.zeros(1, 4)
    post = route_top_k(logits, std, top_k=2, pre_softmax=False, noisy=False)
    full = torch.softmax(logits, dim=1)
    assert torch.allclose(post, torch.tensor([[full[0, 0], 0.0, full[0, 2], 0.0]]))
    pre = route_top_k(logits, std, top_k=2, pre_softmax=True, noisy=False)
    e = math.exp(1.0)
    assert torch.allclose(pre, torch.tensor([[e / (e + 1), 0.0, 1 / (e + 1), 0.0]]))


@pytest.mark.parametrize("pre_softmax", [True, False])
def test_router_exactly_k_experts_and_gate_sums(pre_softmax):
    torch.manual_seed(0)
    logits, std = torch.randn(64, 15), torch.randn(64, 15)
    for noisy in (False, True):
        gates = route_top_k(logits, std, top_k=9, pre_softmax=pre_softmax, noisy=noisy)
        assert ((gates > 0).sum(dim=1) == 9).all()
        sums = gates.sum(dim=1)
        if pre_softmax:
            assert torch.allclose(sums, torch.ones(64))
        else:
            assert (sums < 1).all()
    expected = torch.softmax(logits, 1).topk(9, dim=1).values.sum(1)
    assert torch.allclose(route_top_k(logits, std, top_k=9, pre_softmax=False, noisy=False).sum(1), expected)


def test_router_noise_only_in_training_and_std_raw_unless_softplus():
    torch.manual_seed(0)
    logits, std = torch.randn(4, 6), torch.randn(4, 6)
    torch.manual_seed(1)
    noisy = route_top_k(logits, std, top_k=6, pre_softmax=True, noisy=True)
    torch.manual_seed(1)
    assert torch.allclose(noisy, torch.softmax(logits + torch.randn(4, 6) * std, dim=1))  # raw std, even negative
    torch.manual_seed(1)
    soft = route_top_k(logits, std, top_k=6, pre_softmax=True, noisy=True, noise_softplus=True)
    torch.manual_seed(1)
    assert torch.allclose(soft, torch.softmax(logits + torch.randn(4, 6) * F.softplus(std), dim=1))
    block = MLoREBlock(tasks=["a"], pre_softmax=False, **SMALL)
    x = {"a": torch.randn(2, 16, 5, 5)}
    block.eval()
    assert torch.equal(block(x)[1]["a"], block(x)[1]["a"])
    block.train()
    with torch.no_grad():  # a large noise std so training gates must differ between two calls
        block.router["a"].logits.bias[5:10] = 50.0
    assert not torch.equal(block(x)[1]["a"], block(x)[1]["a"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pre_softmax", [True, False])
def test_top_k_ties_drop_the_experts_the_official_drops(pre_softmax, dtype):
    """Tied logits (bf16 rounds many close ones together): the official drops `topk(E − k, largest=False)` of the
    logits (pre_softmax) or of the probabilities; keeping `topk(k)` of the largest picks other experts on ties."""
    official = OfficialMoEBlock(tasks=["a"], pre_softmax=pre_softmax, hw=1, **SMALL)  # E = 5, k = 3
    official.router_1["a"] = nn.ModuleList([nn.Identity(), nn.Identity()])  # route() reads [B, 2E+1] as given
    e, k = len(SMALL["ranks"]), SMALL["top_k"]
    logits_BE = torch.randint(0, 3, (256, e), generator=torch.Generator().manual_seed(0)).to(dtype)
    want, _ = official.route(torch.cat([logits_BE, torch.zeros(256, e + 1, dtype=dtype)], 1)[:, :, None, None], "a")
    got = route_top_k(logits_BE, torch.zeros_like(logits_BE), top_k=k, pre_softmax=pre_softmax, noisy=False)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(route_top_k(logits_BE, torch.zeros_like(logits_BE), top_k=k, pre_softmax=pre_softmax,
                                   noisy=False), got)  # deterministic
    largest_BE = torch.zeros_like(logits_BE, dtype=torch.bool).scatter_(1, logits_BE.topk(k, dim=1).indices, True)
    assert (largest_BE != (want > 0)).any()  # control: the rule of keeping the largest differs on these rows


def test_inits_follow_the_official_code():
    """Shared experts: Kaiming-uniform weights, zero biases (`LoraBlock.init_weights`); task experts (`conv2[t]`,
    never re-initialised officially): PyTorch's default conv init, biases included."""
    block = MLoREBlock(tasks=["a"], pre_softmax=False, **SMALL)
    assert not block.experts.w_bias.any() and not block.experts.m_bias.any()
    torch.manual_seed(3)
    ours = LowRankConv(channels=16, rank=SMALL["spe_rank"])
    torch.manual_seed(3)
    official = OfficialLora(16, SMALL["spe_rank"])
    for mine, theirs in ((ours.w, official.W), (ours.m, official.M)):
        assert torch.equal(mine.weight, theirs.weight) and torch.equal(mine.bias, theirs.bias)
        assert mine.bias.abs().min() > 0


def test_linear_pool_is_tied_to_its_resolution():
    block = MLoREBlock(tasks=["a"], pre_softmax=False, router_pool="linear", router_hw=(4, 4), **SMALL)
    block({"a": torch.randn(1, 16, 4, 4)})
    with pytest.raises(ValueError, match="router_hw"):
        block({"a": torch.randn(1, 16, 5, 5)})
    with pytest.raises(ValueError, match="router_hw"):
        MLoREBlock(tasks=["a"], pre_softmax=False, router_pool="linear", **SMALL)


# ---------------------------------------------------------------- block vs the official transcription


def official_and_ours(pre_softmax: bool, tasks=("a", "b"), hw=(6, 6)) -> tuple[OfficialMoEBlock, MLoREBlock]:
    torch.manual_seed(0)
    official = OfficialMoEBlock(tasks=tasks, pre_softmax=pre_softmax, hw=hw[0] * hw[1], **SMALL)
    randomize_bn(official)
    ours = MLoREBlock(tasks=tasks, pre_softmax=pre_softmax, router_pool="linear", router_hw=hw, **SMALL)
    state = official_to_ours({f"MLoRE_1.0.{k}": v.clone() for k, v in official.state_dict().items()})
    load_strict(ours, {k.removeprefix("blocks.0.0."): v for k, v in state.items()})
    return official, ours


@pytest.mark.parametrize("pre_softmax", [True, False])
@pytest.mark.parametrize("form", ["merged", "lowrank"])
def test_block_equals_official_in_training_with_noise(pre_softmax, form):
    official, ours = official_and_ours(pre_softmax)
    ours.train_form = form
    x = torch.randn(3, 16, 6, 6)
    torch.manual_seed(7)
    noise = torch.randn(3, 5)
    want, want_gates = official(x, "b", noise)
    torch.manual_seed(7)  # our router draws the same [B, E] normal sample
    got, got_gates = ours({"b": x})
    assert torch.allclose(got_gates["b"], want_gates, atol=1e-6)
    assert rel_err(got["b"], want) < 1e-5
    assert torch.allclose(ours.expert_norm["b"].running_mean, official.bn_all["b"].running_mean, atol=1e-6)


@pytest.mark.parametrize("pre_softmax", [True, False])
def test_block_eval_and_merged_equal_official_merge_loop(pre_softmax):
    official, ours = official_and_ours(pre_softmax)
    official.eval().reparameter()
    ours.eval()
    x = torch.randn(3, 16, 6, 6)
    want, _ = official.forward_merged_loop(x, "a")
    with torch.no_grad():
        merged = ours({"a": x})[0]["a"]  # the eval default
        ours.inference_form = "unmerged"
        unmerged = ours({"a": x})[0]["a"]
    assert rel_err(unmerged, want) < 1e-5
    assert rel_err(merged, want) < 1e-5


def test_generic_path_is_detached():
    block = MLoREBlock(tasks=["a"], pre_softmax=False, **SMALL)
    with torch.no_grad():  # silence every other path from u to the output: BN_all → 0, task expert → 0
        block.expert_norm["a"].weight.zero_()
        block.expert_norm["a"].bias.zero_()
        block.task_expert["a"].m.weight.zero_()
        block.task_expert["a"].m.bias.zero_()
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    block({"a": x})[0]["a"].pow(2).sum().backward()
    assert block.generic.weight.grad.abs().sum() > 0
    assert torch.count_nonzero(x.grad) == 0
    x.grad = None
    u = block.task_in["a"](x)  # control: the same conv without detach does pass a gradient
    block.generic(u).pow(2).sum().backward()
    assert torch.count_nonzero(x.grad) > 0


# ---------------------------------------------------------------- decoder


def small_decoder(**kw) -> nn.Module:
    options = {"embed_dim": 24, "depth": 8, "tasks": {"semseg": 5, "depth": 1}, **SMALL, **kw}
    return build_mlore(**options)


def test_balance_loss_golden_and_decoder_sums_eight_blocks():
    gates = [torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.0, 0.5, 0.5]])]
    # v = [0.25, 0.5, 0.25]: mean 1/3, unbiased variance 1/48 → CV² = (1/48) / (1/9) = 0.1875
    assert math.isclose(float(balance_loss(gates)), 0.1875, rel_tol=1e-6)
    dec = small_decoder(pre_softmax=True)
    seen = []
    for level in dec.blocks:
        for block in level:
            block.register_forward_hook(lambda _m, _i, out: seen.append(list(out[1].values())))
    feats = [torch.randn(2, 24, 4, 4) for _ in range(4)]
    _, aux = dec({"semseg": feats, "depth": feats}, (16, 16))
    assert len(seen) == 8
    want = sum(((torch.cat(g).mean(0).std() / torch.cat(g).mean(0).mean()) ** 2) for g in seen)
    assert torch.allclose(aux["mlore_balance"], want)


OfficialDecoderHead = OfficialConvHead


class OfficialDecoder(nn.Module):
    """The decoder part of the official `MLoRE` + `MLoREWrapper` (names as in the checkpoint, forward in eval)."""

    def __init__(self, embed: int, tasks: dict[str, int], hw: int) -> None:
        super().__init__()
        c = SMALL["channels"]
        kw = {"tasks": list(tasks), "pre_softmax": False, "hw": hw, **SMALL}
        self.fea_fuse = nn.ModuleList(nn.Conv2d(embed, c, 1) for _ in range(4))
        self.MLoRE_1 = nn.ModuleList(OfficialMoEBlock(**kw) for _ in range(4))
        self.MLoRE_2 = nn.ModuleList(OfficialMoEBlock(**kw) for _ in range(4))
        self.task_mask = nn.ModuleDict({t: nn.Sequential(nn.Conv2d(4 * c, c, 1), nn.BatchNorm2d(c), nn.GELU(),
                                                         nn.Conv2d(c, 4, 3, padding=1)) for t in tasks})
        self.heads = nn.ModuleDict({t: OfficialDecoderHead(c, n) for t, n in tasks.items()})

    def checkpoint(self) -> dict[str, torch.Tensor]:
        return {(k if k.startswith("heads.") else f"backbone.{k}"): v.clone() for k, v in self.state_dict().items()}

    def forward(self, feats: list[torch.Tensor], out_size) -> dict[str, torch.Tensor]:
        preds = {}
        for t, head in self.heads.items():
            levels = []
            for lvl in range(4):
                x = self.MLoRE_1[lvl](self.fea_fuse[lvl](feats[lvl]), t)[0]
                levels.append(self.MLoRE_2[lvl](x, t)[0])
            mask = torch.softmax(self.task_mask[t](torch.cat(levels, dim=1)), dim=1)
            fused = sum(mask[:, i:i + 1] * levels[i] for i in range(4))
            fused = F.interpolate(fused, scale_factor=4, mode="bilinear")
            preds[t] = F.interpolate(head.linear_pred(head.mt_proj(fused)), out_size, mode="bilinear")
        return preds


def test_official_checkpoint_loads_strictly_round_trips_and_matches():
    torch.manual_seed(0)
    tasks = {"semseg": 5, "human_parts": 7}
    official = OfficialDecoder(24, tasks, hw=16)
    randomize_bn(official)
    checkpoint = {**official.checkpoint(), "backbone.pos_embed": torch.zeros(1, 17, 24),
                  "backbone.blocks.0.attn.qkv.weight": torch.zeros(72, 24), "backbone.norm.weight": torch.ones(24)}
    ours = small_decoder(tasks=tasks, pre_softmax=False, router_pool="linear", router_hw=(4, 4))
    load_strict(ours, official_to_ours({f"module.{k}": v for k, v in checkpoint.items()}))
    back = ours_to_official(ours.state_dict(), SMALL["ranks"])
    want = official.checkpoint()
    assert set(back) == set(want)
    assert all(torch.equal(back[k], want[k]) for k in want)
    official.eval()
    ours.eval()
    feats = [torch.randn(2, 24, 4, 4) for _ in range(4)]
    with torch.no_grad():
        want_preds = official(feats, (20, 20))
        got_preds = ours({t: feats for t in tasks}, (20, 20))[0]
    for t in tasks:
        assert rel_err(got_preds[t], want_preds[t]) < 1e-5


def test_key_map_and_strict_loading_report_bad_keys():
    with pytest.raises(ValueError, match="does not know"):
        official_to_ours({"backbone.MLoRE_1.0.mystery.weight": torch.zeros(1)})
    ours = small_decoder()
    state = ours.state_dict()
    state.pop("proj.0.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing keys \['proj.0.weight'\].*1 unexpected keys \['extra.weight'\]"):
        load_strict(ours, state)
    with pytest.raises(ValueError, match="router_pool"):  # attention pooling has no official counterpart
        ours_to_official(ours.state_dict(), SMALL["ranks"])


def test_parameter_counts_pascal_vitl_match_official():
    with torch.device("meta"):
        dec = build_mlore(embed_dim=1024, depth=24, tasks=PASCAL, preset="pascal_vitl", router_pool="linear",
                          router_hw=(32, 32))
    heads = sum(p.numel() for mods in dec.predictor_modules().values() for m in mods for p in m.parameters())
    decoder = sum(p.numel() for p in dec.parameters()) - heads
    experts = sum(p.numel() for level in dec.blocks for b in level for p in b.experts.parameters())
    assert abs(decoder / 94.3e6 - 1) < 0.01, decoder
    assert abs(heads / 9.2e6 - 1) < 0.01, heads
    assert abs(experts / 39.1e6 - 1) < 0.01, experts
    assert dec.taps == (5, 11, 17, 23) and dec.aux_weights == {"mlore_balance": 3e-4}
