"""A local stand-in for the Mapillary API v4 image search, for tests and bench/fetch.py.

It is a real HTTP server (``ThreadingHTTPServer`` on 127.0.0.1, port 0) that speaks the
documented shape of ``GET /images``::

    GET /images?bbox=minLon,minLat,maxLon,maxLat&fields=id,geometry,...&limit=N
    Authorization: OAuth <token>
    -> {"data": [{"id": "...", "geometry": {"type": "Point", "coordinates": [lon, lat]},
                  "captured_at": <ms>, "compass_angle": ..., "sequence": "...",
                  "is_pano": false, "thumb_1024_url": "http://127.0.0.1:PORT/thumb/<id>.jpg"}]}

with only the requested fields, ``limit`` honoured, a Mapillary-like 401 for a missing or
wrong token, an unknown field refused as the Graph API does (code 100, "Tried accessing
nonexisting field"), and an oversized bbox (> ``max_bbox`` deg²) rejected the way the API
does (HTTP 500, "Please reduce the amount of data you're asking for"). Thumbnails are
real, deterministic JPEGs made with PIL.

Errors carry the Graph API's body whatever the HTTP status,
``{"error": {"message", "type", "code", "error_subcode", "fbtrace_id"}}``, in the shapes
the real service sends (its expired-token answer is an HTTP 500, code 190).

Faults are injected on demand with :meth:`MapillaryServer.inject`; every request is
recorded (time, path, status) for the rate-limit checks.

>>> with MapillaryServer(token="t") as srv:            # doctest: +SKIP
...     srv.add_image("1", 48.85, 2.35)
...     srv.inject("429", times=1, retry_after=1)
...     url = srv.url
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image

REDUCE_DATA_BODY = {
    "error": {
        "message": "Please reduce the amount of data you're asking for, then retry your request",
        "type": "OAuthException",
        "code": 1,
        "fbtrace_id": "AbCdEfGhIjKlMnOp",
    }
}
EXPIRED_TOKEN_BODY = {  # as graph.mapillary.com answers an expired token: with HTTP 500
    "error": {
        "message": "Invalid OAuth 2.0 Access Token",
        "type": "MLYApiException",
        "code": 190,
        "fbtrace_id": "AxYz0123456789abcd",
    }
}
RATE_MESSAGES = {
    4: "(#4) Application request limit reached",
    17: "(#17) User request limit reached",
    32: "(#32) Page request limit reached",
    613: "(#613) Calls to this api have exceeded the rate limit.",
}
BAD_TOKEN_BODY = {
    "error": {
        "message": "Invalid OAuth access token - Cannot parse access token",
        "type": "OAuthException",
        "code": 190,
        "fbtrace_id": "QrStUvWxYz012345",
    }
}
THUMB_FIELDS = ("thumb_256_url", "thumb_1024_url", "thumb_2048_url", "thumb_original_url")
KNOWN_FIELDS = ("id", "geometry", "captured_at", "compass_angle", "sequence", "is_pano") + THUMB_FIELDS
FAULT_KINDS = ("429", "500", "reduce", "timeout", "malformed", "drop", "truncate", "401",
               "expired", "field", "rate", "503", "502", "504", "drip", "drip-body", "huge")


def field_body(name: str) -> dict:
    """The Graph API's answer to a field it does not know (HTTP 400, code 100)."""
    return {"error": {"message": f"(#100) Tried accessing nonexisting field ({name}) on node type (Image)",
                      "type": "OAuthException", "code": 100, "fbtrace_id": "F1e1dF1e1dF1e1dF"}}


def rate_body(code: int = 4, backoff_ms: int | None = None) -> dict:
    """A rate-limit answer with code 4, 17, 32 or 613, and a ``backoff`` in ms when given."""
    err = {"message": RATE_MESSAGES[code], "type": "OAuthException", "code": code,
           "error_subcode": 2446079 if code == 613 else None, "fbtrace_id": "R4t3R4t3R4t3R4t3"}
    err = {k: v for k, v in err.items() if v is not None}
    if backoff_ms is not None:
        err["backoff"] = backoff_ms
    return {"error": err}


@dataclass
class FakeImage:
    id: str
    lat: float
    lon: float
    captured_at: int = 1_600_000_000_000  # ms since the epoch
    compass_angle: float = 0.0
    sequence: str = "seq"
    is_pano: bool = False
    dark: bool = False
    thumb_url: str | None = None  # the search answer's thumbnail URL instead of this server's


