"""``python -m pipeline fetch``: street-level images from the Mapillary API v4 image search.

For every cell of a list (pipeline.fetch_cells), the cell is searched through sub-boxes
no larger than the API's bbox limit (0.01 deg² by default), visited in a spread-out
order, until the per-cell target is met or the sub-boxes run out. The requests, their
retries and the API's error classes are pipeline.mapillary's; this module orchestrates.

Each candidate goes through the filters (panoramas skipped unless asked for; spatial
de-duplication in metres against every image already in the workspace and every image
kept by this run, pipeline.dedup; mean grey level of the thumbnail), and a kept thumbnail
is stored with ``Manifest.store_image`` (temporary file + rename, then the row), so even
``kill -9`` leaves no partial image and no row without its file.

Cells run side by side as tasks of a ``ThreadPoolExecutor`` (``concurrency`` workers,
each cell with its own manifest connection); a run over fewer cells than that searches
sub-boxes ahead on a second executor, and thumbnails download on a third, so up to
``concurrency`` searches and as many thumbnail downloads are in flight. One global rate
limit spaces the API requests evenly; a rate-limit answer pauses every worker as long as
the API says (the progress bar shows it). Transient faults are retried with exponential
backoff; the API's "Please reduce the amount of data" answer splits the sub-box in four.
A rejected token (code 190, HTTP 401, ...) or a refused field (code 100) stops the whole
fetch at once. A cell ends as ``done``, ``empty`` (the API answered and nothing was
usable) or ``error`` with the reason, never ``empty`` because of an error.

Progress is kept in the manifest (``fetch_log`` per cell, ``fetch_progress`` per
sub-box), so a rerun, also after a fetch that stopped early, skips done and empty cells
and continues the others where they stopped. The access token comes from
MAPILLARY_ACCESS_TOKEN or ``--token-file``; it is used for one call and never printed,
logged, stored, or put in an exception message (the CLI says which of the two it sends to
which host, never the token).

Bounds (pipeline.mapillary): ``--timeout`` is a deadline for each request as a whole, so a
server that drips its answer ends the request after about that long; Ctrl-C or the stop
event ends every request in flight at once (finished cells stay recorded); answers are read
against ``--max-json-mb`` / ``--max-thumb-mb``; a thumbnail URL on a host the API does not
serve thumbnails from is skipped and counted, never requested.

The dashboard calls :func:`fetch` (in a background thread, with a progress callback and
a stop event); the CLI below is a thin parser over the same function.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field

from geohier import grid
from geohier.errors import InputError
from geohier.images import image_info
from geohier.progress import progress_bar
from geohier.workspace import MANIFEST_LEVEL, Manifest, Workspace
from pipeline.dedup import Dedup
from pipeline.fetch_cells import parse_shard, select_cells, sort_cells, split4, subboxes
from pipeline.mapillary import (
    API_MAX_LIMIT,
    DEFAULT_API,
    MAX_JSON_MB,
    MAX_THUMB_MB,
    THUMB_SIZES,
    TOKEN_ENV,
    Candidate,
    Client,
    ForeignHost,
    ReduceData,
    RequestFailed,
    Stopped,
    TooLarge,
    bbox_param,
    check_token,
    is_official_api,
    origin,
    parse_record,
    read_token,
    search_fields,
    thumb_field,
)

__all__ = ["Dedup", "FetchOptions", "FetchPlan", "FetchProgress", "FetchReport", "clean_stale_temps", "fetch",
           "parse_shard", "plan", "read_token", "select_cells", "subboxes"]

SOURCE = "mapillary"
MAX_SPLIT_DEPTH = 2           # "reduce the amount of data": split a sub-box up to 4**2 ways


# --------------------------------------------------------------------------- options


@dataclass
class FetchOptions:
    """Everything a fetch can be tuned with (never the token)."""

    per_cell: int = 100             # target images per cell
    api_url: str = DEFAULT_API
    thumb: str = "1024"             # 256 | 1024 | 2048 | original
    max_bbox_deg2: float = 0.01     # the API's bbox area limit
    page_limit: int = 200           # images asked for per search request (API max 2000)
    include_pano: bool = False
    min_brightness: float = 40.0    # mean grey level 0-255 of the thumbnail
    dedup_m: float = 100.0          # minimum distance to any other image; 0 disables
    concurrency: int = 8            # searches in flight, and as many thumbnail downloads
    rate_limit: float = 3000.0      # API requests per minute; 0 = unlimited
    timeout_s: float = 30.0         # one request as a whole: connect and every read
    max_json_mb: float = MAX_JSON_MB    # cap on one API answer's body
    max_thumb_mb: float = MAX_THUMB_MB  # cap on one thumbnail's bytes
    retries: int = 6                # retries of one request after the first attempt
    backoff_s: float = 1.0          # first retry delay; doubles each retry (with jitter)
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 600.0
    seed: int = 0                   # sub-box visiting order
    tmp_grace_s: float = 60.0       # stale-temp cleanup: only temp files older than this

    def validate(self) -> FetchOptions:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise InputError(msg)

        need(int(self.per_cell) >= 1, f"--per-cell must be >= 1, got {self.per_cell!r}")
        need(str(self.thumb) in THUMB_SIZES,
             f"--thumb must be one of {', '.join(THUMB_SIZES)}, got {self.thumb!r}")
        need(re.match(r"^https?://[^\s/]+", str(self.api_url)) is not None,
             f"--api-url must be an http(s) URL, got {self.api_url!r}")
        need(0 < self.max_bbox_deg2 <= 100, f"the bbox limit must be within (0, 100] deg², got {self.max_bbox_deg2!r}")
        need(1 <= int(self.page_limit) <= API_MAX_LIMIT,
             f"the page limit must be within [1, {API_MAX_LIMIT}], got {self.page_limit!r}")
        need(0 <= self.min_brightness <= 255, f"--min-brightness must be within [0, 255], got {self.min_brightness!r}")
        need(self.dedup_m >= 0, f"--dedup-m must be >= 0, got {self.dedup_m!r}")
        need(1 <= int(self.concurrency) <= 256, f"--concurrency must be within [1, 256], got {self.concurrency!r}")
        need(self.rate_limit >= 0, f"--rate-limit must be >= 0 (0 = unlimited), got {self.rate_limit!r}")
        need(self.timeout_s > 0, f"the timeout must be > 0 s, got {self.timeout_s!r}")
        need(0 < self.max_json_mb <= 4096, f"--max-json-mb must be within (0, 4096], got {self.max_json_mb!r}")
        need(0 < self.max_thumb_mb <= 4096, f"--max-thumb-mb must be within (0, 4096], got {self.max_thumb_mb!r}")
        need(int(self.retries) >= 0, f"retries must be >= 0, got {self.retries!r}")
        need(self.backoff_s >= 0 and self.backoff_max_s >= 0, "backoff delays must be >= 0")
        self.thumb = str(self.thumb)
        self.api_url = str(self.api_url).rstrip("/")
        return self

    @property
    def thumb_field(self) -> str:
        return thumb_field(self.thumb)

    @property
    def fields(self) -> str:
        return search_fields(self.thumb)

    def client(self, token: str, stop: threading.Event | None = None) -> Client:
        """A Mapillary client with these options' timeouts, retries and rate limit."""
        return Client(self.api_url, token, stop, timeout_s=self.timeout_s, retries=self.retries,
                      backoff_s=self.backoff_s, backoff_max_s=self.backoff_max_s,
                      max_retry_after_s=self.max_retry_after_s, rate_limit=self.rate_limit,
                      max_json_bytes=int(self.max_json_mb * 2**20), max_thumb_bytes=int(self.max_thumb_mb * 2**20))


