"""One training step at ViT-B size on a GPU: dense timm ViT-B/16 (the in-call baseline), this project's dense ViT-B
and the ViT-B Mod-Squad MoE config, cls task, one GPU (EP 1), same batch, same step (issue 26 point 1).

    python benchmarks/bench_gpu_step.py [--batch 128] [--rounds 7] [--steps 4] [--json out.json]
    python benchmarks/bench_gpu_step.py --smoke   # CPU, tiny widths, fp32: checks the script (tests/test_bench_gpu.py)

A step = forward under bf16 autocast (fp32 master weights, as DeepSpeed's bf16 mode keeps fp32 masters) + the loss
(timm: cross-entropy; ours: the training objective, `model.objective` with the MoE auxiliary losses) + backward +
AdamW (fused on CUDA) + zero_grad, on a fixed synthetic 224-px batch; `moe.router_init=normal` and drop path 0 in
every variant (zero-init routers would send all tokens to the same experts, bench_train.py says why). Variants run
interleaved (`harness.interleaved`: alternating order, median of paired ratios), each timed unit `--steps` steps
between two `torch.cuda.synchronize()`.

Prints one JSON line per figure, `{"figure", "variant", "value", "unit"}`, then a summary line:
- `img_per_s`: batch × steps / median unit time;
- `ratio_vs_timm` / `moe_vs_dense`: median paired time ratios inverted to throughput ratios (> 1: faster);
- `gflop_per_img`: model FLOPs of one step (fwd + bwd matmul/conv/attention by FlopCounterMode; AdamW is
  elementwise) per image. Anchor: dense ViT-B/16 ≈ 105.5 GFLOP per 224-px image (3 × 35.2 forward);
- `mfu`: gflop_per_img × img_per_s / the card's peak dense bf16 FLOP/s (`PEAK_TFLOPS` by device name, or
  `--peak-tflops`); not reported on CPU;
- `host_syncs_per_step`: calls that make the CPU wait for the GPU (`aten::_local_scalar_dense`: `.item()`,
  `.tolist()`, a tensor in an `if`), counted by the profiler over one step: each one idles the GPU's queue;
- `peak_mem_gib`: `torch.cuda.max_memory_allocated` over the variant's steps.
Goals (issue 26): MoE ≥ 0.85× our dense img/s and ≥ 38% MFU; dense ≥ 45% MFU.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from harness import interleaved, write_results
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config.load import load_config
from pretrain.models import build_model
from pretrain.models.moe_losses import collect_aux_losses
from pretrain.training.objective import build_objective

REPO = Path(__file__).resolve().parent.parent
MOE_CONFIG = REPO / "configs" / "pretrain" / "vitb16_modsquad_hetero.yaml"
# peak dense bf16 tensor-core FLOP/s (no sparsity), from the vendors' data sheets, by a substring of the device name
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
               "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
COMMON = ["tasks.det.enabled=false", "tasks.seg.enabled=false", "model.drop_path=0.0", "moe.router_init=normal",
          "optim.lr=1e-5"]
SMOKE = ["model.size=vit_debug", "moe.attn_head_dim=32", "moe.dense_attn_head_dim=32", "moe.attn_num_experts=8",
         "moe.attn_top_k=4", "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=128"]
GOALS = {"moe_vs_dense": 0.85, "mfu_moe": 0.38, "mfu_dense": 0.45}
logger = logging.getLogger(__name__)


class Step:
    """A model, its AdamW and one fixed batch; `__call__` runs one full training step."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device,
                 bf16: bool) -> None:
        self.model, self.loss_fn, self.device, self.bf16 = model, loss_fn, device, bf16
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05,
                                           fused=device.type == "cuda")

    def __call__(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_steps(batch: int, device: torch.device, bf16: bool, smoke: bool) -> dict[str, Step]:
    """timm_dense, dense (ours, `moe.placement=dense`) and moe (the ViT-B Mod-Squad config) on one batch."""
    import timm

    size = 32 if smoke else 224
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    steps: dict[str, Step] = {}
    torch.manual_seed(0)
    tiny = {"img_size": size, "embed_dim": 128, "depth": 4, "num_heads": 4} if smoke else {}
    timm_model = timm.create_model("vit_base_patch16_224", num_classes=1000, **tiny).to(device).train()
    normalised = ((images.float() / 255 - 0.45) / 0.225).contiguous()  # the normalisation ours does inside
    steps["timm_dense"] = Step(timm_model, lambda: torch.nn.functional.cross_entropy(timm_model(normalised), labels),
                               device, bf16)
    for name, extra in (("dense", ["moe.placement=dense"]), ("moe", [])):
        cfg = load_config(MOE_CONFIG, [*COMMON, f"tasks.cls.img_size={size}", *(SMOKE if smoke else []), *extra])
        model = build_model(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks, num_classes={"cls": 1000},
                            objective=build_objective(cfg.tasks, cfg.optim, cfg.moe)).to(device).train()

        def loss_fn(model=model) -> torch.Tensor:
            loss, _ = model.objective({"cls": model("cls", images, labels)}, collect_aux_losses(model))
            return loss

        steps[name] = Step(model, loss_fn, device, bf16)
    return steps


def gflop_per_step(step: Step) -> float:
    """Matmul/conv/attention GFLOP of one step (forward + backward)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def host_syncs(step: Step) -> int:
    """Calls in one step that wait for the device to produce a host value (`aten::_local_scalar_dense`)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def emit(figure: str, variant: str, value: float | int | None, unit: str, out: dict) -> None:
    print(json.dumps({"figure": figure, "variant": variant, "value": value, "unit": unit}), flush=True)
    out[f"{variant}_{figure}"] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed unit")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (else by name)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny widths, fp32, batch 2: checks the script")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.smoke:
        device, bf16, args.batch, args.rounds, args.steps = torch.device("cpu"), False, 2, 3, 1
    elif not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device (run with --smoke to check the script on CPU)"}))
        return
    else:
        device, bf16 = torch.device("cuda"), True
        torch.backends.cuda.matmul.allow_tf32 = True
    steps = build_steps(args.batch, device, bf16, args.smoke)
    out: dict = {}
    flops = {name: gflop_per_step(step) for name, step in steps.items()}
    syncs = {name: host_syncs(step) for name, step in steps.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def unit(step: Step) -> Callable[[], None]:
        def run() -> None:
            sync()
            for _ in range(args.steps):
                step()
            sync()
        return run

    res = interleaved({name: unit(step) for name, step in steps.items()}, "timm_dense", args.rounds)
    peak = peak_tflops(device, args.peak_tflops)
    for name in steps:
        img_s = args.batch * args.steps / (res["ms"][name] / 1e3)
        emit("img_per_s", name, round(img_s, 1), "images/s", out)
        emit("ratio_vs_timm", name, round(1 / res["ratio"][name], 3), "throughput ratio", out)
        emit("gflop_per_img", name, round(flops[name] / args.batch, 2), "GFLOP fwd+bwd", out)
        emit("host_syncs_per_step", name, syncs[name], "calls", out)
        mfu = flops[name] / args.batch * img_s / (peak * 1e3) if peak else None
        emit("mfu", name, None if mfu is None else round(mfu, 3), "fraction of peak bf16", out)
    moe_vs_dense = res["ratio"]["dense"] / res["ratio"]["moe"]
    emit("moe_vs_dense", "moe", round(moe_vs_dense, 3), "throughput ratio", out)
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["device"] = torch.cuda.get_device_name(device)
    goals = {"moe_vs_dense": moe_vs_dense >= GOALS["moe_vs_dense"]}
    if peak:
        goals.update(mfu_moe=out["moe_mfu"] >= GOALS["mfu_moe"], mfu_dense=out["dense_mfu"] >= GOALS["mfu_dense"])
    print(json.dumps({"summary": True, "clean_rounds": res["clean_rounds"], "rounds": res["rounds"],
                      "batch": args.batch, "bf16": bf16, "goals_met": goals}), flush=True)
    write_results(out, args.json, script="bench_gpu_step", batch=args.batch, bf16=bf16, smoke=args.smoke)


if __name__ == "__main__":
    main()
