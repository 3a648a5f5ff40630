"""CSV tables at the doors: the column names geohier accepts, and reading them safely.

One definition of the CSV formats for everything that reads coordinates from a table
(``import-csv``, ``evaluate --csv``, ``score``'s truth and prediction files):

- geohier's own ``path, lat, lon``;
- OSV-5M's ``test.csv`` / ``train.csv`` (``id, latitude, longitude, thumb_original_url,
  country, sequence, captured_at, ..., unique_country, ...``);
- Im2GPS3k's and YFCC4k's ``IMG_ID, AUTHOR, LAT, LON, ...`` (CRLF line endings).

Columns are matched case-insensitively by alias (``CSV_ALIASES``); a missing one is an
InputError that names it and the names accepted for it. Files must be UTF-8 (a BOM is
fine); the delimiter is the most frequent of , ; tab | in the header line. A file that is
not such a CSV (NUL bytes, a quote left open or followed by text, a field over
``csv.field_size_limit()`` characters, bytes that are not UTF-8) is an InputError naming
the file and the line, before any row is used (``check_text``).

Coordinates are checked by one function, ``parse_point``, for every door: a row with an
empty, non-numeric, NaN/infinite or out-of-range latitude or longitude (|lat| > 90,
|lon| > 180) is left out and counted by reason.

Image paths resolve inside the images root (``Locator``): a ``../`` path, an absolute path
elsewhere, or a symlink that leads out of the root is refused (``OUTSIDE_ROOT``) without
the file being opened, unless the caller allows it explicitly.
"""

from __future__ import annotations

import codecs
import csv
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geohier import archives
from geohier.archives import is_archive_name
from geohier.errors import InputError

INVALID_EMPTY = "invalid coordinates (empty)"
INVALID_NUMBER = "invalid coordinates (not a number)"
INVALID_NAN = "invalid coordinates (NaN or infinite)"
INVALID_RANGE = "invalid coordinates (out of range)"
MISSING_REF = "no image id or path in the row"
OUTSIDE_ROOT = "outside images root"
DUPLICATE_KEY = "repeated image (first row kept)"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_KNOWN_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif"}


# Accepted CSV column names (compared case-insensitively, surrounding spaces ignored).
CSV_ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id", "img_id", "image_id", "photo_id", "imgid"),
    "path": ("path", "filename", "file_name", "file", "image", "img_path", "image_path",
             "filepath", "file_path", "img"),
    "lat": ("lat", "latitude", "gps_lat", "gps_latitude"),
    "lon": ("lon", "lng", "long", "longitude", "gps_lon", "gps_lng", "gps_longitude"),
    "sequence": ("sequence", "sequence_id", "seq", "seq_id"),
    "captured_at": ("captured_at", "timestamp", "datetime", "date_taken", "taken_at", "time"),
}
# Columns that only OSV-5M's train.csv / test.csv carry (besides id, latitude, longitude).
_OSV5M_MARKERS = {"thumb_original_url", "sequence", "captured_at", "unique_country", "land_cover",
                  "quadtree_10_1000", "creator_username", "road_index", "drive_side"}
@dataclass(frozen=True)
class CsvColumns:
    """Which header names of a CSV hold what, and which dataset it looks like."""

    lat: str
    lon: str
    id: str | None = None
    path: str | None = None
    sequence: str | None = None
    captured_at: str | None = None
    source: str = "csv"  # csv | osv5m | im2gps3k


def aliases(role: str) -> str:
    return ", ".join(CSV_ALIASES[role])


