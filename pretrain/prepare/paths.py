"""Source-tree safety: names read from annotation/list files stay inside ``--src``; directory walks never follow
directory symlinks.

Confinement is lexical (``os.path.normpath``), not ``realpath``: a file name such as ``../../x`` or ``/etc/passwd``
in a JSON or list file is refused before anything is opened, while a dataset whose folders are symlinks to another
disk (``ln -s /data/coco/train2017``) still converts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

OUTSIDE_SRC = "outside_src"
SYMLINKED_DIR = "symlinked_dir"


def confined(src: Path, *parts: str) -> Path | None:
    """``src/part/...`` when the joined path stays inside ``src`` after normalising ``..`` and absolute parts,
    else None (the caller skips the entry with reason ``outside_src`` without reading it)."""
    base = os.path.normpath(os.path.abspath(src))
    joined = os.path.normpath(os.path.join(base, *parts))
    if joined == base or not joined.startswith(base.rstrip(os.sep) + os.sep):
        return None
    return Path(joined)


@dataclass(frozen=True)
class Entry:
    """One directory entry as a walk sees it: ``is_dir`` is False for a link (to a directory or not)."""

    name: str
    path: str
    is_dir: bool


def _is_dir(entry: os.DirEntry, *, follow: bool) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow)
    except OSError:  # a looping link raises ELOOP here (os.scandir only swallows ENOENT)
        return False


def scan(folder: Path) -> tuple[list[Entry], list[Entry]]:
    """Entries of ``folder`` sorted by name, split into (entries to use, directory symlinks to skip).

    A directory symlink is never followed (a link to a parent would loop or list a folder twice); a dangling or
    looping symlink is not a directory and comes back as an ordinary entry (reading it later fails as
    ``unreadable``).
    """
    use, links = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_symlink() and _is_dir(entry, follow=True):
            links.append(Entry(entry.name, entry.path, False))
        else:
            use.append(Entry(entry.name, entry.path, _is_dir(entry, follow=False)))
    return use, links
