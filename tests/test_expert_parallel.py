"""Expert parallelism: EP=2 vs EP=1 parity on 2 gloo ranks (torchrun), and single-process behaviour of the helpers."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pretrain.expert_parallel import ExpertComm, apply_expert_parallel, make_stats_reducer
from pretrain.models.moe import MoEMlp

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ep2_matches_ep1_on_two_gloo_ranks():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "tests" / "dist_scripts" / "ep_parity.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "EP PARITY OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


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