def match_columns(header: list[str], name: str = "the CSV") -> CsvColumns:
    """Map a CSV header to roles by alias (case-insensitive); raise InputError naming a
    missing column and the names accepted for it."""
    by_lower: dict[str, str] = {}
    for h in header:
        by_lower.setdefault((h or "").strip().lower(), h)

    def find(role: str) -> str | None:
        return next((by_lower[a] for a in CSV_ALIASES[role] if a in by_lower), None)

    found = {role: find(role) for role in CSV_ALIASES}
    shown = ", ".join(h for h in header if h) or "(none)"
    for role, label in (("lat", "latitude"), ("lon", "longitude")):
        if found[role] is None:
            raise InputError(f"{name} has no {label} column; accepted names (any case): "
                             f"{aliases(role)}. Columns found: {shown}")
    if found["id"] is None and found["path"] is None:
        raise InputError(f"{name} has no image id or path column; accepted names (any case): "
                         f"{aliases('id')} (an id) or {aliases('path')} (a path). Columns found: {shown}")
    lowered = set(by_lower)
    lat_name, lon_name = found["lat"].strip().lower(), found["lon"].strip().lower()
    id_name = (found["id"] or "").strip().lower()
    if id_name == "id" and (lat_name, lon_name) == ("latitude", "longitude") and lowered & _OSV5M_MARKERS:
        source = "osv5m"
    elif id_name == "img_id" and (lat_name, lon_name) == ("lat", "lon"):
        source = "im2gps3k"
    else:
        source = "csv"
    return CsvColumns(lat=found["lat"], lon=found["lon"], id=found["id"], path=found["path"],
                      sequence=found["sequence"], captured_at=found["captured_at"], source=source)


def parse_coordinate(text: str | None, limit: float) -> tuple[float | None, str | None]:
    """``(value, None)`` or ``(None, reason)`` for a latitude (limit 90) or longitude (180)."""
    text = (text or "").strip()
    if not text:
        return None, INVALID_EMPTY
    try:
        value = float(text)
    except ValueError:
        return None, INVALID_NUMBER
    if not math.isfinite(value):
        return None, INVALID_NAN
    if abs(value) > limit:
        return None, INVALID_RANGE
    return value, None


def parse_point(lat_text: str | None, lon_text: str | None) -> tuple[float, float, str | None]:
    """The one coordinate check of every CSV door (``import-csv``, ``evaluate --csv``, truth
    sets and prediction files): ``(lat, lon, None)``, or ``(nan, nan, reason)`` with reason
    one of the ``INVALID_*`` constants.

    >>> parse_point("48.85", " 2.29 ")
    (48.85, 2.29, None)
    >>> parse_point("10", "181")
    (nan, nan, 'invalid coordinates (out of range)')
    """
    lat, why = parse_coordinate(lat_text, 90.0)
    lon = None
    if why is None:
        lon, why = parse_coordinate(lon_text, 180.0)
    if why is not None:
        return math.nan, math.nan, why
    return lat, lon, None


def points(rows: list[dict], latcol: str, loncol: str) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """``parse_point`` over table rows: lat, lon (NaN where bad) and the reason per row
    (None where good)."""
    lat = np.full(len(rows), np.nan)
    lon = np.full(len(rows), np.nan)
    why: list[str | None] = [None] * len(rows)
    for i, r in enumerate(rows):
        lat[i], lon[i], why[i] = parse_point(r.get(latcol), r.get(loncol))
    return lat, lon, why


