"""`pretrain export`: a run's checkpoint → one portable safetensors file (see `pretrain.runs.portable`).

Works for any ep_size, ZeRO stage, precision and MoE backend: the non-expert weights come from DeepSpeed's
`mp_rank_00_model_states.pt` (read weights-only: ZeRO-1/2 save the full module there), the experts from the tag's
`experts_ep*.safetensors` (every expert under its global id). DeepSpeed-backend layers are converted to the native
stacked layout (`experts.w1[g] = fc1.weight.t()`, `routing.router` → `router`), so the file always loads into the
native, dropless `MoEMlp`. The result is checked by loading it strictly into a freshly built native model.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from pretrain.config.load import load_config, stage_of_file
from pretrain.config.pretraining import RunConfig
from pretrain.runs.checkpoint import META, MODEL_FILE, ExpertFiles
from pretrain.runs.integrity import tag_step
from pretrain.runs.portable import DTYPES, PortableModel, check_out, config_metadata, decode_meta, write_file

logger = logging.getLogger(__name__)

# a run directory of another stage (`config.STAGE_SECTIONS`): what it is, and what export/extract take instead
OTHER_RUNS = {"finetune": "a fine-tuning run: export and extract take pretraining runs",
              "add_task": "an add-task run: its result is the model file it wrote (add_task.out), which extract "
                          "takes"}
_NATIVE_RE = re.compile(r"(.+)\.experts\.(w1|b1|w2|b2)\.(\d+)$")
_DS_RE = re.compile(r"(.+)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.([02])\.(weight|bias)$")
# DeepSpeed expert (Linear index, param) → native stacked name, and whether the Linear weight is transposed
_DS_TO_NATIVE = {("0", "weight"): ("w1", True), ("0", "bias"): ("b1", False), ("2", "weight"): ("w2", True),
                 ("2", "bias"): ("b2", False)}


def _expert_slices(files: ExpertFiles) -> dict[tuple[str, str], dict[int, Tensor]]:
    """(layer, native param) → {global id: tensor in the native layout} from either backend's expert keys."""
    found: dict[tuple[str, str], dict[int, Tensor]] = {}
    for key in sorted(files.keys()):
        if m := _NATIVE_RE.match(key):
            layer, param, gid = m.group(1), m.group(2), int(m.group(3))
            value = files.read(key)
        elif m := _DS_RE.match(key):
            layer, gid = m.group(1), int(m.group(2))
            param, transpose = _DS_TO_NATIVE[(m.group(3), m.group(4))]
            value = files.read(key)
            value = value.t() if transpose else value
        else:
            raise ValueError(f"{files.tag_dir}: unrecognised expert tensor {key!r}")
        found.setdefault((layer, param), {})[gid] = value
    return found


def stacked_experts(tag_dir: Path, num_experts: int) -> dict[str, Tensor]:
    """`<layer>.experts.<param>` [E, ...] for every MoE MLP layer; raises naming missing files or experts."""
    meta = json.loads((tag_dir / META).read_text()) if (tag_dir / META).is_file() else {}
    missing_files = [f"experts_ep{r}.safetensors" for r in range(int(meta.get("ep_size", 1)))
                     if not (tag_dir / f"experts_ep{r}.safetensors").is_file()]
    if missing_files:
        raise FileNotFoundError(f"checkpoint {tag_dir} is missing expert files {missing_files} (saved with ep_size="
                                f"{meta.get('ep_size')})")
    with ExpertFiles(tag_dir) as files:
        slices = _expert_slices(files)
    out = {}
    for (layer, param), by_id in slices.items():
        absent = sorted(set(range(num_experts)) - set(by_id))
        if absent:
            raise FileNotFoundError(f"checkpoint {tag_dir}: experts {absent} of {layer} ({param}) are in no "
                                    f"experts_ep*.safetensors")
        out[f"{layer}.experts.{param}"] = torch.stack([by_id[g] for g in range(num_experts)])
    return out


