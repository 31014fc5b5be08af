"""MLoRE block: merged inference and the two training forms vs a plain 3×3 conv and the official forms.

    python benchmarks/bench_mlore.py [--rounds 7] [--threads 1] [--json out.json] [--profile]
                                     [--device cuda] [--decoder pascal_vitl]

One block at C=192, 32×32, fp32 CPU. Ranks: the PASCAL ViT-S list 8, 12, ... extended linearly to N experts,
top-k = round(0.6 N) (performance.md §4). Floor ("conv") = one plain 3×3 conv C→C.
  core, as performance.md §4 (task expert and the surrounding 1×1 convs left out: equal in every variant; gates
  given): inference B=1 = everything folded into per-image kernels ("merged": one GEMM + one grouped conv;
  "official": the `MLoRE_repara.py` per-image loop over precomputed expert kernels); training fwd+bwd B=2 =
  expert_norm(Σ g_i M_i W_i u) + generic(u.detach()) with the experts as "merged" (kernels built under autograd),
  "lowrank" (fused C→Σr, Σr→C) or "official" (every expert at full width).
  block: the whole MLoREBlock forward for one task (1×1 in/out, router, tail), same batch sizes; the official
  rows run the transcription in pretrain/models/decoders/mlore_official.py.
Keys: merged_n20_over_n5 (target ≤ 1.15), merged_n20_over_conv (≤ 1.5), train_n15_over_conv (≤ 2, the default
`train_form`), their official_* counterparts, train_lowrank_n15_over_conv and block_* figures.
--decoder PRESET adds the whole decoder (PASCAL tasks, or NYUD's for nyud_*) on shared ViT taps [2, D, 32, 32]:
training step fwd+bwd per train_form and eval unmerged vs merged, with the merged/unmerged max relative error.
--device cuda runs everything on the GPU (each timed call ends with a synchronize; PyTorch's default TF32 rules).
Method (performance.md §0): variants round-robin, order reversed every other round, noisy rounds skipped, medians
of per-round paired ratios (harness.py).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

import torch
from harness import interleaved, paired, report, write_results

from pretrain.models.decoders import MLORE_PRESETS, build_mlore
from pretrain.models.decoders.mlore_block import MLoREBlock
from pretrain.models.decoders.mlore_official import OfficialMoEBlock

logger = logging.getLogger(__name__)
C, HW, TASK = 192, 32, "t"
DECODER_TASKS = {"pascal": {"semseg": 21, "human_parts": 7, "sal": 2, "normals": 3, "edge": 1},
                 "nyud": {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}}
EMBED = {"vitl": 1024, "vitb": 768, "vits": 384}


def synced(variants: dict[str, Callable[[], None]]) -> dict[str, Callable[[], None]]:
    """On CUDA a timed call must include its kernels: synchronize after each."""
    if torch.get_default_device().type != "cuda":
        return variants

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        return lambda: (fn(), torch.cuda.synchronize())
    return {name: wrap(fn) for name, fn in variants.items()}


def ranks(n: int) -> tuple[int, ...]:
    return tuple(8 + 4 * i for i in range(n))


def make_blocks(n: int) -> tuple[MLoREBlock, OfficialMoEBlock]:
    """Our block and the official transcription with the same weights (BN statistics made non-trivial)."""
    kw = {"channels": C, "tasks": [TASK], "ranks": ranks(n), "spe_rank": 32, "top_k": round(0.6 * n),
          "pre_softmax": False}
    ours = MLoREBlock(**kw, router_pool="mean")
    official = OfficialMoEBlock(**kw, hw=HW * HW)
    with torch.no_grad():
        for bn in (*ours.expert_norm.values(), *ours.tail_norm.values()):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
        for name, param in official.named_parameters():  # official weights from ours where the shapes agree
            if name.startswith("lora_list_1."):
                i, wm, kind = name.split(".")[1:]
                sources = {("W", "weight"): ours.experts.w_weight, ("W", "bias"): ours.experts.w_bias}
                if (wm, kind) in sources:
                    param.copy_(sources[(wm, kind)].split(ranks(n))[int(i)])
                elif kind == "weight":
                    param.copy_(ours.experts.m_weight.split(ranks(n), dim=1)[int(i)][:, :, None, None])
                else:
                    param.copy_(ours.experts.m_bias[int(i)])
        official.bn_all[TASK].load_state_dict(ours.expert_norm[TASK].state_dict())
        official.share_conv.load_state_dict(ours.generic.state_dict())
    return ours, official


def section_inference(rounds: int, out: dict) -> None:
    u = torch.randn(1, C, HW, HW)
    conv = torch.nn.Conv2d(C, C, 3, padding=1).eval()
    core: dict[str, Callable[[], None]] = {"conv": lambda: conv(u)}
    block: dict[str, Callable[[], None]] = {"conv": lambda: conv(u)}
    for n in (5, 20):
        ours, official = make_blocks(n)
        ours.eval()  # eval mode runs the merged inference form
        official.eval().reparameter()
        gates, prob_mix = ours.router[TASK](u)
        core[f"merged_n{n}"] = lambda o=ours, g=gates, p=prob_mix: o.merged_mix({TASK: u}, {TASK: g}, {TASK: p})
        core[f"official_n{n}"] = lambda o=official, g=gates, p=prob_mix: o.merged_loop(u, TASK, g, p[:, None])
        block[f"merged_n{n}"] = lambda o=ours: o({TASK: u})
        block[f"official_n{n}"] = lambda o=official: o.forward_merged_loop(u, TASK)
    with torch.no_grad():
        res_core = interleaved(synced(core), "conv", rounds)
        res_block = interleaved(synced(block), "conv", rounds)
    report("inference core, B=1 (ms; ratio = x conv)", res_core)
    report("inference whole block, B=1", res_block)
    out["merged_n20_over_n5"] = paired(res_core, "merged_n20", "merged_n5")
    out["merged_n20_over_conv"] = res_core["ratio"]["merged_n20"]
    out["official_merged_n20_over_n5"] = paired(res_core, "official_n20", "official_n5")
    out["official_merged_n20_over_conv"] = res_core["ratio"]["official_n20"]
    out["block_merged_n20_over_n5"] = paired(res_block, "merged_n20", "merged_n5")
    out["block_merged_n20_over_conv"] = res_block["ratio"]["merged_n20"]
    out["block_official_merged_n20_over_conv"] = res_block["ratio"]["official_n20"]
    out["ms_inference_core"], out["ms_inference_block"] = res_core["ms"], res_block["ms"]


def _step(fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for p in params:
            p.grad = None
        fn().pow(2).mean().backward()
    return run


def training_variants(n: int) -> tuple[dict[str, Callable[[], None]], dict[str, Callable[[], None]]]:
    """(core, block) fwd+bwd step functions at B=2 for the floor and every training form."""
    u = torch.randn(2, C, HW, HW, requires_grad=True)
    conv = torch.nn.Conv2d(C, C, 3, padding=1)
    ours, official = make_blocks(n)
    ours.train()
    official.train()
    gates, prob_mix = (t.detach().requires_grad_() for t in ours.router[TASK](u))
    noise = torch.randn_like(gates)
    norm, generic = ours.expert_norm[TASK], ours.generic
    grads = [u, gates, *conv.parameters(), *ours.parameters(), *official.parameters()]

    def core_official() -> torch.Tensor:
        mix = sum(lora(u) * gates[:, i, None, None, None] for i, lora in enumerate(official.lora_list_1))
        return official.bn_all[TASK](mix) + official.share_conv(u.detach())

    def core_ours(form: str) -> torch.Tensor:
        ours.train_form = form
        return norm(ours.expert_mix({TASK: u}, {TASK: gates})[TASK]) + generic(u.detach())

    def block(form: str) -> torch.Tensor:
        ours.train_form = form
        return ours({TASK: u})[0][TASK]

    core = {"conv": _step(lambda: conv(u), grads),
            "merged": _step(lambda: core_ours("merged"), grads), "lowrank": _step(lambda: core_ours("lowrank"), grads),
            "official": _step(core_official, grads)}
    blocks = {"conv": core["conv"], "merged": _step(lambda: block("merged"), grads),
              "lowrank": _step(lambda: block("lowrank"), grads),
              "official": _step(lambda: official(u, TASK, noise)[0], grads)}
    return core, blocks


def section_training(rounds: int, out: dict, profile: bool) -> None:
    core, blocks = training_variants(15)
    res_core = interleaved(synced(core), "conv", rounds)
    res_block = interleaved(synced(blocks), "conv", rounds)
    report("training fwd+bwd core, N=15, B=2", res_core)
    report("training fwd+bwd whole block, N=15, B=2", res_block)
    fastest = min(("merged", "lowrank"), key=lambda f: res_block["ratio"][f])
    out["train_n15_over_conv"] = res_core["ratio"]["merged"]
    out["train_lowrank_n15_over_conv"] = res_core["ratio"]["lowrank"]
    out["official_train_n15_over_conv"] = res_core["ratio"]["official"]
    out["train_lowrank_over_merged"] = paired(res_core, "lowrank", "merged")
    out["block_train_merged_n15_over_conv"] = res_block["ratio"]["merged"]
    out["block_train_lowrank_n15_over_conv"] = res_block["ratio"]["lowrank"]
    out["block_official_train_n15_over_conv"] = res_block["ratio"]["official"]
    out["fastest_train_form"] = fastest
    out["ms_train_core"], out["ms_train_block"] = res_core["ms"], res_block["ms"]
    if profile:
        for name in ("merged", "lowrank"):
            with torch.profiler.profile() as prof:
                for _ in range(3):
                    core[name]()
            print(f"\nprofile: training core '{name}' (3 steps)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def section_decoder(preset: str, rounds: int, out: dict) -> None:
    """Whole decoder at a preset: training step per train_form, eval unmerged vs merged (and their difference)."""
    dataset, size = preset.split("_")
    dec = build_mlore(embed_dim=EMBED[size], depth=12, tasks=DECODER_TASKS[dataset], preset=preset,
                      inference_form="unmerged")
    taps = [torch.randn(2, EMBED[size], HW, HW) for _ in range(4)]
    feats = {t: taps for t in dec.tasks}

    def train_step(form: str) -> Callable[[], None]:
        def run() -> None:
            for level in dec.blocks:
                for block in level:
                    block.train_form = form
            dec.zero_grad(set_to_none=True)
            preds, aux = dec(feats, (4 * HW, 4 * HW))
            (sum(p.pow(2).mean() for p in preds.values()) + 1e-4 * aux["mlore_balance"]).backward()
        return run

    dec.train()
    res_train = interleaved(synced({"merged": train_step("merged"), "lowrank": train_step("lowrank")}), "merged",
                            rounds)
    report(f"decoder {preset} training step, B=2, {HW}x{HW} taps", res_train)
    dec.eval()
    merged_dec = build_mlore(embed_dim=EMBED[size], depth=12, tasks=DECODER_TASKS[dataset], preset=preset)
    merged_dec.load_state_dict(dec.state_dict())
    merged_dec.eval()
    with torch.no_grad():
        res_inf = interleaved(synced({"unmerged": lambda: dec(feats, (4 * HW, 4 * HW)),
                                      "merged": lambda: merged_dec(feats, (4 * HW, 4 * HW))}), "unmerged", rounds)
        want, got = dec(feats, (4 * HW, 4 * HW))[0], merged_dec(feats, (4 * HW, 4 * HW))[0]
    report(f"decoder {preset} inference, B=2", res_inf)
    err = max(float((got[t] - want[t]).abs().max() / want[t].abs().max()) for t in want)
    out[f"decoder_{preset}"] = {"train_lowrank_over_merged": res_train["ratio"]["lowrank"],
                                "infer_merged_over_unmerged": res_inf["ratio"]["merged"], "merge_max_rel_err": err,
                                "ms_train": res_train["ms"], "ms_infer": res_inf["ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the result keys to this path")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler top ops of the training forms")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decoder", choices=list(MLORE_PRESETS), help="also time the whole decoder at this preset")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.set_default_device(args.device)
    torch.manual_seed(0)
    out: dict = {}
    section_inference(args.rounds, out)
    section_training(args.rounds, out, args.profile)
    if args.decoder:
        section_decoder(args.decoder, args.rounds, out)
    write_results(out, args.json, rounds=args.rounds, threads=args.threads, channels=C, size=HW, device=args.device)


if __name__ == "__main__":
    main()
