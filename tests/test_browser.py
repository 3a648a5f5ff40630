"""The dashboard in a real browser: every page opens through the navigation without an
exception box, no page asks for anything but the local server (the page factory aborts and
records every request that leaves 127.0.0.1), and the Coverage map really draws offline
(Leaflet paths in its frame, no failed script requests)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser import (  # noqa: E402
    CHROMIUM,
    assert_no_off_host_requests,
    chromium,
    exception_texts,
    new_page,
    screenshot,
    streamlit_server,
    wait_for_app,
)
from conftest import jpeg_bytes  # noqa: E402

from geohier.workspace import Workspace  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing (.ci/run installs it)"),
]

PAGES = ["Home", "Coverage", "Data", "Train", "Accuracy", "Predict"]
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "photos"
PLACES = [(48.85, 2.35), (51.5, -0.12), (40.71, -74.0), (-33.92, 18.42), (35.68, 139.69), (-23.55, -46.63)]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A small but complete workspace: photos, a demo world, labels and one tiny trained run."""
    from pipeline.demo import build_demo
    from pipeline.labels import build_labels
    from pipeline.train import demo_config, train

    root = tmp_path_factory.mktemp("browser")
    ws = Workspace(root / "data", root / "models")
    ws.data_dir.mkdir()
    ws.models_dir.mkdir()
    with ws.manifest() as m:
        for i, (lat, lon) in enumerate(PLACES):
            m.store_image(jpeg_bytes(color=(40 * i % 255, 90, 160)), "jpg", source="photos",
                          source_id=f"p{i}.jpg", lat=lat, lon=lon, width=64, height=48)
    build_demo(ws, images=120, seed=1, size=64, workers=1, show_bar=False)
    build_labels(ws, levels=(1, 3), min_images=1)
    train(ws, demo_config(levels=[1, 3], image_size=32, epochs=1, batch_size=32, max_steps=2, workers=0,
                          run_name="tiny"))
    with streamlit_server(ws.data_dir, ws.models_dir, root / "streamlit.log") as url:
        yield url, ws


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser, request):
    yield from new_page(browser, request, 1400, 1000)


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
    assert_no_off_host_requests(page)


def test_no_page_makes_an_off_host_request(app, page):
    """Every page by its own URL, as a fresh visit loads it (fonts, icons, scripts, maps):
    nothing but 127.0.0.1 is asked for; the tab icon is the server's own views/icon.png,
    not a Material icon from fonts.gstatic.com."""
    url, _ = app
    seen = []
    page.on("request", lambda r: seen.append(r.url))
    for path in ("", "/coverage", "/data", "/train", "/accuracy", "/predict"):
        page.goto(url + path)
        wait_for_app(page)
        if path in ("", "/coverage", "/data"):
            page.wait_for_timeout(1500)  # the maps' frames load their own documents
        assert_no_off_host_requests(page)
    icon = page.evaluate("() => document.querySelector(\"link[rel='shortcut icon']\").href")
    assert icon.startswith(url + "/media/") and icon.endswith(".png"), icon  # views/icon.png, from this server
    assert page.request.get(icon).body()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(u.startswith(url) for u in seen) and not page.off_host_requests
    nav = page.locator('[data-testid="stSidebarNav"]').inner_text()
    assert "🏠" in nav and "📍" in nav  # the emoji icons


def test_home_shows_workspace(app, page):
    url, _ = app
    page.goto(url)
    wait_for_app(page)
    text = page.locator('[data-testid="stMain"]').inner_text()
    assert "Images" in text and "126" in text  # 6 photos + 120 demo images
    assert "Predict page" in text  # the next step once a run has finished


def find_map_frame(page, tries: int = 120):
    """The frame holding a geohier Leaflet map, once it has drawn cells (or None)."""
    for _ in range(tries):
        for f in page.frames:
            try:
                el = f.locator(".leaflet-container[data-geohier-cells]")
                if el.count() and int(el.first.get_attribute("data-geohier-cells") or 0) > 0:
                    return f
            except Exception:  # frames come and go while the component loads
                continue
        page.wait_for_timeout(500)
    return None


