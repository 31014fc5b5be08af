"""Dropless MoE layer vs the dense ideal, vs DeepSpeed's MoE, and a whole MoE ViT-S step vs a dense ViT-S step.

    python benchmarks/bench_moe.py [--quick] [--json out.json] [--threads 1 2]

fp32 fwd+bwd of `y.pow(2).mean() (+ small aux)` on x = [8, 197, 384] (S = 1,576 tokens), train mode.
Dense ideal = one timm Mlp with hidden k*H (same active FLOPs, no gate). Sections:
  (a) E=8, k=2, H=1536      -> ratio_dense_e8k2_t{1,2}
  (b) E=16, k=4, H=384      -> ratio_dense_e16k4_t{1,2}
  (c) deepspeed.moe.layer.MoE on (a) at capacity factor 1.0/1.25/2.0 with its dropped-route fraction
                            -> speedup_vs_deepspeed_cf125_e8k2_t{1,2} (DS time / ours), ds_dropped_cf*
  (d) skewed routing: router weights send 70% of the routes to a quarter of the experts; ours vs DS at cf 1.25
      (drops) and at the smallest cf (0.25 steps) that drops nothing -> skew_*
  (e) ViT-S/16 @224, batch 8, MoE MLP (E=16, k=4, H=384) in every other block vs dense timm ViT-S, CE loss
                            -> vit_step_ratio (1 thread), vit_step_ratio_t2
`dropped_tokens` = routes our layer did not process over every run (must be 0).
Method (performance.md section 0): variants of one comparison run round-robin in one process, order reversed every
other round; rounds where other processes used > 0.15 core are skipped when at least 3 clean rounds remain
(else all rounds are used and the section is flagged noisy); reported: median ms per variant and the median of
per-round paired ratios against the section's baseline. Ratios are the trustworthy quantity on a shared machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Callable

import torch
import torch.nn.functional as F
from harness import interleaved, paired, report, write_results
from timm.layers import Mlp

from pretrain.models.moe import MoEMlp

logger = logging.getLogger(__name__)
B, N, D = 8, 197, 384


class DropCounter:
    """Counts routes of our layer and DeepSpeed's gate that were not processed."""

    def __init__(self) -> None:
        self.ours_dropped = 0
        self.ds_routes = 0
        self.ds_dropped = 0

    def ds_hook(self, _module, _inputs, output) -> None:
        indices = output[3]  # sparse routes: one expert index per (k, token); evicted routes are -1
        self.ds_routes += indices.numel()
        self.ds_dropped += int((indices < 0).sum())

    def fraction_and_reset(self) -> float:
        frac = self.ds_dropped / max(self.ds_routes, 1)
        self.ds_routes = self.ds_dropped = 0
        return frac


def make_ours(num_experts: int, top_k: int, hidden: int, drops: DropCounter, x, task) -> tuple[MoEMlp, Callable]:
    layer = MoEMlp(dim=D, hidden_dim=hidden, num_experts=num_experts, top_k=top_k, num_tasks=3, router_init="normal")

    def step() -> None:
        y = layer(x, task)
        (y.pow(2).mean() + 0.01 * layer.aux["switch"] + 0.005 * layer.aux["mi"]).backward()
        drops.ours_dropped += x.shape[0] * x.shape[1] * top_k - int(layer.last_counts_TE.sum())

    return layer, step


def make_dense(hidden: int, x) -> Callable:
    mlp = Mlp(D, hidden)
    return lambda: mlp(x).pow(2).mean().backward()


def init_deepspeed() -> bool:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as sock:  # a free port: other jobs on the machine may hold the usual ones
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        return True
    except Exception as exc:  # a benchmark without DeepSpeed still reports the rest
        logger.warning("DeepSpeed unavailable (%s): skipping sections c and d", exc)
        return False


def make_deepspeed(num_experts: int, top_k: int, hidden: int, cf: float, drops: DropCounter, x):
    from deepspeed.moe.layer import MoE

    moe = MoE(hidden_size=D, expert=Mlp(D, hidden), num_experts=num_experts, ep_size=1, k=top_k,
              capacity_factor=cf, min_capacity=4)
    moe.deepspeed_moe.gate.register_forward_hook(drops.ds_hook)

    def step() -> None:
        out, l_aux, _ = moe(x)
        (out.pow(2).mean() + 0.01 * l_aux).backward()

    return moe, step


