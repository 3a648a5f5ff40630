"""``python -m pipeline fetch``: street-level images from the Mapillary API v4 image search.

For every cell of a list, the cell is searched through sub-boxes no larger than the API's
bbox limit (0.01 deg² by default), visited in a spread-out order, until the per-cell
target is met or the sub-boxes run out::

    GET {api}/images?bbox=minLon,minLat,maxLon,maxLat&fields=id,geometry,...&limit=N
    Authorization: OAuth <token>

Each candidate goes through the filters (panoramas skipped unless asked for; spatial
de-duplication in metres against every image already in the workspace and every image
kept by this run; mean grey level of the thumbnail), and a kept thumbnail is stored with
``Manifest.store_image`` (temporary file + rename, then the row), so even ``kill -9``
leaves no partial image and no row without its file.

Cells run side by side on ``concurrency`` worker threads; a run over fewer cells than
that searches sub-boxes ahead instead, so up to ``concurrency`` searches and as many
thumbnail downloads are in flight (one ``requests.Session`` per thread). One global rate
limit spaces the API requests evenly, never above the limit in any window (thumbnails
come from a CDN and are not counted). 429, 5xx, timeouts and dropped
connections are retried with exponential backoff and jitter, honouring Retry-After; the
API's "Please reduce the amount of data" answer splits the sub-box in four. A cell ends
as ``done``, ``empty`` (the API answered and nothing was usable) or ``error`` with the
reason, never ``empty`` because of an error; a 401 stops everything.

Progress is kept in the manifest (``fetch_log`` per cell, ``fetch_progress`` per
sub-box), so a rerun skips done and empty cells and continues the others where they
stopped. The access token comes from MAPILLARY_ACCESS_TOKEN or ``--token-file``; it is
sent only in the API's Authorization header and never printed, logged, stored, or put in
an exception message.

The dashboard calls :func:`fetch` (in a background thread, with a progress callback and
a stop event); the CLI below is a thin parser over the same function.
"""

from __future__ import annotations

import math
import os
import queue
import random
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

import numpy as np
import requests
from scipy.spatial import cKDTree

from geohier import grid
from geohier.errors import GeohierError, InputError
from geohier.images import brightness, open_image
from geohier.workspace import MANIFEST_LEVEL, Manifest, Workspace, utcnow

DEFAULT_API = "https://graph.mapillary.com"
TOKEN_ENV = "MAPILLARY_ACCESS_TOKEN"
SOURCE = "mapillary"
THUMB_SIZES = ("256", "1024", "2048", "original")
API_MAX_LIMIT = 2000          # the image search returns at most this many per request
MAX_SPLIT_DEPTH = 2           # "reduce the amount of data": split a sub-box up to 4**2 ways
EARTH_RADIUS_M = 6_371_008.8
REDUCE_DATA = "reduce the amount of data"

PROGRESS_SCHEMA = """
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


class TokenError(GeohierError):
    """The access token is missing, malformed or rejected (HTTP 401). Never contains it."""


class _Stopped(Exception):
    """The run was asked to stop (stop event, Ctrl-C, or a fatal error elsewhere)."""


class _ReduceData(Exception):
    """The API answered "Please reduce the amount of data you're asking for"."""


class _RequestFailed(Exception):
    """A request failed for good. ``transient`` when retries of a transient fault ran out."""

    def __init__(self, reason: str, transient: bool):
        super().__init__(reason)
        self.transient = transient


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
    timeout_s: float = 30.0
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
        need(int(self.retries) >= 0, f"retries must be >= 0, got {self.retries!r}")
        need(self.backoff_s >= 0 and self.backoff_max_s >= 0, "backoff delays must be >= 0")
        self.thumb = str(self.thumb)
        self.api_url = str(self.api_url).rstrip("/")
        return self

    @property
    def thumb_field(self) -> str:
        return f"thumb_{self.thumb}_url"

    @property
    def fields(self) -> str:
        return ",".join(("id", "geometry", "captured_at", "compass_angle", "sequence", "is_pano",
                         self.thumb_field))


# --------------------------------------------------------------------------- the token


def check_token(token: str | None) -> str:
    """Return the token stripped, or raise TokenError (without quoting it)."""
    token = (token or "").strip()
    if not token:
        raise TokenError(f"no Mapillary access token: set {TOKEN_ENV} or pass --token-file FILE")
    if not re.fullmatch(r"[\x21-\x7e]+", token):
        raise TokenError("the Mapillary access token contains spaces or control characters; "
                         "it should be one line such as MLY|123|abc")
    return token


def read_token(token_file: str | os.PathLike | None = None, environ=None) -> str:
    """The token from ``token_file`` (first line) when given, else from MAPILLARY_ACCESS_TOKEN."""
    environ = os.environ if environ is None else environ
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise InputError(f"token file not found: {path}")
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if not text:
            raise TokenError(f"the token file {path} is empty")
        return check_token(text.splitlines()[0])
    return check_token(environ.get(TOKEN_ENV))


# --------------------------------------------------------------------------- cells


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n) into (i, n); None stays None.

    >>> parse_shard("1/4")
    (1, 4)
    """
    if text is None or str(text).strip() == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise InputError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard i/n needs n >= 1 and 0 <= i < n (shards are numbered from 0), got {text!r}")
    return i, n


