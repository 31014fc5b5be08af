"""Raw NYUD-v2 (``NYUDv2/``) and PASCAL-Context (``PASCALContext/``) release trees of the embedded corpus.

Folder names, file formats and ``.mat`` structures are those of the releases (docs evaluation.md §2), drawn from
`dense.py` scenes: NYUD raw semseg 1..40 (0 unlabelled), depth ``.npy`` float32 metres, normals/edge PNGs;
PASCAL VOC semseg 0..20 + 255, PASCAL-Part ``human_parts/*.mat``, PASCAL-Context ``LabelMap`` ``.mat``, distilled
normals and saliency PNGs. Quirks (train split): see ``write_nyud`` / ``write_pascal_context``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from pretrain.synth.dense import Scene, boundaries, draw_scene, normals_png
from pretrain.synth.draw import SHAPES, encode, rng_for, write_file

NYUD_WALL, NYUD_FLOOR = 1, 2
NYUD_SHAPE_CLASSES = (3, 5, 7, 10, 14, 19, 25, 33)  # shape i -> NYUD raw class (1..40)
NYUD_OVERSIZED = (480, 640)  # the third-party NYUD copy's test size: does not fit the 448x576 pad target
VOC_PERSON = 15
PERSON_SHAPE = SHAPES.index("square")
VOC_SHAPE_CLASSES = (12, VOC_PERSON, 5, 3, 9, 20, 7, 18)  # shape i -> VOC class (dog, person, bottle, ...)
CONTEXT_OF_VOC = {12: 113, 15: 284, 5: 34, 3: 25, 9: 72, 20: 427, 7: 59, 18: 368}  # VOC -> PASCAL-Context id
CONTEXT_WALL, CONTEXT_SKY, CONTEXT_FLOOR = 440, 360, 158  # wall/floor are normals-valid classes, sky is not
# (part name, top, bottom, left, right) as fractions of the person's box; later rows overwrite earlier ones
# ("neck" overwrites the bottom of "head", "lfoot"/"rfoot" the bottom of the lower legs).
PERSON_PARTS = (("head", 0.0, 0.22, 0.2, 0.8), ("hair", 0.0, 0.06, 0.2, 0.8), ("neck", 0.17, 0.25, 0.3, 0.7),
                ("torso", 0.22, 0.58, 0.25, 0.75), ("luarm", 0.22, 0.4, 0.0, 0.25), ("llarm", 0.4, 0.58, 0.0, 0.25),
                ("ruarm", 0.22, 0.4, 0.75, 1.0), ("rlarm", 0.4, 0.58, 0.75, 1.0), ("luleg", 0.58, 0.78, 0.0, 0.5),
                ("ruleg", 0.58, 0.78, 0.5, 1.0), ("llleg", 0.78, 1.0, 0.0, 0.5), ("rlleg", 0.78, 1.0, 0.5, 1.0),
                ("lfoot", 0.94, 1.0, 0.0, 0.5), ("rfoot", 0.94, 1.0, 0.5, 1.0))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


MAT_DESCRIPTION = b"MATLAB 5.0 MAT-file, written by pretrain.synth"


def _mat(path: Path, content: dict) -> None:
    """``savemat`` with its 116-byte header text fixed: scipy puts the creation time there, which would make the
    corpus differ between runs."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, content)
    data = bytearray(buf.getvalue())
    data[:116] = MAT_DESCRIPTION.ljust(116, b" ")
    write_file(path, bytes(data))


def write_nyud(root: Path, *, seed: int, train: int, val: int, image_size: tuple[int, int], quirks: bool) -> dict:
    """Write ``{root}/{images,segmentation,depth,normals,edge}/<id>.*`` and ``gt_sets/{train,val}.txt``.

    Quirks (train): image 0 is 480x640 (does not fit the 448x576 pad target: validation reports it, conversion
    drops it unless ``keep_oversized``), image 1 has no ``depth/<id>.npy`` (skipped, ``missing_file``).
    """
    result = {}
    for split, count in (("train", train), ("val", val)):
        quirky = quirks and split == "train"
        ids = [f"{(0 if split == 'train' else 5000) + i + 1:04d}" for i in range(count)]
        for i, name in enumerate(ids):
            rng = rng_for(seed, "nyud", split, i)
            h, w = NYUD_OVERSIZED if quirky and i == 0 else image_size
            scene = draw_scene(rng, h, w, floor=True)
            labels = np.array([NYUD_WALL, NYUD_FLOOR] + [NYUD_SHAPE_CLASSES[s] for s in scene.shapes], np.uint8)
            semseg = labels[scene.part_HW]
            semseg[:2] = 0  # a strip of unlabelled pixels, as in the release
            depth = scene.depth_HW.copy()
            y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
            depth[y:y + 6, x:x + 8] = 0.0  # a hole of invalid depth
            write_file(root / "images" / f"{name}.png", encode(scene.canvas_HW3, "PNG"))
            write_file(root / "segmentation" / f"{name}.png", _png(semseg))
            write_file(root / "normals" / f"{name}.png", _png(normals_png(scene.normals_HW3)))
            write_file(root / "edge" / f"{name}.png", _png(boundaries(scene.part_HW).astype(np.uint8) * 255))
            if not (quirky and i == 1):
                buf = io.BytesIO()
                np.save(buf, depth, allow_pickle=False)
                write_file(root / "depth" / f"{name}.npy", buf.getvalue())
        write_file(root / "gt_sets" / f"{split}.txt", ("\n".join(ids) + "\n").encode())
        bad = 2 if quirky and count >= 2 else 0
        result[split] = {"files": count, "expected_samples": count - bad, "expected_skipped": bad,
                         "oversized": [ids[0]] if quirky and count else []}
    return result


