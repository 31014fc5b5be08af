"""One leg of an elastic-resume chain on any number of gloo ranks (tests/test_elastic.py): `elastic.py EP VARIANTS
OUT RESUME_FROM START STOP STEP=DIR...`.

Per variant (`zero:precision`, e.g. `1:fp32,2:bf16`), a fresh engine at this world size and ep_size EP:
- RESUME_FROM `-`: start from the seed; else `checkpoint.load_latest(OUT/<variant>/RESUME_FROM)`, which must land
  at START, then an immediate save into OUT/<variant>/<RESUME_FROM>_at_load (the state as this layout holds it,
  compared bit for bit with the saved one by the test);
- train from START to STOP, saving into OUT/<variant>/DIR after each STEP given (keep_last large: the test
  compares each checkpoint with the reference's);
- `control=N` among the STEP=DIR arguments: then also train a fresh engine from the seed to step N at this layout,
  saving into OUT/<variant>/control: how far an uninterrupted run at another layout lands from the reference.
Every step trains on the same GLOBAL batch whatever the world size (GLOBAL images drawn from the step, sliced by
rank), so legs at different layouts train on the same data. Rank 0 prints the summary
{variant: {"lr": [lr after each step], "global_steps": ..., "resumed_lr": lr right after loading}}.
"""

import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from engine_common import CLASSES, IMG, W_MI, build, make_cfg
from report import emit

from pretrain.models.moe_losses import collect_aux_losses
from pretrain.parallel.engine import build_engine, init_distributed
from pretrain.runs import checkpoint

GLOBAL = 4  # images per optimizer step, split evenly over 1, 2 or 4 ranks


def global_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of step `step`'s global batch (the same GLOBAL images at every world size)."""
    g = torch.Generator().manual_seed(5000 + step)
    images = torch.randint(0, 256, (GLOBAL, 3, IMG, IMG), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, CLASSES, (GLOBAL,), generator=g)
    per = GLOBAL // world
    return images[rank * per:(rank + 1) * per], labels[rank * per:(rank + 1) * per]


def run_variant(variant: str, ep: int, out: Path, resume_from: str, start: int, stop: int,
                save_at: dict[int, str]) -> dict:
    zero, precision, *backend = variant.split(":")  # `1:fp32:deepspeed`: the DeepSpeed MoE backend
    rank, world = dist.get_rank(), dist.get_world_size()
    # ZeRO-0 clips by a per-rank norm average, refused under EP (engine.build_engine): no clipping for it
    clip = "0.0" if zero == "0" else "1.0"
    cfg = make_cfg(f"engine.ep_size={ep}", f"engine.zero_stage={zero}", f"engine.precision={precision}",
                   f"optim.grad_clip={clip}", "train.max_steps=12", *(f"moe.backend={b}" for b in backend))
    model = build(cfg, rank)
    engine = build_engine(model, engine=cfg.engine, optim=cfg.optim, max_steps=cfg.train.max_steps, world_size=world)
    base = out / variant.replace(":", "_")
    result = {"lr": []}
    if resume_from != "-":
        step, _, _ = checkpoint.load_latest(engine, base / resume_from)
        assert step == start, f"rank {rank}: resumed at step {step}, expected {start}"
        result["resumed_lr"] = engine.get_lr()
        checkpoint.save(engine, base / f"{resume_from}_at_load", start, client_state={}, rank_state={}, keep_last=9)
    for step in range(start, stop):
        images, labels = global_batch(step, rank, world)
        loss = engine("cls", images, labels)["cls"] + W_MI * collect_aux_losses(model)["mi"]
        engine.backward(loss)
        engine.step()
        result["lr"].append(engine.get_lr())
        if step + 1 in save_at:
            checkpoint.save(engine, base / save_at[step + 1], step + 1, client_state={}, rank_state={}, keep_last=9)
    result["global_steps"] = engine.global_steps
    return result


def main() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # checkpoint's "carried over" line
    init_distributed("gloo")
    ep, variants, out, resume_from = int(sys.argv[1]), sys.argv[2].split(","), Path(sys.argv[3]), sys.argv[4]
    start, stop = int(sys.argv[5]), int(sys.argv[6])
    pairs = [arg.split("=") for arg in sys.argv[7:]]
    save_at = {int(step): where for step, where in pairs if step != "control"}
    results = {v: run_variant(v, ep, out, resume_from, start, stop, save_at) for v in variants}
    for _, steps in (pair for pair in pairs if pair[0] == "control"):
        for v in variants:
            run_variant(v, ep, out, "-", 0, int(steps), {int(steps): "control"})
    dist.barrier()
    if dist.get_rank() == 0:
        emit("ELASTIC OK", **results)


if __name__ == "__main__":
    main()