# --------------------------------------------------------------------------- results


@dataclass
class CellResult:
    cell: str
    status: str          # done | empty | error | partial
    found: int = 0       # images the API returned inside the cell (all runs)
    kept: int = 0        # Mapillary images of the cell in the manifest now
    new: int = 0         # kept by this run
    error: str | None = None


@dataclass
class FetchProgress:
    """A snapshot for progress displays (the CLI's tqdm bar, the Data page)."""

    cells_total: int           # cells this run works on (finished ones excluded)
    cells_finished: int        # of those, ended this run (done, empty, error)
    done: int
    empty: int
    errors: int
    images_kept: int
    api_requests: int
    thumb_requests: int
    retries: int
    elapsed_s: float
    rate_limited: int = 0      # rate-limit answers so far
    backoff_s: float = 0.0     # seconds every worker still waits because of one (0: none)

    @property
    def requests_per_s(self) -> float:
        return (self.api_requests + self.thumb_requests) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def fraction(self) -> float:
        return self.cells_finished / self.cells_total if self.cells_total else 1.0


@dataclass
class FetchReport:
    cells: int = 0                     # cells asked for
    skipped: int = 0                   # already done or empty before this run
    done: int = 0
    empty: int = 0
    error: int = 0
    partial: int = 0                   # stopped before finishing
    images_kept: int = 0
    api_requests: int = 0
    thumb_requests: int = 0
    retries: int = 0
    rate_limited: int = 0              # rate-limit answers (every worker paused each time)
    elapsed_s: float = 0.0
    stopped: bool = False
    errors: list[tuple[str, str]] = field(default_factory=list)  # (cell, reason)
    filtered: dict[str, int] = field(default_factory=dict)        # reason -> images dropped

    def summary(self) -> str:
        drop = ", ".join(f"{k} {v}" for k, v in sorted(self.filtered.items()) if v)
        text = (f"{self.images_kept} images kept; cells: {self.done} done, {self.empty} empty, "
                f"{self.error} error, {self.partial} unfinished, {self.skipped} already finished; "
                f"{self.api_requests} API requests, {self.thumb_requests} thumbnails, {self.retries} retries "
                + (f"({self.rate_limited} rate limited) " if self.rate_limited else "")
                + f"in {self.elapsed_s:.1f} s")
        return text + (f"; dropped: {drop}" if drop else "")

    def to_dict(self) -> dict:
        return asdict(self)


