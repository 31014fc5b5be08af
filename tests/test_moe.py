"""Task-routed MoE MLP: routing invariants, dropless dispatch vs a per-token reference, gradients, aux losses."""

import math

import pytest
import torch
from timm.layers import Mlp

from pretrain.models import moe_losses
from pretrain.models.moe import GroupedLinear, MoEMlp
from pretrain.models.moe_losses import collect_aux_losses, moe_modules, mutual_information_loss

D, H = 16, 24


def make_moe(num_experts=4, top_k=2, num_tasks=3, **kwargs) -> MoEMlp:
    torch.manual_seed(0)
    kwargs.setdefault("router_init", "normal")
    layer = MoEMlp(dim=D, hidden_dim=H, num_experts=num_experts, top_k=top_k, num_tasks=num_tasks, **kwargs)
    with torch.no_grad():  # larger router weights than the 0.02 init, so routing differs clearly between tasks
        layer.router.weight.normal_(0, 0.5)
    return layer


def reference_forward(layer: MoEMlp, x_BND: torch.Tensor, task_B: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax of its task's router, top-k, weighted sum of the chosen experts (no dispatch)."""
    ex = layer.experts
    out = []
    for b in range(x_BND.shape[0]):
        for x_D in x_BND[b]:
            probs_E = (layer.router.weight[task_B[b]] @ x_D).softmax(-1)
            gates_K, idx_K = probs_E.topk(layer.top_k)
            if layer.gate == "renorm":
                gates_K = gates_K / gates_K.sum()
            y_D = 0
            for g, e in zip(gates_K, idx_K):
                y_D = y_D + g * (ex.act(x_D @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e])
            out.append(y_D)
    return torch.stack(out).view_as(x_BND)


@pytest.mark.parametrize("gate", ["raw", "renorm"])
@pytest.mark.parametrize("num_experts, top_k", [(4, 1), (4, 2), (6, 6)])
def test_sort_dispatch_equals_per_token_reference(gate, num_experts, top_k):
    layer = make_moe(num_experts, top_k, gate=gate)
    x = torch.randn(3, 7, D, requires_grad=True)
    task = torch.tensor([0, 2, 1])
    y = layer(x, task)
    ref = reference_forward(layer, x, task)
    assert (y - ref).abs().max() < 1e-5
    grads = torch.autograd.grad(y.pow(2).sum(), [x, *layer.parameters()])
    grads_ref = torch.autograd.grad(ref.pow(2).sum(), [x, *layer.parameters()])
    for g, g_ref in zip(grads, grads_ref):
        assert (g - g_ref).abs().max() < 1e-5


@pytest.mark.parametrize("gate", ["raw", "renorm"])
def test_router_invariants_and_no_dropped_tokens(gate):
    layer = make_moe(num_experts=8, top_k=3, gate=gate)
    x = torch.randn(4, 9, D)
    task = torch.tensor([0, 0, 1, 2])
    routing = layer.route(x, task)
    num_tokens = 4 * 9
    assert routing.idx_SK.shape == (num_tokens, 3)
    assert all(len(set(row)) == 3 for row in routing.idx_SK.tolist())  # exactly k distinct experts per token
    top_probs = routing.probs_SE.topk(3, dim=-1).values
    if gate == "raw":
        assert torch.allclose(routing.gates_SK, top_probs)
        assert (routing.gates_SK.sum(-1) <= 1 + 1e-6).all()
    else:
        assert torch.allclose(routing.gates_SK.sum(-1), torch.ones(num_tokens))
        assert torch.allclose(routing.gates_SK, top_probs / top_probs.sum(-1, keepdim=True))
    layer(x, task)
    assert layer.last_counts_TE.sum() == num_tokens * 3  # every token-slot was processed: nothing dropped
    assert layer.last_counts_TE.tolist()[1] == torch.bincount(routing.idx_SK[18:27].flatten(), minlength=8).tolist()


@pytest.mark.parametrize("gate", ["raw", "renorm"])
def test_single_expert_equals_dense_timm_mlp(gate):
    layer = make_moe(num_experts=1, top_k=1, gate=gate)
    mlp = Mlp(D, H)
    with torch.no_grad():
        mlp.fc1.weight.copy_(layer.experts.w1[0].t())
        mlp.fc1.bias.copy_(layer.experts.b1[0])
        mlp.fc2.weight.copy_(layer.experts.w2[0].t())
        mlp.fc2.bias.copy_(layer.experts.b2[0])
    x = torch.randn(2, 5, D)
    assert (layer(x, torch.tensor([0, 1])) - mlp(x)).abs().max() < 1e-6


def test_gradient_only_reaches_routed_experts():
    layer = make_moe(num_experts=8, top_k=1)
    x = torch.randn(1, 3, D)  # 3 tokens, 1 expert each: at least 5 of 8 experts unused
    layer(x, torch.tensor([1])).sum().backward()
    used = layer.last_counts_TE.sum(0) > 0
    assert 1 <= int(used.sum()) <= 3
    for name in ("w1", "b1", "w2", "b2"):
        grad = getattr(layer.experts, name).grad
        per_expert = grad.flatten(1).abs().sum(1)
        assert (per_expert[~used] == 0).all(), name
        assert (per_expert[used] > 0).all(), name


@pytest.mark.parametrize("noisy", [False, True])
def test_every_parameter_gets_a_gradient_with_all_tasks(noisy):
    layer = make_moe(num_experts=4, top_k=2, noisy=noisy)
    layer.train()
    x = torch.randn(3, 12, D)
    y = layer(x, torch.tensor([0, 1, 2]))
    (y.pow(2).mean() + sum(layer.aux.values())).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
        if name.startswith("router."):
            assert (p.grad.flatten(1).abs().sum(1) > 0).all(), f"{name}: a task router got no gradient"


def test_noise_only_in_training():
    layer = make_moe(noisy=True)
    x, task = torch.randn(2, 6, D), torch.tensor([0, 1])
    layer.eval()
    assert torch.equal(layer(x, task), layer(x, task))
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x, task)
    assert not torch.equal(y1, layer(x, task))


