"""Whole training steps of the task-routed MoE ViT vs the dense ViT of equal active FLOPs, in images per second.

    python benchmarks/bench_train.py [--quick] [--json out.json] [--threads 1,2] [--profile]

One step = `model(task, uint8 images, targets)` -> that task's losses + the weighted MoE auxiliary losses
(`pretrain.tasks.TaskLoss`, the training objective) -> backward -> `torch.optim.AdamW` step -> zero_grad; fp32, CPU,
train mode, synthetic inputs. Models come from `pretrain.config.load.load_config` + `pretrain.models.build_model`. The
DeepSpeed engine (ZeRO partitioned flat AdamW, gradient clipping) is left out: its overhead is the same for both
variants, up to being proportional to the parameter count like the AdamW step measured here. All variants use
`moe.router_init=normal` (zero-init routers send every token to the same k experts until they learn, which would
time one big GEMM per expert) and lr 1e-5, so routing stays as initialised over the run; `load` reports it.

Sections (variants of one comparison are built once and reused for every task and thread count):
  (a) debug model, `configs/debug/pretrain.yaml` (vit_debug: patch 8, dim 128, depth 4, 4 heads; Mod-Squad
      placement: MoE attention E=8 k=4 head_dim 32 in even blocks, MoE MLP E=8 k=2 in odd blocks), per task at the
      config's batch and size: cls 32 x 64 px, det 4 x 128 px (Faster R-CNN), seg 8 x 96 px (semantic FPN).
        dense         moe.placement=dense
        modsquad      moe.expert_hidden = mlp_ratio*dim/top_k = 256: k*H = the dense MLP hidden (equal active FLOPs)
        modsquad_cfg  the config as is: expert_hidden default mlp_ratio*dim*top_k/E = 128, which equals the dense
                      MLP's active FLOPs only when k^2 = E (Mod-Squad's E=16, k=4); at E=8, k=2 it is half
      -> debug_{cls,det,seg}_ratio (modsquad / dense), debug_{task}_cfg_ratio, debug_{task}_{variant}_img_s_t{n}
  (b) ViT-S/16 @224, batch 8, cls (1000 classes), drop_path 0:
        dense         moe.placement=dense
        modsquad      MoE MLP E=16 k=4 H=384 in odd blocks, MoE attention E=12 k=6 head_dim 64 in even blocks
        m3vit         MoE MLP E=16 k=4 H=384 in odd blocks only (the "MoE MLP in every other block" anchor)
      -> vits_modsquad_ratio, vits_m3vit_ratio, vits_{variant}_img_s_t{n}
Ratio = median over rounds of the paired step-time ratio MoE / dense (> 1: MoE slower); keys without a thread suffix
are 1 thread, `_t2` 2 threads. Also per variant: GFLOP per step (matmul/conv/attention fwd+bwd by FlopCounterMode,
CPU SDPA registered here; MoE/dense in the `*_flop_ratio` keys), the forward/backward/optimizer split, parameter
count and `load` = mean over MoE layers of (busiest expert's routes / mean routes).

Attention FLOPs: the MoE attention runs attn_top_k query heads of head_dim per token, so with attn_top_k = num_heads
and head_dim = dim/num_heads its query and output projections and its QK^T / AV products equal dense MHSA's; its
keys and values are ONE shared head (2*D*hd per token instead of 2*D*D), so it does fewer FLOPs than MHSA, plus a
router (D*E per token). Both configs here have attn_top_k = num_heads (debug 4, ViT-S 6).

Method: `harness.interleaved` (performance.md section 0). Short debug steps are repeated so that one timed unit
lasts >= 0.3 s. Absolute img/s drift between runs on a shared machine; the ratios are the quantity to compare.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from harness import interleaved, write_results
from torch import Tensor
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from pretrain.config.load import load_config
from pretrain.config.pretraining import RunConfig
from pretrain.models import BACKBONE_SIZES, build_model
from pretrain.models.moe_losses import collect_aux_losses, moe_modules
from pretrain.training.objective import build_objective

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
DEBUG_CONFIG = REPO / "configs" / "debug" / "pretrain.yaml"
NUM_CLASSES = {"cls": 1000, "det": 80, "seg": 150}
COMMON = ["moe.router_init=normal", "optim.lr=1e-5", "model.drop_path=0.0"]
VITS = ["model.size=vit_s16", "tasks.det.enabled=false", "tasks.seg.enabled=false", "tasks.cls.batch_size=8",
        "tasks.cls.img_size=224", "moe.num_experts=16", "moe.top_k=4", "moe.expert_hidden=384",
        "moe.attn_num_experts=12", "moe.attn_top_k=6", "moe.attn_head_dim=64"]
UNIT_SECONDS = 0.3  # shortest timed unit: debug steps are repeated up to it


class TrainStep:
    """One model + AdamW + the training objective; `run(task)` does one full step and records its phase times."""

    def __init__(self, cfg: RunConfig) -> None:
        torch.manual_seed(0)
        self.cfg = cfg
        self.model = build_model(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks, num_classes=NUM_CLASSES,
                                 objective=build_objective(cfg.tasks, cfg.optim, cfg.moe)).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr,
                                           weight_decay=cfg.optim.weight_decay)
        self.batches: dict[str, tuple[Tensor, Any]] = {}
        self.phases: list[tuple[float, float, float]] = []

    def run(self, task: str) -> None:
        """forward + objective, backward, AdamW step + zero_grad on this task's fixed synthetic batch."""
        images, targets = self.batches[task]
        t0 = time.perf_counter()
        losses = self.model(task, images, targets)
        loss, _ = self.model.objective({task: losses}, collect_aux_losses(self.model))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.phases.append((t1 - t0, t2 - t1, time.perf_counter() - t2))

    def load(self) -> float | None:
        """Mean over MoE layers of max/mean routes per expert in the last forward (1.0 = perfectly balanced)."""
        ratios = [float(c.max() / c.mean()) for _, m in moe_modules(self.model)
                  if m.last_counts_TE is not None for c in [m.last_counts_TE.sum(dim=0)]]
        return statistics.mean(ratios) if ratios else None


