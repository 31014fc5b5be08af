"""A fine-tuning run's backbone record, `backbone.json`: what its first start built the backbone from.

The first start reads `finetune.init_from` (a run directory, a model, submodel or `dense` file, dense ViT weights,
or nothing) and writes this record beside its config.yaml: the source kind, the `model` / `moe` sections the
backbone was built with, its router-row count and the task names of those rows, the file's metadata when the
source is a model or submodel file (its layers depend on it), and a fingerprint of the source (to say, on resume,
that it changed since). Resume and `pretrain evaluate RUN` rebuild the backbone's structure from the record alone
(`described_backbone`) and take every weight from the run's own checkpoint: deleting or replacing `init_from` after
the first start changes neither. JSON, written atomically (`durable.atomic_write`), never a pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.config.finetuning import FinetuneConfig
from pretrain.config.pretraining import ModelConfig, MoEConfig
from pretrain.durable import atomic_write
from pretrain.errors import CheckpointError

if TYPE_CHECKING:
    from pretrain.models.vit import VisionTransformer

logger = logging.getLogger(__name__)

RECORD = "backbone.json"
RECORD_VERSION = 1
KINDS = ("random", "run", "model", "submodel", "dense", "weights")
# the metadata entry a portable file may hold that its structure does not need (ImageNet's 1,000 class names)
UNNEEDED_META = ("classes",)
# The fields of `model` / `moe` that fix a backbone's shapes and routing. With `finetune.init_from` the source defines
# them: its values go into the run's config (the saved config.yaml tells the truth), and a key=value override that
# contradicts the source is refused (`check_source_overrides`) rather than silently trained as the source's value.
ARCH_FIELDS = {"model": ("size", "patch_size", "img_size", "pos_grid", "class_token", "task_embed"),
               "moe": ("placement", "num_experts", "top_k", "expert_hidden", "attn_num_experts", "attn_top_k",
                       "attn_head_dim", "dense_attn_head_dim", "gate")}
SOURCE_KEYS = tuple(f"{section}.{name}" for section, names in ARCH_FIELDS.items() for name in names)


def as_plain(value: Any) -> Any:
    """A section value as YAML and JSON hold it (tuples are lists): the form two sources' values compare in."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _section(schema: type, values: dict[str, Any]) -> Any:
    # JSON has no tuples: the sections' list-valued fields are tuples (`model.pos_grid`)
    return schema(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class BackboneRecord:
    """What the first start built the backbone from.

    Attributes:
        init_from: `finetune.init_from` at the first start ("" = random initialisation).
        kind: one of `KINDS` (`weights`: dense ViT weights upcycled into `moe.placement`).
        model, moe: the sections the backbone was built with (a run directory's or a file's, else the config's).
        num_tasks: the source backbone's router-row count, before the dense tasks' rows are selected.
        rows: the task name of each of those rows (`finetune.router_from` is looked up here).
        meta: a model / submodel file's metadata (raw strings, class lists left out); {} for every other kind.
        fingerprint: the source as the first start saw it (bytes + SHA-256 of a file, step of a run directory).
    """

    init_from: str
    kind: str
    model: ModelConfig
    moe: MoEConfig
    num_tasks: int
    rows: tuple[str, ...]
    meta: dict[str, str] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # one form whatever the source: a file's sections hold lists, not tuples
        object.__setattr__(self, "model", _section(ModelConfig, dataclasses.asdict(self.model)))
        object.__setattr__(self, "moe", _section(MoEConfig, dataclasses.asdict(self.moe)))
        object.__setattr__(self, "rows", tuple(self.rows))


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a source file (read once, in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_record(run_dir: str | Path, record: BackboneRecord) -> Path:
    """Write `record` as `run_dir/backbone.json` (atomically: a crash leaves the old one or the new one)."""
    out = Path(run_dir) / RECORD
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"version": RECORD_VERSION, **dataclasses.asdict(record), "rows": list(record.rows)}
    atomic_write(out, json.dumps(body, indent=2, sort_keys=True) + "\n")
    return out


def read_record(run_dir: str | Path) -> BackboneRecord | None:
    """The record of `run_dir`, or None when it has none (a run started before records existed); raises
    CheckpointError (exit 5) naming the file when it is damaged or newer than this version reads."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        version = int(body.pop("version"))
        if version > RECORD_VERSION:
            raise ValueError(f"version {version} is newer than this pretrain reads ({RECORD_VERSION})")
        return BackboneRecord(**{**body, "model": ModelConfig(**body["model"]), "moe": MoEConfig(**body["moe"])})
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable backbone record ({exc}): restore it from a backup") from None


def adopt_source_sections_(cfg: FinetuneConfig, model: ModelConfig, moe: MoEConfig, src: str) -> None:
    """Write the source backbone's architecture fields (`ARCH_FIELDS`) into `cfg.model` / `cfg.moe` in place, so the
    saved config.yaml describes the backbone the run trains; the values that change are logged."""
    for section, source in (("model", model), ("moe", moe)):
        mine = getattr(cfg, section)
        changed = {f"{section}.{name}": (getattr(mine, name), getattr(source, name)) for name in ARCH_FIELDS[section]
                   if as_plain(getattr(mine, name)) != as_plain(getattr(source, name))}
        if changed:
            logger.info("finetune.init_from=%s defines the backbone: %s", src,
                        ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        setattr(cfg, section, replace(mine, **{name: getattr(source, name) for name in ARCH_FIELDS[section]}))


def adopt_record_(cfg: FinetuneConfig, record: BackboneRecord) -> None:
    """Give `cfg` the backbone's sections as the first start did (in place): a run directory's `model` / `moe`
    replace the config's; a file's architecture fields (`ARCH_FIELDS`) replace the config's; dense ViT weights
    and random initialisation are built from the config itself."""
    if record.kind == "run":
        cfg.model, cfg.moe = record.model, record.moe
    elif record.kind in ("model", "submodel", "dense"):
        adopt_source_sections_(cfg, record.model, record.moe, record.init_from)


def source_keys(record: BackboneRecord) -> tuple[str, ...]:
    """The config keys `adopt_record_` sets from the source (fnmatch patterns): a drift check leaves them to the
    record, so a config.yaml rewritten by `pretrain submit` from the user's overlay still resumes."""
    if record.kind == "run":
        return ("model.*", "moe.*")
    return SOURCE_KEYS if record.kind in ("model", "submodel", "dense") else ()


def described_backbone(cfg: FinetuneConfig, record: BackboneRecord) -> VisionTransformer:
    """The backbone `record` describes, random weights (the run's checkpoint brings its own): nothing is read from
    `record.init_from`, and no upcycling source either."""
    from pretrain.models import build_backbone
    from pretrain.parallel.layers import moe_mlp_factory
    from pretrain.runs.portable import DTYPES, build_described, decode_meta

    if record.meta:  # a model / submodel file: its layers (kept or limited experts) come from its metadata
        vit = build_described(Path(cfg.output_dir) / RECORD, record.meta).backbone
        vit.to(dtype=DTYPES[decode_meta(record.meta)["dtype"]])  # as `portable.load_state` casts it
    else:
        vit = build_backbone(replace(record.model, upcycle_from=""), record.moe, num_tasks=record.num_tasks,
                             moe_mlp_layer=moe_mlp_factory(record.moe, cfg.engine, rank=0))
    return vit  # `build_dense_model` puts the whole model in train mode, whatever the source


def check_source_unchanged(record: BackboneRecord) -> None:
    """Log (never fail) when `init_from` is gone or differs from what the first start read: the run ignores it."""
    path = Path(record.init_from)
    if not record.init_from or (path.is_dir() and record.kind == "run"):
        return
    now = file_fingerprint(path) if path.is_file() else None
    if now != record.fingerprint:
        logger.info("finetune.init_from=%s is %s since the first start; the run's backbone comes from %s and its "
                    "checkpoint", record.init_from, "gone" if now is None else "changed", RECORD)
