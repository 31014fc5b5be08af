"""Which checkpoint to load: the `latest` pointer, the size + checksum manifest of a tag, and the fallback to the
newest checkpoint that verifies when the one `latest` names is damaged.

At save time rank 0 lists the tag directory after every rank has written its files and records each file's size
and CRC-32 under `files` in `pretrain_meta.json`, before `latest` moves. On load, `select_tag` verifies the tag
`latest` names; if it is missing, truncated or corrupt, it warns (naming what was wrong) and takes the newest older
tag whose manifest verifies. A `latest` that leaves the checkpoint directory (`..`, a path, a link to elsewhere)
is damage like a missing tag. Tags written before manifests existed (no `files` key) are accepted as `latest`
unverified, and so are hand-made tags without a metadata file when no older tag verifies (a tag that lost its
metadata falls back to one that does); a fallback candidate must verify. CRC-32 (zlib, ~1 GB/s) finds
truncation and torn/bit-rotted writes; it is not a defence against tampering (loading never unpickles anyway).

Experts are also checked one by one: the rank that writes an expert file records the CRC-32 of every expert tensor
it held in memory, under the tensor's global key, in that file's safetensors metadata (`EXPERT_CRC_KEY`; the file
CRC above covers it), and every reader checks each expert it loads against it (`tensor_crc32`,
`checkpoint.ExpertFiles`). A file whose expert slices were exchanged (its file CRC recomputed, or written that way
by a faulty save) therefore fails naming the layer, the global expert id and the file, instead of loading a model
whose experts sit in the wrong slots.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.errors import CheckpointError, DiskFullError, PeerError, is_disk_full, one_line, peer_gone

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

LATEST = "latest"
META = "pretrain_meta.json"
TAG_RE = re.compile(r"step_(\d{8})$")
_CHUNK = 4 << 20
EXPERT_CRC_KEY = "crc32"  # safetensors metadata of an expert file: JSON {global tensor key: CRC-32 of its bytes}


def file_crc32(path: Path) -> int:
    """CRC-32 of a file, streamed in 4 MiB chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def tensor_crc32(t: Tensor) -> int:
    """CRC-32 of a tensor's bytes (contiguous, copied to CPU): the per-expert checksum. Two tensors of one dtype
    and shape have equal CRCs when their values are equal (and, with probability 1 - 2^-32, only then)."""
    import torch  # here, not at import: `pretrain status` and the drift check read manifests without torch

    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def build_manifest(tag_dir: Path) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} of every file in the tag directory except the metadata file itself."""
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != META)
    return {str(p.relative_to(tag_dir)): [p.stat().st_size, file_crc32(p)] for p in files}


def tag_size(tag_dir: Path) -> int:
    """Bytes of every file under `tag_dir` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file()) if tag_dir.is_dir() else 0


def read_meta(tag_dir: Path) -> dict:
    """The tag's `pretrain_meta.json`; raises CheckpointError naming the file when it is absent or unreadable."""
    path = tag_dir / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {tag_dir} is not a checkpoint written by `pretrain train`, or "
                              "its save never finished") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def tag_step(tag_dir: Path) -> int:
    """The step of a tag: from its name (`step_XXXXXXXX`), else from its metadata (a hand-made tag's name);
    CheckpointError naming the file when neither says."""
    if match := TAG_RE.match(tag_dir.name):
        return int(match.group(1))
    step = read_meta(tag_dir).get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise CheckpointError(f"{tag_dir / META}: no integer 'step' (got {step!r}), and {tag_dir.name!r} is not a "
                              "tag name like step_00001000")
    return step


def verify_tag(tag_dir: Path, *, require_meta: bool = True) -> str | None:
    """What is wrong with a tag directory (one phrase), or None when it verifies.

    Args:
        require_meta: a tag without `pretrain_meta.json` fails (an unfinished save); False accepts it unverified.
    """
    if not tag_dir.is_dir():
        return "the directory does not exist"
    if not (tag_dir / META).is_file() and not require_meta:
        return None
    try:
        meta = read_meta(tag_dir)
    except CheckpointError as exc:
        return str(exc)
    for name, (size, crc) in (meta.get("files") or {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size} (truncated or overwritten)"
        if file_crc32(path) != crc:
            return f"{name} fails its checksum (corrupted on disk)"
    return None


def _escapes(ckpt_dir: Path, tag: str) -> bool:
    """True when `tag` is not one plain entry of `ckpt_dir` (`..`, `.`, a path, a NUL) or is a link that resolves
    outside it: loading it would read something that is not one of this run's checkpoints."""
    if tag in (".", "..") or any(c in tag for c in "/\\\0"):
        return True
    return (ckpt_dir / tag).resolve().parent != ckpt_dir.resolve()


def read_pointer(ckpt_dir: Path) -> tuple[str | None, str | None]:
    """(tag named by `latest`, None) when it names an existing directory of `ckpt_dir`; (None, None) without a
    `latest` file; (tag or None, what is wrong) otherwise."""
    path = ckpt_dir / LATEST
    if not path.is_file():
        if path.is_dir() or path.is_symlink():  # a link to a directory, or dangling: not a pointer DeepSpeed reads
            return None, f"{path} is not a file holding a tag name"
        return None, None
    try:
        tag = path.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path} is unreadable or not text ({type(exc).__name__})"
    if not tag or _escapes(ckpt_dir, tag):
        return None, f"{path} holds {tag[:40]!r}, which leaves {ckpt_dir}: not a tag name like step_00001000"
    if not TAG_RE.match(tag) and not (ckpt_dir / tag).is_dir():
        return None, f"{path} holds {tag[:40]!r}, not a tag name like step_00001000"
    if not (ckpt_dir / tag).is_dir():
        return tag, f"{path} names tag {tag!r}, but {ckpt_dir / tag} does not exist"
    return tag, None


