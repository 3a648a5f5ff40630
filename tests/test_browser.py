"""The dashboard in a real browser: every page opens through the navigation without an
exception box, and the Coverage map really draws offline (Leaflet paths in its frame, no
failed script requests)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser import CHROMIUM, CHROMIUM_ARGS, exception_texts, screenshot, streamlit_server, wait_for_app  # noqa: E402
from conftest import jpeg_bytes  # noqa: E402

from geohier.workspace import Workspace  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing (.ci/run installs it)"),
]

PAGES = ["Home", "Coverage", "Data", "Train", "Accuracy", "Predict"]
PLACES = [(48.85, 2.35), (51.5, -0.12), (40.71, -74.0), (-33.92, 18.42), (35.68, 139.69), (-23.55, -46.63)]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    ws = Workspace(root / "data", root / "models")
    ws.data_dir.mkdir()
    ws.models_dir.mkdir()
    with ws.manifest() as m:
        for i, (lat, lon) in enumerate(PLACES):
            m.store_image(jpeg_bytes(color=(40 * i % 255, 90, 160)), "jpg", source="photos",
                          source_id=f"p{i}.jpg", lat=lat, lon=lon, width=64, height=48)
    with streamlit_server(ws.data_dir, ws.models_dir, root / "streamlit.log") as url:
        yield url, ws


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.failed_requests = []
    pg.on("requestfailed", lambda r: pg.failed_requests.append(f"{r.url} {r.failure}"))
    yield pg
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        screenshot(pg, f"failed-{request.node.name}")
    context.close()


def open_page(page, title: str) -> None:
    nav = page.locator('[data-testid="stSidebarNav"] a', has_text=title).first
    nav.click()
    wait_for_app(page)


def test_every_page_opens_without_exception(app, page):
    url, _ = app
    page.goto(url)
    wait_for_app(page)
    problems = {}
    for title in PAGES:
        open_page(page, title)
        shot = screenshot(page, f"page-{title.lower()}")
        errors = exception_texts(page)
        if errors:
            problems[title] = (errors, shot)
    assert not problems, problems


def test_home_shows_workspace(app, page):
    url, _ = app
    page.goto(url)
    wait_for_app(page)
    text = page.locator('[data-testid="stMain"]').inner_text()
    assert "Images" in text and "6" in text
    assert "labels" in text  # the next step for a workspace with images and no hierarchy


def test_coverage_map_draws_offline(app, page):
    url, _ = app
    page.goto(url)
    wait_for_app(page)
    open_page(page, "Coverage")
    frame = None
    drawn = 0
    for _ in range(120):
        for f in page.frames:
            try:
                if f.locator(".leaflet-container[data-geohier-cells]").count():
                    frame = f
            except Exception:  # frames come and go while the component loads
                continue
        if frame is not None:
            drawn = int(frame.locator(".leaflet-container").first.get_attribute("data-geohier-cells") or 0)
            if drawn > 0 and frame.locator(".leaflet-overlay-pane canvas").count() > 0:
                break
        page.wait_for_timeout(500)
    screenshot(page, "coverage-map")
    assert frame is not None, "no geohier Leaflet map in any frame"
    assert drawn > 0, "the map drew no cells"
    assert frame.locator(".leaflet-overlay-pane canvas").count() > 0
    script_failures = [r for r in page.failed_requests if ".js" in r or ".css" in r]
    assert not script_failures, script_failures
    assert not exception_texts(page)
