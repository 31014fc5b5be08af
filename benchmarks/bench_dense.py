"""Per-sample CPU cost of the dense fine-tuning data path: decode, new-protocol train transform, photometric part.

    python benchmarks/bench_dense.py [--rounds 3] [--n 10]

Builds one synthetic sample per dataset at the release sizes (NYUD 425×560 PNG image + depth/normals/edge/semseg;
PASCAL 375×500 JPEG + all five label maps; smooth images with grain, so PNG/JPEG sizes are plausible), then times
`decode_dense_sample`, `transform_dense(train=True)` at the default crop and `photometric_distortion` alone, one
thread, median over rounds. On a shared machine the absolute numbers move with the load; the split between stages
is the useful part.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import time

import numpy as np
import torch
from PIL import Image

from pretrain.data.dense_decode import DENSE_DATASETS, decode_dense_sample
from pretrain.data.dense_transforms import photometric_distortion, transform_dense

SIZES = {"nyud": (425, 560), "pascal_context": (375, 500)}


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _sample(dataset: str, rng: np.random.Generator) -> dict[str, bytes]:
    h, w = SIZES[dataset]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    smooth = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], axis=-1)
    image = np.clip(127 + 100 * smooth + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    labels = ((xx * 7).astype(np.uint8) + (yy * 3).astype(np.uint8))
    normals = np.clip(127 + 120 * smooth, 0, 255).astype(np.uint8)
    out = {"semseg.png": _encode(labels % 20, "PNG"), "normals.png": _encode(normals, "PNG"),
           "edge.png": _encode(((labels % 7 == 0) * 255).astype(np.uint8), "PNG")}
    if dataset == "nyud":
        buf = io.BytesIO()
        np.save(buf, (1 + 3 * yy).astype(np.float32))
        out.update({"png": _encode(image, "PNG"), "depth.npy": buf.getvalue()})
    else:
        out.update({"jpg": _encode(image, "JPEG"), "human_parts.png": _encode(labels % 7, "PNG"),
                    "sal.png": _encode((labels * 30).astype(np.uint8), "PNG"),
                    "normals_valid.png": _encode((labels % 5 != 0).astype(np.uint8), "PNG")})
    out["json"] = json.dumps({"id": "x", "width": w, "height": h, "tasks": list(DENSE_DATASETS[dataset].tasks)})
    out["json"] = out["json"].encode()
    return out


def _ms(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e3 * (time.perf_counter() - start) / n


def _bench(dataset: str, *, rounds: int, n: int) -> dict[str, float]:
    spec = DENSE_DATASETS[dataset]
    raw = _sample(dataset, np.random.default_rng(0))
    decoded = decode_dense_sample(raw, dataset=spec, tasks=spec.tasks)
    rng = random.Random(0)
    stages = {"decode": lambda: decode_dense_sample(raw, dataset=spec, tasks=spec.tasks),
              "train_transform": lambda: transform_dense(decoded, rng=rng, size=spec.train_size, train=True),
              "photometric": lambda: photometric_distortion(decoded["image"], rng)}
    times: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(rounds):
        for name, fn in stages.items():
            times[name].append(_ms(fn, n))
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=10, help="samples per timing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for dataset in DENSE_DATASETS:
        result = _bench(dataset, rounds=args.rounds, n=args.n)
        print(dataset, " ".join(f"{k} {v:.1f} ms" for k, v in result.items()))


if __name__ == "__main__":
    main()