def synthetic_batch(task: str, batch: int, size: int, num_classes: int, gen: torch.Generator) -> tuple[Tensor, Any]:
    """uint8 images [B,3,size,size] and targets: cls labels [B]; det per image 4 xyxy boxes [4,4] with labels in
    1..K; seg masks [B,size,size] in [0, C) with a top band of 255 (ignored)."""
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    if task == "cls":
        return images, torch.randint(0, num_classes, (batch,), generator=gen)
    if task == "seg":
        masks = torch.randint(0, num_classes, (batch, size, size), generator=gen)
        masks[:, : size // 8] = 255
        return images, masks
    targets = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=gen) * size * 0.6
        wh = (0.1 + 0.3 * torch.rand(4, 2, generator=gen)) * size
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1),
                        "labels": torch.randint(1, num_classes + 1, (4,), generator=gen)})
    return images, targets


def _register_cpu_sdpa_flops() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels only; count the CPU flash kernel with the same formulas."""
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd not in flop_registry:
        register_flop_formula(fwd)(lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v))
    if bwd not in flop_registry:
        register_flop_formula(bwd)(lambda g, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v))


def step_gflop(step: TrainStep, task: str) -> float:
    """Matmul/conv/attention GFLOP of one full training step (forward + backward; AdamW is elementwise)."""
    with FlopCounterMode(display=False) as counter:
        step.run(task)
    step.phases.pop()
    return counter.get_total_flops() / 1e9


def build_steps(base: Path | None, overrides: dict[str, list[str]]) -> dict[str, TrainStep]:
    """Variant name -> TrainStep built from `base` (None = schema defaults) + COMMON + that variant's overrides."""
    steps = {}
    for name, extra in overrides.items():
        steps[name] = TrainStep(load_config(base, [*COMMON, *extra]))
        logger.info("%s: %s", name, steps[name].model.param_counts())
    return steps


def _repeat(step: TrainStep, task: str, reps: int) -> Callable[[], None]:
    def unit() -> None:
        for _ in range(reps):
            step.run(task)

    return unit