def sort_cells(ids: Iterable[str]) -> list[str]:
    """Unique '/'-form ids, sorted by level then id."""
    cells = {grid.from_id(i) for i in ids}
    return [grid.to_id(c) for c in sorted(cells, key=lambda c: (c.level, grid.to_id(c, sep="")))]


def shard_cells(cells: Sequence[str], shard: tuple[int, int] | None) -> list[str]:
    """Shard ``i`` of ``n`` of the sorted cell list (every n-th cell from the i-th): the
    shards of one list never overlap and together cover it.

    >>> shard_cells(["0", "1", "2", "3"], (1, 2))
    ['1', '3']
    """
    cells = sort_cells(cells)
    if shard is None:
        return cells
    i, n = shard
    return cells[i::n]


def _land_cells(level: int, cache_dir=None) -> list[str]:
    # geohier.geography loads Natural Earth polygons: import it only when land is asked for.
    try:
        from geohier import geography
    except ImportError as exc:
        raise InputError(f"--cells land needs geohier.geography ({exc}); pass --cells all, "
                         "a list of ids or a file instead") from None
    return grid.keys_to_ids(np.asarray(geography.land_keys(level, cache_dir), dtype=np.int64), level)


def select_cells(spec: str = "land", level: int = MANIFEST_LEVEL, shard: str | tuple | None = None,
                 cache_dir=None) -> list[str]:
    """The cells to fetch, sorted, for ``--cells``: ``land`` (cells touching land at
    ``level``, from geohier.geography, cached under ``cache_dir`` when given), ``all``
    (every cell of ``level``), a comma list of cell ids, or a file of ids (one per line;
    blank lines and ``#`` comments ignored); then ``shard`` ("i/n").
    """
    level = grid.check_level(level)
    spec = str(spec).strip()
    if spec == "land":
        ids = _land_cells(level, cache_dir)
    elif spec == "all":
        if level > 12:
            raise InputError(f"--cells all at level {level} is {4**level:,} cells; pick level <= 12 or a list")
        ids = grid.keys_to_ids(grid.all_cells(level), level)
    else:
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if parts and all(grid.is_cell_id(p) for p in parts):
            ids = parts
        elif Path(spec).expanduser().is_file():
            ids = []
            for n, line in enumerate(Path(spec).expanduser().read_text(encoding="utf-8").splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                if not grid.is_cell_id(line):
                    raise InputError(f"{spec}:{n}: not a cell id: {line!r}")
                ids.append(line)
        else:
            bad = [p for p in parts if not grid.is_cell_id(p)]
            raise InputError(f"--cells must be land, all, a comma list of cell ids or a file of ids; "
                             f"{(bad or [spec])[0]!r} is none of these")
    s = shard if isinstance(shard, tuple) or shard is None else parse_shard(shard)
    return shard_cells(ids, s)


# --------------------------------------------------------------------------- sub-boxes


def _bitreverse(v: np.ndarray, bits: int) -> np.ndarray:
    out = np.zeros_like(v)
    for b in range(bits):
        out |= ((v >> b) & 1) << (bits - 1 - b)
    return out


@dataclass(frozen=True)
class SubBoxes:
    """A cell cut into ``nx x ny`` equal sub-boxes no larger than the bbox limit, and the
    order they are searched in: bit-reversed Morton order (a 2-D van der Corput sequence)
    over a seeded toroidal shift, so the first few boxes are spread over the whole cell."""

    cell: str
    bbox: grid.BBox
    nx: int
    ny: int
    order: np.ndarray  # (nx*ny,) flat indices iy * nx + ix, in visiting order
    seed: int

    def __len__(self) -> int:
        return self.nx * self.ny

    @property
    def signature(self) -> str:
        return f"{self.nx}x{self.ny}:{self.seed}"

    def box(self, position: int) -> tuple[float, float, float, float]:
        """(west, south, east, north) of the ``position``-th box in visiting order."""
        flat = int(self.order[position])
        iy, ix = divmod(flat, self.nx)
        b = self.bbox
        dx, dy = (b.east - b.west) / self.nx, (b.north - b.south) / self.ny
        w = b.west + ix * dx
        e = b.east if ix == self.nx - 1 else b.west + (ix + 1) * dx
        s = b.south + iy * dy
        n = b.north if iy == self.ny - 1 else b.south + (iy + 1) * dy
        return (w, s, e, n)


def subboxes(cell_id: str, max_deg2: float = 0.01, seed: int = 0) -> SubBoxes:
    """The sub-boxes of a cell for a bbox limit of ``max_deg2`` square degrees.

    >>> sb = subboxes("0/0/0/0/0/0/0/0", 0.01)
    >>> (sb.nx, sb.ny, len(sb))
    (15, 8, 120)
    """
    c = grid.from_id(cell_id)
    b = grid.bounds(c)
    width, height = b.east - b.west, b.north - b.south
    limit = max_deg2 * 0.999  # headroom for the decimal rounding of the bbox parameter
    side = math.sqrt(limit)
    nx, ny = max(1, math.ceil(width / side)), max(1, math.ceil(height / side))
    while (width / nx) * (height / ny) > limit:
        if width / nx >= height / ny:
            nx += 1
        else:
            ny += 1
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, c.level, c.row, c.col])
    sx, sy = int(rng.integers(nx)), int(rng.integers(ny))
    bits = max(1, math.ceil(math.log2(max(nx, ny))))
    iy, ix = np.divmod(np.arange(nx * ny, dtype=np.int64), nx)
    gx, gy = (ix + sx) % nx, (iy + sy) % ny
    morton = grid.rowcol_to_key(gy, gx, bits)  # interleaved bits of (gy, gx)
    order = np.argsort(_bitreverse(morton, 2 * bits), kind="stable")
    return SubBoxes(grid.to_id(c), b, nx, ny, order, int(seed))


