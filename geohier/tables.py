"""CSV tables at the doors: the column names geohier accepts, and reading them safely.

One definition of the CSV formats for everything that reads coordinates from a table
(``import-csv``, ``evaluate --csv``, ``score``'s truth and prediction files):

- geohier's own ``path, lat, lon``;
- OSV-5M's ``test.csv`` / ``train.csv`` (``id, latitude, longitude, thumb_original_url,
  country, sequence, captured_at, ..., unique_country, ...``);
- Im2GPS3k's and YFCC4k's ``IMG_ID, AUTHOR, LAT, LON, ...`` (CRLF line endings).

Columns are matched case-insensitively by alias (``CSV_ALIASES``); a missing one is an
InputError that names it and the names accepted for it. Files must be UTF-8 (a BOM is
fine); the delimiter is the most frequent of , ; tab | in the header line.
"""

from __future__ import annotations

import codecs
import csv
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from geohier.errors import InputError

INVALID_EMPTY = "invalid coordinates (empty)"
INVALID_NUMBER = "invalid coordinates (not a number)"
INVALID_NAN = "invalid coordinates (NaN or infinite)"
INVALID_RANGE = "invalid coordinates (out of range)"
MISSING_REF = "no image id or path in the row"

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



def check_text(path: Path) -> tuple[int, str]:
    """(data rows, delimiter) of a CSV: proves it is non-empty UTF-8 before anything is
    imported, and counts lines for the progress bar."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    newlines, first, last = 0, "", b"\n"
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
            if len(first) < 65536 and "\n" not in first:
                first += text
            newlines += block.count(b"\n")
            last = block[-1:]
    if not first.strip():
        raise InputError(f"{path} is empty: expected a header line such as 'path,lat,lon'")
    header = first.splitlines()[0]
    delimiter = max(",;\t|", key=header.count) if any(c in header for c in ",;\t|") else ","
    lines = newlines + (last != b"\n")  # a last line without its newline still counts
    return max(0, lines - 1), delimiter


def rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, str]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            if reader.fieldnames is None:
                return
            for row in reader:
                yield reader.line_num, row
        except csv.Error as exc:
            raise InputError(f"{path}, line {reader.line_num}: malformed CSV ({exc})") from None


class Locator:
    """Finds a CSV row's image under images_root (direct path, known extensions, then a
    by-name index of the whole tree built on the first miss)."""

    def __init__(self, root: Path):
        self.root = root
        self._index: dict[str, Path] | None = None

    def _build_index(self) -> dict[str, Path]:
        index: dict[str, Path] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for f in sorted(filenames):
                p = Path(dirpath) / f
                index.setdefault(f, p)
                if Path(f).suffix.lower() in IMAGE_EXTENSIONS:
                    index.setdefault(Path(f).stem, p)
        return index

    def find(self, ref: str) -> Path | None:
        ref_path = Path(ref)
        base = ref_path if ref_path.is_absolute() else self.root / ref_path
        candidates = [base]
        if ref_path.suffix.lower() not in _KNOWN_SUFFIXES:
            candidates += [base.with_name(base.name + e) for e in IMAGE_EXTENSIONS]
            candidates += [base.with_name(base.name + e.upper()) for e in IMAGE_EXTENSIONS]
        for c in candidates:
            if c.is_file():
                return c
        if self._index is None:
            self._index = self._build_index()
        return self._index.get(ref_path.name)




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
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f, delimiter=delimiter), [])
    return header, [row for _, row in rows(path, delimiter)]
