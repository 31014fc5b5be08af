"""EP=2 vs EP=1 through DeepSpeed on 2 gloo ranks (launched by tests/test_engine.py): `engine_parity.py 0,1,2`.

Both replicas start from the same weights (`moe_mlp_factory` draws every expert like an ep_size=1 build) and train
STEPS optimizer steps with DIFFERENT data per rank, for each ZeRO stage given. Per step the losses and global grad
norms must agree to 1e-5; afterwards each rank's experts must equal the matching slice of the EP=1 experts, and all
other weights must agree, to 1e-4: some gradients are mathematically zero (the key bias under softmax) and Adam turns
their rounding noise into updates of ~lr * noise / eps, which differs with the summation order of EP=1 and EP=2.
If DeepSpeed averaged expert gradients over the whole data-parallel world (experts not marked, or ZeRO not in MoE
mode), rank 0's and rank 1's different experts would be mixed and the expert check fails.
A mismatch raises naming the step or tensor and the difference; success prints "ZeRO-<z> losses [...]" per stage,
the summary (report.emit) {"tol", "weight_tol", "stages": {z: {"losses", "max_loss_diff", "max_norm_diff",
"max_weight_diff", "experts_moved"}}} with differences maximised over both ranks, and "ENGINE PARITY OK".
"""

import sys

import torch
import torch.distributed as dist
from engine_common import build, make_cfg, train_step
from report import emit, max_abs_diff

from pretrain.parallel.engine import build_engine, init_distributed

STEPS, TOL, WEIGHT_TOL = 4, 1e-5, 1e-4


def run(ep_size: int, zero: int, rank: int) -> tuple[torch.nn.Module, dict, list[float], list[float], object]:
    # ZeRO-0 refuses clipping under EP (build_engine): compare it without clipping
    clip = "optim.grad_clip=0" if zero == 0 else "optim.grad_clip=1.0"
    cfg = make_cfg(f"engine.ep_size={ep_size}", f"engine.zero_stage={zero}", clip)
    model = build(cfg, rank)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    engine = build_engine(model, engine=cfg.engine, optim=cfg.optim, max_steps=cfg.train.max_steps,
                          world_size=2)
    groups = engine.optimizer.optimizer.param_groups if zero else engine.optimizer.param_groups
    moe_groups = [g for g in groups if g.get("moe")]
    assert moe_groups and all(g["name"] == f"ep_size_{ep_size}" for g in moe_groups), [g["name"] for g in groups]
    assert engine.has_moe_layers
    losses, norms = [], []
    for step in range(STEPS):
        losses.append(train_step(engine, model, step, rank))
        norm = engine.get_global_grad_norm()  # None where DeepSpeed computes none (ZeRO-0 without clipping)
        norms.append(float("nan") if norm is None else float(norm))
    return model, init, losses, norms, engine


def compare(zero: int, rank: int) -> dict:
    """Train EP=1 and EP=2 replicas, assert parity; returns this rank's losses and largest differences."""
    model1, init1, losses1, norms1, engine1 = run(1, zero, rank)
    model2, init2, losses2, norms2, engine2 = run(2, zero, rank)
    seen = {"max_loss_diff": 0.0, "max_norm_diff": 0.0, "max_weight_diff": 0.0}
    for step, (a, b, na, nb) in enumerate(zip(losses1, losses2, norms1, norms2)):
        assert abs(a - b) <= TOL, f"rank {rank} ZeRO-{zero} step {step}: loss EP=1 {a} vs EP=2 {b} (diff {a - b:.3g})"
        same_norm = abs(na - nb) <= TOL * max(1.0, na) or (zero == 0 and na != na and nb != nb)
        assert same_norm, f"rank {rank} ZeRO-{zero} step {step}: grad norm EP=1 {na} vs EP=2 {nb}"
        seen["max_loss_diff"] = max(seen["max_loss_diff"], abs(a - b))
        if na == na or nb == nb:  # both NaN (ZeRO-0 computes no norm) is agreement, not a difference
            seen["max_norm_diff"] = max(seen["max_norm_diff"], abs(na - nb))
    assert losses1[0] != losses1[-1], "training did not change the loss"
    state1, state2 = model1.state_dict(), model2.state_dict()
    assert state1.keys() == state2.keys() == init1.keys()
    moved = 0
    for key, v2 in state2.items():
        v1 = state1[key]
        if ".experts." in key:  # native MoE MLP: this rank holds global experts [2*rank, 2*rank+2)
            assert torch.equal(init1[key][2 * rank:2 * rank + 2], init2[key]), f"{key}: EP=2 init is not a slice"
            v1 = v1[2 * rank:2 * rank + 2]
            moved += int(not torch.equal(v2, init2[key]))
        err = max_abs_diff(v1.float(), v2.float())
        assert err <= WEIGHT_TOL, (f"rank {rank} ZeRO-{zero} after step {STEPS - 1}: {key} differs between EP=1 "
                                   f"and EP=2: max abs diff {err:.3g} > {WEIGHT_TOL:g}")
        seen["max_weight_diff"] = max(seen["max_weight_diff"], err)
    assert moved, "no expert weight changed: the check would be vacuous"
    assert engine1.get_lr() == engine2.get_lr(), f"ZeRO-{zero}: lr EP=1 {engine1.get_lr()} vs EP=2 {engine2.get_lr()}"
    return {"losses": losses2, "experts_moved": moved, **seen}


def main() -> None:
    torch.set_num_threads(1)
    init_distributed("gloo")
    rank = dist.get_rank()
    stages = {}
    for zero in map(int, sys.argv[1].split(",")):
        stages[zero] = compare(zero, rank)
        keys = ("max_loss_diff", "max_norm_diff", "max_weight_diff")
        worst = torch.tensor([stages[zero][k] for k in keys], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # also the barrier between stages
        stages[zero].update(zip(keys, worst.tolist()))
        if rank == 0:
            print(f"ZeRO-{zero} losses {stages[zero]['losses']}")
    if rank == 0:
        emit("ENGINE PARITY OK", tol=TOL, weight_tol=WEIGHT_TOL, stages=stages)


if __name__ == "__main__":
    main()
