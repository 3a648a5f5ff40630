"""The Mapillary API v4 client: HTTP sessions, the image search's shapes, and the Graph
API's errors sorted into what a fetch must do about them.

The image search::

    GET {api}/images?bbox=minLon,minLat,maxLon,maxLat&fields=id,geometry,...&limit=N
    Authorization: OAuth <token>
    -> {"data": [{"id": "...", "geometry": {"type": "Point", "coordinates": [lon, lat]}, ...}]}

A failed request answers, whatever its HTTP status (the real service sends an expired
token as HTTP 500)::

    {"error": {"message": "...", "type": "OAuthException" | "MLYApiException" | ...,
               "code": 190, "error_subcode": 460, "fbtrace_id": "..."}}

:class:`GraphError` reads that body and names its class (:attr:`GraphError.kind`):

========== ============================================================ =====================
kind       recognised by                                                what the client does
========== ============================================================ =====================
reduce     "Please reduce the amount of data you're asking for"         ReduceData: the caller
                                                                        splits the box
token      HTTP 401, codes 102 / 190, or an OAuthException /            TokenError: stop the
           MLYApiException whose message is about the token             whole fetch at once
parameter  code 100 (invalid parameter, nonexisting field)              ParameterError: stop at
                                                                        once, naming the field
rate       HTTP 429, codes 4 / 17 / 32 / 613, or a ``backoff`` (ms)     pause every worker as
                                                                        long as told, retry
transient  codes 1 / 2, HTTP 5xx (502 / 503 / 504 ...), and, outside    retry with exponential
           this table, timeouts, dropped connections, malformed JSON    backoff, then give up
refused    any other 4xx                                                RequestFailed at once
========== ============================================================ =====================

Retries are this module's loop, not urllib3's ``Retry`` on the session: whether and how
long to wait is decided by the error *body* (the same HTTP 500 is "retry" for code 2,
"stop everything" for code 190 and "split the box" for the density answer), a rate
limit must hold back every worker rather than the one that saw it, and every wait must
end at once when the fetch is stopped; ``Retry`` sees only status codes and sleeps
uninterruptibly per connection pool. The sessions' adapters therefore retry nothing.

The token is held privately, sent only in the API's Authorization header (thumbnails come
from a CDN without it) and never printed, logged, stored or put in an exception message.
Where a token may go is :func:`page_token`'s rule for the dashboard: the server's own token
(MAPILLARY_ACCESS_TOKEN) only to the official API (https://graph.mapillary.com); another
API URL only with a token typed on the page. The CLI's ``--api-url`` sends the token it was
given wherever it points (tests, mirrors) and says so on stderr. No request follows a
redirect, so a token never travels on to a host it was not meant for.

Bounds. Every request has one deadline, ``timeout_s`` after it starts, for the connection
and every read: a watchdog thread shuts the socket of a request past its deadline (or of
every request once the stop event is set), so a server that drips one byte per second, or
a blocked read, ends at the deadline and a stop takes effect within a fraction of a second.
Bodies are read streamed against a byte cap (``max_json_bytes`` for the API's answers,
``max_thumb_bytes`` for thumbnails); an answer over its cap is refused, not retried.
Thumbnails are fetched only from the hosts the API serves them from (:func:`thumb_host_ok`:
Meta's CDN, ``https://*.fbcdn.net``, or the API URL's own scheme, host and port, so
loopback only when the API URL itself is loopback).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

import requests
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from geohier.errors import GeohierError, InputError

DEFAULT_API = "https://graph.mapillary.com"
OFFICIAL_API_HOST = "graph.mapillary.com"
#: Where the API's thumb_*_url fields point: Meta's CDN (scontent-<pop>.xx.fbcdn.net,
#: scontent.<pop>.fna.fbcdn.net), over https only.
THUMB_HOST_SUFFIXES = (".fbcdn.net",)
MAX_JSON_MB = 16      # an image search answer (2000 records at most) is a few MB
MAX_THUMB_MB = 32     # a thumb_original_url image; the 256-2048 px ones are well under 1 MB
MAX_ERROR_BYTES = 1 << 20  # an error answer's body (read for its Graph API error)
TOKEN_ENV = "MAPILLARY_ACCESS_TOKEN"
THUMB_SIZES = ("256", "1024", "2048", "original")
API_MAX_LIMIT = 2000          # the image search returns at most this many per request
REDUCE_DATA = "reduce the amount of data"
SEARCH_FIELDS = ("id", "geometry", "captured_at", "compass_angle", "sequence", "is_pano")

TOKEN_CODES = frozenset({102, 190})           # API session / access token expired or invalid
PARAMETER_CODES = frozenset({100})            # invalid parameter, nonexisting field
RATE_CODES = frozenset({4, 17, 32, 613})      # app / user / page / API-specific rate limits
TRANSIENT_CODES = frozenset({1, 2})           # unknown error, service temporarily down
TOKEN_TYPES = frozenset({"OAuthException", "MLYApiException"})
TOKEN_HOWTO = f"set {TOKEN_ENV} or pass --token-file FILE (a token from mapillary.com/dashboard/developers)"


class TokenError(GeohierError):
    """The access token is missing, malformed or rejected. Never contains it."""


class ParameterError(GeohierError):
    """The API refused a parameter or field of the request (Graph API code 100)."""


class Stopped(Exception):
    """The run was asked to stop (stop event, Ctrl-C, or a fatal error elsewhere)."""


class ReduceData(Exception):
    """The API answered "Please reduce the amount of data you're asking for"."""


class RequestFailed(Exception):
    """A request failed for good. ``transient`` when retries of a transient fault ran out."""

    def __init__(self, reason: str, transient: bool):
        super().__init__(reason)
        self.transient = transient


class TooLarge(RequestFailed):
    """An answer's body is over its byte cap (never retried)."""

    def __init__(self, reason: str):
        super().__init__(reason, transient=False)


