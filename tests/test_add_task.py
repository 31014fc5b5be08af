"""Continual task addition (`pretrain add-task`, `models/grow.py`): after training added tasks, every old task's
outputs (cls, det, seg) on fixed inputs are bit for bit the trained model's, and so is every parameter and buffer
the old tasks read (routing statistics included); also after two additions one after the other, and through the
command (DeepSpeed engine, AdamW with weight decay) into one model file that `load_model` serves."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from harness import popen, run, signal_once_logging

from pretrain.config.load import load_config
from pretrain.config.pretraining import TaskConfig, task_order
from pretrain.models import build_model
from pretrain.models.grow import GrowingModel, GrownRows, grow, merged_state
from pretrain.models.grow_layers import grown_moe, layer_factories, limits_meta
from pretrain.models.moe_losses import collect_aux_losses, moe_modules

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.size=vit_debug", "model.drop_path=0.0", "model.det_min_size=64", "model.det_max_size=64",
        "model.pyramid_dim=32", "moe.num_experts=8", "moe.top_k=2", "moe.attn_num_experts=8", "moe.attn_top_k=2",
        "moe.router_init=normal", "moe.noisy=true", "moe.w_mi=0.05", "model.task_embed_init=randn",
        "tasks.cls.num_classes=5", "tasks.det.num_classes=3", "tasks.seg.num_classes=4"]
STATS = ("usage_TE", "mi_probs_TE", "mi_counts_TE")


def trained_model():
    """A tiny model standing in for a trained one: random weights and non-zero routing statistics."""
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    net = build_model(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks)
    for _, layer in moe_modules(net):
        for name in STATS:
            getattr(layer, name).uniform_(0.5, 2.0)
    return cfg, net.eval()


def images(size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def outputs(net, tasks) -> dict:
    """Each task's eval outputs on fixed images, as a flat {name: tensor}."""
    net.eval()
    out = {}
    with torch.no_grad():
        for task in tasks:
            kind = net.kinds[task]
            pred = net(task, images(64 if kind == "det" else 32, seed=len(task)))
            if kind == "det":
                out.update({f"{task}.{i}.{k}": v for i, p in enumerate(pred) for k, v in p.items()})
                task_B = torch.full((2,), net.task_ids[task], dtype=torch.long)
                pred = net.backbone(net.normalize(images(64, 1)), task_B)  # boxes may be few: the features too
            out[task] = pred
    return out


def old_reads(net, old_tasks) -> dict:
    """Every tensor an old task reads, in the ordinary layout: all but the added tasks' rows and heads."""
    rows = max(net.task_ids[t] for t in old_tasks) + 1
    state = merged_state(net)
    keep = {}
    for key, value in state.items():
        if key.startswith("heads.") and key.split(".")[1] not in old_tasks:
            continue
        per_task = key.endswith(("router.weight", "router.noise_weight", "task_embed")) or key.endswith(STATS)
        keep[key] = value[:rows].clone() if per_task else value.clone()
    return keep


def train_new(net, new_tasks: list[str], steps: int = 3) -> None:
    """A few AdamW steps with weight decay on the added tasks' losses + MI (as the command's engine takes them)."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    net.train()
    for step in range(steps):
        task = new_tasks[step % len(new_tasks)]
        targets = torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(step))
        loss = sum(net(task, images(32, 10 + step), targets).values())
        loss = loss + 0.05 * sum(v for k, v in collect_aux_losses(net).items() if k.endswith("mi"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def reload(net, cfg, table: dict, new_experts: int = 0) -> torch.nn.Module:
    """The grown model as `load_model` rebuilds it: the ordinary constructor (with the layers of its `task_experts`
    metadata, grown by `new_experts` in all) + the merged state."""
    moe = grown_moe(cfg.model, cfg.moe, new_experts)
    layers = layer_factories({"task_experts": limits_meta(net)}, task_order(table), moe)
    plain = build_model(model=cfg.model, moe=moe, tasks=table, **layers)
    plain.load_state_dict(merged_state(net))
    return plain.eval()


def same_old_reads(grown: dict, trained: dict) -> bool:
    """Every tensor an old task read is, in the grown model's, its leading block (rows of the old tasks, columns
    of the old experts, the old experts), bit for bit; what the old tasks' rows hold for added experts is zero."""
    if grown.keys() != trained.keys():
        return False
    for key, value in trained.items():
        block = grown[key][tuple(slice(0, n) for n in value.shape)]
        if not torch.equal(block, value):
            return False
        if grown[key].dim() >= 2 and key.endswith(("router.weight", "router.noise_weight", *STATS)):
            if grown[key][: value.shape[0], value.shape[1]:].abs().sum() != 0:
                return False
    return True


