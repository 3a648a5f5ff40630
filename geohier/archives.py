"""Images read in place from the archives datasets are published in: zips and tars.

OSV-5M ships ``images/train/00.zip … 97.zip`` and WebDataset shards (osv5m-wds, PLONK) are
plain tars of ``<key>.jpg`` + ``<key>.json``. geohier reads their members where they are,
with no extraction: the manifest's ``path`` of such an image is a *member reference*,
``<archive path>!/<member name>`` (the form Java's ``jar:`` URLs use), and every reader
that takes a path (``geohier.images.read_source``, so ``open_image``, the datasets, the
embedding cache, evaluate, predict and the pages) reads the member's bytes from the
archive instead.

Each process keeps its own open archives (``ArchiveCache``): a ZipFile's file position
is not shared safely across a fork, so a DataLoader worker opens its own on first use.
At most ``MAX_OPEN`` (256) archives stay open per process (least recently used closed
first), about 30 bytes a member each (``bench/archives.py``).
A tar is indexed once per process (its headers only: each member's offset and size),
then a member is one seek and one read. Compressed tars (``.tar.gz``) have no random
access and are refused as archives to read in place.

>>> ref = member_ref("/data/osv5m/images/test/00.zip", "00/123.jpg")
>>> ref
'/data/osv5m/images/test/00.zip!/00/123.jpg'
>>> split_ref(ref)
('/data/osv5m/images/test/00.zip', '00/123.jpg')
>>> split_ref("/photos/a.jpg") is None
True
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import struct
import tarfile
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geohier.errors import ImageReadError

SEP = "!/"
ARCHIVE_SUFFIXES = (".zip", ".tar")
# Open archives per process: above OSV-5M's 98 + 5 zips, so a shuffled epoch or a CSV in any
# order never reopens one (reopening parses its central directory again: ~1 s per 50,000
# members); one file descriptor each, far under the usual limit of 1,024.
MAX_OPEN = 256
# A member bigger than this is refused before it is read (a zip bomb declares its size).
MAX_MEMBER_BYTES = 256 << 20

_REF = re.compile(r"^(.*?\.(?:zip|tar))!/(.+)$", re.IGNORECASE | re.DOTALL)

# the reasons, as geohier.images names them (kept equal; images imports this module)
_MISSING = "missing file"
_UNREADABLE = "unreadable file"
_TOO_LARGE = "too large"


def member_ref(archive: str | os.PathLike, member: str) -> str:
    """The manifest path of ``member`` inside ``archive``."""
    return f"{os.fspath(archive)}{SEP}{member}"


def split_ref(ref: str | os.PathLike) -> tuple[str, str] | None:
    """``(archive, member)`` of a member reference, or None for a plain path."""
    if not isinstance(ref, str):
        ref = os.fspath(ref)
    if SEP not in ref:
        return None
    m = _REF.match(ref)
    return (m.group(1), m.group(2)) if m else None


def is_member(ref: str | os.PathLike) -> bool:
    return split_ref(ref) is not None


def is_archive_name(path: str | os.PathLike) -> bool:
    """Whether a file name is one geohier reads in place (``.zip``, ``.tar``)."""
    return os.fspath(path).lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class Entry:
    """One image member: its name and uncompressed size."""

    name: str
    size: int


def name_hash(name: str) -> int:
    """The 64-bit hash every compact name index here sorts by (``_Index``,
    ``geohier.tables.NameIndex``)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


def hash_rows(hashes: np.ndarray, name: str) -> range:
    """The rows of sorted ``hashes`` (uint64) equal to ``name_hash(name)``: the candidates,
    each confirmed by its caller (a 64-bit collision is possible, never trusted)."""
    h = np.uint64(name_hash(name))
    return range(int(np.searchsorted(hashes, h, "left")), int(np.searchsorted(hashes, h, "right")))


class _Index:
    """Members of one archive in a few numpy arrays sorted by a 64-bit hash of the name:
    about 30 bytes a member whatever its name (a ZipFile holds ~550 bytes a member, so a
    worker touching OSV-5M's 98 train zips would hold ~2.7 GB). A hash match is confirmed
    against the name stored in the archive itself before any byte is returned."""

    def __init__(self, names: list[str], columns: dict[str, tuple[list[int], type]]):
        h = np.fromiter((name_hash(n) for n in names), dtype=np.uint64, count=len(names))
        order = np.argsort(h, kind="stable")
        self.hash = h[order]
        self.cols = {k: np.asarray(v, dtype=dt)[order] for k, (v, dt) in columns.items()}

    def row(self, r: int) -> dict[str, int]:
        return {k: int(v[r]) for k, v in self.cols.items()}

    def rows(self, member: str) -> range:
        return hash_rows(self.hash, member)

    def __len__(self) -> int:
        return int(self.hash.size)


