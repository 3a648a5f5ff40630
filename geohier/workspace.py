"""Where things live on disk, and the image manifest.

A workspace is a data directory and a models directory (defaults ``data/`` and
``models/``; ``GEOHIER_DATA`` / ``GEOHIER_MODELS`` or the CLI's ``--data`` / ``--models``
override them)::

    data/
      manifest.sqlite     one row per image (WAL mode: pages read while imports write)
      images/ab/<sha256>.jpg
      hierarchy.json      classes per level (pipeline labels)
      cache/              derived tables (geography per level, ...)
    models/<run>/         one training run each

The manifest stores every image's finest grid cell (``MANIFEST_LEVEL``) as a compact id
(``"01230112"``): the cell of any coarser level is a prefix, so per-level counts are sums
over prefixes of one ``GROUP BY cell``, which SQLite answers from the cell index in order.

Writes are crash-safe in this order: the image file is written to a temporary name in
its final directory (a name unique to the writer: concurrent imports never touch each
other's) and renamed into place, then its row is inserted (sha256 is UNIQUE, so two imports
of the same bytes racing each other leave one row).
An interrupted import can leave a file without a row (harmless, reused on the next
import of the same bytes), never a row without its file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from geohier import grid
from geohier.errors import GeohierError, InputError, WorkspaceError
from geohier.fileio import (  # re-exported: the one atomic writer lives in geohier.fileio
    atomic_write_bytes,
    atomic_write_text,  # noqa: F401 - re-exported for the callers that import it from here
    remove_stale_temps,
)

MANIFEST_LEVEL = 8
SPLITS = ("train", "val", "test")

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id          INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,              -- demo | photos | csv | mapillary
    source_id   TEXT,                       -- id within the source (Mapillary id, file name)
    sequence_id TEXT,                       -- capture sequence, for leak-free splits
    lat         REAL NOT NULL,
    lon         REAL NOT NULL,
    captured_at TEXT,                       -- ISO 8601, UTC
    cell        TEXT NOT NULL,              -- compact id at MANIFEST_LEVEL
    path        TEXT NOT NULL,              -- relative to the data dir, or absolute if linked
    width       INTEGER,
    height      INTEGER,
    brightness  REAL,                       -- mean grey level 0-255
    sha256      TEXT NOT NULL UNIQUE,
    split       TEXT CHECK (split IS NULL OR split IN ('train', 'val', 'test')),
    added_at    TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS images_source_id ON images(source, source_id)
    WHERE source_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS images_cell ON images(cell);
CREATE INDEX IF NOT EXISTS images_source_split ON images(source, split);  -- summary() without a table scan
CREATE TABLE IF NOT EXISTS fetch_log (
    cell   TEXT PRIMARY KEY,                -- the fetched cell's id, e.g. '0/1/2/3/0/1/1/2'
    status TEXT NOT NULL,                   -- done | empty | error | partial
    found  INTEGER NOT NULL DEFAULT 0,
    kept   INTEGER NOT NULL DEFAULT 0,
    error  TEXT,
    at     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fetch_progress (
    cell   TEXT NOT NULL,                   -- the fetched cell's id, as in fetch_log
    subbox INTEGER NOT NULL,                -- position in the cell's sub-box visiting order
    plan   TEXT NOT NULL,                   -- the sub-box layout it refers to (nx x ny, seed)
    found  INTEGER NOT NULL DEFAULT 0,
    kept   INTEGER NOT NULL DEFAULT 0,
    at     TEXT NOT NULL,
    PRIMARY KEY (cell, subbox)
);
"""

IMAGE_COLUMNS = ("id", "source", "source_id", "sequence_id", "lat", "lon", "captured_at", "cell",
                 "path", "width", "height", "brightness", "sha256", "split", "added_at")


