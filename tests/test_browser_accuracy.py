"""The Accuracy page's leaderboard and error maps in a real browser.

One workspace: a tiny demo world, labels and one tiny trained run, evaluated on its test
split (``pipeline.evaluate``: the run and the three baselines), plus another system's
predictions scored on the very same images (``pipeline.score``). The page must show all
five rows with the figures of the leaderboard JSON, mark the best non-baseline value of
each column, and draw the error map (an SVG line from every true place to its guess) and
the per-cell hit-rate choropleth, offline.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser import (  # noqa: E402
    CHROMIUM,
    assert_no_off_host_requests,
    chromium,
    dataframe_backgrounds,
    dataframe_rows,
    exception_texts,
    new_page,
    screenshot,
    streamlit_server,
    wait_for_app,
)

from geohier import grid  # noqa: E402
from geohier.leaderboard import Leaderboard  # noqa: E402
from geohier.metrics import KM_THRESHOLDS  # noqa: E402
from geohier.workspace import Workspace  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing (.ci/run installs it)"),
]

RUN = "tiny"
SYSTEM = "toy-geolocator"
BEST_GREEN = (0xD9, 0xF0, 0xD3)  # views/accuracy.py's best-value cell background
NEAR = "#1a9850"  # the error map's colour of an error under 1 km
FAR = "#7f0000"  # ... and of one at 20,000 km or more
#: leaderboard column -> the page's header
HEADERS = {"geoscore": "GeoScore", "median_km": "median km", **{f"acc_{t}km": f"{t} km" for t in KM_THRESHOLDS},
           "country_acc": "country"}
HIGHER = {"geoscore": True, "median_km": False, **{f"acc_{t}km": True for t in KM_THRESHOLDS}, "country_acc": True}


def antipode(lat: float, lon: float) -> tuple[float, float]:
    return -lat, lon - 180.0 if lon > 0 else lon + 180.0


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The workspace, its leaderboard and a server on it.

    The other system answers the first third of the test images 0.11 km off (1/3 within
    every threshold) and the rest at the antipode (20,015 km): it beats the untrained run
    on GeoScore and every accuracy, and loses on median km, so the best-value marking
    falls on two different rows."""
    from pipeline.demo import build_demo
    from pipeline.evaluate import evaluate_run
    from pipeline.labels import build_labels
    from pipeline.score import score_files
    from pipeline.train import demo_config, train

    root = tmp_path_factory.mktemp("browser-accuracy")
    ws = Workspace(root / "data", root / "models")
    ws.data_dir.mkdir()
    ws.models_dir.mkdir()
    build_demo(ws, images=120, seed=1, size=64, workers=1, show_bar=False)
    build_labels(ws, levels=(1, 3), min_images=1)
    train(ws, demo_config(levels=[1, 3], image_size=32, epochs=1, batch_size=32, max_steps=2, workers=0,
                          run_name=RUN))
    ev = evaluate_run(ws.models_dir / RUN, ws, progress=False)
    truth_hash = ev["truth"]["hash"]
    points = Leaderboard(ws.data_dir).points(truth_hash, RUN)
    n = len(points)
    near = n // 3
    # the test split as a truth CSV (the run's per-image truth), and the other system's answers
    truth_csv, pred_csv = root / "demo-test-split.csv", root / f"{SYSTEM}.csv"
    with open(truth_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "lat", "lon"])
        w.writerows(zip(points["key"], points["true_lat"], points["true_lon"], strict=True))
    with open(pred_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "pred_lat", "pred_lon"])
        for i, (key, lat, lon) in enumerate(zip(points["key"], points["true_lat"], points["true_lon"], strict=True)):
            w.writerow([key, *((lat + 0.001, lon) if i < near else antipode(lat, lon))])
    scored = score_files(ws, [str(pred_csv)], str(truth_csv), [SYSTEM])
    assert scored["truth"]["hash"] == truth_hash, "the score's truth set is not the evaluation's"
    entries = json.loads(Leaderboard(ws.data_dir).path.read_text())["truth_sets"][truth_hash]["entries"]
    assert {e["kind"] for e in entries.values()} == {"run", "system", "baseline"} and len(entries) == 5
    with streamlit_server(ws.data_dir, ws.models_dir, root / "streamlit.log") as url:
        yield {"url": url, "ws": ws, "entries": entries, "points": points, "near": near}


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser, request):
    yield from new_page(browser, request, 1600, 2400)