def _split4(box):
    w, s, e, n = box
    mx, my = (w + e) / 2, (s + n) / 2
    return [(w, my, mx, n), (mx, my, e, n), (w, s, mx, my), (mx, s, e, my)]


def _bbox_param(box) -> str:
    return ",".join(f"{v:.7f}".rstrip("0").rstrip(".") for v in box)


# --------------------------------------------------------------------------- dedup


def _unit_xyz(lat, lon) -> np.ndarray:
    lat, lon = np.radians(np.asarray(lat, dtype=np.float64)), np.radians(np.asarray(lon, dtype=np.float64))
    c = np.cos(lat)
    return np.stack([c * np.cos(lon), c * np.sin(lon), np.sin(lat)], axis=-1)


class Dedup:
    """Spatial de-duplication in metres on the unit sphere (chord distance), thread-safe.

    Points already known sit in a cKDTree; points reserved by this run sit in a small
    pending array, merged into the tree now and then. ``reserve`` claims a point when no
    live point lies within the radius; ``release`` gives the claim back (the thumbnail
    turned out unusable), so a neighbour can take its place.
    """

    REBUILD = 512

    def __init__(self, lat, lon, radius_m: float):
        self.radius_m = float(radius_m)
        self.chord = 2.0 * math.sin(min(self.radius_m / EARTH_RADIUS_M, math.pi) / 2.0)
        self._lock = threading.Lock()
        pts = _unit_xyz(lat, lon).reshape(-1, 3)
        self._tree_pts = pts
        self._tree = cKDTree(pts) if len(pts) and self.radius_m > 0 else None
        self._dead: set[int] = set()           # tree indices released after a merge
        self._pending: dict[str, np.ndarray] = {}
        self._pending_arr: np.ndarray | None = None
        self._where: dict[str, int] = {}       # key -> tree index once merged

    def reserve(self, key: str, lat: float, lon: float) -> bool:
        if self.radius_m <= 0:
            return True
        p = _unit_xyz(lat, lon).reshape(3)
        with self._lock:
            if self._tree is not None:
                near = self._tree.query_ball_point(p, self.chord)
                if any(i not in self._dead for i in near):
                    return False
            if self._pending:
                if self._pending_arr is None:
                    self._pending_arr = np.stack(list(self._pending.values()))
                if (np.linalg.norm(self._pending_arr - p, axis=1) <= self.chord).any():
                    return False
            self._pending[key] = p
            self._pending_arr = None
            if len(self._pending) >= self.REBUILD:
                self._merge()
            return True

    def release(self, key: str) -> None:
        if self.radius_m <= 0:
            return
        with self._lock:
            if self._pending.pop(key, None) is not None:
                self._pending_arr = None
            elif key in self._where:
                self._dead.add(self._where.pop(key))

    def _merge(self) -> None:
        keys = list(self._pending)
        start = len(self._tree_pts)
        self._tree_pts = np.concatenate([self._tree_pts, np.stack(list(self._pending.values()))])
        self._where.update({k: start + j for j, k in enumerate(keys)})
        self._tree = cKDTree(self._tree_pts)
        self._pending.clear()
        self._pending_arr = None


