"""`pretrain extract`: keep the experts some tasks use → a standalone submodel file, and a report comparing it with
the full model (`pretrain.extraction.report`).

Usage comes from the layers' training EMA (`usage_TE`, Mod-Squad's statistic) or, with `--calibrate`, from top-k
selection counts of the full model (eval mode) on the tasks' own images. `extraction.keep_rules` turns usage into kept
experts; `pretrain.models.submodel` builds and slices the submodel.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from pretrain.config.pretraining import ModelConfig, MoEConfig
from pretrain.extraction.keep_rules import choose_experts
from pretrain.models import backbone_size, moe_kwargs
from pretrain.models.moe_losses import moe_modules
from pretrain.models.submodel import build_submodel, slice_state
from pretrain.models.vit import moe_layout
from pretrain.runs.portable import PortableModel, config_sections, load_model, write_file

logger = logging.getLogger(__name__)


@dataclass
class Extraction:
    """What `extract_submodel` decided and built."""

    full: PortableModel
    sub: PortableModel
    tasks: list[str]
    usage: dict[str, Tensor]  # layer → [T, E] usage the rule saw (rows = full-model task ids)
    usage_source: str  # "ema" | "calibration"
    kept: dict[str, list[int]]


def load_source(source: str | Path, *, step: int | None = None, data_root: str | None = None) -> PortableModel:
    """The full model from a run directory (its checkpoint, consolidated in memory) or a `pretrain export` file."""
    source = Path(source)
    if source.is_dir():
        from pretrain.extraction.export import consolidate

        return consolidate(source, step=step, data_root=data_root)
    if step is not None:
        raise ValueError(f"--step applies to a run directory; {source} is a file")
    return load_model(source)


def routed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Backbone-relative name (`blocks.{i}.attn|mlp`) → task-routed MoE layer of a `MultiTaskModel`."""
    return dict(moe_modules(model.backbone))


