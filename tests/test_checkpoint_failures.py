"""A checkpoint save that fails (disk full, a permission error) removes its partial tag and leaves `latest` on the
previous good checkpoint, with one line that says so; and every committed tag's manifest lists each of its files with
size and CRC-32. Single process: `checkpoint.save` against a stand-in engine, the failure patched in where the
bytes are written (DeepSpeed's model file, the rank state).
"""

from __future__ import annotations

import errno
import json
import zlib
from pathlib import Path

import pytest
import torch

from pretrain import errors
from pretrain.runs import checkpoint
from pretrain.runs.integrity import META


class _FakeEngine:
    """What `checkpoint.save` uses of a DeepSpeed engine: save_checkpoint writes a model file like DeepSpeed's."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = model
        self.expert_data_parallel_group = {}

    def save_checkpoint(self, ckpt_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        (Path(ckpt_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), **client_state}, Path(ckpt_dir) / tag / checkpoint.MODEL_FILE)


class _OneProcess:
    """torch.distributed as `checkpoint.save` sees it in a single process."""

    @staticmethod
    def get_rank(group=None) -> int:
        return 0

    @staticmethod
    def get_world_size() -> int:
        return 1

    @staticmethod
    def barrier() -> None:
        return None

    is_available = is_initialized = staticmethod(lambda: False)


def _fail_at(monkeypatch, target: str, exc: BaseException) -> None:
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(target, fail)


SAVE_FAILURES = {  # name -> (function that fails, exception, error type, fragment)
    "enospc_in_model_file": ("torch.save", OSError(errno.ENOSPC, "No space left on device"), errors.DiskFullError,
                             "A checkpoint needs about"),
    "enospc_in_rank_state": ("pretrain.runs.rank_state.save_file", OSError(errno.ENOSPC, "No space left on device"),
                             errors.DiskFullError, "(the size of step_00000001)"),
    "zip_writer_full": ("torch.save", RuntimeError("PytorchStreamWriter failed writing file data/3: file write "
                                                   "failed"), errors.DiskFullError, "disk full while saving"),
    "permission": ("pretrain.runs.rank_state.save_file", PermissionError(errno.EACCES, "Permission denied"),
                   errors.CheckpointError, "saving the checkpoint failed (PermissionError"),
}


@pytest.mark.parametrize("name", list(SAVE_FAILURES))
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, name):
    target, exc, kind, fragment = SAVE_FAILURES[name]
    monkeypatch.setattr(checkpoint, "tdist", _OneProcess)
    model = torch.nn.Linear(3, 2)
    engine = _FakeEngine(model)
    ckpt = tmp_path / "ckpt"
    checkpoint.save(engine, ckpt, 1, client_state={"step": 1}, rank_state={"x": torch.ones(2)}, keep_last=2)
    with monkeypatch.context() as m:
        _fail_at(m, target, exc)
        with pytest.raises(kind, match="removed the partial checkpoint") as info:
            checkpoint.save(engine, ckpt, 2, client_state={"step": 2}, rank_state={"x": torch.ones(2)},
                            keep_last=2)
    assert fragment in str(info.value) and errors.describe(info.value, "train")[0] == kind.exit_code
    assert "`latest` still names step_00000001" in str(info.value)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000001"]
    restored = torch.nn.Linear(3, 2)
    assert checkpoint.load_model_weights(ckpt, restored) == ckpt / "step_00000001"
    assert torch.equal(restored.weight, model.weight)


def test_manifest_lists_every_file_with_size_and_crc(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "tdist", _OneProcess)
    tag = checkpoint.save(_FakeEngine(torch.nn.Linear(3, 2)), tmp_path, 4, client_state={}, rank_state={},
                          keep_last=1)
    files = json.loads((tag / META).read_text())["files"]
    assert sorted(files) == sorted(p.name for p in tag.iterdir() if p.name != META)
    for name, (size, crc) in files.items():
        data = (tag / name).read_bytes()
        assert size == len(data) and crc == zlib.crc32(data)
