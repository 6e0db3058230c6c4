"""clip_train.data.tar against webdataset's tarfile-based reader: the same files, names and bytes
from every tar layout a shard may have, and the same outcome (files read, then an error or not)
on damaged shards, cut at every offset or with corrupted headers."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
import webdataset as wds
from webdataset.tariterators import tar_file_iterator

from clip_train.data.tar import expand_shards, tar_files


def reference(data: bytes) -> tuple[list[tuple[str, bytes]], str | None]:
    """(files, the error's class name or None) from webdataset's reader (tarfile)."""
    files = []
    try:
        for f in tar_file_iterator(io.BytesIO(data)):
            files.append((f["fname"], f["data"]))
    except Exception as exn:  # noqa: BLE001 - its class is the outcome compared
        return files, type(exn).__name__
    return files, None


def ours(data: bytes) -> tuple[list[tuple[str, bytes]], str | None]:
    files = []
    try:
        for f in tar_files(io.BytesIO(data)):
            files.append((f["fname"], f["data"]))
    except Exception as exn:  # noqa: BLE001
        return files, type(exn).__name__
    return files, None


def webdataset_shard() -> bytes:
    """What img2dataset writes: webdataset's TarWriter (a pax header before each file)."""
    buf = io.BytesIO()
    with wds.TarWriter(buf) as sink:
        for i in range(3):
            sink.write({"__key__": f"{i:09d}", "jpg": bytes(range(256)) * (i * 3 + 1), "txt": f"caption {i}",
                        "json": b'{"id": %d}' % i})
    return buf.getvalue()


def tarfile_shard(fmt: int) -> bytes:
    """Every member kind a shard may hold, in one of tarfile's formats."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        def add(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("shard", kind=tarfile.DIRTYPE)
        add("shard/000.jpg", b"\xff\xd8" + bytes(700) + b"\xff\xd9")
        add("shard/000.txt", "a caption, with ünïcode".encode())
        add("__index__", b"meta")  # webdataset's metadata files are skipped
        add("shard/__meta__/x.txt", b"skipped")
        add("shard/001.jpg", b"")  # an empty file
        add("shard/001.txt", b"x" * 512)  # exactly one block: no padding
        add("shard/link.txt", kind=tarfile.SYMTYPE, link="000.txt")
        long_dir = "a-directory-name-long-enough/" * 5
        if fmt != tarfile.USTAR_FORMAT:  # > 100 characters: pax path / GNU long name
            add(long_dir + "002.jpg", b"long" * 100)
        else:  # ustar: the name split into prefix and name
            add(long_dir[:120] + "/002.jpg", b"prefixed" * 10)
        add("shard/002.txt", b"last")
    return buf.getvalue()


LAYOUTS = {
    "webdataset": webdataset_shard(),
    "gnu": tarfile_shard(tarfile.GNU_FORMAT),
    "ustar": tarfile_shard(tarfile.USTAR_FORMAT),
    "pax": tarfile_shard(tarfile.PAX_FORMAT),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_as_webdataset_reads_it(layout):
    data = LAYOUTS[layout]
    files, error = ours(data)
    assert (files, error) == reference(data)
    assert error is None and len(files) >= 6
    gz = gzip.compress(data)  # compressed shards go to webdataset's reader
    assert ours(gz) == reference(gz) == (files, None)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cut_at_any_offset_gives_the_same_files_and_error(layout):
    data = LAYOUTS[layout]
    cuts = sorted({*range(0, len(data), 97), *(b + d for b in range(0, len(data), 512) for d in (-1, 0, 1, 100))})
    errors = set()
    for cut in (c for c in cuts if 0 <= c < len(data)):
        expected = reference(data[:cut])
        assert ours(data[:cut]) == expected, cut
        errors.add(expected[1])
    assert "ReadError" in errors and None in errors  # both outcomes were exercised


@pytest.mark.parametrize("layout", LAYOUTS)
def test_damaged_headers_give_the_same_files_and_error(layout):
    data = LAYOUTS[layout]
    for block in range(0, len(data) // 512):
        for where in (0, 124, 148, 156):  # name, size, checksum, type
            damaged = bytearray(data)
            damaged[block * 512 + where] ^= 0x5A
            assert ours(bytes(damaged)) == reference(bytes(damaged)), (block, where)
    for junk in (b"", b"\0" * 1024, b"not a tar file at all" * 40, b"\0" * 100):
        assert ours(junk) == reference(junk), junk[:20]


def test_expand_shards_marks_shard_ends_and_hands_errors_over():
    good, bad = LAYOUTS["webdataset"], LAYOUTS["webdataset"][:2600]
    seen = []
    out = list(expand_shards(iter([{"url": "a", "stream": io.BytesIO(good)}, {"url": "b", "stream": io.BytesIO(bad)},
                                   {"url": "c", "stream": io.BytesIO(good)}]), handler=lambda e: seen.append(e) or True))
    ends = [i for i, f in enumerate(out) if f == {}]
    n_good, n_bad = len(ours(good)[0]), len(ours(bad)[0])
    assert n_good == 9 and n_bad == 1  # the cut shard: its first file, then the error
    assert ends == [n_good, 2 * n_good + n_bad + 1]  # after each whole shard, not after the cut one
    assert [f["__url__"] for f in out if f] == ["a"] * n_good + ["b"] * n_bad + ["c"] * n_good
    assert len(seen) == 1 and isinstance(seen[0], tarfile.ReadError) and seen[0].args[-1] == "b"


class Trickle(io.RawIOBase):
    """A stream that returns at most `most` bytes per read, as network streams may."""

    def __init__(self, data: bytes, most: int = 100):
        self.buf, self.most = io.BytesIO(data), most

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self.buf.read(self.most if size < 0 else min(size, self.most))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_short_reads_are_read_on_not_taken_for_a_cut_shard(layout):
    data = LAYOUTS[layout]
    def trickled(data: bytes) -> tuple[list[tuple[str, bytes]], str | None]:
        files = []
        try:
            for f in tar_files(Trickle(data)):
                files.append((f["fname"], f["data"]))
        except tarfile.ReadError:
            return files, "ReadError"
        return files, None

    assert trickled(data) == reference(data) and reference(data)[1] is None
    outcomes = {trickled(data[:cut]) == reference(data[:cut]) or cut for cut in range(700, len(data), 333)}
    assert outcomes == {True}, outcomes  # the cuts that differed