def section_layers(threads: int, rounds: int, use_ds: bool, drops: DropCounter, out: dict) -> None:
    torch.manual_seed(0)
    x = torch.randn(B, N, D, requires_grad=True)
    task = torch.zeros(B, dtype=torch.long)
    variants = {"dense_k2": make_dense(2 * 1536, x), "ours": make_ours(8, 2, 1536, drops, x, task)[1]}
    cfs = (1.0, 1.25, 2.0) if use_ds else ()
    for cf in cfs:
        variants[f"ds_cf{cf}"] = make_deepspeed(8, 2, 1536, cf, drops, x)[1]
    res = interleaved(variants, "dense_k2", rounds)
    report(f"(a/c) E=8 k=2 H=1536, {threads} thread(s)", res)
    out[f"ratio_dense_e8k2_t{threads}"] = res["ratio"]["ours"]
    for cf in cfs:
        tag = f"cf{int(round(cf * 100))}_e8k2"
        out[f"speedup_vs_deepspeed_{tag}_t{threads}"] = paired(res, f"ds_cf{cf}", "ours")
        out[f"ratio_dense_deepspeed_{tag}_t{threads}"] = res["ratio"][f"ds_cf{cf}"]
    for cf in cfs:  # one forward per cf for its drop fraction (the timed runs mixed all cfs)
        moe, _ = make_deepspeed(8, 2, 1536, cf, drops, x)
        drops.fraction_and_reset()
        moe(x)
        out[f"ds_dropped_cf{int(round(cf * 100))}_e8k2"] = drops.fraction_and_reset()
    variants = {"dense_k4": make_dense(4 * 384, x), "ours": make_ours(16, 4, 384, drops, x, task)[1]}
    res = interleaved(variants, "dense_k4", rounds)
    report(f"(b) E=16 k=4 H=384, {threads} thread(s)", res)
    out[f"ratio_dense_e16k4_t{threads}"] = res["ratio"]["ours"]