class ForeignHost(RequestFailed):
    """A thumbnail URL on a host the API does not serve thumbnails from (never requested)."""

    def __init__(self, reason: str):
        super().__init__(reason, transient=False)


# --------------------------------------------------------------------------- where requests may go


def _host_port(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL without user info, or None."""
    try:
        p = urlsplit(str(url).strip())
        port = p.port
    except ValueError:
        return None
    scheme = p.scheme.lower()
    host = (p.hostname or "").lower().rstrip(".")
    if scheme not in ("http", "https") or not host or p.username is not None or p.password is not None:
        return None
    return scheme, host, port or (443 if scheme == "https" else 80)


def origin(url: str) -> str:
    """``scheme://host:port`` of a URL (no path, query or user info), for messages."""
    hp = _host_port(url)
    if hp is None:
        return "an unusable URL"
    scheme, host, port = hp
    host = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" + ("" if port == default else f":{port}")


def is_official_api(url: str) -> bool:
    """True for the official Graph API host over https (default port, no user info)."""
    return _host_port(url) == ("https", OFFICIAL_API_HOST, 443)


def is_loopback(url: str) -> bool:
    hp = _host_port(url)
    if hp is None:
        return False
    host = hp[1]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def thumb_host_ok(url: str, api_url: str) -> bool:
    """May a thumbnail be fetched from ``url`` for a search of ``api_url``? Only from Meta's
    CDN over https (``*.fbcdn.net``, port 443), or from the API URL's own scheme, host and
    port (a mirror, the local test server): so loopback only when the API URL is loopback."""
    hp = _host_port(url)
    if hp is None:
        return False
    if hp == _host_port(api_url):
        return True
    scheme, host, port = hp
    return scheme == "https" and port == 443 and any(host.endswith(s) for s in THUMB_HOST_SUFFIXES)


def page_token(typed: str | None, api_url: str, environ=None) -> str:
    """The token a fetch started from the dashboard may send to ``api_url``: the one typed on
    the page, for any API URL; else the server's MAPILLARY_ACCESS_TOKEN, only for the
    official API over https. Raises TokenError otherwise (naming no token)."""
    typed = (typed or "").strip()
    if typed:
        return check_token(typed)
    if not is_official_api(api_url):
        raise TokenError(f"the server's {TOKEN_ENV} is only sent to {DEFAULT_API}; to use the API URL "
                         f"{origin(api_url)}, type a token for it on the page")
    environ = os.environ if environ is None else environ
    if not (environ.get(TOKEN_ENV) or "").strip():
        raise TokenError(f"no Mapillary access token: type one, or set {TOKEN_ENV} where the dashboard runs")
    return read_token(environ=environ)


# --------------------------------------------------------------------------- the token


def check_token(token: str | None) -> str:
    """Return the token stripped, or raise TokenError (without quoting it)."""
    token = (token or "").strip()
    if not token:
        raise TokenError(f"no Mapillary access token: {TOKEN_HOWTO}")
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


# --------------------------------------------------------------------------- errors


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class _Headers:
    """Just the headers of an answer, for retry_after_s."""

    def __init__(self, headers):
        self.headers = headers


def retry_after_s(resp: requests.Response) -> float:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date); 0 without."""
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


@dataclass(frozen=True)
class GraphError:
    """A failed answer: its HTTP status and the Graph API error body (empty fields when the
    body is not one). ``backoff_s`` is the body's ``backoff`` (milliseconds on the wire)."""

    status: int
    message: str = ""
    type: str = ""
    code: int | None = None
    subcode: int | None = None
    fbtrace_id: str | None = None
    backoff_s: float | None = None

    @classmethod
    def from_body(cls, status: int, body) -> GraphError:
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            err = {}
        backoff = err.get("backoff", body.get("backoff") if isinstance(body, dict) else None)
        try:
            backoff_s = max(0.0, float(backoff) / 1000.0) if backoff is not None else None
        except (TypeError, ValueError):
            backoff_s = None
        if backoff_s is not None and not math.isfinite(backoff_s):
            backoff_s = None
        return cls(int(status), str(err.get("message") or ""), str(err.get("type") or ""),
                   _int_or_none(err.get("code")), _int_or_none(err.get("error_subcode")),
                   None if err.get("fbtrace_id") is None else str(err.get("fbtrace_id")), backoff_s)

    @classmethod
    def from_response(cls, resp: requests.Response) -> GraphError:
        try:
            body = resp.json()
        except ValueError:
            body = None
        return cls.from_body(resp.status_code, body)

    @classmethod
    def from_bytes(cls, status: int, data: bytes) -> GraphError:
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        return cls.from_body(status, body)

    @property
    def kind(self) -> str:
        """reduce | token | parameter | rate | transient | refused (see the module's table)."""
        msg = self.message.lower()
        if REDUCE_DATA in msg:
            return "reduce"
        if (self.status == 401 or self.code in TOKEN_CODES
                or (self.type in TOKEN_TYPES and "token" in msg)):
            return "token"
        if self.code in PARAMETER_CODES:
            return "parameter"
        if self.status == 429 or self.code in RATE_CODES or self.backoff_s is not None:
            return "rate"
        if self.status >= 500 or self.code in TRANSIENT_CODES:
            return "transient"
        return "refused"

    def describe(self, scrub=str) -> str:
        """``HTTP 500, code 1: An unknown error occurred`` (the message shortened, scrubbed)."""
        head = f"HTTP {self.status}" + (f", code {self.code}" if self.code is not None else "")
        msg = scrub(self.message)[:200]
        return head + (f": {msg}" if msg else "")

    def field(self, asked: tuple[str, ...] = ()) -> str | None:
        """The parameter or field a code-100 answer is about, when it can be told."""
        m = re.search(r"nonexisting field \(?([A-Za-z_][\w.]*)", self.message)
        if m:
            return m.group(1)
        m = re.search(r"\b(?:param(?:eter)?|field)s?\s+[\[(\"']*([A-Za-z_][\w.]*)", self.message, re.IGNORECASE)
        if m and m.group(1).lower() not in ("is", "must", "the", "a"):
            return m.group(1)
        return next((a for a in asked if re.search(rf"\b{re.escape(a)}\b", self.message)), None)


