"""scripts/dense_reference_points.py: the constant and class-oracle predictions from per-class train sums (hand-made
sums), scored through the evaluation's meters (hand-computed metrics)."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("dense_reference_points", ROOT / "scripts" / "dense_reference_points.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def _stats() -> dict[str, torch.Tensor]:
    # class 0: 3 pixels at 2 m facing +z; class 1: 1 pixel at 6 m facing +x; class 2 never seen; row 3: unlabelled
    return {"depth_sum": torch.tensor([6.0, 6.0, 0.0, 0.0], dtype=torch.float64),
            "depth_n": torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64),
            "normal_sum": torch.tensor([[0, 0, 3.0], [1.0, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.float64),
            "normal_n": torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)}


def test_constant_and_class_oracle_from_the_sums():
    preds = ref.predictors(_stats())
    depth, normal = preds["constant"]
    assert torch.allclose(depth, torch.full((4,), 3.0, dtype=torch.float64))  # 12 m over 4 pixels
    assert torch.allclose(normal, torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64).div(math.sqrt(10)).expand(4, 3))
    depth, normal = preds["class_oracle"]
    assert depth.tolist() == pytest.approx([2.0, 6.0, 3.0, 3.0])  # unseen class and unlabelled: the train mean
    assert torch.allclose(normal[:2], torch.tensor([[0, 0, 1.0], [1.0, 0, 0]], dtype=torch.float64))
    assert torch.allclose(normal[2], preds["constant"][1][0])