def _decode(data: bytes):
    """(width, height, brightness) of image bytes, or None when they are not a whole image."""
    try:  # header size, then a full decode at <= 256 px: a thumbnail cut short fails here
        info = image_info(bytes(data), max_side=256)
    except InputError:
        return None
    return info.width, info.height, info.brightness


def _cell_filter(c: grid.Cell) -> tuple[str, tuple]:
    """SQL (where, params) selecting the cell's images from the manifest."""
    if c.level <= MANIFEST_LEVEL:
        p = grid.to_id(c, sep="")
        return "cell >= ? AND cell < ?", (p, p + "4")
    b = grid.bounds(c)
    return "lat >= ? AND lat <= ? AND lon >= ? AND lon < ?", (b.south, b.north, b.west, b.east)


def clean_stale_temps(ws: Workspace, older_than_s: float = 60.0) -> int:
    """Remove the temporary files that an interrupted write left under images/
    (``geohier.fileio.remove_stale_temps`` in each folder: a killed writer's at once, any
    older than ``older_than_s``), so that a concurrent writer is never hit."""
    from geohier.fileio import remove_stale_temps

    root = ws.images_dir
    if not root.is_dir():
        return 0
    return sum(remove_stale_temps(sub.path, older_than_s=older_than_s)
               for sub in os.scandir(root) if sub.is_dir(follow_symlinks=False))


