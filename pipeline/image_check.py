"""Reading and checking one image for an import, in this process or in a pool of workers.

Every import door (``import-photos``, ``import-csv``, ``import-wds``) adds an image in two
steps:

1. ``check_image`` reads the file (or archive member), hashes it, reads its header (size,
   format, EXIF GPS and time) and decodes it at a small size (``BRIGHTNESS_SIDE``: a
   truncated or corrupt file is refused, its brightness measured); an image to be copied is
   written into the workspace (``workspace.write_image_file``: fsynced, renamed). It writes
   no manifest row and returns a ``Checked``, so it can run in another process.
2. ``Adder.commit`` writes the manifest row of what passed (pointing at the copy, or at the
   image where it is), and counts every outcome in the ``ImportSummary``. A row is only
   written once its file is in place, so an interrupted import never leaves a row without
   its file.

With ``workers`` the first step runs in that many worker processes while this one walks the
input and writes the manifest. Results are committed in input order, so an import gives the
same manifest and counts whatever the number of workers (the examples of a skip reason may
come in another order: rows refused before their image is read are counted at once). The workers look each
hash up in the manifest (read only) so that a re-import of the same bytes is not decoded; a
duplicate still in flight is caught when its row is inserted. Ctrl-C stops the import
cleanly: the workers ignore it, this process drops what it had not committed (a re-run adds
it), and the summary comes back marked ``interrupted``.

Measured by ``bench/import_csv.py``.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Protocol

from geohier.archives import read_member
from geohier.errors import WorkspaceError
from geohier.exif import GPS_MISSING
from geohier.images import (
    READ_MISSING,
    READ_UNREADABLE,
    ImageReadError,
    NamedBytes,
    brightness,
    collect_warnings,
    image_info,
    open_image,
)
from geohier.workspace import Manifest, open_read_only, sha256_bytes, write_image_file
from pipeline.workers import bare_main


class Counts(Protocol):
    """Where outcomes are counted (``pipeline.ingest.ImportSummary``)."""

    duplicates: int

    def skip(self, reason: str, name: str) -> None: ...

    def warn(self, message: str, name: str) -> None: ...

    def add(self, lat: float, lon: float) -> None: ...


# Brightness is a mean, and a JPEG decoded at 1/8 scale keeps every 8x8 block's mean: so the
# check decodes no larger than this (every byte is still decoded, so truncation is caught).
# At 256 a 512 x 384 OSV-5M-sized JPEG took 1.9 ms here, at 64 0.9 ms; the means agree to 0.06.
BRIGHTNESS_SIDE = 64
#: Results a worker may have ready ahead of the one being committed, per worker.
AHEAD_PER_WORKER = 16
#: Rows written per manifest transaction (a commit each cost 160 us a row more here), or
#: fewer when a second has passed or a worker's result is not ready: the write lock is never
#: held while waiting, so a concurrent import or ``labels`` waits at most about a second.
BATCH_ROWS = 256
BATCH_SECONDS = 1.0
#: Below this many images an import checks them in this process (starting workers costs
#: more than it saves).
MIN_FOR_WORKERS = 400


@dataclass
class Checked:
    """What reading one image found. ``skip`` is the reason it is not added (with
    ``label``, the name shown for it), else ``sha`` and the manifest fields in ``row``;
    ``duplicate`` when its bytes are already in the manifest; ``copy`` the path of the copy
    written (relative to the data folder) when it was to be copied; ``warnings`` what
    libraries warned while reading it."""

    sha: str | None = None
    row: dict = field(default_factory=dict)
    copy: str | None = None
    skip: str | None = None
    label: str | None = None
    duplicate: bool = False
    warnings: list[str] = field(default_factory=list)


def check_image(path: Path | str, name: str, latlon: tuple[float, float] | None, *,
                copy_into: str | os.PathLike | None = None, known_sha=None) -> Checked:
    """Read and check one image (a file path, or an archive member reference as a str).
    ``latlon`` None takes the position from its EXIF GPS. ``known_sha(sha) -> bool`` says
    whether the bytes are already in the manifest (then nothing is decoded). With
    ``copy_into`` (a workspace's data folder) a good image is copied there."""
    with collect_warnings() as seen:
        out = _check(path, name, latlon, copy_into, known_sha)
    out.warnings = seen
    return out


def _check(path, name, latlon, copy_into, known_sha) -> Checked:
    try:
        data = read_member(path) if isinstance(path, str) else path.read_bytes()
    except ImageReadError as exc:  # a member of a zip or tar
        return Checked(skip=exc.reason, label=f"{name} ({exc})" if exc.reason != READ_MISSING else name)
    except FileNotFoundError:
        return Checked(skip=READ_MISSING, label=name)
    except OSError as exc:
        return Checked(skip=READ_UNREADABLE, label=f"{name} ({exc.strerror or exc})")
    sha = sha256_bytes(data)
    if known_sha is not None and known_sha(sha):
        return Checked(sha=sha, duplicate=True)
    named = NamedBytes(data, str(path))
    try:
        info = image_info(named, decode=False)
        if latlon is None:
            if info.gps is None:
                return Checked(skip=info.gps_problem or GPS_MISSING, label=name)
            latlon = info.gps
        light = brightness(open_image(named, max_side=BRIGHTNESS_SIDE))  # every byte decoded: refuses truncation
    except ImageReadError as exc:
        return Checked(skip=exc.reason, label=name)
    lat, lon = latlon
    copy = write_image_file(copy_into, data, info.ext, sha) if copy_into is not None else None
    return Checked(sha=sha, copy=copy,
                   row={"captured_at": info.captured_at, "lat": lat, "lon": lon, "width": info.width,
                        "height": info.height, "brightness": round(light, 2)})


# ---------------------------------------------------------------- worker processes

_worker_db: sqlite3.Connection | None = None


def _worker_start(manifest: str) -> None:
    global _worker_db
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        _worker_db = open_read_only(manifest)
    except WorkspaceError:
        _worker_db = None  # then every image is decoded; the insert still refuses duplicates


def _worker_known(sha: str) -> bool:
    if _worker_db is None:
        return False
    try:
        return _worker_db.execute("SELECT 1 FROM images WHERE sha256 = ?", (sha,)).fetchone() is not None
    except sqlite3.Error:
        return False


def _worker_check(path, name, latlon, copy_into) -> Checked:
    return check_image(path, name, latlon, copy_into=copy_into, known_sha=_worker_known)


def auto_workers(images: int) -> int:
    """Worker processes for an import of ``images``: none for a small one, else one per
    core (at most 8: the single writer keeps up with about that many)."""
    if images < MIN_FOR_WORKERS:
        return 0
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, n) if n > 1 else 0


