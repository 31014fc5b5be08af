"""One constructor for a model and its submodels: every shipped pretraining config extracts (its backbone options
reach the submodel by construction), and every kind of submodel is a fine-tuning backbone."""

from pathlib import Path

import pytest
import torch
from test_extract import model_file

from pretrain.config.finetuning import FinetuneConfig
from pretrain.config.load import load_config
from pretrain.extraction.extract import extract_submodel, routed_layers, save_submodel
from pretrain.finetune.build import apply_trainable_
from pretrain.finetune.init import build_finetune_backbone
from pretrain.models import build_model
from pretrain.models.moe_routing import TaskRouter
from pretrain.models.submodel import build_submodel, slice_state
from pretrain.runs.portable import load_model, load_submodel, write_file

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")
                          if "finetune" not in p.as_posix() and p.name != "add_task.yaml")  # add-task: no model
CLASSES = {"cls": 7, "det": 3, "seg": 5}


def test_the_config_list_is_not_empty():
    assert "configs/pretrain/vitb16_modsquad_hetero.yaml" in PRETRAIN_CONFIGS
    assert "configs/debug/pretrain.yaml" in PRETRAIN_CONFIGS


def every_other_expert(full: torch.nn.Module) -> dict[str, list[int]]:
    """Half the experts of each layer (never fewer than its top-k)."""
    kept = {}
    for name, layer in routed_layers(full).items():
        ids = list(range(0, layer.num_experts, 2))
        kept[name] = ids if len(ids) >= layer.top_k else list(range(layer.top_k))
    return kept


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("config", PRETRAIN_CONFIGS)
def test_every_shipped_config_extracts_at_full_size(config, exact):
    """On the meta device (shapes only, no memory): the submodel's every tensor is a slice of the full model's with
    the shape the submodel expects, and every tensor outside the routed layers has the full model's shape."""
    cfg = load_config(ROOT / config)
    with torch.device("meta"):
        full = build_model(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks, num_classes=CLASSES)
        kept = every_other_expert(full)
        tasks = ["seg", "cls"]
        sub = build_submodel(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks, task_names=tasks,
                             num_classes={t: CLASSES[t] for t in tasks}, kept=kept, exact_routing=exact)
        state = slice_state(full.state_dict(), sub, task_rows=[full.task_ids[t] for t in tasks], kept=kept)
    full_state = full.state_dict()
    routed = tuple(f"backbone.{name}." for name in kept)
    outside = [k for k in state if not k.startswith(routed) and k != "backbone.task_embed"]
    assert outside and all(state[k].shape == full_state[k].shape for k in outside)
    assert sub.backbone.pos_embed.shape == full.backbone.pos_embed.shape  # model.img_size reached it
    for name, layer in routed_layers(sub).items():
        assert layer.num_experts == len(kept[name])


TINY = ["model.size=vit_debug", "model.drop_path=0.0", "model.det_min_size=64", "model.det_max_size=64",
        "model.pyramid_dim=32", "moe.num_experts=8", "moe.top_k=2", "moe.attn_num_experts=8", "moe.attn_top_k=2",
        "moe.router_init=normal", "tasks.cls.img_size=32", "tasks.det.img_size=64", "tasks.seg.img_size=32"]
# the options the hand-built submodel constructor used to drop (a crash on the flagship config)
OPTIONS = ["moe.dense_attn_head_dim=64", "model.img_size=96", "model.task_embed_init=randn", "moe.attn_head_dim=16"]


def portable(tmp_path: Path, *overrides: str):
    """A tiny three-task model file with random weights and usage (test_extract's), loaded as `pretrain extract`
    loads it."""
    return load_model(model_file(tmp_path / "full.safetensors", *overrides)[0])


@pytest.mark.parametrize("exact", [False, True])
def test_options_reach_the_submodel_and_keeping_everything_reproduces_the_model(tmp_path, exact):
    full = portable(tmp_path, *OPTIONS)
    extraction = extract_submodel(full, ["seg"], rule="topn", keep=8, exact_routing=exact)
    path = save_submodel(extraction, tmp_path / "seg.safetensors")
    sub = load_submodel(path)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(sub(x), full(x, task="seg"))


