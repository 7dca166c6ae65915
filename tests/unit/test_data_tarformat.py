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


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    """One header block with a valid checksum (what a hostile shard would carry)."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.GNU_FORMAT)  # GNU: base-256 size fields for sizes beyond 8 GiB


def member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    return header(name, len(data), kind) + data + bytes(-len(data) % 512)


PARSE_IN_CHILD = """
import sys, tarfile
from vimoe_dist.data.tarformat import iter_members, scan_members
path = sys.argv[1]
for name, read in (("iter", lambda: list(iter_members(open(path, "rb")))), ("scan", lambda: scan_members(path))):
    try:
        read()
        print(name, "ok")
    except tarfile.ReadError as e:
        print(name, "ReadError", e.args[0])
"""


@pytest.mark.parametrize("record", [b"0 mtime=1\n", b"3 mtime=1\n", b"99 path=x\n", b"x path=x\n"])
def test_a_bad_pax_record_is_an_error_not_an_endless_loop(tmp_path, record):
    """A pax record whose length is 0 used to leave the parser where it was, forever (the loader spun, deaf to
    SIGTERM); every record must advance past itself. Parsed in a child so that a loop fails the test, not hangs."""
    import subprocess
    import sys

    path = tmp_path / "pax.tar"
    path.write_bytes(member("pax", record, tarfile.XHDTYPE) + member("a.jpg", b"1") + bytes(1024))
    proc = subprocess.run([sys.executable, "-c", PARSE_IN_CHILD, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "iter ReadError bad pax record at byte 0 of an extended header",
        "scan ReadError bad pax record at byte 0 of an extended header at byte 0",
    ]


def test_a_size_field_is_checked_before_anything_is_allocated(tmp_path):
    """A member claiming 2**62 bytes: one ReadError naming it, from a file or from a pipe (whose length is unknown),
    never a MemoryError from reading that many bytes."""
    import subprocess

    path = tmp_path / "huge.tar"
    path.write_bytes(member("a.cls", b"1") + header("a.jpg", 2**62) + bytes(2048))
    with (
        open(path, "rb") as f,
        pytest.raises(tarfile.ReadError, match=rf"'a.jpg' truncated: claims {2**62} bytes, 2048 follow"),
    ):
        list(iter_members(f))
    with pytest.raises(tarfile.ReadError, match=r"'a\.jpg' truncated") as info:
        scan_members(str(path))
    assert [n for n, _, _ in info.value.args[1]] == ["a.cls"]
    cat = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    with cat, pytest.raises(tarfile.ReadError, match=rf"'a.jpg' claims {2**62} bytes \(at most"):
        list(iter_members(cat.stdout))
    path.write_bytes(header("long", 2**40, tarfile.GNUTYPE_LONGNAME) + bytes(2048))
    cat = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    with cat, pytest.raises(tarfile.ReadError, match="extended header"):
        list(iter_members(cat.stdout))