def seg_task(classes: int = 3) -> TaskConfig:
    return TaskConfig(head="fpn", num_classes=classes, img_size=32)


@pytest.mark.slow  # builds and trains models: 5-25 s on 2 loaded cores
@pytest.mark.parametrize("new_experts", [0, 2])
def test_old_tasks_are_bit_identical_after_adding_one_and_then_another(new_experts):
    cfg, net = trained_model()
    old = list(net.task_ids)
    before, reads = outputs(net, old), old_reads(net, old)
    grown = grow(net, model=cfg.model, moe=cfg.moe, tasks=cfg.tasks, new_tasks={"seg2": seg_task()},
                 num_classes={}, start_from={"seg2": "seg"}, new_experts=new_experts)
    assert grown.task_ids == {"cls": 0, "det": 1, "seg": 2, "seg2": 3} and grown.kinds["seg2"] == "seg"
    trainable = {n for n, p in grown.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("heads.seg2.") or n.endswith(".new") or ".new_experts." in n
                             or ".new_heads." in n for n in trainable)
    assert any(".new_experts." in n for n in trainable) == any(".new_heads." in n for n in trainable) == \
        (new_experts > 0)
    first_new = {n: p.detach().clone() for n, p in grown.named_parameters() if p.requires_grad}
    train_new(grown, ["seg2"])
    changed = {n for n, p in grown.named_parameters() if p.requires_grad and not torch.equal(first_new[n], p)}
    assert changed and (new_experts == 0 or any(".new_experts." in n for n in changed))
    table = {**cfg.tasks, "seg2": seg_task()}
    once = reload(grown, cfg, table, new_experts)
    for tensors in (old_reads(grown, old), old_reads(once, old)):
        assert same_old_reads(tensors, reads)
    after = outputs(once, old)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(v, after[k]) for k, v in outputs(grown, old).items())
    seg2_before = outputs(once, ["seg2"])
    assert torch.equal(seg2_before["seg2"], outputs(grown, ["seg2"])["seg2"])
    if new_experts:  # seg2 routes to the added experts; the old tasks' usage rows never count them
        usage = [m.usage_TE for _, m in moe_modules(once)]
        assert all(u.shape[1] == 8 + new_experts and u[3, 8:].sum() > 0 and u[:3, 8:].sum() == 0 for u in usage)
    # a second addition (two tasks at once: another seg and a cls) treats seg2 as an old task too
    added = {"seg3": seg_task(5), "cls2": TaskConfig(head="project", num_classes=7, img_size=32)}
    moe_once = grown_moe(cfg.model, cfg.moe, new_experts)
    twice = grow(once, model=cfg.model, moe=moe_once, tasks=table, new_tasks=added, num_classes={},
                 new_experts=new_experts, limits=limits_meta(once))
    train_new(twice, ["seg3"])
    final = reload(twice, cfg, {**table, **added}, 2 * new_experts)
    assert final.task_ids["seg3"] == 4 and final.task_ids["cls2"] == 5
    again = outputs(final, [*old, "seg2"])
    assert all(torch.equal(again[k], v) for k, v in {**before, **seg2_before}.items())
    assert outputs(final, ["cls2"])["cls2"].shape == (2, 7)
    if new_experts:  # per layer: the first tasks see 8 experts, seg2 8 + N, the second addition's 8 + 2N
        layer = moe_modules(final)[0][1]
        assert layer.task_experts == [8, 8, 8, 8 + new_experts, 8 + 2 * new_experts, 8 + 2 * new_experts]


def test_grown_rows_read_like_the_tensor_and_only_the_new_part_trains():
    rows = torch.randn(4, 3, 2)
    grown = GrownRows(rows, 3)
    assert grown.shape == rows.shape and torch.equal(grown.full(), rows)
    assert torch.equal(grown[1], rows[1]) and torch.equal(grown[3], rows[3])
    assert torch.equal(grown[torch.tensor([3, 0, 3])], rows[[3, 0, 3]])
    assert not grown.old.requires_grad and grown.new.requires_grad
    with pytest.raises(ValueError, match="num_old=4"):
        GrownRows(rows, 4)