def check_text(path: Path) -> tuple[int, str]:
    """(data rows, delimiter) of a CSV: proves it is a non-empty UTF-8 CSV before anything
    is imported, and counts its records for the progress bar. Bytes that are not UTF-8, a
    NUL byte, a quote left open or followed by text, and a field longer than
    ``csv.field_size_limit()`` are an InputError naming the file and the line."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    newlines, first = 0, ""
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                bad = exc.object[exc.start] if exc.start < len(exc.object) else 0
                line = newlines + bytes(exc.object[: exc.start]).count(b"\n") + 1
                raise InputError(
                    f"{path} is not UTF-8 text (byte 0x{bad:02x} on line {line}); "
                    "save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet)") from None
            if not block:
                break
            nul = block.find(b"\0")
            if nul >= 0:
                line = newlines + block.count(b"\n", 0, nul) + 1
                raise InputError(f"{path}, line {line}: a NUL byte (0x00): this is not a text CSV "
                                 "(a spreadsheet or UTF-16 file? save it as 'CSV UTF-8')")
            if len(first) < 65536 and "\n" not in first:
                first += text
            newlines += block.count(b"\n")
    if not first.strip():
        raise InputError(f"{path} is empty: expected a header line such as 'path,lat,lon'")
    header = first.splitlines()[0]
    delimiter = max(",;\t|", key=header.count) if any(c in header for c in ",;\t|") else ","
    records = sum(1 for _, record in _records(path, delimiter) if record)
    return max(0, records - 1), delimiter


def _records(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) of each record (a blank line is ``[]``); a malformed one is an
    InputError naming the file and the line where the record starts."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        while True:
            start = reader.line_num + 1
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise InputError(_malformed(path, start, reader.line_num, exc)) from None
            yield start, record


def _malformed(path: Path, start: int, end: int, exc: csv.Error) -> str:
    where = f"line {start}" if end <= start else f"lines {start}-{end}"
    text = str(exc)
    if "field larger than field limit" in text:
        return (f"{path}, {where}: a field longer than {csv.field_size_limit():,} characters "
                "(a quote left open, or not a CSV of image paths and coordinates)")
    if "unexpected end of data" in text:
        return f"{path}, {where}: malformed CSV (a quote opened on line {start} is never closed)"
    return f"{path}, {where}: malformed CSV ({text})"


def header(path: Path, delimiter: str) -> list[str]:
    """The header fields of a CSV that ``check_text`` accepted ([] when none)."""
    for _, record in _records(path, delimiter):
        return record
    return []


def rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, {column: value}) of each data row, blank lines skipped (as ``csv.DictReader``:
    extra fields under the key None, missing ones None)."""
    names: list[str] | None = None
    for line, record in _records(path, delimiter):
        if names is None:
            names = record
            continue
        if not record:
            continue
        row = dict(zip(names, record, strict=False))
        if len(record) > len(names):
            row[None] = record[len(names):]
        elif len(record) < len(names):
            row.update(dict.fromkeys(names[len(record):]))
        yield line, row


def check_images_root(root: Path) -> None:
    """InputError unless ``root`` is a folder, a zip or an uncompressed tar (an images root:
    ``import-csv``, ``evaluate --csv`` and ``predict CSV`` alike)."""
    if root.is_dir():
        return
    if not root.exists():
        raise InputError(f"{root}: no such directory (--images-root)")
    if not is_archive_name(root):
        raise InputError(f"{root} is neither a directory nor a .zip or .tar (--images-root)")
    from geohier.archives import entries

    try:
        next(entries(root), None)  # lists it, indexes nothing
    except OSError as exc:
        raise InputError(f"{root}: not a readable zip or uncompressed tar (--images-root: {exc})") from None


