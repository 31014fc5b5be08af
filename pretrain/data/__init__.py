"""Data: safe decoding, joint transforms, per-task WebDataset pipelines and the task mixture (design: DATA.md)."""

from pretrain.data.decode import coco_label_maps
from pretrain.data.mixture import MixedStream, PartitionStream, TaskSampler, task_probabilities
from pretrain.data.partitions import make_partition_loader
from pretrain.data.sources import SOURCES, make_eval_loader, make_train_loader, read_shard_info, task_info

__all__ = [
    "SOURCES",
    "MixedStream",
    "PartitionStream",
    "TaskSampler",
    "coco_label_maps",
    "make_eval_loader",
    "make_partition_loader",
    "make_train_loader",
    "read_shard_info",
    "task_info",
    "task_probabilities",
]