def compare(steps: dict[str, TrainStep], task: str, threads: int, rounds: int, batch: int) -> dict:
    """Time `task` steps of every variant interleaved; per-variant img/s, ratio vs `dense`, phases, load."""
    torch.set_num_threads(threads)
    single = {}
    for name, step in steps.items():  # a first step, only to size the timed unit (interleaved warms up again)
        t0 = time.perf_counter()
        step.run(task)
        single[name] = time.perf_counter() - t0
    reps = max(1, math.ceil(UNIT_SECONDS / max(single.values())))
    for step in steps.values():
        step.phases.clear()
    res = interleaved({name: _repeat(step, task, reps) for name, step in steps.items()}, "dense", rounds)
    out = {"reps": reps, "res": res, "variants": {}}
    for name, step in steps.items():
        fwd, bwd, opt = (1e3 * statistics.median(p[i] for p in step.phases) for i in range(3))
        out["variants"][name] = {
            "img_s": batch * reps * 1e3 / res["ms"][name], "ms_step": res["ms"][name] / reps,
            "ratio": res["ratio"][name], "fwd_ms": fwd, "bwd_ms": bwd, "opt_ms": opt, "load": step.load(),
            "params_m": sum(p.numel() for p in step.model.parameters()) / 1e6}
    return out


def print_table(title: str, cmp: dict, gflop: dict[str, float]) -> None:
    """One comparison as a table: img/s, ms/step, ratio, phase ms, GFLOP (and vs dense), Mparams, load."""
    res = cmp["res"]
    flag = " NOISY (too few clean rounds: all rounds used)" if res["noisy"] else ""
    print(f"\n{title}  [{res['clean_rounds']}/{res['rounds']} clean rounds, {cmp['reps']} step(s)/unit]{flag}")
    print(f"  {'variant':<13}{'img/s':>8}{'ms/step':>9}{'ratio':>7}{'fwd':>8}{'bwd':>8}{'opt':>7}"
          f"{'GFLOP':>8}{'flop x':>7}{'Mparam':>8}{'load':>6}")
    for name, v in cmp["variants"].items():
        load = f"{v['load']:.2f}" if v["load"] is not None else "-"
        print(f"  {name:<13}{v['img_s']:>8.1f}{v['ms_step']:>9.1f}{v['ratio']:>7.3f}{v['fwd_ms']:>8.1f}"
              f"{v['bwd_ms']:>8.1f}{v['opt_ms']:>7.1f}{gflop[name]:>8.2f}{gflop[name] / gflop['dense']:>7.3f}"
              f"{v['params_m']:>8.2f}{load:>6}")


def record(out: dict, prefix: str, cmp: dict, gflop: dict[str, float], threads: int,
           ratio_keys: dict[str, str]) -> None:
    """Flatten one comparison into result keys (`ratio_keys`: variant -> ratio key stem)."""
    suffix = "" if threads == 1 else f"_t{threads}"
    for name, v in cmp["variants"].items():
        out[f"{prefix}_{name}_img_s_t{threads}"] = v["img_s"]
        out[f"{prefix}_{name}_gflop"] = gflop[name]
        if name in ratio_keys:
            out[f"{ratio_keys[name]}{suffix}"] = v["ratio"]
            out[ratio_keys[name].replace("_ratio", "_flop_ratio")] = gflop[name] / gflop["dense"]
            if v["load"] is not None:
                out[f"{prefix}_{name}_load_t{threads}"] = v["load"]
    if cmp["res"]["noisy"]:
        out.setdefault("noisy_sections", []).append(f"{prefix}_t{threads}")


