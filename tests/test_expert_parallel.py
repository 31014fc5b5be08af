"""Expert parallelism: EP=2 vs EP=1 parity on 2 gloo ranks (torchrun), and single-process behaviour of the helpers."""

import os

import pytest
import torch
import torch.distributed as dist
from harness import free_port, run_ranks, summary

from pretrain.models.moe import MoEMlp
from pretrain.parallel.expert_parallel import ExpertComm, apply_expert_parallel, make_stats_reducer


def test_ep2_matches_ep1_on_two_gloo_ranks():
    """ep_parity.py raises on the first quantity that differs by more than its tolerance (1e-5)."""
    result = summary(run_ranks("ep_parity.py", timeout=300).stdout)
    assert result["configs"] == 3 and result["checks"] >= 200, result  # 230 per rank: every step of every config
    assert result["max_diff"] <= result["tol"] == 1e-5, result
    assert abs(result["reducer_mi"]) >= 1e-3, result  # the reducer check compared a non-trivial MI loss


@pytest.fixture
def single_rank_group():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_single_rank_comm_is_identity_and_injection_checks(single_rank_group):
    comm = ExpertComm()
    assert (comm.world_size, comm.rank) == (1, 0)
    assert comm.exchange_counts(torch.tensor([3, 1])).tolist() == [[3, 1]]
    x = torch.randn(4, 3, requires_grad=True)
    y = comm.all_to_all(x, [4], [4])
    (y * torch.arange(3.0)).sum().backward()
    assert torch.equal(y, x) and torch.equal(x.grad, torch.arange(3.0).expand(4, 3))
    with pytest.raises(ValueError, match="must have 1 entries"):
        comm.all_to_all(x, [2, 2], [4])
    assert make_stats_reducer()(torch.ones(2)).tolist() == [1.0, 1.0]
    model = torch.nn.Sequential(MoEMlp(dim=4, hidden_dim=4, num_experts=2, top_k=1, num_tasks=1, ep_size=2))
    with pytest.raises(ValueError, match="ep_size=2, ep_rank=0 do not match comm"):
        apply_expert_parallel(model, comm=comm, stats_reducer=None)
    dense = torch.nn.Sequential(MoEMlp(dim=4, hidden_dim=4, num_experts=2, top_k=1, num_tasks=1))
    reducer = make_stats_reducer()
    assert apply_expert_parallel(dense, comm=comm, stats_reducer=reducer) == 0
    assert dense[0].stats_reducer is reducer