# ---------------------------------------------------------------- committing


@contextmanager
def _ctrl_c_deferred():
    """SIGINT held back in this thread for the block (delivered, as KeyboardInterrupt, when
    it ends); a plain block where signals cannot be masked."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Adder:
    """Adds images to a manifest, checked here (``workers`` 0) or in worker processes.

    ``add`` takes one image; its outcome reaches the summary at once (``workers`` 0) or
    when its turn comes; ``finish`` commits what is still in flight, ``abort`` drops it.
    Use as a context manager: leaving by an exception aborts."""

    def __init__(self, m: Manifest, s: Counts, workers: int = 0):
        self.m, self.s = m, s
        self.workers = max(0, int(workers))
        self.pool: ProcessPoolExecutor | None = None
        self.pending: deque[tuple[Future, tuple]] = deque()
        self._batch, self._since = 0, 0.0

    def __enter__(self) -> Adder:
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:
            self.finish()
        else:
            self.abort()

    def add(self, path: Path | str, name: str, *, link: bool, latlon: tuple[float, float] | None,
            row: dict) -> None:
        """Check and add one image (see ``check_image``); ``link`` stores its path (or
        member reference) instead of a copy; ``row`` has the other manifest fields."""
        where = (path, name, link, row)
        copy_into = None if link else str(self.m.data_dir)
        if not self.workers:
            self.commit(check_image(path, name, latlon, copy_into=copy_into, known_sha=self.m.has_sha), *where)
            return
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                            initializer=_worker_start, initargs=(str(self.m.path),))
        with bare_main():  # a submit may start a worker (pipeline.workers)
            future = self.pool.submit(_worker_check, path, name, latlon, copy_into)
        self.pending.append((future, where))
        while len(self.pending) > AHEAD_PER_WORKER * self.workers:
            self._commit_next()

    def _commit_next(self) -> None:
        future, where = self.pending.popleft()
        if not future.done():
            self._end_batch()  # never hold the write lock while waiting
        try:
            checked = future.result()
        except BrokenProcessPool:
            raise WorkspaceError(
                f"a worker process died while reading {where[1]} or an image near it (out of memory, or a "
                "crash in an image decoder); every row added before it is kept: run the same command again "
                "with --workers 0 to find the image") from None
        self.commit(checked, *where)

    def _write(self) -> None:
        """Before a manifest write: open a batch transaction unless one is open."""
        if not self.m.conn.in_transaction:
            self.m.conn.execute("BEGIN IMMEDIATE")
            self._batch, self._since = 0, time.monotonic()
        self._batch += 1

    def _end_batch(self, force: bool = False) -> None:
        if self.m.conn.in_transaction and (force or self._batch >= BATCH_ROWS
                                           or time.monotonic() - self._since > BATCH_SECONDS):
            self.m.conn.execute("COMMIT")

    def finish(self) -> None:
        """Commit every image still in flight, then stop the workers."""
        try:
            while self.pending:
                self._commit_next()
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop what is in flight (not checked yet: a re-run adds it), keep the rows
        written (each has its file), and stop the workers."""
        try:
            self._end_batch(force=True)
        except sqlite3.Error:  # the commit failed (a full disk): the batch goes, the error that led here stays
            self.m.conn.rollback()
        finally:
            for future, _ in self.pending:
                future.cancel()
            self.pending.clear()
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = None

    def commit(self, c: Checked, path: Path | str, name: str, link: bool, row: dict) -> None:
        """Store one checked image and count its outcome. Ctrl-C waits until both are done:
        a row written but not counted (the interrupt landing just after the insert) would
        make the summary disagree with the manifest."""
        with _ctrl_c_deferred():
            self._commit(c, path, name, link, row)
        self._end_batch()  # after skips too: a long run of them never holds the write lock

    def _commit(self, c: Checked, path: Path | str, name: str, link: bool, row: dict) -> None:
        s = self.s
        for message in c.warnings:
            s.warn(message, name)
        if c.skip is not None:
            s.skip(c.skip, c.label or name)
            return
        if c.duplicate or (self.workers and self.m.has_sha(c.sha)):  # in process, check_image looked
            s.duplicates += 1
            return
        self._write()
        # the caller's fields win over the EXIF time; what the check measured wins over the caller
        row = {"captured_at": c.row["captured_at"], **{k: v for k, v in row.items() if v is not None}}
        row.update({k: c.row[k] for k in ("lat", "lon", "width", "height", "brightness")})
        new_id = self._store(c, path, link, row)
        if new_id is None and row.get("source_id") is not None and not self.m.has_sha(c.sha):
            # Same source_id, different bytes (IMG_0001.JPG of another camera folder, or an
            # edited photo): keep both, the new one under an id qualified by its content.
            row["source_id"] = f"{row['source_id']}#{c.sha[:12]}"
            new_id = self._store(c, path, link, row)
        if new_id is None:
            s.duplicates += 1
        else:
            s.add(row["lat"], row["lon"])

    def _store(self, c: Checked, path: Path | str, link: bool, row: dict) -> int | None:
        if link:  # a file where it is, or a member read in place from its (resolved) archive
            return self.m.add_image(sha256=c.sha, path=path if isinstance(path, str) else str(path.resolve()), **row)
        return self.m.add_image(sha256=c.sha, path=c.copy, **row)
