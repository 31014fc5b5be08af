"""Full decode/verify of an image file, once, at conversion time.

Converters store the original bytes (never re-encoded); this module is where those bytes are proven decodable, so
training never meets a truncated or empty file. The storage key (``jpg``/``png``) comes from the magic bytes, not
the file name: the ImageNet release contains a PNG named ``.JPEG``.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pretrain.prepare.paths import NOT_REGULAR, file_kind
from pretrain.prepare.pngcheck import PNG_MAGIC, PngDamage, verify_png

logger = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
# Extensions a converter treats as images; anything else in an image folder is a stray file (.DS_Store, .txt).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


class ImageError(Exception):
    """A file that cannot be stored as a sample: ``reason`` is a short stable code, ``detail`` a human message."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)  # both in args so the exception survives pickling from a worker
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class CheckedImage:
    """Original file bytes that decoded fully, with the facts learned while decoding.

    Attributes:
        data: the file's bytes, unchanged.
        ext: sample key the bytes belong under, ``"jpg"`` or ``"png"`` (from the magic bytes).
        width, height: decoded size in pixels (before any EXIF rotation, as COCO/ADE annotations assume).
        mode: PIL mode of the decoded image (``RGB``, ``L``, ``CMYK``, ``P``, ...).
    """

    data: bytes
    ext: str
    width: int
    height: int
    mode: str


def sniff_format(data: bytes) -> str | None:
    """Return ``"jpg"`` or ``"png"`` from the first bytes, or None for anything else."""
    if data.startswith(JPEG_MAGIC):
        return "jpg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return None


def read_bytes(path: Path) -> bytes:
    """Read a whole regular file; anything else (FIFO, socket, device, directory) raises ImageError
    ``not_a_regular_file`` without being opened, and unreadable files (dangling link, permissions, I/O error)
    raise ImageError ``unreadable``.

    The converter skeleton already refused such files while listing (``SourceTree.refusal``); this is the second
    check at the moment of reading, for a file replaced in between: the open is non-blocking (a FIFO swapped in
    cannot hang the worker) and the descriptor itself must be a regular file.
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(NOT_REGULAR, f"{path} is {file_kind(mode)}, not a regular file: not opened")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ImageError(NOT_REGULAR, f"{path} is {file_kind(mode)}, not a regular file: not read")
            return f.read()
    except OSError as err:
        raise ImageError("unreadable", f"{path}: {type(err).__name__}: {err}") from None


def decode_image(data: bytes, *, name: str) -> tuple[CheckedImage, Image.Image]:
    """Decode ``data`` completely (``load()``, not ``verify()``) and return it with the loaded PIL image.

    A PNG is first checked chunk by chunk (CRCs, full inflate: ``pngcheck.verify_png``), which PIL does not do.

    Args:
        data: raw file bytes.
        name: file name used in error messages.
    Returns:
        (CheckedImage, PIL image of size width x height). Raises ImageError on empty, non-JPEG/PNG,
        truncated or otherwise undecodable input.
    """
    if not data:
        raise ImageError("empty_file", f"{name}: file is empty")
    ext = sniff_format(data)
    if ext is None:
        raise ImageError("unsupported_format", f"{name}: not a JPEG or PNG (starts with {data[:8].hex()})")
    if ext == "png":
        try:
            verify_png(data, name=name)
        except PngDamage as err:
            raise ImageError(err.reason, err.detail) from None
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is not a decode failure; real datasets have a few very large images.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError:  # its message embeds a BytesIO address: keep skipped.jsonl reproducible
        raise ImageError("decode_error", f"{name}: cannot identify image file (corrupt header)") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageError("decode_error", f"{name}: {type(err).__name__}: {err}") from None
    if image.width <= 0 or image.height <= 0:
        raise ImageError("decode_error", f"{name}: zero-sized image {image.width}x{image.height}")
    return CheckedImage(data=data, ext=ext, width=image.width, height=image.height, mode=image.mode), image


def load_image(path: Path, *, name: str) -> CheckedImage:
    """Read and fully decode one image file; raises ImageError with a reason code when it cannot be stored."""
    checked, _ = decode_image(read_bytes(path), name=name)
    return checked


def load_label_png(path: Path, *, name: str, max_value: int) -> tuple[CheckedImage, np.ndarray]:
    """Read a label map that must be an 8-bit single-channel (``L``) PNG with values in ``0..max_value``.

    Palette (``P``) or RGB label PNGs are refused rather than converted: converting would silently change ids.

    Returns:
        (CheckedImage with the unchanged bytes, uint8 array [H, W] of label ids).
    """
    checked, image = decode_image(read_bytes(path), name=name)
    if checked.ext != "png":
        raise ImageError("bad_label_format", f"{name}: label map must be a PNG, found {checked.ext}")
    if checked.mode != "L":
        raise ImageError("bad_label_format", f"{name}: label PNG must be 8-bit one-channel (L), found {checked.mode}")
    labels_HW = np.asarray(image, dtype=np.uint8)
    top = int(labels_HW.max())
    if top > max_value:
        raise ImageError("label_out_of_range", f"{name}: label value {top} > {max_value}")
    return checked, labels_HW


def try_load_image(job: tuple[Path, str]) -> CheckedImage | ImageError:
    """Worker-pool form of :func:`load_image` on a ``(path, name)`` job: the error is returned, not raised, so one
    bad file never aborts the pool."""
    path, name = job
    try:
        return load_image(path, name=name)
    except ImageError as err:
        return err
