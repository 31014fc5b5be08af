"""Per-sample keyed randomness (models/sample_random.py) and the global loss means (training/global_batch.py): a
sample's draws do not depend on how the global batch is split, and outside a keyed forward nothing changes."""

from __future__ import annotations

import pytest
import torch
from test_heads import build_model, det_targets, small_cfg
from timm.layers import DropPath
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from pretrain.models.heads.det import KeyedSampler
from pretrain.models.sample_random import (
    KeyedDropout,
    KeyedDropout2d,
    KeyedDropPath,
    keyed_forward,
    mix32,
    randn_like,
    sample_keys,
)
from pretrain.training import global_batch as gb

KEYS = {"seed": 7, "step": 3, "micro": 1, "task": 2}


def keys(positions: range, **over: int) -> torch.Tensor:
    return sample_keys(torch.tensor(list(positions)), **{**KEYS, **over})


def lowbias32(x: int) -> int:
    """The reference hash in Python integers (no overflow possible)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_the_hash_is_lowbias32_on_every_32_bit_value_without_overflow():
    xs = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF] + torch.randint(0, 2**32, (200,)).tolist()
    assert mix32(torch.tensor(xs, dtype=torch.int64)).tolist() == [lowbias32(x) for x in xs]


def draws(parts: int, global_batch: int = 8) -> tuple[torch.Tensor, ...]:
    """Every keyed draw kind of a global batch split into `parts` ranks, rank results concatenated."""
    per, out = global_batch // parts, []
    x = torch.randn(global_batch, 6, 5, 5, generator=torch.Generator().manual_seed(0))  # the global RNG: untouched
    ops = [KeyedDropout(0.5), KeyedDropPath(0.3), KeyedDropout2d(0.4)]
    for r in range(parts):
        with keyed_forward(keys(range(r * per, (r + 1) * per))) as keyed:
            xr = x[r * per:(r + 1) * per]
            out.append((keyed.uniform(per, 50, x.device), keyed.normal(per, 50, x.device),
                        randn_like(torch.zeros(per * 4, 3), batch=per), *(op(xr) for op in ops),
                        keyed.bits(per, 9, x.device)))
    return tuple(torch.cat(column) for column in zip(*out))


def test_a_sample_draws_the_same_in_one_batch_of_8_and_split_over_2_or_4_ranks():
    one = draws(1)
    for parts in (2, 4):
        assert all(torch.equal(a, b) for a, b in zip(one, draws(parts))), parts
    # the drop ops did drop something (the comparison is not of identities)
    dropout, drop_path, dropout2d = one[3:6]
    assert (dropout == 0).any() and (drop_path.flatten(1) == 0).all(1).any()
    assert (dropout2d.flatten(2) == 0).all(2).any()


def test_every_key_field_and_every_call_changes_the_draws():
    base = keys(range(4))
    for field in KEYS:
        assert not torch.equal(keys(range(4), **{field: KEYS[field] + 1}), base), field
    assert keys(range(4), seed=2**40).ne(keys(range(4), seed=0)).all()  # the seed's high word counts too
    with keyed_forward(base) as keyed:
        first, second = keyed.bits(4, 16, torch.device("cpu")), keyed.bits(4, 16, torch.device("cpu"))
    assert (first != second).all() and len(set(first.flatten().tolist())) == 64


@pytest.mark.gpu
def test_cuda_draws_the_bits_of_cpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with keyed_forward(keys(range(4)).to(cuda)) as on_gpu:
        bits, z = on_gpu.bits(4, 1000, cuda), on_gpu.normal(4, 1000, cuda)
    with keyed_forward(keys(range(4))) as on_cpu:
        assert torch.equal(bits.cpu(), on_cpu.bits(4, 1000, cpu))
        torch.testing.assert_close(z.cpu(), on_cpu.normal(4, 1000, cpu))  # log/cos kernels differ in the last bit


def test_uniform_and_normal_statistics():
    with keyed_forward(keys(range(32))) as keyed:
        u = keyed.uniform(32, 4096, torch.device("cpu")).double()
        z = keyed.normal(32, 4096, torch.device("cpu")).double()
    n = u.numel()  # 131072 draws: every bound below is 3.5 standard errors or more (the draws are fixed: no flakes)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 3e-3 and abs(u.var() - 1 / 12) < 2e-3
    hist = torch.histc(u, bins=16, min=0, max=1) / n
    assert (hist - 1 / 16).abs().max() < 3e-3
    assert abs(z.mean()) < 1e-2 and abs(z.std() - 1) < 1e-2 and abs((z**4).mean() - 3) < 0.1
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]) < 1e-2  # neighbours
    assert abs(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1]) < 1e-2  # samples


def test_keyed_ops_leave_the_torch_rng_alone_and_unkeyed_ops_are_torchs_bit_for_bit():
    x = torch.randn(4, 6, 5, 5)
    state = torch.random.get_rng_state()
    draws(2)
    assert torch.equal(torch.random.get_rng_state(), state)
    pairs = [(KeyedDropout(0.5), torch.nn.Dropout(0.5)), (KeyedDropout2d(0.4), torch.nn.Dropout2d(0.4)),
             (KeyedDropPath(0.3), DropPath(0.3))]
    for ours, torchs in pairs:
        torch.manual_seed(5)
        a = ours(x)
        torch.manual_seed(5)
        assert torch.equal(a, torchs(x)), type(ours).__name__
    torch.manual_seed(5)
    a = randn_like(x, batch=4)
    torch.manual_seed(5)
    assert torch.equal(a, torch.randn_like(x))
    with keyed_forward(keys(range(4))):  # eval mode draws nothing and returns the input
        assert KeyedDropout(0.5).eval()(x) is x


def test_fused_attention_dropout_is_refused_inside_a_keyed_forward():
    from pretrain.models.moe_attention import MoEAttention

    attn = MoEAttention(dim=16, num_experts=4, top_k=2, head_dim=8, num_tasks=1, attn_drop=0.1)
    x, task_B = torch.randn(2, 5, 16), torch.zeros(2, dtype=torch.long)
    assert attn(x, task_B).shape == (2, 5, 16)  # torch's RNG outside
    with keyed_forward(keys(range(2))), pytest.raises(ValueError, match="cannot be keyed per sample"):
        attn(x, task_B)


def sampler_labels(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 3, (n,), generator=g)  # -1 ignored, 0 negative, >= 1 positive


@pytest.mark.parametrize("n_pos, n_neg", [(40, 500), (3, 500), (3, 20), (0, 0)])
def test_the_keyed_sampler_keeps_torchvisions_counts(n_pos, n_neg):
    labels = torch.cat([torch.ones(n_pos, dtype=torch.long), torch.zeros(n_neg, dtype=torch.long),
                        torch.full((7,), -1)])[torch.randperm(n_pos + n_neg + 7)]
    sampler = KeyedSampler(batch_size_per_image=64, positive_fraction=0.25, terms=("det_a", "det_b"))
    with keyed_forward(keys(range(1))) as keyed:
        (pos,), (neg,) = sampler([labels])
    num_pos = min(16, n_pos)
    assert int(pos.sum()) == num_pos and int(neg.sum()) == min(64 - num_pos, n_neg)
    assert pos.dtype == neg.dtype == torch.uint8
    assert (labels[pos.bool()] >= 1).all() and (labels[neg.bool()] == 0).all()
    assert keyed.counts == {"det_a": num_pos + int(neg.sum()), "det_b": num_pos + int(neg.sum())}


def test_the_keyed_sampler_picks_follow_the_image_and_defer_to_torchvision_without_keys():
    images = [sampler_labels(n, seed=i) for i, n in enumerate((300, 120, 500, 80))]
    sampler = KeyedSampler(batch_size_per_image=32, positive_fraction=0.5, terms=())
    with keyed_forward(keys(range(4))):
        together = sampler(images)
    for r in range(2):  # two ranks of two images each
        with keyed_forward(keys(range(2 * r, 2 * r + 2))):
            split = sampler(images[2 * r:2 * r + 2])
        for k in range(2):
            assert torch.equal(split[0][k], together[0][2 * r + k]) and torch.equal(split[1][k], together[1][2 * r + k])
    torch.manual_seed(1)
    ours = sampler(images)
    torch.manual_seed(1)
    theirs = BalancedPositiveNegativeSampler(32, 0.5)(images)
    assert all(torch.equal(a, b) for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]))


def test_a_keyed_model_forward_is_the_same_on_one_batch_and_on_two_halves():
    """drop path + noisy gates + Dropout2d + the detector's samplers, through the whole model: the global-batch loss
    (a mean over images, pixels or sampled anchors/RoIs) equals the count-weighted mean of the two halves'."""
    torch.manual_seed(0)
    cfg = small_cfg("modsquad")
    cfg.model.drop_path, cfg.moe.noisy = 0.2, True
    cfg.model.det_proposals, cfg.model.det_rois_per_image = 200, 64
    cfg.model.det_min_size = cfg.model.det_max_size = 64
    model = build_model(cfg).train()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    targets = {"cls": torch.tensor([3, 9, 1, 0]), "det": det_targets() * 2, "seg": torch.randint(0, 150, (4, 32, 32))}
    targets["seg"][1, :20] = 255  # unequal labelled pixels per half

    def losses(task: str, rows: range) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        with keyed_forward(keys(rows, task=1)) as keyed:
            t = targets[task]
            out = model(task, images[rows.start:rows.stop], t[rows.start:rows.stop])
        return {k: v.detach() for k, v in out.items()}, keyed.counts

    for task in ("cls", "seg", "det"):
        (whole, counts), halves = losses(task, range(4)), [losses(task, range(2 * r, 2 * r + 2)) for r in range(2)]
        for term, value in whole.items():
            n = [c.get(term, 1.0) for _, c in halves]  # unnormalised terms (cls) are means over equal halves
            merged = sum(h[term] * k for (h, _), k in zip(halves, n)) / sum(n)
            torch.testing.assert_close(merged, value, rtol=1e-5, atol=1e-6, msg=f"{task} {term}")
        assert task == "cls" or counts, task


def test_global_means_rescale_by_local_over_global_counts(monkeypatch):
    batch = gb.GlobalBatch(seed=0, rank=1, world_size=2, task_ids={"seg": 2}, enabled=True)
    losses = {"seg": torch.tensor(2.0), "cls": torch.tensor(5.0)}
    monkeypatch.setattr(gb.dist, "all_reduce_sum", lambda t: t * 4)  # the other rank holds 3x this one's pixels
    out = batch.normalise(losses, {"seg": 100.0})
    assert out["seg"].item() == pytest.approx(2.0 * 100 * 2 / 400) and out["cls"] is losses["cls"]
    monkeypatch.setattr(gb.dist, "all_reduce_sum", lambda t: t)  # one process: the factor is exactly 1
    one = gb.GlobalBatch(seed=0, rank=0, world_size=1, task_ids={"seg": 2}, enabled=True)
    assert torch.equal(one.normalise(losses, {"seg": 37.0})["seg"], losses["seg"])
