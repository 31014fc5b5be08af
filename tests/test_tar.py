"""Shard reading (pretrain/data/tar.py): same samples as webdataset's reader in USTAR/PAX/GNU tars, seeks over
members it never decodes, truncated and corrupt shards counted and named."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from pretrain.data.decode import is_allowed_member
from pretrain.data.sources import make_eval_loader
from pretrain.data.tar import MemberRef, TarFormatError, TarSamples, iter_members, read_refs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data import write_split  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _write_tar(path: Path, members: list[tuple[str, bytes]], fmt: int) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(data)
            info.mtime = 1.5 if fmt == tarfile.PAX_FORMAT else 0  # a float mtime makes tarfile write a PAX header
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def test_tar_reader_groups_like_webdataset_in_ustar_pax_and_gnu_shards(tmp_path: Path) -> None:
    long_dir = "d" * 90 + "/" + "e" * 60  # > 100 chars: USTAR prefix field, PAX path record or GNU long name
    members = [("a/k1.jpg", b"j1"), ("a/k1.CLS", b"1"), ("a/k1.pth", b"pickle"), ("a/", b""), ("__meta__", b"m"),
               ("noext", b"x"), (".hidden.jpg", b"h"), (f"{long_dir}/k2.seg.png", b"s2"),
               (f"{long_dir}/k2.json", b"{}"), ("k3.pyd", b"only a pickle"), ("k4.jpg", b"j4" * 700)]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        url = str(_write_tar(tmp_path / f"f{fmt}.tar", members, fmt))
        ours = list(TarSamples(select=is_allowed_member, handler=lambda e: False)(iter([{"url": url}])))
        ref = list(wds.tarfile_to_samples(select_files=is_allowed_member)(iter([{"url": url}])))
        assert ours == ref, fmt
        assert [s["__key__"] for s in ours] == ["a/k1", f"{long_dir}/k2", "k4"], fmt
        assert ours[0]["cls"] == b"1" and "pth" not in ours[0] and ours[2]["jpg"] == b"j4" * 700
        # deferred: members >= 1000 bytes arrive as references, read on demand, equal to the eager bytes
        lazy = list(TarSamples(select=is_allowed_member, handler=lambda e: False, defer_bytes=1000)(
            iter([{"url": url}])))
        assert isinstance(lazy[2]["jpg"], MemberRef) and lazy[0]["jpg"] == b"j1"
        assert [read_refs(s) for s in lazy] == ref, fmt


def test_deferred_members_are_checked_at_header_time_and_release_their_file(tmp_path: Path) -> None:
    path = _write_tar(tmp_path / "t.tar", [("k1.jpg", b"a" * 3000), ("k2.jpg", b"b" * 3000)], tarfile.USTAR_FORMAT)
    fds = len(os.listdir("/proc/self/fd"))
    samples = list(TarSamples(select=is_allowed_member, handler=lambda e: False, defer_bytes=1)(
        iter([{"url": str(path)}])))
    assert len(os.listdir("/proc/self/fd")) == fds + 1  # one shared descriptor for the shard's references
    assert read_refs(samples[1]) == {"__key__": "k2", "__url__": str(path), "jpg": b"b" * 3000}
    del samples
    assert len(os.listdir("/proc/self/fd")) == fds
    path.write_bytes(path.read_bytes()[:3584 + 512 + 100])  # cut inside k2's data (k2's header is at 3584)
    errors: list[BaseException] = []
    got = list(TarSamples(select=is_allowed_member, handler=lambda e: errors.append(e) or True, defer_bytes=1)(
        iter([{"url": str(path)}])))
    assert [s["__key__"] for s in got] == [] and len(errors) == 1  # k1 is dropped with the shard's open sample
    assert isinstance(errors[0], TarFormatError) and "t.tar: truncated: member at byte 3584" in str(errors[0])


class _CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        out = super().read(n)
        self.bytes_read += len(out)
        return out


def test_tar_reader_seeks_over_members_it_does_not_select(tmp_path: Path) -> None:
    big = b"\x80" * (1 << 20)
    path = _write_tar(tmp_path / "s.tar", [("k.pth", big), ("k.jpg", b"img"), ("k.pickle", big)], tarfile.USTAR_FORMAT)
    f = _CountingReader(path.read_bytes())
    assert list(iter_members(f, url="s.tar", select=is_allowed_member)) == [("k.jpg", b"img")]
    assert f.bytes_read < 4096  # headers and the jpg only: the 2 MiB of pickles were never read


def test_truncated_and_corrupt_shards_are_counted_naming_the_shard(tmp_path: Path, caplog) -> None:
    root = write_split(tmp_path / "c", "cls", n=6, per_shard=3)
    good = (root / "cls-000000.tar").read_bytes()
    offsets = [m.offset for m in tarfile.open(root / "cls-000000.tar")]
    (root / "cls-000000.tar").write_bytes(good[:offsets[-1] + 700])  # cut inside the last member
    bad = bytearray((root / "cls-000001.tar").read_bytes())
    header = tarfile.open(root / "cls-000001.tar").getmembers()[3].offset  # a later header loses its checksum
    bad[header + 10] ^= 0xFF
    (root / "cls-000001.tar").write_bytes(bytes(bad))
    with caplog.at_level("WARNING"):
        batches = list(make_eval_loader("cls", root, batch_size=8, img_size=16))
    keys = [k for b in batches for k in b["keys"]]
    # shard 0: cls0002 was cut; shard 1: the error hits before cls0003's group is closed, so it is dropped as well
    assert keys == ["cls0000", "cls0001"]
    assert sum(b["skipped"] for b in batches) == 2
    assert "cls-000000.tar: truncated" in caplog.text and "cls-000001.tar: corrupt member header" in caplog.text
    with pytest.raises(TarFormatError, match="sparse"):
        list(iter_members(io.BytesIO(_sparse_header()), url="x.tar", select=is_allowed_member))


def _sparse_header() -> bytes:
    info = tarfile.TarInfo("k.jpg")
    info.type = tarfile.GNUTYPE_SPARSE
    return info.tobuf(tarfile.GNU_FORMAT)