@dataclass
class Fault:
    kind: str            # one of FAULT_KINDS
    target: str          # "images" (the search) or "thumb"
    times: int           # how many matching requests it hits (-1: all)
    retry_after: str | None = None
    sleep: float = 1.0   # for "timeout"
    ids: frozenset | None = None  # thumb faults: only these image ids
    after: int = 0       # let this many matching requests through first
    code: int = 4        # "rate": the Graph API code
    status: int = 400    # "rate": the HTTP status
    backoff_ms: int | None = None  # "rate": the body's backoff field
    field: str = "thumb_1024_url"  # "field": the field refused
    size: int = 0        # "huge": body bytes sent
    declare: bool = False  # "huge": send a Content-Length (else the body ends when the connection closes)


@dataclass
class Hit:
    t: float       # time.monotonic() when the request arrived
    kind: str      # "images" | "thumb" | "other"
    status: int    # HTTP status sent (0: connection dropped)
    query: dict = field(default_factory=dict)


def thumb_jpeg(image_id: str, size=(48, 32), dark: bool = False) -> bytes:
    """A deterministic JPEG for an image id: smooth noise around a per-id colour."""
    seed = zlib.crc32(image_id.encode())
    rng = np.random.default_rng(seed)
    base = rng.uniform(15, 30, 3) if dark else rng.uniform(90, 200, 3)
    noise = rng.normal(0, 6 if dark else 25, (size[1], size[0], 3))
    arr = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


def offset_m(lat: float, lon: float, north_m: float = 0.0, east_m: float = 0.0) -> tuple[float, float]:
    """A point ``north_m`` / ``east_m`` metres away (small offsets, spherical Earth)."""
    dlat = north_m / 111_194.93
    dlon = east_m / (111_194.93 * np.cos(np.radians(lat)))
    return lat + dlat, lon + dlon