# --------------------------------------------------------------------------- the image search's shapes


def thumb_field(thumb: str) -> str:
    """The search field holding a thumbnail URL of size ``thumb`` (one of THUMB_SIZES)."""
    return f"thumb_{thumb}_url"


def search_fields(thumb: str) -> str:
    """The ``fields`` parameter of an image search that returns ``thumb``-size thumbnails."""
    return ",".join((*SEARCH_FIELDS, thumb_field(thumb)))


def bbox_param(box) -> str:
    """(west, south, east, north) as the ``bbox`` parameter: at most 7 decimals, no trailing zeros."""
    return ",".join(f"{v:.7f}".rstrip("0").rstrip(".") for v in box)


@dataclass
class Candidate:
    """One image of a search answer."""

    id: str
    lat: float
    lon: float
    captured_at: str | None
    sequence: str | None
    is_pano: bool
    thumb_url: str | None


def iso_ms(ms) -> str | None:
    """Milliseconds since the epoch (the API's ``captured_at``) as ISO 8601 UTC, or None."""
    try:
        return datetime.fromtimestamp(float(ms) / 1000.0, tz=UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def parse_record(rec, thumb_field_name: str) -> Candidate | None:
    """A Candidate from one search record, or None when it has no usable id or position."""
    try:
        lon, lat = rec["geometry"]["coordinates"][:2]
        lat, lon = float(lat), float(lon)
        image_id = str(rec["id"])
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    seq = rec.get("sequence")
    url = rec.get(thumb_field_name)
    return Candidate(image_id, lat, lon, iso_ms(rec.get("captured_at")), None if seq is None else str(seq),
                     bool(rec.get("is_pano", False)), url if isinstance(url, str) and url else None)


# --------------------------------------------------------------------------- pacing


class RateLimiter:
    """At most ``per_minute`` acquisitions per minute, evenly spaced (no bursts), so no
    window of any length holds more than its share. A small margin absorbs the jitter
    between taking a slot and the request reaching the server. ``pause`` holds everyone
    back (a rate-limit answer), also when there is no limit (``per_minute`` 0)."""

    def __init__(self, per_minute: float, margin: float = 0.02):
        self.interval = 60.0 / per_minute * (1.0 + margin) if per_minute and per_minute > 0 else 0.0
        self._next = 0.0
        self._paused_until = 0.0
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
                    raise Stopped()
            else:
                time.sleep(delay)

    def pause(self, seconds: float) -> None:
        with self._lock:
            until = time.monotonic() + seconds
            self._next = max(self._next, until)
            self._paused_until = max(self._paused_until, until)

    def paused_for(self) -> float:
        """Seconds left of the longest pause asked for (0 when none is running)."""
        with self._lock:
            return max(0.0, self._paused_until - time.monotonic())


class Counters:
    """Requests made, retries, and rate-limit answers; shared by all threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.api_requests = 0
        self.thumb_requests = 0
        self.retries = 0
        self.rate_limited = 0

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


# --------------------------------------------------------------------------- deadlines


_current = threading.local()   # the request this thread is making (an _InFlight), if any


def _shut(conn) -> None:
    """Shut a socket (or a pooled connection's socket) both ways."""
    sock = conn if isinstance(conn, socket.socket) else getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # a read blocked on it returns at once
        except OSError:
            pass


class _InFlight:
    """One request: its deadline, the connections it uses, and why it was cut (if it was)."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.why: str | None = None   # "deadline" | "stop"
        self._conns: list = []
        self._lock = threading.Lock()

    def add(self, conn) -> None:
        with self._lock:
            self._conns.append(conn)
            if self.why is not None:
                _shut(conn)

    def cut(self, why: str) -> None:
        with self._lock:
            if self.why is None:
                self.why = why
                for conn in self._conns:
                    _shut(conn)


def _watch(obj) -> None:
    req = getattr(_current, "req", None)
    if req is not None:
        req.add(obj)


class _WatchedConn:
    """A connection whose new socket is handed to the thread's request (the response keeps
    reading from it after the connection object lets go of it)."""

    def _new_conn(self):
        sock = super()._new_conn()
        _watch(sock)
        return sock


class _HTTPConn(_WatchedConn, HTTPConnection):
    pass


class _HTTPSConn(_WatchedConn, HTTPSConnection):
    pass


class _Watched:
    """A connection pool that hands each connection it gives out (a kept-alive one
    included) to the thread's request."""

    def _get_conn(self, timeout=None):
        conn = super()._get_conn(timeout)
        _watch(conn)
        if getattr(conn, "sock", None) is not None:  # kept alive: the response may take this socket over
            _watch(conn.sock)
        return conn


class _HTTPPool(_Watched, HTTPConnectionPool):
    ConnectionCls = _HTTPConn


class _HTTPSPool(_Watched, HTTPSConnectionPool):
    ConnectionCls = _HTTPSConn


class _Adapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


class _Watchdog:
    """Cuts requests past their deadline, and all of them once ``stop`` is set (a thread
    polling every ``tick`` seconds while requests are in flight)."""

    def __init__(self, stop: threading.Event, tick: float = 0.05):
        self.stop = stop
        self.tick = tick
        self._reqs: set[_InFlight] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, req: _InFlight) -> None:
        with self._lock:
            self._reqs.add(req)
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
        if self.stop.is_set():
            req.cut("stop")

    def discard(self, req: _InFlight) -> None:
        with self._lock:
            self._reqs.discard(req)

    def _run(self) -> None:
        while not self._closed.wait(self.tick):
            stopping = self.stop.is_set()
            now = time.monotonic()
            with self._lock:
                reqs = list(self._reqs)
            for r in reqs:
                if stopping:
                    r.cut("stop")
                elif now >= r.deadline:
                    r.cut("deadline")

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            t, self._thread = self._thread, None
        if t is not None:
            t.join(5)


