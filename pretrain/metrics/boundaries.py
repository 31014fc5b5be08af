"""Boundary-map operations of the SEISM / BSDS boundary benchmark, in numpy + scipy (no MATLAB, no mex files).

- `edge_nms`: SEISM's `read_one_cont_png` pre-processing (Piotr Dollár's `edgesNmsMex` with the orientation from a
  triangle-smoothed map), used by the new protocol before thresholding.
- `thin`: MATLAB `bwmorph(B, 'thin', Inf)` (Guo & Hall's two-subiteration algorithm as given by Lam, Lee & Suen
  1992), written here with a 256-entry lookup table per subiteration so it needs only scipy; scikit-image's
  `morphology.thin` implements the same algorithm (the tests compare against it when it is installed).
- `seg2bmap`: SEISM / BSDS `seg2bmap`, boundaries of a label image (a pixel differing from its E, S or SE neighbour).
- `match_count`: how many pixels `correspondPixels` (BSDS / SEISM) matches between two boundary maps at tolerance
  r pixels. correspondPixels solves a min-cost perfect assignment (CSA) on a graph where a pair of pixels within r
  costs its distance and every pixel may instead go to an outlier node at cost outlierCost = 100·r, outlier nodes
  pairing with each other at the same cost; for k matched pairs that is Σ distances + oc·(n1 + n2 − k). CSA keeps
  only a few random outlier edges per node (for speed); here the outlier part is exact and sparse (own outlier per
  pixel, outlier pairs along the real edges), solved with scipy's `min_weight_full_bipartite_matching` (LAPJVsp). It
  minimises the same objective, so the count agrees with correspondPixels' except where CSA's random outlier
  sparsity or its integer costs (rint(100·d)) change the optimum. (scipy's `maximum_bipartite_matching` gives the
  same count in practice but took minutes on some real-sized maps.) `match_count_distance` is the cheaper
  approximation (a pixel counts if ANY pixel of the other map lies within r), which over-counts when several
  predicted pixels crowd around one GT pixel.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

# (dy, dx) of Lam et al.'s x1..x8, counter-clockwise from east (north = the row above); x_k is bit k − 1 of the
# neighbourhood code.
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _thin_tables() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of the two subiterations, indexed by the neighbourhood code."""
    first, second = np.zeros(256, dtype=bool), np.zeros(256, dtype=bool)
    for code in range(256):
        x = [None] + [(code >> k) & 1 for k in range(8)] + [code & 1]  # x[1..8], x[9] = x[1]
        crossings = sum(1 for i in range(1, 5) if not x[2 * i - 1] and (x[2 * i] or x[2 * i + 1]))
        n1 = sum(x[2 * k - 1] | x[2 * k] for k in range(1, 5))
        n2 = sum(x[2 * k] | x[2 * k + 1] for k in range(1, 5))
        if crossings != 1 or not 2 <= min(n1, n2) <= 3:
            continue
        first[code] = ((x[2] | x[3] | (1 - x[8])) & x[1]) == 0
        second[code] = ((x[6] | x[7] | (1 - x[4])) & x[5]) == 0
    return first, second


_THIN_TABLES = _thin_tables()


def thin(mask_HW: np.ndarray) -> np.ndarray:
    """MATLAB `bwmorph(mask, 'thin', Inf)`: thin a binary map to 1-pixel-wide lines (outside the image is 0).

    Neighbourhood codes are gathered at foreground pixels only (cost ∝ foreground pixels, not image area): a
    thresholded edge map is sparse, and this runs once per threshold per image.

    Args:
        mask_HW: [H, W] boolean (or 0/1) map.

    Returns:
        [H, W] bool thinned map.
    """
    skel = np.pad(np.asarray(mask_HW, dtype=bool), 1)
    ys, xs = np.nonzero(skel)
    while True:
        removed = False
        for table in _THIN_TABLES:  # each subiteration decides all deletions on the same state
            code = np.zeros(ys.size, dtype=np.uint8)
            for bit, (dy, dx) in enumerate(_NEIGHBOURS):
                code |= skel[ys + dy, xs + dx].astype(np.uint8) << bit
            delete = table[code]
            if delete.any():
                skel[ys[delete], xs[delete]] = False
                ys, xs = ys[~delete], xs[~delete]
                removed = True
        if not removed:
            return skel[1:-1, 1:-1]