def utcnow() -> str:
    """Now, as an ISO 8601 UTC timestamp with seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, or of a member of a zip or tar (``geohier.archives``; OSError
    when it cannot be read)."""
    from geohier import archives

    if archives.is_member(path):
        try:
            return sha256_bytes(archives.read_member(os.fspath(path)))
        except GeohierError as exc:
            raise OSError(str(exc)) from None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; {} when the file is missing, unreadable or not an object."""
    try:
        d = json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def json_safe(x):
    """``x`` made JSON-safe: NaN / infinity -> None, numpy scalars -> Python, keys -> str."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


@dataclass(frozen=True)
class Workspace:
    """The data and models directories of one project."""

    data_dir: Path
    models_dir: Path

    @classmethod
    def from_env(cls, data: str | os.PathLike | None = None,
                 models: str | os.PathLike | None = None) -> Workspace:
        """Explicit paths win, then GEOHIER_DATA / GEOHIER_MODELS, then data/ and models/."""
        d = Path(data or os.environ.get("GEOHIER_DATA") or "data").expanduser().resolve()
        m = Path(models or os.environ.get("GEOHIER_MODELS") or "models").expanduser().resolve()
        return cls(d, m)

    @property
    def manifest_path(self) -> Path:
        return self.data_dir / "manifest.sqlite"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def hierarchy_path(self) -> Path:
        return self.data_dir / "hierarchy.json"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    def has_manifest(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> Manifest:
        """Open (creating if needed) the image manifest."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return Manifest(self.manifest_path, self.data_dir)

    def resolve(self, stored_path: str) -> Path:
        """The absolute path of an image from its manifest ``path`` column."""
        p = Path(stored_path)
        return p if p.is_absolute() else self.data_dir / p


_swept_folders: set[str] = set()


def open_read_only(manifest: str | os.PathLike) -> sqlite3.Connection:
    """A read-only connection to a manifest: nothing is created, migrated or locked for
    writing (a merge's sources, an import worker's duplicate lookups). Opened by its file
    URI, so a path with ``#`` or ``?`` is read as a path. WorkspaceError when it is no
    readable manifest."""
    manifest = Path(manifest)
    try:
        con = sqlite3.connect(f"{manifest.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
        con.execute("SELECT 1 FROM images LIMIT 1").fetchall()
    except sqlite3.DatabaseError as exc:
        raise WorkspaceError(f"cannot read the manifest {manifest}: {exc}") from None
    return con


def write_image_file(data_dir: str | os.PathLike, data: bytes, ext: str, sha: str | None = None) -> str:
    """Put image bytes at ``images/<sha[:2]>/<sha>.<ext>`` under ``data_dir`` (atomically:
    a temporary file, fsynced, renamed) unless that file is there; returns the path
    relative to ``data_dir``, as the manifest stores it. Safe to call from several
    processes at once (each writes its own temporary file; the bytes are the same).

    A writer killed mid-write (kill -9) may have left its temporary file: those of ended
    writers (and any over an hour old) are removed the first time this process writes into
    a folder. Not on every write: a folder holds ~20,000 files at 5 M images, and reading
    it took 25 ms a write."""
    sha = sha or sha256_bytes(data)
    rel = f"images/{sha[:2]}/{sha}.{ext.lstrip('.').lower()}"
    dest = Path(data_dir) / rel
    if not dest.exists():
        folder = os.path.abspath(dest.parent)
        if folder not in _swept_folders:
            remove_stale_temps(dest.parent)
            _swept_folders.add(folder)
        atomic_write_bytes(dest, data)
    return rel


def _use_wal(conn: sqlite3.Connection, wait_s: float) -> None:
    """Put the database in WAL mode (a setting the file keeps), waiting out other openers.

    Switching into WAL takes an exclusive lock, and SQLite answers "database is locked" at once
    instead of calling the busy handler: two processes opening a new manifest together (two
    ``import-photos`` in parallel) failed that way about one time in twenty. A file already in WAL
    is left alone; otherwise the switch is retried until ``wait_s`` has passed.
    """
    deadline = time.monotonic() + wait_s
    delay = 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


class Manifest:
    """The SQLite image manifest of a workspace.

    Use one Manifest per thread (sqlite3 connections are not shared across threads).
    """

    def __init__(self, path: str | os.PathLike, data_dir: str | os.PathLike):
        self.path = Path(path)
        self.data_dir = Path(data_dir)
        try:
            self.conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self.conn.execute("PRAGMA busy_timeout=30000")
            _use_wal(self.conn, wait_s=30.0)
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise WorkspaceError(f"cannot open the manifest {self.path}: {exc}") from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    # ------------------------------------------------------------ reading

    def count(self, where: str = "", params: tuple = ()) -> int:
        sql = "SELECT COUNT(*) FROM images" + (f" WHERE {where}" if where else "")
        return int(self.conn.execute(sql, params).fetchone()[0])

    def has_sha(self, sha: str) -> bool:
        return self.conn.execute("SELECT 1 FROM images WHERE sha256 = ?", (sha,)).fetchone() is not None

    def has_source_id(self, source: str, source_id: str) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM images WHERE source = ? AND source_id = ?", (source, source_id)
        ).fetchone()
        return row is not None

    @staticmethod
    def _select(columns: Iterable[str], where: str) -> tuple[list[str], str]:
        cols = list(columns)
        bad = [c for c in cols if c not in IMAGE_COLUMNS]
        if bad:
            raise InputError(f"unknown manifest column(s) {bad}; known: {', '.join(IMAGE_COLUMNS)}")
        return cols, f"SELECT {', '.join(cols)} FROM images" + (f" WHERE {where}" if where else "") + " ORDER BY id"

    def frame(self, columns: Iterable[str] = IMAGE_COLUMNS, where: str = "",
              params: tuple = ()) -> pd.DataFrame:
        """Rows of the images table as a DataFrame."""
        _, sql = self._select(columns, where)
        return pd.read_sql_query(sql, self.conn, params=params)

    def frames(self, columns: Iterable[str] = IMAGE_COLUMNS, where: str = "", params: tuple = (),
               chunk: int = 100_000) -> Iterator[pd.DataFrame]:
        """``frame`` in pieces of at most ``chunk`` rows, in id order: a large manifest read in
        bounded memory (5 M sha256 strings as one DataFrame are ~1 GB)."""
        cols, sql = self._select(columns, where)
        cur = self.conn.execute(sql, params)
        while rows := cur.fetchmany(chunk):
            yield pd.DataFrame.from_records(rows, columns=cols)

    def points(self, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
        """(lat, lon) arrays of every image, in id order.

        Read ``chunk`` rows at a time into float64 arrays: 16 bytes an image, not a Python
        tuple of two floats each (5 M images: ~160 MB at the peak, not ~1 GB)."""
        cur = self.conn.execute("SELECT lat, lon FROM images ORDER BY id")
        parts = []
        while rows := cur.fetchmany(chunk):
            parts.append(np.array(rows, dtype=np.float64))
        arr = np.concatenate(parts) if parts else np.empty((0, 2), dtype=np.float64)
        return arr[:, 0], arr[:, 1]

    def points_in(self, keys, level: int) -> tuple[np.ndarray, np.ndarray]:
        """(lat, lon) of the images in the cells ``keys`` of ``level`` (<= MANIFEST_LEVEL),
        cell by cell in the order given. A cell is a range of the stored compact ids (its id
        and every id it prefixes), so each is one search of the cell index, not a table scan.

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d, Manifest(f"{d}/m.sqlite", d) as m:
        ...     _ = m.add_rows({"source": ["csv"] * 3, "lat": [48.85, -33.9, 48.9], "lon": [2.35, 18.4, 2.4],
        ...                     "sha256": ["a", "b", "c"], "path": ["x"] * 3})
        ...     m.points_in(grid.encode([48.85], [2.35], 3), 3)[0].tolist()
        [48.85, 48.9]
        """
        level = self._stored_level(level)
        parts = []
        for prefix in grid.keys_to_ids(np.asarray(keys, dtype=np.int64).ravel(), level, sep=""):
            rows = self.conn.execute("SELECT lat, lon FROM images WHERE cell >= ? AND cell < ? ORDER BY id",
                                     (prefix, prefix + "4")).fetchall()  # digits are 0-3: "4" ends the range
            if rows:
                parts.append(np.array(rows, dtype=np.float64))
        arr = np.concatenate(parts) if parts else np.empty((0, 2), dtype=np.float64)
        return arr[:, 0], arr[:, 1]

    def _stored_level(self, level: int) -> int:
        level = grid.check_level(level)
        if level > MANIFEST_LEVEL:
            raise InputError(f"the manifest stores cells down to level {MANIFEST_LEVEL}, not {level}")
        return level

    def count_levels(self, levels: Iterable[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """{level: (keys ascending, images)} of the cells with images at each of ``levels``
        (<= MANIFEST_LEVEL), from one ``GROUP BY cell``: SQLite walks the cell index in order
        (no sort, no table read) and returns at most 4^MANIFEST_LEVEL rows; coarser levels
        are sums over key prefixes."""
        levels = [self._stored_level(lv) for lv in levels]
        rows = self.conn.execute("SELECT cell, COUNT(*) FROM images GROUP BY cell").fetchall()
        fine = grid.compact_ids_to_keys([r[0] for r in rows], MANIFEST_LEVEL)
        n = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
        out = {}
        for lv in levels:
            keys, inv = np.unique(fine >> (2 * (MANIFEST_LEVEL - lv)), return_inverse=True)
            out[lv] = keys.astype(np.int64), np.bincount(inv, weights=n, minlength=keys.size).astype(np.int64)
        return out

    def count_keys(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, counts) of the cells with images at ``level`` (<= MANIFEST_LEVEL), keys ascending."""
        return self.count_levels([level])[self._stored_level(level)]

    def counts(self, level: int) -> dict[str, int]:
        """Images per cell at ``level`` (<= MANIFEST_LEVEL), keyed by the '/'-separated id."""
        keys, n = self.count_keys(level)
        return dict(zip(grid.keys_to_ids(keys, level), n.tolist(), strict=True))

    def summary(self) -> dict:
        """Images, cells with data at MANIFEST_LEVEL, per-source and per-split counts.

        Two index walks (``images_source_split``, ``images_cell``), never the table itself."""
        by_source: dict[str, int] = {}
        by_split: dict[str, int] = {}
        for source, split, n in self.conn.execute(
                "SELECT source, split, COUNT(*) FROM images GROUP BY source, split"):
            by_source[source] = by_source.get(source, 0) + n
            key = split if split is not None else "unassigned"
            by_split[key] = by_split.get(key, 0) + n
        cells = self.conn.execute("SELECT COUNT(DISTINCT cell) FROM images").fetchone()[0]
        return {"images": sum(by_source.values()), "cells": int(cells),
                "by_source": by_source, "by_split": by_split}

    # ------------------------------------------------------------ writing

    def add_image(self, *, source: str, lat: float, lon: float, sha256: str, path: str,
                  source_id: str | None = None, sequence_id: str | None = None,
                  captured_at: str | None = None, width: int | None = None,
                  height: int | None = None, brightness: float | None = None,
                  split: str | None = None) -> int | None:
        """Insert one image row; returns its id, or None when the sha256 or the
        (source, source_id) is already there. The file at ``path`` must already exist."""
        c = grid.cell(lat, lon, MANIFEST_LEVEL)
        try:
            cur = self.conn.execute(
                "INSERT INTO images (source, source_id, sequence_id, lat, lon, captured_at, cell, path,"
                " width, height, brightness, sha256, split, added_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (source, source_id, sequence_id, float(lat), float(lon), captured_at,
                 grid.to_id(c, sep=""), str(path), width, height, brightness, sha256, split, utcnow()),
            )
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" not in str(exc):  # a CHECK / NOT NULL failure is bad input, not a duplicate
                raise InputError(f"cannot add image {sha256} ({source}, {source_id}): {exc}") from None
            return None
        return int(cur.lastrowid)

    def store_image(self, data: bytes, ext: str, **row) -> int | None:
        """Write image bytes into images/<sha[:2]>/<sha>.<ext> (atomically) and insert the
        row (``add_image`` keywords, without sha256/path). Returns the new id, or None for a
        duplicate (nothing is written then)."""
        sha = sha256_bytes(data)
        if self.has_sha(sha):
            return None
        return self.add_image(sha256=sha, path=write_image_file(self.data_dir, data, ext, sha), **row)

    def add_rows(self, rows, chunk: int = 100_000) -> int:
        """Insert many image rows: the bulk form of ``add_image``, for rows whose files are
        already in place (a merge of workspaces, a benchmark's synthetic manifest).

        ``rows`` is a DataFrame (or a mapping of equal-length columns) with ``source``,
        ``lat``, ``lon``, ``sha256`` and ``path``, and any other of ``IMAGE_COLUMNS`` but
        ``id``, ``cell`` and ``added_at``: the cell is computed here, vectorised, and one
        timestamp is stamped on every row. The rows go in by ``executemany``, one transaction
        per ``chunk`` rows (so the WAL stays small and an interrupted call keeps whole
        chunks); a row whose sha256 or (source, source_id) is already there is skipped, as
        ``add_image`` skips a duplicate. Returns how many rows were inserted.

        Bad input (an unknown column, a missing required value, a coordinate that is not a
        valid point, an unknown split) is an InputError before anything is written.

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d, Manifest(f"{d}/m.sqlite", d) as m:
        ...     n = m.add_rows({"source": ["csv"] * 2, "lat": [48.85, 48.85], "lon": [2.35, 2.35],
        ...                     "sha256": ["a" * 64, "a" * 64], "path": ["x.jpg", "x.jpg"]})
        ...     n, m.counts(3)
        (1, {'1/0/2': 1})
        """
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(dict(rows))
        allowed = [c for c in IMAGE_COLUMNS if c not in ("id", "cell", "added_at")]
        bad = [c for c in df.columns if c not in allowed]
        if bad:
            raise InputError(f"add_rows: unknown or computed column(s) {bad}; give some of {', '.join(allowed)}")
        required = ("source", "lat", "lon", "sha256", "path")
        missing = [c for c in required if c not in df.columns or df[c].isna().any()]
        if missing:
            raise InputError(f"add_rows: column(s) {missing} missing or with empty values")
        lat = df["lat"].to_numpy(np.float64)
        lon = df["lon"].to_numpy(np.float64)
        ok = grid.valid_points(lat, lon)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise InputError(f"add_rows: row {i} has no valid point ({lat[i]}, {lon[i]})")
        if "split" in df.columns:
            unknown = set(df["split"].dropna().unique()) - set(SPLITS)
            if unknown:
                raise InputError(f"add_rows: unknown split(s) {sorted(unknown)}; use {', '.join(SPLITS)}")
        cols = [c for c in allowed if c in df.columns]
        sql = (f"INSERT OR IGNORE INTO images ({', '.join(cols)}, cell, added_at)"
               f" VALUES ({', '.join('?' * (len(cols) + 2))})")
        now = utcnow()
        before = self.conn.total_changes
        for start in range(0, len(df), max(int(chunk), 1)):
            part = df.iloc[start:start + chunk]
            keys = grid.encode(lat[start:start + chunk], lon[start:start + chunk], MANIFEST_LEVEL)
            values = [part[c].astype(object).where(part[c].notna(), None).tolist() for c in cols]
            values += [grid.keys_to_ids(keys, MANIFEST_LEVEL, sep=""), [now] * len(part)]
            with self.transaction() as conn:
                conn.executemany(sql, zip(*values, strict=True))
        return self.conn.total_changes - before

    def set_splits(self, assignment: Mapping[int, str] | None = None, *, ids=None, splits=None) -> None:
        """Set the split of many images by id, in one transaction: ``{id: split}``, or the
        parallel arrays ``ids=`` and ``splits=`` (each id once; ``labels`` passes 5 M).

        Per split, the ids go into a temporary table and one ``UPDATE ... WHERE id IN`` sets
        them in SQLite's own loop, skipping rows that already hold that split (an UPDATE
        statement per row took 41 s for 5 M rows; this takes seconds)."""
        if assignment is not None:
            ids, splits = list(assignment.keys()), list(assignment.values())
        ids = np.asarray([] if ids is None else ids, dtype=np.int64).ravel()
        names = np.asarray([] if splits is None else splits).ravel()  # "<U5" from labels: compared in C
        if names.size != ids.size:
            raise InputError(f"set_splits: {ids.size} ids but {names.size} splits")
        masks = {split: names == split for split in SPLITS}
        known = np.logical_or.reduce(list(masks.values())) if ids.size else np.ones(0, dtype=bool)
        if not known.all():
            bad = sorted({str(x) for x in names[~known]})
            raise InputError(f"unknown split(s) {bad}; use {', '.join(SPLITS)}")
        with self.transaction() as conn:
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS split_ids (id INTEGER PRIMARY KEY)")
            for split, mask in masks.items():
                chosen = np.sort(ids[mask])
                if not chosen.size:
                    continue
                conn.execute("DELETE FROM split_ids")
                for start in range(0, chosen.size, 500_000):  # Python ints for a chunk at a time
                    conn.executemany("INSERT OR IGNORE INTO split_ids (id) VALUES (?)",
                                     zip(chosen[start:start + 500_000].tolist()))
                conn.execute("UPDATE images SET split = ? WHERE split IS NOT ? AND id IN (SELECT id FROM split_ids)",
                             (split, split))
            conn.execute("DROP TABLE split_ids")

    def log_fetch(self, cell_id: str, status: str, found: int = 0, kept: int = 0,
                  error: str | None = None) -> None:
        self.conn.execute(
            "INSERT INTO fetch_log (cell, status, found, kept, error, at) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(cell) DO UPDATE SET status=excluded.status, found=excluded.found,"
            " kept=excluded.kept, error=excluded.error, at=excluded.at",
            (cell_id, status, int(found), int(kept), error, utcnow()),
        )

    def fetch_status(self) -> dict[str, dict]:
        rows = self.conn.execute("SELECT cell, status, found, kept, error, at FROM fetch_log").fetchall()
        return {r[0]: {"status": r[1], "found": r[2], "kept": r[3], "error": r[4], "at": r[5]} for r in rows}

    # fetch_progress: the sub-boxes of a cell that a fetch has finished (for resuming it)

    def fetch_progress(self, cell_id: str) -> list[tuple[int, str, int]]:
        """(sub-box position, plan signature, images found) of each finished sub-box of a cell."""
        return [(int(r[0]), r[1], int(r[2])) for r in self.conn.execute(
            "SELECT subbox, plan, found FROM fetch_progress WHERE cell = ?", (cell_id,)).fetchall()]

    def fetch_progress_counts(self) -> dict[str, int]:
        """Finished sub-boxes per cell."""
        return dict(self.conn.execute("SELECT cell, COUNT(*) FROM fetch_progress GROUP BY cell").fetchall())

    def record_subbox(self, cell_id: str, subbox: int, plan: str, found: int, kept: int) -> None:
        """Mark one sub-box of a cell finished (replacing an earlier record of it)."""
        self.conn.execute(
            "INSERT OR REPLACE INTO fetch_progress (cell, subbox, plan, found, kept, at) VALUES (?, ?, ?, ?, ?, ?)",
            (cell_id, int(subbox), plan, int(found), int(kept), utcnow()))

    def clear_fetch_progress(self, cell_id: str) -> None:
        """Forget a cell's finished sub-boxes (the cell is finished, or its layout changed)."""
        self.conn.execute("DELETE FROM fetch_progress WHERE cell = ?", (cell_id,))