# --------------------------------------------------------------------------- the client


class Client:
    """GETs against the API with the error classes above, backoff and one rate limit;
    one ``requests.Session`` per thread. Thread-safe; ``close`` ends every session.

    ``timeout_s`` bounds each request as a whole (connect and every read; see the module
    doc); ``max_json_bytes`` / ``max_thumb_bytes`` cap the bodies read."""

    def __init__(self, api_url: str, token: str, stop: threading.Event | None = None, *,
                 timeout_s: float = 30.0, retries: int = 6, backoff_s: float = 1.0,
                 backoff_max_s: float = 60.0, max_retry_after_s: float = 600.0, rate_limit: float = 0.0,
                 max_json_bytes: int = MAX_JSON_MB << 20, max_thumb_bytes: int = MAX_THUMB_MB << 20):
        self.api_url = str(api_url).rstrip("/")
        self.__auth = {"Authorization": f"OAuth {token}"}
        self.__token = token
        self.stop = stop if stop is not None else threading.Event()
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.max_json_bytes = int(max_json_bytes)
        self.max_thumb_bytes = int(max_thumb_bytes)
        self.counters = Counters()
        self.limiter = RateLimiter(rate_limit)
        self.watchdog = _Watchdog(self.stop)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<mapillary.Client {self.api_url} (token hidden)>"

    def scrub(self, text: str) -> str:
        """A message from a server with the token (if it were ever echoed) masked."""
        return str(text).replace(self.__token, "***") if self.__token else str(text)

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            # max_retries=0: the retry decisions are this class's (see the module docstring);
            # the adapter's pools tell the watchdog which connections a request uses
            adapter = _Adapter(pool_connections=4, pool_maxsize=4, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def close(self) -> None:
        self.watchdog.close()
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()

    def thumb_host_ok(self, url: str) -> bool:
        """Is ``url`` on a host this API's thumbnails may come from (see :func:`thumb_host_ok`)?"""
        return thumb_host_ok(url, self.api_url)

    # ---------------------------------------------------------------- the API's requests

    def search(self, box, fields: str, limit: int, *, reduce_ok: bool = True) -> list:
        """The records of an image search of ``box`` (west, south, east, north).

        Raises ReduceData (when ``reduce_ok``), TokenError, ParameterError, Stopped, or
        RequestFailed."""
        params = {"bbox": bbox_param(box), "fields": fields, "limit": str(int(limit))}
        return self.get(f"{self.api_url}/images", params, api=True, reduce_ok=reduce_ok)["data"]

    def thumbnail(self, url: str) -> bytes:
        """The bytes of a thumbnail (from the CDN: no token, not rate limited). Raises
        ForeignHost, without a request, for a URL on a host thumbnails do not come from."""
        if not self.thumb_host_ok(url):
            raise ForeignHost(f"thumbnail on {origin(url)}, not a host of the API's thumbnails")
        return self.get(url, api=False)

    def _request(self, url: str, params: dict | None, api: bool) -> tuple[int, dict, bytes]:
        """One GET within the deadline: (status, headers, body), the body read streamed
        against its cap. Raises Stopped, TooLarge, requests' exceptions (a cut request as
        requests.Timeout)."""
        req = _InFlight(time.monotonic() + self.timeout_s)
        cap = self.max_json_bytes if api else self.max_thumb_bytes
        self.watchdog.add(req)
        _current.req = req
        try:
            try:
                resp = self._session().get(url, params=params, headers=self.__auth if api else None,
                                           timeout=(self.timeout_s, self.timeout_s), stream=True,
                                           allow_redirects=False)
                try:
                    limit = cap if resp.status_code == 200 else MAX_ERROR_BYTES
                    declared = _int_or_none(resp.headers.get("Content-Length"))
                    if declared is not None and declared > limit and resp.status_code == 200:
                        raise TooLarge(f"answer of {declared / 2**20:.1f} MB, over the {limit / 2**20:g} MB cap")
                    body = bytearray()
                    for chunk in resp.iter_content(64 << 10):
                        body += chunk
                        if len(body) > limit:
                            if resp.status_code != 200:
                                break  # an error's first MB says what it is
                            raise TooLarge(f"answer over the {limit / 2**20:g} MB cap")
                    status, headers = resp.status_code, resp.headers
                finally:
                    resp.close()
            except (requests.RequestException, OSError, ValueError):
                if req.why is not None:
                    raise requests.Timeout() from None
                raise
            if req.why is not None:  # cut while the body was read: whatever arrived is not all
                raise requests.Timeout()
            return status, headers, bytes(body)
        finally:
            _current.req = None
            self.watchdog.discard(req)
            if req.why == "stop" or self.stop.is_set():
                raise Stopped()

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)

    def _fail(self, err: GraphError, api: bool, reduce_ok: bool, params: dict | None) -> str:
        """Raise for the classes that end the request now; the reason to retry otherwise."""
        kind = err.kind if api else ("rate" if err.status == 429 else
                                     "transient" if err.status >= 500 else "refused")
        if kind == "reduce" and reduce_ok:
            raise ReduceData(self.scrub(err.message)[:200])
        if kind == "token":
            raise TokenError(f"Mapillary rejected the access token ({err.describe(self.scrub)}); "
                             f"{TOKEN_HOWTO}")
        if kind == "parameter":
            fields = tuple(f for f in str((params or {}).get("fields", "")).split(",") if f)
            name = err.field(fields + tuple(params or ()))
            raise ParameterError(
                f"Mapillary refused the request's {'field ' + repr(name) if name else 'parameters'} "
                f"({err.describe(self.scrub)}); fields asked for: {', '.join(fields) or 'none'}")
        if kind == "refused":
            raise RequestFailed(err.describe(self.scrub), transient=False)
        return err.describe(self.scrub)

    def get(self, url: str, params: dict | None = None, *, api: bool, reduce_ok: bool = False):
        """The JSON payload (api) or the body bytes (thumbnail) of a 200 answer.

        Raises TokenError / ParameterError (the whole fetch must stop), ReduceData (when
        ``reduce_ok``), Stopped, or RequestFailed once retries run out or on an answer that
        retrying cannot fix."""
        last = ""
        for attempt in range(self.retries + 1):
            if self.stop.is_set():
                raise Stopped()
            if api:
                self.limiter.acquire(self.stop)
            wait = 0.0
            self.counters.add("api_requests" if api else "thumb_requests")
            try:
                status, headers, body = self._request(url, params, api)
            except requests.Timeout:
                last = f"timed out after {self.timeout_s:g} s"
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError, OSError) as exc:
                last = f"connection dropped ({type(exc).__name__})"
            except requests.RequestException as exc:  # a URL requests cannot use: retrying won't help
                raise RequestFailed(f"cannot request {self.scrub(url)[:120]} ({type(exc).__name__})",
                                    transient=False) from None
            else:
                if status == 200:
                    if not api:
                        return body
                    try:
                        payload = json.loads(body)
                        if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
                            raise ValueError("no data list")
                        return payload
                    except ValueError:
                        last = "malformed JSON from the API"
                    finally:
                        del body
                else:
                    err = GraphError.from_bytes(status, body)
                    last = self._fail(err, api, reduce_ok, params)
                    told_after = retry_after_s(_Headers(headers))
                    if (err.kind if api else "") == "rate" or status == 429:
                        self.counters.add("rate_limited")
                        told = err.backoff_s if err.backoff_s is not None else told_after
                        wait = min(max(told, self._backoff(attempt)), self.max_retry_after_s)
                        if api:
                            self.limiter.pause(wait)  # every worker waits, not only this one
                    else:
                        wait = min(told_after, self.max_retry_after_s)
            if attempt == self.retries:
                break
            self.counters.add("retries")
            if self.stop.wait(max(self._backoff(attempt), wait)):
                raise Stopped()
        raise RequestFailed(f"{last} (gave up after {self.retries + 1} attempts)", transient=True)
