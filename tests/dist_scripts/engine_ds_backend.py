"""`moe.backend=deepspeed` with ep_size=2 on 2 gloo ranks: `engine_ds_backend.py OUT_DIR` (tests/test_engine.py).

Trains STEPS optimizer steps with ZeRO-1 (loss finite, router and expert weights move, aux statistics present),
saves through pretrain.runs.checkpoint, and rank 0 writes the eval logits of the 2-rank model on fixed images to
OUT_DIR/ref_ds.safetensors; the test loads the checkpoint into one process without DeepSpeed and compares.
A failed check raises naming what; success prints the summary (report.emit) {"losses", "changed"} (rank 0's
losses per step, the weights checked to have moved) and then "DS BACKEND OK".
"""

import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from engine_common import build, eval_logits, make_cfg, train_step
from report import emit
from safetensors.torch import save_file

from pretrain.parallel.ds_moe import DeepSpeedMoEMlp
from pretrain.parallel.engine import build_engine, init_distributed
from pretrain.runs import checkpoint

STEPS = 2


def main() -> None:
    torch.set_num_threads(1)
    init_distributed("gloo")
    rank = dist.get_rank()
    out = Path(sys.argv[1])
    cfg = make_cfg("moe.backend=deepspeed", "engine.ep_size=2", "engine.zero_stage=1", "moe.capacity_factor=1.0")
    model = build(cfg, rank)
    layers = [m for m in model.modules() if isinstance(m, DeepSpeedMoEMlp)]
    assert layers and all((m.ep_size, m.ep_rank, m.num_local_experts) == (2, rank, 2) for m in layers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = build_engine(model, engine=cfg.engine, optim=cfg.optim, max_steps=cfg.train.max_steps,
                          world_size=2)
    assert engine.has_moe_layers
    losses = []
    for step in range(STEPS):
        losses.append(train_step(engine, model, step, rank))
        assert math.isfinite(losses[-1]), f"rank {rank} step {step}: loss {losses[-1]}"
    after = model.state_dict()
    changed = ["backbone.blocks.1.mlp.routing.router.weight",
               "backbone.blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.0.0.weight"]
    for key in changed:
        assert not torch.equal(before[key], after[key]), f"rank {rank}: {key} did not change in {STEPS} steps"
    assert layers[0].routing.last_counts_TE is not None and layers[0].gate.drop_fraction is not None
    checkpoint.save(engine, out / "ckpt", STEPS, client_state={"step": STEPS}, rank_state=checkpoint.capture_rng(),
                    keep_last=1)
    logits = eval_logits(model)
    if rank == 0:
        save_file({"logits": logits}, str(out / "ref_ds.safetensors"))
    dist.barrier()
    if rank == 0:
        emit("DS BACKEND OK", losses=losses, changed=changed)


if __name__ == "__main__":
    main()