class _Fetcher:
    def __init__(self, ws: Workspace, options: FetchOptions, token: str, stop: threading.Event):
        self.ws = ws
        self.o = options
        self.stop = stop
        self.client = options.client(token, stop)
        self.counters = self.client.counters
        self._filtered_lock = threading.Lock()
        self.filtered: dict[str, int] = {}
        self.thumbs = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="thumb")
        self.searches = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="search")
        self.lookahead = 1
        self.dedup: Dedup | None = None

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            with self._filtered_lock:
                self.filtered[reason] = self.filtered.get(reason, 0) + n

    # ---------------------------------------------------------------- one cell

    def cell(self, m: Manifest, cell_id: str) -> CellResult:
        o = self.o
        c = grid.from_id(cell_id)
        sb = subboxes(cell_id, o.max_bbox_deg2, o.seed)
        where, params = _cell_filter(c)
        rows = m.fetch_progress(cell_id)
        if any(r[1] != sb.signature for r in rows):  # another layout: its positions mean other boxes
            m.clear_fetch_progress(cell_id)
            rows = []
        done_pos = {r[0] for r in rows}
        found = sum(r[2] for r in rows)
        have = m.count(f"source = ? AND {where}", (SOURCE, *params))
        new = 0
        answered = 0
        error = None
        transient_failures: list[str] = []
        # Searches run ahead of the filtering by ``lookahead`` sub-boxes (on the search
        # pool), so that a run over few cells still keeps ``concurrency`` requests busy;
        # their answers are used in visiting order.
        positions = iter([pos for pos in range(len(sb)) if pos not in done_pos])
        ahead: deque = deque()

        def fill() -> None:
            while len(ahead) < self.lookahead and have + new < o.per_cell:
                pos = next(positions, None)
                if pos is None:
                    return
                ahead.append((pos, self.searches.submit(self._search, sb.box(pos), 0)))

        try:
            fill()
            while ahead and have + new < o.per_cell:
                pos, fut = ahead.popleft()
                try:
                    f, k, failures = self._subbox(m, c, sb.box(pos), o.per_cell - have - new, 0, fut)
                except RequestFailed as exc:
                    error = f"sub-box {pos} {bbox_param(sb.box(pos))}: {exc}"
                    break
                answered += 1
                found += f
                new += k
                if failures:
                    transient_failures.extend(failures)
                else:
                    m.record_subbox(cell_id, pos, sb.signature, f, k)
                fill()
        except Stopped:
            if answered or new or rows:
                m.log_fetch(cell_id, "partial", found, have + new, None)
            return CellResult(cell_id, "partial", found, have + new, new)
        finally:
            for _, fut in ahead:  # searches no longer needed (target met, error, stop)
                fut.cancel()
        kept = have + new
        if kept >= o.per_cell:
            status, error = "done", None
        elif error is not None or transient_failures:
            # never "empty" because of an error: the cell stays open for a rerun
            status = "error"
            error = error or f"{len(transient_failures)} thumbnail download(s) failed: {transient_failures[0]}"
        else:
            status = "done" if kept else "empty"  # every sub-box answered
        with m.transaction():
            m.log_fetch(cell_id, status, found, kept, error)
            if status in ("done", "empty"):
                m.clear_fetch_progress(cell_id)
        return CellResult(cell_id, status, found, kept, new, error)

    def _search(self, box, depth: int) -> list:
        return self.client.search(box, self.o.fields, self.o.page_limit, reduce_ok=depth < MAX_SPLIT_DEPTH)

    def _subbox(self, m: Manifest, c: grid.Cell, box, need: int, depth: int,
                search=None) -> tuple[int, int, list[str]]:
        """Search one box (or take the answer of ``search``, a future) and keep up to
        ``need`` images: (found, kept, transient failures)."""
        o = self.o
        try:
            records = search.result() if search is not None else self._search(box, depth)
        except ReduceData:  # too much at once for the API: ask for the quarters instead
            found = kept = 0
            failures: list[str] = []
            for quarter in split4(box):
                if kept >= need:
                    break
                f, k, fl = self._subbox(m, c, quarter, need - kept, depth + 1)
                found, kept = found + f, kept + k
                failures += fl
            return found, kept, failures
        cands: list[Candidate] = []
        seen: set[str] = set()
        bad = 0
        for rec in records:
            cand = parse_record(rec, o.thumb_field)
            if cand is None:
                bad += 1
                continue
            if cand.id in seen:
                continue
            seen.add(cand.id)
            if grid.cell(cand.lat, cand.lon, c.level) != c:  # on the border: the neighbour's
                continue
            cands.append(cand)
        self.drop("malformed record", bad)
        found = len(cands)
        usable = []
        for cand in cands:
            if cand.is_pano and not o.include_pano:
                self.drop("panorama")
            elif cand.thumb_url is None:
                self.drop("no thumbnail")
            elif not self.client.thumb_host_ok(cand.thumb_url):
                self.drop("thumbnail on a foreign host")  # never requested
            elif m.has_source_id(SOURCE, cand.id):
                pass  # kept by an earlier run
            else:
                usable.append(cand)
        kept, failures = self._take(m, usable, need)
        return found, kept, failures

    def _take(self, m: Manifest, pending: list[Candidate], need: int) -> tuple[int, list[str]]:
        """Reserve, download, filter and store candidates until ``need`` are kept."""
        kept = 0
        failures: list[str] = []
        while kept < need and pending:
            batch, rest = [], []
            for cand in pending:
                if len(batch) < need - kept and self.dedup.reserve(cand.id, cand.lat, cand.lon):
                    batch.append(cand)
                else:
                    rest.append(cand)
            if not batch:
                self.drop("near-duplicate", len(rest))
                break
            futures = [self.thumbs.submit(self._download, cand.thumb_url) for cand in batch]
            for cand, fut in zip(batch, futures, strict=True):
                outcome, info = fut.result()
                if outcome == "ok":
                    data, (width, height, bright) = info
                    if bright < self.o.min_brightness:
                        self.drop("dark")
                    else:
                        row_id = m.store_image(
                            data, "jpg", source=SOURCE, source_id=cand.id, sequence_id=cand.sequence,
                            lat=cand.lat, lon=cand.lon, captured_at=cand.captured_at,
                            width=width, height=height, brightness=round(bright, 2))
                        if row_id is not None:
                            kept += 1
                            continue
                        self.drop("same bytes as a stored image")
                elif outcome == "bad":
                    self.drop("unreadable thumbnail")
                elif outcome == "gone":
                    self.drop("thumbnail unavailable")
                elif outcome in ("big", "foreign"):
                    self.drop("thumbnail over the size cap" if outcome == "big" else "thumbnail on a foreign host")
                else:
                    failures.append(info)
                self.dedup.release(cand.id)
            pending = rest
        return kept, failures

    def _download(self, url: str):
        """("ok", (bytes, (w, h, brightness))) | ("bad" | "gone" | "big" | "foreign" | "failed", why)."""
        for _ in range(2):  # one more try for a thumbnail cut short in transit
            try:
                data = self.client.thumbnail(url)
            except TooLarge as exc:
                return "big", str(exc)
            except ForeignHost as exc:
                return "foreign", str(exc)
            except RequestFailed as exc:
                return ("failed" if exc.transient else "gone"), str(exc)
            info = _decode(data)
            if info is not None:
                return "ok", (data, info)
        return "bad", "not a whole image"


