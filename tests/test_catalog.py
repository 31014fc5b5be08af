"""The catalog (`pretrain/catalog.py`) is the one place a dataset or dense task is described: every per-concern table
has exactly one entry per record, the facts two tables once disagreed on hold, and a toy dense dataset added in this
file (a catalog record + its code: a decoder row, a converter stub, a loss and a meter) flows through the config, the
dense sample path, the decoder's shapes and Δm without any other package file changing."""

from __future__ import annotations

import io
import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain import catalog
from pretrain.cli import build_parser, main
from pretrain.config import finetuning as ft_config
from pretrain.config.checks import ConfigError
from pretrain.config.load import load_config
from pretrain.config.pretraining import TASKS
from pretrain.data import dense_decode
from pretrain.data.dense import collate_dense
from pretrain.data.dense_transforms import transform_dense
from pretrain.data.sources import TASK_IDS
from pretrain.demo import RAW_DIRS
from pretrain.finetune import evaluate, losses
from pretrain.metrics.edges import EDGE_DATASETS
from pretrain.metrics.multitask import PRIMARY, delta_m, primary_metrics
from pretrain.prepare import PREPARERS
from pretrain.synth import FOLDERS, LAYOUTS
from pretrain.synth.draw import DATASET_CODES

DENSE = catalog.dense_datasets()


def _prepare_choices() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return list(next(a for a in sub.choices["prepare"]._actions if a.dest == "dataset").choices)


def test_every_dataset_table_has_one_entry_per_record():
    names = list(catalog.DATASETS)
    for table in (PREPARERS, LAYOUTS, FOLDERS, RAW_DIRS, DATASET_CODES):
        assert list(table) == names, table
    assert _prepare_choices() == names
    assert TASK_IDS == {d.stream: d.id for d in catalog.DATASETS.values()}
    assert ft_config.choices()["data.dataset"] == tuple(DENSE) == tuple(dense_decode.DENSE_DATASETS)
    assert set(EDGE_DATASETS) == {n for n in DENSE if "edge" in catalog.DATASETS[n].tasks}
    assert catalog.pretraining_tasks() == TASKS


def test_every_dense_task_table_has_one_entry_per_record():
    tasks = set(catalog.DENSE_TASKS)
    eval_labels = {label for d in catalog.DATASETS.values() for label in d.eval_labels.values()}
    assert set(dense_decode.DENSE_TASKS) == tasks | eval_labels and not tasks & eval_labels
    for table in (evaluate.DENSE_METERS, losses.LOSSES, PRIMARY["new"], PRIMARY["old"]):
        assert set(table) == tasks, table
    assert ft_config.DENSE_TASKS == tuple(catalog.DENSE_TASKS)


def test_dense_records_are_complete():
    for name in DENSE:
        d = catalog.DATASETS[name]
        assert set(d.tasks) <= set(catalog.DENSE_TASKS), name
        for task in d.tasks:  # a class map without a fixed width takes the dataset's class count
            assert catalog.out_channels(task, name) >= 1
        for protocol in catalog.PROTOCOLS:
            for split in catalog.SPLITS:
                assert min(d.size(protocol, split)) >= 16
        assert d.edge_max_dist is not None and d.old_scale_rotate is not None
    for name, row in dense_decode.DENSE_TASKS.items():  # the decoder rows pad as the records say
        record = catalog.DENSE_TASKS.get(name)
        if record is not None:
            assert (row.channels, row.fill, row.index_map) == (record.channels, record.fill, record.index_map)


def test_facts_once_written_twice_keep_the_values_the_code_computed_with():
    # streams seeded nyud with 3 (data.sources), the synthetic corpus drew it with code 4 (synth.draw): both stay
    assert TASK_IDS == {"cls": 0, "det": 1, "seg": 2, "nyud": 3, "pascal_context": 4}
    assert DATASET_CODES == {"imagenet": 1, "coco": 2, "ade20k": 3, "nyud": 4, "pascal_context": 5}
    assert len(set(TASK_IDS.values())) == len(TASK_IDS)
    assert FOLDERS["nyud"] == "NYUDv2" and FOLDERS["pascal_context"] == "PASCALContext"
    assert PRIMARY["new"]["sal"] == ("maxF", False) and PRIMARY["old"]["sal"] == ("mIoU", False)
    assert {t: catalog.out_channels(t, "pascal_context") for t in catalog.DENSE_TASKS if t != "depth"} == {
        "semseg": 21, "human_parts": 7, "sal": 2, "normals": 3, "edge": 1}
    assert catalog.out_channels("depth", "nyud") == 1 and catalog.out_channels("semseg", "nyud") == 40


@pytest.mark.parametrize(("dataset", "protocol", "size"), [
    ("nyud", "new", (448, 576)), ("pascal_context", "new", (512, 512)), ("nyud", "old", (480, 640)),
    ("pascal_context", "old", (512, 512))])
def test_unset_sizes_are_the_dataset_own(dataset, protocol, size):
    """PASCAL once got NYUD's 448×576 when the config named no size; [0, 0] now means the dataset's own."""
    tasks = [f"tasks.{t}.enabled={t in catalog.DATASETS[dataset].tasks}" for t in catalog.DENSE_TASKS]
    cfg = load_config(None, [f"data.dataset={dataset}", f"data.protocol={protocol}", *tasks],
                      schema=ft_config.FinetuneConfig)
    assert ft_config.dense_size(cfg.data, "train") == ft_config.dense_size(cfg.data, "val") == size
    given = replace(cfg.data, train_size=(64, 96))
    assert ft_config.dense_size(given, "train") == (64, 96)


