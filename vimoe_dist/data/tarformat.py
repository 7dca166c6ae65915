"""Reading tar headers directly: the (name, data) members of a tar stream and the member offsets of a tar file.

Python's `tarfile` builds a full `TarInfo` per member (owner, mode, times, sparse maps), which made header parsing
a fifth of the decode + augment cost of small images in the training workers. Shards need much less: the 512-byte
ustar header (POSIX.1-1988) gives name, size and type; GNU long-name (`L`) and pax (`x`, `g`) headers carry long
names; everything else (directories, links) is skipped. Checksums are verified, so a corrupt header is an error,
not garbage. gzip-compressed shards (`.tar.gz`, as webdataset allows) are detected by their magic bytes.

A header is input, not a promise: a size field is checked against what the file holds before anything is read
(a member claiming 2**62 bytes is an error, not a 2**62-byte allocation), streams whose length is unknown are read
in bounded chunks, and every pax record must advance the parser (a zero-length record would loop forever; CPython's
tarfile had the same bug, bpo-39017).
"""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_ZERO = bytes(BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")
_META_TYPES = (b"L", b"x", b"g")
MAX_META_BYTES = 1 << 20  # a long name or a pax header; real ones are a few hundred bytes
MAX_STREAM_MEMBER_BYTES = 1 << 30  # one member of a stream whose length is unknown (http, pipe, gzip)
_CHUNK = 1 << 20


def parse_header(header: bytes, where: str) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a header block; raises `tarfile.ReadError` on a bad checksum."""
    try:
        stored = _number(header[148:156])
    except ValueError:
        raise tarfile.ReadError(f"bad header checksum {where}") from None
    if stored != sum(header[:148]) + 256 + sum(header[156:]) and stored != _signed_sum(header):
        raise tarfile.ReadError(f"bad header checksum {where}")
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if header[257:262] == b"ustar" and header[345]:
        name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
    try:
        return name, _number(header[124:136]), header[156:157]
    except ValueError:
        raise tarfile.ReadError(f"bad size field {where}") from None


def _signed_sum(header: bytes) -> int:  # some old tars sum signed bytes
    return sum(b - 256 if b > 127 else b for b in header[:148] + b" " * 8 + header[156:])


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes, where: str = "") -> str | None:
    """The `path` record of a pax extended header ("<len> <key>=<value>\\n" records, <len> counting the whole
    record); a record that does not advance the position or overruns the header is an error."""
    pos, path = 0, None
    while pos < len(data):
        space = data.find(b" ", pos)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            if not data[pos:].strip(b"\0"):  # zero padding after the last record
                break
            raise tarfile.ReadError(f"bad pax record at byte {pos} of an extended header {where}".rstrip())
        record = data[space + 1 : end - 1]
        if record.startswith(b"path="):
            path = record[5:].decode("utf-8", "replace")
        pos = end
    return path


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    """Up to n bytes (fewer at the end of the stream), read in chunks: memory grows with the data that arrives,
    never with what a size field claims."""
    chunks, need = [], n
    while need > 0:
        chunk = stream.read(min(need, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        need -= len(chunk)
    return b"".join(chunks)


def _file_end(stream: BinaryIO) -> int | None:
    """The length of a regular file behind `stream` from its current position, or None (a pipe, a socket)."""
    try:
        st = os.fstat(stream.fileno())
        return st.st_size - stream.tell() if stat.S_ISREG(st.st_mode) else None
    except (AttributeError, OSError, ValueError):
        return None


def check_size(name: str, kind: bytes, size: int, left: int | None, where: str) -> None:
    """Refuses a member whose size field cannot be true: beyond the end of the file, or beyond the bounds on meta
    headers and on members of streams of unknown length."""
    if kind in _META_TYPES and size > MAX_META_BYTES:
        raise tarfile.ReadError(f"{name!r}: a {size}-byte extended header (at most {MAX_META_BYTES}) {where}".rstrip())
    if left is not None and size > left:
        raise tarfile.ReadError(
            f"member {name!r} truncated: claims {size} bytes, {max(left, 0)} follow {where}".rstrip()
        )
    if left is None and size > MAX_STREAM_MEMBER_BYTES:
        raise tarfile.ReadError(
            f"member {name!r} claims {size} bytes (at most {MAX_STREAM_MEMBER_BYTES}) {where}".rstrip()
        )


class _Prepend:
    """A stream with some already-read bytes put back in front (for gzip detection)."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out


def iter_members(stream: BinaryIO, where: str = "") -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file of a tar stream, in order.

    Raises `tarfile.ReadError` on a truncated member or a corrupt header; a stream that simply ends at a member
    boundary (no end-of-archive blocks) ends the iteration quietly, as tar itself does.
    """
    end = _file_end(stream)
    first = _read_exact(stream, BLOCK)
    if first[:2] == b"\x1f\x8b":
        stream, end = gzip.GzipFile(fileobj=_Prepend(first, stream)), None
        first = _read_exact(stream, BLOCK)
    if first and len(first) < BLOCK:
        raise tarfile.ReadError(f"unexpected end of data {where}")
    header, long_name, offset = first, None, 0
    while header and header != _ZERO:
        if len(header) < BLOCK:
            raise tarfile.ReadError(f"unexpected end of data at byte {offset} {where}")
        name, size, kind = parse_header(header, f"at byte {offset} {where}")
        check_size(long_name or name, kind, size, None if end is None else end - offset - BLOCK, where)
        data = _read_exact(stream, size)
        if len(data) < size:
            raise tarfile.ReadError(f"member {long_name or name} truncated {where}")
        _read_exact(stream, -size % BLOCK)
        offset += BLOCK + size + (-size % BLOCK)
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == b"x":
            long_name = _pax_path(data, where) or long_name
        elif kind != b"g":
            if kind in _FILE_TYPES:
                yield long_name or name, data
            long_name = None
        header = _read_exact(stream, BLOCK)


def scan_members(path: str) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of an uncompressed tar file, reading headers only.

    A damaged tar raises `tarfile.ReadError(message, entries read so far)`.
    """
    entries: list[tuple[str, int, int]] = []
    long_name = None
    with open(path, "rb") as f:
        end = f.seek(0, 2)
        offset = 0
        while offset + BLOCK <= end:
            f.seek(offset)
            header = f.read(BLOCK)
            if header == _ZERO:
                return entries
            if offset == 0 and header[:2] == b"\x1f\x8b":
                raise tarfile.ReadError("compressed shard: data.order=exact needs uncompressed tars", entries)
            try:
                name, size, kind = parse_header(header, f"at byte {offset}")
            except tarfile.ReadError as e:
                raise tarfile.ReadError(str(e), entries) from None
            data_offset = offset + BLOCK
            try:
                check_size(long_name or name, kind, size, end - data_offset, f"at byte {offset}")
                if kind in (b"L", b"x"):
                    data = f.read(size)
                    long_name = (
                        data.split(b"\0", 1)[0].decode("utf-8", "replace")
                        if kind == b"L"
                        else (_pax_path(data, f"at byte {offset}") or long_name)
                    )
            except tarfile.ReadError as e:
                raise tarfile.ReadError(str(e), entries) from None
            if kind not in _META_TYPES:
                if kind in _FILE_TYPES:
                    entries.append((long_name or name, data_offset, size))
                long_name = None
            offset = data_offset + size + (-size % BLOCK)
    if offset < end:
        raise tarfile.ReadError(f"unexpected end of data at byte {end}", entries)
    return entries  # no end-of-archive blocks: cut exactly at a member boundary
