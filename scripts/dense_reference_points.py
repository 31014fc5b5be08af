"""Reference points for a dense dataset's depth and normals metrics: what a prediction that learned nothing, and one
that knew each pixel's semantic class, score on the val split (issue 24: "depth δ1 and normals within sensible ranges
for the corpus").

    python scripts/dense_reference_points.py CONFIG [key=value ...]     e.g. configs/debug/finetune.yaml data.root=...

Both predictors take their numbers from the train split (unscaled images, every valid pixel):
- constant: depth = the train mean, normals = the train mean direction (normalised);
- class oracle: depth and normal direction = the train mean of the pixel's GT semseg class (the train mean where the
  class never occurs in train or the pixel is unlabelled). On the embedded corpus a class is a region kind (wall,
  floor, a shape), so this is what a model that segments perfectly but reads no depth cue scores.
The val side goes through the fine-tuning evaluation's loader, crop and meters (`pretrain.finetune.evaluate`).
Prints one JSON object {predictor: {metric: value}}.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import Tensor

from pretrain import dist
from pretrain.config.finetuning import FinetuneConfig, dense_size
from pretrain.config.load import load_config
from pretrain.data.dense import make_dense_eval_loader
from pretrain.finetune.build import check_dense_shards, make_eval_loader
from pretrain.finetune.evaluate import DENSE_METERS, as_map, crop

TASKS = ["semseg", "depth", "normals"]


def train_statistics(cfg: FinetuneConfig, data, num_classes: int) -> dict[str, Tensor]:
    """Sums per semseg class (index num_classes: unlabelled) of depth, normals and their pixel counts on the train
    split at its own size (no augmentation)."""
    d = cfg.data
    depth_meter = DENSE_METERS["depth"].make(cfg, data.num_classes)  # the pixels the meters count, by their rules
    normals_meter = DENSE_METERS["normals"].make(cfg, data.num_classes)
    loader = make_dense_eval_loader(data.dataset, data.train_dir, tasks=TASKS, batch_size=d.eval_batch_size,
                                    eval_size=dense_size(d, "val"), protocol=d.protocol, rank=0, world_size=1,
                                    num_workers=0)
    k = num_classes + 1
    depth_sum, depth_n = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    normal_sum, normal_n = torch.zeros(k, 3, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for batch in loader:
        for b, box in enumerate(batch["crop_box"].tolist()):
            t = {name: crop(as_map(v[b:b + 1]), box)[0] for name, v in batch["targets"].items()}
            cls_HW = t["semseg"][0].long().clamp(max=num_classes)  # 255 → the unlabelled row
            depth_HW, normals_3HW = t["depth"][0].double(), t["normals"].double()
            ok = (depth_HW > depth_meter.min_depth) & (depth_HW < depth_meter.max_depth)
            depth_sum.index_add_(0, cls_HW[ok], depth_HW[ok])
            depth_n.index_add_(0, cls_HW[ok], torch.ones_like(depth_HW[ok]))
            ok = (normals_3HW != normals_meter.ignore_value).all(0)
            normal_sum.index_add_(0, cls_HW[ok], normals_3HW[:, ok].T)
            normal_n.index_add_(0, cls_HW[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
    return {"depth_sum": depth_sum, "depth_n": depth_n, "normal_sum": normal_sum, "normal_n": normal_n}


def predictors(stats: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """{name: (depth per class [K], unit normal per class [K, 3])}: K = classes + the unlabelled row."""
    mean_depth = stats["depth_sum"].sum() / stats["depth_n"].sum()
    mean_normal = stats["normal_sum"].sum(0) / stats["normal_sum"].sum(0).norm()
    k = len(stats["depth_n"])
    seen_d, seen_n = stats["depth_n"] > 0, stats["normal_n"] > 0
    class_depth = torch.where(seen_d, stats["depth_sum"] / stats["depth_n"].clamp(min=1), mean_depth)
    class_normal = torch.where(seen_n[:, None], stats["normal_sum"], mean_normal.expand(k, 3))
    class_normal = class_normal / class_normal.norm(dim=1, keepdim=True)
    return {"constant": (mean_depth.expand(k).clone(), mean_normal.expand(k, 3).clone()),
            "class_oracle": (class_depth, class_normal)}


def score(cfg: FinetuneConfig, data, num_classes: int, depth_K: Tensor, normal_K3: Tensor) -> dict[str, float]:
    """The val split's depth and normals metrics of the per-class predictions, through the evaluation's meters."""
    meters = {t: DENSE_METERS[t].make(cfg, data.num_classes) for t in ("depth", "normals")}
    for batch in make_eval_loader(cfg, data, dist.resolve()):
        for b, box in enumerate(batch["crop_box"].tolist()):
            t = {name: crop(as_map(v[b:b + 1]), box) for name, v in batch["targets"].items()}
            cls_HW = t["semseg"][0, 0].long().clamp(max=num_classes)
            meters["depth"].update(depth_K[cls_HW][None, None].float(), t["depth"])
            meters["normals"].update(normal_K3[cls_HW].permute(2, 0, 1)[None].float(), t["normals"])
    return {f"{task}/{k}": round(float(v), 4) for task, m in meters.items() for k, v in m.compute().items()}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        cfg = load_config(argv[0], argv[1:], schema=FinetuneConfig)
        data = check_dense_shards(cfg)
    except (OSError, ValueError) as exc:  # a bad config, key or shard folder (ConfigError is a ValueError)
        print(f"dense_reference_points: error: {exc}", file=sys.stderr)
        return 2
    if "semseg" not in data.num_classes:
        print(f"dense_reference_points: error: {data.train_dir}: no semseg class count in its _info.json",
              file=sys.stderr)
        return 2
    num_classes = data.num_classes["semseg"]
    stats = train_statistics(cfg, data, num_classes)
    out = {name: score(cfg, data, num_classes, *pred) for name, pred in predictors(stats).items()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