@pytest.fixture(scope="module")
def submodel_files(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    """Rule-based, exact-routing and multi-task submodel files of one tiny model."""
    tmp = tmp_path_factory.mktemp("submodels")
    full = portable(tmp)
    files = {}
    for tasks, exact in CASES:
        extraction = extract_submodel(full, tasks, rule="topn", keep=4, exact_routing=exact)
        files[",".join(tasks), exact] = save_submodel(extraction, tmp / f"{'_'.join(tasks)}_{exact}.safetensors")
    return files


CASES = [(["seg"], False), (["seg"], True), (["cls", "seg"], True), (["cls", "det", "seg"], False)]


@pytest.mark.parametrize("trainable", ["all", "decoder", "routers+decoder"])
@pytest.mark.parametrize("routing", ["per_task", "shared"])
@pytest.mark.parametrize(("tasks", "exact"), CASES)
def test_every_submodel_is_a_finetuning_backbone(submodel_files, tasks, exact, routing, trainable):
    """The fine-tuning backbone from a rule-based, an exact-routing and a multi-task submodel, with every routing and
    trainable choice: one training forward/backward reaches exactly the parameters `trainable` leaves trainable."""
    path = submodel_files[",".join(tasks), exact]
    cfg = load_config(None, [*TINY[:9], f"finetune.init_from={path}", f"finetune.routing={routing}",
                             f"finetune.trainable={trainable}", "finetune.router_from=seg"], schema=FinetuneConfig)
    dense = ["semseg", "depth"]
    vit, _ = build_finetune_backbone(cfg, dense)
    assert vit.num_tasks == (len(dense) if routing == "per_task" else 1)

    class Dense(torch.nn.Module):  # the backbone part of a DenseModel: `apply_trainable_` reads `.backbone`
        def __init__(self):
            super().__init__()
            self.backbone = vit

    holder = Dense()
    apply_trainable_(holder, trainable)
    routers = {id(p) for m in vit.modules() if isinstance(m, TaskRouter) for p in m.parameters()}
    for p in vit.parameters():
        expected = trainable == "all" or (trainable == "routers+decoder" and id(p) in routers)
        assert p.requires_grad == expected
    x = torch.randn(2, 3, 32, 32)
    out = vit.forward_features(x, torch.tensor([0, vit.num_tasks - 1]))
    if any(p.requires_grad for p in vit.parameters()):
        out.square().mean().backward()
        assert all(p.grad is not None for p in vit.parameters() if p.requires_grad and id(p) in routers)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("exact", [False, True])
def test_fewer_experts_per_token(tmp_path, exact):
    """`--top-k 1 --attn-top-k 1` of a k=2 model: the file rebuilds with k=1 and the trained expert width, computes
    what the full model computes when its layers route to one expert, and costs fewer FLOPs."""
    from pretrain.extraction.report import flops_per_image

    full = portable(tmp_path)
    extraction = extract_submodel(full, ["cls"], rule="topn", keep=8, exact_routing=exact, top_k=1, attn_top_k=1)
    sub = load_submodel(save_submodel(extraction, tmp_path / "cls_k1.safetensors"))
    assert all(layer.top_k == 1 for layer in routed_layers(sub.model).values())
    assert flops_per_image(sub.model, "cls", 32) < 0.9 * flops_per_image(full.model, "cls", 32)  # 0.80 measured
    for layer in routed_layers(full.model).values():
        layer.top_k = 1
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(sub(x), full(x, task="cls"), atol=1e-6, rtol=0)


def test_top_k_above_the_trained_k_is_refused(tmp_path):
    full = portable(tmp_path)
    with pytest.raises(ValueError, match=r"--top-k 3: must be between 1 and the trained k \(2\)"):
        extract_submodel(full, ["cls"], top_k=3)
    with pytest.raises(ValueError, match=r"--attn-top-k -1"):
        extract_submodel(full, ["cls"], attn_top_k=-1)


def test_forged_metadata_is_refused_before_anything_is_allocated(tmp_path):
    """A model file whose metadata promises 2048 experts per layer: one line naming a tensor and both shapes, from
    the meta-device build (the full build would allocate GBs first)."""
    import json

    full = portable(tmp_path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in full.meta.items()
            if k not in ("format", "format_version", "kind", "pretrain_version")}
    moe = json.loads(meta["moe"])
    meta["moe"] = json.dumps({**moe, "num_experts": 2048})
    path = write_file(tmp_path / "forged.safetensors", full.model.state_dict(), meta, kind="model")
    forged = r"forged.safetensors: tensors do not match .*\(3, 8\) \(metadata says \(3, 2048\)\)"
    with pytest.raises(ValueError, match=forged):
        load_model(path)
