"""Where a fine-tuning backbone comes from (`finetune.init_from`), and how its routers become the dense tasks'.

Sources: a pretraining run directory (`runs.load_run`), a file written by `pretrain export` / `pretrain extract`
(their loader), a `dense` file written by `pretrain import-mlore` (backbone + MLoRE decoder of an official MLoRE
checkpoint, `import_mlore_file`; its decoder is taken by `load_source_decoder_`), a dense timm ViT state dict
(`.safetensors` / `.pth`, weights only: sparse-upcycled into the configured placement), or nothing (random init).
Position embeddings are resampled to the fine-tuning grid on the fly by the backbone itself (not at its stored
grid). Each dense task's router row and task-embedding row start from those of one pretraining task
(`finetune.router_from`), or one shared row serves every task (`finetune.routing=shared`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.catalog import out_channels
from pretrain.config.checks import ConfigError
from pretrain.config.finetuning import FinetuneConfig, dense_size, enabled_dense_tasks
from pretrain.config.load import load_config
from pretrain.config.pretraining import TASKS, ModelConfig, MoEConfig
from pretrain.finetune.record import (
    SOURCE_KEYS,
    UNNEEDED_META,
    BackboneRecord,
    adopt_record_,
    as_plain,
    described_backbone,
    file_fingerprint,
    read_record,
    source_keys,
)
from pretrain.models import backbone_size, build_backbone
from pretrain.models.grow_layers import LimitedRouting
from pretrain.models.moe_losses import moe_modules
from pretrain.models.moe_routing import TaskRouter
from pretrain.models.vit import VisionTransformer
from pretrain.parallel.layers import moe_mlp_factory

logger = logging.getLogger(__name__)

DENSE_KIND = "dense"  # portable-format file kind of `pretrain import-mlore`: `backbone.*` + `decoder.*` tensors
def source_sections(src: str) -> tuple[ModelConfig, MoEConfig] | None:
    """The model/moe sections of the backbone `finetune.init_from` names: a run directory's config.yaml, a pretrain
    file's metadata; None for random init, dense ViT weights (upcycled into the config's architecture) and anything
    unreadable (`load_source_backbone` then says what is wrong)."""
    path = Path(src)
    if not src:
        return None
    if path.is_dir():
        try:
            run = load_config(path / "config.yaml")
        except ConfigError:
            return None
        return run.model, run.moe
    meta = _portable_meta(path) if path.is_file() else None
    if meta is None:
        return None
    from pretrain.runs.portable import config_sections

    try:
        model, moe, _ = config_sections(path, meta)
    except (ValueError, KeyError):
        return None
    return model, moe


def resume_view(cfg: FinetuneConfig, run_dir: Path) -> tuple[BackboneRecord | None, tuple[str, ...]]:
    """What a resume of a fine-tuning run (and `pretrain submit finetune` resubmitting it) compares with the run's
    config.yaml: the run's record, whose sections go into `cfg` in place as the first start's did, and the keys the
    source defines (fnmatch patterns the drift check leaves out). A run started before records existed derives them
    from `init_from`, as it always did: a run directory defines model/moe, a file their architecture fields."""
    from pretrain.runs.drift import has_checkpoint

    record = read_record(run_dir) if has_checkpoint(run_dir) else None
    if record is not None:
        adopt_record_(cfg, record)
        return record, source_keys(record)
    if cfg.finetune.init_from and Path(cfg.finetune.init_from).is_dir():
        return None, ("model.*", "moe.*")
    return None, SOURCE_KEYS if source_sections(cfg.finetune.init_from) else ()


def check_source_overrides(cfg: FinetuneConfig, overrides: list[str] | tuple[str, ...]) -> None:
    """ConfigError naming both values when a `key=value` override of an architecture field (`ARCH_FIELDS`)
    contradicts the `finetune.init_from` source: before anything is built or written."""
    asked = [key for key in SOURCE_KEYS if key in {item.split("=", 1)[0].strip() for item in overrides}]
    sections = source_sections(cfg.finetune.init_from) if asked else None
    for key in asked if sections else ():
        section, name = key.split(".")
        have = getattr(getattr(cfg, section), name)
        want = getattr(sections[0] if section == "model" else sections[1], name)
        if as_plain(have) != as_plain(want):
            raise ConfigError(f"{key}={have} conflicts with finetune.init_from={cfg.finetune.init_from}, whose "
                              f"backbone has {key}={want}: the source defines the architecture; drop the override")


def _portable_meta(path: Path) -> dict | None:
    """The metadata of a file written by `pretrain export` / `pretrain extract`, or None for any other file."""
    if path.suffix != ".safetensors":
        return None
    from pretrain.runs.portable import FORMAT, decode_meta, read_meta

    try:
        meta = read_meta(path)
    except ValueError:  # a safetensors file of another kind (a dense timm ViT)
        return None
    return decode_meta(meta) if meta.get("format") == FORMAT else None


def load_source_backbone(cfg: FinetuneConfig) -> tuple[VisionTransformer, BackboneRecord]:
    """The backbone `finetune.init_from` names, or a fresh one, and its record (`finetune.record`: what it was built
    from, the task name of each router row) that resume and evaluation rebuild it from.

    A run directory's `model`/`moe` sections replace `cfg`'s (in place), so the fine-tuning run's config describes
    its backbone. An extracted submodel holds only its own tasks' rows, in its own order.
    """
    src = cfg.finetune.init_from
    path = Path(src)
    if not src:
        logger.info("backbone: random initialisation (%s, %s placement)", cfg.model.size, cfg.moe.placement)
        vit = build_backbone(cfg.model, cfg.moe, moe_mlp_layer=moe_mlp_factory(cfg.moe, cfg.engine, rank=0))
        return vit, _record(cfg, "random", vit, TASKS)
    if path.is_dir():
        from pretrain.runs.load import load_run

        run = load_run(path)
        logger.info("backbone: run %s at step %d (its model/moe sections replace the config's)", path, run.step)
        record = _record(cfg, "run", run.model.backbone, TASKS, model=run.cfg.model, moe=run.cfg.moe,
                         fingerprint={"step": run.step, "tag": run.tag_dir.name})
        adopt_record_(cfg, record)  # the saved config.yaml then describes this backbone
        return run.model.backbone, record
    if not path.is_file():
        raise FileNotFoundError(f"finetune.init_from={src}: no such run directory or file")
    meta = _portable_meta(path)
    if meta is not None and meta.get("kind") == DENSE_KIND:
        return _dense_backbone(cfg, path)
    if meta is not None:
        from pretrain.runs.portable import config_sections, load_backbone, read_meta

        rows = tuple(meta["task_names"]) if meta.get("kind") == "submodel" else TASKS
        logger.info("backbone: %s (%s file, task rows %s)", path, meta.get("kind"), list(rows))
        try:
            model, moe, _ = config_sections(path, meta)
            vit = load_backbone(path)
        except (ValueError, KeyError) as exc:  # metadata or tensors that do not describe one model: the user's input
            raise ConfigError(f"finetune.init_from={src}: {str(exc).strip(chr(39))}") from None
        raw = {k: v for k, v in read_meta(path).items() if k not in UNNEEDED_META}
        record = _record(cfg, meta["kind"], vit, rows, model=model, moe=moe, meta=raw)
        adopt_record_(cfg, record)
        return vit, record
    logger.info("backbone: dense ViT weights %s, upcycled into the %s placement", path, cfg.moe.placement)
    model = replace(cfg.model, upcycle_from=str(path))
    try:
        vit = build_backbone(model, cfg.moe, moe_mlp_layer=moe_mlp_factory(cfg.moe, cfg.engine, rank=0))
    except ConfigError as exc:
        raise ConfigError(f"finetune.init_from={src}: neither a pretrain model file nor dense ViT weights the "
                          f"upcycler reads ({str(exc).split(': ', 1)[-1]})") from None
    return vit, _record(cfg, "weights", vit, TASKS, model=model)


def _record(cfg: FinetuneConfig, kind: str, vit: VisionTransformer, rows: tuple[str, ...], *,
            model: ModelConfig | None = None, moe: MoEConfig | None = None, meta: dict[str, str] | None = None,
            fingerprint: dict[str, Any] | None = None) -> BackboneRecord:
    """The record of a backbone just built from `cfg.finetune.init_from` (a file's fingerprint by default)."""
    src = cfg.finetune.init_from
    if fingerprint is None:
        fingerprint = file_fingerprint(Path(src)) if src and Path(src).is_file() else {}
    return BackboneRecord(init_from=src, kind=kind, model=model or cfg.model, moe=moe or cfg.moe,
                          num_tasks=vit.num_tasks, rows=tuple(rows), meta=meta or {}, fingerprint=fingerprint)


@torch.no_grad()
def select_task_rows_(vit: VisionTransformer, rows: list[int]) -> VisionTransformer:
    """Keep task rows `rows` (in this order, repeats allowed) of every router, usage buffer and the task embedding.

    Args:
        vit: a backbone whose routed layers hold [T_old, ...] per-task parameters and buffers.
        rows: old row index of each new task row.
    """
    index = torch.tensor(rows, dtype=torch.long)
    for _, layer in moe_modules(vit):
        for module in layer.modules():  # the layer, and an exact-routing submodel's `full_routing` child
            if isinstance(module, TaskRouter):
                for name, param in list(module.named_parameters(recurse=False)):
                    setattr(module, name, nn.Parameter(param[index].clone()))
            for name, buf in list(module.named_buffers(recurse=False)):
                # the per-task statistics [T, E] by name: a submodel's `kept_E` [E'] may happen to have T entries
                if buf is not None and name.endswith("_TE"):
                    module.register_buffer(name, buf[index].clone())
            if hasattr(module, "num_tasks"):
                module.num_tasks = len(rows)
            if isinstance(module, LimitedRouting):  # a grown model's layer: its per-task expert counts are rows too
                module.keep_task_rows(rows)
    if vit.task_embed is not None:
        vit.task_embed = nn.Parameter(vit.task_embed[index].clone())
    vit.num_tasks = len(rows)
    return vit


def build_finetune_backbone(cfg: FinetuneConfig, tasks: list[str], record: BackboneRecord | None = None
                            ) -> tuple[VisionTransformer, BackboneRecord]:
    """The source backbone with one router row per dense task (per_task) or one shared row, all copied from the
    pretraining task `finetune.router_from`, and its record.

    Args:
        record: None at a run's first start (the backbone comes from `finetune.init_from`); on resume and evaluation
            the run's own record (`finetune.record`): the structure is rebuilt from it, `cfg` gets its sections as
            the first start gave them, and the weights are left to the run's checkpoint.
    """
    if record is None:
        vit, record = load_source_backbone(cfg)
    else:
        adopt_record_(cfg, record)
        vit = described_backbone(cfg, record)
    row_tasks = record.rows
    if cfg.finetune.router_from in row_tasks:
        source = row_tasks.index(cfg.finetune.router_from)
    else:  # an extracted submodel keeps only its own tasks' rows
        logger.warning("the backbone has no %s router (rows %s): dense routers start from %s's",
                       cfg.finetune.router_from, list(row_tasks), row_tasks[0])
        source = 0
    count = len(tasks) if cfg.finetune.routing == "per_task" else 1
    return select_task_rows_(vit, [source] * count), record


def _dense_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` (`backbone.` / `decoder.`) of a `dense` file, prefix removed; only those are read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _dense_backbone(cfg: FinetuneConfig, path: Path) -> tuple[VisionTransformer, BackboneRecord]:
    """The backbone of a `dense` file, built from the file's model/moe sections (its geometry: no class token,
    position embedding at the official training grid); drop path is the fine-tuning config's."""
    from pretrain.runs.portable import config_sections, read_meta

    model, moe, _ = config_sections(path, read_meta(path, DENSE_KIND))
    model = replace(model, drop_path=cfg.model.drop_path)
    vit = build_backbone(model, moe, moe_mlp_layer=moe_mlp_factory(moe, cfg.engine, rank=0))
    result = vit.load_state_dict(_dense_tensors(path, "backbone."), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: backbone tensors do not match its metadata: missing {result.missing_keys[:8]}, "
                         f"unexpected {result.unexpected_keys[:8]}")
    logger.info("backbone: %s (dense file of an official MLoRE checkpoint: %s, class token %s, grid %s)", path,
                model.size, model.class_token, list(model.pos_grid))
    record = _record(cfg, DENSE_KIND, vit, TASKS, model=model, moe=moe)
    adopt_record_(cfg, record)
    return vit, record


@torch.no_grad()
def load_source_decoder_(cfg: FinetuneConfig, decoder: nn.Module) -> bool:
    """Load the decoder of a `dense` file in `finetune.init_from` into `decoder` (built from the config) in place.

    Returns False (nothing loaded) for any other source, or when `finetune.decoder` is not the file's decoder (then
    only its backbone is taken). Tasks of the file that the config leaves out are dropped; everything else must fit
    exactly, else ValueError naming the file, the first differing key and the options to set.
    """
    src = cfg.finetune.init_from
    path = Path(src)
    meta = _portable_meta(path) if src and path.is_file() else None
    if meta is None or meta.get("kind") != DENSE_KIND:
        return False
    stored = meta["decoder"]
    if cfg.finetune.decoder != stored["name"]:
        logger.info("%s holds a %s decoder, finetune.decoder=%s: only its backbone is taken", path, stored["name"],
                    cfg.finetune.decoder)
        return False
    missing_tasks = sorted(set(decoder.tasks) - set(stored["tasks"]))
    if missing_tasks:
        raise ValueError(f"finetune.init_from={path}: its decoder has no tasks {missing_tasks} (it has "
                         f"{sorted(stored['tasks'])}): disable them with tasks.<task>.enabled=false")
    left_out = set(stored["tasks"]) - set(decoder.tasks)
    tensors = {k: v for k, v in _dense_tensors(path, "decoder.").items() if not left_out & set(k.split("."))}
    own = decoder.state_dict()
    differ = sorted(set(own) ^ set(tensors)) + sorted(k for k in set(own) & set(tensors)
                                                      if own[k].shape != tensors[k].shape)
    if differ:
        raise ValueError(f"finetune.init_from={path}: its {stored['name']} decoder does not fit finetune."
                         f"decoder_options={dict(cfg.finetune.decoder_options)} (first differing key {differ[0]}): "
                         f"set them to the file's {stored['options']}")
    decoder.load_state_dict(tensors, strict=True)
    logger.info("decoder: %s from %s (tasks %s; left out %s)", stored["name"], path, list(decoder.tasks),
                sorted(left_out))
    return True


def mlore_import_target(cfg: FinetuneConfig, shape: Any, source: str
                        ) -> tuple[ModelConfig, VisionTransformer, nn.Module, dict[str, Any]]:
    """The backbone and decoder an official MLoRE checkpoint of `shape` (`mlore_import.OfficialShape`) loads into,
    built from the fine-tuning config `cfg`; raises ValueError naming `source` and the key when they cannot fit.

    `cfg` describes the target: `model.size` (width/depth/patch must be the checkpoint's), `moe.placement=dense`,
    `finetune.decoder=mlore` with `decoder_options` (preset: the checkpoint's widths), the enabled tasks (a subset of
    the checkpoint's, output channels as `data.dataset`'s) and `data.train_size` (the official training size: its
    patch grid must hold the checkpoint's position embedding). The backbone gets `class_token=false`, `pos_grid` =
    that grid, no task embedding; the decoder `router_pool=linear`, `router_hw` = the grid (models/mlore_import.py).
    Returns (the backbone's model section, backbone, decoder, decoder options).
    """
    from pretrain.models.decoders import DECODERS

    size = backbone_size(cfg.model)
    if (size["embed_dim"], size["depth"], size["patch_size"]) != (shape.embed_dim, shape.depth, shape.patch_size):
        raise ValueError(f"{source}: a ViT of width {shape.embed_dim}, depth {shape.depth}, patch "
                         f"{shape.patch_size}; --config model.size={cfg.model.size} has {size['embed_dim']}, "
                         f"{size['depth']}, {size['patch_size']}")
    patch, (h, w) = shape.patch_size, dense_size(cfg.data, "train")
    grid = (h // patch, w // patch)
    if grid[0] * grid[1] != shape.tokens:
        raise ValueError(f"{source}: its position embedding holds {shape.tokens} patches (+1 class row); "
                         f"data.train_size={[h, w]} gives a {grid[0]}x{grid[1]} grid: set data.train_size to the "
                         "official training size (PASCAL-Context [512, 512], NYUD-v2 [448, 576])")
    tasks = enabled_dense_tasks(cfg)
    lacking = [t for t in tasks if t not in shape.tasks]
    if lacking:
        raise ValueError(f"{source}: no heads for tasks {lacking} (it has {sorted(shape.tasks)}): disable them "
                         "with tasks.<task>.enabled=false")
    channels = {t: out_channels(t, cfg.data.dataset) for t in tasks}
    wrong = {t: shape.tasks[t] for t in tasks if shape.tasks[t] != channels[t]}
    if wrong:
        raise ValueError(f"{source}: heads with {wrong} outputs, data.dataset={cfg.data.dataset} has "
                         f"{ {t: channels[t] for t in wrong} }: is --config for this checkpoint's dataset?")
    model = replace(cfg.model, class_token=False, pos_grid=grid, task_embed=False, upcycle_from="")
    vit = build_backbone(model, cfg.moe)
    options = {**cfg.finetune.decoder_options, "router_pool": "linear", "router_hw": list(grid)}
    decoder = DECODERS["mlore"](embed_dim=vit.embed_dim, depth=vit.depth, tasks=channels, **options)
    return model, vit, decoder, options


def import_mlore_file(cfg: FinetuneConfig, checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """`pretrain import-mlore`: an official MLoRE checkpoint → a `dense` file (`backbone.*` + `decoder.*` tensors,
    the backbone's model/moe sections and the decoder's name, options and tasks in the metadata) for
    `finetune.init_from`. The target comes from `cfg` (`mlore_import_target`). Returns the command's JSON report:
    mapped / dropped key counts with the reason per dropped group, and the overrides that take the decoder too.
    """
    from pretrain.models.mlore_import import import_mlore, official_shape, read_official
    from pretrain.runs.portable import config_metadata, write_file

    if cfg.moe.placement != "dense" or cfg.finetune.decoder != "mlore":
        raise ValueError(f"--config: an official MLoRE checkpoint is a plain ViT + MLoRE decoder: set moe.placement="
                         f"dense (is {cfg.moe.placement}) and finetune.decoder=mlore (is {cfg.finetune.decoder})")
    if Path(out).suffix != ".safetensors":
        raise ValueError(f"--out {out}: the file name must end in .safetensors")
    sd = read_official(checkpoint)
    model, vit, decoder, options = mlore_import_target(cfg, official_shape(sd, str(checkpoint)), str(checkpoint))
    report = import_mlore(sd, vit, decoder, name=str(checkpoint))
    tensors = {**{f"backbone.{k}": v for k, v in vit.state_dict().items()},
               **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}}
    meta = {**config_metadata(model=model, moe=cfg.moe, tasks={}), "source": str(checkpoint),
            "decoder": {"name": "mlore", "options": options, "tasks": decoder.tasks}, "import_report": report}
    write_file(out, tensors, meta, kind=DENSE_KIND)
    rows, cols = model.pos_grid
    overrides = [f"finetune.init_from={out}", "finetune.decoder=mlore", "finetune.decoder_options.router_pool=linear",
                 f"finetune.decoder_options.router_hw=[{rows},{cols}]", "finetune.routing=shared"]
    return {"out": str(out), "kind": DENSE_KIND, "grid": [rows, cols], "tasks": decoder.tasks, **report,
            "finetune_overrides": overrides}
