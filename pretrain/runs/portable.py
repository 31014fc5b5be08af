"""Portable model files: one safetensors file that rebuilds a model without its run directory, DeepSpeed or pickle.

Two kinds share one format (`FORMAT`, `FORMAT_VERSION`): `model` (`pretrain export`: the whole multi-task model,
every expert under its global id, native stacked layout) and `submodel` (`pretrain extract`: the experts, routers,
task-embedding rows and heads of some tasks; built by `pretrain.models.submodel`). The safetensors metadata
(str → str, JSON strings) holds the `model`, `moe` and `tasks` config sections, task names and rows, class counts
and class lists, the training step and the project version. `load_model` / `load_submodel` / `load_backbone` are
the only readers: fine-tuning starts from `load_backbone(path)`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pretrain.config.pretraining import ModelConfig, MoEConfig, TaskConfig
from pretrain.durable import check_writable, honour_umask
from pretrain.errors import UsageError

logger = logging.getLogger(__name__)

FORMAT = "pretrain.moe-vit"
FORMAT_VERSION = 1
KINDS = ("model", "submodel")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def config_metadata(*, model: ModelConfig, moe: MoEConfig, tasks: dict[str, TaskConfig]) -> dict[str, str]:
    """The config sections a file needs to rebuild its model, as JSON strings; the stored model always uses the
    native (dropless) MoE layer and is never upcycled again."""
    model = dataclasses.replace(model, upcycle_from="")
    moe = dataclasses.replace(moe, backend="native")
    return {"model": json.dumps(dataclasses.asdict(model)), "moe": json.dumps(dataclasses.asdict(moe)),
            "tasks": json.dumps({name: dataclasses.asdict(t) for name, t in tasks.items()})}


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _section(path: Path, meta: dict[str, Any], key: str, schema: type) -> Any:
    values = _json(meta[key])
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: metadata '{key}' has keys this pretrain does not know: {unknown} (written by a "
                         f"newer version, {meta.get('pretrain_version')})")
    return schema(**values)


def config_sections(path: str | Path, meta: dict[str, Any]) -> tuple[ModelConfig, MoEConfig, dict[str, TaskConfig]]:
    """(model, moe, tasks) config sections of a file's metadata (raw JSON strings or decoded)."""
    tasks = {name: _section(Path(path), {"t": v}, "t", TaskConfig) for name, v in _json(meta["tasks"]).items()}
    return _section(Path(path), meta, "model", ModelConfig), _section(Path(path), meta, "moe", MoEConfig), tasks


def check_out(path: str | Path) -> Path:
    """`--out` of a portable file: a `.safetensors` name in a folder this process can write (created if missing).
    Raises ValueError / UsageError (exit 2) naming the path otherwise: commands call it before their work, too."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"--out {path}: the file name must end in .safetensors")
    try:
        check_writable(path.parent)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"--out {path}: {path.parent} is not a folder (a file of that name is in the way)") from None
    except OSError as exc:  # no permission, a read-only filesystem
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def write_file(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any], *, kind: str) -> Path:
    """Write `tensors` (contiguous CPU copies) with `meta` (values JSON-encoded unless already str) and the format
    fields; a partial file never replaces an existing one (tmp + rename)."""
    from pretrain import __version__

    path = check_out(path)
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": kind, "pretrain_version": __version__}
    header.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
    honour_umask(tmp)
    tmp.replace(path)
    return path


def read_meta(path: str | Path, kind: str | None = None) -> dict[str, str]:
    """A portable file's metadata; raises naming the file when it is missing, not ours, or of another kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"{path}: not a safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pretrain model file (metadata format={meta.get('format')!r}, want {FORMAT!r})")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {meta['format_version']} is newer than this pretrain reads "
                         f"({FORMAT_VERSION})")
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{path}: is a {meta.get('kind')!r} file, expected a {kind!r} file")
    return meta


