"""The Data page (AppTest) and the numbers behind its charts (geohier.charts)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from geohier.charts import (
    count_bins,
    fig_class_histogram,
    fig_kept_by_min,
    fig_lorenz,
    gini,
    imbalance_stats,
    lorenz,
)

# --------------------------------------------------------------------------- chart numbers


def test_gini_hand_computed():
    assert gini([1, 1, 1, 1]) == 0.0
    assert gini([0, 0, 0, 1]) == pytest.approx(0.75)  # (n - 1) / n
    # |1-2| + |1-3| + |2-3| = 4, twice over ordered pairs = 8; 8 / (2 * 9 * 2) = 2/9.
    assert gini([1, 2, 3]) == pytest.approx(2 / 9)
    assert gini([3, 1, 2]) == pytest.approx(2 / 9)  # order does not matter
    assert gini([5]) == 0.0
    assert gini([]) == 0.0 and gini([0, 0]) == 0.0
    with pytest.raises(ValueError):
        gini([1, -1])


def test_lorenz_hand_computed():
    x, y = lorenz([1, 3])
    assert x.tolist() == [0.0, 0.5, 1.0]
    assert y.tolist() == [0.0, 0.25, 1.0]
    x, y = lorenz([2, 2, 2, 2])
    assert np.allclose(x, y)


def test_imbalance_stats_hand_computed():
    s = imbalance_stats([1, 2, 3, 10], min_images=3)
    assert s["classes"] == 4 and s["images"] == 16
    assert s["min"] == 1 and s["max"] == 10 and s["median"] == 2.5 and s["mean"] == 4.0
    assert s["max_median_ratio"] == 4.0
    assert s["share_under_min"] == 0.5  # 1 and 2 are under 3
    assert s["images_under_min"] == 3 / 16
    assert s["top10_share"] == 10 / 16  # the largest 10% (at least one class)
    assert s["gini"] == pytest.approx(gini([1, 2, 3, 10]))
    empty = imbalance_stats([])
    assert empty["classes"] == 0 and math.isnan(empty["max_median_ratio"])


def test_count_bins_power_of_two():
    b = count_bins([1, 1, 2, 3, 4, 7, 8, 100], min_images=4)
    assert b["label"].tolist() == ["1", "2-3", "4-7", "8-15", "16-31", "32-63", "64-127"]
    assert b["classes"].tolist() == [2, 2, 2, 1, 0, 0, 1]
    assert b["under_min"].tolist() == [2, 2, 0, 0, 0, 0, 0]
    assert count_bins([])["classes"].tolist() == []


def test_figures_build():
    fig = fig_class_histogram([1, 2, 3, 50], level=5, min_images=3)
    assert len(fig.data) == 2 and "level 5" in fig.layout.title.text
    assert list(fig.data[0].y) == [0, 1, 0, 0, 0, 1] and list(fig.data[1].y) == [1, 1, 0, 0, 0, 0]
    assert "Gini 0.5" in fig_lorenz([0, 0, 1, 1]).layout.title.text
    assert len(fig_kept_by_min([1, 5, 50]).data) == 2


# --------------------------------------------------------------------------- the page

PAGE = Path(__file__).resolve().parents[1] / "views" / "data.py"
PLACES = [(48.85, 2.35)] * 6 + [(48.86, 2.36)] * 2 + [(51.5, -0.12)] * 3 + [(40.71, -74.0)] * 2 + [(-33.92, 18.42)]


def _page() -> AppTest:
    return AppTest.from_file(str(PAGE), default_timeout=120)


def _populate(ws, places=PLACES):
    from conftest import jpeg_bytes

    with ws.manifest() as m:
        for i, (lat, lon) in enumerate(places):
            m.store_image(jpeg_bytes(size=(32, 24), color=(i * 15 % 255, 90, 160)), "jpg", source="photos",
                          source_id=f"p{i}.jpg", lat=lat + i * 1e-4, lon=lon, sequence_id=None)


def _metric(at, label):
    return next(m.value for m in at.metric if m.label == label)


@pytest.mark.slow
def test_data_page_on_an_empty_workspace(ws):
    at = _page().run()
    assert not at.exception
    assert "no images" in at.info[0].value
    assert any(b.label == "Build the demo world" for b in at.button)
    assert not ws.hierarchy_path.exists()


@pytest.mark.slow
def test_data_page_with_images(ws):
    _populate(ws)
    at = _page().run()
    assert not at.exception, at.exception
    assert _metric(at, "Images") == "14"
    assert _metric(at, "Cells with images (L8)") == "4"  # Paris (both points), London, New York, Cape Town
    assert _metric(at, "Classes kept (L8)") == "1"  # only Paris has >= 5
    assert any("Images per cell at level 8" in s.value for s in at.subheader)
    assert not at.warning or all("map" not in w.value for w in at.warning)
    assert len(at.get("plotly_chart")) == 2
    assert len(at.get("iframe")) == 1  # the map
    largest = at.dataframe[1].value
    assert largest.iloc[0]["images"] == 8 and largest.iloc[0]["country"] == "France"
    kept = at.dataframe[3].value
    assert kept.set_index("level").loc[8, "classes"] == 1


@pytest.mark.slow
def test_min_images_control_changes_the_kept_count(ws):
    _populate(ws)
    at = _page().run()
    assert _metric(at, "Classes kept (L8)") == "1"
    at.sidebar.number_input(key="min_8").set_value(2).run()
    assert _metric(at, "Classes kept (L8)") == "1"  # London (3) and New York (2) lack a level-5 parent
    at.sidebar.number_input(key="min_5").set_value(1).run()
    at.sidebar.number_input(key="min_3").set_value(1).run()
    assert not at.exception
    assert _metric(at, "Classes kept (L8)") == "3"  # Paris 8, London 3, New York 2
    kept = at.dataframe[3].value.set_index("level")
    assert kept.loc[8, "classes"] == 3 and kept.loc[8, "images_kept"] == 13
    at.sidebar.number_input(key="min_1").set_value(20).run()
    assert _metric(at, "Classes kept (L8)") == "0"  # no parent class at level 1
    assert any("fewer than 2 classes" in w.value for w in at.warning)


@pytest.mark.slow
def test_write_button_builds_the_hierarchy(ws):
    _populate(ws)
    at = _page().run()
    at.sidebar.text_input[0].set_value("1,3").run()
    at.sidebar.number_input(key="min_3").set_value(1).run()
    next(b for b in at.button if b.label.startswith("Write hierarchy")).click().run()
    assert not at.exception
    assert "Wrote hierarchy.json" in at.success[0].value
    from geohier.hierarchy import Hierarchy

    h = Hierarchy.load(ws.hierarchy_path)
    assert h.levels == (1, 3) and h.min_images == {1: 5, 3: 1}
    with ws.manifest() as m:
        assert m.frame(["split"])["split"].notna().all()


def _wait_for_thread(name: str, timeout: float = 90.0) -> None:
    import threading
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        live = [t for t in threading.enumerate() if t.name == name]
        if not live:
            return
        live[0].join(0.2)
    raise AssertionError(f"{name} still running after {timeout} s")


@pytest.mark.slow
def test_demo_build_from_the_page(ws):
    at = _page().run()
    next(n for n in at.number_input if n.label == "Images").set_value(12)
    next(b for b in at.button if b.label == "Build the demo world").click().run()
    assert not at.exception
    _wait_for_thread("geohier-demo")
    at.run()
    assert not at.exception
    assert any("12 images added" in s.value for s in at.success)
    assert _metric(at, "Images") == "12"


@pytest.mark.slow
def test_fetch_from_the_page_never_keeps_the_token(ws):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from mapillary_server import MapillaryServer

    from geohier import grid

    token = "MLY|77|page-secret-token"
    cell = "0/1/2/3/0/1/2/3/0/1/2/3"  # level 12: one sub-box
    with MapillaryServer(token=token) as srv:
        srv.seed_cells([grid.bounds(grid.from_id(cell))], per_cell=3, spacing_m=200)
        at = _page().run()
        at.text_input(key="fetch_token").input(token)
        next(t for t in at.text_input if t.label == "Cells").set_value(cell)
        next(n for n in at.number_input if n.label == "Level of the cells").set_value(12)
        next(t for t in at.text_input if t.label == "API URL").set_value(srv.url)
        at.run()
        next(b for b in at.button if b.label == "Start the fetch").click().run()
        assert not at.exception
        assert at.text_input(key="fetch_token").value == ""  # cleared as the fetch started
        _wait_for_thread("geohier-fetch")
        at.run()
        assert not at.exception
        assert any("3 images kept" in s.value for s in at.success), ([s.value for s in at.success], [e.value for e in at.error])
        assert _metric(at, "Images") == "3"
        # A wrong token: the API's 401 is shown, the token is not.
        next(t for t in at.text_input if t.label == "Cells").set_value("0/1/2/3/0/1/2/3/0/1/2/2")
        at.text_input(key="fetch_token").input("wrong-token-xyz").run()
        next(b for b in at.button if b.label == "Start the fetch").click().run()
        _wait_for_thread("geohier-fetch")
        at.run()
    errors = [e.value for e in at.error]
    assert any("401" in e for e in errors), errors
    page_text = " ".join(str(getattr(el, "value", "")) for el in at.main) + repr(at.session_state)
    assert token not in page_text and "wrong-token-xyz" not in page_text


# --------------------------------------------------------------------------- the Cells field (issue 16)


def _cells_box(at):
    return next(t for t in at.text_input if t.label == "Cells")


def _page_text(at) -> str:
    return " ".join(str(getattr(el, "value", "")) for el in at.main)


@pytest.mark.slow
def test_cells_field_reads_no_server_file_and_never_raises(ws, tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", "MLY|1|server-token")  # so only the cells can fail
    secret = tmp_path / "secret.txt"
    secret.write_text("0/1\nroot:$6$very-secret-hash:19000:0:99999:7:::\n")
    hostile = [str(secret), "/etc/passwd", "/etc/shadow", "/proc/self/environ", "../../../etc/passwd",
               "\x00\x01\xfe\xff\x7f binary", "é漢字🙂 " * 50, "7" * 1_000_000, "0/1/4", "0" * 30]
    at = _page().run()
    for text in hostile:
        _cells_box(at).set_value(text).run()
        assert not at.exception, (text[:40], at.exception)
        errors = [e.value for e in at.error if e.value.startswith("Cells:")]
        assert len(errors) == 1 and "\n" not in errors[0] and len(errors[0]) < 400, (text[:40], errors)
        next(b for b in at.button if b.label == "Start the fetch").click().run()
        assert not at.exception
        page = _page_text(at)
        assert "very-secret-hash" not in page and "root:" not in page, text[:40]
        assert "Traceback" not in page
        assert not any(t.name == "geohier-fetch" for t in threading.enumerate())  # nothing started
    assert any("no file on the server is read" in e.value for e in at.error)


def test_cells_field_sizes_the_selection_and_refuses_all_at_level_12(ws, monkeypatch):
    import threading

    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", "MLY|1|server-token")
    at = _page().run()
    assert any("land at level 8: at most 65,536 cells" in c.value for c in at.caption)
    _cells_box(at).set_value("all").run()
    next(n for n in at.number_input if n.label == "Level of the cells").set_value(12).run()
    assert not at.exception
    (error,) = [e.value for e in at.error if e.value.startswith("Cells:")]
    assert "level 12" in error and "16,777,216 cells" in error and "at most 1,048,576" in error
    next(b for b in at.button if b.label == "Start the fetch").click().run()
    assert not at.exception
    assert not any(t.name == "geohier-fetch" for t in threading.enumerate())
    assert any("16,777,216" in e.value for e in at.error if not e.value.startswith("Cells:"))  # the start says so too
    next(n for n in at.number_input if n.label == "Level of the cells").set_value(9).run()
    assert any("all at level 9: 262,144 cells" in c.value for c in at.caption)
    assert not [e for e in at.error if e.value.startswith("Cells:")]


# --------------------------------------------------------------------------- the server's token (issue 16)


def test_a_custom_api_url_from_the_page_never_gets_the_servers_token(ws, monkeypatch):
    import sys
    import threading

    sys.path.insert(0, str(Path(__file__).parent))
    from mapillary_server import MapillaryServer

    from geohier import grid

    server_token = "MLY|31337|server-own-secret"
    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", server_token)
    cell = "0/1/2/3/0/1/2/3/0/1/2/3"  # level 12: one sub-box
    with MapillaryServer(token=server_token) as srv:  # it would even accept the server's token
        srv.seed_cells([grid.bounds(grid.from_id(cell))], per_cell=2, spacing_m=200)
        at = _page().run()
        assert any("only ever sent to https://graph.mapillary.com" in m.value for m in at.markdown)
        next(t for t in at.text_input if t.label == "Cells").set_value(cell)
        next(n for n in at.number_input if n.label == "Level of the cells").set_value(12)
        next(t for t in at.text_input if t.label == "API URL").set_value(srv.url)
        at.run()
        next(b for b in at.button if b.label == "Start the fetch").click().run()
        assert not at.exception
        assert not any(t.name == "geohier-fetch" for t in threading.enumerate())  # nothing started
        errors = [e.value for e in at.error]
        assert any("only sent to https://graph.mapillary.com" in e and "type a token" in e for e in errors), errors
        assert srv.arrived == {} and srv.auth_seen == []       # no request at all, so no Authorization
        # the same URL with a token typed on the page: that token, and only it, goes there
        at.text_input(key="fetch_token").input("MLY|8|typed-here").run()
        next(b for b in at.button if b.label == "Start the fetch").click().run()
        _wait_for_thread("geohier-fetch")
        at.run()
        assert not at.exception
        assert srv.auth_seen and set(srv.auth_seen) == {"OAuth MLY|8|typed-here"}
    page = " ".join(str(getattr(el, "value", "")) for el in at.main) + repr(at.session_state)
    assert server_token not in page and "server-own-secret" not in page and "typed-here" not in page
