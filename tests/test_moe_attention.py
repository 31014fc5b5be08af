"""Mixture of attention heads: equals a naive multi-query attention over the selected heads."""

import pytest
import torch

from pretrain.models.moe_attention import MoEAttention

D, HD = 16, 8


def make_attention(num_experts=6, top_k=2, **kwargs) -> MoEAttention:
    torch.manual_seed(0)
    kwargs.setdefault("router_init", "normal")
    layer = MoEAttention(dim=D, num_experts=num_experts, top_k=top_k, head_dim=HD, num_tasks=3, qkv_bias=True,
                         **kwargs)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
        layer.heads.q_weight.normal_(0, 0.3)
        layer.heads.o_weight.normal_(0, 0.3)
    return layer


def reference_attention(layer: MoEAttention, x_BND: torch.Tensor, task_B: torch.Tensor) -> torch.Tensor:
    """Every head on every token, then the sparse [B, N, E] gate matrix picks and weights them."""
    probs_BNE = torch.einsum("bnd,bed->bne", x_BND, layer.router.weight[task_B]).softmax(-1)
    gates_BNK, idx_BNK = probs_BNE.topk(layer.top_k, dim=-1)
    if layer.gate == "renorm":
        gates_BNK = gates_BNK / gates_BNK.sum(-1, keepdim=True)
    gate_BNE = torch.zeros_like(probs_BNE).scatter(-1, idx_BNK, gates_BNK)
    k_BNH, v_BNH = layer.kv_proj(x_BND).chunk(2, dim=-1)
    q_BENH = torch.einsum("bnd,edh->benh", x_BND, layer.heads.q_weight)
    attn_BENN = (torch.einsum("benh,bmh->benm", q_BENH, k_BNH) * HD**-0.5).softmax(-1)
    o_BENH = torch.einsum("benm,bmh->benh", attn_BENN, v_BNH)
    y_BEND = torch.einsum("benh,ehd->bend", o_BENH, layer.heads.o_weight)
    return torch.einsum("bne,bend->bnd", gate_BNE, y_BEND)


@pytest.mark.parametrize("gate", ["raw", "renorm"])
@pytest.mark.parametrize("num_experts, top_k", [(4, 4), (6, 2), (5, 1)])
def test_equals_naive_multi_query_attention(gate, num_experts, top_k):
    layer = make_attention(num_experts, top_k, gate=gate)
    x = torch.randn(3, 7, D, requires_grad=True)
    task = torch.tensor([2, 0, 1])
    y = layer(x, task)
    ref = reference_attention(layer, x, task)
    assert (y - ref).abs().max() < 1e-5
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad(y.pow(2).sum(), params)
    grads_ref = torch.autograd.grad(ref.pow(2).sum(), params)
    for g, g_ref in zip(grads, grads_ref):
        assert (g - g_ref).abs().max() < 1e-5


def test_all_heads_with_equal_gates_is_plain_multi_query_attention():
    """k = E, renormalised uniform gates: the mean over heads of standard MQA (torch SDPA per head)."""
    layer = make_attention(num_experts=3, top_k=3, gate="renorm", router_init="zero")
    with torch.no_grad():
        layer.router.weight.zero_()
    x = torch.randn(2, 5, D)
    k, v = layer.kv_proj(x).chunk(2, dim=-1)
    outs = []
    for e in range(3):
        q = x @ layer.heads.q_weight[e]
        outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v) @ layer.heads.o_weight[e])
    assert (layer(x, torch.tensor([0, 1])) - torch.stack(outs).mean(0)).abs().max() < 1e-5


def test_every_parameter_gets_a_gradient_and_statistics():
    layer = make_attention(num_experts=6, top_k=3, noisy=True)
    layer.train()
    y = layer(torch.randn(3, 10, D), torch.tensor([0, 1, 2]))
    (y.pow(2).mean() + sum(layer.aux.values())).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert "expert" not in name  # head experts are never expert-parallel parameters
    assert layer.last_counts_TE.sum() == 3 * 10 * 3
    assert torch.allclose(layer.usage_TE, 0.05 * layer.last_counts_TE)
    assert set(layer.aux) == {"mi", "cv", "switch", "z"}


def test_bad_head_dim():
    with pytest.raises(ValueError, match="head_dim=0"):
        MoEAttention(dim=D, num_experts=4, top_k=2, head_dim=0, num_tasks=1)