class PortableModel(nn.Module):
    """A loaded model file: `forward(images, task=...)` → that task's prediction (eval mode).

    Attributes: `model` (the `MultiTaskModel`), `meta` (the file's metadata, decoded), `tasks` (task names),
    `classes` (task → class list from the shards' `_info.json`: ImageNet {index, wnid, name}, COCO categories).
    """

    def __init__(self, model: nn.Module, meta: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.meta = meta
        self.tasks = list(meta["task_names"])
        self.classes = meta.get("classes", {})

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def forward(self, images: Tensor, task: str | None = None) -> Any:
        """images uint8 [B,3,H,W] → cls logits [B,C] | det list of {boxes [m,4], scores [m], labels [m]} | seg
        logits [B,C,H,W]. `task` may be left out when the file holds one task."""
        if task is None:
            if len(self.tasks) != 1:
                raise ValueError(f"this model has tasks {self.tasks}: pass task=...")
            task = self.tasks[0]
        return self.model(task, images)


def decode_meta(meta: dict[str, str]) -> dict[str, Any]:
    """JSON-decode every metadata value that holds JSON (format fields and versions stay strings)."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def build_checked(path: Path, build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` once its tensors' shapes, built first on the meta device (no memory), match the file's header: a
    forged or mismatched metadata value (`num_experts=2048`) is one line naming a key before anything is allocated.
    """
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    with safe_open(str(path), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    missing, unexpected = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    differ = [f"{k} {stored[k]} (metadata says {wanted[k]})" for k in wanted if k in stored and stored[k] != wanted[k]]
    if missing or unexpected or differ:
        raise ValueError(f"{path}: tensors do not match the model its metadata describes: "
                         + "; ".join(part for part in (f"shapes {differ[:3]}" if differ else "",
                                                        f"missing {missing[:8]}" if missing else "",
                                                        f"unexpected {unexpected[:8]}" if unexpected else "") if part))
    return build()


def load_state(path: Path, module: nn.Module, dtype: torch.dtype, device: str | torch.device) -> None:
    """Load the file's tensors strictly into `module` (cast to the file's dtype first); raises naming keys."""
    module.to(dtype=dtype)
    state = load_file(str(path))
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: tensors do not match the model its metadata describes: missing "
                         f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
    module.to(device)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> PortableModel:
    """Rebuild the multi-task model of a `pretrain export` file (no run directory, DeepSpeed or torch.distributed).

    Returns a `PortableModel` in eval mode: `model(images_uint8_B3HW, task="cls"|"det"|"seg")`.
    """
    path = Path(path)
    meta = read_meta(path, "model")
    net = build_checked(path, lambda: build_described(path, meta))
    decoded = decode_meta(meta)
    load_state(path, net, DTYPES[decoded["dtype"]], device)
    return PortableModel(net, decoded).eval()


def build_described(path: str | Path, meta: dict[str, str]) -> nn.Module:
    """The model (random weights) a file's metadata `meta` (raw strings) describes: `build_model` for a `model`
    file, `build_submodel` for a `submodel`; `path` names the file in errors. The one constructor of both loaders,
    and of a fine-tuning run's backbone on resume (`finetune.record`), which keeps the metadata but not the file."""
    from pretrain.config.pretraining import task_order
    from pretrain.models import build_model
    from pretrain.models.grow_layers import layer_factories

    path = Path(path)
    model_cfg, moe_cfg, tasks = config_sections(path, meta)
    decoded = decode_meta(meta)
    if decoded.get("kind") == "submodel":
        from pretrain.models.submodel import build_submodel

        check_submodel_meta(path, decoded)
        return build_submodel(model=model_cfg, moe=moe_cfg, tasks=tasks, task_names=decoded["task_names"],
                              num_classes=decoded["num_classes"], kept=decoded["kept"],
                              exact_routing=bool(decoded["exact_routing"]))
    # a model grown by `pretrain add-task` with new experts: its old tasks route over the experts they had
    layers = layer_factories(decoded, task_order(tasks), moe_cfg)
    return build_model(model=model_cfg, moe=moe_cfg, tasks=tasks, num_classes=decoded["num_classes"], **layers)


def check_submodel_meta(path: Path, meta: dict[str, Any]) -> None:
    """Raise naming the file when its metadata lacks what `build_submodel` needs."""
    for key in ("kept", "task_names", "num_classes", "exact_routing"):
        if key not in meta:
            raise ValueError(f"{path}: submodel metadata lacks {key!r}")


def load_submodel(path: str | Path, device: str | torch.device = "cpu") -> PortableModel:
    """Rebuild a `pretrain extract` file (no run directory, DeepSpeed or torch.distributed) in eval mode.

    Returns a `PortableModel`: a single-task submodel answers `model(images_uint8_B3HW)`, a
    multi-task one `model(images, task=...)`.
    """
    path = Path(path)
    raw = read_meta(path, "submodel")
    meta = decode_meta(raw)
    check_submodel_meta(path, meta)
    config_sections(path, raw)  # a section this version does not know fails before anything is built
    net = build_checked(path, lambda: build_described(path, raw))
    load_state(path, net, DTYPES[meta["dtype"]], device)
    return PortableModel(net, meta).eval()


def load_any(path: str | Path, device: str | torch.device = "cpu") -> PortableModel:
    """A model or submodel file, whichever `path` holds."""
    kind = read_meta(path).get("kind")
    if kind == "submodel":
        return load_submodel(path, device)
    return load_model(path, device)


def load_backbone(source: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The `VisionTransformer` of a model file, a submodel file or a run directory (its latest checkpoint).

    Fine-tuning starts here: the backbone keeps its task embedding and routers (rows of the file's tasks).
    """
    source = Path(source)
    if source.is_dir():
        from pretrain.runs.load import load_run

        return load_run(source).model.backbone.to(device)
    return load_any(source, device).backbone