def _person_parts(mask_HW: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """PASCAL-Part style part masks of a person shape: bands of its bounding box (``PERSON_PARTS``) within it."""
    ys, xs = np.nonzero(mask_HW)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    parts = []
    for part, top, bottom, left, right in PERSON_PARTS:
        box = np.zeros_like(mask_HW)
        box[y0 + int(top * (y1 - y0)):y0 + int(np.ceil(bottom * (y1 - y0))),
            x0 + int(left * (x1 - x0)):x0 + int(np.ceil(right * (x1 - x0)))] = True
        if (box & mask_HW).any():
            parts.append((part, box & mask_HW))
    return parts


def parts_mat(imname: str, objects: list[tuple[str, int, np.ndarray, list[tuple[str, np.ndarray]]]]) -> dict:
    """``{"anno": ...}`` in PASCAL-Part's structure: ``anno{imname, objects(1xN){class, class_ind, mask,
    parts(1xM){part_name, mask}}}``; an object without parts gets an empty 0x0 ``parts``."""
    part_dtype = [("part_name", object), ("mask", object)]
    obj_dtype = [("class", object), ("class_ind", object), ("mask", object), ("parts", object)]
    objs = np.zeros((1, len(objects)), obj_dtype)
    for k, (cls, cls_ind, mask, parts) in enumerate(objects):
        part_array = np.zeros((1, len(parts)), part_dtype) if parts else np.zeros((0, 0))
        for j, (pname, pmask) in enumerate(parts):
            part_array[0, j] = (pname, pmask.astype(np.uint8))
        objs[0, k] = (cls, np.array([[float(cls_ind)]]), mask.astype(np.uint8), part_array)
    anno = np.zeros((1, 1), [("imname", object), ("objects", object)])
    anno[0, 0] = (imname, objs)
    return {"anno": anno}


def _pascal_labels(scene: Scene, voc: list[int], sky: bool) -> tuple[np.ndarray, np.ndarray]:
    """(VOC semseg uint8 with 255 on object boundaries, Context LabelMap uint16) of a scene."""
    semseg = np.array([0, 0] + voc, np.uint8)[scene.part_HW]
    semseg[boundaries(scene.part_HW) & (scene.part_HW >= 2)] = 255
    context = np.array([CONTEXT_SKY if sky else CONTEXT_WALL, CONTEXT_FLOOR] + [CONTEXT_OF_VOC[v] for v in voc],
                       np.uint16)
    return semseg, context[scene.part_HW]


def _pascal_objects(scene: Scene, voc: list[int], person_without_parts: bool) -> list:
    objects = []
    for cls, mask in zip(voc, scene.masks):
        if cls == VOC_PERSON:
            parts = [] if person_without_parts else _person_parts(mask)
        else:  # a dog's head: only person objects may contribute parts
            parts = [("head", mask)] if cls == 12 else []
        objects.append(("person" if cls == VOC_PERSON else "object", cls, mask, parts))
    return objects


def write_pascal_context(root: Path, *, seed: int, train: int, val: int, image_size: tuple[int, int],
                         quirks: bool) -> dict:
    """Write the PASCAL-Context multi-task tree (JPEGImages, ImageSets/Context, semseg, human_parts,
    pascal-context/trainval, normals_distill, sal_distill).

    Images i % 3 == 2 have no person (parts all-ignore); image i % 4 == 3 has its semseg only in
    ``semseg/pascal-context/`` (the loader's fallback); image i % 5 == 4 has a person without parts. Quirk
    (train): image 1 has no ``human_parts/<id>.mat`` (skipped, ``missing_file``).
    """
    result = {}
    for split, count in (("train", train), ("val", val)):
        quirky = quirks and split == "train"
        ids = [f"{2008 + (split == 'val')}_{i + 1:06d}" for i in range(count)]
        for i, name in enumerate(ids):
            rng = rng_for(seed, "pascal_context", split, i)
            shapes = [int(rng.integers(len(SHAPES))) for _ in range(rng.integers(1, 3))]
            shapes = [s for s in shapes if s != PERSON_SHAPE] + ([PERSON_SHAPE] if i % 3 != 2 else [])
            scene = draw_scene(rng, *image_size, floor=bool(i % 2), shapes=shapes or [0])
            voc = [VOC_SHAPE_CLASSES[s] for s in scene.shapes]
            semseg, label_map = _pascal_labels(scene, voc, sky=i % 2 == 0)
            semseg_dir = "pascal-context" if i % 4 == 3 else "VOC12"
            write_file(root / "JPEGImages" / f"{name}.jpg", encode(scene.canvas_HW3))
            write_file(root / "semseg" / semseg_dir / f"{name}.png", _png(semseg))
            write_file(root / "normals_distill" / f"{name}.png", _png(normals_png(scene.normals_HW3)))
            sal = np.isin(scene.part_HW, np.arange(2, 2 + len(voc))).astype(np.uint8) * 255
            write_file(root / "sal_distill" / f"{name}.png", _png(sal))
            _mat(root / "pascal-context" / "trainval" / f"{name}.mat", {"LabelMap": label_map})
            if not (quirky and i == 1):
                _mat(root / "human_parts" / f"{name}.mat",
                     parts_mat(name, _pascal_objects(scene, voc, person_without_parts=i % 5 == 4)))
        write_file(root / "ImageSets" / "Context" / f"{split}.txt", ("\n".join(ids) + "\n").encode())
        bad = int(quirky and count >= 2)
        result[split] = {"files": count, "expected_samples": count - bad, "expected_skipped": bad}
    return result