def committed_tags(ckpt_dir: Path, latest: str | None) -> list[str]:
    """`step_*` tags, newest first; only those up to `latest` when it is a step tag (newer ones never committed)."""
    tags = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)), reverse=True)
    return [t for t in tags if t <= latest] if latest and TAG_RE.match(latest) else tags


def select_tag(ckpt_dir: str | Path) -> str | None:
    """The tag to load: the one `latest` names if it verifies, else the newest older one that verifies (warning
    what was wrong; a `latest` tag without metadata is still taken when none does); None when there is no
    checkpoint (no `latest`). Raises CheckpointError naming every tag tried and its problem when none verifies."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    tag, problem = read_pointer(ckpt_dir)
    if tag is None and problem is None:
        return None
    unverified = None  # a tag without metadata: loaded only when no older tag verifies (see the docstring)
    if problem is None:
        problem = verify_tag(ckpt_dir / tag, require_meta=False)
        if problem is None and (ckpt_dir / tag / META).is_file():
            return tag
        if problem is None:
            # `pretrain train` writes the metadata before `latest` moves: a committed tag without it was damaged
            unverified, problem = tag, f"{META} is missing (removed, or not written by `pretrain train`)"
        problem = f"{tag}: {problem}"
    failures = [problem]
    for candidate in committed_tags(ckpt_dir, tag):
        if candidate == tag:
            continue
        why = verify_tag(ckpt_dir / candidate)
        if why is None:
            logger.warning("the newest checkpoint cannot be used (%s); falling back to %s", problem,
                           ckpt_dir / candidate)
            return candidate
        failures.append(f"{candidate}: {why}")
    if unverified is not None:
        logger.warning("loading %s unverified: it has no %s and no older checkpoint verifies", ckpt_dir / tag, META)
        return unverified
    raise CheckpointError(f"{ckpt_dir}: no checkpoint verifies ({'; '.join(failures)}): restore the files from a "
                          f"copy, or move {ckpt_dir} away to start the run from scratch")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def save_failure(exc: BaseException, ckpt_dir: Path, tag_dir: Path, *, remove: bool) -> CheckpointError | PeerError:
    """Describe a failed save and (`remove`: rank 0 only, so no rank deletes files a slower rank is still writing)
    remove its partial tag; when the disk filled, say how much space a checkpoint needs (the previous checkpoint's
    size, else what was written so far) and how much is free. A partial tag left behind is never loaded (`latest`
    does not name it) and the next save removes it."""
    written = tag_size(tag_dir)
    if remove:
        shutil.rmtree(tag_dir, ignore_errors=True)
    latest, problem = read_pointer(ckpt_dir)
    state = f"`latest` still names {latest}" if latest and not problem else "no earlier checkpoint was committed"
    if peer_gone(exc):  # this rank's files were fine: the cause is in the other rank's log
        return PeerError(f"{tag_dir}: saving the checkpoint stopped, another rank failed and left the job "
                         f"({one_line(exc)[:200]}); {'removed the partial checkpoint, ' if remove else ''}{state}; "
                         "the failing rank's error is in the run directory's logs/rank<N>.log")
    if not is_disk_full(exc):
        return CheckpointError(f"{tag_dir}: saving the checkpoint failed ({type(exc).__name__}: "
                               f"{one_line(exc)[:300]}); removed the partial checkpoint, {state}")
    previous = tag_size(ckpt_dir / latest) if latest and not problem else 0
    needed = (f"about {_gib(previous)} (the size of {latest})" if previous else
              f"more than {_gib(written)} (what was written before the disk filled)")
    return DiskFullError(f"{tag_dir}: disk full while saving the checkpoint ({one_line(exc)[:200]}); removed the "
                         f"partial checkpoint, {state}. A checkpoint needs {needed}, {ckpt_dir} has "
                         f"{_gib(shutil.disk_usage(ckpt_dir).free)} free (a save holds train.keep_last checkpoints "
                         "plus the new one): free space or move output_dir, then rerun to resume")