def section_debug(threads_list: list[int], rounds: int, out: dict) -> None:
    """(a): the debug config's model, MoE vs dense, for each task at the config's batch size and resolution."""
    cfg = load_config(DEBUG_CONFIG, COMMON)
    size = BACKBONE_SIZES[cfg.model.size]
    equal_hidden = int(size["mlp_ratio"] * size["embed_dim"] / cfg.moe.top_k)  # k*H = the dense MLP's hidden
    moe = ["moe.placement=modsquad", f"moe.attn_top_k={size['num_heads']}"]  # MHSA's query FLOPs, whatever the yaml
    steps = build_steps(DEBUG_CONFIG, {"dense": ["moe.placement=dense"],
                                       "modsquad": [*moe, f"moe.expert_hidden={equal_hidden}"], "modsquad_cfg": moe})
    gen = torch.Generator().manual_seed(0)
    tasks = {t: cfg.tasks[t] for t in ("cls", "det", "seg")}
    for task, tcfg in tasks.items():
        batch = synthetic_batch(task, tcfg.batch_size, tcfg.img_size, NUM_CLASSES[task], gen)
        for step in steps.values():
            step.batches[task] = batch
    gflop = {task: {name: step_gflop(step, task) for name, step in steps.items()} for task in tasks}
    for threads in threads_list:
        for task, tcfg in tasks.items():
            cmp = compare(steps, task, threads, rounds, tcfg.batch_size)
            print_table(f"(a) debug {task}, batch {tcfg.batch_size} @ {tcfg.img_size} px, {threads} thread(s)",
                        cmp, gflop[task])
            record(out, f"debug_{task}", cmp, gflop[task], threads,
                   {"modsquad": f"debug_{task}_ratio", "modsquad_cfg": f"debug_{task}_cfg_ratio"})


def section_vits(threads_list: list[int], rounds: int, out: dict, profile: bool) -> None:
    """(b): ViT-S/16 cls steps at 224 px, batch 8: Mod-Squad and M3ViT placements vs dense."""
    steps = build_steps(None, {"dense": [*VITS, "moe.placement=dense"], "modsquad": [*VITS, "moe.placement=modsquad"],
                               "m3vit": [*VITS, "moe.placement=m3vit"]})
    batch = synthetic_batch("cls", 8, 224, NUM_CLASSES["cls"], torch.Generator().manual_seed(0))
    for step in steps.values():
        step.batches["cls"] = batch
    torch.set_num_threads(threads_list[0])
    gflop = {name: step_gflop(step, "cls") for name, step in steps.items()}
    for threads in threads_list:
        cmp = compare(steps, "cls", threads, rounds, 8)
        print_table(f"(b) ViT-S/16 cls, batch 8 @ 224 px, {threads} thread(s)", cmp, gflop)
        record(out, "vits", cmp, gflop, threads, {"modsquad": "vits_modsquad_ratio", "m3vit": "vits_m3vit_ratio"})
    if profile:
        profile_steps({name: steps[name] for name in ("dense", "modsquad")}, "cls")


def profile_steps(steps: dict[str, TrainStep], task: str, rows: int = 18) -> None:
    """Print the top ops by self CPU time of one step of each variant, 1 thread."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    for name, step in steps.items():
        step.run(task)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step.run(task)
        print(f"\nprofile: {name}, one {task} step, 1 thread, top {rows} ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def parse_threads(values: list[str]) -> list[int]:
    """`--threads` items, each an int or a comma list ("1,2") -> [1, 2]."""
    threads = [int(v) for item in values for v in item.split(",") if v]
    if not threads or min(threads) < 1:
        raise SystemExit(f"--threads {' '.join(values)}: expected positive integers such as 1,2")
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds per comparison instead of 9 (ViT-S: 3 vs 7)")
    parser.add_argument("--json", help="write the result keys to this path")
    parser.add_argument("--threads", nargs="+", default=["1,2"], help="thread counts, e.g. 1,2 or 1 2")
    parser.add_argument("--sections", default="debug,vits", help="comma list of debug, vits")
    parser.add_argument("--profile", action="store_true", help="profile one ViT-S dense and modsquad step, 1 thread")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads, sections = parse_threads(args.threads), set(args.sections.split(","))
    if not sections <= {"debug", "vits"}:
        raise SystemExit(f"--sections {args.sections}: expected a comma list of debug, vits")
    rounds, vits_rounds = (3, 3) if args.quick else (9, 7)
    _register_cpu_sdpa_flops()
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    if "debug" in sections:
        section_debug(threads, rounds, out)
    if "vits" in sections:
        section_vits(threads, vits_rounds, out, args.profile)
    write_results(out, args.json, quick=args.quick, threads=threads, loadavg_end=os.getloadavg(),
                  wall_s=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    main()
