"""MLoRE inference: the default eval forward (merged, re-parameterised) vs the unmerged training form, CPU.

    python benchmarks/bench_mlore_merge.py [--preset pascal_vits] [--batch 2] [--rounds 7] [--threads 1]
                                           [--json out.json]

A realistic small size: the PASCAL ViT-S preset (C=192, 15 experts of ranks 8..64, spe_rank 32, top-9), the five
PASCAL tasks, ViT-S taps [B, 384, 32, 32] (512 px input, as pascal_vits_mlore.yaml evaluates), B=2 (its
eval_batch_size), fp32, no grad, eval mode. "merged" = `build_mlore(...)` as every caller gets it; "unmerged" =
`inference_form="unmerged"`, the same weights, BatchNorm statistics made non-trivial. Timed, A and B alternating in
each round with the order reversed every other round, medians of the per-round paired ratios (harness.py):
  - decoder: the whole decoder forward (8 MLoRE blocks + level fusion + heads, to 512×512), what evaluation pays;
  - blocks: one MLoRE block for the five tasks, the part the re-parameterisation changes.
Keys: speedup_decoder / speedup_blocks = unmerged time / merged time (> 1: merged faster), and max_rel_err, the
largest |merged − unmerged| / max|unmerged| over the tasks' predictions.
"""

from __future__ import annotations

import argparse
import logging

import torch
from harness import interleaved, paired, report, write_results

from pretrain.models.decoders import MLORE_PRESETS, build_mlore

logger = logging.getLogger(__name__)
TASKS = {"pascal": {"semseg": 21, "human_parts": 7, "sal": 2, "normals": 3, "edge": 1},
         "nyud": {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}}
EMBED = {"vitl": 1024, "vitb": 768, "vits": 384}
HW = 32  # stride-16 taps of a 512 px input


def build_pair(preset: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(merged, unmerged) decoders with the same weights and non-trivial BatchNorm statistics, in eval mode."""
    dataset, size = preset.split("_")
    kw = {"embed_dim": EMBED[size], "depth": 12, "tasks": TASKS[dataset], "preset": preset}
    merged = build_mlore(**kw)
    with torch.no_grad():
        for bn in merged.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.normal_(0, 0.1)
                bn.running_var.uniform_(0.5, 2.0)
    unmerged = build_mlore(**kw, inference_form="unmerged")
    unmerged.load_state_dict(merged.state_dict())
    return merged.eval(), unmerged.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="pascal_vits", choices=list(MLORE_PRESETS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the result keys to this path")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    merged, unmerged = build_pair(args.preset)
    assert merged.blocks[0][0].merged_inference and not unmerged.blocks[0][0].merged_inference
    taps = [torch.randn(args.batch, merged.proj[0].in_channels, HW, HW) for _ in range(4)]
    feats = {t: taps for t in merged.tasks}
    size = (16 * HW, 16 * HW)
    x_by_task = {t: torch.randn(args.batch, merged.proj[0].out_channels, HW, HW) for t in merged.tasks}
    out: dict = {}
    with torch.no_grad():
        want, got = unmerged(feats, size)[0], merged(feats, size)[0]
        out["max_rel_err"] = max(float((got[t] - want[t]).abs().max() / want[t].abs().max()) for t in want)
        res_dec = interleaved({"unmerged": lambda: unmerged(feats, size), "merged": lambda: merged(feats, size)},
                              "unmerged", args.rounds)
        res_blk = interleaved({"unmerged": lambda: unmerged.blocks[0][0](x_by_task),
                               "merged": lambda: merged.blocks[0][0](x_by_task)}, "unmerged", args.rounds)
    report(f"decoder eval forward, {args.preset}, B={args.batch}, {HW}x{HW} taps (ratio = x unmerged)", res_dec)
    report(f"one MLoRE block eval forward, {len(merged.tasks)} tasks", res_blk)
    print(f"\nmax relative difference merged vs unmerged (fp32): {out['max_rel_err']:.2e}")
    out["speedup_decoder"] = paired(res_dec, "unmerged", "merged")
    out["speedup_blocks"] = paired(res_blk, "unmerged", "merged")
    out["ms_decoder"], out["ms_block"] = res_dec["ms"], res_blk["ms"]
    out["clean_rounds"] = {"decoder": res_dec["clean_rounds"], "block": res_blk["clean_rounds"]}
    write_results(out, args.json, rounds=args.rounds, threads=args.threads, preset=args.preset, batch=args.batch)


if __name__ == "__main__":
    main()