def test_half_set_size_is_a_config_error():
    with pytest.raises(ConfigError, match="data.train_size"):
        load_config(None, ["data.train_size=[0,64]"], schema=ft_config.FinetuneConfig)


# --- the toy: one dataset record, one task record, and the code that is truly new ------------------------------

TOY_TASK = catalog.DenseTask("toy_mask", index_map=False, channels=1, fill=0.0, out_channels=1,
                             primary={"new": "mae", "old": "mae"}, lower_is_better=True)
TOY = catalog.Dataset(name="toy", id=9, folder="Toy", tasks=("semseg", "toy_mask"), dense=True,
                      num_classes={"semseg": 3}, train_size=(32, 32), eval_size=(40, 48), old_size=(32, 32),
                      old_scale_rotate=catalog.ScaleRotate((0.0,), (1.0,), discrete=True), edge_max_dist=0.01)


class ToyMeter:
    """Mean absolute error of the toy map (the reducer is injected, as every meter's)."""

    def __init__(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64)

    def update(self, pred_B1HW: torch.Tensor, target_B1HW: torch.Tensor) -> None:
        self.sums += torch.tensor([float((pred_B1HW - target_B1HW).abs().sum()), target_B1HW.numel()])

    def sync(self, reduce) -> None:
        self.sums = reduce(self.sums)

    def compute(self) -> dict[str, float]:
        return {"mae": float(self.sums[0] / self.sums[1])}


def _decode_toy(sample, ds) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(sample["toy.npy"]), allow_pickle=False))[None]


@pytest.fixture
def toy(monkeypatch):
    converted = []
    monkeypatch.setitem(catalog.DATASETS, "toy", TOY)
    monkeypatch.setitem(catalog.DENSE_TASKS, "toy_mask", TOY_TASK)
    monkeypatch.setitem(dense_decode.DENSE_TASKS, "toy_mask",
                        dense_decode.DenseTask("toy.npy", _decode_toy, 1, 0.0, index_map=False))
    monkeypatch.setitem(losses.LOSSES, "toy_mask", lambda edge_pos_weight: lambda p, t: (p - t).abs().mean())
    monkeypatch.setitem(evaluate.DENSE_METERS, "toy_mask", evaluate.DenseMeter(lambda x: x, lambda cfg, nc: ToyMeter()))
    monkeypatch.setitem(PREPARERS, "toy", lambda src, out, split, **kw: converted.append((split, kw)))
    return converted


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_a_toy_dense_dataset_needs_no_other_file(toy, tmp_path):
    # the converter: `pretrain prepare toy` reaches it with the dense options
    assert main(["prepare", "toy", "--src", str(tmp_path), "--out", str(tmp_path / "out"), "--split", "val",
                 "--tasks", "toy_mask"]) == 0
    assert toy == [("val", toy[0][1])] and toy[0][1]["tasks"] == ["toy_mask"]

    # the config: the dataset and its new task are accepted, sizes default to the toy's, the decoder builds
    enabled = [f"tasks.{t}.enabled={t in TOY.tasks}" for t in catalog.DENSE_TASKS]
    cfg = load_config(None, ["data.dataset=toy", "model.size=vit_debug", *enabled], schema=ft_config.FinetuneConfig)
    assert ft_config.enabled_dense_tasks(cfg) == ["semseg", "toy_mask"]
    assert ft_config.dense_size(cfg.data, "val") == (40, 48)
    assert {t: catalog.out_channels(t, "toy") for t in TOY.tasks} == {"semseg": 3, "toy_mask": 1}

    # a sample: decoded, padded to the eval size, batched
    rng = np.random.default_rng(0)
    raw = {"__key__": "t0", "json": json.dumps({"id": "t0", "tasks": ["semseg", "toy_mask"]}).encode(),
           "jpg": _png(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)),
           "semseg.png": _png(rng.integers(0, 3, (24, 30), dtype=np.uint8)),
           "toy.npy": _npy(rng.random((24, 30), dtype=np.float32))}
    raw["png"] = raw.pop("jpg")
    decoded = dense_decode.decode_dense_sample(raw, dataset=catalog.DATASETS["toy"], tasks=TOY.tasks)
    out = transform_dense(decoded, rng=random.Random(0), size=ft_config.dense_size(cfg.data, "val"), train=False)
    batch = collate_dense([{**out, "key": "t0"}], dataset="toy")
    assert batch["targets"]["toy_mask"].shape == (1, 1, 40, 48) and batch["targets"]["semseg"].shape == (1, 40, 48)

    # the meter, the loss and Δm: the task's record names its metric and direction
    meter = evaluate.DENSE_METERS["toy_mask"].make(cfg, {})
    target = evaluate.crop(batch["targets"]["toy_mask"], batch["crop_box"][0].tolist())
    meter.update(target + 0.5, target)
    meter.sync(lambda x: x)
    scores = {"toy_mask": meter.compute(), "semseg": {"mIoU": 50.0}}
    values, lower = primary_metrics(scores, mode=cfg.data.protocol)
    assert values == {"toy_mask": pytest.approx(0.5), "semseg": 50.0} and lower == {"toy_mask"}
    assert delta_m(values, {"toy_mask": 1.0, "semseg": 50.0}, lower) == pytest.approx(25.0)
    loss = losses.build_losses(["toy_mask"], edge_pos_weight=0.9)["toy_mask"]
    assert float(loss(target + 1, target)) == pytest.approx(1.0)