@contextlib.contextmanager
def count_routes(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Sum each routed layer's top-k selection counts [T, E] (`last_counts_TE`) over the forwards in the block."""
    totals: dict[str, Tensor] = {}

    def hook(name: str):
        def add(module: nn.Module, args, output) -> None:
            counts_TE = getattr(module, "last_counts_TE", None)
            if counts_TE is None:
                raise RuntimeError(f"{name}: the MoE layer exposes no last_counts_TE after its forward")
            totals[name] = totals[name] + counts_TE.double() if name in totals else counts_TE.double().clone()
        return add

    handles = [m.register_forward_hook(hook(name)) for name, m in routed_layers(model).items()]
    try:
        yield totals
    finally:
        for handle in handles:
            handle.remove()


def eval_batches(task: str, shard_dir: str | Path, *, kind: str, img_size: int, batch_size: int,
                 limit: int) -> Iterator[dict]:
    """The first `limit` images (in batches) of a shard folder, eval transforms, one process: the task's own shards,
    or a dense dataset's (NYUD-v2, PASCAL-Context: calibrating a task's routing on a new dataset), whose images are
    resized to `img_size` (the old protocol's fixed resize; only the images matter for routing). `kind`: the task's
    (`config.task_kind`), whose source reads its own shards."""
    from pretrain.data.dense import DENSE_DATASETS, make_dense_eval_loader
    from pretrain.data.sources import make_eval_loader, read_shard_info

    dataset = read_shard_info(shard_dir).get("dataset")
    if dataset in DENSE_DATASETS:
        loader = make_dense_eval_loader(dataset, shard_dir, batch_size=batch_size, eval_size=(img_size, img_size),
                                        protocol="old", num_workers=0)
    else:
        loader = make_eval_loader(task, shard_dir, batch_size=batch_size, img_size=img_size, num_workers=0, kind=kind)
    seen = 0
    for batch in loader:
        if seen >= limit:
            return
        take = min(limit - seen, len(batch["images"]))
        yield {**batch, "images": batch["images"][:take]} if take < len(batch["images"]) else batch
        seen += take


@torch.no_grad()
def calibrate_usage(full: PortableModel, tasks: list[str], shard_dirs: list[str], images: int) -> dict[str, Tensor]:
    """Top-k selection counts [T, E] per layer of the full model (eval mode) on `images` images of each task's
    shard folder (`shard_dirs[i]` for `tasks[i]`)."""
    if len(shard_dirs) != len(tasks):
        raise ValueError(f"--calibrate: give one shard folder per task ({len(tasks)}: {tasks}), got {shard_dirs}")
    _, _, table = config_sections("metadata", full.meta)
    with count_routes(full.model) as totals:
        for task, shard_dir in zip(tasks, shard_dirs):
            for batch in eval_batches(task, shard_dir, kind=full.model.kinds[task], img_size=table[task].img_size,
                                      batch_size=table[task].eval_batch_size, limit=images):
                full.model(task, batch["images"])
    return totals


def check_request(full: PortableModel, tasks: list[str], rule: str, keep: int) -> None:
    """Clear errors for an impossible extraction (unknown task, dense model, `--keep` beyond a layer's experts)."""
    unknown = [t for t in tasks if t not in full.tasks]
    if unknown or not tasks:
        raise ValueError(f"--task {','.join(tasks)}: unknown task(s) {unknown}; this model has {full.tasks}")
    layers = routed_layers(full.model)
    if not layers:
        raise ValueError(f"the model has no MoE layers (placement {full.meta['moe']['placement']!r}): nothing to "
                         "extract; its backbone is already dense (`pretrain.runs.portable.load_backbone`)")
    if rule == "topn":
        too_many = {n: m.num_experts for n, m in layers.items() if keep > m.num_experts}
        if too_many:
            raise ValueError(f"--keep {keep} is more than the experts of layers {too_many}")
        # a model grown by `pretrain add-task` with new experts: an older task routes over its first experts only,
        # so keeping more would keep experts it never uses (`models.grow_layers.LimitedRouting`)
        rows = [full.model.task_ids[t] for t in tasks]
        limited = {n: min(m.task_experts[r] for r in rows) for n, m in layers.items() if hasattr(m, "task_experts")}
        too_many = {n: most for n, most in limited.items() if keep > most}
        if too_many:
            raise ValueError(f"--keep {keep} is more than the experts --task {','.join(tasks)} routes over in layers "
                             f"{too_many} (a model grown by add-task: older tasks see the experts they were trained "
                             "with)")


def extract_submodel(full: PortableModel, tasks: list[str], *, rule: str = "modsquad", thresh: float = 3.0,
                     keep: int = 0, mass: float = 0.9, share: float = 1.0, calibrate: list[str] | None = None,
                     calibrate_images: int = 64, exact_routing: bool = False, top_k: int = 0,
                     attn_top_k: int = 0) -> Extraction:
    """Choose each MoE layer's kept experts for `tasks` and build the submodel with their weights (eval mode).

    The keep rule reads usage gathered at the trained top-k; `top_k` / `attn_top_k` (0 = as trained) then route
    each token of the submodel's MoE MLPs / MoE attention layers to fewer experts (`with_top_k`).
    """
    check_request(full, tasks, rule, keep)
    usage, source = task_usage(full, tasks, calibrate, calibrate_images)
    return extract_with_usage(full, tasks, usage, source, rule=rule, thresh=thresh, keep=keep, mass=mass,
                              share=share, calibrate=calibrate, calibrate_images=calibrate_images,
                              exact_routing=exact_routing, top_k=top_k, attn_top_k=attn_top_k)


def task_usage(full: PortableModel, tasks: list[str], calibrate: list[str] | None,
               calibrate_images: int) -> tuple[dict[str, Tensor], str]:
    """Usage [T, E] per layer the keep rules read: top-k counts on the tasks' images with `calibrate`, else the
    training EMA; and which of the two it is."""
    if calibrate:
        return calibrate_usage(full, tasks, calibrate, calibrate_images), "calibration"
    return {n: m.usage_TE.detach().double() for n, m in routed_layers(full.model).items()}, "ema"


def extract_with_usage(full: PortableModel, tasks: list[str], usage: dict[str, Tensor], source: str, *, rule: str,
                       thresh: float = 3.0, keep: int = 0, mass: float = 0.9, share: float = 1.0,
                       calibrate: list[str] | None = None, calibrate_images: int = 64, exact_routing: bool = False,
                       top_k: int = 0, attn_top_k: int = 0) -> Extraction:
    """`extract_submodel` once the usage is known (a sweep computes it once for every size)."""
    layers = routed_layers(full.model)
    rows = [full.model.task_ids[t] for t in tasks]
    kept = choose_experts(usage, {n: m.top_k for n, m in layers.items()}, rows, rule, thresh=thresh, keep=keep,
                          mass=mass, share=share)
    rule_meta = {"name": rule, "thresh": thresh, "keep": keep, "mass": mass, "share": share, "usage": source,
                 "calibrate": calibrate or [], "calibrate_images": calibrate_images if calibrate else 0}
    sub = make_submodel(full, tasks, kept, exact_routing=exact_routing, rule=rule_meta, top_k=top_k,
                        attn_top_k=attn_top_k)
    return Extraction(full=full, sub=sub, tasks=tasks, usage=usage, usage_source=source, kept=kept)


def with_top_k(model: ModelConfig, moe: MoEConfig, *, top_k: int = 0, attn_top_k: int = 0) -> MoEConfig:
    """The `moe` section of a submodel whose tokens route to `top_k` MLP experts and `attn_top_k` head experts
    (0 = as trained; each at most the trained k). The expert width is pinned first: by default it derives from
    top_k (`moe.expert_hidden=0`), and the experts keep their trained shapes."""
    for flag, value, trained in (("--top-k", top_k, moe.top_k), ("--attn-top-k", attn_top_k, moe.attn_top_k)):
        if not 0 <= value <= trained:
            raise ValueError(f"{flag} {value}: must be between 1 and the trained k ({trained}); 0 keeps it")
    if attn_top_k and not any(attn for attn, _ in moe_layout(moe.placement, backbone_size(model)["depth"])):
        raise ValueError(f"--attn-top-k {attn_top_k}: placement {moe.placement!r} has no MoE attention")
    hidden = moe_kwargs(model, moe)[0]["hidden_dim"]
    return replace(moe, expert_hidden=hidden, top_k=top_k or moe.top_k, attn_top_k=attn_top_k or moe.attn_top_k)


def make_submodel(full: PortableModel, tasks: list[str], kept: dict[str, list[int]], *, exact_routing: bool,
                  rule: dict | None = None, top_k: int = 0, attn_top_k: int = 0) -> PortableModel:
    """The submodel of `full` keeping experts `kept[layer]` (global ids) and the heads, router rows and
    task-embedding rows of `tasks`, routing to `top_k` / `attn_top_k` experts (0 = as trained), with its file
    metadata (eval mode)."""
    layers = routed_layers(full.model)
    model_cfg, moe_cfg, table = config_sections("metadata", full.meta)
    moe_cfg = with_top_k(model_cfg, moe_cfg, top_k=top_k, attn_top_k=attn_top_k)
    num_classes = {t: full.meta["num_classes"][t] for t in tasks}
    sub = build_submodel(model=model_cfg, moe=moe_cfg, tasks=table, task_names=tasks, num_classes=num_classes,
                         kept=kept, exact_routing=exact_routing)
    dtype = next(full.model.parameters()).dtype
    rows = [full.model.task_ids[t] for t in tasks]
    sub.to(dtype).load_state_dict(slice_state(full.model.state_dict(), sub, task_rows=rows, kept=kept))
    meta = {**{k: v for k, v in full.meta.items() if k not in ("format", "format_version", "kind")},
            "task_names": tasks, "task_ids": sub.task_ids, "num_classes": num_classes,
            "classes": {t: c for t, c in full.meta.get("classes", {}).items() if t in tasks}, "kept": kept,
            "num_experts_full": {n: m.num_experts for n, m in layers.items()}, "exact_routing": exact_routing,
            "rule": rule or {}, "moe": asdict(moe_cfg),
            "top_k_trained": {n: m.top_k for n, m in layers.items()}}
    return PortableModel(sub, meta).eval()


def save_submodel(extraction: Extraction, out: str | Path) -> Path:
    """Write the submodel file (`kind=submodel`): only the kept experts' tensors."""
    return write_file(out, extraction.sub.model.state_dict(), extraction.sub.meta, kind="submodel")
