"""geohier.maps: offline folium maps (no CDN), one GeoJSON layer of cells, legend, CLI."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import folium
import numpy as np
import pandas as pd
import pytest
from folium.elements import JSCSSMixin

from geohier import geography, grid, maps
from geohier.errors import InputError
from pipeline import coverage as coverage_cmd

CHROMIUM = os.environ.get("GEOHIER_CHROMIUM", "/usr/bin/chromium")


def _table(level: int) -> pd.DataFrame:
    """A coverage table without a workspace: images in two known cells."""
    geo = geography.cell_geography(level)
    images = np.zeros(len(geo), dtype=np.int64)
    images[grid.encode([48.86, -33.92], [2.35, 18.42], level)] = [5, 2]
    status = np.where(images > 0, "land_data", np.where(geo["land"], "land_no_data", "ocean"))
    t = geo.assign(status=pd.Categorical(status, categories=list(geography.STATUSES)), images=images)
    return t


def cli_main(argv: list[str]) -> int:
    """`python -m pipeline coverage ...` through the command's own parser (the full CLI
    imports every command, torch included: seconds this file does not need)."""
    import argparse

    from geohier.workspace import Workspace

    parser = argparse.ArgumentParser(prog="python -m pipeline")
    coverage_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args, Workspace.from_env())


def _walk(element):
    yield element
    for child in getattr(element, "_children", {}).values():
        yield from _walk(child)


def test_leaflet_assets_are_local_leaflet_194():
    a = maps.leaflet_assets()
    js = base64.b64decode(a["js"].split(",", 1)[1]).decode()
    css = base64.b64decode(a["css"].split(",", 1)[1]).decode()
    assert a["js"].startswith("data:text/javascript;base64,") and "Leaflet 1.9.4" in js
    assert "sourceMappingURL" not in js
    assert "url(images/" not in css and "url(data:image/png;base64," in css
    assert all(a[k].startswith("data:image/png;base64,") for k in ("icon", "icon_2x", "shadow"))


def test_base_map_html_has_no_network_scripts_or_styles():
    m = maps.base_map(tiles=True)
    maps.add_marker(m, 48.86, 2.35, tooltip="Paris")
    folium.Marker([52.52, 13.40]).add_to(m)  # a default-icon marker works offline too
    html = maps.offline_html(m)
    assert maps.network_references(html) == []
    for tag in re.findall(r"<(?:script|link)\b[^>]*>", html):
        assert "http" not in tag, tag
    assert "cdn.jsdelivr" not in html and "code.jquery" not in html and "bootstrapcdn" not in html
    assert html.count('<script src="data:text/javascript;base64,') == 1
    # Folium's class-level CDN lists are untouched; the map's own lists are data URLs.
    assert folium.Map.default_js[0][1].startswith("https://")
    for el in _walk(m):
        if isinstance(el, JSCSSMixin):
            assert all(url.startswith("data:") for _, url in el.default_js + el.default_css)


def test_offline_html_refuses_a_cdn_link():
    m = maps.base_map(outlines=False)
    m.default_js = m.default_js + [("jquery", "https://code.jquery.com/jquery-3.7.1.min.js")]
    with pytest.raises(Exception, match="network"):
        maps.offline_html(m)


@pytest.mark.slow
def test_streamlit_folium_gets_only_local_links():
    import streamlit_folium as sf

    m = maps.coverage_map(_table(2), 2)
    header = sf._get_header(m)
    assert "http" not in "".join(re.findall(r"<(?:script|link)\b[^>]*>", header))
    script = sf._get_map_string(m)
    assert "L.geoJson" in script and "data-geohier-cells" in script


def test_cells_layer_payload_is_keys_and_a_palette():
    layer = maps.cells_layer([0, 5, 15], 2, ["#ff0000", "#00ff00", "#ff0000"],
                             fields={"country": ["A", "B", "A"], "images": [1, 0, 3]},
                             tooltip=[("cell", "Cell"), ("images", "Images")])
    payload = json.loads(layer.payload)
    assert payload["keys"] == [0, 5, 15] and payload["level"] == 2
    assert payload["palette"] == ["#00ff00", "#ff0000"] and payload["color"] == [1, 0, 1]
    assert payload["props"]["country"] == {"values": ["A", "B"], "index": [0, 1, 0]}
    assert payload["props"]["images"] == [1, 0, 3]
    assert payload["tooltip"] == [["cell", "Cell"], ["images", "Images"]]


@pytest.mark.parametrize("kwargs, message", [
    ({"keys": [16], "colors": "#000000"}, "within"),
    ({"keys": [1, 2], "colors": ["#000000"]}, "1 colours for 2 cells"),
    ({"keys": [1], "colors": "#000000", "fields": {"x": [1, 2]}}, "field 'x'"),
    ({"keys": [1], "colors": "#000000", "tooltip": [("nope", "Nope")]}, "tooltip property 'nope'"),
])
def test_cells_layer_rejects_bad_input(kwargs, message):
    with pytest.raises(InputError, match=message):
        maps.cells_layer(level=2, **kwargs)


def test_color_scale():
    assert maps.color_scale([0, 5, 10], colors=("#000000", "#ffffff")) == ["#000000", "#808080", "#ffffff"]
    logc = maps.color_scale([0, 9, 99, 999], log=True, colors=("#000000", "#ffffff"))
    assert logc[0] == "#000000" and logc[-1] == "#ffffff" and logc[1] < logc[2] < logc[3]
    assert maps.color_scale([3, 3]) == [maps.color_scale([0])[0]] * 2  # flat input: first colour


def test_coverage_map_is_one_cells_layer_with_legend():
    table = _table(3)
    html = maps.offline_html(maps.coverage_map(table, 3))
    assert html.count("L.geoJson(") == 2  # country outlines + all 64 cells in ONE layer
    assert "Land with images: 2" in html and "Land without images: 60" in html and "Ocean: 2" in html
    payload = json.loads(re.search(r"\}\)\((\{\"level\":3.*?\}), \{\"fill\"", html).group(1))
    assert len(payload["keys"]) == 64


def test_fine_levels_leave_ocean_to_the_background():
    table = _table(5)
    m = maps.coverage_map(table, 5)
    layers = [el for el in _walk(m) if isinstance(el, maps.CellsLayer)]
    land = int((table["status"] != "ocean").sum())
    assert len(json.loads(layers[0].payload)["keys"]) == len(table)  # L5 still draws ocean
    m7 = maps.coverage_map(table, 5, include_ocean=False)
    layers = [el for el in _walk(m7) if isinstance(el, maps.CellsLayer)]
    assert len(json.loads(layers[0].payload)["keys"]) == land
    assert "blue background" in maps.offline_html(m7)


def test_cli_coverage_writes_offline_html_and_csv(ws, tmp_path, capsys):
    from conftest import jpeg_bytes

    with ws.manifest() as m:
        m.store_image(jpeg_bytes(), "jpg", source="photos", lat=48.86, lon=2.35)
    html, csv = tmp_path / "cov.html", tmp_path / "cov.csv"
    rc = cli_main(["coverage", "--level", "2", "--html", str(html), "--csv", str(csv)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "land_data" in out and "level 2: 16 cells" in out
    text = html.read_text()
    assert maps.network_references(text) == [] and "data-geohier-cells" in text
    table = pd.read_csv(csv, keep_default_na=False)
    assert list(table.columns) == ["cell", "key", "status", "country", "iso_a2", "iso_a3", "land",
                                   "land_fraction", "images", "lat", "lon"]
    assert len(table) == 16 and table["images"].sum() == 1
    assert table.loc[table["images"] == 1, "status"].tolist() == ["land_data"]


def test_cli_coverage_rejects_a_bad_level(ws, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["coverage", "--level", "12"])
    assert exc.value.code == 2 and "level must be within 1..10, got 12" in capsys.readouterr().err


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Chromium")
def test_map_draws_offline_in_chromium(tmp_path):
    """The standalone HTML draws in headless Chromium with every request refused, and the
    browser-side decoding of keys gives each cell its grid id and bounds."""
    from playwright.sync_api import sync_playwright

    keys = np.array([0, 6, 9, 15])
    m = maps.base_map()
    layer = maps.cells_layer(keys, 2, ["#ff0000", "#00ff00", "#0000ff", "#ff0000"],
                             fields={"images": [1, 2, 3, 4]}, tooltip=[("cell", "Cell")])
    layer.add_to(m)
    path = tmp_path / "map.html"
    path.write_text(maps.offline_html(m))
    requested = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.route(re.compile(r"^https?://"), lambda route: (requested.append(route.request.url), route.abort()))
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri())
            page.wait_for_selector('.leaflet-container[data-geohier-cells="4"]', timeout=30_000)
            assert page.locator(".leaflet-overlay-pane canvas").count() >= 1
            cells = page.evaluate(f"""() => {layer.get_name()}.getLayers().map(l => [
                l.feature.properties.cell, l.feature.properties.images,
                l.getBounds().getWest(), l.getBounds().getSouth()])""")
        finally:
            browser.close()
    assert errors == [] and requested == []
    w, s, _, _ = grid.key_bounds(keys, 2)
    assert [c[0] for c in cells] == grid.keys_to_ids(keys, 2)
    assert [c[1] for c in cells] == [1, 2, 3, 4]
    assert np.allclose([c[2] for c in cells], w) and np.allclose([c[3] for c in cells], s)


def test_huge_maps_keep_only_the_cells_with_images(monkeypatch):
    monkeypatch.setattr(maps, "MAX_MAP_CELLS", 10)
    m = maps.coverage_map(_table(3), 3)
    layers = [el for el in _walk(m) if isinstance(el, maps.CellsLayer)]
    assert len(json.loads(layers[0].payload)["keys"]) == 2
    assert "only cells with images are drawn" in maps.offline_html(m)


def test_images_map_colours_cells_by_count_with_a_log_legend(monkeypatch):
    m = maps.images_map([0, 5, 15], [1, 40, 1200], ["FR", "JP", ""], 2)
    layers = [el for el in _walk(m) if isinstance(el, maps.CellsLayer)]
    assert len(layers) == 1
    payload = json.loads(layers[0].payload)
    assert payload["keys"] == [0, 5, 15] and payload["props"]["images"] == [1, 40, 1200]
    html = maps.offline_html(m)
    assert "Images per cell" in html and "log colour scale" in html
    for stop in ("1", "10", "100", "1,000", "1,200"):  # legend stops: powers of ten and the top
        assert f"\\u003e{stop}\\u003c/div" in html, stop  # the legend's entries, JSON-escaped
    assert not maps.network_references(html)
    # Too many cells for a browser tab: a clear message, not a frozen page.
    monkeypatch.setattr(maps, "IMAGES_MAP_MAX_CELLS", 2)
    with pytest.raises(InputError, match="3 cells are too many to draw"):
        maps.images_map([0, 5, 15], [1, 2, 3], ["", "", ""], 2)


# --------------------------------------------------------------------------- probability map


def test_log_prob_scale_is_monotone_and_floors_at_the_decades():
    p = np.array([0.5, 0.05, 5e-4, 5e-7, 0.0])
    with np.errstate(divide="ignore"):
        t = maps.log_prob_scale(np.log(p), decades=6)
    assert t.tolist() == pytest.approx([1.0, 5 / 6, 3 / 6, 0.0, 0.0])
    rng = np.random.default_rng(0)
    lp = np.sort(rng.normal(size=200) * 4)
    assert (np.diff(maps.log_prob_scale(lp)) >= 0).all()
    assert maps.log_prob_scale(np.full(3, -np.inf)).tolist() == [0.0, 0.0, 0.0]


def test_probability_map_is_one_layer_with_every_class():
    keys = np.array([3, 7, 12, 40, 63])  # level 3
    p = np.array([0.6, 0.3, 0.09, 0.01, 0.0])
    with np.errstate(divide="ignore"):
        lp = np.log(p)
    m = maps.probability_map(keys, 3, lp, best=(10.0, 20.0))
    layers = [el for el in _walk(m) if isinstance(el, maps.CellsLayer)]
    assert len(layers) == 1
    payload = json.loads(layers[0].payload)
    assert payload["keys"] == keys.tolist() and payload["level"] == 3
    shown = [payload["props"]["p"]["values"][i] for i in payload["props"]["p"]["index"]]
    assert shown == ["0.6", "0.3", "0.09", "0.01", "0"]
    # colours along the ramp: darker (lower luminance) for likelier cells, the floor for p = 0
    colours = [payload["palette"][i] for i in payload["color"]]
    lum = [sum(int(c[k:k + 2], 16) * w for k, w in ((1, 0.3), (3, 0.59), (5, 0.11))) for c in colours]
    assert lum == sorted(lum) and lum[0] < lum[-1]
    assert colours[-1] == maps.PROB_RAMP[0] and colours[0] == maps.PROB_RAMP[-1]
    assert payload["alpha"][0] > payload["alpha"][-1]
    html = maps.offline_html(m)
    assert not maps.network_references(html) and "Joint probability" in html
    with pytest.raises(InputError, match="4 probabilities for 5 cells"):
        maps.probability_map(keys, 3, lp[:4])


def test_probability_map_of_65k_classes_stays_one_compact_layer():
    rng = np.random.default_rng(1)
    keys = np.sort(rng.choice(4**8, 65_536, replace=False))
    z = rng.normal(size=keys.size) * 3
    m = maps.probability_map(keys, 8, z - np.log(np.exp(z).sum()))
    layers = [el for el in _walk(m) if isinstance(el, maps.CellsLayer)]
    assert len(layers) == 1 and len(json.loads(layers[0].payload)["keys"]) == 65_536
    assert len(layers[0].payload) < 30 * 65_536  # ~20 bytes a cell, not a GeoJSON polygon each
