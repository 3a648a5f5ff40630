"""Shared fixtures: a fresh workspace per test, and tiny real JPEGs (optionally with GPS)."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import pytest
from PIL import Image

from geohier.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]

# Photo clusters for tiny workspaces and runs: (lat, lon, colour) of six cities on four
# continents, each with a colour a tiny model can learn.
CITIES = [
    (48.85, 2.35, (200, 60, 60)),      # Paris
    (52.52, 13.40, (60, 200, 60)),     # Berlin
    (40.71, -74.00, (60, 60, 200)),    # New York
    (-33.87, 151.21, (200, 200, 60)),  # Sydney
    (-23.55, -46.63, (60, 200, 200)),  # Sao Paulo
    (35.68, 139.69, (200, 60, 200)),   # Tokyo
]


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Workspace:
    """A fresh, empty workspace under tmp_path, also exported through the environment."""
    data, models = tmp_path / "data", tmp_path / "models"
    data.mkdir()
    models.mkdir()
    monkeypatch.setenv("GEOHIER_DATA", str(data))
    monkeypatch.setenv("GEOHIER_MODELS", str(models))
    return Workspace(data, models)


def _dms(value: float) -> tuple[Fraction, Fraction, Fraction]:
    # Work in ten-thousandths of an arc-second so rounding never yields 60 seconds.
    total = round(abs(value) * 3600 * 10000)
    deg, rest = divmod(total, 3600 * 10000)
    minutes, tenk_seconds = divmod(rest, 60 * 10000)
    return (Fraction(deg), Fraction(minutes), Fraction(tenk_seconds, 10000))


def jpeg_bytes(size=(64, 48), color=(120, 130, 140), gps=None, orientation=None,
               fmt="JPEG", mode="RGB") -> bytes:
    """Bytes of a tiny image; ``gps=(lat, lon)`` writes EXIF GPS tags, ``orientation`` the
    EXIF orientation tag. The image is a left/right split so orientation is visible."""
    img = Image.new("RGB", size, color)
    half = Image.new("RGB", (size[0] // 2, size[1]), tuple(255 - c for c in color))
    img.paste(half, (0, 0))
    if mode != "RGB":
        img = img.convert(mode)
    exif = Image.Exif()
    if gps is not None:
        lat, lon = gps
        exif[0x8825] = {
            1: "N" if lat >= 0 else "S", 2: _dms(lat),
            3: "E" if lon >= 0 else "W", 4: _dms(lon),
        }
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    kwargs = {"exif": exif.tobytes()} if (gps is not None or orientation is not None) else {}
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture
def make_jpeg():
    """make_jpeg(path, size=(64, 48), color=(...), gps=None | (lat, lon), orientation=None) -> Path"""

    def make(path, size=(64, 48), color=(120, 130, 140), gps=None, orientation=None, **kw) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(size, color, gps, orientation, **kw))
        return path

    return make


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Expose each phase's report on the item (item.rep_call), for screenshot-on-failure."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(scope="module")
def hierarchy():
    """The tiny three-level hierarchy of ``test_predictor`` (predict tests)."""
    from test_predictor import tiny_hierarchy

    return tiny_hierarchy()


@pytest.fixture
def run_dir(ws, hierarchy):
    """A tiny finished run ``models/tiny`` in the test's workspace (predict tests)."""
    from test_predictor import make_tiny_run

    return make_tiny_run(ws.models_dir / "tiny", hierarchy)