def test_grouped_linear_gradcheck():
    x = torch.randn(7, 3, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, 2, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: GroupedLinear.apply(x, [4, 0, 3], w, b), (x, w, b))


def mi_reference(s, f, k):
    """Mod-Squad's formula written out with Python floats."""
    tokens = sum(f) / k
    p = [[v / (tokens + 1e-4) for v in row] for row in s]
    p_t = [sum(row) + 1e-4 for row in p]
    p_e = [sum(p[t][e] for t in range(len(p))) + 1e-4 for e in range(len(p[0]))]
    return -sum(p[t][e] * math.log(p[t][e] / p_t[t] / p_e[e] + 1e-4) for t in range(len(p)) for e in range(len(p[0])))


def test_mutual_information_loss_matches_formula():
    s = [[3.0, 1.5, 0.5], [0.2, 0.8, 4.0]]  # S[t, e] = sum of p(e|x) over task t's tokens: 5 tokens each
    f = [5.0, 7.0, 8.0]  # k = 2: 20 slots = 10 tokens
    loss = mutual_information_loss(torch.tensor(s), torch.tensor(f), top_k=2)
    assert loss.item() == pytest.approx(mi_reference(s, f, 2), rel=1e-5)
    # fully specialised tasks: MI(T; E) = log 2
    assert mutual_information_loss(torch.tensor([[5.0, 0.0], [0.0, 5.0]]), torch.tensor([5.0, 5.0]), 1).item() == (
        pytest.approx(-math.log(2), abs=2e-3))


def test_mi_loss_vanishes_with_one_task_per_step_without_global_statistics():
    layer = make_moe()
    layer.train()
    layer(torch.randn(2, 8, D), torch.tensor([1, 1]))
    assert abs(layer.aux["mi"].item()) < 1e-3  # the pitfall the EMA and the reducer fix


def test_mi_loss_nonzero_with_ema_over_single_task_steps():
    layer = make_moe(mi_ema=0.9)
    model = torch.nn.Sequential(layer)
    layer.train()
    layer(torch.randn(2, 8, D), torch.tensor([0, 0]))  # step 1: task 0
    collect_aux_losses(model)  # the EMA takes step 1's statistics here, not in the forward
    assert layer.mi_counts_TE[0].sum() == 32 and layer.mi_counts_TE[1].sum() == 0
    layer(torch.randn(2, 8, D), torch.tensor([1, 1]))  # step 2: task 1
    assert layer.mi_counts_TE[1].sum() == 0
    mi = collect_aux_losses(model)["mi"]
    assert mi.item() < -1e-3
    mi.backward()
    grad_T = layer.router.weight.grad.flatten(1).abs().sum(1)
    assert grad_T[1] > 0 and grad_T[0] == 0 and grad_T[2] == 0  # gradient through this step's task only
    assert layer.mi_counts_TE[0].sum() == pytest.approx(0.9 * 16 * 2) and layer.mi_counts_TE[1].sum() == 32
    assert collect_aux_losses(model) == {}  # cleared


@pytest.mark.parametrize("weighting", ["uniform", "tokens"])
def test_reducer_makes_statistics_global(weighting):
    """Two single-task 'ranks' simulated in one process equal one process holding both batches."""
    x0, x1 = torch.randn(1, 8, D), torch.randn(1, 8, D)
    layer = make_moe(mi_task_weighting=weighting)
    packed = []
    layer.stats_reducer = lambda t: packed.append(t) or t
    layer(x1, torch.tensor([1]))  # what "rank 1" contributes
    layer.stats_reducer = lambda t: t + packed[0]
    layer(x0, torch.tensor([0]))
    reference = make_moe(mi_task_weighting=weighting)
    reference(torch.cat([x0, x1]), torch.tensor([0, 1]))
    assert layer.aux["mi"].item() == pytest.approx(reference.aux["mi"].item(), rel=1e-5)
    assert layer.aux["mi"].item() < -1e-3
    assert torch.equal(layer.last_counts_TE, reference.last_counts_TE)


