"""Our tar header reader against Python's tarfile: the same members for ustar, GNU long names, pax and gzip;
errors (not garbage) for truncation and corrupt headers."""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import pytest

from vimoe_dist.data.tarformat import iter_members, scan_members

LONG = "d" * 120 + "/sample.with.dots.jpg"


def make_tar(fmt: int, names=("a.jpg", "a.cls", LONG, "b.png"), dirs=True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if dirs:
            info = tarfile.TarInfo("somedir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for i, name in enumerate(names):
            data = bytes([i]) * (100 * i + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def reference(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile(tmp_path, fmt):
    names = ("a.jpg", "a.cls", "b.png") if fmt == tarfile.USTAR_FORMAT else ("a.jpg", "a.cls", LONG, "b.png")
    raw = make_tar(fmt, names)
    expected = reference(raw)
    assert list(iter_members(io.BytesIO(raw))) == expected
    assert list(iter_members(io.BytesIO(gzip.compress(raw)))) == expected
    path = tmp_path / "x.tar"
    path.write_bytes(raw)
    assert [(n, raw[o : o + s]) for n, o, s in scan_members(str(path))] == expected


def test_truncation_and_corruption_raise(tmp_path):
    raw = make_tar(tarfile.USTAR_FORMAT, ("a.jpg", "a.cls", "b.png"), dirs=False)
    cut = raw[: 512 + 1 + 511 + 512 + 50]  # inside a.cls's data
    with pytest.raises(tarfile.ReadError, match="truncated"):
        list(iter_members(io.BytesIO(cut)))
    path = tmp_path / "cut.tar"
    path.write_bytes(cut)
    with pytest.raises(tarfile.ReadError) as info:
        scan_members(str(path))
    assert [n for n, _, _ in info.value.args[1]] == ["a.jpg"]  # what came before the damage is kept
    bad = bytearray(raw)
    bad[1024 + 10] ^= 0xFF  # a.cls's header name
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(iter_members(io.BytesIO(bytes(bad))))
    # a tar that ends exactly at a member boundary is read quietly (tar does the same)
    assert [n for n, _ in iter_members(io.BytesIO(raw[: 512 + 512]))] == ["a.jpg"]
    assert list(iter_members(io.BytesIO(b""))) == []
    os.truncate(path, 0)
    assert scan_members(str(path)) == []


def test_tar_index_reads_samples_by_position(tmp_path):
    from vimoe_dist.data.exact import TarIndex

    raw = make_tar(tarfile.PAX_FORMAT, ("x/ä1.jpg", "x/ä1.cls", "b.png", "b.cls", LONG), dirs=False)
    path = tmp_path / "s.tar"
    path.write_bytes(raw)
    index = TarIndex(str(path))
    expected = reference(raw)
    assert len(index) == 3 and index.error is None
    assert index.read(0) == {"__key__": "x/ä1", "__url__": str(path), "jpg": expected[0][1], "cls": expected[1][1]}
    assert index.read(2)["__key__"] == LONG.split(".")[0]
    with tarfile.open(path) as tar:
        cut = tar.getmember(LONG).offset_data + 10
    os.truncate(path, cut)  # inside the last member's data
    damaged = TarIndex(str(path))
    assert damaged.error is not None and len(damaged) == 2 and damaged.read(1)["png"] == expected[2][1]
