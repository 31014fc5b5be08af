"""Training-loader throughput for the ImageNet-style pipeline versus a bare decode-and-transform ceiling.

    python benchmarks/bench_data.py [--seconds 8] [--rounds 3] [--json out.json]

Writes shards of natural-looking JPEGs (500×375, q=90, ~0.5 B/px: multi-octave smooth noise, shapes, grain; real
ImageNet ≈ 0.8 B/px decodes somewhat slower) into a temp dir, then measures, after a warm-up that covers worker start
and the shuffle-buffer fill:
- loader: `make_train_loader("cls", ...)` (the real pipeline: resampled shards, shuffle, decode, RandomResizedCrop +
  flip, uint8 collate, worker → main transfer through reused shared-memory slots), batch 64, at 224 and 128 px with 1
  and 2 workers; `fresh`: the same loader with `reuse_buffers=False` (the DataLoader's own transport);
- ceiling: the same decode + transform on the same bytes in a bare loop, 1 thread per process, with 1 process
  (ceiling_w1) and with 2 processes running at once (ceiling_w2 = sum of both rates: what the machine's cores give
  two independent decoders, without pipeline, collation or transfer).
Figures on a shared machine are noisy: each round measures loader, fresh and ceiling back to back, and the table
gives the median over rounds (ratios are medians of per-round ratios).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter

from pretrain.data.decode import decode_cls_sample
from pretrain.data.sources import make_train_loader
from pretrain.data.transforms import transform_cls

BATCH = 64


def natural_jpeg(rng: np.random.Generator, w: int = 500, h: int = 375, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth multi-scale colour noise, a few filled shapes, slight blur, sensor-like grain."""
    img = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 90), (12, 45), (40, 22), (120, 10)):
        small = rng.normal(0, 1, (max(2, cells * h // w), cells, 3)) * 40 + 128
        up = Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        img += (np.asarray(up, np.float32) - 128) * amp / 40
    pil = Image.fromarray((img + rng.uniform(60, 190, 3)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 150))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    arr = np.asarray(pil.filter(ImageFilter.GaussianBlur(1.0)), np.float32)
    arr += rng.normal(0, 14, (h, w, 1)) + rng.normal(0, 5, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_shards(root: Path, *, unique: int, shards: int, per_shard: int) -> list[bytes]:
    """`shards` × `per_shard` samples cycling over `unique` generated JPEGs; returns the JPEG bytes."""
    rng = np.random.default_rng(0)
    images = [natural_jpeg(rng) for _ in range(unique)]
    names = []
    for s in range(shards):
        names.append(f"bench-{s:06d}.tar")
        # mtime=0 as `pretrain prepare` writes: a float mtime makes tarfile add a PAX header to every member
        with wds.TarWriter(str(root / names[-1]), encoder=False, mtime=0) as sink:
            for i in range(per_shard):
                k = s * per_shard + i
                sink.write({"__key__": f"img{k:07d}", "jpg": images[k % unique], "cls": str(k % 1000).encode()})
    info = {"num_samples": shards * per_shard, "shards": names, "shard_lengths": [per_shard] * shards,
            "num_classes": 1000}
    (root / "_info.json").write_text(json.dumps(info))
    return images


def loader_rate(root: Path, *, size: int, workers: int, seconds: float, warmup_batches: int,
                reuse_buffers: bool = True) -> float:
    """Samples/s of the real training loader after `warmup_batches` batches."""
    it = iter(make_train_loader("cls", root, batch_size=BATCH, img_size=size, seed=0, num_workers=workers,
                                reuse_buffers=reuse_buffers))
    for _ in range(warmup_batches):
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(next(it)["labels"])
    rate = n / (time.perf_counter() - t0)
    del it  # stops the workers before the next measurement
    return rate


def bare_rate(images: list[bytes], size: int, seconds: float, seed: int = 0) -> float:
    """Samples/s of decode + train transform in a plain loop (1 thread)."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sample = decode_cls_sample({"jpg": images[n % len(images)], "cls": b"1"}, num_classes=1000)
        transform_cls(sample, rng=rng, size=size, train=True)
        n += 1
    return n / (time.perf_counter() - t0)


def _bare_worker(args: tuple[list[bytes], int, float, int]) -> float:
    return bare_rate(*args)


def ceiling(images: list[bytes], size: int, seconds: float, processes: int) -> float:
    """Summed bare-loop rate of `processes` processes running at the same time."""
    if processes == 1:
        return bare_rate(images, size, seconds)
    with mp.get_context("fork").Pool(processes) as pool:
        return sum(pool.map(_bare_worker, [(images, size, seconds, p) for p in range(processes)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measurement time per configuration")
    parser.add_argument("--unique", type=int, default=200, help="distinct JPEGs generated")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every measurement (median taken)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs: dict[str, list[float]] = {}
    configs = [(size, workers) for size in (224, 128) for workers in (1, 2)]
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        images = write_shards(root, unique=args.unique, shards=8, per_shard=250)
        bpp = np.mean([len(b) for b in images]) / (500 * 375)
        print(f"wrote 8 shards × 250 samples ({bpp:.2f} B/px, 500×375, q=90) in {time.perf_counter() - t0:.1f} s")
        for _ in range(args.rounds):
            for size, workers in configs:
                key = f"{size}_w{workers}"
                kw = {"size": size, "workers": workers, "seconds": args.seconds, "warmup_batches": 2 * workers + 2}
                loader, fresh = loader_rate(root, **kw), loader_rate(root, reuse_buffers=False, **kw)
                bare = ceiling(images, size, args.seconds, workers)
                for name, value in ((f"samples_per_s_{key}", loader), (f"fresh_samples_per_s_{key}", fresh),
                                    (f"ceiling_{key}", bare), (f"ratio_vs_ceiling_{key}", loader / bare),
                                    (f"fresh_ratio_vs_ceiling_{key}", fresh / bare)):
                    runs.setdefault(name, []).append(value)
    results: dict[str, float | list[float]] = {k: float(np.median(v)) for k, v in runs.items()}
    for key in ("ratio_vs_ceiling_224_w2", "ratio_vs_ceiling_128_w2"):
        results[key + "_rounds"] = runs[key]  # the spread behind the median
    print(f"median of {args.rounds} rounds × {args.seconds:g} s")
    print(f"{'size':>5} {'workers':>7} {'loader/s':>9} {'fresh/s':>8} {'ceiling/s':>10} {'ratio':>6} {'fresh':>6}")
    for size, workers in configs:
        key = f"{size}_w{workers}"
        print(f"{size:>5} {workers:>7} {results['samples_per_s_' + key]:>9.0f} "
              f"{results['fresh_samples_per_s_' + key]:>8.0f} {results['ceiling_' + key]:>10.0f} "
              f"{results['ratio_vs_ceiling_' + key]:>6.2f} {results['fresh_ratio_vs_ceiling_' + key]:>6.2f}")
    print("targets: >= 500/s at 224 and >= 800/s at 128 with 2 workers, >= 0.9x ceiling")
    if args.json:
        rounded = {k: [round(x, 3) for x in v] if isinstance(v, list) else round(v, 3) for k, v in results.items()}
        args.json.write_text(json.dumps(rounded, indent=1))


if __name__ == "__main__":
    main()
