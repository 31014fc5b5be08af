"""An EP=2 training run for tests/test_extract.py: `export_ep2.py SHARDS RUN_DIR [key=value ...]` on 2 gloo ranks.

Builds the three-task model with `engine.ep_size=2` (each rank holds half of the MoE MLP experts), trains one cls step
through DeepSpeed (ZeRO-1 unless overridden), saves the checkpoint with `pretrain.runs.checkpoint.save` and the run's
`config.yaml`, then every rank runs the eval forwards of fixed images for every task (collective under EP) and rank 0
writes them to RUN_DIR/ref.safetensors (cls/seg logits, det boxes/scores/labels per image). Prints "EXPORT EP2 OK".
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from pretrain.config.load import load_config, save_resolved
from pretrain.data.build import check_shards
from pretrain.parallel.engine import build_engine, init_distributed
from pretrain.runs import checkpoint
from pretrain.runs.load import build_run_model

TINY = ["model.size=vit_debug", "model.drop_path=0.0", "model.det_min_size=64", "model.det_max_size=64",
        "model.pyramid_dim=32", "moe.num_experts=4", "moe.top_k=2", "moe.attn_num_experts=4", "moe.attn_top_k=2",
        "moe.router_init=normal", "tasks.cls.img_size=32", "tasks.det.img_size=64", "tasks.seg.img_size=32",
        "tasks.cls.num_classes=0", "tasks.seg.num_classes=0", "engine.ep_size=2", "engine.zero_stage=1",
        "engine.precision=fp32", "optim.lr=1e-2", "optim.warmup_steps=0", "train.max_steps=4", "logging.wandb=disabled"]
SIZES = {"cls": 32, "det": 64, "seg": 32}


def fixed_images(task: str) -> torch.Tensor:
    size = SIZES[task]
    return torch.randint(0, 256, (2, 3, size, size), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)


def outputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Eval outputs of every task on `fixed_images`, flattened into named tensors."""
    model.eval()
    out = {}
    with torch.no_grad():
        for task in ("cls", "seg"):
            out[task] = model(task, fixed_images(task))
        for i, det in enumerate(model("det", fixed_images("det"))):
            out.update({f"det.{i}.{k}": v for k, v in det.items()})
    return out


def main() -> None:
    torch.set_num_threads(1)
    init_distributed("gloo")
    rank = dist.get_rank()
    shards, run_dir = sys.argv[1], Path(sys.argv[2])
    cfg = load_config(None, [f"data.root={shards}", f"output_dir={run_dir}", *TINY, *sys.argv[3:]])
    torch.manual_seed(0)
    model = build_run_model(cfg, num_classes=check_shards(cfg.data, cfg.tasks).num_classes, rank=rank)
    engine = build_engine(model, engine=cfg.engine, optim=cfg.optim, max_steps=cfg.train.max_steps, world_size=2)
    g = torch.Generator().manual_seed(rank)
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    loss = engine("cls", images, torch.randint(0, 4, (4,), generator=g))["cls"]
    engine.backward(loss)
    engine.step()
    checkpoint.save(engine, run_dir / "checkpoints", 1, client_state={}, rank_state=checkpoint.capture_rng(),
                    keep_last=2)
    if rank == 0:
        save_resolved(cfg, run_dir)
    ref = outputs(model)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in ref.items()}, str(run_dir / "ref.safetensors"))
    dist.barrier()
    if rank == 0:
        print("EXPORT EP2 OK")


if __name__ == "__main__":
    main()
