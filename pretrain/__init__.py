"""pretrain: heterogeneous multi-task pretraining of task-routed mixture-of-experts vision transformers.

`pretrain.load_model(path)`, `pretrain.load_submodel(path)` and `pretrain.load_backbone(path)` read the portable
files of `pretrain export` / `pretrain extract`; they are imported on first use, so `import pretrain` stays free of
torch and of side effects.
"""

__version__ = "0.1.0"

_LAZY = {"load_model": "pretrain.runs.portable", "load_backbone": "pretrain.runs.portable",
         "load_submodel": "pretrain.runs.portable"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pretrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