class _Zip:
    """A zip read member by member from its local headers, with a compact index."""

    def __init__(self, path: str):
        with zipfile.ZipFile(path) as zf:  # parses the central directory (zip64 included)
            infos = [i for i in zf.infolist() if not i.is_dir()]
        big = np.uint32(0xFFFFFFFF)  # sizes past 4 GB are kept as 4 GB: far over any image's limit
        self.index = _Index([i.filename for i in infos],
                            {"offset": ([i.header_offset for i in infos], np.int64),
                             "csize": ([min(i.compress_size, big) for i in infos], np.uint32),
                             "size": ([min(i.file_size, big) for i in infos], np.uint32),
                             "crc": ([i.CRC for i in infos], np.uint32),
                             "method": ([i.compress_type for i in infos], np.uint16),
                             "flags": ([i.flag_bits for i in infos], np.uint16)})
        self.fh = open(path, "rb")  # noqa: SIM115 - kept open, closed by close()

    def _find(self, member: str) -> tuple[dict, int] | None:
        """The index row of ``member`` and where its data starts, confirmed by the name in
        its local header; None when it is not in the archive."""
        for r in self.index.rows(member):
            c = self.index.row(r)
            self.fh.seek(c["offset"])
            head = self.fh.read(30)
            if len(head) != 30 or head[:4] != b"PK\x03\x04":
                raise OSError(f"no local file header at offset {c['offset']}")
            n, m = struct.unpack("<HH", head[26:30])
            name = self.fh.read(n).decode("utf-8" if c["flags"] & 0x800 else "cp437", "replace")
            if name == member:
                return c, c["offset"] + 30 + n + m
        return None

    def size(self, member: str) -> int | None:
        hit = self._find(member)
        return None if hit is None else hit[0]["size"]

    def read(self, member: str) -> bytes:
        hit = self._find(member)
        if hit is None:
            raise KeyError(member)
        c, start = hit
        self.fh.seek(start)
        raw = self.fh.read(c["csize"])
        if len(raw) != c["csize"]:
            raise OSError(f"truncated member ({len(raw)} of {c['csize']} bytes)")
        if c["method"] == zipfile.ZIP_STORED:
            data = raw
        elif c["method"] == zipfile.ZIP_DEFLATED:
            data = zlib.decompressobj(-15).decompress(raw, c["size"] + 1)
        else:
            raise OSError(f"compression method {c['method']} is not read in place (use stored or deflate)")
        if len(data) != c["size"] or zlib.crc32(data) != c["crc"]:
            raise OSError("the member's data does not match its size and CRC (a corrupt archive)")
        return data

    def close(self) -> None:
        self.fh.close()


