"""Reading tar shards: the files of an uncompressed tar stream, as webdataset's
`tar_file_iterator` yields them, at a fraction of its cost.

webdataset reads shards through Python's `tarfile`, which builds a TarInfo per member, parses
every field of every header and, for the pax headers webdataset's TarWriter writes before each
file, a dictionary of records: about 55 us per file, 0.11-0.14 ms per image-text sample, 13% of
a fast-decode worker's time on DataComp-like shards at 224 px. This reader takes from a header
only what a shard needs (name, size, type, checksum) and reads the data in one call: ~8 us per
file. It keeps `tarfile`'s behaviour where shards are damaged -- which members are returned and
which errors are raised (`tarfile.ReadError`, so that the loader's accounting sees the same
`bad_tar` shards) -- and hands compressed tars (gzip, bzip2, xz) to webdataset's reader.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

from webdataset.tariterators import tar_file_iterator

BLOCK = 512
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x5d\x00\x00\x80")  # gzip, bzip2, xz, lzma
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: files such as __index__
_REGULAR = (b"0", b"\0", b"7")  # tarfile.REGULAR_TYPES without GNU sparse files
_HEADERS = (b"x", b"g", b"L", b"K")  # pax (per file, global), GNU long name, long link name


class _Prepended:
    """A stream whose first bytes were already read (to look at them)."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + self.stream.read(size - len(data)) if len(data) < size else data


def _read_fully(stream: BinaryIO) -> Callable[[int], bytes]:
    """`stream.read`, but reading on until it has `size` bytes or the stream ends: network
    streams (fsspec's HTTP files, sockets) may return less than asked before their end, which
    tarfile tolerates and a cut shard must not be confused with."""
    read = stream.read

    def read_fully(size: int) -> bytes:
        data = read(size)
        if len(data) == size or not data:
            return data
        parts, got = [data], len(data)
        while got < size and (more := read(size - got)):
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    return read_fully


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or base-256 (GNU, for sizes >= 8 GiB)."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise tarfile.InvalidHeaderError("invalid header") from None


def _header_size(header: bytes) -> int | None:
    """The size field of a 512-byte header, or None where tarfile would find the header invalid
    (a checksum that matches neither sum, or a numeric field that does not read)."""
    try:
        stored, size = _number(header[148:156]), _number(header[124:136])
    except tarfile.InvalidHeaderError:
        return None
    unsigned = sum(header) - sum(header[148:156]) + 8 * 0x20
    if stored == unsigned:
        return size
    signed = sum(b - 256 if b > 127 else b for b in header) - sum(b - 256 if b > 127 else b for b in header[148:156])
    return size if stored == signed + 8 * 0x20 else None


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """"%d %s=%s\n" records, each prefixed with its own length; parsed as tarfile does (up to
    the first record that does not look like one)."""
    records, pos = {}, 0
    while match := _PAX_RECORD.match(data, pos):
        length, key = match.groups()
        length = int(length)
        if length == 0:
            raise tarfile.ReadError("invalid header")
        records[key] = data[match.end(2) + 1:match.start(1) + length - 1]
        pos += length
    return records


def tar_files(stream: BinaryIO) -> Iterator[dict]:
    """{"fname", "data"} of each regular file of the tar `stream`, in order, skipping
    webdataset's metadata files, as `webdataset.tariterators.tar_file_iterator` does."""
    read = _read_fully(stream)
    head = read(BLOCK)
    if head.startswith(_COMPRESSED):
        yield from tar_file_iterator(_Prepended(head, stream))
        return
    first, name, size = True, None, None  # name, size: from the pax / GNU headers before a file
    subsequent = False  # after a pax or GNU header: a file's header must follow
    while True:
        header = head if first else read(BLOCK)
        header_size = _header_size(header) if len(header) == BLOCK and header.count(0) != BLOCK else None
        if header_size is None:
            # tarfile: at the first header a bad one is an error, an empty or zero one an empty
            # archive; after a pax or long-name header one is required; anywhere else it is the end.
            if subsequent:
                raise tarfile.ReadError("missing or bad subsequent header")
            if first and (not header or (len(header) == BLOCK and header.count(0) != BLOCK)):
                raise tarfile.ReadError("empty file" if not header else "bad checksum")
            if first and len(header) < BLOCK:
                raise tarfile.ReadError("truncated header")
            return
        first = False
        kind = header[156:157]
        length = header_size if size is None or kind in _HEADERS else size
        data = read(length)
        if len(data) < length:
            raise tarfile.ReadError("unexpected end of data")
        # tarfile finds a cut in the padding when it looks for the next header (after this file).
        pad = -length % BLOCK
        cut = pad > 0 and len(read(pad)) < pad
        subsequent = kind in _HEADERS
        if kind == b"x":
            records = _pax_records(data)
            if b"path" in records:
                name = records[b"path"].decode("utf-8", "surrogateescape")
            if b"size" in records:
                size = int(records[b"size"])
        elif kind == b"L":
            name = _text(data)
        elif not subsequent:
            file = _file(header, kind, name, data)
            name, size = None, None
            if file is not None:
                yield file
        if cut:
            raise tarfile.ReadError("unexpected end of data")


def _file(header: bytes, kind: bytes, name: str | None, data: bytes) -> dict | None:
    """The member as webdataset yields it, or None for what it skips."""
    if name is None:
        name = _text(header[0:100])
        if header[257:265] == b"ustar\x0000" and header[345] != 0:
            name = _text(header[345:500]) + "/" + name
    if kind not in _REGULAR or (kind == b"\0" and name.endswith("/")):
        return None  # directories, links, devices, sparse files: not sample files
    if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
        return None  # webdataset's metadata files
    return {"fname": name, "data": data}


def expand_shards(sources: Iterator[dict], handler: Callable[[BaseException], bool]) -> Iterator[dict]:
    """webdataset's `tar_file_expander` on `tar_files`: each file with its shard's `__url__`, an
    end-of-shard `{}` after a shard read whole; an error goes to `handler` (True: go on with the
    next shard, False: stop)."""
    for source in sources:
        url = source["url"]
        try:
            for sample in tar_files(source["stream"]):
                sample["__url__"] = url
                yield sample
            yield {}
        except Exception as exn:  # noqa: BLE001 - the handler decides, as in webdataset
            exn.args = (*exn.args, source.get("stream"), url)
            if handler(exn):
                continue
            break
