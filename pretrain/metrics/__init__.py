"""Evaluation meters: top-k accuracy, COCO box AP, ADE20K mIoU, and the dense multi-task metrics (depth, normals,
saliency, boundaries, Δm) of the NYUD / PASCAL-Context fine-tuning in both protocols ("new" / "old").

Each meter has `update(...)` per batch, `sync(fn)` across ranks and `compute() -> dict[str, float]` (ratios in
percent; depth in metres, normals in degrees).
Cross-rank communication is injected so this package never imports torch.distributed or deepspeed; the caller
(evaluate.py) passes e.g.

    def reduce_sum(t):                      # every meter except CocoDetectionMeter
        t = t.to(device)                    # NCCL needs CUDA tensors
        torch.distributed.all_reduce(t)
        return t

    def gather(obj):                        # CocoDetectionMeter
        out = [None] * world_size
        torch.distributed.all_gather_object(out, obj)
        return out
"""

from pretrain.metrics.classification import ClassificationMeter
from pretrain.metrics.depth import DepthMeter
from pretrain.metrics.detection import CocoDetectionMeter, category_ids_from_gt
from pretrain.metrics.edges import EDGE_DATASETS, EdgeMeter
from pretrain.metrics.multitask import PRIMARY, delta_m, primary_metrics
from pretrain.metrics.normals import NormalsMeter
from pretrain.metrics.predictions import save_predictions
from pretrain.metrics.saliency import SaliencyMeter
from pretrain.metrics.segmentation import SegmentationMeter, reduce_zero_label

__all__ = [
    "ClassificationMeter",
    "CocoDetectionMeter",
    "SegmentationMeter",
    "category_ids_from_gt",
    "reduce_zero_label",
    "DepthMeter",
    "EdgeMeter",
    "EDGE_DATASETS",
    "NormalsMeter",
    "SaliencyMeter",
    "PRIMARY",
    "delta_m",
    "primary_metrics",
    "save_predictions",
]
