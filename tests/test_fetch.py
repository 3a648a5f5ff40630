"""pipeline.fetch against the local fake Mapillary API (tests/mapillary_server.py).

Cells here are small (level 10: 4 x 2 sub-boxes of <= 0.01 deg²; level 12: one), thumbnails
48 x 32 px, timeouts and backoff in tens of milliseconds, so the whole file runs in seconds.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geohier import grid
from geohier.errors import CellIdError, InputError
from pipeline import cli
from pipeline import fetch as F
from pipeline import mapillary as M
from tests.mapillary_server import REDUCE_DATA_BODY, MapillaryServer, offset_m, thumb_jpeg

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "MLY|4242|s3cr3t-T0KEN-value"
CELL = "0/1/2/3/0/1/2/3/0/1"            # level 10, north-west Atlantic coast: 4 x 2 sub-boxes
CELL2 = "0/1/2/3/0/1/2/3/0/2"
SMALL = "0/1/2/3/0/1/2/3/0/1/2/3"        # level 12: one sub-box


def box(cell_id):
    return grid.bounds(grid.from_id(cell_id))


def center(cell_id):
    return grid.centroid(grid.from_id(cell_id))


def opts(srv, **kw) -> F.FetchOptions:
    base = dict(api_url=srv.url, per_cell=50, timeout_s=0.5, backoff_s=0.01, backoff_max_s=0.05,
                retries=3, concurrency=2, rate_limit=0)
    base.update(kw)
    return F.FetchOptions(**base)


@pytest.fixture
def srv():
    with MapillaryServer(token=TOKEN) as s:
        yield s


def rows(ws):
    with ws.manifest() as m:
        return m.frame()


def log(ws):
    with ws.manifest() as m:
        return m.fetch_status()


def _main(argv, monkeypatch):
    # Only this command: the other command modules are written in parallel.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("pipeline.fetch",))
    return cli.main(argv)


# ------------------------------------------------------------------ request shape


def test_request_shape_and_rows(ws, srv):
    lat, lon = center(SMALL)
    srv.add_image("1001", lat, lon, captured_at=1_600_000_000_123, sequence="seqA", compass_angle=90.0)
    report = F.fetch(ws, [SMALL], opts(srv, thumb="256", page_limit=77), TOKEN)
    assert report.images_kept == 1 and report.done == 1

    (hit,) = srv.hits_of("images")
    assert hit.status == 200  # the server checks "Authorization: OAuth <token>" (401 otherwise)
    w, s, e, n = (float(v) for v in hit.query["bbox"].split(","))
    b = box(SMALL)
    assert (w, s, e, n) == pytest.approx((b.west, b.south, b.east, b.north), abs=1e-7)
    assert (e - w) * (n - s) <= 0.01
    assert hit.query["fields"].split(",") == ["id", "geometry", "captured_at", "compass_angle", "sequence",
                                             "is_pano", "thumb_256_url"]
    assert hit.query["limit"] == "77"

    df = rows(ws)
    r = df.iloc[0]
    assert (r.source, r.source_id, r.sequence_id) == ("mapillary", "1001", "seqA")
    assert r.captured_at == "2020-09-13T12:26:40+00:00"
    assert (r.lat, r.lon) == pytest.approx((lat, lon))
    assert (r.width, r.height) == (48, 32)
    data = thumb_jpeg("1001")
    assert r.sha256 == hashlib.sha256(data).hexdigest()
    assert (ws.data_dir / r.path).read_bytes() == data
    grey = np.asarray(Image.open(ws.data_dir / r.path).convert("L"), dtype=np.float64).mean()
    assert r.brightness == pytest.approx(grey, abs=0.01)
    assert log(ws)[SMALL]["status"] == "done"


def test_subboxes_cover_the_cell_within_the_limit_in_a_spread_order():
    sb = F.subboxes("0/1/2/3/0/1/2/3", 0.01)       # level 8: 1.40625 x 0.703125 deg
    assert (sb.nx, sb.ny) == (15, 8)
    assert sorted(sb.order.tolist()) == list(range(120))
    boxes = [sb.box(i) for i in range(len(sb))]
    assert all((e - w) * (n - s) <= 0.01 for w, s, e, n in boxes)
    b = sb.bbox
    assert sum((e - w) * (n - s) for w, s, e, n in boxes) == pytest.approx((b.east - b.west) * (b.north - b.south))
    # the first four boxes lie far apart (a third of the cell or more on some axis)
    cx = [((w + e) / 2 - b.west) / (b.east - b.west) for w, s, e, n in boxes[:4]]
    cy = [((s + n) / 2 - b.south) / (b.north - b.south) for w, s, e, n in boxes[:4]]
    for i in range(4):
        for j in range(i):
            assert max(abs(cx[i] - cx[j]), abs(cy[i] - cy[j])) >= 0.3
    # deterministic, and another seed gives another order
    assert F.subboxes("0/1/2/3/0/1/2/3", 0.01).order.tolist() == sb.order.tolist()
    assert F.subboxes("0/1/2/3/0/1/2/3", 0.01, seed=1).order.tolist() != sb.order.tolist()
    assert len(F.subboxes(SMALL, 0.01)) == 1
    assert len(F.subboxes(CELL, 0.001)) > len(F.subboxes(CELL, 0.01))


def test_searches_until_the_target_is_met(ws, srv):
    srv.seed_cells([box(CELL)], per_cell=12, spacing_m=400)
    report = F.fetch(ws, [CELL], opts(srv, per_cell=5), TOKEN)
    assert report.images_kept == 5
    assert log(ws)[CELL]["status"] == "done" and log(ws)[CELL]["kept"] == 5
    assert len(srv.hits_of("images")) < 8  # stopped before the 8 sub-boxes ran out


def test_exhausted_subboxes_done_with_fewer_and_empty_when_none(ws, srv):
    srv.seed_cells([box(CELL)], per_cell=3, spacing_m=400)
    report = F.fetch(ws, [CELL, CELL2], opts(srv, per_cell=10), TOKEN)
    st = log(ws)
    assert st[CELL]["status"] == "done" and st[CELL]["kept"] == 3 and st[CELL]["found"] == 3
    assert st[CELL2]["status"] == "empty" and st[CELL2]["error"] is None
    assert report.done == 1 and report.empty == 1
    assert len(srv.hits_of("images")) == 16  # every sub-box of both cells searched once


def test_images_on_the_border_belong_to_one_cell(ws, srv):
    b = box(CELL)
    srv.add_image("edge", (b.south + b.north) / 2, b.east)  # lon == east edge: the neighbour's
    srv.add_image("inside", (b.south + b.north) / 2, (b.west + b.east) / 2)
    F.fetch(ws, [CELL], opts(srv), TOKEN)
    assert rows(ws).source_id.tolist() == ["inside"]


# ------------------------------------------------------------------ filters


def test_panoramas_skipped_unless_asked(ws, srv):
    lat, lon = center(SMALL)
    srv.add_image("pano", lat, lon, is_pano=True)
    srv.add_image("flat", *offset_m(lat, lon, north_m=500))
    report = F.fetch(ws, [SMALL], opts(srv), TOKEN)
    assert rows(ws).source_id.tolist() == ["flat"]
    assert report.filtered["panorama"] == 1
    assert len(srv.hits_of("thumb")) == 1  # the panorama's thumbnail is never downloaded


def test_include_pano(ws, srv):
    lat, lon = center(SMALL)
    srv.add_image("pano", lat, lon, is_pano=True)
    F.fetch(ws, [SMALL], opts(srv, include_pano=True), TOKEN)
    assert rows(ws).source_id.tolist() == ["pano"]


def test_dark_thumbnails_dropped(ws, srv):
    lat, lon = center(SMALL)
    srv.add_image("dark", lat, lon, dark=True)
    srv.add_image("light", *offset_m(lat, lon, east_m=500))
    report = F.fetch(ws, [SMALL], opts(srv), TOKEN)
    df = rows(ws)
    assert df.source_id.tolist() == ["light"] and df.brightness.iloc[0] >= 40
    assert report.filtered["dark"] == 1


def test_all_dark_is_empty_and_threshold_configurable(ws, srv, tmp_path):
    lat, lon = center(SMALL)
    srv.add_image("dark", lat, lon, dark=True)
    F.fetch(ws, [SMALL], opts(srv), TOKEN)
    assert log(ws)[SMALL]["status"] == "empty" and rows(ws).empty
    ws2 = type(ws)(tmp_path / "d2", tmp_path / "m2")
    F.fetch(ws2, [SMALL], opts(srv, min_brightness=5), TOKEN)
    assert rows(ws2).source_id.tolist() == ["dark"]


def test_near_duplicates_20m_apart_keep_one(ws, srv):
    lat, lon = center(SMALL)
    srv.add_image("a", lat, lon)
    srv.add_image("b", *offset_m(lat, lon, north_m=20))
    srv.add_image("c", *offset_m(lat, lon, north_m=400))
    report = F.fetch(ws, [SMALL], opts(srv), TOKEN)
    assert sorted(rows(ws).source_id) == ["a", "c"]
    assert report.filtered["near-duplicate"] == 1
    assert len(srv.hits_of("thumb")) == 2  # the duplicate is never downloaded


def test_dedup_against_images_already_in_the_workspace(ws, srv):
    lat, lon = center(SMALL)
    with ws.manifest() as m:
        m.store_image(thumb_jpeg("mine"), "jpg", source="photos", lat=lat, lon=lon)
    srv.add_image("near", *offset_m(lat, lon, east_m=20))
    srv.add_image("far", *offset_m(lat, lon, east_m=300))
    F.fetch(ws, [SMALL], opts(srv), TOKEN)
    assert sorted(rows(ws).source_id.dropna()) == ["far"]


def test_dedup_radius_configurable(ws, srv):
    lat, lon = center(SMALL)
    srv.add_image("a", lat, lon)
    srv.add_image("b", *offset_m(lat, lon, north_m=20))
    F.fetch(ws, [SMALL], opts(srv, dedup_m=10), TOKEN)
    assert sorted(rows(ws).source_id) == ["a", "b"]


def test_dedup_neighbour_of_a_rejected_image_takes_its_place(ws, srv):
    lat, lon = center(SMALL)
    srv.add_image("a", lat, lon, dark=True)        # reserved first, then found dark
    srv.add_image("b", *offset_m(lat, lon, north_m=20))
    F.fetch(ws, [SMALL], opts(srv), TOKEN)
    assert rows(ws).source_id.tolist() == ["b"]


def test_dedup_unit():
    d = F.Dedup([0.0], [0.0], 100)
    lat20, lon20 = offset_m(0.0, 0.0, north_m=20)
    assert not d.reserve("x", lat20, lon20)          # 20 m from the known point
    lat150, lon150 = offset_m(0.0, 0.0, north_m=150)
    assert d.reserve("y", lat150, lon150)
    assert not d.reserve("z", *offset_m(lat150, lon150, east_m=50))
    d.release("y")
    assert d.reserve("z", *offset_m(lat150, lon150, east_m=50))
    # many reservations force merges into the tree; release still works after a merge
    for k in range(600):
        assert d.reserve(f"p{k}", 10.0, k * 0.01)
    d.release("p0")
    assert d.reserve("q", 10.0, 0.0)
    assert F.Dedup([], [], 0).reserve("any", 0, 0)


# ------------------------------------------------------------------ faults


@pytest.mark.slow
def test_429_honours_retry_after(ws, srv):
    lat, lon = center(SMALL)
    srv.add_image("1", lat, lon)
    srv.inject("429", times=1, retry_after=1)
    report = F.fetch(ws, [SMALL], opts(srv), TOKEN)
    hits = srv.hits_of("images")
    assert [h.status for h in hits] == [429, 200]
    assert hits[1].t - hits[0].t >= 0.95   # waited Retry-After, not the 10 ms backoff
    assert report.retries == 1 and rows(ws).source_id.tolist() == ["1"]


def test_retry_after_as_http_date():
    r = types.SimpleNamespace(headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert M.retry_after_s(r) == 0.0  # in the past
    assert M.retry_after_s(types.SimpleNamespace(headers={"Retry-After": "3"})) == 3.0


def test_backoff_grows_exponentially(ws, srv):
    srv.add_image("1", *center(SMALL))
    srv.inject("500", times=3)
    F.fetch(ws, [SMALL], opts(srv, backoff_s=0.1, backoff_max_s=10, retries=3), TOKEN)
    t = [h.t for h in srv.hits_of("images")]
    gaps = np.diff(t)
    assert len(t) == 4
    # delays are base * 2**attempt * U(0.5, 1): 0.05-0.1, 0.1-0.2, 0.2-0.4
    assert 0.045 <= gaps[0] <= 0.2 and 0.095 <= gaps[1] <= 0.35 and 0.19 <= gaps[2] <= 0.6


def test_500_retried_then_error_never_empty(ws, srv):
    srv.seed_cells([box(SMALL)], per_cell=2)
    srv.inject("500", times=-1)
    report = F.fetch(ws, [SMALL], opts(srv, retries=2), TOKEN)
    st = log(ws)[SMALL]
    assert st["status"] == "error" and "HTTP 500" in st["error"] and "3 attempts" in st["error"]
    assert report.error == 1 and report.errors[0][0] == SMALL
    assert len(srv.hits_of("images")) == 3
    srv.clear_faults()
    F.fetch(ws, [SMALL], opts(srv), TOKEN)  # an error cell is retried by the next run
    assert log(ws)[SMALL]["status"] == "done" and len(rows(ws)) == 2


def test_reduce_data_500_splits_the_subbox(ws, srv):
    srv.seed_cells([box(SMALL)], per_cell=4)
    srv.inject("reduce", times=1)
    F.fetch(ws, [SMALL], opts(srv), TOKEN)
    hits = srv.hits_of("images")
    assert hits[0].status == 500 and all(h.status == 200 for h in hits[1:])
    areas = [(lambda w, s, e, n: (e - w) * (n - s))(*map(float, h.query["bbox"].split(","))) for h in hits]
    assert all(a == pytest.approx(areas[0] / 4, rel=1e-3) for a in areas[1:])   # the quarters
    assert len(rows(ws)) == 4 and log(ws)[SMALL]["status"] == "done"


def test_oversized_bbox_rejected_as_the_api_does_and_recovered(ws, srv):
    srv.seed_cells([box(CELL)], per_cell=6, spacing_m=400)
    report = F.fetch(ws, [CELL], opts(srv, max_bbox_deg2=0.04), TOKEN)   # the server allows 0.01
    codes = [h.status for h in srv.hits_of("images")]
    assert 500 in codes and report.images_kept == 6


def test_server_rejects_oversized_bbox_with_the_api_body(srv):
    import requests

    r = requests.get(f"{srv.url}/images", params={"bbox": "0,0,0.2,0.2", "fields": "id"},
                     headers={"Authorization": f"OAuth {TOKEN}"}, timeout=5)
    assert r.status_code == 500 and r.json() == REDUCE_DATA_BODY
    r = requests.get(f"{srv.url}/images", params={"bbox": "0,0,0.05,0.05", "fields": "id,geometry",
                                                  "limit": "1"}, headers={"Authorization": "OAuth nope"}, timeout=5)
    assert r.status_code == 401 and r.json()["error"]["type"] == "OAuthException"


def test_timeout_retried(ws, srv):
    srv.add_image("1", *center(SMALL))
    srv.inject("timeout", times=1, sleep=0.8)
    report = F.fetch(ws, [SMALL], opts(srv, timeout_s=0.2), TOKEN)
    assert report.retries == 1 and rows(ws).source_id.tolist() == ["1"]


def test_persistent_timeouts_end_in_error(ws, srv):
    srv.add_image("1", *center(SMALL))
    srv.inject("timeout", times=-1, sleep=0.4)
    F.fetch(ws, [SMALL], opts(srv, timeout_s=0.1, retries=1), TOKEN)
    st = log(ws)[SMALL]
    assert st["status"] == "error" and "timed out" in st["error"]


def test_malformed_json_retried_then_error(ws, srv, tmp_path):
    srv.add_image("1", *center(SMALL))
    srv.inject("malformed", times=1)
    F.fetch(ws, [SMALL], opts(srv), TOKEN)
    assert rows(ws).source_id.tolist() == ["1"]
    srv.inject("malformed", times=-1)
    ws2 = type(ws)(tmp_path / "d2", tmp_path / "m2")
    F.fetch(ws2, [SMALL], opts(srv, retries=1), TOKEN)
    st = log(ws2)[SMALL]
    assert st["status"] == "error" and "malformed JSON" in st["error"]


def test_dropped_connection_retried(ws, srv):
    srv.add_image("1", *center(SMALL))
    srv.inject("drop", times=1)
    srv.inject("drop", times=1, target="thumb")
    report = F.fetch(ws, [SMALL], opts(srv), TOKEN)
    assert report.retries == 2 and rows(ws).source_id.tolist() == ["1"]


def test_thumbnail_failures_make_an_error_not_empty(ws, srv):
    srv.add_image("1", *center(SMALL))
    srv.inject("drop", times=-1, target="thumb")
    F.fetch(ws, [SMALL], opts(srv, retries=1), TOKEN)
    st = log(ws)[SMALL]
    assert st["status"] == "error" and "thumbnail" in st["error"] and rows(ws).empty
    srv.clear_faults()
    F.fetch(ws, [SMALL], opts(srv), TOKEN)   # the sub-box was not marked searched: redone
    assert rows(ws).source_id.tolist() == ["1"]


def test_truncated_thumbnail_never_stored(ws, srv):
    lat, lon = center(SMALL)
    srv.add_image("cut", lat, lon)
    srv.add_image("whole", *offset_m(lat, lon, north_m=500))
    srv.add_image("once", *offset_m(lat, lon, north_m=-500))
    srv.inject("truncate", times=-1, ids=["cut"])
    srv.inject("truncate", times=1, ids=["once"])   # cut short once: the retry gets it
    report = F.fetch(ws, [SMALL], opts(srv), TOKEN)
    assert sorted(rows(ws).source_id) == ["once", "whole"]
    assert report.filtered["unreadable thumbnail"] == 1
    assert log(ws)[SMALL]["status"] == "done"
    files = [p for p in ws.images_dir.rglob("*") if p.is_file()]
    assert len(files) == 2


def test_401_stops_everything_without_the_token(ws, srv):
    for c in (CELL, CELL2):
        srv.seed_cells([box(c)], per_cell=2)
    bad = "MLY|4242|wrong-token-abc"
    with pytest.raises(M.TokenError) as exc:
        F.fetch(ws, [CELL, CELL2], opts(srv, concurrency=1), bad)
    msg = str(exc.value)
    assert "rejected the access token" in msg and "401" in msg
    assert bad not in msg and bad not in repr(exc.value) and TOKEN not in msg
    assert len(srv.hits_of("images")) == 1          # nothing after the 401
    assert all(s["status"] not in ("empty", "done") for s in log(ws).values())


def test_401_from_the_cli(ws, srv, monkeypatch, capsys):
    srv.add_image("1", *center(SMALL))
    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", "MLY|1|not-the-right-one")
    code = _main(["fetch", "--cells", SMALL, "--api-url", srv.url, "--retries", "0"], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "error: Mapillary rejected the access token" in err
    assert "not-the-right-one" not in err


def test_missing_or_malformed_token(ws, tmp_path, monkeypatch):
    monkeypatch.delenv("MAPILLARY_ACCESS_TOKEN", raising=False)
    with pytest.raises(M.TokenError, match="MAPILLARY_ACCESS_TOKEN"):
        M.read_token()
    f = tmp_path / "tok"
    f.write_text("  MLY|9|abc  \n")
    assert M.read_token(f) == "MLY|9|abc"
    with pytest.raises(M.TokenError) as exc:
        M.check_token("MLY|9|has space")
    assert "has space" not in str(exc.value)
    with pytest.raises(InputError, match="not found"):
        M.read_token(tmp_path / "missing")


@pytest.mark.slow
def test_token_never_printed_logged_or_stored(ws, srv, tmp_path):
    srv.seed_cells([box(CELL)], per_cell=4, spacing_m=400)
    srv.inject("429", times=1, retry_after=0)
    srv.inject("500", times=1)
    srv.inject("drop", times=1)
    srv.inject("500", times=-1, target="thumb", ids=[next(iter(srv.images))])  # one image errors
    env = dict(os.environ, MAPILLARY_ACCESS_TOKEN=TOKEN)
    args = ["--data", str(ws.data_dir), "--models", str(ws.models_dir), "fetch", "--cells", CELL,
            "--api-url", srv.url, "--backoff", "0.01", "--retries", "3", "--timeout", "1"]
    p1 = subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True, timeout=60)
    tokfile = tmp_path / "token.txt"
    tokfile.write_text("MLY|4242|another-wrong-secret\n")
    env.pop("MAPILLARY_ACCESS_TOKEN")
    p2 = subprocess.run([sys.executable, "-c", CLI, *args, "--token-file", str(tokfile)], env=env,
                        capture_output=True, text=True, timeout=60)
    assert p1.returncode == 1, p1.stderr   # one cell in error (the thumbnail that always fails)
    assert "ended in error" in p1.stderr and len(rows(ws)) >= 1
    assert p2.returncode == 2 and "rejected the access token" in p2.stderr
    for secret in (TOKEN, "another-wrong-secret", "s3cr3t"):
        for text in (p1.stdout, p1.stderr, p2.stdout, p2.stderr):
            assert secret not in text
        for path in ws.data_dir.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


# ------------------------------------------------------------------ rate limit, concurrency


def test_rate_limiter_spacing():
    lim = M.RateLimiter(1200)  # 20 per second
    t = []
    for _ in range(11):
        lim.acquire()
        t.append(time.monotonic())
    # slot k is k intervals after the first (a wake-up may come late, never early)
    assert all(t[k] - t[0] >= k * 0.05 - 0.002 for k in range(11))
    lim.pause(0.2)
    t0 = time.monotonic()
    lim.acquire()
    assert time.monotonic() - t0 >= 0.19


def test_fetch_never_exceeds_the_rate_limit(ws, srv):
    cells = [CELL, CELL2]
    srv.seed_cells([box(c) for c in cells], per_cell=1)
    F.fetch(ws, cells, opts(srv, per_cell=100, rate_limit=1200, concurrency=4), TOKEN)  # 16 searches
    t = np.array([h.t for h in srv.hits_of("images")])
    assert len(t) == 16
    # 1200/min allows 10 in any half second; 50 ms of the window are left for the jitter
    # between the client's slot and the request reaching the server on a loaded machine
    # (the exact spacing of the slots themselves is test_rate_limiter_spacing's)
    window = 0.5 - 0.05
    assert max(int(np.sum((t >= a) & (t < a + window))) for a in t) <= 10


@pytest.mark.slow
@pytest.mark.parametrize("cells", [[CELL], [CELL, CELL2]])
def test_concurrency_overlaps_requests(ws, cells):
    # many cells run side by side; a single cell searches sub-boxes ahead of the filtering
    with MapillaryServer(token=TOKEN, latency=0.1) as srv:
        srv.seed_cells([box(c) for c in cells], per_cell=1)
        t0 = time.monotonic()
        F.fetch(ws, cells, opts(srv, per_cell=100, concurrency=4), TOKEN)
        elapsed = time.monotonic() - t0
    n = 8 * len(cells)
    assert len(srv.hits_of("images")) == n and len(rows(ws)) == len(cells)
    assert elapsed < (n + len(cells)) * 0.1 * 0.6  # one request at a time: 0.1 s each


# ------------------------------------------------------------------ resume, stop, crash


def test_stop_event_then_resume_continues_partial_cells(ws, srv):
    srv.seed_cells([box(CELL)], per_cell=1)
    stop = threading.Event()

    def progress(p):
        if p.api_requests >= 3:
            stop.set()

    with MapillaryServer(token=TOKEN, latency=0.05) as slow:
        slow.images = srv.images
        r1 = F.fetch(ws, [CELL], opts(slow, per_cell=100, concurrency=1), TOKEN, progress=progress,
                     stop_event=stop, progress_every_s=0.01)
        first = len(slow.hits_of("images"))
    assert r1.stopped and r1.partial == 1
    assert log(ws)[CELL]["status"] == "partial"
    with ws.manifest() as m:
        searched = m.conn.execute("SELECT COUNT(*) FROM fetch_progress WHERE cell = ?", (CELL,)).fetchone()[0]
    assert 1 <= searched < 8
    r2 = F.fetch(ws, [CELL], opts(srv, per_cell=100), TOKEN)
    assert len(srv.hits_of("images")) == 8 - searched    # no searched sub-box is asked again
    assert log(ws)[CELL]["status"] == "done" and r2.done == 1
    assert first >= searched
    assert len(rows(ws)) == 1
    # a finished cell is skipped by the next run: no request at all
    r3 = F.fetch(ws, [CELL], opts(srv, per_cell=100), TOKEN)
    assert r3.skipped == 1 and len(srv.hits_of("images")) == 8 - searched


def test_resume_counts_images_already_kept(ws, srv):
    srv.seed_cells([box(CELL)], per_cell=8, spacing_m=400)
    srv.inject("500", times=-1)
    F.fetch(ws, [CELL], opts(srv, retries=0), TOKEN)
    assert log(ws)[CELL]["status"] == "error"
    srv.clear_faults()
    F.fetch(ws, [CELL], opts(srv, per_cell=3), TOKEN)
    F.fetch(ws, [CELL2, CELL], opts(srv, per_cell=3), TOKEN)
    assert len(rows(ws)) == 3   # done after the first rerun; not topped up again


CLI = "import sys, pipeline.cli as c; c.COMMAND_MODULES = ('pipeline.fetch',); sys.exit(c.main(sys.argv[1:]))"


@pytest.mark.slow
def test_kill_9_leaves_no_partial_file_and_no_row_without_file(ws):
    cells = [CELL, CELL2, "0/1/2/3/0/1/2/3/0/3", "0/1/2/3/0/1/2/3/1/0"]
    with MapillaryServer(token=TOKEN, latency=0.05) as srv:
        srv.seed_cells([box(c) for c in cells], per_cell=6, spacing_m=400)
        env = dict(os.environ, MAPILLARY_ACCESS_TOKEN=TOKEN)
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI, "--data", str(ws.data_dir), "fetch", "--cells", ",".join(cells),
             "--api-url", srv.url, "--concurrency", "4", "--per-cell", "100"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            n = 0
            while time.monotonic() < deadline and proc.poll() is None:
                if ws.manifest_path.exists():
                    try:
                        con = sqlite3.connect(f"file:{ws.manifest_path}?mode=ro", uri=True, timeout=1)
                        n = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
                        con.close()
                    except sqlite3.Error:
                        n = 0
                if n >= 4:
                    break
                time.sleep(0.01)
            assert proc.poll() is None, "the fetch finished before it could be killed"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL

        def check() -> int:
            df = rows(ws)
            for r in df.itertuples():
                p = ws.data_dir / r.path
                assert p.is_file(), f"row {r.id} without its file"
                assert hashlib.sha256(p.read_bytes()).hexdigest() == r.sha256
            for p in ws.images_dir.rglob("*"):
                if p.is_file() and not p.name.endswith(".tmp"):
                    # every complete-looking file is whole: named by the hash of its bytes
                    assert hashlib.sha256(p.read_bytes()).hexdigest() == p.stem, p
            return len(df)

        assert 4 <= check() < 24
        # a temp file an interrupted write could leave; the next start removes it
        stale = ws.images_dir / "ab" / ".abcdef.jpg.x1y2.tmp"
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_bytes(b"\xff\xd8partial")
        report = F.fetch(ws, cells, opts(srv, per_cell=100, concurrency=4, tmp_grace_s=0), TOKEN)
        assert check() == 24 and report.done == 4
        assert not list(ws.images_dir.rglob("*.tmp"))


def test_clean_stale_temps_spares_fresh_ones(ws):
    d = ws.images_dir / "00"
    d.mkdir(parents=True)
    old, fresh, keep = d / ".a.jpg.1.tmp", d / ".b.jpg.2.tmp", d / "c.jpg"
    for p in (old, fresh, keep):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert F.clean_stale_temps(ws, 60) == 1
    assert not old.exists() and fresh.exists() and keep.exists()


# ------------------------------------------------------------------ cells, shards, plan, CLI


def test_select_cells_forms(tmp_path, monkeypatch):
    assert F.select_cells("013,0/2/1", level=8) == ["0/1/3", "0/2/1"]
    f = tmp_path / "cells.txt"
    f.write_text("# my cells\n0/1\n\n3/3  # coast\n0/1\n")
    assert F.select_cells(str(f)) == ["0/1", "3/3"]
    assert F.select_cells("all", level=2) == grid.keys_to_ids(grid.all_cells(2), 2)
    f.write_text("0/1\n0/9\n")
    with pytest.raises(InputError, match=r"cells.txt:2.*0/9"):
        F.select_cells(str(f))
    with pytest.raises(InputError, match="'nowhere'"):
        F.select_cells("nowhere")
    # land: geohier.geography is imported only when asked
    fake = types.ModuleType("geohier.geography")
    fake.land_keys = lambda level, cache_dir=None: np.array([1, 3], dtype=np.int64)
    monkeypatch.setitem(sys.modules, "geohier.geography", fake)
    import geohier

    monkeypatch.setattr(geohier, "geography", fake, raising=False)
    assert F.select_cells("land", level=1) == ["1", "3"]


def test_shards_split_without_overlap():
    cells = grid.keys_to_ids(grid.all_cells(3), 3)
    parts = [F.select_cells("all", level=3, shard=f"{i}/3") for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(cells)
    assert all(not set(a) & set(b) for a in parts for b in parts if a is not b)
    assert abs(len(parts[0]) - len(parts[2])) <= 1
    assert F.select_cells("all", level=3, shard="1/3") == parts[1]  # deterministic
    for bad in ("3/3", "1-3", "a/b", "0/0", "-1/2"):
        with pytest.raises(InputError, match="shard"):
            F.parse_shard(bad)


def test_dry_run_prints_the_plan_and_makes_no_request(ws, srv, monkeypatch, capsys):
    monkeypatch.delenv("MAPILLARY_ACCESS_TOKEN", raising=False)   # no token needed
    code = _main(["fetch", "--cells", f"{CELL},0/1/2/3/0/1/2/3", "--api-url", srv.url, "--dry-run",
                  "--per-cell", "20"], monkeypatch)
    out = capsys.readouterr().out
    assert code == 0 and srv.hits == []
    assert "2 cells; 2 to fetch" in out
    assert "level 8: 15 x 8 = 120 sub-boxes per cell" in out and "level 10: 4 x 2 = 8" in out
    assert "at most 128 API requests and 40 thumbnail downloads" in out


def test_plan_subtracts_finished_work(ws, srv):
    srv.seed_cells([box(CELL)], per_cell=1)
    F.fetch(ws, [CELL], opts(srv, per_cell=100), TOKEN)
    p = F.plan(ws, [CELL, CELL2], opts(srv))
    assert p.todo == [CELL2] and p.finished == {"done": 1} and p.api_requests_max == 8


def test_cli_fetch_with_progress(ws, srv, monkeypatch, capsys):
    srv.seed_cells([box(CELL)], per_cell=3, spacing_m=400)
    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", TOKEN)
    code = _main(["fetch", "--cells", CELL, "--api-url", srv.url, "--per-cell", "3", "--rate-limit", "0"],
                 monkeypatch)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "3 images kept" in cap.out and "fetch" in cap.err and "kept=3" in cap.err
    assert len(rows(ws)) == 3


def test_cli_rejects_bad_values(ws, monkeypatch, capsys):
    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", TOKEN)
    assert _main(["fetch", "--cells", CELL, "--shard", "2/2"], monkeypatch) == 2
    assert "--shard" in capsys.readouterr().err
    assert _main(["fetch", "--cells", CELL, "--per-cell", "0"], monkeypatch) == 2
    assert "--per-cell must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _main(["fetch", "--thumb", "512"], monkeypatch)
    with pytest.raises(CellIdError):
        F.fetch(ws, ["0/7"], F.FetchOptions(), TOKEN)


# ------------------------------------------------------------------ bounds (issue 16): time, size, hosts


@pytest.mark.slow
def test_a_dripping_api_answer_is_cut_at_the_deadline(ws, srv):
    srv.seed_cells([box(SMALL)], per_cell=2)
    srv.inject("drip", times=-1, sleep=0.2)  # ~110 bytes: 20 s if the client read it all
    report = F.fetch(ws, [SMALL], opts(srv, timeout_s=1, retries=0), TOKEN)
    st = log(ws)[SMALL]
    assert report.error == 1 and st["status"] == "error"
    assert "timed out after 1 s (gave up after 1 attempts)" in st["error"]
    assert srv.arrived["images"] == 1 and not srv.hits_of("images")  # cut before the answer ended


@pytest.mark.slow
def test_a_dripping_thumbnail_body_is_cut_at_the_deadline(ws, srv):
    srv.seed_cells([box(SMALL)], per_cell=2)
    srv.inject("drip-body", times=-1, target="thumb", sleep=0.2)  # headers at once, then 0.2 s a byte
    report = F.fetch(ws, [SMALL], opts(srv, timeout_s=1, retries=0), TOKEN)
    st = log(ws)[SMALL]
    assert report.error == 1 and "timed out after 1 s" in st["error"] and len(rows(ws)) == 0


@pytest.mark.slow
def test_cli_drip_ends_with_one_error_line(ws, srv, monkeypatch, capsys):
    srv.seed_cells([box(SMALL)], per_cell=2)
    srv.inject("drip", times=-1, sleep=0.2)
    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", TOKEN)
    code = _main(["fetch", "--cells", SMALL, "--api-url", srv.url, "--timeout", "1", "--retries", "0"],
                 monkeypatch)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower() and "errors=" not in line]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: 1 cell(s) ended in error (") and "timed out after 1 s" in errors[0]


def test_stop_cuts_a_blocked_read(ws, srv):
    srv.seed_cells([box(SMALL)], per_cell=2)
    srv.inject("drip-body", times=-1, target="thumb", sleep=1.0)
    stop = threading.Event()
    done: list = []
    t = threading.Thread(target=lambda: done.append(
        F.fetch(ws, [SMALL], opts(srv, timeout_s=600, retries=0), TOKEN, stop_event=stop)))
    t.start()
    _wait_until(lambda: srv.arrived.get("thumb", 0) >= 1)
    stop.set()
    t.join(30)    # a bound for the test: without the cut, the read lasts ~1,300 s
    assert not t.is_alive() and done[0].stopped and done[0].partial == 1
    assert log(ws).get(SMALL, {"status": "partial"})["status"] == "partial" and len(rows(ws)) == 0


def test_the_pages_stop_ends_a_fetch_task_in_a_blocked_read(ws, srv, monkeypatch):
    from pipeline import tasks

    monkeypatch.delenv("MAPILLARY_ACCESS_TOKEN", raising=False)
    srv.seed_cells([box(SMALL)], per_cell=2)
    srv.inject("drip-body", times=-1, sleep=1.0)   # the search answer, at a byte a second
    runner = tasks.TaskRunner()
    task = tasks.start_fetch(runner, ws, SMALL, 12, 10, srv.url, token=TOKEN)
    _wait_until(lambda: srv.arrived.get("images", 0) >= 1)
    assert task.running
    task.cancel()
    assert task.join(30), "the task still runs"    # FetchOptions' timeout is 30 s: cut well before
    assert task.state == tasks.STOPPED, task.error
    assert "0 images kept" in task.result and "1 unfinished" in task.result


def _wait_until(cond, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not met"
        time.sleep(0.02)


CLI_SIGINT = ("import signal, sys, pipeline.cli as c; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "c.COMMAND_MODULES = ('pipeline.fetch',); sys.exit(c.main(sys.argv[1:]))")


@pytest.mark.slow
def test_ctrl_c_ends_a_cli_fetch_keeping_finished_cells(ws, srv):
    first, second = F.sort_cells([SMALL, "0/1/2/3/0/1/2/3/0/1/2/2"])
    keep = srv.seed_cells([box(first)], per_cell=2, prefix="a")
    drip = srv.seed_cells([box(second)], per_cell=2, prefix="b")
    srv.inject("drip-body", times=-1, target="thumb", sleep=1.0, ids=[i.id for i in drip])
    env = dict(os.environ, MAPILLARY_ACCESS_TOKEN=TOKEN)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI_SIGINT, "--data", str(ws.data_dir), "--models", str(ws.models_dir), "fetch",
         "--cells", f"{first},{second}", "--api-url", srv.url, "--concurrency", "1", "--timeout", "600"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until(lambda: srv.arrived.get("thumb", 0) > len(keep) or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)    # the dripping thumbnail alone would take ~1,300 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    st = log(ws)
    assert st[first]["status"] == "done" and st[first]["kept"] == 2 and len(rows(ws)) == 2
    assert st.get(second, {"status": "partial"})["status"] == "partial"
    assert TOKEN not in out + err


@pytest.mark.parametrize("declare", [True, False])
def test_a_huge_api_answer_is_refused_not_read_whole(ws, srv, declare):
    srv.seed_cells([box(SMALL)], per_cell=2)
    srv.inject("huge", times=-1, size=6 << 20, declare=declare)
    report = F.fetch(ws, [SMALL], opts(srv, max_json_mb=1, retries=3, timeout_s=10), TOKEN)
    st = log(ws)[SMALL]
    assert st["status"] == "error" and "over the 1 MB cap" in st["error"]
    assert report.retries == 0 and srv.arrived["images"] == 1   # not retried


def test_a_huge_thumbnail_is_skipped_and_counted(ws, srv):
    srv.seed_cells([box(SMALL)], per_cell=3, spacing_m=300)
    first = next(iter(srv.images))
    srv.inject("huge", times=-1, target="thumb", size=3 << 20, ids=[first])
    report = F.fetch(ws, [SMALL], opts(srv, max_thumb_mb=1, timeout_s=10), TOKEN)
    assert report.filtered == {"thumbnail over the size cap": 1}
    assert len(rows(ws)) == 2 and first not in set(rows(ws)["source_id"])
    assert log(ws)[SMALL]["status"] == "done"


FOREIGN = ["http://10.255.255.1/t.jpg", "https://evil.example/t.jpg", "https://scontent.xx.fbcdn.net.evil.com/t.jpg",
           "http://scontent.xx.fbcdn.net/t.jpg", "https://scontent.xx.fbcdn.net:8443/t.jpg",
           "https://u:p@scontent.xx.fbcdn.net/t.jpg", "file:///etc/passwd", "http://localhost/t.jpg"]


def test_thumbnails_on_foreign_hosts_are_skipped_and_counted(ws, srv):
    with MapillaryServer(token=TOKEN) as other:       # another loopback port: foreign too
        urls = FOREIGN + [f"{other.url}/thumb/x.jpg"]
        lat, lon = center(SMALL)
        for k, url in enumerate(urls):
            srv.add_image(f"f{k}", *offset_m(lat, lon, north_m=150 * k - 600), thumb_url=url)
        srv.add_image("mine", *offset_m(lat, lon, east_m=900))
        report = F.fetch(ws, [SMALL], opts(srv), TOKEN)
        assert other.arrived == {}
    assert report.filtered == {"thumbnail on a foreign host": len(urls)}
    assert report.thumb_requests == 1 and list(rows(ws)["source_id"]) == ["mine"]
    assert srv.arrived == {"images": 1, "thumb": 1}


def test_thumb_hosts_rule():
    ok = ["https://scontent-cph2-1.xx.fbcdn.net/m1/v/t6/An-Z8?stp=s1024x768&ccb=10-5",
          "https://scontent.fopo5-1.fna.fbcdn.net/m1/v/t6/An9s.jpg", "https://SCONTENT.XX.FBCDN.NET./x"]
    for url in ok:
        assert M.thumb_host_ok(url, M.DEFAULT_API), url
    for url in FOREIGN + ["http://127.0.0.1:8080/t.jpg", "https://graph.mapillary.com.evil.com/x"]:
        assert not M.thumb_host_ok(url, M.DEFAULT_API), url
    # loopback only when the API URL is loopback, and then only its own host and port
    assert M.thumb_host_ok("http://127.0.0.1:8080/thumb/1.jpg", "http://127.0.0.1:8080")
    assert not M.thumb_host_ok("http://127.0.0.1:8081/thumb/1.jpg", "http://127.0.0.1:8080")
    assert not M.thumb_host_ok("http://localhost:8080/thumb/1.jpg", "https://mirror.example")
    assert M.is_loopback("http://127.0.0.1:8080") and M.is_loopback("http://[::1]:80")
    assert not M.is_loopback(M.DEFAULT_API)


def test_redirects_are_not_followed(ws, srv):
    import http.server

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", f"{srv.url}/images?bbox=0,0,0.01,0.01")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        F.fetch(ws, [SMALL], opts(srv, api_url=url), TOKEN)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert "HTTP 302" in log(ws)[SMALL]["error"] and srv.arrived == {}   # the token went nowhere else


# ------------------------------------------------------------------ where the token goes (issue 16)

ENV_TOKEN = "MLY|999|server-own-SECRET-token"


def test_page_token_rule(monkeypatch):
    env = {"MAPILLARY_ACCESS_TOKEN": ENV_TOKEN}
    assert M.page_token("", M.DEFAULT_API, env) == ENV_TOKEN
    assert M.page_token("", "https://graph.mapillary.com/", env) == ENV_TOKEN
    assert M.page_token(" MLY|1|typed ", "http://127.0.0.1:9", env) == "MLY|1|typed"
    for url in ("http://graph.mapillary.com", "https://graph.mapillary.com:8443", "https://evil.example",
                "https://graph.mapillary.com@evil.example", "https://graph.mapillary.com.evil.example",
                "https://user:pw@graph.mapillary.com", "http://127.0.0.1:9", "not a url"):
        with pytest.raises(M.TokenError) as exc:
            M.page_token("", url, env)
        assert ENV_TOKEN not in str(exc.value) and "graph.mapillary.com" in str(exc.value)
    with pytest.raises(M.TokenError, match="type one"):
        M.page_token("", M.DEFAULT_API, {})


def test_the_servers_token_never_goes_to_a_custom_url_from_the_page(ws, srv, monkeypatch):
    from geohier.errors import GeohierError
    from pipeline import tasks

    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", ENV_TOKEN)
    srv.seed_cells([box(SMALL)], per_cell=2)
    runner = tasks.TaskRunner()
    with pytest.raises(GeohierError) as exc:
        tasks.start_fetch(runner, ws, SMALL, 12, 10, srv.url, token="")
    assert "only sent to https://graph.mapillary.com" in str(exc.value) and ENV_TOKEN not in str(exc.value)
    assert runner.get(tasks.task_key(ws, "fetch")) is None and srv.arrived == {} and srv.auth_seen == []
    # a token typed on the page goes to the custom URL; the server's never does
    task = tasks.start_fetch(runner, ws, SMALL, 12, 10, srv.url, token="MLY|5|typed-on-page")
    assert task.join(60) and task.state == tasks.FAILED and "rejected the access token" in task.error
    assert srv.auth_seen == ["OAuth MLY|5|typed-on-page"]
    srv.token = "MLY|5|typed-on-page"
    task = tasks.start_fetch(runner, ws, SMALL, 12, 10, srv.url, token="MLY|5|typed-on-page")
    assert task.join(60) and task.state == tasks.DONE and "2 images kept" in task.result
    assert all(ENV_TOKEN.split("|")[2] not in a for a in srv.auth_seen)
    for t in (task.label(), task.result, task.error, task.detail, repr(task)):
        assert "typed-on-page" not in t and ENV_TOKEN not in t


def test_cli_says_which_token_goes_to_which_host(ws, srv, monkeypatch, capsys, tmp_path):
    srv.seed_cells([box(SMALL)], per_cell=1)
    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", TOKEN)
    assert _main(["fetch", "--cells", SMALL, "--api-url", srv.url + "/"], monkeypatch) == 0
    cap = capsys.readouterr()
    assert (f"fetch: sending the access token from $MAPILLARY_ACCESS_TOKEN to {srv.url} "
            "(not the official Mapillary API)") in cap.err
    tok = tmp_path / "tok.txt"
    tok.write_text(TOKEN + "\n")
    monkeypatch.delenv("MAPILLARY_ACCESS_TOKEN")
    assert _main(["fetch", "--cells", SMALL, "--api-url", srv.url, "--token-file", str(tok)], monkeypatch) == 0
    cap2 = capsys.readouterr()
    assert f"sending the access token from --token-file {tok} to {srv.url}" in cap2.err
    assert TOKEN not in cap.out + cap.err + cap2.out + cap2.err and set(srv.auth_seen) == {f"OAuth {TOKEN}"}


@pytest.mark.slow
def test_the_token_is_in_no_output_file_row_or_message(ws, srv, capsys, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    srv.seed_cells([box(CELL)], per_cell=3, spacing_m=400)
    ids = list(srv.images)
    srv.inject("drip", times=1, sleep=0.3)     # cut at the deadline, then retried
    srv.inject("huge", times=-1, target="thumb", size=2 << 20, ids=ids[:1])
    srv.inject("500", times=-1, target="thumb", ids=ids[1:2])
    srv.add_image("far", *center(CELL), thumb_url="https://evil.example/x.jpg")
    messages = []
    o = opts(srv, timeout_s=1, max_json_mb=1, max_thumb_mb=1, retries=1)
    report = F.fetch(ws, [CELL], o, TOKEN)
    assert report.retries >= 2 and report.filtered["thumbnail over the size cap"] == 1
    assert report.filtered["thumbnail on a foreign host"] == 1 and log(ws)[CELL]["status"] == "error"
    srv.inject("huge", times=1, size=2 << 20)
    report2 = F.fetch(ws, [SMALL], o, TOKEN)
    messages += [report.summary(), repr(report.to_dict()), report2.summary(), repr(report2.to_dict())]
    srv.inject("expired", times=-1)
    with pytest.raises(M.TokenError) as exc:
        F.fetch(ws, [SMALL], opts(srv), TOKEN)
    messages += [str(exc.value), repr(exc.value)]
    client = F.FetchOptions(api_url=srv.url).client(TOKEN)
    messages += [repr(client), repr(F.FetchOptions(api_url=srv.url))]
    client.close()
    cap = capsys.readouterr()
    text = "\n".join(messages) + cap.out + cap.err + caplog.text
    with ws.manifest() as m:
        for table in ("images", "fetch_log", "fetch_progress"):
            text += repr(m.conn.execute(f"SELECT * FROM {table}").fetchall())  # noqa: S608 (fixed names)
    assert TOKEN not in text and "s3cr3t" not in text
    for root in (ws.data_dir, ws.models_dir):
        for path in Path(root).rglob("*"):
            if path.is_file():
                assert b"s3cr3t" not in path.read_bytes(), path
