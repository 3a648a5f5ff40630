"""pipeline.mapillary: the Graph API's error bodies, as the real service sends them, and what
a fetch does about each class (issue 11), against the fake API (tests/mapillary_server.py).

Each class has a test: a rejected token (also as HTTP 500) and a refused field stop the
whole fetch at once; rate limits pause every worker as long as told; transient faults are
retried, then the cell is marked error; the density answer splits the box
(test_fetch.test_reduce_data_500_splits_the_subbox).
"""

from __future__ import annotations

import pytest

from geohier import grid
from pipeline import cli
from pipeline import fetch as F
from pipeline import mapillary as M
from tests.mapillary_server import (
    EXPIRED_TOKEN_BODY,
    REDUCE_DATA_BODY,
    MapillaryServer,
    field_body,
    rate_body,
)

TOKEN = "MLY|4242|s3cr3t-T0KEN-value"
SMALL = "0/1/2/3/0/1/2/3/0/1/2/3"        # level 12: one sub-box
SMALL2 = "0/1/2/3/0/1/2/3/0/1/2/2"
SMALL3 = "0/1/2/3/0/1/2/3/0/1/2/1"


def box(cell_id):
    return grid.bounds(grid.from_id(cell_id))


def opts(srv, **kw) -> F.FetchOptions:
    base = dict(api_url=srv.url, per_cell=50, timeout_s=0.5, backoff_s=0.01, backoff_max_s=0.05,
                retries=3, concurrency=2, rate_limit=0)
    base.update(kw)
    return F.FetchOptions(**base)


@pytest.fixture
def srv():
    with MapillaryServer(token=TOKEN) as s:
        for c in (SMALL, SMALL2, SMALL3):
            s.seed_cells([box(c)], per_cell=2, prefix=c[-1])
        yield s


def log(ws):
    with ws.manifest() as m:
        return m.fetch_status()


def count(ws):
    with ws.manifest() as m:
        return m.count()


def _main(argv, monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("pipeline.fetch",))
    return cli.main(argv)


# ------------------------------------------------------------------ the classes of the bodies


@pytest.mark.parametrize(("status", "body", "kind"), [
    (500, EXPIRED_TOKEN_BODY, "token"),
    (400, {"error": {"message": "Invalid OAuth access token - Cannot parse access token",
                     "type": "OAuthException", "code": 190, "fbtrace_id": "x"}}, "token"),
    (400, {"error": {"message": "Error validating access token: Session has expired", "type": "OAuthException",
                     "code": 102}}, "token"),
    (403, {"error": {"message": "Access token is not valid for this app", "type": "MLYApiException"}}, "token"),
    (401, None, "token"),
    (400, field_body("thumb_512_url"), "parameter"),
    (400, {"error": {"message": "Unsupported get request. Object with ID '1573320226205115' does not exist",
                     "type": "MLYApiException", "code": 100, "error_subcode": 33}}, "parameter"),
    (400, rate_body(4), "rate"),
    (400, rate_body(17), "rate"),
    (400, rate_body(32), "rate"),
    (400, rate_body(613), "rate"),
    (429, None, "rate"),
    (500, {"error": {"message": "slow down", "code": 9999, "backoff": 1500}}, "rate"),
    (500, {"error": {"message": "An unknown error occurred", "type": "OAuthException", "code": 1}}, "transient"),
    (503, {"error": {"message": "Service temporarily unavailable", "type": "OAuthException", "code": 2}},
     "transient"),
    (400, {"error": {"message": "Service temporarily unavailable", "code": 2}}, "transient"),
    (502, None, "transient"),
    (504, "<html>504 Gateway Time-out</html>", "transient"),
    (500, REDUCE_DATA_BODY, "reduce"),
    (404, {"error": {"message": "Unknown path", "type": "GraphMethodException", "code": 803}}, "refused"),
])
def test_error_bodies_sort_into_their_class(status, body, kind):
    assert M.GraphError.from_body(status, body).kind == kind


def test_error_body_fields_read():
    e = M.GraphError.from_body(400, {"error": {**rate_body(613, backoff_ms=2500)["error"], "fbtrace_id": "AbC"}})
    assert (e.code, e.subcode, e.fbtrace_id, e.backoff_s) == (613, 2446079, "AbC", 2.5)
    assert e.describe() == "HTTP 400, code 613: (#613) Calls to this api have exceeded the rate limit."
    assert M.GraphError.from_body(400, field_body("thumb_512_url")).field() == "thumb_512_url"
    assert M.GraphError.from_body(400, {"error": {"message": "Invalid parameter", "code": 100}}).field() is None
    assert M.GraphError.from_body(502, "<html>").describe() == "HTTP 502"


# ------------------------------------------------------------------ token: stop at once


def test_expired_token_as_http_500_stops_the_fetch_at_once(ws, srv):
    srv.inject("expired", times=-1)
    with pytest.raises(M.TokenError) as exc:
        F.fetch(ws, [SMALL, SMALL2, SMALL3], opts(srv, concurrency=2, retries=5), TOKEN)
    msg = str(exc.value)
    assert "Mapillary rejected the access token (HTTP 500, code 190: Invalid OAuth 2.0 Access Token)" in msg
    assert "MAPILLARY_ACCESS_TOKEN" in msg and "--token-file" in msg and "\n" not in msg
    assert TOKEN not in msg and "s3cr3t" not in repr(exc.value)
    # no retry, no next cell: at most one request per worker that was already searching
    assert 1 <= len(srv.hits_of("images")) <= 2
    assert all(s["status"] not in ("done", "empty", "error") for s in log(ws).values())


