"""Dense scenes for the embedded NYUD-v2 / PASCAL-Context trees: shapes on planes, with every label derived from
one scene so that the tasks agree with each other.

A scene is a back wall (a slanted plane), optionally a floor band (a plane tilted towards the camera) and 1-3
shapes, each a fronto-parallel or slanted plane in front of the wall. Per pixel the scene knows its part id
(0 = wall, 1 = floor, 2.. = shapes in drawing order), so semantic labels, depth (metres), normals (from the
depth gradient of the plane), edges (label boundaries) and saliency (the shapes) all follow from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pretrain.synth.draw import FILLS, SHAPES, background, paint, place, rasterize, shape_polygon

FOCAL = 100.0  # pixels per metre at depth 1 m: turns a plane's depth slope per pixel into a normal


@dataclass
class Scene:
    """One drawn scene.

    Attributes:
        canvas_HW3: float RGB image.
        part_HW: int part id per pixel (0 wall, 1 floor, 2 + k for shape k).
        depth_HW: float32 metres (> 0 everywhere).
        normals_HW3: float32 unit normals from the depth gradient (z towards the camera).
        shapes: shape index (into ``SHAPES``) of each drawn shape, in part-id order.
        masks: boolean [H, W] visible mask of each shape (later shapes cover earlier ones).
    """

    canvas_HW3: np.ndarray
    part_HW: np.ndarray
    depth_HW: np.ndarray
    normals_HW3: np.ndarray
    shapes: list[int]
    masks: list[np.ndarray]


def _plane(rng: np.random.Generator, h: int, w: int, base: float, tilt: float) -> tuple[np.ndarray, np.ndarray]:
    """Depth [H, W] of a plane ``base + gx * x + gy * y`` and its unit normal [3] from the slope."""
    gx, gy = rng.uniform(-tilt, tilt, 2) / max(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    normal = np.array([-gx * FOCAL, -gy * FOCAL, 1.0], np.float32)
    return (base + gx * xx + gy * yy).astype(np.float32), normal / np.linalg.norm(normal)


def _floor(h: int, w: int, top: int) -> tuple[np.ndarray, np.ndarray]:
    """A floor plane coming closer towards the bottom rows (3 m at row ``top``, 1.5 m nearer per image height)."""
    gy = -1.5 / h
    yy = np.mgrid[0:h, 0:w][0].astype(np.float32)
    normal = np.array([0.0, -gy * FOCAL, 1.0], np.float32)
    return (3.0 + gy * (yy - top)).astype(np.float32), normal / np.linalg.norm(normal)


def draw_scene(rng: np.random.Generator, h: int, w: int, *, floor: bool, shapes: list[int] | None = None) -> Scene:
    """Draw a scene of ``h`` x ``w`` pixels; ``shapes`` fixes the shape indices (default: 1-3 random ones)."""
    canvas = background(rng, h, w)
    part = np.zeros((h, w), np.int32)
    depth, n_wall = _plane(rng, h, w, rng.uniform(4.0, 6.0), 1.0)
    normals = np.broadcast_to(n_wall, (h, w, 3)).copy()
    if floor:
        top = int(h * rng.uniform(0.65, 0.8))
        band = np.arange(h)[:, None].repeat(w, 1) >= top
        floor_depth, n_floor = _floor(h, w, top)
        part[band], depth[band], normals[band] = 1, floor_depth[band], n_floor
        canvas[band] = canvas[band] * 0.6 + 40
    chosen = shapes if shapes is not None else [int(rng.integers(len(SHAPES))) for _ in range(rng.integers(1, 4))]
    masks = []
    for k, s in enumerate(chosen):
        cx, cy, radius = place(rng, h, w, (0.18, 0.32))
        mask = rasterize(shape_polygon(SHAPES[s], cx, cy, radius, rng.uniform(0, 2 * np.pi)), h, w)
        plane, n_shape = _plane(rng, h, w, rng.uniform(1.0, 2.5), 0.6)
        paint(rng, canvas, mask, FILLS[rng.integers(len(FILLS))], radius)
        part[mask], depth[mask], normals[mask] = 2 + k, plane[mask], n_shape
        masks.append(mask)
    visible = [part == 2 + k for k in range(len(chosen))]
    return Scene(canvas, part, depth.astype(np.float32), normals.astype(np.float32), list(chosen), visible)


def boundaries(labels_HW: np.ndarray) -> np.ndarray:
    """Boolean [H, W]: pixels whose right or lower neighbour has another label (one-pixel class boundaries)."""
    edge = np.zeros(labels_HW.shape, bool)
    edge[:, :-1] |= labels_HW[:, :-1] != labels_HW[:, 1:]
    edge[:-1, :] |= labels_HW[:-1, :] != labels_HW[1:, :]
    return edge


def normals_png(normals_HW3: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] with v = round((n + 1) / 2 * 255), the release encoding (decoded n = 2 v / 255 - 1)."""
    return np.clip(np.round((normals_HW3 + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)
