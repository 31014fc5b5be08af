"""Expert-parallel parity on 2 gloo ranks, launched by tests/test_expert_parallel.py through torchrun.

Per configuration, two replicas train side by side for a few Adam steps from the same weights:
  A: EP=1 (every rank holds all experts; all gradients averaged over ranks),
  B: EP=2 (each rank holds half of the experts; rows travel by all-to-all; router gradients averaged over ranks,
     expert gradients divided by the data-parallel size).
Both use a stats_reducer, one task per step (same on all ranks) and a mixed-task step. Outputs, aux losses,
gradients and updated weights must agree to 1e-5. A last check compares A's averaged gradient of task + MI loss
with a single process holding both ranks' batches (the reducer's world-size gradient scale).
A mismatch raises naming the quantity, step and difference; success prints (report.emit) the summary
{"configs", "checks", "max_diff" (largest difference over every check and rank), "tol", "reducer_mi"} and then
"EP PARITY OK".
"""

import copy
import os

import torch
import torch.distributed as dist
from report import emit, max_abs_diff

from pretrain.models.moe import MoEMlp
from pretrain.parallel.expert_parallel import ExpertComm, apply_expert_parallel, make_stats_reducer

D, H, E, K, T, B, N = 12, 20, 4, 2, 3, 3, 6
TOL = 1e-5
CONFIGS = [
    {"router_init": "normal", "noisy": False, "mi_ema": 0.5, "gate": "raw"},
    {"router_init": "zero", "noisy": True, "mi_ema": 0.0, "gate": "renorm"},
    {"router_init": "zero", "noisy": False, "mi_ema": 0.0, "gate": "raw"},  # all rows to experts 0, 1: rank 1 idle
]
TASKS_PER_STEP = [[0] * B, [1] * B, [2, 0, 1], [1] * B]
SEEN = {"checks": 0, "max_diff": 0.0}  # what the summary reports


def build(config: dict, ep_size: int, rank: int, full: MoEMlp | None = None) -> MoEMlp:
    torch.manual_seed(0)
    layer = MoEMlp(dim=D, hidden_dim=H, num_experts=E, top_k=K, num_tasks=T, ep_size=ep_size,
                   ep_rank=rank if ep_size > 1 else 0, **config)
    if config["router_init"] == "normal":
        with torch.no_grad():
            layer.router.weight.normal_(0, 0.5)
    if full is not None:  # copy the replica's weights, keeping this rank's slice of the experts
        lo, hi = rank * layer.num_local_experts, (rank + 1) * layer.num_local_experts
        state = {k: (v[lo:hi] if k.startswith("experts.") else v) for k, v in full.state_dict().items()}
        layer.load_state_dict(state)
    return layer


def check(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    err = max_abs_diff(a, b)
    if not err <= TOL:
        raise AssertionError(f"rank {dist.get_rank()}: {name} differs: max abs diff {err:.3g} > tol {TOL:g}")
    SEEN["checks"] += 1
    SEEN["max_diff"] = max(SEEN["max_diff"], err)


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(B, N, D, generator=gen), torch.tensor(TASKS_PER_STEP[step % len(TASKS_PER_STEP)])


def loss_of(layer: MoEMlp, y: torch.Tensor) -> torch.Tensor:
    aux = layer.aux
    return y.pow(2).mean() + 0.5 * aux["mi"] + 0.01 * (aux["cv"] + aux["switch"]) + 0.001 * aux["z"]


def average_gradients(layer: MoEMlp, world: int) -> None:
    for name, p in layer.named_parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if name.startswith("experts.") and layer.ep_size > 1:
            p.grad /= world  # already summed over ranks by the backward all-to-all
        else:
            dist.all_reduce(p.grad)
            p.grad /= world


def run_config(config: dict, rank: int, world: int) -> None:
    reducer = make_stats_reducer()
    rep_a = build(config, 1, rank)
    rep_b = build(config, world, rank, full=rep_a)
    apply_expert_parallel(rep_a, comm=None, stats_reducer=reducer)
    assert apply_expert_parallel(rep_b, comm=ExpertComm(), stats_reducer=reducer) == 1
    opt_a = torch.optim.Adam(rep_a.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(rep_b.parameters(), lr=1e-2)
    lo, hi = rank * rep_b.num_local_experts, (rank + 1) * rep_b.num_local_experts
    for step in range(len(TASKS_PER_STEP)):
        x, task = batch(step, rank)
        outs = {}
        for tag, rep, opt in (("A", rep_a, opt_a), ("B", rep_b, opt_b)):
            rep.train()
            opt.zero_grad()
            torch.manual_seed(step)  # same gate noise in both replicas
            x_in = x.clone().requires_grad_()
            y = rep(x_in, task)
            loss = loss_of(rep, y)
            loss.backward()
            average_gradients(rep, world)
            outs[tag] = (y.detach(), loss.detach(), x_in.grad, dict(rep.aux))
        for i, what in enumerate(("output", "loss", "input grad")):
            check(f"step {step} {what}", outs["A"][i], outs["B"][i])
        for key in outs["A"][3]:
            check(f"step {step} aux {key}", outs["A"][3][key].detach(), outs["B"][3][key].detach())
        for (name, p_a), p_b in zip(rep_a.named_parameters(), rep_b.parameters()):
            sl = slice(lo, hi) if name.startswith("experts.") else slice(None)
            check(f"step {step} grad {name}", p_a.grad[sl], p_b.grad)
        opt_a.step()
        opt_b.step()
        for (name, p_a), p_b in zip(rep_a.named_parameters(), rep_b.parameters()):
            sl = slice(lo, hi) if name.startswith("experts.") else slice(None)
            check(f"step {step} weight {name}", p_a.detach()[sl], p_b.detach())
        check(f"step {step} usage", rep_a.usage_TE, rep_b.usage_TE)


def check_reducer_equals_single_process(rank: int, world: int) -> float:
    config = {"router_init": "normal", "noisy": False, "mi_ema": 0.0, "gate": "raw"}
    layer = build(config, 1, rank)
    single = copy.deepcopy(layer)
    layer.stats_reducer = make_stats_reducer()
    x, _ = batch(7, rank)
    task = torch.full((B,), rank)  # one task per rank: the local MI alone would be ~0
    y = layer(x, task)
    (y.pow(2).mean() + layer.aux["mi"]).backward()
    average_gradients(layer, world)
    xs = [batch(7, r)[0] for r in range(world)]
    y_all = single(torch.cat(xs), torch.arange(world).repeat_interleave(B))
    (y_all.pow(2).mean() + single.aux["mi"]).backward()
    check("reducer MI value", layer.aux["mi"].detach(), single.aux["mi"].detach())
    if abs(layer.aux["mi"].item()) < 1e-3:
        raise AssertionError(f"global MI loss is ~0 ({layer.aux['mi'].item()})")
    for (name, p), p_single in zip(layer.named_parameters(), single.parameters()):
        check(f"reducer grad {name}", p.grad, p_single.grad)
    return layer.aux["mi"].item()


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"run with --nproc_per_node 2 (got WORLD_SIZE={os.environ.get('WORLD_SIZE')})"
    for config in CONFIGS:
        run_config(config, rank, world)
    mi = check_reducer_equals_single_process(rank, world)
    worst = torch.tensor([SEEN["max_diff"]], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        emit("EP PARITY OK", configs=len(CONFIGS), checks=SEEN["checks"], max_diff=worst.item(), tol=TOL,
             reducer_mi=mi)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
