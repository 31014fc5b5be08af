"""The datasets and the dense tasks: one record each, the facts every stage's tables derive from.

A fact about a dataset or a task is written here once; choice lists, seed ids, release folders, default sizes, class
counts and names, ignore values, edge tolerances and the Δm metric are read from these records, never written again
in a stage (two tables once gave `nyud` the id 3 and 4, and fine-tuning fell back to NYUD's size for PASCAL). What
is code stays in its package, in a table keyed by the same names: converters (`prepare.PREPARERS`), synthetic layouts
(`synth.LAYOUTS`), decoders (`data.dense_decode.DENSE_TASKS`), losses (`finetune.losses.LOSSES`), meters
(`finetune.evaluate.DENSE_METERS`); `tests/test_catalog.py` fails when a table lacks a record's entry or has one
no record names.

Torch-free and importing nothing from the package, so configs, converters and the demo read it without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = 255  # the "no label" value of every class map (and edge map padding)
PROTOCOLS = ("new", "old")  # InvPT/MLoRE (pad at eval) and ASTMT/M3ViT (fixed resize); evaluation.md §2
SPLITS = ("train", "val")

# Class names in label-id order (after any reduce-zero-label): what a model file carries and a report prints.
# ADE20K: the SceneParsing benchmark's ids 1..150 as the devkit's objectInfo150 lists them (mmsegmentation's spelling)
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag")
# NYUv2 40 classes (Gupta et al.): raw value v is class v - 1
NYUD_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
    "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes", "ceiling",
    "books", "refridgerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person",
    "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)
# PASCAL VOC's 21 (PASCAL-Context's semseg task in the multi-task benchmarks)
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor")


@dataclass(frozen=True)
class ScaleRotate:
    """ASTMT's ScaleNRotate ranges (old protocol training): (min, max) drawn uniformly, or value lists to choose from
    when `discrete` (degrees, counter-clockwise as cv2.getRotationMatrix2D; scale factors)."""

    rotations: tuple[float, ...]
    scales: tuple[float, ...]
    discrete: bool


@dataclass(frozen=True)
class Dataset:
    """One dataset: its identity, release layout and, for a dense one, its label conventions and sizes (h, w).

    Attributes:
        id: the integer a stream seeds with (`data.sources.TASK_IDS`, never a string hash); the synthetic corpus
            seeds its drawings with `id + 1` (`synth.draw.rng_for`: codes started at 1, kept so its bytes stay).
        folder: the release's folder under a raw root (what `pretrain synth` writes, `pretrain prepare --src` reads).
        tasks: the tasks its labels train; a pretraining dataset serves one (`cls`, `det`, `seg`), named `stream`.
        dense: one image with many label maps (fine-tuning) rather than one pretraining task.
        num_classes: per task with classes; semseg's is the count AFTER any reduce-zero-label.
        class_names: per task, where the names are known here, in id order (their count is `num_classes`).
        semseg_zero_is_ignore: raw semseg 0 means unlabelled (NYUD): reduce-zero-label, raw range 0..C.
        train_size / eval_size: the new protocol's crop and pad targets; old_size: the old protocol's FixedResize.
        old_scale_rotate: the old protocol's ScaleNRotate ranges (ASTMT get_transformations).
        normals_valid_member: a 0/1 mask member; normals are zeroed (→ ignored) where it is 0.
        eval_labels: task → the evaluation label (a `data.dense_decode.DENSE_TASKS` row) its metric takes as GT.
        edge_max_dist: the edge meter's match tolerance, a fraction of the image diagonal (SEISM's per database).
        edge_gt_boundary: how the edge meter's GT map becomes boundaries (`metrics.edges.GT_BOUNDARIES`).
        label_range: derived: the largest raw label value accepted per class-map task.
    """

    name: str
    id: int
    folder: str
    tasks: tuple[str, ...]
    dense: bool = False
    splits: tuple[str, ...] = SPLITS
    num_classes: dict[str, int] = field(default_factory=dict)
    class_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    semseg_zero_is_ignore: bool = False
    train_size: tuple[int, int] | None = None
    eval_size: tuple[int, int] | None = None
    old_size: tuple[int, int] | None = None
    old_scale_rotate: ScaleRotate | None = None
    normals_valid_member: str | None = None
    eval_labels: dict[str, str] = field(default_factory=dict)
    edge_max_dist: float | None = None
    edge_gt_boundary: str = "seg2bmap"
    label_range: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for task, names in self.class_names.items():
            if self.num_classes.get(task) != len(names):
                raise ValueError(f"{self.name}: {len(names)} {task} class names, num_classes {self.num_classes}")
        top = {t: n - 1 for t, n in self.num_classes.items()}
        if self.semseg_zero_is_ignore:
            top["semseg"] = self.num_classes["semseg"]  # raw 1..C are classes, 0 unlabelled
        object.__setattr__(self, "label_range", top)

    @property
    def stream(self) -> str:
        """The name its stream is keyed and seeded under: a pretraining dataset's task, a dense dataset's own name."""
        return self.name if self.dense else self.tasks[0]

    def size(self, protocol: str, split: str) -> tuple[int, int]:
        """(h, w) of `split`'s crop/pad ("new") or resize ("old") target; ValueError for a pretraining dataset."""
        sizes = {"new": {"train": self.train_size, "val": self.eval_size},
                 "old": {"train": self.old_size, "val": self.old_size}}
        if protocol not in sizes or split not in SPLITS:
            raise ValueError(f"unknown protocol {protocol!r} or split {split!r}; expected {PROTOCOLS} and {SPLITS}")
        hw = sizes[protocol][split]
        if hw is None:
            raise ValueError(f"dataset {self.name!r} has no {protocol}-protocol {split} size")
        return hw