def fetch(ws: Workspace, cells: Sequence[str], options: FetchOptions | None = None, token: str | None = None, *,
          progress: Callable[[FetchProgress], None] | None = None,
          stop_event: threading.Event | None = None, progress_every_s: float = 0.25) -> FetchReport:
    """Fetch Mapillary images for ``cells`` into the workspace; returns a FetchReport.

    ``token`` is used for this call only (sent in the API's Authorization header) and
    never stored. ``progress`` is called from the calling thread with a FetchProgress
    about every ``progress_every_s`` seconds and once at the end. Setting ``stop_event``
    stops the run soon after (unfinished cells are logged ``partial`` and a rerun
    continues them). Cells already ``done`` or ``empty`` in the manifest are skipped.

    Raises TokenError when the token is missing or rejected, ParameterError when the API
    refuses a field (either stops every worker at once; the cells finished so far stay
    recorded and a rerun continues where this one stopped).
    """
    o = (options or FetchOptions()).validate()
    token = check_token(token)
    t0 = time.monotonic()
    cells = sort_cells(cells)
    report = FetchReport(cells=len(cells))
    stop = threading.Event()
    clean_stale_temps(ws, o.tmp_grace_s)
    with ws.manifest() as m:  # opening it creates its tables, before the workers start
        status = m.fetch_status()
        lat, lon = m.points()
    todo = [c for c in cells if status.get(c, {}).get("status") not in ("done", "empty")]
    report.skipped = len(cells) - len(todo)
    f = _Fetcher(ws, o, token, stop)
    f.dedup = Dedup(lat, lon, o.dedup_m)
    f.lookahead = max(1, o.concurrency // max(1, len(todo)))
    del lat, lon
    fatal: BaseException | None = None
    new_images = 0

    def one_cell(cell_id: str) -> CellResult | None:
        if stop.is_set():  # queued before a stop: left for the next run
            return None
        try:
            with ws.manifest() as m:  # sqlite connections are per thread: one per cell task
                return f.cell(m, cell_id)
        except BaseException:
            stop.set()  # a rejected token, a refused field, or a bug: stop every worker now
            raise

    def snapshot() -> FetchProgress:
        return FetchProgress(len(todo), report.done + report.empty + report.error, report.done, report.empty,
                             report.error, new_images, f.counters.api_requests, f.counters.thumb_requests,
                             f.counters.retries, time.monotonic() - t0, f.counters.rate_limited,
                             f.client.limiter.paused_for())

    def take(fut: Future) -> None:
        nonlocal fatal, new_images
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            fatal = fatal or exc
            return
        r: CellResult | None = fut.result()
        if r is None:
            return
        new_images += r.new
        if r.status == "partial":
            report.partial += 1
        else:
            setattr(report, r.status, getattr(report, r.status) + 1)
        if r.status == "error":
            report.errors.append((r.cell, r.error or "unknown error"))

    pool = ThreadPoolExecutor(max_workers=min(o.concurrency, max(1, len(todo))), thread_name_prefix="fetch-cell")
    pending: set[Future] = set()
    try:
        pending = {pool.submit(one_cell, c) for c in todo}
        last = 0.0
        while pending:
            finished, pending = wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)
            for fut in finished:
                take(fut)
            if stop_event is not None and stop_event.is_set():
                stop.set()
            if progress is not None and time.monotonic() - last >= progress_every_s:
                last = time.monotonic()
                progress(snapshot())
    except BaseException:
        stop.set()  # Ctrl-C: the running cells log themselves partial, the queued ones never start
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in pending:  # those that ran to the end while we were leaving
            if fut.done():
                take(fut)
        f.searches.shutdown(wait=True, cancel_futures=True)
        f.thumbs.shutdown(wait=True, cancel_futures=True)
        f.client.close()
    report.images_kept = new_images
    report.api_requests = f.counters.api_requests
    report.thumb_requests = f.counters.thumb_requests
    report.retries = f.counters.retries
    report.rate_limited = f.counters.rate_limited
    report.filtered = dict(f.filtered)
    report.stopped = stop.is_set() and fatal is None
    report.elapsed_s = time.monotonic() - t0
    if progress is not None:
        progress(snapshot())
    if fatal is not None:
        raise fatal
    return report