# --------------------------------------------------------------------------- HTTP


class RateLimiter:
    """At most ``per_minute`` acquisitions per minute, evenly spaced (no bursts), so no
    window of any length holds more than its share. A small margin absorbs the jitter
    between taking a slot and the request reaching the server. ``pause`` holds everyone
    back (a 429's Retry-After)."""

    def __init__(self, per_minute: float, margin: float = 0.02):
        self.interval = 60.0 / per_minute * (1.0 + margin) if per_minute and per_minute > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event | None = None) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        delay = slot - now
        if delay > 0:
            if stop is not None:
                if stop.wait(delay):
                    raise _Stopped()
            else:
                time.sleep(delay)

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._next = max(self._next, time.monotonic() + seconds)


class _Counters:
    def __init__(self):
        self._lock = threading.Lock()
        self.api_requests = 0
        self.thumb_requests = 0
        self.retries = 0

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


def _retry_after(resp: requests.Response) -> float:
    value = resp.headers.get("Retry-After")
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return 0.0


class _Http:
    """GETs with retries, backoff and the rate limit; one requests.Session per thread.
    Holds the token privately and sends it only to the API."""

    def __init__(self, options: FetchOptions, token: str, stop: threading.Event, counters: _Counters):
        self.o = options
        self.__auth = {"Authorization": f"OAuth {token}"}
        self.__token = token
        self.stop = stop
        self.counters = counters
        self.limiter = RateLimiter(options.rate_limit)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "<_Http (token hidden)>"

    def scrub(self, text: str) -> str:
        """A message from a server with the token (if it were ever echoed) masked."""
        return str(text).replace(self.__token, "***") if self.__token else str(text)

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def close(self) -> None:
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()

    def _message(self, resp: requests.Response) -> str:
        try:
            msg = resp.json().get("error", {}).get("message", "")
        except (ValueError, AttributeError):
            msg = ""
        return self.scrub(str(msg))[:200]

    def get(self, url: str, params: dict | None = None, *, api: bool, reduce_ok: bool = False):
        """The JSON payload (api) or the body bytes (thumbnail) of a 200 answer.

        Raises TokenError (401 from the API), _ReduceData (when ``reduce_ok``), _Stopped, or
        _RequestFailed once retries run out or on a 4xx that retrying cannot fix."""
        o = self.o
        last = ""
        for attempt in range(o.retries + 1):
            if self.stop.is_set():
                raise _Stopped()
            if api:
                self.limiter.acquire(self.stop)
            hint = 0.0
            self.counters.add("api_requests" if api else "thumb_requests")
            try:
                resp = self._session().get(url, params=params, headers=self.__auth if api else None,
                                           timeout=o.timeout_s)
            except requests.Timeout:
                last = f"timed out after {o.timeout_s:g} s"
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as exc:
                last = f"connection dropped ({type(exc).__name__})"
            except requests.RequestException as exc:  # a URL requests cannot use: retrying won't help
                raise _RequestFailed(f"cannot request {self.scrub(url)[:120]} ({type(exc).__name__})",
                                     transient=False) from None
            else:
                code = resp.status_code
                if code == 200:
                    if not api:
                        return resp.content
                    try:
                        payload = resp.json()
                        if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
                            raise ValueError("no data list")
                        return payload
                    except ValueError:
                        last = "malformed JSON from the API"
                elif code == 401 and api:
                    msg = self._message(resp)
                    raise TokenError("Mapillary rejected the access token (HTTP 401"
                                     + (f": {msg}" if msg else "") + f"); check {TOKEN_ENV} or --token-file")
                elif code == 429:
                    hint = min(_retry_after(resp), o.max_retry_after_s)
                    last = "HTTP 429 Too Many Requests"
                    if api and hint:
                        self.limiter.pause(hint)
                elif code >= 500:
                    msg = self._message(resp)
                    if api and reduce_ok and REDUCE_DATA in msg.lower():
                        raise _ReduceData(msg)
                    last = f"HTTP {code}" + (f": {msg}" if msg else "")
                else:
                    msg = self._message(resp)
                    raise _RequestFailed(f"HTTP {code}" + (f": {msg}" if msg else ""), transient=False)
            if attempt == o.retries:
                break
            self.counters.add("retries")
            delay = min(o.backoff_max_s, o.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
            if self.stop.wait(max(delay, hint)):
                raise _Stopped()
        raise _RequestFailed(f"{last} (gave up after {o.retries + 1} attempts)", transient=True)


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
    elapsed_s: float = 0.0
    stopped: bool = False
    errors: list[tuple[str, str]] = field(default_factory=list)  # (cell, reason)
    filtered: dict[str, int] = field(default_factory=dict)        # reason -> images dropped

    def summary(self) -> str:
        drop = ", ".join(f"{k} {v}" for k, v in sorted(self.filtered.items()) if v)
        text = (f"{self.images_kept} images kept; cells: {self.done} done, {self.empty} empty, "
                f"{self.error} error, {self.partial} unfinished, {self.skipped} already finished; "
                f"{self.api_requests} API requests, {self.thumb_requests} thumbnails, {self.retries} retries "
                f"in {self.elapsed_s:.1f} s")
        return text + (f"; dropped: {drop}" if drop else "")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- the fetcher


@dataclass
class _Candidate:
    id: str
    lat: float
    lon: float
    captured_at: str | None
    sequence: str | None
    is_pano: bool
    thumb_url: str | None


def _iso_ms(ms) -> str | None:
    try:
        return datetime.fromtimestamp(float(ms) / 1000.0, tz=UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _parse_record(rec, thumb_field: str) -> _Candidate | None:
    try:
        lon, lat = rec["geometry"]["coordinates"][:2]
        lat, lon = float(lat), float(lon)
        image_id = str(rec["id"])
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    seq = rec.get("sequence")
    url = rec.get(thumb_field)
    return _Candidate(image_id, lat, lon, _iso_ms(rec.get("captured_at")), None if seq is None else str(seq),
                      bool(rec.get("is_pano", False)), url if isinstance(url, str) and url else None)


def _decode(data: bytes):
    """(width, height, brightness) of image bytes, or None when they are not a whole image."""
    try:
        img = open_image(data)  # decodes fully: a thumbnail cut short fails here
    except InputError:
        return None
    return img.width, img.height, brightness(img)


def _cell_filter(c: grid.Cell) -> tuple[str, tuple]:
    """SQL (where, params) selecting the cell's images from the manifest."""
    if c.level <= MANIFEST_LEVEL:
        p = grid.to_id(c, sep="")
        return "cell >= ? AND cell < ?", (p, p + "4")
    b = grid.bounds(c)
    return "lat >= ? AND lat <= ? AND lon >= ? AND lon < ?", (b.south, b.north, b.west, b.east)


def clean_stale_temps(ws: Workspace, older_than_s: float = 60.0) -> int:
    """Remove temporary files (``.*.tmp``) that an interrupted write left under images/;
    only those older than ``older_than_s`` so that a concurrent writer is never hit."""
    root = ws.images_dir
    if not root.is_dir():
        return 0
    now, n = time.time(), 0
    for sub in os.scandir(root):
        if not sub.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(sub.path):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                try:
                    if now - entry.stat(follow_symlinks=False).st_mtime >= older_than_s:
                        os.unlink(entry.path)
                        n += 1
                except FileNotFoundError:
                    pass
    return n


def _ensure_progress_table(m: Manifest) -> None:
    m.conn.executescript(PROGRESS_SCHEMA)


class _Fetcher:
    def __init__(self, ws: Workspace, options: FetchOptions, token: str, stop: threading.Event):
        self.ws = ws
        self.o = options
        self.stop = stop
        self.counters = _Counters()
        self.http = _Http(options, token, stop, self.counters)
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
        rows = m.conn.execute("SELECT subbox, plan, found FROM fetch_progress WHERE cell = ?", (cell_id,)).fetchall()
        if any(r[1] != sb.signature for r in rows):  # another layout: its positions mean other boxes
            m.conn.execute("DELETE FROM fetch_progress WHERE cell = ?", (cell_id,))
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
                except _RequestFailed as exc:
                    error = f"sub-box {pos} {_bbox_param(sb.box(pos))}: {exc}"
                    break
                answered += 1
                found += f
                new += k
                if failures:
                    transient_failures.extend(failures)
                else:
                    m.conn.execute(
                        "INSERT OR REPLACE INTO fetch_progress (cell, subbox, plan, found, kept, at)"
                        " VALUES (?, ?, ?, ?, ?, ?)", (cell_id, pos, sb.signature, f, k, utcnow()))
                fill()
        except _Stopped:
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
        with m.transaction() as conn:
            m.log_fetch(cell_id, status, found, kept, error)
            if status in ("done", "empty"):
                conn.execute("DELETE FROM fetch_progress WHERE cell = ?", (cell_id,))
        return CellResult(cell_id, status, found, kept, new, error)

    def _search(self, box, depth: int) -> dict:
        o = self.o
        params = {"bbox": _bbox_param(box), "fields": o.fields, "limit": str(o.page_limit)}
        return self.http.get(f"{o.api_url}/images", params, api=True, reduce_ok=depth < MAX_SPLIT_DEPTH)

    def _subbox(self, m: Manifest, c: grid.Cell, box, need: int, depth: int,
                search=None) -> tuple[int, int, list[str]]:
        """Search one box (or take the answer of ``search``, a future) and keep up to
        ``need`` images: (found, kept, transient failures)."""
        o = self.o
        try:
            payload = search.result() if search is not None else self._search(box, depth)
        except _ReduceData:  # too much at once for the API: ask for the quarters instead
            found = kept = 0
            failures: list[str] = []
            for quarter in _split4(box):
                if kept >= need:
                    break
                f, k, fl = self._subbox(m, c, quarter, need - kept, depth + 1)
                found, kept = found + f, kept + k
                failures += fl
            return found, kept, failures
        cands: list[_Candidate] = []
        seen: set[str] = set()
        bad = 0
        for rec in payload["data"]:
            cand = _parse_record(rec, o.thumb_field)
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
            elif m.has_source_id(SOURCE, cand.id):
                pass  # kept by an earlier run
            else:
                usable.append(cand)
        kept, failures = self._take(m, usable, need)
        return found, kept, failures

    def _take(self, m: Manifest, pending: list[_Candidate], need: int) -> tuple[int, list[str]]:
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
                else:
                    failures.append(info)
                self.dedup.release(cand.id)
            pending = rest
        return kept, failures

    def _download(self, url: str):
        """("ok", (bytes, (w, h, brightness))) | ("bad", why) | ("gone", why) | ("failed", why)."""
        for _ in range(2):  # one more try for a thumbnail cut short in transit
            try:
                data = self.http.get(url, api=False)
            except _RequestFailed as exc:
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

    Raises TokenError when the token is missing or rejected (a 401 stops every worker).
    """
    o = (options or FetchOptions()).validate()
    token = check_token(token)
    t0 = time.monotonic()
    cells = sort_cells(cells)
    report = FetchReport(cells=len(cells))
    stop = threading.Event()
    clean_stale_temps(ws, o.tmp_grace_s)
    with ws.manifest() as m:
        _ensure_progress_table(m)  # here, before the workers could race to create it
        status = m.fetch_status()
        lat, lon = m.points()
    todo = [c for c in cells if status.get(c, {}).get("status") not in ("done", "empty")]
    report.skipped = len(cells) - len(todo)
    f = _Fetcher(ws, o, token, stop)
    f.dedup = Dedup(lat, lon, o.dedup_m)
    f.lookahead = max(1, o.concurrency // max(1, len(todo)))
    del lat, lon
    work: queue.Queue[str] = queue.Queue()
    for c in todo:
        work.put(c)
    results: queue.Queue = queue.Queue()

    def worker() -> None:
        try:
            m = ws.manifest()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            results.put(("fatal", exc))
            return
        try:
            while not stop.is_set():
                try:
                    cell_id = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    results.put(("cell", f.cell(m, cell_id)))
                except BaseException as exc:  # noqa: BLE001 - TokenError or a bug: stop everyone
                    results.put(("fatal", exc))
                    stop.set()
                    return
        finally:
            m.close()

    threads = [threading.Thread(target=worker, name=f"fetch-{i}", daemon=True)
               for i in range(min(o.concurrency, max(1, len(todo))))]
    fatal: BaseException | None = None
    new_images = 0

    def snapshot() -> FetchProgress:
        return FetchProgress(len(todo), report.done + report.empty + report.error, report.done, report.empty,
                             report.error, new_images, f.counters.api_requests, f.counters.thumb_requests,
                             f.counters.retries, time.monotonic() - t0)

    def drain() -> None:
        nonlocal fatal, new_images
        while True:
            try:
                kind, item = results.get_nowait()
            except queue.Empty:
                return
            if kind == "fatal":
                fatal = fatal or item
                continue
            r: CellResult = item
            new_images += r.new
            if r.status == "partial":
                report.partial += 1
            else:
                setattr(report, r.status, getattr(report, r.status) + 1)
            if r.status == "error":
                report.errors.append((r.cell, r.error or "unknown error"))

    try:
        for t in threads:
            t.start()
        last = 0.0
        while True:
            alive = [t for t in threads if t.is_alive()]
            if not alive:
                break
            alive[0].join(timeout=0.05)
            if stop_event is not None and stop_event.is_set():
                stop.set()
            drain()
            if progress is not None and time.monotonic() - last >= progress_every_s:
                last = time.monotonic()
                progress(snapshot())
        drain()
    except BaseException:
        stop.set()  # Ctrl-C: let the workers log their cells as partial, then go
        for t in threads:
            t.join(timeout=max(5.0, o.timeout_s + 1))
        raise
    finally:
        f.searches.shutdown(wait=True, cancel_futures=True)
        f.thumbs.shutdown(wait=True, cancel_futures=True)
        f.http.close()
    report.images_kept = new_images
    report.api_requests = f.counters.api_requests
    report.thumb_requests = f.counters.thumb_requests
    report.retries = f.counters.retries
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
            has_table = m.conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'fetch_progress'").fetchone()
            if has_table:
                progress = dict(m.conn.execute("SELECT cell, COUNT(*) FROM fetch_progress GROUP BY cell").fetchall())
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
        level = grid.from_id(c).level
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
    p.add_argument("--api-url", default=d.api_url, help="API base URL (default: %(default)s)")
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
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per request (default: %(default)g)")
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
    from tqdm import tqdm

    with tqdm(total=len(cells), unit="cell", desc="fetch", file=sys.stderr, dynamic_ncols=True) as bar:
        def show(p: FetchProgress) -> None:
            bar.total = p.cells_total
            bar.n = p.cells_finished
            bar.set_postfix(kept=p.images_kept, req_s=f"{p.requests_per_s:.1f}", errors=p.errors, refresh=False)
            bar.refresh()

        report = fetch(ws, cells, options, token, progress=show)
    print(report.summary())
    if report.errors:
        for cell_id, reason in report.errors[:5]:
            print(f"  {cell_id}: {reason}", file=sys.stderr)
        more = len(report.errors) - 5
        print((f"  ... and {more} more\n" if more > 0 else "")
              + f"error: {len(report.errors)} cell(s) ended in error; rerun to retry them", file=sys.stderr)
        return 1
    return 0