class NameIndex:
    """Files (or archive members) by name, compact at millions: per entry a 64-bit hash of
    the looked-up name, its folder number and its extension number in numpy arrays (14 B),
    each folder once. An entry whose extension is one of ``stem_exts`` (any case) is found
    by its name or by its name without extension; another by its name. ``find`` rebuilds a
    hit from the name asked for (folder, name + extension): a hash collision gives a
    candidate that does not exist, which the caller's check drops, never a wrong file. The
    first entry added wins a repeated name (candidates come in the order added).

    >>> idx = NameIndex(IMAGE_EXTENSIONS)
    >>> idx.add("a/0", "123.jpg"); idx.add("a/0", "notes.txt"); idx.add("a/1", "123.JPG"); idx.freeze()
    >>> idx.find("123"), idx.find("123.JPG"), idx.find("notes.txt"), idx.find("124")
    ([('a/0', '123.jpg'), ('a/1', '123.JPG')], [('a/1', '123.JPG')], [('a/0', 'notes.txt')], [])
    """

    def __init__(self, stem_exts):
        import array

        self.stem_exts = {e.lower() for e in stem_exts}
        self.folders: list = []
        self._folder_no: dict = {}
        self.exts: list[str] = [""]  # 0: the key is the whole name
        self._ext_no: dict[str, int] = {"": 0}
        self._h, self._d, self._e = array.array("Q"), array.array("I"), array.array("H")
        self.hash = np.zeros(0, np.uint64)

    def add(self, folder, name: str) -> None:
        d = self._folder_no.get(folder)
        if d is None:
            d = self._folder_no[folder] = len(self.folders)
            self.folders.append(folder)
        stem, ext = os.path.splitext(name)
        if stem and ext.lower() in self.stem_exts:
            e = self._ext_no.get(ext)
            if e is None:
                e = self._ext_no[ext] = len(self.exts)
                self.exts.append(ext)
            key = stem
        else:
            e, key = 0, name
        self._h.append(archives.name_hash(key))
        self._d.append(d)
        self._e.append(e)

    def freeze(self) -> None:
        """Sort for lookups (after the last ``add``)."""
        h = np.frombuffer(self._h, dtype=np.uint64) if len(self._h) else np.zeros(0, np.uint64)
        order = np.argsort(h, kind="stable")  # the order added kept among equal hashes
        self.hash = h[order]
        self.dir = (np.frombuffer(self._d, dtype=np.uint32) if len(self._d) else np.zeros(0, np.uint32))[order]
        self.ext = (np.frombuffer(self._e, dtype=np.uint16) if len(self._e) else np.zeros(0, np.uint16))[order]
        self._h = self._d = self._e = None
        self._folder_no = {}

    def __len__(self) -> int:
        return int(self.hash.size)

    def _rows(self, key: str) -> range:
        return archives.hash_rows(self.hash, key)

    def find(self, name: str) -> list[tuple]:
        """``[(folder, entry name)]`` candidates for a name or an id without extension,
        best first."""
        out: list[tuple] = []
        stem, ext = os.path.splitext(name)
        if stem and ext.lower() in self.stem_exts:
            out += [(self.folders[self.dir[r]], name) for r in self._rows(stem) if self.exts[self.ext[r]] == ext]
        for r in self._rows(name):  # an id without extension, or a name not indexed by stem
            out.append((self.folders[self.dir[r]], name + self.exts[self.ext[r]]))
        return out


class FileIndex:
    """Every file under a folder by name (symlinked folders not followed), as ``Locator``
    needs it when a row's image is not at ``ROOT/<path or id>`` (OSV-5M unpacked into
    numbered sub-folders): an image file by its name or its name without extension, any
    other by its name, the first in walk order (folders and files sorted) first. A
    ``NameIndex``: 14 B a file (a dict of ``Path`` held ~440 B a file, 2.3 GB at 5 M).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "0").mkdir(); _ = (d / "0" / "123.jpg").write_bytes(b"")
    >>> idx = FileIndex(d)
    >>> [p.relative_to(d).as_posix() for p in idx.find("123")], idx.find("124")
    (['0/123.jpg'], [])
    """

    def __init__(self, root: str | os.PathLike):
        self.index = NameIndex(IMAGE_EXTENSIONS)
        for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False
            dirnames.sort()
            for f in sorted(filenames):
                self.index.add(dirpath, f)
        self.index.freeze()

    def __len__(self) -> int:
        return len(self.index)

    def find(self, name: str) -> list[Path]:
        """The candidate files for a row's file name or id, best first (the caller checks
        each on disk)."""
        return [Path(folder, f) for folder, f in self.index.find(name)]



