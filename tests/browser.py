"""Run the real dashboard (`streamlit run app.py`) and drive it in headless Chromium.

Used by tests/test_browser.py. The server runs over a temporary workspace on a free
loopback port; Chromium is Debian's (/usr/bin/chromium) through Playwright, started with
the flags this offline machine needs. Screenshots of failing pages go to test-output/.
Every page aborts and records any request that would leave 127.0.0.1 (``new_page``): the
dashboard makes no off-host request (fonts, icons, CDN scripts, tiles).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "test-output"
CHROMIUM = os.environ.get("GEOHIER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]


@contextmanager
def chromium():
    """Headless Debian Chromium through Playwright (a module fixture's body)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


#: Hosts a page may talk to: the dashboard's own server. Everything else is off-host.
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
#: URL schemes that never leave the browser.
LOCAL_SCHEMES = {"data", "blob", "about"}


def is_off_host(url: str) -> bool:
    """True when a request to ``url`` would leave the machine (any host but loopback).

    >>> [is_off_host(u) for u in ("http://127.0.0.1:8501/x", "ws://localhost/s", "http://[::1]:1/",
    ...                           "data:image/svg+xml,<svg/>", "https://fonts.gstatic.com/s/i.svg")]
    [False, False, False, False, True]
    """
    parts = urlsplit(url)
    if parts.scheme in LOCAL_SCHEMES:
        return False
    return (parts.hostname or "") not in LOCAL_HOSTS


def new_page(browser, request, width: int, height: int):
    """A page in a fresh context that records failed requests (``page.failed_requests``)
    and every request that leaves 127.0.0.1 (``page.off_host_requests``: aborted, and the
    test fails at teardown if there was any), and leaves a screenshot when the test using
    it fails (a page fixture's body)."""
    context = browser.new_context(viewport={"width": width, "height": height})
    off_host: list[str] = []

    def guard(route):  # every request of the context, its frames and workers included
        if is_off_host(route.request.url):
            if route.request.url not in off_host:
                off_host.append(route.request.url)
            route.abort("blockedbyclient")
        else:
            route.continue_()

    context.route("**/*", guard)
    context.on("request", lambda r: is_off_host(r.url) and r.url not in off_host and off_host.append(r.url))
    pg = context.new_page()
    pg.failed_requests = []
    pg.off_host_requests = off_host
    pg.on("requestfailed", lambda r: pg.failed_requests.append(f"{r.url} {r.failure}"))
    yield pg
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        screenshot(pg, f"failed-{request.node.name}")
    context.close()
    assert not off_host, f"requests that left 127.0.0.1: {off_host}"


def assert_no_off_host_requests(page) -> None:
    """Fail when the page (or any frame of it) asked for anything but the local server."""
    assert not page.off_host_requests, f"requests that left 127.0.0.1: {page.off_host_requests}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def streamlit_server(data_dir: Path, models_dir: Path, log_path: Path):
    """Start the dashboard (`python -m pipeline.serve`, i.e. `streamlit run app.py` without the
    external-IP lookup) on a free port; yield its base URL; stop it."""
    port = free_port()
    env = dict(os.environ, GEOHIER_DATA=str(data_dir), GEOHIER_MODELS=str(models_dir),
               PYTHONUNBUFFERED="1")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.serve", "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited early:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"streamlit did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_for_app(page, timeout_s: float = 120.0) -> None:
    """Wait until Streamlit has finished running the script (status widget idle, stable)."""
    deadline = time.time() + timeout_s
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout_s * 1000)
    quiet_since = None
    while time.time() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0 and \
            "Running" in (page.locator('[data-testid="stStatusWidget"]').inner_text() or "")
        skeleton = page.locator('[data-testid="stAppSkeleton"], [data-testid="stSkeleton"]').count() > 0
        if running or skeleton:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.time()
        elif time.time() - quiet_since > 1.5:
            return
        time.sleep(0.25)
    raise TimeoutError("the app kept running")


def exception_texts(page) -> list[str]:
    boxes = page.locator('[data-testid="stException"]')
    return [boxes.nth(i).inner_text() for i in range(boxes.count())]


def screenshot(page, name: str) -> Path:
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def dataframe_rows(frame, timeout_s: float = 60.0) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of cell texts) of an ``st.dataframe`` (a ``[data-testid="stDataFrame"]``
    locator), read from the accessibility table that Glide Data Grid keeps next to its
    canvas. The texts are the cells' raw values (``53.84615384615385``, not the drawn
    ``53.8%``); only the rows and columns in view are there. Waits until the table holds
    as many rows as the grid says it has."""
    table = frame.locator('table[role="grid"]')
    deadline = time.time() + timeout_s
    while True:
        if table.count():
            total = int(table.first.get_attribute("aria-rowcount") or 0) - 1  # minus the header row
            body = table.first.locator("tbody tr")
            if total >= 0 and body.count() == total:
                headers = table.first.locator("thead th").all_inner_texts()
                return headers, [body.nth(i).locator("td").all_inner_texts() for i in range(total)]
        if time.time() > deadline:
            raise TimeoutError("the dataframe's accessibility table never filled")
        time.sleep(0.25)


def dataframe_backgrounds(frame, border=(0xE8, 0xE5, 0xE2)) -> list[list[tuple[int, int, int]]]:
    """The background colour (RGB) of each body cell of an ``st.dataframe`` as drawn on its
    canvas, ``[row][column]`` in view order. Cells are found by the grid lines (Streamlit's
    light theme draws them in ``border``); each cell is sampled just inside its top-left
    corner, where the padding keeps text away. Move the mouse off the grid first (hover
    tints a row)."""
    import io

    import numpy as np
    from PIL import Image

    shot = frame.locator('[data-testid="stDataFrameResizable"]').screenshot()
    img = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
    line = np.abs(img - np.array(border)).max(-1) <= 2
    ys = [y for y in range(img.shape[0]) if line[y].mean() > 0.5]
    xs = [x for x in range(img.shape[1]) if line[:, x].mean() > 0.5]
    ys = [y for i, y in enumerate(ys) if i == 0 or y - ys[i - 1] > 1]  # one y per line
    xs = [x for i, x in enumerate(xs) if i == 0 or x - xs[i - 1] > 1]
    return [[tuple(int(c) for c in img[top + 4, left + 4]) for left in xs[:-1]] for top in ys[1:-1]]
