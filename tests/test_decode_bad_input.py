"""Decoders on hostile bytes: damaged PNGs (which crash libpng), decompression bombs, invalid COCO boxes.

The crash-prone cases run in a subprocess: a regression to a decoder that segfaults shows up as a failed test
(return code -11), not as a dead pytest.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from harness import run
from PIL import Image

from pretrain.data.decode import (
    MAX_IMAGE_PIXELS,
    check_png,
    decode_det_sample,
    decode_mask,
    decode_rgb,
    jpeg_size,
    valid_coco_box,
)

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _chunk(ctype: bytes, body: bytes, *, crc: int | None = None) -> bytes:
    crc = zlib.crc32(ctype + body) if crc is None else crc
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", crc)


def _idat_span(data: bytes) -> tuple[int, int]:
    """(start of the IDAT body, its length) of a PNG with one IDAT chunk."""
    at = data.index(b"IDAT")
    return at + 4, struct.unpack(">I", data[at - 4:at])[0]


def bad_crc_png(arr: np.ndarray) -> bytes:
    """A PNG whose IDAT CRC is wrong (pixels intact): libpng aborts with SIGSEGV inside torchvision."""
    data = bytearray(_png(arr))
    start, n = _idat_span(bytes(data))
    data[start + n] ^= 0xFF
    return bytes(data)


def bad_zlib_png(arr: np.ndarray) -> bytes:
    """A PNG whose zlib stream is damaged but whose CRCs are all correct (a converter bug, or tampering)."""
    data = bytearray(_png(arr))
    start, n = _idat_span(bytes(data))
    for k in range(start + 10, start + n - 4, 7):
        data[k] ^= 0x5A
    data[start + n:start + n + 4] = struct.pack(">I", zlib.crc32(bytes(data[start - 4:start + n])))
    return bytes(data)


def png_bomb(width: int = 30000, height: int = 30000, colour: int = 2) -> bytes:
    """A few dozen bytes declaring width × height (its IDAT holds a few zero bytes; a real bomb would hold GBs)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    idat = zlib.compress(bytes(64))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)], timeout=300)


RGB = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
GREY = np.random.default_rng(1).integers(0, 40, (24, 32), dtype=np.uint8)


def test_damaged_pngs_raise_in_both_decoders() -> None:
    for make in (bad_crc_png, bad_zlib_png):
        with pytest.raises((ValueError, OSError, SyntaxError)):
            decode_rgb(make(RGB))
        with pytest.raises((ValueError, OSError, SyntaxError)):
            decode_mask(make(GREY))
    with pytest.raises(ValueError, match="IDAT.*CRC mismatch"):
        decode_rgb(bad_crc_png(RGB))


def test_damaged_pngs_kill_neither_the_process_nor_the_loaders(tmp_path: Path) -> None:
    """The exact bytes that segfaulted torchvision's libpng decoder, in a child process: straight into both
    decoders, then as two samples of a shard read by the eval and train loaders (both survive; 2 skips counted)."""
    rng = np.random.default_rng(2)
    samples = [{"__key__": f"good{i}", "png": _png(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)), "cls": b"1"}
               for i in range(6)]
    samples[1] = {**samples[1], "__key__": "badcrc", "png": bad_crc_png(RGB)}
    samples[4] = {**samples[4], "__key__": "badzlib", "png": bad_zlib_png(RGB)}
    with wds.TarWriter(str(tmp_path / "cls-000000.tar"), encoder=False) as sink:
        for s in samples:
            sink.write(s)
    info = {"num_samples": 6, "shards": ["cls-000000.tar"], "shard_lengths": [6], "num_classes": 5}
    (tmp_path / "_info.json").write_text(json.dumps(info))
    code = f"""
        import itertools, sys
        sys.path.insert(0, "tests")
        from test_decode_bad_input import RGB, GREY, bad_crc_png, bad_zlib_png
        from pretrain.data.decode import decode_mask, decode_rgb
        from pretrain.data.sources import make_eval_loader, make_train_loader
        for make in (bad_crc_png, bad_zlib_png):
            for fn, arr in ((decode_rgb, RGB), (decode_mask, GREY)):
                try:
                    fn(make(arr))
                    print("DECODED", make.__name__, fn.__name__)
                except Exception as exn:
                    print("RAISED", make.__name__, fn.__name__, type(exn).__name__)
        batches = list(make_eval_loader("cls", {str(tmp_path)!r}, batch_size=2, img_size=16))
        print("EVAL", sorted(k for b in batches for k in b["keys"]), sum(b["skipped"] for b in batches))
        train = make_train_loader("cls", {str(tmp_path)!r}, batch_size=2, img_size=16, seed=0, shuffle_buffer=2)
        batches = list(itertools.islice(train, 6))
        keys = {{k for b in batches for k in b["keys"]}}
        print("TRAIN", sorted(keys), sum(b["skipped"] for b in batches) > 0)
    """
    out = _run_isolated(code)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.count("RAISED") == 4 and "DECODED" not in out.stdout, out.stdout
    good = sorted(f"good{i}" for i in (0, 2, 3, 5))
    assert f"EVAL {good} 2" in out.stdout, out.stdout
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("TRAIN")]
    assert lines and "bad" not in lines[0] and lines[0].endswith("True"), out.stdout