class MemberIndex:
    """The image members of archives (``geohier.archives``: zips, tars), each indexed once
    by its file name without extension (OSV-5M's ``id``), whatever folders the archive
    holds inside; the first archive in name order wins a repeated name. A ``NameIndex``
    over (archive, folder inside): 14 B a member (OSV-5M's 4.9 M train images in ~70 MB)."""

    def __init__(self, archives: list[Path]):
        from geohier.archives import entries

        self.archives = [str(a) for a in archives]
        self.index = NameIndex(_KNOWN_SUFFIXES)
        self.unreadable: list[tuple[str, str]] = []
        for n, path in enumerate(self.archives):
            try:
                listed = list(entries(path))
            except OSError as exc:
                self.unreadable.append((path, str(exc)))
                continue
            for entry in listed:
                folder, _, base = entry.name.rpartition("/")
                stem, ext = os.path.splitext(base)
                if stem and not base.startswith(".") and ext.lower() in _KNOWN_SUFFIXES:
                    self.index.add((n, folder), base)
        self.index.freeze()

    def __len__(self) -> int:
        return len(self.index)

    def find(self, ref: str) -> str | None:
        """The member reference (``archive!/member``) of an id or file name, or None. With
        several candidates (a repeated name, or a hash collision) the first that is in its
        archive."""
        from geohier.archives import member_exists, member_ref

        base = ref.replace("\\", "/").rsplit("/", 1)[-1]
        hits = [member_ref(self.archives[n], f"{folder}/{name}" if folder else name)
                for (n, folder), name in self.index.find(base)]
        if len(hits) <= 1:
            return hits[0] if hits else None
        return next((h for h in hits if member_exists(h, confirm=True)), None)


class Locator:
    """Finds a CSV row's image under the images root: the path or id as given, with the
    known extensions tried when it has none, then by file name anywhere in the tree (an
    index built on the first miss; symlinked folders are not followed), then among the
    members of the zips and tars under the root (``MemberIndex``; the root may itself be
    one zip or tar). A member is returned as its reference ``archive!/member`` (a str),
    read in place by ``geohier.images.read_source``; a file as a resolved Path.

    The image must be inside the root: a ``../`` path, an absolute path elsewhere, or a
    symlink (file or folder) whose target is outside is refused with ``OUTSIDE_ROOT``
    before the file is opened — unless ``allow_outside``, the caller's explicit choice.
    An archive that is a symlink leading out of the root is not indexed (its images are
    "missing"). Found paths come back resolved (symlinks followed), so what is read is
    what was checked."""

    def __init__(self, root: str | os.PathLike, allow_outside: bool = False):
        root = Path(root)
        self.single_archive = root.is_file()
        self.root = root.parent if self.single_archive else root
        self.archive_root = root
        self.real_root = self.root.resolve()
        self.allow_outside = allow_outside
        self._index: FileIndex | None = None
        self._members: MemberIndex | None = None

    @property
    def members(self) -> MemberIndex:
        """The member index of the archives under the root (built on first use)."""
        if self._members is None:
            from geohier.archives import archives_under

            found = [a.resolve() for a in archives_under(self.archive_root)]
            self._members = MemberIndex([a for a in found if self.allow_outside or self._inside(a)])
        return self._members

    def _inside(self, path: Path) -> bool:
        return path == self.real_root or path.is_relative_to(self.real_root)

    def _lexically_inside(self, ref: Path) -> bool:
        """Whether a reference stays under the root by its text alone (no file touched)."""
        if ref.is_absolute():
            norm = Path(os.path.normpath(ref))
            return any(norm.is_relative_to(r) for r in (Path(os.path.normpath(self.root.absolute())), self.real_root))
        norm = os.path.normpath(ref)
        return norm != ".." and not norm.startswith(".." + os.sep)

    def locate(self, ref: str) -> tuple[Path | str | None, str | None]:
        """``(resolved path or member reference, None)``, ``(None, OUTSIDE_ROOT)`` or
        ``(None, None)`` (not found)."""
        ref_path = Path(ref)
        if not self.allow_outside and not self._lexically_inside(ref_path):
            return None, OUTSIDE_ROOT
        if self.single_archive:
            return self.members.find(ref), None
        base = ref_path if ref_path.is_absolute() else self.root / ref_path
        candidates = [base]
        if ref_path.suffix.lower() not in _KNOWN_SUFFIXES:
            candidates += [base.with_name(base.name + e) for e in IMAGE_EXTENSIONS]
            candidates += [base.with_name(base.name + e.upper()) for e in IMAGE_EXTENSIONS]
        outside = False
        for c in candidates:
            found, escaped = self._check(c)
            if found is not None:
                return found, None
            outside |= escaped
        if not outside and ref_path.name and ref_path.name not in (".", ".."):
            if self._index is None:
                self._index = FileIndex(self.root)
            for hit in self._index.find(ref_path.name):
                found, escaped = self._check(hit)
                if found is not None:
                    return found, None
                outside |= escaped
                if escaped:
                    break
            if not outside:
                member = self.members.find(ref_path.name)
                if member is not None:
                    return member, None
        return None, OUTSIDE_ROOT if outside else None

    def _check(self, candidate: Path) -> tuple[Path | None, bool]:
        """(resolved file, False) when ``candidate`` is a file allowed here; (None, True)
        when it leads outside the root; (None, False) when it is no file. Only stats and
        symlinks are read, never the file."""
        try:  # one stat turns away the usual miss (an id tried with each extension) cheaply
            os.stat(candidate)
        except (OSError, ValueError):  # absent, a dangling link, a loop, a NUL in the name
            return None, False
        try:
            real = candidate.resolve()
        except (OSError, RuntimeError):  # a symlink loop
            return None, False
        if not self.allow_outside and not self._inside(real):
            return None, real.exists()
        if real.is_file() and is_archive_name(real):  # an archive is no image: look inside
            return None, False
        return (real, False) if real.is_file() else (None, False)