def test_balance_task_mass_gives_uniform_task_prior():
    probs = torch.tensor([[10.0, 30.0], [1.0, 1.0], [0.0, 0.0]])
    counts = torch.tensor([[40.0, 40.0], [2.0, 2.0], [0.0, 0.0]])  # k = 2: 40 and 2 tokens, task 2 absent
    balanced = moe_losses.balance_task_mass(probs, counts, top_k=2)
    assert balanced.sum(1).tolist() == pytest.approx([21.0, 21.0, 0.0])
    assert balanced[0, 0] / balanced[0, 1] == pytest.approx(1 / 3)


def test_balance_losses_match_definitions():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert moe_losses.cv_squared(x).item() == pytest.approx(x.var().item() / 9.0)
    assert moe_losses.cv_squared(torch.tensor([5.0])).item() == 0.0
    probs, counts = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])
    assert moe_losses.switch_loss(probs, counts).item() == pytest.approx(2 * (0.25 * 0.5 + 0.75 * 0.5))
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert moe_losses.z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_prob_in_top_k_is_a_probability_and_differentiable():
    clean = torch.randn(5, 4, requires_grad=True)
    std = torch.full((5, 4), 0.5)
    noisy = clean.detach() + torch.randn(5, 4) * std
    prob = moe_losses.prob_in_top_k(clean, noisy, std, top_k=2)
    assert ((prob >= 0) & (prob <= 1)).all()
    prob.sum().backward()
    assert clean.grad.abs().sum() > 0


def test_usage_ema_and_layer_helpers():
    layer = make_moe(num_experts=4, top_k=2)
    model = torch.nn.Sequential(torch.nn.Linear(D, D), layer)
    layer.train()
    layer(torch.randn(2, 5, D), torch.tensor([2, 2]))
    counts = layer.last_counts_TE.clone()
    assert torch.allclose(layer.usage_TE, 0.05 * counts)
    assert layer.usage_TE[:2].abs().sum() == 0 and counts[2].sum() == 20
    layer.eval()
    layer(torch.randn(2, 5, D), torch.tensor([0, 0]))
    assert torch.allclose(layer.usage_TE, 0.05 * counts)  # eval never updates usage
    assert [name for name, _ in moe_modules(model)] == ["1"]
    assert set(collect_aux_losses(model)) == {"mi", "cv", "switch", "z"}


def test_routing_statistics_stay_fp32_when_the_layer_is_cast_to_bf16():
    layer = make_moe(num_experts=4, top_k=2).to(torch.bfloat16).train()
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    assert {layer.usage_TE.dtype, layer.mi_probs_TE.dtype, layer.mi_counts_TE.dtype} == {torch.float32}
    with torch.no_grad():
        layer.usage_TE[2] = 1000.0  # bf16 spaces its values 4 apart here: a 5% EMA step toward ~10 would round away
    layer(torch.randn(2, 5, D, dtype=torch.bfloat16), torch.tensor([2, 2]))
    counts = layer.last_counts_TE[2].float()
    assert torch.equal(layer.usage_TE[2], 0.95 * torch.full((4,), 1000.0) + 0.05 * counts)
    before = layer.usage_TE.clone()
    layer.float()
    assert torch.equal(layer.usage_TE, before)  # the values were never rounded through bf16


@pytest.mark.parametrize("kwargs, message", [
    ({"gate": "softmax"}, "gate='softmax'"),
    ({"top_k": 5}, "top_k=5"),
    ({"router_init": "xavier"}, "router_init"),
    ({"ep_size": 3}, "ep_size=3"),
    ({"mi_ema": 1.0}, "mi_ema=1.0"),
])
def test_bad_arguments_are_named(kwargs, message):
    args = {"dim": D, "hidden_dim": H, "num_experts": 4, "top_k": 2, "num_tasks": 3, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        MoEMlp(**args)


def test_bad_inputs_are_named():
    layer = make_moe()
    with pytest.raises(ValueError, match=r"task ids \[3\] outside"):
        layer(torch.randn(1, 4, D), torch.tensor([3]))
    with pytest.raises(ValueError, match="LongTensor of shape"):
        layer(torch.randn(2, 4, D), torch.tensor([0]))
    ep_layer = MoEMlp(dim=D, hidden_dim=H, num_experts=4, top_k=2, num_tasks=3, ep_size=2, ep_rank=1)
    assert ep_layer.experts.w1.shape == (2, D, H) and ep_layer.num_local_experts == 2
    with pytest.raises(RuntimeError, match="no comm was injected"):
        ep_layer(torch.randn(1, 4, D), torch.tensor([0]))