def test_data_page_min_images_control(app, page):
    url, _ = app
    page.goto(url + "/data")
    wait_for_app(page)
    main = page.locator('[data-testid="stMain"]')
    assert "Gini" in main.inner_text()
    assert find_map_frame(page) is not None, "the Data page's count map did not draw"
    assert not exception_texts(page)


def test_train_page_launches_a_job_that_finishes(app, page):
    url, ws = app
    page.goto(url + "/train")
    wait_for_app(page)

    def set_number(label: str, value: str) -> None:
        box = page.locator(f'input[aria-label="{label}"]')
        box.fill(value)
        box.press("Tab")  # Enter would submit the form

    set_number("Epochs", "1")
    set_number("Batch size", "16")
    set_number("Image size (px)", "32")
    page.locator('input[aria-label="Run name (optional)"]').fill("browser-job")
    page.get_by_role("button", name="Launch").click()
    wait_for_app(page)
    assert not exception_texts(page), exception_texts(page)
    status = ws.models_dir / "browser-job" / "status.json"
    for _ in range(360):  # the job trains for real in the background: up to 3 minutes
        if status.exists() and '"done"' in status.read_text():
            break
        page.wait_for_timeout(500)
    assert '"done"' in status.read_text(), status.read_text()
    page.wait_for_timeout(3000)  # the runs panel refreshes every 2 s
    screenshot(page, "train-job-done")
    table = page.locator('[data-testid="stDataFrame"]').first
    assert table.count() == 1
    assert not exception_texts(page)


def test_predict_upload_photo_and_broken_file(app, page, tmp_path):
    url, _ = app
    page.goto(url + "/predict")
    wait_for_app(page)
    photo = next(iter(sorted(PHOTOS.glob("*.jpg"))), None) if PHOTOS.is_dir() else None
    if photo is None:  # outside the project checkout: a generated photo does the same job
        photo = tmp_path / "street.jpg"
        photo.write_bytes(jpeg_bytes(size=(320, 240), gps=(48.85, 2.35)))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files([str(photo), str(broken)])
    wait_for_app(page)
    assert find_map_frame(page) is not None, "the prediction map did not draw"
    screenshot(page, "predict-upload")
    assert page.locator('[data-testid="stDataFrame"]').count() >= 1
    errors = page.locator('[data-testid="stAlertContentError"]')
    assert errors.count() >= 1 and "broken.jpg" in errors.first.inner_text()
    assert not exception_texts(page)
    assert "Traceback" not in page.locator('[data-testid="stMain"]').inner_text()


def test_coverage_map_draws_offline(app, page):
    url, _ = app
    page.goto(url)
    wait_for_app(page)
    open_page(page, "Coverage")
    frame = find_map_frame(page)
    screenshot(page, "coverage-map")
    assert frame is not None, "no geohier Leaflet map with cells in any frame"
    assert frame.locator(".leaflet-overlay-pane canvas").count() > 0
    script_failures = [r for r in page.failed_requests if ".js" in r or ".css" in r]
    assert not script_failures, script_failures
    assert not exception_texts(page)
    assert_no_off_host_requests(page)


def test_data_page_cells_upload_is_sized_and_checked(app, page, tmp_path):
    """The Data page takes a cell list as an upload (never a server path): a good list is
    sized under the field; a binary file gets one line that repeats none of its bytes."""
    url, _ = app
    page.goto(url + "/data")
    wait_for_app(page)
    page.get_by_text("Get images").first.click()
    page.get_by_role("tab", name="Mapillary").click()
    uploader = page.locator('[data-testid="stFileUploader"]').filter(has_text="file of cell ids")
    cells = tmp_path / "cells.txt"
    cells.write_text("# two cells\n0/1/2\n013\n0/1/2\n")
    uploader.locator('input[type="file"]').set_input_files(str(cells))
    wait_for_app(page)
    main = page.locator('[data-testid="stMain"]')
    assert "Cells: upload 'cells.txt': at most 3 cell ids" in main.inner_text()
    binary = tmp_path / "secret.txt"
    binary.write_bytes(b"root:SECRET\x00\xff\xfe" * 50)
    uploader.locator('input[type="file"]').set_input_files(str(binary))
    wait_for_app(page)
    text = main.inner_text()
    assert "Cells: upload 'secret.txt': not a text file of cell ids" in text
    assert "SECRET" not in text and not exception_texts(page)
    screenshot(page, "data-cells-upload")
    assert_no_off_host_requests(page)