# --------------------------------------------------------------------------- the plan


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class FetchPlan:
    cells: list[str]
    todo: list[str]
    finished: dict[str, int]          # status -> cells that a run would skip
    subboxes: dict[str, int]          # cell -> sub-boxes left to search
    layout: dict[int, tuple[int, int]]  # level -> (nx, ny)
    api_requests_max: int
    thumbs_max: int
    options: FetchOptions

    @property
    def minutes_at_limit(self) -> float | None:
        return self.api_requests_max / self.options.rate_limit if self.options.rate_limit > 0 else None

    def describe(self, show: int = 20) -> str:
        o = self.options
        lines = [f"{len(self.cells)} cells; {len(self.todo)} to fetch"
                 + (f", {sum(self.finished.values())} already finished "
                    f"({', '.join(f'{k} {v}' for k, v in sorted(self.finished.items()))})" if self.finished else "")]
        for level, (nx, ny) in sorted(self.layout.items()):
            b = grid.bounds(grid.Cell(level, 0, 0))
            dx, dy = (b.east - b.west) / nx, (b.north - b.south) / ny
            lines.append(f"level {level}: {nx} x {ny} = {nx * ny} sub-boxes per cell, "
                         f"{dx:.4f} x {dy:.4f} deg = {dx * dy:.4f} deg² each (limit {o.max_bbox_deg2:g})")
        eta = self.minutes_at_limit
        lines.append(f"target {o.per_cell} images per cell; at most {self.api_requests_max:,} API requests "
                     f"and {self.thumbs_max:,} thumbnail downloads"
                     + (f" (up to {_duration(eta * 60)} at {o.rate_limit:g} requests/min)" if eta is not None else ""))
        for c in self.todo[:show]:
            lines.append(f"  {c}  {self.subboxes[c]} sub-boxes")
        if len(self.todo) > show:
            lines.append(f"  ... and {len(self.todo) - show} more")
        return "\n".join(lines)