def seg2bmap(labels_HW: np.ndarray) -> np.ndarray:
    """SEISM `seg2bmap`: True where a pixel's label differs from its east, south or south-east neighbour.

    The last row compares with the east neighbour only, the last column with the south one only, and the bottom-right
    pixel is never a boundary (as in the MATLAB code, whose out-of-image neighbours are 0).

    Args:
        labels_HW: [H, W] label image (any dtype; distinct values are distinct regions).

    Returns:
        [H, W] bool boundary map.
    """
    seg = np.asarray(labels_HW)
    east, south, south_east = (np.zeros_like(seg) for _ in range(3))
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    bmap = (seg != east) | (seg != south) | (seg != south_east)
    bmap[-1, :] = seg[-1, :] != east[-1, :]
    bmap[:, -1] = seg[:, -1] != south[:, -1]
    bmap[-1, -1] = False
    return bmap


def _smooth_triangle(image_HW: np.ndarray, radius: int) -> np.ndarray:
    """Piotr's `convTri(I, r)` for integer r > 1: separable [1..r, r+1, r..1]/(r+1)² with symmetric padding."""
    kernel = np.concatenate([np.arange(1, radius + 2), np.arange(radius, 0, -1)]).astype(np.float32) / (radius + 1) ** 2
    out = ndimage.correlate1d(image_HW, kernel, axis=0, mode="reflect")  # scipy "reflect" = MATLAB "symmetric"
    return ndimage.correlate1d(out, kernel, axis=1, mode="reflect")


