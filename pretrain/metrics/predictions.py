"""Write one image's dense predictions as files the official offline tools read (SEISM for edges, etc.).

Layout: `<out_dir>/<task>/<key>.png`, one file per task, at the ORIGINAL image size (pass `crop_box` to cut a padded
prediction back, as the reference `save_model_pred_for_one_task` does with centred padding). Encodings, matching the
reference's `get_output` + `astype(np.uint8)` (which truncates, it does not round):

| task | input | file |
|---|---|---|
| semseg, human_parts | int class map [H, W] (0..C−1, what the model predicts) | 8-bit L PNG of the class ids |
| sal | foreground probability [H, W] or [1, H, W] | 8-bit L PNG, trunc(prob·255) |
| edge | edge probability (sigmoid) [H, W] or [1, H, W] | 8-bit L PNG, trunc(prob·255) (SEISM reads v/255) |
| normals | normals [3, H, W], any scale | 8-bit RGB PNG, trunc((n/‖n‖ + 1)/2·255) |
| depth | metres [H, W] or [1, H, W] | 16-bit L PNG in millimetres, round(d·1000) clipped to 0..65535 |

Depth deviates from the reference (a `.mat` file with float depth): 16-bit PNG in mm is lossless to 0.5 mm and
readable without scipy; decode with `np.asarray(Image.open(p), dtype=np.float32) / 1000`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _plane(x: torch.Tensor, task: str) -> torch.Tensor:
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise ValueError(f"save_predictions: task {task!r} needs [H, W] or [1, H, W], got {tuple(x.shape)}")
    return x


def _encode_classes(x: torch.Tensor, task: str) -> Image.Image:
    x = _plane(x, task)
    if x.dtype.is_floating_point:
        raise ValueError(f"save_predictions: task {task!r} needs an integer class map, got {x.dtype} (argmax first)")
    if bool(((x < 0) | (x > 255)).any()):
        raise ValueError(f"save_predictions: task {task!r} class ids must lie in 0..255")
    return Image.fromarray(x.to(torch.uint8).numpy())


def _encode_probability(x: torch.Tensor, task: str) -> Image.Image:
    x = _plane(x, task).to(torch.float32)
    if bool(((x < 0) | (x > 1)).any()):
        raise ValueError(f"save_predictions: task {task!r} needs a probability in [0, 1]")
    return Image.fromarray((x * 255).to(torch.uint8).numpy())


def _encode_normals(x: torch.Tensor, task: str) -> Image.Image:
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"save_predictions: task {task!r} needs [3, H, W], got {tuple(x.shape)}")
    unit = torch.nn.functional.normalize(x.to(torch.float32), dim=0)
    rgb = ((unit + 1) * 255 / 2).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).contiguous().numpy())


def _encode_depth(x: torch.Tensor, task: str) -> Image.Image:
    mm = (_plane(x, task).to(torch.float64) * 1000).round().clamp(0, 65535)
    return Image.fromarray(mm.numpy().astype(np.uint16))


ENCODERS: dict[str, Callable[[torch.Tensor, str], Image.Image]] = {
    "semseg": _encode_classes,
    "human_parts": _encode_classes,
    "sal": _encode_probability,
    "edge": _encode_probability,
    "normals": _encode_normals,
    "depth": _encode_depth,
}


def save_predictions(
    out_dir: str | Path,
    key: str,
    preds: dict[str, torch.Tensor],
    *,
    crop_box: tuple[int, int, int, int] | None = None,
) -> dict[str, Path]:
    """Write one image's predictions, one PNG per task (see the module docstring for the encodings).

    Args:
        out_dir: root folder; files go to `<out_dir>/<task>/<key>.png` (folders created).
        key: image id, used as the file stem (no path separators).
        preds: {task: tensor} for ONE image, [H, W], [1, H, W] or [3, H, W] as the table says.
        crop_box: (top, left, height, width) of the original image inside a padded prediction (the loader's
            `crop_box` row); None when `preds` are already at the original size.

    Returns:
        {task: path written}.
    """
    if not key or "/" in key or "\\" in key or key in (".", ".."):
        raise ValueError(f"save_predictions: key {key!r} is not a plain file stem")
    written = {}
    for task, pred in preds.items():
        if task not in ENCODERS:
            raise ValueError(f"save_predictions: unknown task {task!r}; known: {sorted(ENCODERS)}")
        pred = pred.detach().cpu()
        if crop_box is not None:
            top, left, height, width = (int(v) for v in crop_box)
            if top < 0 or left < 0 or top + height > pred.shape[-2] or left + width > pred.shape[-1]:
                raise ValueError(f"save_predictions: crop_box {crop_box} outside {task!r} pred {tuple(pred.shape)}")
            pred = pred[..., top : top + height, left : left + width]
        path = Path(out_dir) / task / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        ENCODERS[task](pred, task).save(path)
        written[task] = path
    return written