def test_expired_token_from_the_cli_is_one_line(ws, srv, monkeypatch, capsys):
    srv.inject("expired", times=-1)
    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", TOKEN)
    code = _main(["fetch", "--cells", f"{SMALL},{SMALL2}", "--api-url", srv.url, "--concurrency", "1"],
                 monkeypatch)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "access token" in lines[0] and "MAPILLARY_ACCESS_TOKEN" in lines[0] and TOKEN not in err
    assert len(srv.hits_of("images")) == 1


def test_a_fetch_stopped_by_the_token_keeps_finished_cells_and_resumes(ws, srv):
    first, second, third = F.sort_cells([SMALL, SMALL2, SMALL3])   # the order cells are fetched in
    srv.inject("expired", times=-1, after=1)   # the first cell's search passes, then the token "expires"
    with pytest.raises(M.TokenError):
        F.fetch(ws, [SMALL, SMALL2, SMALL3], opts(srv, concurrency=1), TOKEN)
    st = log(ws)
    assert st[first]["status"] == "done" and st[first]["kept"] == 2 and count(ws) == 2
    assert third not in st and st.get(second, {"status": "partial"})["status"] == "partial"
    srv.clear_faults()
    before = len(srv.hits_of("images"))
    report = F.fetch(ws, [SMALL, SMALL2, SMALL3], opts(srv, concurrency=1), TOKEN)
    assert report.skipped == 1 and report.done == 2 and count(ws) == 6
    searched = [h.query["bbox"] for h in srv.hits_of("images")[before:]]
    assert len(searched) == 2                          # the finished cell is not asked again
    assert all(s["status"] == "done" for s in log(ws).values())


# ------------------------------------------------------------------ code 100: stop, naming the field


def test_refused_field_stops_at_once_naming_it(ws, srv):
    srv.inject("field", times=-1, field="thumb_1024_url")
    with pytest.raises(M.ParameterError) as exc:
        F.fetch(ws, [SMALL, SMALL2], opts(srv, concurrency=1, retries=5), TOKEN)
    msg = str(exc.value)
    assert "field 'thumb_1024_url'" in msg and "code 100" in msg and "nonexisting field" in msg
    assert len(srv.hits_of("images")) == 1


def test_refused_field_from_the_cli(ws, srv, monkeypatch, capsys):
    srv.inject("field", times=-1, field="thumb_2048_url")
    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", TOKEN)
    code = _main(["fetch", "--cells", SMALL, "--api-url", srv.url, "--thumb", "2048"], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "error: Mapillary refused the request's field 'thumb_2048_url'" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------ rate limits: every worker backs off


@pytest.mark.parametrize(("status", "code"), [(400, 4), (400, 17), (400, 32), (400, 613), (429, 4)])
def test_rate_limit_codes_back_off_and_retry(ws, srv, status, code):
    srv.inject("rate", times=1, status=status, code=code)
    report = F.fetch(ws, [SMALL], opts(srv), TOKEN)
    assert [h.status for h in srv.hits_of("images")] == [status, 200]
    assert report.rate_limited == 1 and report.retries == 1 and log(ws)[SMALL]["status"] == "done"
    assert "1 rate limited" in report.summary()


@pytest.mark.slow
def test_backoff_field_in_ms_pauses_every_worker(ws, srv):
    srv.inject("rate", times=1, code=613, backoff_ms=600)
    seen: list[float] = []
    F.fetch(ws, [SMALL, SMALL2, SMALL3], opts(srv, concurrency=3), TOKEN,
            progress=lambda p: seen.append(p.backoff_s), progress_every_s=0.01)
    hits = srv.hits_of("images")
    limited = next(h for h in hits if h.status == 400)
    later = [h.t - limited.t for h in hits if h.t > limited.t]
    # requests sent before the answer arrived may still land just after it; none in the pause
    assert later and not any(0.15 < dt < 0.55 for dt in later)
    assert max(later) >= 0.55                        # the limited search was retried after the pause
    assert max(seen) > 0.1                           # the progress display saw the pause
    assert all(s["status"] == "done" for s in log(ws).values())


@pytest.mark.slow
def test_rate_limit_shown_in_the_progress_bar(ws, srv, monkeypatch, capsys):
    srv.inject("rate", times=1, code=4, backoff_ms=1200)
    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", TOKEN)
    monkeypatch.setenv("GEOHIER_PROGRESS_EVERY_S", "0")   # a log line per update
    code = _main(["fetch", "--cells", SMALL, "--api-url", srv.url, "--backoff", "0.01"], monkeypatch)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "rate_limited=waiting" in cap.err and "\r" not in cap.err   # whole lines, off a terminal
    assert "1 rate limited" in cap.out


# ------------------------------------------------------------------ transient: retry, then error


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["500", "503", "502", "504", "timeout", "drop", "malformed"])
def test_transient_faults_are_retried(ws, srv, kind):
    srv.inject(kind, times=2, sleep=0.8)
    report = F.fetch(ws, [SMALL], opts(srv, timeout_s=0.3), TOKEN)
    assert report.retries == 2 and report.rate_limited == 0
    assert log(ws)[SMALL]["status"] == "done" and count(ws) == 2


@pytest.mark.parametrize("kind", ["503", "502", "504"])
def test_persistent_transient_faults_mark_the_cell_error(ws, srv, kind):
    srv.inject(kind, times=-1)
    report = F.fetch(ws, [SMALL, SMALL2], opts(srv, retries=2), TOKEN)
    st = log(ws)
    assert report.error == 2 and all(s["status"] == "error" for s in st.values())
    assert f"HTTP {kind}" in st[SMALL]["error"] and "gave up after 3 attempts" in st[SMALL]["error"]
    assert len(srv.hits_of("images")) == 6               # 3 attempts per cell, the fetch went on
    srv.clear_faults()
    assert F.fetch(ws, [SMALL, SMALL2], opts(srv), TOKEN).done == 2   # a rerun retries error cells