# ---------------------------------------------------------------- keys and other systems' columns

#: Columns that name an image in a truth or prediction file, in order of preference.
KEY_ALIASES: tuple[str, ...] = ("image", "path", "id", "img_id", "image_id", "photo_id", "filename",
                                "file_name", "file", "img", "img_path", "image_path", "filepath")
#: Predicted coordinates in another system's output (pred_* preferred over plain lat/lon).
PRED_ALIASES: dict[str, tuple[str, ...]] = {
    "lat": ("pred_lat", "predicted_lat", "predicted_latitude", "pred_latitude", "lat", "latitude", "gps_lat"),
    "lon": ("pred_lon", "predicted_lon", "predicted_long", "predicted_lng", "predicted_longitude", "pred_lng",
            "pred_long", "pred_longitude", "lon", "lng", "long", "longitude", "gps_lon"),
}
#: True administrative areas a truth CSV may carry (OSV-5M's unique_* columns).
AREA_ALIASES: dict[str, tuple[str, ...]] = {
    "country": ("unique_country",),
    "region": ("unique_region",),
    "subregion": ("unique_sub-region", "unique_subregion"),
    "city": ("unique_city",),
}


def find_column(header: list[str], aliases: tuple[str, ...]) -> str | None:
    """The header name matching the first alias that occurs (case-insensitive), or None."""
    by_lower: dict[str, str] = {}
    for h in header:
        by_lower.setdefault((h or "").strip().lower(), h)
    return next((by_lower[a] for a in aliases if a in by_lower), None)


def image_key(ref: str) -> str:
    """How truth and prediction rows are matched: the file name without a known image
    extension, lower-cased ("im2gps/Abc_1.JPG" and "abc_1" are one image; an OSV-5M id
    "123" matches "123.jpg").

    >>> image_key("test/00/2351.JPG"), image_key("  2351 "), image_key("a.b_c")
    ('2351', '2351', 'a.b_c')
    """
    name = str(ref).strip().replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = name.rpartition(".")
    if dot and stem and f".{ext.lower()}" in _KNOWN_SUFFIXES:
        name = stem
    return name.lower()


def read_rows(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a UTF-8 CSV, as strings; InputError for a missing, empty, non-UTF-8
    or malformed file (naming the file and line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    _, delimiter = check_text(path)
    return header(path, delimiter), [row for _, row in rows(path, delimiter)]