def skewed_input(num_experts: int, fraction: float = 0.7, gain: float = 8.0):
    """x and router weights sending `fraction` of the tokens (all k routes) to the first quarter of the experts."""
    gen = torch.Generator().manual_seed(1)
    u = F.normalize(torch.randn(D, generator=gen), dim=0)
    shift = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(fraction))  # P(N(0,1) + shift > 0) = fraction
    x = (torch.randn(B, N, D, generator=gen) + shift * u).requires_grad_()
    weight = torch.randn(num_experts, D, generator=gen) * 0.02
    weight[: num_experts // 4] = gain * u
    return x, weight


def zero_drop_capacity(drops: DropCounter, x, weight, start: float) -> float:
    cf = start
    while cf < 8.0:
        moe, _ = make_deepspeed(8, 2, 1536, cf, drops, x)
        drops.fraction_and_reset()
        with torch.no_grad():
            moe.deepspeed_moe.gate.wg.weight.copy_(weight)
            for _ in range(3):  # the 2nd expert is Gumbel-sampled: probe a few draws
                moe(x)
        if drops.fraction_and_reset() == 0.0:
            return cf
        cf += 0.25
    return cf


def section_skew(rounds: int, use_ds: bool, drops: DropCounter, out: dict) -> None:
    torch.set_num_threads(1)
    x, weight = skewed_input(8)
    task = torch.zeros(B, dtype=torch.long)
    ours, ours_step = make_ours(8, 2, 1536, drops, x, task)
    with torch.no_grad():
        ours.router.weight[0].copy_(weight)
    ours(x, task)
    out["skew_fraction_to_quarter"] = float(ours.last_counts_TE[0, :2].sum() / ours.last_counts_TE.sum())
    variants = {"dense_k2": make_dense(2 * 1536, x), "ours": ours_step}
    if use_ds:
        cf0 = zero_drop_capacity(drops, x, weight, start=2.0)
        for cf in (1.25, cf0):
            moe, step = make_deepspeed(8, 2, 1536, cf, drops, x)
            with torch.no_grad():
                moe.deepspeed_moe.gate.wg.weight.copy_(weight)
            drops.fraction_and_reset()
            moe(x)
            out[f"skew_ds_dropped_cf{int(round(cf * 100))}"] = drops.fraction_and_reset()
            variants[f"ds_cf{cf}"] = step
        out["skew_ds_cf_zero_drop"] = cf0
    res = interleaved(variants, "dense_k2", rounds)
    report("(d) skewed routing, E=8 k=2 H=1536, 1 thread", res)
    out["skew_ratio_dense_ours"] = res["ratio"]["ours"]
    if use_ds:
        out["skew_speedup_vs_deepspeed_cf125"] = paired(res, "ds_cf1.25", "ours")
        out["skew_speedup_vs_deepspeed_zero_drop"] = paired(res, f"ds_cf{cf0}", "ours")


def build_vits():
    """(dense timm ViT-S/16, MoE ViT-S/16 with MoE MLP E=16 k=4 H=384 in odd blocks, how the MoE one was built)."""
    import timm

    dense = timm.create_model("vit_small_patch16_224", num_classes=1000)
    moe_kwargs = {"hidden_dim": 384, "num_experts": 16, "top_k": 4, "router_init": "normal"}
    try:
        from pretrain.models.vit import VisionTransformer

        backbone = VisionTransformer(img_size=224, patch_size=16, embed_dim=D, depth=12, num_heads=6, num_tasks=3,
                                     placement="m3vit", moe_mlp_layer=MoEMlp, moe_mlp_kwargs=moe_kwargs)
        return dense, backbone, "pretrain.models.vit"
    except Exception as exc:
        logger.warning("pretrain.models.vit unusable (%s): using timm blocks with a local wrapper", exc)
    backbone = timm.create_model("vit_small_patch16_224", num_classes=0)
    for i in range(1, 12, 2):
        backbone.blocks[i].mlp = _TaskBound(MoEMlp(dim=D, num_tasks=3, **moe_kwargs))
    return dense, backbone, "timm + local wrapper"


class _TaskBound(torch.nn.Module):
    """timm Block's `mlp(x)` call -> `MoEMlp(x, task_B)` with task 0 for every sample."""

    def __init__(self, moe: MoEMlp) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return self.moe(x, torch.zeros(x.shape[0], dtype=torch.long))


def section_vit(threads: int, rounds: int, drops: DropCounter, out: dict) -> None:
    torch.manual_seed(0)
    dense, backbone, how = build_vits()
    head = torch.nn.Linear(D, 1000)
    images = torch.randn(B, 3, 224, 224)
    labels = torch.randint(0, 1000, (B,))
    task = torch.zeros(B, dtype=torch.long)
    moe_layers = [m for m in backbone.modules() if isinstance(m, MoEMlp)]

    def moe_step() -> None:
        feats = backbone(images, task) if how == "pretrain.models.vit" else backbone.forward_features(images)
        aux = sum(0.01 * m.aux["switch"] for m in moe_layers)
        (F.cross_entropy(head(feats[:, 0]), labels) + aux).backward()
        drops.ours_dropped += sum(B * feats.shape[1] * 4 - int(m.last_counts_TE.sum()) for m in moe_layers)

    variants = {"dense_vit_s": lambda: F.cross_entropy(dense(images), labels).backward(), "moe_vit_s": moe_step}
    res = interleaved(variants, "dense_vit_s", rounds)
    report(f"(e) ViT-S/16 step, batch 8, MoE built with {how}, {threads} thread(s)", res)
    out["vit_step_ratio" if threads == 1 else f"vit_step_ratio_t{threads}"] = res["ratio"]["moe_vit_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds per comparison instead of 9 (ViT: 2 vs 7)")
    parser.add_argument("--json", help="write the result keys to this path")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rounds, vit_rounds = (3, 2) if args.quick else (9, 7)
    use_ds = init_deepspeed()
    drops, out = DropCounter(), {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        section_layers(threads, rounds, use_ds, drops, out)
    section_skew(rounds, use_ds, drops, out)
    for threads in args.threads:
        torch.set_num_threads(threads)
        section_vit(threads, vit_rounds, drops, out)
    out["dropped_tokens"] = drops.ours_dropped
    write_results(out, args.json, quick=args.quick, threads=args.threads)


if __name__ == "__main__":
    main()
