"""Source-tree safety: every file a converter opens lies inside ``--src`` by its real path and is a regular file;
directory walks never follow directory symlinks.

Two checks, for two different mistakes:

- names read from annotation/list files (``file_name`` in COCO's JSON, ids in a split list) are confined lexically
  first (:func:`confined`): ``../../x`` or ``/etc/passwd`` is refused before anything is resolved;
- every path that will be opened is then resolved (:class:`SourceTree`): a symlink, to a file or a directory, that
  leads out of the real ``--src`` is refused (``outside_src``), and so is anything that is not a regular file
  (``not_a_regular_file``: a FIFO would block the reader forever, a device may act on being opened). Neither is
  opened. Symlinks that stay inside ``--src`` are fine, and ``--src`` itself may be a symlink (the check compares
  against its real path).

A hard link cannot be told apart from the file it links to: it is a real file under ``--src`` whatever other name
it has, so no check by path can call it "outside". Whoever can plant one can also copy the file there.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pretrain.prepare.shards import LayoutError

OUTSIDE_SRC = "outside_src"
SYMLINKED_DIR = "symlinked_dir"
NOT_REGULAR = "not_a_regular_file"

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def confined(src: Path, *parts: str) -> Path | None:
    """``src/part/...`` when the joined path stays inside ``src`` after normalising ``..`` and absolute parts,
    else None (the caller skips the entry with reason ``outside_src`` without reading it)."""
    base = os.path.normpath(os.path.abspath(src))
    joined = os.path.normpath(os.path.join(base, *parts))
    if joined == base or not joined.startswith(base.rstrip(os.sep) + os.sep):
        return None
    return Path(joined)


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, for a message ("a FIFO (named pipe)", "a directory", ...)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


class SourceTree:
    """The real path of one ``--src`` and the checks every path a converter opens goes through.

    The parent folders' real paths are cached: a release lists millions of files in a few thousand folders, and on a
    network file system each ``realpath`` costs one ``lstat`` per path component.
    """

    def __init__(self, src: Path) -> None:
        self.src = Path(src)
        self.real = os.path.realpath(src)
        self._dirs: dict[str, str] = {}

    def inside(self, real: str) -> bool:
        """True when the resolved path ``real`` is ``--src`` or below it."""
        return real == self.real or real.startswith(self.real.rstrip(os.sep) + os.sep)

    def resolve(self, path: Path | str) -> tuple[str, os.stat_result | None]:
        """The real path of ``path`` (symlinks followed as the kernel would) and its ``stat`` (None when it cannot
        be stat'ed: missing, a dangling or looping link, no permission; opening it then fails as ``unreadable``)."""
        parent, name = os.path.split(os.fspath(path))
        if name in ("", ".", ".."):
            real = os.path.realpath(path)
        else:
            if parent not in self._dirs:
                self._dirs[parent] = os.path.realpath(parent or ".")
            real = os.path.join(self._dirs[parent], name)
        try:
            st = os.lstat(real)
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(real)
                st = os.stat(real)
        except OSError:
            return real, None
        return real, st

    def refusal(self, path: Path | str) -> tuple[str, str] | None:
        """``(reason, detail)`` when ``path`` must not be opened, else None; nothing is opened to find out."""
        real, st = self.resolve(path)
        if not self.inside(real):
            # the target is not named: skipped.jsonl travels with the shards
            return OUTSIDE_SRC, f"{path} resolves outside --src {self.src} (a symlink out of it): not opened"
        if st is not None and not stat.S_ISREG(st.st_mode):
            return NOT_REGULAR, f"{path} is {file_kind(st.st_mode)}, not a regular file: not opened"
        return None

    def layout_dir(self, path: Path) -> Path:
        """``path``, a folder of the release layout; LayoutError when it resolves outside ``--src``."""
        real, _ = self.resolve(path)
        if not self.inside(real):
            raise LayoutError(f"{path} resolves outside --src {self.src} (a symlink out of it): pass the real "
                              "folder as --src; symlinks under --src must point inside it")
        return path

    def layout_file(self, path: Path) -> Path:
        """``path``, a file of the release layout read before conversion (annotations JSON, split list, class
        mapping); LayoutError when it resolves outside ``--src`` or is not a regular file."""
        why = self.refusal(path)
        if why is not None:
            raise LayoutError(f"{why[1]}; expected a regular file inside --src {self.src}")
        return path


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


def scan(folder: Path, tree: SourceTree) -> tuple[list[Entry], list[tuple[str, str, str]]]:
    """Entries of ``folder`` sorted by name, and the directory symlinks skipped as ``(name, reason, detail)``.

    A directory symlink is never followed (a link to a parent would loop or list a folder twice): one pointing out
    of ``--src`` is skipped as ``outside_src``, any other as ``symlinked_dir``. A dangling or looping symlink is not
    a directory and comes back as an ordinary entry (reading it later fails as ``unreadable``); a file symlink comes
    back as an entry too and is checked like every file before it is opened.
    """
    use, links = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_symlink() and _is_dir(entry, follow=True):
            if tree.inside(tree.resolve(entry.path)[0]):
                links.append((entry.name, SYMLINKED_DIR, "directory symlink (not followed)"))
            else:
                links.append((entry.name, OUTSIDE_SRC, "directory symlink out of --src (not followed)"))
        else:
            use.append(Entry(entry.name, entry.path, _is_dir(entry, follow=False)))
    return use, links
