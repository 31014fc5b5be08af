"""Structural check of a PNG file: every chunk's CRC, and the whole IDAT zlib stream inflated to its exact size.

Written here because PIL's ``load()`` does not check the CRC of IDAT chunks and stops inflating once it has the
pixels it needs, so a PNG with a flipped bit in a CRC, or trailing damage in the zlib stream, decodes "fine" there
and fails in another reader (or in a later PIL). Chunk layout (PNG spec §5.3): 4-byte big-endian length, 4-byte
type, data, 4-byte CRC-32 over type + data.
"""

from __future__ import annotations

import struct
import zlib

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class PngDamage(ValueError):
    """A structurally damaged PNG: ``reason`` is ``png_crc`` or ``decode_error``, ``detail`` a human message."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel
# Adam7 passes: (x start, y start, x step, y step)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _raw_size(width: int, height: int, bit_depth: int, colour_type: int, interlace: int) -> int:
    """Bytes of the filtered scanlines (one filter byte per row) the IDAT stream must inflate to."""
    bits = bit_depth * _CHANNELS[colour_type]

    def rows(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * bits + 7) // 8)

    if interlace == 0:
        return rows(width, height)
    return sum(rows((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in _ADAM7)


def _chunks(data: bytes, name: str) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk up to IEND; PngDamage ``png_crc`` on a CRC mismatch, ``decode_error`` when
    the chunk structure is truncated or IEND is missing."""
    pos, chunks = len(PNG_MAGIC), []
    while True:
        if pos + 8 > len(data):
            raise PngDamage("decode_error", f"{name}: PNG truncated (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length + 4
        if end > len(data):
            raise PngDamage("decode_error", f"{name}: PNG chunk {kind!r} at byte {pos} runs past the end of file")
        body = data[pos + 8:end - 4]
        (crc,) = struct.unpack(">I", data[end - 4:end])
        if zlib.crc32(kind + body) != crc:
            raise PngDamage("png_crc", f"{name}: CRC mismatch in PNG chunk {kind.decode('latin-1')!r} at byte {pos}")
        chunks.append((kind, body))
        if kind == b"IEND":
            return chunks
        pos = end


def verify_png(data: bytes, *, name: str) -> None:
    """Check chunk CRCs and inflate the IDAT stream completely; raise PngDamage (``png_crc`` / ``decode_error``).

    Args:
        data: the file's bytes (starting with the PNG signature).
        name: file name used in error messages.
    """
    chunks = _chunks(data, name)
    if chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise PngDamage("decode_error", f"{name}: PNG does not start with a 13-byte IHDR chunk")
    width, height, bit_depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if colour_type not in _CHANNELS or interlace not in (0, 1):
        raise PngDamage("decode_error", f"{name}: bad PNG header (colour type {colour_type}, interlace {interlace})")
    inflater = zlib.decompressobj()
    size = 0
    try:
        for kind, body in chunks:
            if kind == b"IDAT":
                size += len(inflater.decompress(body))
        size += len(inflater.flush())
    except zlib.error as err:
        raise PngDamage("decode_error", f"{name}: damaged PNG zlib stream: {err}") from None
    if not inflater.eof:
        raise PngDamage("decode_error", f"{name}: PNG zlib stream ends early (truncated IDAT data)")
    expected = _raw_size(width, height, bit_depth, colour_type, interlace)
    if size != expected:
        raise PngDamage("decode_error", f"{name}: PNG pixel data inflates to {size} bytes, header implies {expected}")