def open_accuracy(page, url: str):
    """The Accuracy page by its own URL, as a bookmark opens it: the app's navigation must
    be there (Home, ...), not a folder listing of page scripts (a ``pages/`` folder beside
    app.py once made a fresh server's first page URL run without app.py). Waits for the
    leaderboard grid and returns its locator."""
    page.goto(url.rstrip("/") + "/accuracy")
    nav = page.locator('[data-testid="stSidebarNav"] a')
    nav.filter(has_text="Home").first.wait_for(timeout=90_000)  # the app's st.navigation
    labels = [t.strip().lower() for t in nav.all_inner_texts()]
    assert "common" not in labels and "_common" not in labels, labels
    page.get_by_role("heading", name="Leaderboard").wait_for(timeout=90_000)
    wait_for_app(page)
    return page.locator('[data-testid="stDataFrame"]').first


def expected_rows(entries: dict) -> list[str]:
    """The leaderboard's order: systems and runs by GeoScore, then baselines by GeoScore."""
    return sorted(entries, key=lambda name: (entries[name]["kind"] == "baseline", -entries[name]["geo"]["geoscore"]))


def test_leaderboard_rows_figures_and_best_marking(app, page):
    entries = app["entries"]
    grid_el = open_accuracy(page, app["url"])
    headers, rows = dataframe_rows(grid_el)
    col = {h: i for i, h in enumerate(headers)}
    names = [r[col["system"]] for r in rows]
    assert names == expected_rows(entries)
    assert names[:2] == [SYSTEM, RUN] and names[2:] == sorted(names[2:], key=lambda m: -entries[m]["geo"]["geoscore"])
    assert {r[col["kind"]] for r in rows[2:]} == {"baseline"} and len(rows) == 5
    assert {n for n in names if n.startswith("baseline: ")} == {"baseline: constant", "baseline: prior",
                                                               "baseline: random_land"}
    # every figure is the leaderboard JSON's (percentages for the accuracies)
    for row in rows:
        g = entries[row[col["system"]]]["geo"]
        assert row[col["kind"]] == entries[row[col["system"]]]["kind"]
        assert float(row[col["GeoScore"]]) == pytest.approx(g["geoscore"], rel=1e-9)
        assert float(row[col["median km"]]) == pytest.approx(g["median_km"], rel=1e-9)
        for t in KM_THRESHOLDS:
            assert float(row[col[f"{t} km"]]) == pytest.approx(100 * g[f"acc_{t}km"], abs=1e-9)
        assert float(row[col["country"]]) == pytest.approx(100 * g["country_acc"], abs=1e-9)
        assert int(row[col["images"]]) == g["n"] == len(app["points"])
    run_row = rows[names.index(RUN)]
    assert float(run_row[col["GeoScore"]]) == pytest.approx(entries[RUN]["geo"]["geoscore"], rel=1e-9)
    # the system's figures follow from how its answers were made
    sys_row = rows[names.index(SYSTEM)]
    third = 100 * app["near"] / len(app["points"])
    assert [float(sys_row[col[f"{t} km"]]) for t in KM_THRESHOLDS] == pytest.approx([third] * 5)
    assert float(sys_row[col["median km"]]) == pytest.approx(20015.1, abs=0.1)  # half the circumference

    # the best non-baseline value of each column is marked, and only it
    page.mouse.move(2, 2)  # hovering tints a row
    page.wait_for_timeout(500)
    colours = dataframe_backgrounds(grid_el)
    assert len(colours) == len(rows) and all(len(c) == len(headers) for c in colours)
    marked = {(i, j) for i, row in enumerate(colours) for j, rgb in enumerate(row)
              if max(abs(a - b) for a, b in zip(rgb, BEST_GREEN, strict=True)) <= 3}
    expected = set()
    for key, header in HEADERS.items():
        cands = [i for i, n in enumerate(names) if entries[n]["kind"] != "baseline"]
        values = [entries[names[i]]["geo"][key] for i in cands]
        best = max(values) if HIGHER[key] else min(values)
        expected.add((cands[values.index(best)], col[header]))  # ties: the first row
    assert marked == expected, (marked, expected)
    assert (names.index(SYSTEM), col["GeoScore"]) in marked and (names.index(RUN), col["median km"]) in marked
    assert not exception_texts(page), exception_texts(page)
    screenshot(page, "accuracy-leaderboard")
    assert_no_off_host_requests(page)


def map_frame(page, text: str, selector: str, tries: int = 120):
    """The live component frame whose map shows ``text`` and has ``selector`` (or None)."""
    for _ in range(tries):
        for f in page.frames:
            try:
                if f.is_detached() or not f.locator(selector).count():
                    continue
                if text in f.locator(".leaflet-container").first.inner_text():
                    return f
            except Exception:  # frames come and go while the component loads
                continue
        page.wait_for_timeout(500)
    return None


