"""Drawing for the embedded corpus: shape outlines, rasterised masks, colours, textured backgrounds, encoding.

Every image draws from its own generator, `rng_for(seed, dataset, split, index)`: same seed, same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pretrain.catalog import DATASETS

SHAPES = ("circle", "square", "triangle", "star", "cross", "crescent", "arrow", "ell")
FILLS = ("solid", "stripes", "checker")
COCO_CATEGORY_IDS = (1, 3, 7, 14, 22, 37, 52, 88)  # shape i -> category id; gaps like COCO's 1..90
ADE_CLASS_IDS = (12, 25, 37, 56, 74, 93, 117, 142)  # shape i -> ADE20K label id in 1..150
ADE_FLOOR_ID = 4
JPEG_QUALITY = 90
DS_STORE = b"\x00\x00\x00\x01Bud1" + bytes(24)  # the magic of a macOS .DS_Store; any content would do
# the drawings' RNG code per dataset: the catalog id + 1 (codes started at 1; kept so the corpus's bytes stay)
DATASET_CODES = {name: d.id + 1 for name, d in DATASETS.items()}
SPLIT_CODES = {"train": 0, "val": 1}


_W = 0.32  # half-width of the cross arms
_FIXED_POLYGONS = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "cross": [(-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W), (_W, 1), (-_W, 1), (-_W, _W), (-1, _W),
              (-1, -_W), (-_W, -_W)],
    "arrow": [(-1, -0.3), (0.2, -0.3), (0.2, -0.75), (1, 0), (0.2, 0.75), (0.2, 0.3), (-1, 0.3)],
    "ell": [(-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)],
}


def unit_polygon(shape: str) -> np.ndarray:
    """Outline of ``shape`` as [P, 2] points, scaled so that the farthest point lies on the unit circle."""
    if shape in _FIXED_POLYGONS:
        pts = np.array(_FIXED_POLYGONS[shape], float)
    elif shape == "circle":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "triangle":
        a = np.deg2rad([-90, 30, 150])
        pts = np.stack([np.cos(a), np.sin(a)], 1)
    elif shape == "star":
        a = np.linspace(-np.pi / 2, 1.5 * np.pi, 10, endpoint=False)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    elif shape == "crescent":  # outer arc through the left, inner arc meeting it at both tips
        a = np.deg2rad(np.linspace(50, 310, 24))
        inner = np.stack([0.55 * np.cos(a[::-1]) + np.cos(a[0]) * 0.45, np.sin(a[::-1])], 1)
        pts = np.concatenate([np.stack([np.cos(a), np.sin(a)], 1), inner])
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return pts / np.linalg.norm(pts, axis=1).max()


def shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = unit_polygon(shape) @ rot.T * radius + np.array([cx, cy])
    return [(round(float(x), 2), round(float(y), 2)) for x, y in pts]


def rasterize(polygon: list[tuple[float, float]], h: int, w: int) -> np.ndarray:
    """Boolean [H, W] mask of a polygon, drawn without anti-aliasing so label ids stay exact."""
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


def hsv(h: float, s: float, v: float) -> np.ndarray:
    rgb = Image.new("HSV", (1, 1), (int(h * 255), int(s * 255), int(v * 255))).convert("RGB").getpixel((0, 0))
    return np.array(rgb, np.float32)


def muted_colour(rng: np.random.Generator) -> np.ndarray:
    return hsv(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.15, 0.6))


def bright_colour(rng: np.random.Generator) -> np.ndarray:
    return hsv(rng.random(), rng.uniform(0.65, 1), rng.uniform(0.75, 1))


def ramp(rng: np.random.Generator, h: int, w: int, period: float, kind: str) -> np.ndarray:
    """[H, W] float pattern in 0..1: ``stripes``/``checker`` (binary, random angle), ``noise``, ``gradient``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, np.pi)
    u, v = xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)
    if kind == "stripes":
        return (np.floor(u / (period / 2)) % 2).astype(np.float32)
    if kind == "checker":
        return ((np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2).astype(np.float32)
    if kind == "noise":
        coarse = Image.fromarray(rng.random((h // 16 + 2, w // 16 + 2)).astype(np.float32), mode="F")
        return np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.float32)
    if kind == "gradient":
        return (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    return np.zeros((h, w), np.float32)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """[H, W, 3] float canvas: muted two-colour noise, gradient, low-contrast stripes or plain."""
    kind = ("noise", "gradient", "stripes", "plain")[rng.integers(4)]
    t = ramp(rng, h, w, rng.uniform(8, 24), kind)[..., None]
    canvas = muted_colour(rng) * (1 - t) + muted_colour(rng) * t
    return canvas + rng.normal(0, 6, (h, w, 1)).astype(np.float32)


def paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, fill: str, radius: float) -> None:
    """Fill ``mask`` of the [H, W, 3] canvas with a bright colour in the given texture (in place)."""
    color = bright_colour(rng)
    t = ramp(rng, *mask.shape, max(6.0, radius / 2.5), fill)[..., None]
    canvas[mask] = (color * (1 - t) + color * 0.3 * t)[mask]


def place(rng: np.random.Generator, h: int, w: int, rel: tuple[float, float]) -> tuple[float, float, float]:
    """Random (cx, cy, radius) with radius = rel-range x short side, fully inside the image."""
    radius = rng.uniform(*rel) * min(h, w)
    return rng.uniform(radius, w - radius), rng.uniform(radius, h - radius), radius


def image_dims(rng: np.random.Generator, image_size: tuple[int, int]) -> tuple[int, int]:
    lo, hi = image_size
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def encode(canvas: np.ndarray, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB").convert(mode)
    image.save(buf, fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return buf.getvalue()


def rng_for(seed: int, dataset: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, DATASET_CODES[dataset], SPLIT_CODES[split], index])


def rle(mask_HW: np.ndarray) -> dict:
    """Uncompressed COCO RLE (column-major run lengths, starting with a zero run) of a boolean mask."""
    flat = mask_HW.T.ravel()
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"counts": ([0] + counts) if flat[0] else counts, "size": list(mask_HW.shape)}


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
