"""Durable file writes: a file is either absent/old or complete, never partial, after a crash at any moment.

Used for every "this is complete" marker in the project: `_info.json` of a shard set, the checkpoint `latest`
pointer, the resolved `config.yaml`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """This process's umask, read without changing it (Linux `/proc`; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give a file the permissions a plain `open()` would have: safetensors creates every file 0600, so without this
    a colleague on a shared filesystem could not read an exported model or resume a run."""
    os.chmod(path, 0o666 & ~current_umask())


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` via a tmp file in the same directory, fsync, `os.replace`, then fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def check_writable(folder: str | Path) -> None:
    """Create `folder` (and its parents) and create and remove one file in it; raises the OSError a write there
    meets (EACCES, EROFS, ENOTDIR...). Only trying tells: root passes every permission bit, not a read-only mount."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".pretrain-write-check-")
    os.close(fd)
    os.unlink(name)
