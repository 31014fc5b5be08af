"""Fidelity to Mod-Squad's official code (issue 14): statistics over all forwards of a step, options and inits.

The MI references below are independent transcriptions of Mod-Squad's `TaskMoE.update_aux_statistics` /
`get_aux_loss_and_clear` (sums over the T passes of one step, then one MI).
"""

import pytest
import torch

from pretrain.config.load import load_config
from pretrain.models import build_backbone as build_backbone_from_sections
from pretrain.models.moe import MoEMlp, init_experts_
from pretrain.models.moe_attention import MoEAttention
from pretrain.models.moe_losses import collect_aux_losses, pop_routing_counts


def build_backbone(cfg, **kwargs):
    """The backbone of a run config (the builder takes the config's model and moe sections)."""
    return build_backbone_from_sections(cfg.model, cfg.moe, **kwargs)

D, H, E, K, T, N = 12, 16, 4, 2, 3, 6


def make_layer(**kwargs) -> MoEMlp:
    torch.manual_seed(0)
    layer = MoEMlp(dim=D, hidden_dim=H, num_experts=E, top_k=K, num_tasks=T, mi_task_weighting="tokens", **kwargs)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    return layer.train()


def modsquad_mi(router_TED: torch.Tensor, batches: list[tuple[int, torch.Tensor]], top_k: int,
                prob_eps: float = 0.0) -> torch.Tensor:
    """Mod-Squad: per pass, S[t] += sum_tokens softmax(x W_t^T) (+eps), F += selections; then MI once."""
    num_t, num_e = router_TED.shape[:2]
    s_TE = torch.zeros(num_t, num_e)
    f_E = torch.zeros(num_e)
    for task, x_BND in batches:
        probs = torch.softmax(x_BND.reshape(-1, x_BND.shape[-1]) @ router_TED[task].t(), dim=1) + prob_eps
        chosen = torch.zeros_like(probs).scatter(1, probs.topk(top_k, dim=1).indices, 1.0)
        s_TE = s_TE.index_add(0, torch.tensor([task]), probs.sum(0, keepdim=True))
        f_E = f_E + chosen.sum(0)
    total = f_E.sum() / top_k
    p_TE = s_TE / (total + 1e-4)
    p_T1 = p_TE.sum(dim=1, keepdim=True) + 1e-4
    p_1E = p_TE.sum(dim=0, keepdim=True) + 1e-4
    return -(p_TE * torch.log(p_TE / p_T1 / p_1E + 1e-4)).sum()


def task_batches(seed: int = 1) -> list[tuple[int, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(t, torch.randn(2, N, D, generator=gen)) for t in range(T)]


def test_all_tasks_step_mi_equals_modsquad_over_the_T_passes():
    layer = make_layer()
    model = torch.nn.Sequential(layer)
    batches = task_batches()
    for task, x in batches:
        layer(x, torch.full((2,), task))
    last_forward_mi = layer.aux["mi"].item()  # what the trainer used before the fix
    mi = collect_aux_losses(model)["mi"]
    router = layer.router.weight.detach().clone().requires_grad_()
    reference = modsquad_mi(router, batches, K)
    assert mi.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    assert mi.item() < -1e-3 and abs(last_forward_mi) < 1e-3  # one pass holds one task: MI ~ 0
    (grad,) = torch.autograd.grad(mi, layer.router.weight)
    (grad_ref,) = torch.autograd.grad(reference, router)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-7)
    assert (grad.flatten(1).norm(dim=1) > 1e-4).all()  # every task's router gets an MI gradient


def test_other_losses_pool_the_passes_like_modsquad():
    layer = make_layer()
    batches = task_batches()
    for task, x in batches:
        layer(x, torch.full((2,), task))
    losses = collect_aux_losses(torch.nn.Sequential(layer))
    with torch.no_grad():
        w = layer.router.weight
        logits = torch.cat([x.reshape(-1, D) @ w[t].t() for t, x in batches])
        probs = logits.softmax(-1)
        top = probs.topk(K, dim=1)
        counts = torch.zeros(E).index_add(0, top.indices.flatten(), torch.ones(top.indices.numel()))
        gates = torch.zeros(E).index_add(0, top.indices.flatten(), top.values.flatten())
    switch = E * (probs.sum(0) / probs.sum() * counts / counts.sum()).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    cv = gates.var() / gates.mean() ** 2 + counts.var() / counts.mean() ** 2
    for key, expected in (("switch", switch), ("z", z), ("cv", cv)):
        assert losses[key].item() == pytest.approx(expected.item(), rel=1e-5), key