class MapillaryServer:
    """The fake API. Use as a context manager; ``url`` is its base URL."""

    def __init__(self, token: str = "test-token", max_bbox: float = 0.01, latency: float = 0.0,
                 thumb_size=(48, 32)):
        self.token = token
        self.max_bbox = max_bbox
        self.latency = latency
        self.thumb_size = tuple(thumb_size)
        self.images: dict[str, FakeImage] = {}
        self.hits: list[Hit] = []
        self.arrived: dict[str, int] = {}   # requests that arrived, by kind (hits: those answered)
        self.auth_seen: list[str] = []      # every Authorization header received, in order
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._arrays = None  # (ids, lat, lon) cache for the bbox search
        self._thumbs: dict[str, bytes] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ world

    def add_image(self, image_id: str, lat: float, lon: float, **kw) -> FakeImage:
        img = FakeImage(str(image_id), float(lat), float(lon), **kw)
        with self._lock:
            self.images[img.id] = img
            self._arrays = None
        return img

    def seed_cells(self, bboxes, per_cell: int, seed: int = 0, spacing_m: float = 300.0,
                   prefix: str = "") -> list[FakeImage]:
        """Place ``per_cell`` images in each (west, south, east, north) box, at random points
        at least ``spacing_m`` apart (so that none is a near-duplicate of another)."""
        rng = np.random.default_rng(seed)
        out = []
        for b, (w, s, e, n) in enumerate(bboxes):
            pts: list[tuple[float, float]] = []
            tries = 0
            while len(pts) < per_cell and tries < 100 * per_cell:
                tries += 1
                lat = rng.uniform(s + 1e-6, n - 1e-6)
                lon = rng.uniform(w + 1e-6, e - 1e-6)
                if all(_dist_m(lat, lon, a, o) >= spacing_m for a, o in pts):
                    pts.append((lat, lon))
            for k, (lat, lon) in enumerate(pts):
                out.append(self.add_image(
                    f"{prefix}{b}{k:04d}{seed}", lat, lon, captured_at=1_600_000_000_000 + 1000 * k,
                    compass_angle=float(k % 360), sequence=f"{prefix}seq{b}-{k // 5}"))
        return out

    def inject(self, kind: str, times: int = 1, target: str | None = None, retry_after=None,
               sleep: float = 1.0, ids=None, *, after: int = 0, code: int = 4, status: int = 400,
               backoff_ms: int | None = None, field: str = "thumb_1024_url", size: int = 0,
               declare: bool = False) -> None:
        """Make the next ``times`` matching requests fail with ``kind``:

        - ``"429"``: Too Many Requests, with ``Retry-After: retry_after`` when given
        - ``"500"``: a plain HTTP 500; ``"reduce"``: HTTP 500 with the API's
          "Please reduce the amount of data" body
        - ``"timeout"``: sleep ``sleep`` seconds before answering (longer than the client waits)
        - ``"malformed"``: HTTP 200 with a body that is not JSON
        - ``"drop"``: close the connection without an answer
        - ``"truncate"``: a thumbnail cut in half (only for target "thumb")
        - ``"401"``: the bad-token answer
        - ``"expired"``: HTTP 500 with the API's expired-token body (code 190, MLYApiException)
        - ``"field"``: HTTP 400, code 100 "Tried accessing nonexisting field (``field``)"
        - ``"rate"``: HTTP ``status`` with rate-limit code ``code`` (4, 17, 32, 613) and, when
          given, ``backoff_ms`` in the body
        - ``"503"``: Service Unavailable with code 2; ``"502"`` / ``"504"``: a proxy's HTML page
        - ``"drip"``: a whole answer (status line, headers, body) one byte every ``sleep`` seconds;
          ``"drip-body"``: the headers at once, then the body one byte every ``sleep`` seconds
        - ``"huge"``: HTTP 200 with a ``size``-byte body (valid-looking JSON for the search, JPEG
          bytes for a thumbnail), sent in 1 MiB pieces; with a Content-Length only when ``declare``

        A dripping or huge answer stops as soon as the client hangs up or the server stops.

        ``target`` is "images" (default) or "thumb"; ``ids`` restricts thumb faults to images;
        ``after`` lets that many matching requests through before the fault starts.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; known: {FAULT_KINDS}")
        target = target or ("thumb" if kind == "truncate" else "images")
        with self._lock:
            self._faults.append(Fault(kind, target, times, None if retry_after is None else str(retry_after),
                                      sleep, None if ids is None else frozenset(map(str, ids)), int(after),
                                      int(code), int(status), backoff_ms, str(field), int(size), bool(declare)))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def hits_of(self, kind: str) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.kind == kind]

    # ------------------------------------------------------------ serving

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> MapillaryServer:
        handler = type("Handler", (_Handler,), {"api": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> MapillaryServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _take_fault(self, target: str, image_id: str | None = None) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.target != target or f.times == 0:
                    continue
                if f.ids is not None and image_id not in f.ids:
                    continue
                if f.after > 0:
                    f.after -= 1
                    continue
                if f.times > 0:
                    f.times -= 1
                return f
        return None

    def _record(self, kind: str, status: int, query: dict, t: float) -> None:
        with self._lock:
            self.hits.append(Hit(t, kind, status, query))

    def _search(self, w: float, s: float, e: float, n: float, limit: int) -> list[FakeImage]:
        with self._lock:
            if self._arrays is None:
                ids = sorted(self.images)
                lat = np.array([self.images[i].lat for i in ids], dtype=np.float64)
                lon = np.array([self.images[i].lon for i in ids], dtype=np.float64)
                self._arrays = (ids, lat, lon)
            ids, lat, lon = self._arrays
            hit = np.flatnonzero((lat >= s) & (lat <= n) & (lon >= w) & (lon <= e))
            return [self.images[ids[i]] for i in hit[:limit]]

    def thumb(self, image_id: str) -> bytes:
        with self._lock:
            data = self._thumbs.get(image_id)
        if data is None:
            data = thumb_jpeg(image_id, self.thumb_size, self.images[image_id].dark)
            with self._lock:
                self._thumbs[image_id] = data
        return data


def _dist_m(lat1, lon1, lat2, lon2) -> float:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lon2 - lon1) / 2) ** 2
    return float(2 * 6_371_008.8 * np.arcsin(np.sqrt(a)))


class _Handler(BaseHTTPRequestHandler):
    api: MapillaryServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, OSError):  # the client hung up (timeouts, drops)
            pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj, headers=None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        t = time.monotonic()
        api = self.api
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/images":
            kind = "images"
        elif url.path.startswith("/thumb/"):
            kind = "thumb"
        else:
            kind = "other"
        if api.latency:
            time.sleep(api.latency)
        image_id = url.path[len("/thumb/"):].rsplit(".", 1)[0] if kind == "thumb" else None
        with api._lock:
            api.arrived[kind] = api.arrived.get(kind, 0) + 1
            if self.headers.get("Authorization") is not None:
                api.auth_seen.append(self.headers["Authorization"])
        fault = api._take_fault(kind, image_id) if kind != "other" else None
        status = self._serve(kind, query, fault, image_id)
        api._record(kind, status, query, t)

    def _fault(self, fault: Fault) -> int | None:
        """Answer with the fault; returns the status sent (0 for a drop), or None to go on."""
        k = fault.kind
        if k == "429":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
            self._json(429, {"error": {"message": "Application request limit reached", "type": "OAuthException",
                                       "code": 4}}, headers)
            return 429
        if k == "500":
            self._json(500, {"error": {"message": "An unknown error occurred", "type": "OAuthException",
                                       "code": 1}})
            return 500
        if k == "reduce":
            self._json(500, REDUCE_DATA_BODY)
            return 500
        if k == "401":
            self._json(401, BAD_TOKEN_BODY)
            return 401
        if k == "expired":
            self._json(500, EXPIRED_TOKEN_BODY)
            return 500
        if k == "field":
            self._json(400, field_body(fault.field))
            return 400
        if k == "rate":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
            self._json(fault.status, rate_body(fault.code, fault.backoff_ms), headers)
            return fault.status
        if k == "503":
            self._json(503, {"error": {"message": "Service temporarily unavailable", "type": "OAuthException",
                                       "code": 2, "fbtrace_id": "S3rv1c3S3rv1c3S3"}})
            return 503
        if k in ("502", "504"):
            title = "502 Bad Gateway" if k == "502" else "504 Gateway Time-out"
            self._send(int(k), f"<html><head><title>{title}</title></head><body>{title}</body></html>".encode(),
                       "text/html")
            return int(k)
        if k == "timeout":
            time.sleep(fault.sleep)
            return None  # then answer normally (the client has given up by now)
        if k == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return 0
        if k == "malformed":
            self._send(200, b'{"data": [{"id": "1", "geometry": ')
            return 200
        if k in ("drip", "drip-body"):
            body = b'{"data": []}' if fault.target == "images" else thumb_jpeg("drip")
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            self.close_connection = True
            if k == "drip-body":
                self.wfile.write(head)
                head = b""
            for b in head + body:
                if self.api._httpd is None:
                    break
                self.wfile.write(bytes([b]))  # unbuffered: each byte is its own send
                time.sleep(fault.sleep)
            return 200
        if k == "huge":
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "application/json" if fault.target == "images" else "image/jpeg")
            if fault.declare:
                self.send_header("Content-Length", str(fault.size))
            self.send_header("Connection", "close")
            self.end_headers()
            first = b'{"data": [], "pad": "' if fault.target == "images" else thumb_jpeg("huge")
            piece = b"x" * (1 << 20)
            sent = 0
            self.wfile.write(first)
            sent += len(first)
            while sent < fault.size and self.api._httpd is not None:
                n = min(len(piece), fault.size - sent)
                self.wfile.write(piece[:n])
                sent += n
            return 200
        return None

    def _serve(self, kind: str, query: dict, fault: Fault | None, image_id: str | None) -> int:
        api = self.api
        if kind == "other":
            self._json(404, {"error": {"message": "Unknown path", "type": "GraphMethodException", "code": 100}})
            return 404
        if fault is not None and fault.kind != "truncate":
            sent = self._fault(fault)
            if sent is not None:
                return sent
        if kind == "thumb":
            if image_id not in api.images:
                self._json(404, {"error": {"message": "not found"}})
                return 404
            data = api.thumb(image_id)
            if fault is not None and fault.kind == "truncate":
                data = data[: len(data) // 2]
            self._send(200, data, "image/jpeg")
            return 200
        # the search
        auth = self.headers.get("Authorization", "")
        if auth != f"OAuth {api.token}":
            self._json(401, BAD_TOKEN_BODY)
            return 401
        try:
            w, s, e, n = (float(v) for v in query["bbox"].split(","))
            limit = int(query.get("limit", "2000"))
            fields = [f for f in query.get("fields", "id").split(",") if f]
        except (KeyError, ValueError):
            self._json(400, {"error": {"message": "Invalid parameter", "type": "GraphMethodException", "code": 100}})
            return 400
        unknown = [f for f in fields if f not in KNOWN_FIELDS]
        if unknown:
            self._json(400, field_body(unknown[0]))
            return 400
        if not (1 <= limit <= 2000) or e <= w or n <= s:
            self._json(400, {"error": {"message": f"Invalid parameter {unknown}", "type": "GraphMethodException",
                                       "code": 100}})
            return 400
        if (e - w) * (n - s) > api.max_bbox:
            self._json(500, REDUCE_DATA_BODY)
            return 500
        data = [self._image_json(img, fields) for img in api._search(w, s, e, n, limit)]
        self._json(200, {"data": data})
        return 200

    def _image_json(self, img: FakeImage, fields: list[str]) -> dict:
        out: dict = {"id": img.id}
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        for f in fields:
            if f == "geometry":
                out[f] = {"type": "Point", "coordinates": [img.lon, img.lat]}
            elif f in THUMB_FIELDS:
                out[f] = img.thumb_url or f"{base}/thumb/{img.id}.jpg"
            elif f != "id":
                out[f] = getattr(img, f)
        return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
