"""How the 2-rank scripts report: a mismatch raises naming what differs (tensor, step, max abs diff), which makes the
rank exit non-zero and torchrun stop the other rank; success prints one `SUMMARY {json}` line that the test parses
and asserts on, then the old sentinel word (kept for tests that still look for it)."""

from __future__ import annotations

import json
import sys

import torch


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in float64 (0 for empty tensors; inf when the shapes differ)."""
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def emit(sentinel: str, **fields) -> None:
    """Print the summary line, then `sentinel`. Call on rank 0 only, after every check passed on every rank.

    Each line goes out in one write: under PYTHONUNBUFFERED `print` writes the text and the newline separately, and
    torchrun's tailer can read between the two and prefix the bare newline, gluing `[default0]:` to the JSON."""
    sys.stdout.write(f"SUMMARY {json.dumps(fields, sort_keys=True)}\n{sentinel}\n")
    sys.stdout.flush()