@pytest.mark.parametrize("mi_ema", [0.0, 0.5])
def test_grad_accumulation_keeps_earlier_micro_batches_as_detached_history(mi_ema):
    """Micro-batch j's MI sees the statistics of micro-batches 0..j (earlier ones detached); the EMA moves once."""
    layer = make_layer(mi_ema=mi_ema)
    model = torch.nn.Sequential(layer)
    batches = task_batches()
    layer(batches[0][1], torch.full((2,), 0))
    first = collect_aux_losses(model, end_of_step=False)["mi"]
    first.backward()
    assert layer.mi_counts_TE.sum() == 0  # not the end of the optimizer step yet
    grad_first = layer.router.weight.grad.clone()
    layer.router.weight.grad = None
    for task, x in batches[1:]:
        layer(x, torch.full((2,), task))
    second = collect_aux_losses(model, end_of_step=True)["mi"]
    second.backward()
    router = layer.router.weight.detach().clone().requires_grad_()
    assert second.item() == pytest.approx(modsquad_mi(router, batches, K).item(), rel=1e-5)  # the full step's MI
    (ref_first,) = torch.autograd.grad(modsquad_mi(router, batches[:1], K), router)
    torch.testing.assert_close(grad_first, ref_first, rtol=1e-4, atol=1e-7)
    detached_first = router.detach().clone()
    mixed = torch.stack([detached_first[0], router[1], router[2]])  # micro-batch 0 enters without gradient
    (ref_second,) = torch.autograd.grad(modsquad_mi(mixed, batches, K), router)
    torch.testing.assert_close(layer.router.weight.grad, ref_second, rtol=1e-4, atol=1e-7)
    assert layer.router.weight.grad[0].abs().sum() == 0
    if mi_ema:
        assert layer.mi_counts_TE.sum() == 3 * 2 * N * K  # the whole step entered the EMA once
        assert layer._step_TE is None


def test_routing_counts_are_popped_once_and_never_reduced_twice():
    layer = make_layer()
    model = torch.nn.Sequential(layer)
    layer.stats_reducer = lambda packed: 2 * packed  # a fake 2-rank world where both ranks hold the same batch
    per_forward = []
    for task, x in task_batches():
        layer(x, torch.full((2,), task))
        per_forward.append(layer.last_counts_TE)
    popped = pop_routing_counts(model)
    assert list(popped) == ["0"]
    assert torch.equal(popped["0"], sum(per_forward))
    assert popped["0"].sum() == 2 * (3 * 2 * N * K)  # the reducer's (global) counts, as they came
    assert pop_routing_counts(model) == {}
    assert set(collect_aux_losses(model)) == {"mi", "cv", "switch", "z"}  # the losses are a separate pop
    layer.eval()
    layer(torch.randn(2, N, D), torch.tensor([0, 0]))
    assert pop_routing_counts(model) == {} and collect_aux_losses(model) == {}  # eval forwards add nothing


def test_eval_forwards_do_not_accumulate_and_usage_in_eval_is_an_option():
    for usage_in_eval in (False, True):
        layer = make_layer(usage_in_eval=usage_in_eval).eval()
        with torch.no_grad():
            for _ in range(3):
                layer(torch.randn(2, N, D), torch.tensor([1, 1]))
        assert layer._pending is None and layer._routed_TE is None
        assert (layer.usage_TE.sum() > 0) == usage_in_eval  # Mod-Squad updates its usage EMA in eval too


def test_forwards_without_collect_keep_bounded_state(caplog, monkeypatch):
    monkeypatch.setattr("pretrain.models.moe_routing._MAX_PENDING_FORWARDS", 4)
    layer = make_layer()
    for _ in range(6):  # callers reading `layer.aux` per forward never collect: the graph is dropped
        layer(torch.randn(1, 2, D), torch.tensor([0]))
    assert not layer._pending.probs_TE.requires_grad
    assert "without collect_aux_losses" in caplog.text


def test_prob_eps_enters_gates_and_statistics():
    plain, eps = make_layer(), make_layer(prob_eps=1e-4)
    x, task = torch.randn(2, N, D), torch.tensor([0, 2])
    r_plain, r_eps = plain.route(x, task), eps.route(x, task)
    torch.testing.assert_close(r_eps.probs_SE, r_plain.probs_SE + 1e-4)
    torch.testing.assert_close(r_eps.gates_SK, r_plain.gates_SK + 1e-4)
    y_plain, y_eps = plain(x, task), eps(x, task)
    assert 0 < (y_eps - y_plain).abs().max() < 1e-2
    assert eps._last.probs_TE.sum().item() == pytest.approx(plain._last.probs_TE.sum().item() + 2 * N * E * 1e-4,
                                                           rel=1e-6)
    with pytest.raises(ValueError, match="prob_eps"):
        make_layer(prob_eps=-1.0)


