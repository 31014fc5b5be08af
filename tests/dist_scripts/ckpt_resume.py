"""Save/resume via pretrain.runs.checkpoint on 2 gloo ranks, EP=2: `ckpt_resume.py 1,2 OUT_DIR` (test_checkpoint.py).

Per ZeRO stage, with noisy gating and drop path on (so the RNG state matters):
1. train SAVE_AT steps, save (client_state + capture_rng()), train to STEPS: the uninterrupted reference;
   meanwhile save every step into a second directory with keep_last=2 (pruning, `latest`).
2. a fresh model + engine (other weights) resumes from the step-SAVE_AT checkpoint, restores the RNG, trains to
   STEPS: weights, fp32 masters, Adam moments, lr and step counters must be BIT-identical to step 1's.
3. rank 0 writes the eval logits of the just-resumed EP=2 model on fixed images to OUT_DIR/ref_zero{Z}.safetensors
   (tests/test_checkpoint.py loads the checkpoint into one process without DeepSpeed and compares).
4. an EP=1 engine on the same 2 ranks loads the EP=2 checkpoint (weights-only path): same eval logits and lr, and
   ZeRO's fp32 masters equal the loaded weights (checked after step 2 as well).
A mismatch raises naming the rank, stage, tensor, step and max abs diff; success prints the summary (report.emit)
{"stages": {z: {"compared", "differing", "resume_max_diff", "ep_change_logit_diff"}}} maximised over both ranks
(`differing` counts tensors not bitwise equal after resume: the script only gets there when it is 0) and then
"CKPT RESUME OK".
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from engine_common import build, eval_logits, make_cfg, train_step
from report import emit, max_abs_diff
from safetensors.torch import save_file

from pretrain.parallel.engine import WeightsOnlyCheckpointEngine, build_engine, init_distributed
from pretrain.runs import checkpoint

SAVE_AT, STEPS = 2, 5


def flat_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts/lists (optimizer state dicts), keyed by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for key, value in items:
        out.update(flat_tensors(value, f"{prefix}/{key}"))
    return out


def snapshot(engine) -> dict[str, torch.Tensor]:
    state = {f"model/{k}": v.clone() for k, v in engine.module.state_dict().items()}
    state.update({f"optim{k}": v.clone() for k, v in flat_tensors(engine.optimizer.state_dict()).items()})
    state["lr"] = torch.tensor(engine.get_lr())
    state["global_steps"] = torch.tensor(engine.global_steps)
    return state


def check_masters(model: torch.nn.Module, what: str) -> None:
    """ZeRO's fp32 master of every parameter equals the parameter (else the next step would undo the load)."""
    for name, p in model.named_parameters():
        master = safe_get_full_fp32_param(p)  # collective over the param's (expert-)data-parallel group
        assert master is not None and torch.equal(master, p.detach().float()), f"{what}: fp32 master of {name} is stale"


def new_engine(cfg, rank: int, seed: int):
    cfg.seed = seed
    model = build(cfg, rank)
    engine = build_engine(model, engine=cfg.engine, optim=cfg.optim, max_steps=cfg.train.max_steps,
                          world_size=2)
    assert isinstance(engine.checkpoint_engine, WeightsOnlyCheckpointEngine), type(engine.checkpoint_engine)
    return model, engine


def check_stage(zero: int, rank: int, out: Path) -> dict:
    cfg = make_cfg("engine.ep_size=2", f"engine.zero_stage={zero}", "moe.noisy=true", "model.drop_path=0.1")
    ckpt, pruned = out / f"zero{zero}" / "ckpt", out / f"zero{zero}" / "pruned"
    model, engine = new_engine(cfg, rank, seed=0)
    torch.manual_seed(100 + rank)
    for step in range(STEPS):
        if step == SAVE_AT:
            checkpoint.save(engine, ckpt, step, client_state={"step": step, "note": "resume test"},
                            rank_state={**checkpoint.capture_rng(), "stream": {"rank": rank}}, keep_last=3)
        train_step(engine, model, step, rank)
        checkpoint.save(engine, pruned, step + 1, client_state={}, rank_state=checkpoint.capture_rng(), keep_last=2)
    reference = snapshot(engine)
    tags = sorted(p.name for p in pruned.iterdir() if p.is_dir())  # DeepSpeed also drops its zero_to_*.py there
    assert tags == [f"step_{STEPS - 1:08d}", f"step_{STEPS:08d}"], tags
    assert checkpoint.read_latest(pruned) == f"step_{STEPS:08d}"

    model, engine = new_engine(cfg, rank, seed=1)
    step, client_state, rank_state = checkpoint.load_latest(engine, ckpt)
    assert (step, client_state) == (SAVE_AT, {"step": SAVE_AT, "note": "resume test"}), (step, client_state)
    assert rank_state["stream"] == {"rank": rank}
    lr_at_save = engine.get_lr()
    check_masters(model, "resume")
    logits = eval_logits(model)
    if rank == 0:
        save_file({"logits": logits, "global_steps": torch.tensor(engine.global_steps)},
                  str(out / f"ref_zero{zero}.safetensors"))
    checkpoint.restore_rng(rank_state)
    for step in range(SAVE_AT, STEPS):
        train_step(engine, model, step, rank)
    resumed = snapshot(engine)
    assert resumed.keys() == reference.keys(), sorted(resumed.keys() ^ reference.keys())
    differing = {k: max_abs_diff(v, resumed[k]) for k, v in reference.items() if not torch.equal(v, resumed[k])}
    assert not differing, (f"rank {rank} ZeRO-{zero} step {STEPS}: {len(differing)} tensors differ after resuming "
                           f"from step {SAVE_AT} (max abs diff): {dict(list(differing.items())[:5])}")
    resume_max_diff = max(max_abs_diff(v, resumed[k]) for k, v in reference.items())

    cfg1 = make_cfg("engine.ep_size=1", f"engine.zero_stage={zero}", "moe.noisy=true", "model.drop_path=0.1")
    model1, engine1 = new_engine(cfg1, rank, seed=2)
    assert checkpoint.load_latest(engine1, ckpt)[0] == SAVE_AT
    assert engine1.get_lr() == lr_at_save, (engine1.get_lr(), lr_at_save)  # weights-only path: schedule restored
    check_masters(model1, "EP=2 checkpoint into EP=1")
    err = (eval_logits(model1) - logits).abs().max().item()
    assert err < 1e-5, f"rank {rank}: EP=1 engine loading the EP=2 checkpoint: logits differ by {err}"
    return {"compared": len(reference), "differing": len(differing), "resume_max_diff": resume_max_diff,
            "ep_change_logit_diff": err}


def main() -> None:
    torch.set_num_threads(1)
    init_distributed("gloo")
    rank = dist.get_rank()
    out = Path(sys.argv[2])
    stages = {}
    for zero in map(int, sys.argv[1].split(",")):
        stages[zero] = check_stage(zero, rank, out)
        keys = ("differing", "resume_max_diff", "ep_change_logit_diff")
        worst = torch.tensor([float(stages[zero][k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # also the barrier between stages
        stages[zero].update(zip(keys, worst.tolist()))
        stages[zero]["differing"] = int(stages[zero]["differing"])
    if rank == 0:
        emit("CKPT RESUME OK", stages=stages)


if __name__ == "__main__":
    main()