def test_the_engine_module_exempts_the_trained_task_embedding_rows_from_weight_decay():
    cfg = load_config(None, [*TINY, "model.task_embed_init=zero", "model.size=vit_debug", "model.pyramid_dim=8"])
    net = build_model(model=cfg.model, moe=cfg.moe, tasks={"cls": cfg.tasks["cls"]})
    grown = grow(net, model=cfg.model, moe=cfg.moe, tasks={"cls": cfg.tasks["cls"]}, num_classes={},
                 new_tasks={"cls2": TaskConfig(head="project", num_classes=3)})
    names = {n for n, p in GrowingModel(grown).named_parameters() if p.requires_grad}
    assert GrowingModel(grown).no_weight_decay() & names == {"model.backbone.task_embed.new"}


@pytest.mark.slow  # builds and trains models: 2-20 s on 2 loaded cores
def test_adding_a_task_name_the_model_has_is_refused():
    cfg, net = trained_model()
    with pytest.raises(ValueError, match=r"already has task\(s\) \['seg'\]"):
        grow(net, model=cfg.model, moe=cfg.moe, tasks=cfg.tasks, new_tasks={"seg": seg_task()}, num_classes={})
    cfg_off = replace(cfg, tasks={**cfg.tasks, "det": replace(cfg.tasks["det"], enabled=False)})
    with pytest.raises(ValueError, match="det"):  # a disabled task still owns its rows
        grow(net, model=cfg.model, moe=cfg.moe, tasks=cfg_off.tasks, new_tasks={"det": seg_task()}, num_classes={})


# ---- the command: DeepSpeed engine in children, one model file, exact resume, bad inputs --------------------------

def add_task_config(path: Path, shards: Path, out_dir: Path, tasks: str) -> Path:
    path.write_text(f"output_dir: {out_dir}\ndata: {{root: {shards}, num_workers: 0, shuffle_buffer: 8}}\n"
                    f"add_task: {{start: kind}}\ntasks:\n{tasks}"
                    "optim: {lr: 1.0e-2, warmup_steps: 0, weight_decay: 0.1}\n"
                    "train: {max_steps: 4, ckpt_every: 2, log_every: 1, eval_every: 0}\n"
                    "logging: {wandb: disabled, plots: false}\n")
    return path


SEG2 = "  seg2: {shards: ade20k/train, batch_size: 2, img_size: 32, head: fpn}\n"
CLS2 = "  cls2: {shards: imagenet/train, batch_size: 2, img_size: 32, head: project}\n"