def lines_and_dots(frame) -> tuple[list[tuple[str, tuple[float, float]]], list[tuple[float, float]]]:
    """The error map's SVG paths: (colour, start point) of each line, centre of each dot."""
    lines, dots = [], []
    paths = frame.locator(".leaflet-overlay-pane svg path")
    for i in range(paths.count()):
        stroke, d = paths.nth(i).get_attribute("stroke"), paths.nth(i).get_attribute("d") or ""
        if stroke == "#222222":  # a circle marker: "M{x-r},{y}a{r},{r} ..."
            x, y = d[1:].split("a")[0].split(",")
            dots.append((float(x) + 2, float(y)))
        else:  # a line: "M{x1} {y1}L{x2} {y2}"
            x1, y1 = d[1:].split("L")[0].split()
            lines.append((stroke, (float(x1), float(y1))))
    return lines, dots


def choose(page, label: str, option: str) -> None:
    page.get_by_role("combobox", name=label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()
    wait_for_app(page)


def test_error_map_and_cell_hit_map_draw(app, page):
    n, near = len(app["points"]), app["near"]
    open_accuracy(page, app["url"])
    page.get_by_text("Where it fails").scroll_into_view_if_needed()
    note = f"{n:,} of {n:,} images shown"
    # the run first (the first system with per-image points): a line from each true place
    frame = map_frame(page, note, ".leaflet-overlay-pane svg path")
    assert frame is not None, "the error map did not draw"
    lines, dots = lines_and_dots(frame)
    assert len(lines) == n and len(dots) == n
    assert Counter(start for _, start in lines) == Counter(dots)  # each line starts at a true place

    # the other system: a third of its answers 0.11 km off (green), the rest at the antipode
    choose(page, "System", SYSTEM)
    for _ in range(60):
        frame = map_frame(page, note, ".leaflet-overlay-pane svg path")
        lines, _ = lines_and_dots(frame) if frame is not None else ([], [])
        if Counter(c for c, _ in lines) == Counter({NEAR: near, FAR: n - near}):
            break
        page.wait_for_timeout(500)
    assert Counter(c for c, _ in lines) == Counter({NEAR: near, FAR: n - near})
    legend = frame.locator(".leaflet-container").first.inner_text()
    assert "≤ 1 km" in legend and "20,000 km" in legend
    screenshot(page, "accuracy-error-map")

    # the per-cell hit rate at level 3: one cell per L3 cell of the true places
    page.locator('[data-testid="stRadio"]').get_by_text("cell hit rate").click()
    wait_for_app(page)
    cells = len(np.unique(grid.encode(app["points"]["true_lat"].to_numpy(), app["points"]["true_lon"].to_numpy(), 3)))
    hit = map_frame(page, "L3 hit rate", ".leaflet-container[data-geohier-cells]")
    assert hit is not None, "the cell hit-rate map did not draw"
    assert int(hit.locator(".leaflet-container").first.get_attribute("data-geohier-cells")) == cells
    assert hit.locator(".leaflet-overlay-pane canvas").count() > 0
    screenshot(page, "accuracy-cell-hit-map")
    script_failures = [r for r in page.failed_requests if ".js" in r or ".css" in r]
    assert not script_failures, script_failures
    assert not exception_texts(page), exception_texts(page)
    assert_no_off_host_requests(page)


def test_recall_area_and_abstention_curves_draw(app, page):
    """The evaluation above recorded recall vs area and abstention: both curves draw
    (plotly axis titles in the page), the recall axis on a log scale, nothing off-host."""
    open_accuracy(page, app["url"])
    page.get_by_text("Recall vs area").first.scroll_into_view_if_needed()
    titles: list[str] = []
    for _ in range(120):
        titles = page.locator('[data-testid="stPlotlyChart"] .xtitle').all_text_contents()
        if any("km², log" in t for t in titles) and any("most confident first" in t for t in titles):
            break
        page.mouse.wheel(0, 600)
        page.wait_for_timeout(500)
    assert any("km², log" in t for t in titles), titles
    assert any("most confident first" in t for t in titles), titles
    assert not page.get_by_text("Not shown:").count()  # the run has both blocks
    # the evaluation calibrated the run: its prediction regions' coverage table is drawn
    regions = page.get_by_text("Prediction regions: how often the true place is inside")
    regions.scroll_into_view_if_needed()
    assert regions.is_visible() and not page.get_by_text("No regions for").count()
    assert page.get_by_text("the target is promised").count() == 1  # the caption drawn under the table
    screenshot(page, "accuracy-recall-area-abstention")
    assert not exception_texts(page)
    assert_no_off_host_requests(page)