def native_module_state(module_state: dict[str, Tensor], experts: dict[str, Tensor]) -> dict[str, Tensor]:
    """DeepSpeed's saved module state → the native model's state dict: local expert slices replaced by the stacked
    global ones, DeepSpeed-backend keys renamed (`<layer>.routing.x` → `<layer>.x`), the objective dropped."""
    layers = {key.rsplit(".experts.", 1)[0] for key in experts}
    out = {}
    for key, value in module_state.items():
        layer = next((name for name in layers if key.startswith(name + ".")), None)
        if key.startswith("objective."):
            continue  # loss weights: a training concern, not part of a model file
        if layer is None:
            out[key] = value
            continue
        rest = key[len(layer) + 1:]
        if rest.startswith(("experts.", "deepspeed_moe.")):
            continue  # rank 0's local experts (native) / DeepSpeed's expert modules: replaced by `experts`
        out[f"{layer}.{rest.removeprefix('routing.')}"] = value
    return {**out, **experts}


def class_lists(run_dir: Path, cfg: RunConfig, data_root: str | None) -> tuple[dict[str, int], dict[str, object]]:
    """Class counts and lists of the run's tasks: those the run saved at its start (`classes.json`), or, for a run
    that saved none or when `--data-root` is given, its train shards' `_info.json`."""
    from pretrain.data.build import check_shards, load_class_lists

    saved = None if data_root else load_class_lists(run_dir)
    if saved is not None:
        return saved
    try:
        spec = check_shards(cfg.data, cfg.tasks)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}; the run saved no class lists ({run_dir}/classes.json): pass --data-root "
                                f"with the folder that holds its shards now") from None
    return spec.num_classes, spec.classes


def consolidate(run_dir: str | Path, *, step: int | None = None, dtype: str | None = None,
                data_root: str | None = None) -> PortableModel:
    """`run_dir`'s checkpoint at `step` (default: latest) as the model a portable file holds (native layout, every
    expert, eval mode, `dtype`) with that file's metadata.

    Args:
        dtype: `fp32` | `bf16` (default: the run's training precision).
        data_root: where the run's shards are now (default: the run's `data.root`), for class counts and lists.
    Raises FileNotFoundError naming a missing config, checkpoint, step or expert file.
    """
    from pretrain.models import build_model
    from pretrain.runs.load import find_tag

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no config.yaml in it")
    stage = stage_of_file(run_dir / "config.yaml")
    if stage:
        raise ValueError(f"{run_dir} is {OTHER_RUNS[stage]} (evaluate it with `pretrain evaluate {run_dir}`)")
    root = [f"data.root={data_root}"] if data_root else []
    cfg = load_config(run_dir / "config.yaml", [f"output_dir={run_dir}", *root])
    dtype = dtype or cfg.engine.precision
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    tag_dir = find_tag(run_dir / "checkpoints", step)
    if not (tag_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {tag_dir} has no {MODEL_FILE}")
    module_state = torch.load(tag_dir / MODEL_FILE, map_location="cpu", weights_only=True)["module"]
    state = native_module_state(module_state, stacked_experts(tag_dir, cfg.moe.num_experts))
    counts, classes = class_lists(run_dir, cfg, data_root)
    moe = replace(cfg.moe, backend="native")
    model = build_model(model=replace(cfg.model, upcycle_from=""), moe=moe, tasks=cfg.tasks, num_classes=counts)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"checkpoint {tag_dir} does not match the run's model: missing {result.missing_keys[:8]}, "
                           f"unexpected {result.unexpected_keys[:8]}")
    model.to(DTYPES[dtype])
    meta = {**config_metadata(model=cfg.model, moe=moe, tasks=cfg.tasks), "task_names": list(model.task_ids),
            "task_ids": model.task_ids, "num_classes": counts, "classes": classes, "dtype": dtype,
            "step": tag_step(tag_dir),
            "source": {"run_dir": str(run_dir.resolve()), "tag": tag_dir.name, "backend": cfg.moe.backend,
                       "ep_size": cfg.engine.ep_size, "zero_stage": cfg.engine.zero_stage,
                       "precision": cfg.engine.precision, "data_root": cfg.data.root}}
    return PortableModel(model, decode_meta({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
                                            )).eval()


def export_run(run_dir: str | Path, out: str | Path, *, step: int | None = None, dtype: str | None = None,
               data_root: str | None = None) -> Path:
    """Consolidate `run_dir`'s checkpoint (see `consolidate`) into the portable file `out`; returns its path."""
    check_out(out)  # an unwritable --out fails before the checkpoint is read
    full = consolidate(run_dir, step=step, dtype=dtype, data_root=data_root)
    path = write_file(out, full.model.state_dict(), full.meta, kind="model")
    logger.info("exported %s (step %d, %s) to %s", run_dir, full.meta["step"], full.meta["dtype"], path)
    return path