def add_task(model: Path, config: Path, *overrides: str):
    out = run([sys.executable, "-m", "pretrain", "add-task", str(model), str(config), *overrides], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def served(path: Path, tasks: list[str]) -> dict:
    from pretrain.runs.portable import load_model

    return outputs(load_model(path).model, tasks)


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_shm_op")
def test_add_task_command_keeps_old_tasks_resumes_exactly_and_grows_twice(shards, tmp_path):
    from test_extract import native_run

    from pretrain.cli import main as cli_main
    from pretrain.runs.portable import load_model

    native_run(tmp_path / "run", shards, "tasks.det.num_classes=0")
    model = tmp_path / "m.safetensors"
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(model)]) == 0
    old = ["cls", "det", "seg"]
    before = served(model, old)
    # 2 new experts per MoE layer (MLP and attention heads) train with seg2
    straight = add_task_config(tmp_path / "a.yaml", shards, tmp_path / "a", SEG2)
    add_task(model, straight, "add_task.new_experts=2")
    # from the run directory, stopped at step 2 and resumed: the same file bit for bit
    split = add_task_config(tmp_path / "b.yaml", shards, tmp_path / "b", SEG2)
    add_task(tmp_path / "run", split, "train.max_steps=2", "add_task.new_experts=2")
    resumed = add_task(tmp_path / "run", split, "add_task.new_experts=2")
    assert "resumed from step 2" in resumed.stderr
    a, b = (load_model(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    assert a.model.state_dict().keys() == b.model.state_dict().keys()
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    assert a.tasks == [*old, "seg2"] and a.meta["added"][0]["tasks"] == ["seg2"]
    assert a.meta["moe"]["num_experts"] == a.meta["moe"]["attn_num_experts"] == 10
    assert a.meta["task_experts"]["mlp"] == {t: 8 for t in old}
    after = served(tmp_path / "a" / "model.safetensors", [*old, "seg2"])
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # seg2 started from seg's head and rows (same shards, same 150 classes) and trained away from them
    assert after["seg2"].shape == after["seg"].shape and not torch.equal(after["seg2"], after["seg"])
    # a second addition, to the grown file, with 1 more expert: seg2 is an old task now
    second = add_task_config(tmp_path / "c.yaml", shards, tmp_path / "c", CLS2)
    add_task(tmp_path / "a" / "model.safetensors", second, "train.max_steps=2", "add_task.new_experts=1")
    final = load_model(tmp_path / "c" / "model.safetensors")
    assert final.tasks == [*old, "seg2", "cls2"] and len(final.meta["added"]) == 2
    assert final.meta["task_experts"]["attn"] == {**{t: 8 for t in old}, "seg2": 10}
    again = outputs(final.model, [*old, "seg2"])
    assert all(torch.equal(again[k], v) for k, v in after.items() if k != "cls2")
    assert final(images(32, 0), task="cls2").shape == (2, final.meta["num_classes"]["cls2"])


BAD = [  # (what, MODEL, tasks section, override, message)
    ("a pretraining task's name", "model", "  seg: {shards: ade20k/train, head: fpn}\n", (),
     "tasks.seg: every pretraining model already has a task 'seg'"),
    ("an added task's name", "grown", SEG2, (), "already has a task 'seg2'"),
    ("two added tasks of one kind", "model", SEG2 + "  seg3: {shards: ade20k/train, head: upernet}\n", (),
     "a second seg task in one run"),
    ("a head no kind has", "model", "  seg2: {shards: ade20k/train, head: mlore}\n", (),
     "an added task's head must be one of"),
    ("a file that is not safetensors", "garbage", SEG2, (), "not a safetensors file"),
    ("a safetensors file from elsewhere", "foreign", SEG2, (), "not a pretrain model file"),
    ("a folder that is not a run", "folder", SEG2, (), "is not a run directory"),
    ("a submodel file", "submodel", SEG2, (), "is a submodel file: tasks are added to a whole pretraining model"),
    ("bf16", "model", SEG2, ("engine.precision=bf16",), "engine.precision='bf16' is out of range: must be fp32"),
    ("missing shards", "model", SEG2, (), "shards/ade20k/train"),
    ("a start evaluation", "model", SEG2, ("eval.at_start=true",), "eval.at_start=True is out of range: must be false"),
]


@pytest.mark.slow  # builds and trains models: 2-20 s on 2 loaded cores
@pytest.mark.parametrize(("what", "source", "tasks", "overrides", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_one_line_and_exit_2(what, source, tasks, overrides, message, tmp_path, cli):
    from safetensors.torch import save_file

    from pretrain.runs.portable import config_metadata, write_file

    cfg, net = trained_model()
    meta = {**config_metadata(model=cfg.model, moe=cfg.moe, tasks=cfg.tasks), "task_names": list(net.task_ids),
            "num_classes": {}, "dtype": "fp32", "step": 1}
    paths = {"model": tmp_path / "m.safetensors", "garbage": tmp_path / "g.safetensors",
             "foreign": tmp_path / "f.safetensors", "folder": tmp_path, "grown": tmp_path / "grown.safetensors"}
    paths["submodel"] = tmp_path / "s.safetensors"
    if source in ("model", "submodel"):
        write_file(paths[source], net.state_dict(), meta, kind=source)
    elif source == "grown":
        grown = grow(net, model=cfg.model, moe=cfg.moe, tasks=cfg.tasks, new_tasks={"seg2": seg_task()},
                     num_classes={})
        table = {**cfg.tasks, "seg2": seg_task()}
        write_file(paths["grown"], merged_state(grown), {**meta, **config_metadata(
            model=cfg.model, moe=cfg.moe, tasks=table), "task_names": list(grown.task_ids)}, kind="model")
    elif source == "garbage":
        paths["garbage"].write_text("not a model")
    elif source == "foreign":
        save_file({"w": torch.zeros(2)}, str(paths["foreign"]))
    config = add_task_config(tmp_path / "x.yaml", tmp_path / "shards", tmp_path / "out", tasks)
    code, err = cli("add-task", paths[source], config, *overrides)
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("pretrain add-task: error:"), err
    assert message in errors[0] and "Traceback" not in err, err


def test_a_pretraining_config_is_named_as_one(cli):
    code, err = cli("add-task", "m.safetensors", ROOT / "configs/debug/pretrain.yaml")
    assert code == 2 and "is a pretraining config" in err and "pretrain train" in err


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_shm_op")
def test_a_signal_checkpoints_exits_75_and_the_same_command_resumes(shards, tmp_path):
    from test_extract import native_run

    from pretrain.cli import main as cli_main
    from pretrain.training.signals import EXIT_REQUEUE

    native_run(tmp_path / "run", shards)
    model = tmp_path / "m.safetensors"
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(model)]) == 0
    config = add_task_config(tmp_path / "s.yaml", shards, tmp_path / "s", SEG2)
    cmd = [sys.executable, "-m", "pretrain", "add-task", model, config, "train.max_steps=200", "train.ckpt_every=100"]
    proc = popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = signal_once_logging(proc, tmp_path / "s" / "metrics.jsonl", wait=300, timeout=300)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    stopped_at = int((tmp_path / "s" / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 0 < stopped_at < 100 and not (tmp_path / "s" / "model.safetensors").exists()
    again = add_task(model, config, f"train.max_steps={stopped_at + 2}", "train.ckpt_every=100")
    assert f"resumed from step {stopped_at}" in again.stderr
    before, after = served(model, ["cls", "det", "seg"]), served(tmp_path / "s" / "model.safetensors", ["cls"])
    assert torch.equal(before["cls"], after["cls"])


def test_a_limited_task_routes_like_the_layer_it_was_trained_in():
    """`grow_layers.LimitedMoEMlp`: a task limited to the first 4 of 6 experts computes what a 4-expert layer with the
    same weights computes, bit for bit (one task per batch); in a mixed batch it still never picks experts 4, 5."""
    from pretrain.models.grow_layers import LimitedMoEMlp
    from pretrain.models.moe import MoEMlp

    torch.manual_seed(0)
    kwargs = {"dim": 16, "hidden_dim": 8, "top_k": 2, "num_tasks": 2, "router_init": "normal", "noisy": True}
    grown = LimitedMoEMlp(num_experts=6, task_experts=[4, 6], **kwargs).eval()
    small = MoEMlp(num_experts=4, **kwargs).eval()
    with torch.no_grad():
        small.router.weight.copy_(grown.router.weight[:, :4])
        small.router.noise_weight.copy_(grown.router.noise_weight[:, :4])
        for name, param in small.experts.named_parameters():
            param.copy_(getattr(grown.experts, name)[:4])
    x = torch.randn(3, 5, 16)
    assert torch.equal(grown(x, torch.zeros(3, dtype=torch.long)), small(x, torch.zeros(3, dtype=torch.long)))
    routing = grown.route(x, torch.tensor([0, 1, 0]))
    picked = routing.idx_SK.view(3, 5, 2)
    assert picked[[0, 2]].max() < 4 and routing.probs_SE.shape == (15, 6)
    assert (routing.probs_SE.view(3, 5, 6)[[0, 2], :, 4:] == 0).all()


@pytest.mark.slow  # builds tiny models: 2-5 s on 2 loaded cores
def test_the_measurement_baselines_train_everything_from_the_trained_or_the_random_weights():
    """`add_task.baseline` (RESULTS.md only): `full` trains every parameter from the trained weights, `scratch` from
    the model's random init; the addition itself trains only the new rows, experts and head."""
    cfg, net = trained_model()
    common = {"model": cfg.model, "moe": cfg.moe, "tasks": cfg.tasks, "new_tasks": {"seg2": seg_task()},
              "num_classes": {}, "new_experts": 1}
    trained_w = net.state_dict()["backbone.patch_embed.proj.weight"]
    for baseline, same in (("full", True), ("scratch", False)):
        torch.manual_seed(1)
        grown = grow(net, baseline=baseline, **common)
        assert all(p.requires_grad for p in grown.parameters())
        assert torch.equal(grown.state_dict()["backbone.patch_embed.proj.weight"], trained_w) == same
    added = grow(net, **common)
    assert sum(p.numel() for p in added.parameters() if p.requires_grad) < sum(p.numel() for p in added.parameters())