def map_cell_counts(page, want: int, tries: int = 120) -> list[int]:
    """The ``data-geohier-cells`` of every drawn geohier map on the page, once ``want``
    of them have drawn (fewer after ``tries`` half-seconds)."""
    counts: list[int] = []
    for _ in range(tries):
        counts = []
        for f in page.frames:
            try:
                el = f.locator(".leaflet-container[data-geohier-cells]")
                if el.count():
                    counts.append(int(el.first.get_attribute("data-geohier-cells") or 0))
            except Exception:  # frames come and go while the components load
                continue
        if len([c for c in counts if c > 0]) >= want:
            return counts
        page.wait_for_timeout(500)
    return counts


def upload_street_photo(page, url: str, tmp_path) -> None:
    """Open the Predict page and upload one geotagged street photo (Paris)."""
    page.goto(url + "/predict")
    wait_for_app(page)
    photo = tmp_path / "street.jpg"
    photo.write_bytes(jpeg_bytes(size=(320, 240), gps=(48.85, 2.35)))
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files([str(photo)])
    wait_for_app(page)


def test_predict_world_probability_map_and_explanation_overlay(app, page, tmp_path):
    """The Predict page draws the world probability map (every finest class: as many cells
    as the run has level-3 classes) beside the kept cells, and the occlusion overlay on
    demand; nothing leaves the host."""
    from geohier.hierarchy import Hierarchy

    url, ws = app
    classes = Hierarchy.load(ws.hierarchy_path).num_classes[3]  # the tiny run's finest level
    upload_street_photo(page, url, tmp_path)
    counts = map_cell_counts(page, 2)
    assert len([c for c in counts if c > 0]) >= 2, f"the two maps did not draw: {counts}"
    assert classes in counts, (classes, counts)  # the world map: every class
    page.get_by_text("Why this guess").first.click()
    wait_for_app(page)
    main = page.locator('[data-testid="stMain"]')
    for _ in range(240):
        if "forwards in" in main.inner_text():
            break
        page.wait_for_timeout(500)
    assert "forwards in" in main.inner_text()
    assert page.locator('[data-testid="stImage"] img').count() >= 2  # the photo and its overlay
    screenshot(page, "predict-world-and-why")
    assert not exception_texts(page)
    assert_no_off_host_requests(page)


def test_predict_coverage_region_draws_its_cells(app, page, tmp_path):
    """The coverage region (the run is calibrated at the end of training): its cell count and
    km² on the page; nothing leaves the host."""
    from geohier.hierarchy import Hierarchy

    url, ws = app
    upload_street_photo(page, url, tmp_path)
    classes = Hierarchy.load(ws.hierarchy_path).num_classes[3]
    before = [c for c in map_cell_counts(page, 2) if c != classes]  # the prediction map's cells
    assert len(before) == 1 and before[0] > 0, before
    page.get_by_text("Coverage region").first.click()
    wait_for_app(page)
    text = page.locator('[data-testid="stMain"]').inner_text()
    assert "Region cells" in text and "km²" in text
    region = int(text.split("Region cells", 1)[1].split()[0].replace(",", ""))
    h = Hierarchy.load(ws.hierarchy_path)
    assert 1 <= region <= h.num_classes[3] + h.num_classes[1]  # finest cells and level-1 cells' rests
    # the map redraws with the region's finest cells outlined (the rests are drawn as polygons
    # with holes, not counted here); a mounted map redraws only under a new key
    for _ in range(120):
        counts = map_cell_counts(page, 2)
        if any(before[0] < c <= before[0] + region for c in counts) and classes in counts:
            break
        page.wait_for_timeout(500)
    assert any(before[0] < c <= before[0] + region for c in counts), (before, region, counts)
    assert classes in counts  # the world map is still there
    screenshot(page, "predict-coverage-region")
    assert not exception_texts(page)
    assert_no_off_host_requests(page)