class _Tar:
    """An uncompressed tar indexed by its headers (each member's data offset and size)."""

    def __init__(self, path: str):
        self.fh = open(path, "rb")  # noqa: SIM115 - kept open, closed by close()
        try:
            with tarfile.open(fileobj=self.fh, mode="r:") as tf:
                members = [ti for ti in tf if ti.isfile()]
        except tarfile.ReadError as exc:
            self.fh.close()
            raise OSError(f"not a readable uncompressed tar ({exc})") from None
        self.index = _Index([ti.name for ti in members],
                            {"offset": ([ti.offset for ti in members], np.int64),
                             "data": ([ti.offset_data for ti in members], np.int64),
                             "size": ([ti.size for ti in members], np.int64)})

    def _find(self, member: str) -> int | None:
        for r in self.index.rows(member):
            self.fh.seek(int(self.index.cols["offset"][r]))
            try:
                ti = tarfile.TarInfo.frombuf(self.fh.read(tarfile.BLOCKSIZE), tarfile.ENCODING, "surrogateescape")
            except tarfile.HeaderError:
                continue
            # a long name (GNU or pax) sits in an extra header before the member's: the 64-bit
            # hash alone must do (a wrong match needs a collision, ~1e-10 in a 100k-member tar)
            if ti.name == member or ti.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE):
                return r
        return None

    def size(self, member: str) -> int | None:
        r = self._find(member)
        return None if r is None else int(self.index.cols["size"][r])

    def read(self, member: str) -> bytes:
        r = self._find(member)
        if r is None:
            raise KeyError(member)
        size = int(self.index.cols["size"][r])
        self.fh.seek(int(self.index.cols["data"][r]))
        data = self.fh.read(size)
        if len(data) != size:
            raise OSError(f"truncated member ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        self.fh.close()


def entries(path: str | os.PathLike) -> Iterator[Entry]:
    """The file members of a zip or an uncompressed tar, in archive order (for indexing
    at import). OSError when it is neither or cannot be read."""
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
            raise OSError(f"not a readable zip ({exc})") from None
        yield from (Entry(i.filename, i.file_size) for i in infos if not i.is_dir())
        return
    if path.lower().endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        raise OSError("a compressed tar cannot be read in place; unpack it or recompress as .tar")
    try:
        with tarfile.open(path, mode="r:") as tf:
            members = [Entry(ti.name, ti.size) for ti in tf if ti.isfile()]
    except tarfile.ReadError as exc:
        raise OSError(f"not a readable uncompressed tar ({exc})") from None
    yield from members


def open_archive(path: str | os.PathLike) -> _Zip | _Tar:
    """Open a zip or an uncompressed tar (by content, whatever its name says).
    OSError when it is neither or cannot be read."""
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        try:
            return _Zip(path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
            raise OSError(f"not a readable zip ({exc})") from None
    if path.lower().endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        raise OSError("a compressed tar cannot be read in place; unpack it or recompress as .tar")
    return _Tar(path)


class ArchiveCache:
    """The archives one process has open, least recently used closed beyond ``max_open``.
    Keyed by process id too: after a fork (DataLoader workers) the child opens its own."""

    def __init__(self, max_open: int = MAX_OPEN):
        self.max_open = max_open
        self._open: OrderedDict[str, _Zip | _Tar] = OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _get(self, archive: str) -> _Zip | _Tar:
        if os.getpid() != self._pid:  # forked: the parent's handles are not ours to use
            self._open = OrderedDict()
            self._pid = os.getpid()
        a = self._open.get(archive)
        if a is not None:
            self._open.move_to_end(archive)
            return a
        a = open_archive(archive)
        self._open[archive] = a
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return a

    def read(self, ref: str, max_bytes: int = MAX_MEMBER_BYTES) -> bytes:
        """The bytes of a member reference; ImageReadError (reason "missing file",
        "unreadable file" or "too large") when it cannot be had."""
        parts = split_ref(ref)
        if parts is None:
            raise ImageReadError(f"{ref}: not an archive member reference", _MISSING)
        archive, member = parts
        with self._lock:
            try:
                a = self._get(archive)
            except FileNotFoundError:
                raise ImageReadError(f"{ref}: no such archive {archive}", _MISSING) from None
            except OSError as exc:
                raise ImageReadError(f"{ref}: cannot read the archive ({exc.strerror or exc})",
                                     _UNREADABLE) from None
            size = a.size(member)
            if size is None:
                raise ImageReadError(f"{ref}: no member {member!r} in {archive}", _MISSING)
            if size > max_bytes:
                raise ImageReadError(f"{ref}: {size:,} bytes, over the {max_bytes:,}-byte limit for one image",
                                     _TOO_LARGE)
            try:
                return a.read(member)
            except (OSError, zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
                raise ImageReadError(f"{ref}: cannot read the member ({exc})", _UNREADABLE) from None

    def exists(self, ref: str) -> bool:
        """Whether the member is listed in its archive, from the in-memory index alone (no
        read: a dataset checks millions of rows this way); a 64-bit hash collision with an
        absent name (~1e-10 in a 100,000-member archive) is caught when it is read."""
        parts = split_ref(ref)
        if parts is None:
            return False
        with self._lock:
            try:
                return len(self._get(parts[0]).index.rows(parts[1])) > 0
            except OSError:
                return False

    def confirmed(self, ref: str) -> bool:
        """Whether the member is in its archive, its name read back from the archive (a
        hash collision answers False): to choose among candidates."""
        parts = split_ref(ref)
        if parts is None:
            return False
        with self._lock:
            try:
                return self._get(parts[0]).size(parts[1]) is not None
            except OSError:
                return False

    def close(self) -> None:
        with self._lock:
            for a in self._open.values():
                a.close()
            self._open.clear()


_cache = ArchiveCache()
atexit.register(_cache.close)


def read_member(ref: str, max_bytes: int = MAX_MEMBER_BYTES) -> bytes:
    """The bytes of a member reference, from this process's open archives."""
    return _cache.read(ref, max_bytes)


def member_exists(ref: str, confirm: bool = False) -> bool:
    """Whether a member is listed in its archive (``confirm``: its name read back too)."""
    return _cache.confirmed(ref) if confirm else _cache.exists(ref)


def exists(path: str | os.PathLike) -> bool:
    """Whether an image path or member reference can be read (a file, or a member present
    in its archive)."""
    if is_member(path):
        return member_exists(os.fspath(path))
    try:
        return os.path.isfile(path)
    except (OSError, ValueError):
        return False


def archives_under(root: str | os.PathLike) -> list[Path]:
    """The archives geohier reads in place under ``root`` (a folder, searched recursively
    without following symlinked folders, in name order), or ``[root]`` when it is one."""
    root = Path(root)
    if root.is_file():
        return [root] if is_archive_name(root) else []
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if is_archive_name(f) and not f.startswith(".")]
    return found
