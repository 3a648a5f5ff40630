"""Import images into the workspace: photo folders (GPS from EXIF) and CSV manifests.

``import_photos(ws, DIR)`` and ``import_csv(ws, FILE, IMAGES_ROOT)`` are the plain
functions the CLI (``import-photos``, ``import-csv``) and the dashboard both call. Each file
is read once: hashed (sha256: the same bytes are never imported twice), identified and
checked from its header, then fully decoded at a small size (a truncated or corrupt file
is refused here, and its brightness measured). Good images are copied into
``data/images/`` (``workspace.write_image_file``: file first, then its row, so an
interrupted import never leaves a row without its file), or referenced where they are with
``link``. ``pipeline.image_check`` does this, in worker processes with ``--workers``.

Everything skipped is counted by reason in an ``ImportSummary``; a bad file is never an
error. Warnings that Pillow raises while reading a file ("Invalid APNG", "Corrupt EXIF
data") are counted there too, by message, with example files, and never printed raw. Only a missing folder or a CSV that cannot be used (no latitude column, not UTF-8,
empty) raises ``InputError``.

CSV columns are matched case-insensitively by alias (``CSV_ALIASES``): OSV-5M's
``id, latitude, longitude [, sequence, captured_at]``, Im2GPS3k's ``IMG_ID, LAT, LON``, or a
generic ``path|filename|image|img_path, lat, lon``. An image is looked up as
``IMAGES_ROOT/<path or id>``, with ``.jpg .jpeg .png .webp`` tried when the id has no
extension, then by file name anywhere under IMAGES_ROOT (OSV-5M unpacks into numbered
sub-folders). It must lie inside IMAGES_ROOT: a path that leads out (``../``, an absolute
path elsewhere, a symlink out) is counted as "outside images root" and never opened,
unless ``--allow-outside-root``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from geohier import grid
from geohier.archives import archives_under, member_ref
from geohier.errors import InputError
from geohier.exif import GPS_BROKEN, GPS_INVALID, GPS_MISSING
from geohier.images import READ_MISSING, READ_NOT_IMAGE
from geohier.tables import (  # the CSV formats at the doors, shared with evaluate and score
    CSV_ALIASES,
    MISSING_REF,
    CsvColumns,
    Locator,
    aliases,
    check_images_root,
    check_text,
    header,
    match_columns,
    parse_point,
    rows,
)
from geohier.workspace import Manifest, Workspace
from pipeline.image_check import MIN_FOR_WORKERS, Adder, auto_workers

Progress = Callable[[int, int], None]  # progress(done, total)

# Headline reasons, always shown in the summary (others appear when they happen: GPS_VOID,
# truncated images, EXIF without image data, camera raw files, ...).
MAIN_REASONS = (GPS_MISSING, READ_NOT_IMAGE, GPS_BROKEN, GPS_INVALID)
WARNINGS_LABEL = "library warnings"  # the summary line that totals them
MISSING_FILE = READ_MISSING




@dataclass
class ImportSummary:
    """What an import did: counts by outcome, skip reasons and the cells it filled."""

    source: str
    origin: str                       # the folder or CSV file imported
    total: int = 0                    # files (photos) or rows (CSV) looked at
    added: int = 0
    duplicates: int = 0
    skipped: Counter = field(default_factory=Counter)            # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few names
    cells: Counter = field(default_factory=Counter)              # compact L8 id -> images added
    interrupted: bool = False
    warnings: Counter = field(default_factory=Counter)           # warning message -> count
    warning_examples: dict[str, list[str]] = field(default_factory=dict)  # message -> first few names

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason] += 1
        names = self.examples.setdefault(reason, [])
        if len(names) < 5:
            names.append(name)

    def warn(self, message: str, name: str) -> None:
        """Count a warning a library raised while reading ``name``."""
        self.warnings[message] += 1
        names = self.warning_examples.setdefault(message, [])
        if len(names) < 5 and name not in names:
            names.append(name)

    def add(self, lat: float, lon: float) -> None:
        self.added += 1
        self.cells[grid.to_id(grid.cell(lat, lon, 8), sep="")] += 1

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def cells_at(self, level: int) -> Counter:
        """Images added per cell at ``level`` (<= 8), keyed by '/'-separated id."""
        out: Counter = Counter()
        for compact, n in self.cells.items():
            out["/".join(compact[:level])] += n
        return out

    def top_cells(self, n: int = 5, level: int = 8) -> list[tuple[str, int]]:
        return sorted(self.cells_at(level).items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def to_dict(self) -> dict:
        return {"source": self.source, "origin": self.origin, "total": self.total,
                "added": self.added, "duplicates": self.duplicates,
                "skipped": dict(self.skipped), "examples": dict(self.examples),
                "cells": {lv: len(self.cells_at(lv)) for lv in grid.DEFAULT_LEVELS},
                "top_cells": self.top_cells(), "interrupted": self.interrupted,
                "warnings": dict(self.warnings), "warning_examples": dict(self.warning_examples)}

    def lines(self) -> list[str]:
        """The summary as printed by the CLI: outcome counts (the usual reasons of this kind
        of import always, others when they happened; invalid coordinates broken down by
        why), examples of skipped files, and the cells filled."""
        what = "files" if self.source == "photos" else "rows"
        out = [f"{self.origin}: {self.total} {what} looked at"
               + (" (interrupted: run the same command again to continue)" if self.interrupted else "")]
        usual = MAIN_REASONS if self.source == "photos" else (GPS_INVALID, MISSING_FILE, READ_NOT_IMAGE)
        detail = {r: n for r, n in self.skipped.items() if r.startswith(GPS_INVALID + " (")}
        rows: list[tuple[str, str, int]] = [("added", "", self.added), ("duplicates", "", self.duplicates)]
        for reason in list(usual) + sorted(r for r in self.skipped if r not in usual and r not in detail):
            if reason == GPS_INVALID:
                rows.append((reason, "", self.skipped.get(reason, 0) + sum(detail.values())))
                rows += [(r, "  " + r[len(GPS_INVALID) + 2:-1], n) for r, n in sorted(detail.items())]
            else:
                rows.append((reason, "", self.skipped.get(reason, 0)))
        width = max(len(label or key) for key, label, _ in rows)
        for key, label, n in rows:
            line = f"  {label or key:<{width}}  {n}"
            names = self.examples.get(key, []) if n else []
            if names:
                line += "   e.g. " + ", ".join(names[:3]) + (" ..." if self.skipped[key] > 3 else "")
            out.append(line)
        if self.warnings:
            out.append(f"  {WARNINGS_LABEL:<{width}}  {sum(self.warnings.values())}"
                       "   (files read anyway; counted above by outcome)")
            for message, n in sorted(self.warnings.items(), key=lambda kv: (-kv[1], kv[0])):
                names = self.warning_examples.get(message, [])
                out.append(f"    {message}  {n}   e.g. " + ", ".join(names[:3])
                           + (" ..." if len(names) > 3 else ""))
        if self.added:
            touched = ", ".join(f"L{lv} {len(self.cells_at(lv))}" for lv in grid.DEFAULT_LEVELS)
            top = ", ".join(f"{c} ({n})" for c, n in self.top_cells())
            out.append(f"  cells touched: {touched}")
            out.append(f"  top L8 cells: {top}")
        return out


# ---------------------------------------------------------------- photo folders


def photo_files(root: str | os.PathLike, recursive: bool = True,
                exclude: tuple[Path, ...] = ()) -> list[Path]:
    """Files under ``root`` in a stable order, hidden files and folders (``.DS_Store``,
    ``.thumbnails``) and the ``exclude`` folders left out."""
    root = Path(root)
    if root.is_file():
        return [root]
    excluded = {p.resolve() for p in exclude}
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and (here / d).resolve() not in excluded)
        files.extend(here / f for f in sorted(filenames) if not f.startswith("."))
        if not recursive:
            break
    return files


def import_photos(ws: Workspace, root: str | os.PathLike, *, link: bool = False, recursive: bool = True,
                  progress: Progress | None = None, workers: int | None = 0) -> ImportSummary:
    """Import every photo with EXIF GPS under ``root`` (source "photos", source_id = its
    path relative to ``root``). Photos without a usable position are counted, not added.

    With ``link`` the manifest stores the photo's absolute path instead of a copy.
    A KeyboardInterrupt stops the import cleanly: the summary comes back with
    ``interrupted`` set and every row added so far has its file. ``workers`` processes
    read and check the photos (``pipeline.image_check``; None: ``auto_workers``).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise InputError(f"{root}: no such directory")
    files = photo_files(root, recursive, exclude=(ws.data_dir,))
    base = root if root.is_dir() else root.parent
    s = ImportSummary("photos", str(root))
    with ws.manifest() as m:
        try:
            with Adder(m, s, auto_workers(len(files)) if workers is None else workers) as adder:
                for i, path in enumerate(files):
                    rel = path.relative_to(base).as_posix()
                    s.total += 1
                    adder.add(path, rel, link=link, latlon=None, row={"source": "photos", "source_id": rel})
                    if progress:
                        progress(i + 1, len(files))
        except KeyboardInterrupt:
            s.interrupted = True
    return s