def plan(ws: Workspace, cells: Sequence[str], options: FetchOptions | None = None) -> FetchPlan:
    """What ``fetch`` would do, without a request: cells to fetch, sub-boxes, an upper
    bound on requests. Reads the manifest only when it exists."""
    o = (options or FetchOptions()).validate()
    cells = sort_cells(cells)
    status: dict = {}
    progress: dict[str, int] = {}
    if ws.has_manifest():
        with ws.manifest() as m:
            status = m.fetch_status()
            progress = m.fetch_progress_counts()
    finished: dict[str, int] = {}
    todo = []
    for c in cells:
        s = status.get(c, {}).get("status")
        if s in ("done", "empty"):
            finished[s] = finished.get(s, 0) + 1
        else:
            todo.append(c)
    layout: dict[int, tuple[int, int]] = {}
    left: dict[str, int] = {}
    for c in todo:
        level = c.count("/") + 1  # sort_cells gave "/"-form ids: a digit per level
        if level not in layout:
            sb = subboxes(c, o.max_bbox_deg2, o.seed)
            layout[level] = (sb.nx, sb.ny)
        nx, ny = layout[level]
        left[c] = max(0, nx * ny - progress.get(c, 0))
    return FetchPlan(cells, todo, finished, left, layout, sum(left.values()), o.per_cell * len(todo), o)


# --------------------------------------------------------------------------- CLI


def register(sub) -> None:
    d = FetchOptions()
    p = sub.add_parser(
        "fetch", help="fetch street-level images from the Mapillary API v4",
        description="Search Mapillary's image API cell by cell (sub-boxes within the API's bbox limit), "
                    "filter (panoramas, brightness, near-duplicates) and store thumbnails in the workspace. "
                    f"The token comes from {TOKEN_ENV} or --token-file and is never printed or stored. "
                    "Resumable: a rerun skips finished cells and continues the others.")
    p.add_argument("--cells", default="land",
                   help="land (cells touching land at --level), all, a comma list of cell ids, or a file "
                        "of ids, one per line (default: land)")
    p.add_argument("--level", type=int, default=MANIFEST_LEVEL, help="grid level for land/all (default: %(default)s)")
    p.add_argument("--per-cell", type=int, default=d.per_cell, help="target images per cell (default: %(default)s)")
    p.add_argument("--api-url", default=d.api_url,
                   help="API base URL (tests, mirrors): the token is sent there, and stderr says which token "
                        "goes to which host; thumbnails only from *.fbcdn.net or this URL's host (default: %(default)s)")
    p.add_argument("--token-file", default=None, help=f"file holding the access token (default: ${TOKEN_ENV})")
    p.add_argument("--concurrency", type=int, default=d.concurrency,
                   help="searches at once, and as many thumbnail downloads (default: %(default)s)")
    p.add_argument("--rate-limit", type=float, default=d.rate_limit,
                   help="API requests per minute, evenly spaced; 0 = unlimited (default: %(default)g)")
    p.add_argument("--shard", default=None,
                   help="i/n: fetch only the i-th of n shards of the sorted cell list, i from 0 (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and make no request (default: off)")
    p.add_argument("--min-brightness", type=float, default=d.min_brightness,
                   help="minimum mean grey level 0-255 of a thumbnail (default: %(default)g)")
    p.add_argument("--dedup-m", type=float, default=d.dedup_m,
                   help="minimum distance in metres to any image already kept; 0 disables (default: %(default)g)")
    p.add_argument("--include-pano", action="store_true", help="keep panoramas too (default: skipped)")
    p.add_argument("--thumb", default=d.thumb, choices=THUMB_SIZES, help="thumbnail size (default: %(default)s)")
    p.add_argument("--max-bbox", type=float, default=d.max_bbox_deg2,
                   help="largest sub-box in square degrees, the API's limit (default: %(default)g)")
    p.add_argument("--page-limit", type=int, default=d.page_limit,
                   help=f"images asked for per search request, at most {API_MAX_LIMIT} (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=d.timeout_s,
                   help="seconds one request may take as a whole, connect and every read; a slower "
                        "answer is cut and retried (default: %(default)g)")
    p.add_argument("--max-json-mb", type=float, default=d.max_json_mb,
                   help="largest API answer read, in MB; a larger one is refused (default: %(default)g)")
    p.add_argument("--max-thumb-mb", type=float, default=d.max_thumb_mb,
                   help="largest thumbnail read, in MB; a larger one is skipped and counted (default: %(default)g)")
    p.add_argument("--retries", type=int, default=d.retries,
                   help="retries of a failed request (429, 5xx, timeout, dropped) (default: %(default)s)")
    p.add_argument("--backoff", type=float, default=d.backoff_s,
                   help="first retry delay in seconds, doubling with jitter (default: %(default)g)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the sub-box visiting order (default: %(default)s)")
    p.set_defaults(func=run)


