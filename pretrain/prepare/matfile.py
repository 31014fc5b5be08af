"""How many bytes of arrays a MATLAB v5 `.mat` file holds, read from its element tags before scipy decodes it.

`scipy.io.loadmat` allocates every array a file declares: a compressed `.mat` of a few hundred kB can hold a
20000x20000 LabelMap (0.4-0.8 GB) that is only found to be the wrong size afterwards. The PASCAL-Context converter calls
`check_mat_size` first, as images meet a pixel limit before any decoder (`pretrain.data.decode`).

Layout (MATLAB's "MAT-File Format", level 5): a 128-byte header whose last two bytes are `IM` (little-endian) or
`MI` (big-endian), then top-level data elements, each an 8-byte tag (type, byte count) and its bytes: `miMATRIX`
(type 14, padded to 8 bytes) or `miCOMPRESSED` (type 15, a zlib stream holding one `miMATRIX` element). A tag whose
upper 16 bits are set is a small element (4 bytes of data inside the tag).
"""

from __future__ import annotations

import struct
import zlib

from pretrain.prepare.images import ImageError

MI_MATRIX, MI_COMPRESSED = 14, 15
HEADER_BYTES = 128
# what a label file of an H x W image may hold, per image pixel: a LabelMap is one H x W array (at most float64);
# PASCAL-Part's annotation holds a mask per object and per part (hundreds in a crowded image)
BYTES_PER_PIXEL = {"labelmap": 16, "parts": 1024}
MIN_LIMIT = 1 << 20  # headers, names and struct overhead of a small image's file
_CHUNK = 1 << 20


def _inflated_size(stream: memoryview, limit: int) -> int:
    """Bytes the zlib `stream` inflates to, counted chunk by chunk (never held) and only up to just past `limit`:
    the element's own tag could understate what follows it."""
    inflater, total, pending = zlib.decompressobj(), 0, stream
    while pending and total <= limit:
        total += len(inflater.decompress(pending, _CHUNK))
        pending = inflater.unconsumed_tail
    return total


def declared_bytes(data: bytes, limit: int) -> int | None:
    """Bytes of the top-level elements of a level-5 `.mat` (for a compressed one, the larger of what its inner tag
    declares and what it inflates to, counted up to just past `limit`); None for a file without a level-5 header
    (level 4, 7.3 = HDF5, or not a .mat: scipy's own reader decides). The walk stops at an element of another type
    (a damaged file, also scipy's to report)."""
    if len(data) < HEADER_BYTES or data[126:128] not in (b"IM", b"MI") or data.startswith(b"MATLAB 7.3"):
        return None
    order = "<" if data[126:128] == b"IM" else ">"
    view, total, pos = memoryview(data), 0, HEADER_BYTES
    while pos + 8 <= len(data) and total <= limit:
        kind, nbytes = struct.unpack_from(order + "II", data, pos)
        if kind >> 16:  # a small element: its data is inside the tag
            pos += 8
            continue
        if kind not in (MI_MATRIX, MI_COMPRESSED):
            break
        body = view[pos + 8:pos + 8 + nbytes]
        if kind == MI_COMPRESSED:
            head = zlib.decompressobj().decompress(body, 8)  # the inner element's tag only
            inner = struct.unpack(order + "II", head)[1] if len(head) == 8 else 0
            total += max(8 + inner, _inflated_size(body, limit - total))
            pos += 8 + nbytes
        else:
            total += 8 + nbytes
            pos += 8 + nbytes + (-nbytes % 8)
    return total


def check_mat_size(data: bytes, name: str, image_hw: tuple[int, int], role: str) -> None:
    """Raise ImageError `too_large` when the `.mat` holds more than its `role` allows for an `image_hw` image
    (`BYTES_PER_PIXEL`, at least `MIN_LIMIT`); nothing is decoded or allocated for the arrays."""
    limit = max(MIN_LIMIT, BYTES_PER_PIXEL[role] * image_hw[0] * image_hw[1])
    try:
        size = declared_bytes(data, limit)
    except (zlib.error, struct.error) as err:
        raise ImageError("unreadable_mat", f"{name}: damaged element ({type(err).__name__}: {err})") from None
    if size is not None and size > limit:
        raise ImageError("too_large", f"{name} holds at least {size} bytes of arrays, over the {limit}-byte limit "
                         f"for its {image_hw[1]}x{image_hw[0]} image: skipped before decoding")