# ---------------------------------------------------------------- CSV manifests


def parse_time(text: str | None) -> str | None:
    """A capture time as ISO 8601 UTC: epoch seconds or milliseconds (OSV-5M), or an ISO
    string (naive ones are kept as they are); None when empty or unparseable."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(number):
            return None
        seconds = number / 1000.0 if abs(number) > 1e11 else number  # ms since 1973 vs s
        try:
            return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
        except (OverflowError, OSError, ValueError):
            return None
    try:
        when = datetime.fromisoformat(text.replace(" ", "T", 1) if "T" not in text else text)
    except ValueError:
        return None
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.isoformat(timespec="seconds")


def import_csv(ws: Workspace, csv_path: str | os.PathLike, images_root: str | os.PathLike, *,
               link: bool = False, copy: bool = False, allow_outside_root: bool = False,
               progress: Progress | None = None, workers: int | None = 0) -> ImportSummary:
    """Import the images a CSV lists with their coordinates (see the module docstring for
    the accepted columns). The source is "osv5m" or "im2gps3k" when the columns say so,
    else "csv"; source_id is the row's id (or path). A row whose source_id is already in
    the manifest is a duplicate without its file being read, so re-imports are fast.

    Images must lie inside ``images_root``: a row whose path leads out of it (``../``, an
    absolute path elsewhere, a symlink out) is skipped as ``OUTSIDE_ROOT`` without its file
    being opened, unless ``allow_outside_root``.

    ``images_root`` may be a folder of zips or tars (OSV-5M's ``images/test/00.zip …``,
    WebDataset shards), or one: an image found inside is read in place and stored as its
    member reference (``geohier.archives``), unless ``copy`` (then its bytes are copied into
    the workspace like a loose file's). ``link`` references loose files where they are.
    A malformed CSV (not UTF-8, NUL bytes,
    bad quoting, a field over 131,072 characters) is an InputError naming the line,
    raised before anything is imported. ``workers`` processes read and check the images
    (``pipeline.image_check``; None: ``auto_workers`` of the rows)."""
    csv_path = Path(csv_path).expanduser()
    images_root = Path(images_root).expanduser()
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: no such file" if not csv_path.exists() else f"{csv_path} is not a file")
    check_images_root(images_root)
    if link and copy:
        raise InputError("--link and --copy contradict each other: choose one")
    total, delimiter = check_text(csv_path)
    cols = match_columns(header(csv_path, delimiter), str(csv_path))
    locate = Locator(images_root, allow_outside=allow_outside_root)
    s = ImportSummary(cols.source, str(csv_path))
    with ws.manifest() as m:
        try:
            with Adder(m, s, auto_workers(total) if workers is None else workers) as adder:
                for done, (line, row) in enumerate(rows(csv_path, delimiter), start=1):
                    s.total += 1
                    _import_row(m, s, adder, cols, locate, line, row, link, copy)
                    if progress:
                        progress(done, max(total, done))
        except KeyboardInterrupt:
            s.interrupted = True
    return s


def _import_row(m: Manifest, s: ImportSummary, adder: Adder, cols: CsvColumns, locate: Locator, line: int,
                row: dict[str, str], link: bool, copy: bool = False) -> None:
    ident = (row.get(cols.id) or "").strip() if cols.id else ""
    ref = (row.get(cols.path) or "").strip() if cols.path else ""
    label = ident or ref or f"line {line}"
    lat, lon, why = parse_point(row.get(cols.lat), row.get(cols.lon))
    if why is not None:
        s.skip(why, f"line {line}")
        return
    if not (ident or ref):
        s.skip(MISSING_REF, f"line {line}")
        return
    source_id = ident or ref
    if m.has_source_id(cols.source, source_id):
        s.duplicates += 1
        return
    path, why = locate.locate(ref or ident)
    if path is None:
        s.skip(why or MISSING_FILE, label)
        return
    extra = {"source": cols.source, "source_id": source_id,
             "sequence_id": (row.get(cols.sequence) or "").strip() or None if cols.sequence else None,
             "captured_at": parse_time(row.get(cols.captured_at)) if cols.captured_at else None}
    in_place = link or (isinstance(path, str) and not copy)  # members stay in their archive
    adder.add(path, label, link=in_place, latlon=(lat, lon), row=extra)


# ---------------------------------------------------------------- WebDataset shards

WDS_SOURCE = "wds"
NO_METADATA = "no json with coordinates"
MAX_JSON_BYTES = 1 << 20
COMPRESSED_TAR = "compressed tar (no random access: gunzip it to a .tar first)"


def _wds_samples(tar: Path) -> Iterator[tuple[str, str | None, dict | None, str | None]]:
    """``(key, image member, metadata, problem)`` per sample of a WebDataset shard, in
    order. A sample is the members sharing a key (the path up to the first dot of the file
    name, WebDataset's rule); its image is the jpg/jpeg/png/webp member, its metadata the
    json one (read here, at most 1 MB)."""
    import tarfile

    key: str | None = None
    image: str | None = None
    meta: dict | None = None
    problem: str | None = None
    with tarfile.open(tar, mode="r:") as tf:
        for ti in tf:
            if not ti.isfile():
                continue
            folder, _, base = ti.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot or base.startswith("."):
                continue
            k = f"{folder}/{stem}" if folder else stem
            if k != key:
                if key is not None:
                    yield key, image, meta, problem
                key, image, meta, problem = k, None, None, None
            ext = ext.lower()
            if ext in ("jpg", "jpeg", "png", "webp") and image is None:
                image = ti.name
            elif ext == "json":
                if ti.size > MAX_JSON_BYTES:
                    problem = f"json over {MAX_JSON_BYTES:,} bytes"
                    continue
                try:
                    parsed = json.loads(tf.extractfile(ti).read())
                except (ValueError, UnicodeDecodeError) as exc:
                    problem = f"json not readable ({exc})"
                    continue
                if isinstance(parsed, dict):
                    meta = parsed
                else:
                    problem = "json is not an object"
        if key is not None:
            yield key, image, meta, problem


def _meta_value(meta: dict, role: str) -> str | None:
    lowered = {str(k).strip().lower(): v for k, v in meta.items()}
    for alias in CSV_ALIASES[role]:
        v = lowered.get(alias)
        if v is not None and not isinstance(v, (dict, list)):
            return str(v)
    return None


def import_wds(ws: Workspace, shards: str | os.PathLike | list, *, copy: bool = False,
               progress: Progress | None = None, workers: int | None = 0) -> ImportSummary:
    """Import WebDataset shards (osv5m-wds, PLONK's format): tars of ``<key>.jpg`` +
    ``<key>.json`` per sample, coordinates from the json (``latitude``/``longitude`` or
    any alias ``import-csv`` accepts; ``id``, ``sequence``, ``captured_at`` when present).
    ``shards``: tar files or folders of them. Images are read in place (member references
    into the tars, ``geohier.archives``) unless ``copy``. A compressed tar (.tar.gz) has no
    random access: it is counted and skipped. source "wds", source_id the json's id or
    the sample's key. A shard whose samples are already imported costs one pass over its
    headers and json members. ``workers`` processes read and check the images
    (``pipeline.image_check``; None: ``auto_workers`` of the shards' size, 100 kB a sample)."""
    items = shards if isinstance(shards, list) else [shards]
    tars: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if not p.exists():
            raise InputError(f"{p}: no such file or directory")
        found = [a for a in archives_under(p) if a.suffix.lower() == ".tar"] if p.is_dir() else [p]
        if p.is_dir() and not found:
            raise InputError(f"{p}: no .tar shards in it")
        tars += found
    import tarfile

    s = ImportSummary(WDS_SOURCE, ", ".join(str(Path(i)) for i in items))
    if workers is None:
        workers = auto_workers(sum(t.stat().st_size for t in tars) // 100_000)
    with ws.manifest() as m:
        try:
            with Adder(m, s, workers) as adder:
                for n, tar in enumerate(tars):
                    if _compressed(tar):
                        s.skip(COMPRESSED_TAR, str(tar))
                        continue
                    try:
                        samples = list(_wds_samples(tar.resolve()))
                    except (tarfile.TarError, OSError) as exc:
                        s.skip("unreadable tar", f"{tar} ({exc})")
                        continue
                    for key, member, meta, problem in samples:
                        s.total += 1
                        label = f"{tar.name}:{key}"
                        if member is None:
                            s.skip(READ_MISSING, label)
                            continue
                        if meta is None:
                            s.skip(problem or NO_METADATA, label)
                            continue
                        lat_text, lon_text = _meta_value(meta, "lat"), _meta_value(meta, "lon")
                        if lat_text is None or lon_text is None:
                            s.skip(NO_METADATA, label)
                            continue
                        lat, lon, why = parse_point(lat_text, lon_text)
                        if why is not None:
                            s.skip(why, label)
                            continue
                        source_id = _meta_value(meta, "id") or key
                        if m.has_source_id(WDS_SOURCE, source_id):
                            s.duplicates += 1
                            continue
                        ref = member_ref(tar.resolve(), member)
                        extra = {"source": WDS_SOURCE, "source_id": source_id,
                                 "sequence_id": _meta_value(meta, "sequence"),
                                 "captured_at": parse_time(_meta_value(meta, "captured_at"))}
                        adder.add(ref, label, link=not copy, latlon=(lat, lon), row=extra)
                    if progress:
                        progress(n + 1, len(tars))
        except KeyboardInterrupt:
            s.interrupted = True
    return s


def _compressed(tar: Path) -> bool:
    with open(tar, "rb") as f:
        head = f.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))


# ---------------------------------------------------------------- CLI


def _bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="img", file=sys.stderr, disable=None, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return bar, update


def _report(s: ImportSummary, ws: Workspace) -> int:
    print("\n".join(s.lines()))
    with ws.manifest() as m:
        summary = m.summary()
    print(f"manifest: {summary['images']} images in {summary['cells']} L8 cells ({ws.manifest_path})")
    return 130 if s.interrupted else 0


def _run(command: str, ws: Workspace, do_import: Callable[..., ImportSummary]) -> int:
    """Run one import with a progress bar on stderr, then print its summary."""
    bar, update = _bar(command)
    try:
        s = do_import(progress=update)
    finally:
        bar.close()
    return _report(s, ws)


def run_photos(args, ws: Workspace) -> int:
    return _run("import-photos", ws, lambda **kw: import_photos(
        ws, args.dir, link=args.link, recursive=args.recursive, workers=args.workers, **kw))


def run_csv(args, ws: Workspace) -> int:
    return _run("import-csv", ws, lambda **kw: import_csv(
        ws, args.file, args.images_root, link=args.link, copy=args.copy,
        allow_outside_root=args.allow_outside_root, workers=args.workers, **kw))


def run_wds(args, ws: Workspace) -> int:
    return _run("import-wds", ws, lambda **kw: import_wds(ws, list(args.shards), copy=args.copy,
                                                           workers=args.workers, **kw))


def _workers(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number of processes >= 0, got {text!r}")
    return n


def _workers_option(p) -> None:
    p.add_argument("--workers", type=_workers, default=None, metavar="N",
                   help="processes that read, hash and decode the images while this one writes the manifest "
                        f"(default auto: one per core, at most 8, from {MIN_FOR_WORKERS} images up; "
                        "0: all in this process)")


def register(sub) -> None:
    p = sub.add_parser(
        "import-photos", help="import a folder of geotagged photos (GPS from EXIF)",
        description="Import every photo under DIR that has an EXIF GPS position. Photos are copied "
                    "into the workspace (or referenced with --link) and de-duplicated by content; "
                    "files without GPS or that are not images are counted and skipped.")
    p.add_argument("dir", metavar="DIR", help="folder of photos (or one photo)")
    p.add_argument("--link", action="store_true",
                   help="reference the photos where they are instead of copying them (default: copy)")
    p.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=True,
                   help="descend into sub-folders (default: on; --no-recursive for DIR only)")
    _workers_option(p)
    p.set_defaults(func=run_photos)

    p = sub.add_parser(
        "import-csv", help="import images listed in a CSV with their coordinates (OSV-5M, Im2GPS3k, ...)",
        description="Import the images a CSV lists. Columns (any case): "
                    f"id ({aliases('id')}) or path ({aliases('path')}); latitude ({aliases('lat')}); "
                    f"longitude ({aliases('lon')}); optional sequence ({aliases('sequence')}) and "
                    f"capture time ({aliases('captured_at')}). Rows with invalid coordinates, "
                    "missing files or paths outside --images-root are counted and skipped.")
    p.add_argument("file", metavar="FILE", help="the CSV file (UTF-8; comma, semicolon or tab separated)")
    p.add_argument("--images-root", required=True, metavar="DIR",
                   help="folder the CSV's ids or paths are relative to (required); it may hold zips or "
                        "tars (OSV-5M's images/test/00.zip ..., WebDataset shards) or be one: their images "
                        "are found by file name without extension and read in place")
    p.add_argument("--link", action="store_true",
                   help="reference loose image files where they are instead of copying them (default: copy)")
    p.add_argument("--copy", action="store_true",
                   help="copy images found inside zips or tars into the workspace (default: read them in place)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="also import rows whose path leads outside --images-root (../, absolute paths, "
                        "symlinks out; default: skip and count them)")
    _workers_option(p)
    p.set_defaults(func=run_csv)

    p = sub.add_parser(
        "import-wds", help="import WebDataset shards (osv5m-wds, PLONK): tars of jpg + json per sample",
        description="Import the samples of WebDataset tar shards: each sample's image (jpg, png, webp) "
                    "with the coordinates of its json (latitude/longitude or lat/lon; id, sequence and "
                    "captured_at when present). Images are read in place from the tars (no extraction) "
                    "unless --copy. Samples without coordinates or image are counted and skipped.")
    p.add_argument("shards", metavar="SHARD", nargs="+", help="a .tar shard, or a folder of them")
    p.add_argument("--copy", action="store_true",
                   help="copy the images into the workspace (default: read them in place from the tars)")
    _workers_option(p)
    p.set_defaults(func=run_wds)