def options_from_args(args) -> FetchOptions:
    return FetchOptions(
        per_cell=args.per_cell, api_url=args.api_url, thumb=args.thumb, max_bbox_deg2=args.max_bbox,
        page_limit=args.page_limit, include_pano=args.include_pano, min_brightness=args.min_brightness,
        dedup_m=args.dedup_m, concurrency=args.concurrency, rate_limit=args.rate_limit, timeout_s=args.timeout,
        max_json_mb=args.max_json_mb, max_thumb_mb=args.max_thumb_mb,
        retries=args.retries, backoff_s=args.backoff, seed=args.seed).validate()


def run(args, ws: Workspace) -> int:
    options = options_from_args(args)
    cells = select_cells(args.cells, args.level, parse_shard(args.shard), cache_dir=ws.cache_dir)
    if not cells:
        print("no cells to fetch", file=sys.stderr)
        return 0
    if args.dry_run:
        print(plan(ws, cells, options).describe())
        return 0
    token = read_token(args.token_file)
    source = f"--token-file {args.token_file}" if args.token_file else f"${TOKEN_ENV}"
    print(f"fetch: sending the access token from {source} to {origin(options.api_url)}"
          + ("" if is_official_api(options.api_url) else " (not the official Mapillary API)"), file=sys.stderr)
    with progress_bar(total=len(cells), desc="fetch", unit="cell") as bar:
        def show(p: FetchProgress) -> None:
            bar.total = p.cells_total
            bar.n = p.cells_finished
            extra = {"rate_limited": f"waiting {p.backoff_s:.0f}s"} if p.backoff_s >= 0.5 else {}
            bar.set_postfix(kept=p.images_kept, req_s=f"{p.requests_per_s:.1f}", errors=p.errors, **extra,
                            refresh=False)
            bar.refresh()

        report = fetch(ws, cells, options, token, progress=show)
    print(report.summary())
    if len(report.errors) == 1:  # one line
        cell_id, reason = report.errors[0]
        print(f"error: 1 cell(s) ended in error ({cell_id}: {reason}); rerun to retry them", file=sys.stderr)
        return 1
    if report.errors:
        for cell_id, reason in report.errors[:5]:
            print(f"  {cell_id}: {reason}", file=sys.stderr)
        more = len(report.errors) - 5
        print((f"  ... and {more} more\n" if more > 0 else "")
              + f"error: {len(report.errors)} cell(s) ended in error; rerun to retry them", file=sys.stderr)
        return 1
    return 0
