"""Loss weighting, routing metrics and plots (small pure functions the trainer relies on)."""

import math

import numpy as np
import torch
from PIL import Image

from pretrain.training.objective import Objective
from pretrain.training.plots import plot_losses, plot_usage
from pretrain.training.routing_stats import mutual_information, routing_metrics


def test_fixed_weighting_and_aux():
    tl = Objective(tasks=["cls", "det"], weights={"cls": 2.0, "det": 0.5}, mode="fixed",
                  aux_weights={"mi": 0.1, "z": 0.0})
    losses = {"cls": {"cls": torch.tensor(1.0)}, "det": {"a": torch.tensor(2.0), "b": torch.tensor(4.0)}}
    total, parts = tl(losses, {"mi": torch.tensor(-3.0), "z": torch.tensor(7.0)})
    assert math.isclose(float(total), 2.0 * 1 + 0.5 * 6 + 0.1 * -3.0, rel_tol=1e-6)
    assert float(parts["loss/det"]) == 6.0 and float(parts["loss/det/b"]) == 4.0
    assert float(parts["aux/z"]) == 7.0  # logged unweighted even when its weight is 0


def test_mi_weight_schedule_cosine_to_final():
    from pretrain.config.pretraining import MoEConfig, OptimConfig, TaskConfig
    from pretrain.training.objective import build_objective

    moe = MoEConfig(w_mi=0.01, w_mi_start=0.5, w_mi_decay_steps=100)
    tl = build_objective({"cls": TaskConfig()}, OptimConfig(), moe)
    assert tl.aux_weight("mi", 0) == 0.5 and math.isclose(tl.aux_weight("mi", 50), 0.255, rel_tol=1e-9)
    assert tl.aux_weight("mi", 100) == tl.aux_weight("mi", 10**6) == tl.aux_weight("mi", None) == 0.01
    assert tl.aux_weight("cv", 0) == 0.0  # unscheduled keys keep their constant weight
    losses, aux = {"cls": {"cls": torch.tensor(1.0)}}, {"mi": torch.tensor(-2.0)}
    total, parts = tl(losses, aux, step=0)
    assert math.isclose(float(total), 1.0 - 0.5 * 2, rel_tol=1e-6) and parts["aux_weight/mi"] == 0.5
    assert math.isclose(float(tl(losses, aux)[0]), 1.0 - 0.01 * 2, rel_tol=1e-6)  # no step: the final weight
    constant = build_objective({"cls": TaskConfig()}, OptimConfig(), MoEConfig(w_mi=0.01))
    assert constant.aux_weight("mi", 0) == 0.01 and "aux_weight/mi" not in constant(losses, aux, step=0)[1]


def test_uncertainty_weighting_matches_modsquad():
    tl = Objective(tasks=["cls", "seg"], weights={}, mode="uncertainty", aux_weights={})
    with torch.no_grad():
        tl.sigma.copy_(torch.tensor([2.0, 0.5]))
    total, _ = tl({"cls": {"cls": torch.tensor(3.0)}, "seg": {"seg": torch.tensor(1.0)}}, {})
    expected = 0.5 / 4 * 3 + math.log(1 + 4) + 0.5 / 0.25 * 1 + math.log(1 + 0.25)
    assert math.isclose(float(total.detach()), expected, rel_tol=1e-6)
    total.backward()
    assert tl.sigma.grad is not None and torch.all(tl.sigma.grad != 0)


def test_mutual_information():
    # tasks use disjoint experts, balanced → MI = log 2; independent → 0
    assert math.isclose(mutual_information(torch.tensor([[5.0, 5, 0, 0], [0, 0, 5, 5]])), math.log(2), rel_tol=1e-9)
    assert abs(mutual_information(torch.tensor([[1.0, 2, 3], [2.0, 4, 6]]))) < 1e-12
    m = routing_metrics({"l0": torch.tensor([[4.0, 0, 0, 0], [1.0, 1, 1, 1]])}, ["cls", "det"])
    assert m["moe/max_load/cls"] == 1.0 and m["moe/entropy/cls"] == 0.0
    assert math.isclose(m["moe/entropy/det"], 1.0, rel_tol=1e-9)


def _pixels(path):
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype="float32"))


def test_plots_draw_the_data(tmp_path):
    """Loss curves: one coloured line per task; usage: a heatmap per layer whose cells follow the usage shares."""
    records = [{"step": s, "loss/cls": 2.0 / (s + 1), "loss/det": 1.0} for s in range(20)]
    curves = _pixels(plot_losses(records, tmp_path / "loss.png"))
    colourful = (curves.max(dim=2).values - curves.min(dim=2).values) > 60  # matplotlib's blue/orange lines
    assert colourful.sum() > 200  # two lines were drawn, not an empty frame
    assert plot_losses([{"step": 1, "lr": 0.1}], tmp_path / "none.png") is None  # no loss keys: no plot
    one_hot = torch.zeros(3, 8)
    one_hot[0, 0] = one_hot[1, 3] = one_hot[2, 7] = 1.0  # each task on one expert
    uniform = torch.ones(3, 8)
    a = _pixels(plot_usage({"l": one_hot.numpy()}, ["cls", "det", "seg"], tmp_path / "a.png"))
    b = _pixels(plot_usage({"l": uniform.numpy()}, ["cls", "det", "seg"], tmp_path / "b.png"))
    assert a.shape == b.shape and not torch.equal(a, b)  # the heatmap depends on the usage it shows