def test_expert_and_router_inits_follow_the_official_formulas():
    w, b = torch.empty(64, 48, 32), torch.empty(64, 32)
    init_experts_(w, b, "modsquad")  # ParallelExperts: U(+-1/in) weights, U(+-1/sqrt(out)) biases
    assert w.abs().max() <= 1 / 48 and w.abs().max() > 0.95 / 48
    assert b.abs().max() <= 32**-0.5 and b.abs().max() > 0.95 * 32**-0.5
    init_experts_(w, b, "m3vit")  # FastMoE kaiming_uniform(a=sqrt 5) of [E, out, in]: U(+-1/sqrt(in*out))
    assert w.abs().max() <= (48 * 32) ** -0.5 and w.abs().max() > 0.95 * (48 * 32) ** -0.5 and b.abs().sum() == 0
    torch.manual_seed(0)
    init_experts_(w, b, "timm")
    torch.manual_seed(0)
    assert torch.equal(w, torch.nn.init.trunc_normal_(torch.empty(64, 48, 32), std=0.02)) and b.abs().sum() == 0
    torch.manual_seed(0)
    layer = MoEMlp(dim=256, hidden_dim=8, num_experts=16, top_k=2, num_tasks=3, router_init="trunc_normal",
                   noisy=True)
    for weight in (layer.router.weight, layer.router.noise_weight):  # Mod-Squad's Linear [2E, D]: both halves
        assert weight.std().item() == pytest.approx(0.02, rel=0.05)
    layer = MoEMlp(dim=256, hidden_dim=8, num_experts=16, top_k=2, num_tasks=3, router_init="uniform")
    assert layer.router.weight.abs().max() <= 0.25 and layer.router.weight.abs().max() > 0.24
    assert MoEAttention(dim=8, num_experts=4, top_k=2, head_dim=4, num_tasks=1).kv_proj.bias is not None


def test_placement_defaults_and_debug_pins():
    """`auto` gives the placement's official inits; the debug config pins its own (zero routers, timm experts,
    randn task embedding at std 0.3); the Mod-Squad ViT-B config asks for Mod-Squad's randn task embedding (the
    default stays zero)."""
    torch.manual_seed(0)
    vit = build_backbone(load_config(None, ["model.size=vit_debug"]))
    moe_mlp, moe_attn = vit.blocks[1].mlp, vit.blocks[0].attn
    assert moe_mlp.router.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert moe_mlp.experts.w1.abs().max() <= 1 / 128 and moe_mlp.experts.b1.abs().max() > 0.9 * 128**-0.5
    assert moe_attn.heads.q_weight.abs().max() <= 1 / 128
    assert vit.task_embed.abs().sum() == 0 and "task_embed" in vit.no_weight_decay()  # project default: zero
    vitb = load_config("configs/pretrain/vitb16_modsquad_hetero.yaml")
    assert (vitb.model.task_embed_init, vitb.moe.init, vitb.moe.router_init) == ("randn", "auto", "auto")
    pinned = build_backbone(load_config("configs/debug/pretrain.yaml"))
    assert pinned.blocks[1].mlp.router.weight.abs().sum() == 0 and pinned.blocks[1].mlp.experts.b1.abs().sum() == 0
    # the debug config's task embedding: Mod-Squad's randn (weight-decayed) at std 0.3 (MOE.md, specialisation)
    assert pinned.task_embed.std().item() == pytest.approx(0.3, rel=0.15)
    assert "task_embed" not in pinned.no_weight_decay()
    m3vit = build_backbone(load_config(None, ["model.size=vit_debug", "moe.placement=m3vit"]))
    assert 0.24 < m3vit.blocks[1].mlp.router.weight.abs().max() <= 0.25  # U(+-1/sqrt(E)), E = 16
    assert m3vit.task_embed.abs().sum() == 0


def test_bad_option_values_are_named():
    from pretrain.config.pretraining import ConfigError

    for item, key in (("moe.init=xavier", "moe.init"), ("moe.prob_eps=-1", "moe.prob_eps"),
                      ("moe.dense_attn_head_dim=-2", "moe.dense_attn_head_dim"),
                      ("model.task_embed_init=ones", "model.task_embed_init")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [item])
    with pytest.raises(ValueError, match="moe.backend=deepspeed supports neither"):
        build_backbone(load_config(None, ["model.size=vit_debug", "moe.backend=deepspeed", "moe.prob_eps=1e-4"]))