def test_check_png_accepts_good_files_and_names_what_is_wrong() -> None:
    assert check_png(_png(RGB)) == (32, 24)
    assert check_png(_png(GREY, "P")) == (32, 24)
    good = _png(GREY)
    with pytest.raises(ValueError, match="no IEND"):
        check_png(good[:-12])  # IEND cut off
    with pytest.raises(ValueError, match="runs past the end"):
        check_png(good[:-20])
    bad_depth = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 3, 2, 0, 0, 0))
    with pytest.raises(ValueError, match="bit depth 3"):
        check_png(bad_depth + _chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="expected a 13-byte IHDR"):
        check_png(b"\x89PNG\r\n\x1a\n" + _chunk(b"IDAT", b"") + _chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="no IDAT"):
        check_png(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0))
                  + _chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="not a PNG"):
        decode_mask(_jpeg(RGB))  # label maps must be lossless PNGs


def test_sixteen_bit_grey_png_keeps_its_high_byte() -> None:
    arr = np.array([[0, 255, 256, 65535]], dtype=np.uint16)
    out = decode_rgb(_png(arr))
    assert out.dtype == torch.uint8 and out.shape == (3, 1, 4)
    assert out[0].tolist() == [[0, 0, 1, 255]] and torch.equal(out[0], out[2])


def test_png_and_jpeg_bombs_are_refused_from_the_header_in_milliseconds() -> None:
    bomb = png_bomb()
    assert len(bomb) < 2000 and 30000 * 30000 > MAX_IMAGE_PIXELS
    # CPU time, not wall time: decoding 30000x30000 would take seconds of CPU, while a stall of the process on a
    # loaded CI machine (10 s once, around a 0.2 ms check) is no evidence that anything was decoded
    for fn, data in ((decode_rgb, bomb), (decode_mask, png_bomb(colour=0))):
        start = time.process_time()
        with pytest.raises(ValueError, match="30000x30000 .* over the limit"):
            fn(data)
        assert time.process_time() - start < 0.05
    jpeg = bytearray(_jpeg(RGB))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 30000, 30000)
    start = time.process_time()
    with pytest.raises(ValueError, match="JPEG declares 30000x30000"):
        decode_rgb(bytes(jpeg))
    assert time.process_time() - start < 0.05
    # the limit itself is allowed, one pixel more is not (header only: nothing is decoded here)
    assert check_png(png_bomb(MAX_IMAGE_PIXELS, 1, colour=0)) == (MAX_IMAGE_PIXELS, 1)
    with pytest.raises(ValueError, match="over the limit"):
        check_png(png_bomb(MAX_IMAGE_PIXELS + 1, 1, colour=0))


def test_jpeg_size_reads_the_frame_header_like_pil() -> None:
    arr = np.random.default_rng(3).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", exif=Image.Exif())
    for data in (_jpeg(arr), _jpeg(arr, progressive=True), _jpeg(arr[..., 0]), buf.getvalue(),
                 _jpeg(arr, quality=20, subsampling=0)):
        assert jpeg_size(data) == Image.open(io.BytesIO(data)).size == (53, 37)
    with pytest.raises(ValueError, match="no frame header"):
        jpeg_size(b"\xff\xd8\xff\xe0\x00\x04ab\xff\xd9")
    with pytest.raises(ValueError, match="expected a marker"):
        decode_rgb(b"\xff\xd8\xff\xe0\x00\x04abgarbage")


# ---------------------------------------------------------------- COCO box rule

def test_valid_coco_box_rule() -> None:
    assert valid_coco_box([1, 2, 3, 4], width=10, height=10) == (1.0, 2.0, 4.0, 6.0)
    assert valid_coco_box([-2, 8, 5, 5], width=10, height=10) == (0.0, 8.0, 3.0, 10.0)  # clipped
    for bad in ([1, 2, 0, 4], [1, 2, 3, -1], [float("nan"), 2, 3, 4], [1, 2, float("inf"), 4], [12, 2, 3, 4],
                [1, -9, 3, 4], [1, 2, 3], ["1", 2, 3, 4], [True, 2, 3, 4], None):
        assert valid_coco_box(bad, width=10, height=10) is None, bad


def test_det_sample_drops_invalid_boxes_from_targets_and_ground_truth() -> None:
    anns = [{"id": 1, "bbox": [2.0, 3.0, 10.0, 5.0], "category_id": 7, "iscrowd": 0},
            {"id": 2, "bbox": [float("nan"), 1.0, 2.0, 2.0], "category_id": 3, "iscrowd": 0},
            {"id": 3, "bbox": [4.0, 4.0, 0.0, 3.0], "category_id": 3, "iscrowd": 0},
            {"id": 4, "bbox": [40.0, 1.0, 5.0, 5.0], "category_id": 3, "iscrowd": 0},  # right of a 32 px image
            {"id": 5, "bbox": [28.0, 20.0, 10.0, 10.0], "category_id": 3, "iscrowd": 1},  # clipped, kept
            {"id": 6, "bbox": [1.0, 1.0, float("inf"), 2.0], "category_id": 999, "iscrowd": 0}]  # dropped first
    raw = json.dumps({"image_id": 5, "annotations": anns})  # json writes NaN/Infinity, Python reads them back
    out = decode_det_sample({"png": _png(RGB), "json": raw.encode()}, cat_id_to_label={3: 1, 7: 2})
    assert [a["id"] for a in out["annotations"]] == [1, 5]
    assert out["annotations"][1]["bbox"] == [28.0, 20.0, 10.0, 10.0]  # GT keeps COCO's own box
    assert out["boxes"].tolist() == [[2.0, 3.0, 12.0, 8.0], [28.0, 20.0, 32.0, 24.0]]
    assert out["labels"].tolist() == [2, 1] and out["iscrowd"].tolist() == [False, True]
    empty = decode_det_sample({"png": _png(RGB), "json": json.dumps({"image_id": 6, "annotations": anns[1:4]})
                               .encode()}, cat_id_to_label={3: 1, 7: 2})
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["annotations"] == []
