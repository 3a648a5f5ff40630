"""The Coverage page (AppTest): level selector, counts per status, table and CSV."""

from __future__ import annotations

import pytest
from conftest import ROOT, jpeg_bytes
from streamlit.testing.v1 import AppTest

PAGE = str(ROOT / "views" / "coverage.py")


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def run_page(level: int) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.query_params["level"] = str(level)
    return at.run()


@pytest.fixture
def ws_with_images(ws):
    # Paris and Berlin share one level-3 cell; Cape Town is in another.
    with ws.manifest() as m:
        for i, (lat, lon) in enumerate([(48.86, 2.35), (52.52, 13.40), (-33.92, 18.42)]):
            m.store_image(jpeg_bytes(color=(40 * i, 90, 150)), "jpg", source="photos",
                          source_id=f"img{i}", lat=lat, lon=lon)
    return ws


@pytest.mark.slow
def test_level3_counts_map_and_table(ws_with_images):
    at = run_page(3)
    assert not at.exception
    assert at.sidebar.selectbox[0].value == 3
    assert metrics(at) == {"Land with images": "2", "Land without images": "60", "Ocean": "2",
                           "Land covered": "3.23%"}
    assert not at.info  # images exist: no hint
    table = at.dataframe[0].value
    assert set(table["status"].astype(str)) == {"land_data", "land_no_data"}  # ocean filtered out
    assert int(table["images"].sum()) == 3


@pytest.mark.slow
def test_changing_the_level_recounts(ws_with_images):
    at = run_page(3)
    at.sidebar.selectbox[0].select(1).run()
    assert not at.exception
    assert metrics(at)["Land with images"] == "2" and metrics(at)["Ocean"] == "0"
    assert at.dataframe[0].value["cell"].tolist() == ["0", "1", "2", "3"]


def test_empty_workspace_still_shows_the_land_map_with_a_hint(ws):
    at = run_page(2)
    assert not at.exception
    assert "import-photos" in at.info[0].value and "demo" in at.info[0].value
    assert metrics(at)["Land with images"] == "0" and metrics(at)["Land covered"] == "0.00%"
    assert not ws.has_manifest()


def test_table_can_show_ocean_cells(ws_with_images):
    at = run_page(3)
    at.sidebar.multiselect[0].set_value(["ocean"]).run()
    assert not at.exception
    assert at.dataframe[0].value["cell"].tolist() == ["2/2/0", "2/2/1"]
