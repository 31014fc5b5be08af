"""pretrain: heterogeneous multi-task pretraining of task-routed mixture-of-experts vision transformers."""

__version__ = "0.1.0"