@dataclass(frozen=True)
class DenseTask:
    """One dense task: what its label map and its prediction are, and which metric enters Δm.

    Attributes:
        index_map: class ids (uint8 in the pipeline, int64 [B,H,W] in the batch) vs a float map [B,C,H,W].
        channels: C of the per-sample label map [C,H,W] (1 for an index map).
        fill: value of padding and of a map for a task the sample lacks (ignored by loss and metric).
        out_channels: C of the prediction; 0 = the dataset's class count (`num_classes[task]`).
        primary: protocol → the key of its meter's `compute()` that enters Δm (evaluation.md §6).
        lower_is_better: that metric improves downwards (depth RMSE, normals mean error): its sign flips in Δm.
    """

    name: str
    index_map: bool
    channels: int
    fill: float
    out_channels: int
    primary: dict[str, str]
    lower_is_better: bool = False


def _both(key: str) -> dict[str, str]:
    return dict.fromkeys(PROTOCOLS, key)


DATASETS: dict[str, Dataset] = {
    # pretraining: num_classes = the release's (what a run without shards builds its heads with)
    "imagenet": Dataset(name="imagenet", id=0, folder="imagenet", tasks=("cls",), num_classes={"cls": 1000}),
    "coco": Dataset(name="coco", id=1, folder="coco", tasks=("det",), num_classes={"det": 80}),
    "ade20k": Dataset(name="ade20k", id=2, folder="ade20k", tasks=("seg",), num_classes={"seg": 150},
                      class_names={"seg": ADE20K_CLASSES}),
    "nyud": Dataset(name="nyud", id=3, folder="NYUDv2", tasks=("semseg", "depth", "normals", "edge"), dense=True,
                    num_classes={"semseg": 40}, class_names={"semseg": NYUD_CLASSES}, semseg_zero_is_ignore=True,
                    train_size=(448, 576),
                    eval_size=(448, 576), old_size=(480, 640),
                    old_scale_rotate=ScaleRotate(rotations=(0.0,), scales=(1.0, 1.2, 1.5), discrete=True),
                    edge_max_dist=0.011),
    "pascal_context": Dataset(name="pascal_context", id=4, folder="PASCALContext",
                              tasks=("semseg", "human_parts", "sal", "normals", "edge"), dense=True,
                              num_classes={"semseg": 21, "human_parts": 7, "sal": 2},
                              class_names={"semseg": VOC_CLASSES}, train_size=(512, 512),
                              eval_size=(512, 512), old_size=(512, 512),
                              old_scale_rotate=ScaleRotate(rotations=(-20.0, 20.0), scales=(0.75, 1.25),
                                                           discrete=False),
                              normals_valid_member="normals_valid.png", eval_labels={"edge": "edge_regions"},
                              edge_max_dist=0.0075),
}

# in id order: the dense model's router rows and the objective's task order follow the enabled ones
DENSE_TASKS: dict[str, DenseTask] = {
    # semseg and human_parts: mIoU (human_parts, 7 classes, already is the person-only mIoU: an image without person
    # parts is all 255 in the shards); saliency: maxF in the new protocol, mIoU in the old one (as M3ViT)
    "semseg": DenseTask("semseg", True, 1, IGNORE_INDEX, 0, _both("mIoU")),
    "human_parts": DenseTask("human_parts", True, 1, IGNORE_INDEX, 0, _both("mIoU")),
    "sal": DenseTask("sal", True, 1, IGNORE_INDEX, 2, {"new": "maxF", "old": "mIoU"}),
    "normals": DenseTask("normals", False, 3, 0.0, 3, _both("mean"), lower_is_better=True),
    "edge": DenseTask("edge", False, 1, float(IGNORE_INDEX), 1, _both("odsF")),
    "depth": DenseTask("depth", False, 1, 0.0, 1, _both("rmse"), lower_is_better=True),
}


def dense_datasets() -> list[str]:
    """The dense datasets' names in record order (`data.dataset`'s choices, `pretrain prepare`'s task option)."""
    return [name for name, d in DATASETS.items() if d.dense]


def pretraining_tasks() -> tuple[str, ...]:
    """The pretraining tasks, one per pretraining dataset, in id order."""
    return tuple(d.tasks[0] for d in DATASETS.values() if not d.dense)


def out_channels(task: str, dataset: str) -> int:
    """C of `task`'s prediction on `dataset` (a class map predicts one channel per class)."""
    return DENSE_TASKS[task].out_channels or DATASETS[dataset].num_classes[task]


def primary_metric(task: str, protocol: str) -> tuple[str, bool]:
    """(key in the task's meter output that enters Δm, lower is better) under `protocol`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if task not in DENSE_TASKS:
        raise ValueError(f"no Δm metric for task {task!r}; known: {sorted(DENSE_TASKS)}")
    return DENSE_TASKS[task].primary[protocol], DENSE_TASKS[task].lower_is_better
