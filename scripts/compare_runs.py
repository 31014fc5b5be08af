"""Did two training runs compute the same thing, to the last bit?

    .venv/bin/python scripts/compare_runs.py RUN_A RUN_B

Compares what the runs computed: every logged training row (`metrics.jsonl`: losses, auxiliary losses, lr, routing
statistics, task counts), every evaluation row (`eval.jsonl`), and every tensor of the latest checkpoint of each run
(model, experts, optimizer states, the torch RNG, the data stream's position), exactly. It is how a change that must
not alter behaviour is checked (issue 8's refactor against the commit before it, on the same shards: the
"Behaviour checks" section of benchmarks/RESULTS.md). Two runs of one commit on one machine are identical under it.

Not compared: wall-clock fields (`time`, throughput), and the Python/NumPy global RNG states a checkpoint keeps for
completeness: nothing seeds or draws from them, so they differ between any two processes. Checkpoint files are read
without unpickling code (safetensors; `torch.load(weights_only=True)`). Exit 0: identical; 1: a difference (the
first few are printed); 2: a run directory is missing something or a file cannot be read (one line naming it).
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from pretrain.errors import CheckpointError, one_line
from pretrain.models.upcycle import refused_global
from pretrain.parallel.engine import DS_SAFE_GLOBALS
from pretrain.runs.checkpoint import read_latest

WALL_CLOCK_KEYS, WALL_CLOCK_PREFIXES = {"time"}, ("img_per_s/",)  # they measure the machine, not the computation
UNSEEDED_RNG = ("rng.python", "rng.numpy")


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: not a JSON row ({exc})") from None
    return rows


def _computed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in WALL_CLOCK_KEYS and not k.startswith(WALL_CLOCK_PREFIXES)}


def _same_value(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _flatten(obj: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}.{i}")
    elif hasattr(obj, "__dict__") and not isinstance(obj, torch.Tensor):  # DeepSpeed's loss scaler: by its fields
        yield from _flatten(vars(obj), f"{prefix}.{type(obj).__name__}")
    else:
        yield prefix, obj


def _checkpoint(run: Path) -> dict[str, object]:
    """Every tensor and value of the run's latest checkpoint, keyed `file:path.to.leaf`."""
    name = read_latest(run / "checkpoints")  # CheckpointError: unreadable, or it names a missing tag
    if name is None:
        raise FileNotFoundError(f"{run / 'checkpoints' / 'latest'}: no checkpoint pointer")
    tag = run / "checkpoints" / name
    out: dict[str, object] = {}
    for f in sorted(tag.iterdir()):
        try:
            leaves = _leaves(f)
        except pickle.UnpicklingError as exc:  # weights_only refused a class: name it, not torch's preamble
            raise ValueError(f"{f}: refused to load, it pickles more than tensors ({refused_global(exc)})") from None
        except Exception as exc:  # safetensors, torch and json each raise their own kinds: name the file
            raise ValueError(f"{f}: cannot be read ({type(exc).__name__}: {one_line(exc)[:300]})") from None
        out.update((f"{f.name}:{k}", v) for k, v in leaves if not any(part in k for part in UNSEEDED_RNG))
    return out


def _leaves(f: Path) -> list[tuple[str, object]]:
    if f.suffix == ".safetensors":
        return list(load_file(f).items())
    if f.suffix == ".pt":
        with torch.serialization.safe_globals(DS_SAFE_GLOBALS):  # the few DeepSpeed classes resuming allows
            return list(_flatten(torch.load(f, map_location="cpu", weights_only=True)))
    if f.name.startswith("rank_") and f.suffix == ".json":
        return list(_flatten(json.loads(f.read_text())))
    return []  # pretrain_meta.json: sizes and CRCs of files whose content is compared here anyway


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return _same_value(a, b)


def _load(run: Path) -> dict[str, object]:
    """What a run computed: its training and evaluation rows and its latest checkpoint."""
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: not a run directory")
    return {"metrics.jsonl": _rows(run / "metrics.jsonl"), "eval.jsonl": _rows(run / "eval.jsonl"),
            "checkpoint": _checkpoint(run)}


def compare(run_a: Path, run_b: Path) -> list[str]:
    """The differences between two run directories (empty: identical in everything they computed)."""
    return _differences(_load(run_a), _load(run_b))


def _differences(a: dict, b: dict) -> list[str]:
    diffs = []
    for name in ("metrics.jsonl", "eval.jsonl"):
        rows_a, rows_b = a[name], b[name]
        if len(rows_a) != len(rows_b):
            diffs.append(f"{name}: {len(rows_a)} rows vs {len(rows_b)}")
        for ra, rb in zip(rows_a, rows_b):
            ca, cb = _computed(ra), _computed(rb)
            for key in sorted(set(ca) | set(cb)):
                if not _same_value(ca.get(key), cb.get(key)):
                    diffs.append(f"{name} step {ra.get('step')}: {key} {ca.get(key)!r} vs {cb.get(key)!r}")
    ck_a, ck_b = a["checkpoint"], b["checkpoint"]
    for key in sorted(set(ck_a) | set(ck_b)):
        if key not in ck_a or key not in ck_b:
            diffs.append(f"checkpoint {key}: only in {'the second' if key not in ck_a else 'the first'} run")
        elif not _equal(ck_a[key], ck_b[key]):
            diffs.append(f"checkpoint {key}: differs")
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args()
    try:
        a, b = _load(args.run_a), _load(args.run_b)
    except (OSError, ValueError, CheckpointError) as exc:
        print(f"compare_runs: {exc}", file=sys.stderr)
        return 2
    diffs = _differences(a, b)
    if diffs:
        print(f"{len(diffs)} differences; the first: " + "; ".join(diffs[:8]))
        return 1
    print(f"identical: {len(a['metrics.jsonl'])} training rows, {len(a['eval.jsonl'])} evaluation rows, "
          f"{len(a['checkpoint'])} checkpoint values")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