def _bilinear(image_HW: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """edgesNmsMex `interp`: bilinear sample at (x = column, y = row), coordinates clamped to [0, size − 1.001]."""
    h, w = image_HW.shape
    x = np.clip(x, 0, w - 1.001).astype(np.float32)
    y = np.clip(y, 0, h - 1.001).astype(np.float32)
    x0, y0 = x.astype(np.int64), y.astype(np.int64)
    dx, dy = x - x0, y - y0
    return (image_HW[y0, x0] * (1 - dx) * (1 - dy) + image_HW[y0, x0 + 1] * dx * (1 - dy)
            + image_HW[y0 + 1, x0] * (1 - dx) * dy + image_HW[y0 + 1, x0 + 1] * dx * dy)


def edge_nms(edges_HW: np.ndarray, *, radius: int = 1, border: int = 5, multiplier: float = 1.01) -> np.ndarray:
    """SEISM `read_one_cont_png` before its threshold: orientation from convTri(E, 4), then `edgesNmsMex(E, O, 1, 5,
    1.01)`: a pixel is zeroed if ANY sample at distance 1..radius along its normal exceeds multiplier·value, and values
    within `border` pixels of the image edge are scaled by distance / border (0 on the outermost row and column).

    Args:
        edges_HW: [H, W] float edge strengths in [0, 1] (what SEISM reads: png / 255).

    Returns:
        [H, W] float32 suppressed map.
    """
    e0 = np.asarray(edges_HW, dtype=np.float32)
    smooth = _smooth_triangle(e0, 4)
    oy, ox = np.gradient(smooth)  # piotr gradient2: central differences inside, one-sided at the border
    oxx = np.gradient(ox, axis=1)
    oyy, oxy = np.gradient(oy)
    orient = np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + 1e-5)), np.pi).astype(np.float32)
    rows, cols = np.nonzero(e0)
    cos_o, sin_o = np.cos(orient[rows, cols]), np.sin(orient[rows, cols])
    keep = np.ones(rows.shape, dtype=bool)
    for d in (d for d in range(-radius, radius + 1) if d):
        keep &= ~(e0[rows, cols] * np.float32(multiplier) < _bilinear(e0, cols + d * cos_o, rows + d * sin_o))
    out = np.zeros_like(e0)
    out[rows[keep], cols[keep]] = e0[rows[keep], cols[keep]]
    h, w = out.shape
    border = min(border, w // 2, h // 2)
    for i in range(border):  # same order and overlap as the mex loops
        out[:, i] *= i / border
        out[:, w - 1 - i] *= i / border
    for i in range(border):
        out[i, :] *= i / border
        out[h - 1 - i, :] *= i / border
    return out


def _disk_offsets(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    inside = dy**2 + dx**2 <= radius**2
    return np.stack([dy[inside], dx[inside]], axis=1)


def _pairs_within(pred_HW: np.ndarray, gt_HW: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (predicted pixel, GT pixel, distance) pairs with distance <= radius; pixels numbered in raster order."""
    pred_y, pred_x = np.nonzero(pred_HW)
    gt_index = np.full(gt_HW.shape, -1, dtype=np.int64)
    gt_index[gt_HW] = np.arange(int(gt_HW.sum()))
    h, w = gt_HW.shape
    rows, cols, dists = [], [], []
    for dy, dx in _disk_offsets(radius):
        y, x = pred_y + dy, pred_x + dx
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        target = np.full(pred_y.shape, -1, dtype=np.int64)
        target[inside] = gt_index[y[inside], x[inside]]
        hit = target >= 0
        rows.append(np.nonzero(hit)[0])
        cols.append(target[hit])
        dists.append(np.full(int(hit.sum()), np.hypot(dy, dx)))
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(dists)


def match_count(pred_HW: np.ndarray, gt_HW: np.ndarray, radius: float) -> int:
    """Pixels matched one-to-one between two boundary maps at distance <= radius (correspondPixels' count).

    Args:
        pred_HW, gt_HW: [H, W] boolean boundary maps.
        radius: tolerance in pixels (SEISM: maxDist · image diagonal).

    Returns:
        Number of matched pairs (= matched predicted pixels = matched GT pixels).
    """
    if not pred_HW.any() or not gt_HW.any():
        return 0
    pair_p, pair_g, dist = _pairs_within(pred_HW, gt_HW, radius)
    if pair_p.size == 0:
        return 0
    # Only matchable pixels enter the solver (as in correspondPixels): the others are unmatched whatever happens.
    pred_ids, pair_p = np.unique(pair_p, return_inverse=True)
    gt_ids, pair_g = np.unique(pair_g, return_inverse=True)
    n1, n2 = pred_ids.size, gt_ids.size
    outlier_cost = 100.0 * radius
    # rows: predicted pixels, then one outlier per GT pixel; columns: GT pixels, then one outlier per predicted pixel.
    # Real edges get +1e-3 so that coincident pixels (distance 0) stay explicit entries of the sparse matrix.
    rows = np.concatenate([pair_p, np.arange(n1), n1 + np.arange(n2), n1 + pair_g])
    cols = np.concatenate([pair_g, n2 + np.arange(n1), np.arange(n2), n2 + pair_p])
    weights = np.concatenate([dist + 1e-3, np.full(n1 + n2 + pair_p.size, outlier_cost)])
    graph = csr_matrix((weights, (rows, cols)), shape=(n1 + n2, n2 + n1))
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    return int(((row_ind < n1) & (col_ind < n2)).sum())


def _has_neighbour(target_HW: np.ndarray, ys: np.ndarray, xs: np.ndarray, radius: float) -> np.ndarray:
    """[N] bool: whether target_HW has a True pixel within radius of each point (ys, xs)."""
    h, w = target_HW.shape
    found = np.zeros(ys.shape, dtype=bool)
    for dy, dx in _disk_offsets(radius):
        y, x = ys + dy, xs + dx
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        found[inside] |= target_HW[y[inside], x[inside]]
    return found


def match_count_distance(pred_HW: np.ndarray, gt_HW: np.ndarray, radius: float) -> tuple[int, int]:
    """Approximation of `match_count` by proximity (not one-to-one).

    Returns:
        (predicted pixels within radius of some GT pixel, GT pixels within radius of some predicted pixel).
    """
    pred_y, pred_x = np.nonzero(pred_HW)
    gt_y, gt_x = np.nonzero(gt_HW)
    if pred_y.size == 0 or gt_y.size == 0:
        return 0, 0
    return (int(_has_neighbour(gt_HW, pred_y, pred_x, radius).sum()),
            int(_has_neighbour(pred_HW, gt_y, gt_x, radius).sum()))
