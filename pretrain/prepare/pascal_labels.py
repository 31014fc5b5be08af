"""PASCAL-Context label derivations, transcribed from the reference loader (MLoRE / TaskPrompter
``data/pascal_context.py``, from ASTMT): human parts from PASCAL-Part ``.mat``, edges and the normals-valid mask from
the PASCAL-Context ``LabelMap``.

- Parts: objects of class 15 (person) with a non-empty ``parts`` field paint their part masks in file order (later
  parts overwrite earlier ones) with the 6-part map below, on a 0 background. An image with no person object of
  positive area, or whose map holds only 0 (the reference's AddIgnoreRegions), is all 255 (ignore).
- Edge: ``thin(|Laplacian(LabelMap)| > 0)``; the reference uses ``cv2.Laplacian(..., CV_64F)`` (ksize 1: kernel
  [[0,1,0],[1,-4,1],[0,1,0]], border BORDER_REFLECT_101 = scipy's ``mirror``) and ``skimage.morphology.thin``
  (Guo-Hall two-subiteration thinning, run to convergence). Note: a pixel whose neighbours' label differences
  cancel (e.g. labels 1 | 2 | 3 in a row) has Laplacian 0 and is no edge; this is the reference's behaviour.
- Normals valid: LabelMap classes that are NYU-compatible (+ tvmonitor); the reference zeroes normals elsewhere.
- Edge regions (evaluation only): the LabelMap relabelled 0..K−1. SEISM scores PASCAL-Context boundaries against
  `seg2bmap(relabel(LabelMap))` (`gt_wrappers/db_gt.m`), not against the training edge above; the boundary itself is
  taken at evaluation (`metrics/edges.py`, which owns `seg2bmap`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import thin

PERSON_CLASS = 15
# PASCAL-Part part name -> class (reference HUMAN_PART[6]): 1 head, 2 torso, 3 upper arm, 4 lower arm (+ hand),
# 5 upper leg, 6 lower leg (+ foot)
PART_CLASSES = {
    "hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "mouth": 1, "nose": 1, "rear": 1, "rebrow": 1,
    "reye": 1, "neck": 2, "torso": 2, "luarm": 3, "ruarm": 3, "lhand": 4, "llarm": 4, "rhand": 4, "rlarm": 4,
    "luleg": 5, "ruleg": 5, "lfoot": 6, "llleg": 6, "rfoot": 6, "rlleg": 6,
}
NUM_PART_CLASSES = 7
# PASCAL-Context ids (context_classes.json) of the NYU classes (nyu_classes.json) present in PASCAL-Context, except
# 'unknown', plus tvmonitor (427): the reference's normals_valid_classes, 170 ids.
NORMALS_VALID_CLASSES = frozenset((
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53, 55, 56,
    59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113, 115, 122,
    124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199,
    202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260,
    261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309, 310,
    314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380,
    383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440, 441,
    442, 443, 444, 446, 454, 457,
))
_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)


class LabelFileError(ValueError):
    """A ``.mat`` whose content does not have the expected structure (``reason`` ``bad_label_format``) or size
    (``size_mismatch``); the message names what is wrong."""

    def __init__(self, message: str, reason: str = "bad_label_format") -> None:
        super().__init__(message)
        self.reason = reason


def parts_map(mat: dict, shape_HW: tuple[int, int]) -> np.ndarray:
    """Human-parts map of one image from ``scipy.io.loadmat(human_parts/<id>.mat)``.

    Args:
        mat: the loaded dict (default ``loadmat`` options: struct arrays as records).
        shape_HW: image size; every part mask must have it.
    Returns:
        uint8 [H, W]: 0 background, 1..6 parts; all 255 for an image without person parts.
    """
    try:
        objects = mat["anno"][0][0][1][0]
        people = [obj for obj in objects if obj[1][0][0] == PERSON_CLASS]
        has_person = any(np.sum(obj[2]) > 0 for obj in people)  # the reference's parts cache: area > 0
        target = np.zeros(shape_HW, np.uint8)
        for obj in people:
            if len(obj[3]) == 0:
                continue
            for part in obj[3][0]:
                name = str(part[0][0])
                if name not in PART_CLASSES:
                    raise LabelFileError(f"unknown person part name {name!r}")
                mask = np.asarray(part[1]).astype(bool)
                if mask.shape != tuple(shape_HW):
                    raise LabelFileError(f"part {name!r} mask is {mask.shape}, image is {tuple(shape_HW)}",
                                         "size_mismatch")
                target[mask] = PART_CLASSES[name]
    except (KeyError, IndexError, TypeError) as err:
        raise LabelFileError(f"not a PASCAL-Part anno struct ({type(err).__name__}: {err})") from None
    if not has_person or not target.any():
        return np.full(shape_HW, 255, np.uint8)
    return target


def label_map(mat: dict) -> np.ndarray:
    """The integer [H, W] ``LabelMap`` of ``loadmat(pascal-context/trainval/<id>.mat)``."""
    labels = mat.get("LabelMap")
    if not isinstance(labels, np.ndarray) or labels.ndim != 2 or labels.dtype.kind not in "uif":
        raise LabelFileError("no 2-D numeric 'LabelMap' in the .mat")
    return labels


def edge_map(labels_HW: np.ndarray) -> np.ndarray:
    """Boolean [H, W] edge GT: ``thin(|Laplacian(labels)| > 0)`` exactly as the reference (see module doc)."""
    lap = ndimage.convolve(labels_HW.astype(np.float64), _LAPLACIAN, mode="mirror")
    return thin(np.abs(lap) > 0)


def edge_regions(labels_HW: np.ndarray) -> np.ndarray:
    """uint8 [H, W]: the LabelMap's classes renumbered 0..K−1 in increasing order (SEISM's `relabel`).

    Renumbering keeps every boundary (seg2bmap compares neighbours for inequality) and fits 8 bits with 255 left for
    padding; an image with more than 255 classes (PASCAL-Context has 459 in all) raises LabelFileError.
    """
    classes, regions = np.unique(labels_HW, return_inverse=True)
    if classes.size > 255:
        raise LabelFileError(f"LabelMap has {classes.size} classes, an 8-bit region map holds 255")
    return regions.reshape(labels_HW.shape).astype(np.uint8)


def normals_valid(labels_HW: np.ndarray) -> np.ndarray:
    """uint8 [H, W]: 1 where the LabelMap class is in ``NORMALS_VALID_CLASSES``, else 0."""
    return np.isin(labels_HW, sorted(NORMALS_VALID_CLASSES)).astype(np.uint8)
