"""geohier.geography: land, countries and places per cell and per point (Natural Earth)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import jpeg_bytes

from geohier import geography, grid
from geohier.errors import InputError, InvalidCoordinateError, InvalidLevelError


@pytest.fixture(scope="session")
def geo_cache(tmp_path_factory):
    """A cache folder holding levels 1, 3, 5 and 8, computed once per test session (~1 s;
    the tables are also memoised in-process, so other tests reuse them for free)."""
    cache = tmp_path_factory.mktemp("geo-cache")
    geography.cell_geography(8, cache)
    return cache


def _row(level: int, lat: float, lon: float, cache) -> pd.Series:
    key = int(grid.encode([lat], [lon], level)[0])
    return geography.cell_geography(level, cache).loc[key]


def add_images(ws, points):
    with ws.manifest() as m:
        for i, (lat, lon) in enumerate(points):
            m.store_image(jpeg_bytes(color=(i % 256, 17 * i % 256, 90)), "jpg",
                          source="photos", source_id=f"p{i}", lat=lat, lon=lon)


# --------------------------------------------------------------------------- source


def test_natural_earth_is_the_installed_10m_zip():
    path = geography.natural_earth_path()
    assert path.name == "ne_10m_admin_0_countries_deu.zip" and path.stat().st_size > 1_000_000
    assert path.name in geography.source_id() and "ne=5.1.1" in geography.source_id()
    c = geography.countries()
    assert len(c.name) == 250 and len(c.parts) > 4000
    france = list(c.name).index("France")
    assert (c.iso_a2[france], c.iso_a3[france]) == ("FR", "FRA")  # ISO_A2 says -99; _EH fixes it


# --------------------------------------------------------------------------- cells


def test_level_table_shape_and_bounds(geo_cache):
    for level in (1, 3, 5):
        t = geography.cell_geography(level, geo_cache)
        assert list(t.columns) == list(geography.GEO_COLUMNS)
        assert len(t) == 4**level and (t["key"].to_numpy() == np.arange(4**level)).all()
        assert t["cell"].tolist()[:2] == grid.keys_to_ids(np.array([0, 1]), level)
        frac = t["land_fraction"].to_numpy()
        assert ((frac >= 0) & (frac <= 1)).all()
        assert (t["land"].to_numpy() == (frac > 0)).all()
        assert (t.loc[~t["land"], "country"] == "").all()
        assert (t.loc[t["land"], "country"] != "").all()


def test_land_share_of_the_earth_is_about_29_percent(geo_cache):
    # Equal-area fractions weighted by each cell's true area give Earth's land share.
    for level in (1, 3, 5):
        t = geography.cell_geography(level, geo_cache)
        area = grid.key_areas_km2(t["key"].to_numpy(), level)
        share = float((t["land_fraction"] * area).sum() / area.sum())
        assert 0.27 < share < 0.31, (level, share)


def test_level1_every_quadrant_touches_land(geo_cache):
    t = geography.cell_geography(1, geo_cache)
    assert t["land"].all()
    assert t.set_index("cell")["country"].to_dict()["0"] in ("Canada", "Russia", "United States")


def test_south_pacific_cells_are_ocean(geo_cache):
    row = _row(3, -55.0, -150.0, geo_cache)
    assert not row["land"] and row["land_fraction"] == 0 and row["country"] == ""
    t3 = geography.cell_geography(3, geo_cache)
    assert t3.loc[~t3["land"], "cell"].tolist() == ["2/2/0", "2/2/1"]  # only the far South Pacific
    # The L2 Pacific quadrant touches land only through a few islands (Galapagos, ...).
    assert 0 < _row(2, -20.0, -135.0, geo_cache)["land_fraction"] < 0.001


def test_central_europe_cells_have_their_countries(geo_cache):
    france = _row(5, 47.0, 2.0, geo_cache)  # lon 0-11.25, lat 45-50.6
    assert france["land"] and france["land_fraction"] > 0.9
    assert (france["country"], france["iso_a2"], france["iso_a3"]) == ("France", "FR", "FRA")
    germany = _row(8, 52.52, 13.40, geo_cache)  # Berlin's L8 cell
    assert (germany["country"], germany["iso_a2"]) == ("Germany", "DE")
    assert germany["land_fraction"] == pytest.approx(1.0)


def test_level8_land_cells(geo_cache):
    t = geography.cell_geography(8, geo_cache)
    assert len(t) == 65_536
    n_land = int(t["land"].sum())
    # 10 m countries with every islet: a little above the seed's 25,185 (50 m land).
    assert 25_185 <= n_land <= 26_500
    assert n_land == 25_613  # pinned for Natural Earth 5.1.1; bump with the data
    assert _row(8, 0.0, -140.0, geo_cache)["country"] == ""
    assert len(geography.land_keys(8, geo_cache)) == n_land


def test_measured_last_split_matches_the_built_one():
    # Level 6 as the last level (children measured by subtraction) and on the way to 7
    # (children built by clipping) must agree.
    last = geography.compute_geography(6)[6]
    built = geography.compute_geography([6, 7])[6]
    assert (last["land"] == built["land"]).all() and (last["country"] == built["country"]).all()
    assert np.allclose(last["land_fraction"], built["land_fraction"], rtol=0, atol=1e-9)


def test_cache_file_is_written_and_reused(tmp_path, monkeypatch, geo_cache):
    cache = tmp_path / "cache"
    first = geography.cell_geography(3, cache)
    path = geography.geography_cache_path(cache, 3)
    assert path.exists() and path.name.startswith("geography-L3-")

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed although the cache file exists")

    monkeypatch.setattr(geography, "_memo", {})  # nothing in memory: only the file can answer
    monkeypatch.setattr(geography, "compute_geography", refuse)
    again = geography.cell_geography(3, cache)
    pd.testing.assert_frame_equal(first, again)


def test_cold_computation_also_caches_the_coarser_default_levels(tmp_path, monkeypatch):
    monkeypatch.setattr(geography, "_memo", {})
    geography.cell_geography(4, tmp_path)
    assert {p.name.split("-")[1] for p in tmp_path.glob("geography-*.parquet")} == {"L1", "L3", "L4"}


def test_cache_key_names_the_data_source(tmp_path, monkeypatch):
    before = geography.geography_cache_path(tmp_path, 3)
    monkeypatch.setattr(geography, "source_id", lambda: "ne_10m_admin_0_countries_deu.zip size=1 ne=9.9")
    after = geography.geography_cache_path(tmp_path, 3)
    assert before != after and before.name.startswith("geography-L3-") and after.name.startswith("geography-L3-")


def test_a_torn_cache_file_is_recomputed(tmp_path, geo_cache):
    path = geography.geography_cache_path(tmp_path, 2)
    path.write_bytes(b"not parquet")
    t = geography.cell_geography(2, tmp_path)
    assert len(t) == 16 and pd.read_parquet(path).equals(t)


def test_levels_out_of_range_are_refused():
    with pytest.raises(InputError, match="level 11"):
        geography.cell_geography(11)
    with pytest.raises(InvalidLevelError):
        geography.cell_geography(0)


# --------------------------------------------------------------------------- points


def test_country_of_known_points():
    got = geography.country_of([48.86, 52.52, 35.68, -33.92, 40.71, 0.0],
                               [2.35, 13.40, 139.69, 18.42, -74.01, -140.0])
    assert list(got.columns) == ["country", "iso_a2", "iso_a3"]
    assert got["iso_a2"].tolist() == ["FR", "DE", "JP", "ZA", "US", ""]
    assert got["country"].tolist()[:3] == ["France", "Germany", "Japan"]
    assert geography.country_of(48.86, 362.35)["iso_a2"].tolist() == ["FR"]  # longitude wraps
    assert len(geography.country_of([], [])) == 0


def test_country_of_snaps_points_just_off_the_coast():
    # ~20 km off Nice: in the sea for Natural Earth, within 0.1 deg of the coast.
    assert geography.country_of(43.5, 7.2, max_distance_deg=0)["country"][0] == ""
    assert geography.country_of(43.5, 7.2)["country"][0] == "France"
    assert geography.country_of(42.0, 7.0)["country"][0] == ""  # open sea stays empty


def test_country_of_rejects_bad_coordinates():
    with pytest.raises(InvalidCoordinateError, match="point 1"):
        geography.country_of([0.0, 95.0], [0.0, 0.0])
    with pytest.raises(InvalidCoordinateError):
        geography.country_of([float("nan")], [0.0])


def test_nearest_place():
    paris = geography.nearest_place(48.857, 2.352)
    assert paris["place"] == "Paris" and paris["country"] == "France" and paris["country_code"] == "FR"
    assert paris["distance_km"] < 5
    two = geography.nearest_places([35.68, -33.92], [139.69, 18.42])
    assert [p["country_code"] for p in two] == ["JP", "ZA"]
    with pytest.raises(InvalidCoordinateError):
        geography.nearest_place(91.0, 0.0)


def test_country_outlines_are_small_geojson():
    gj = geography.country_outlines()
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) > 150
    names = {f["properties"]["name"]: f for f in gj["features"]}
    assert names["France"]["properties"]["iso_a2"] == "FR"
    assert names["France"]["geometry"]["type"] == "MultiPolygon"
    assert len(geography.country_outlines_json()) < 600_000


# --------------------------------------------------------------------------- coverage


def test_coverage_table_statuses_and_counts(ws, geo_cache):
    add_images(ws, [(48.86, 2.35), (48.80, 2.30), (52.52, 13.40), (-33.92, 18.42)])
    t = geography.coverage_table(ws, 3)
    assert list(t.columns) == ["cell", "key", "status", "country", "iso_a2", "iso_a3", "land",
                               "land_fraction", "images", "lat", "lon"]
    assert len(t) == 64 and int(t["images"].sum()) == 4
    counts = geography.status_counts(t)
    assert counts == {"ocean": 2, "land_no_data": 60, "land_data": 2}
    assert sum(counts.values()) == 64
    europe = t.set_index("cell").loc[grid.to_id(grid.cell(48.86, 2.35, 3))]
    assert europe["status"] == "land_data" and europe["images"] == 3
    assert geography.cell_geography(3, ws.cache_dir) is not None
    assert geography.geography_cache_path(ws.cache_dir, 3).exists()


def test_cells_with_images_at_sea_count_as_land_data(ws, geo_cache):
    # One photo in the Bay of Biscay ~60 km off France (its L8 cell has no land), one in
    # the open Pacific.
    add_images(ws, [(45.3, -2.0), (0.0, -140.0)])
    t = geography.coverage_table(ws, 8).set_index("cell")
    biscay = t.loc[grid.to_id(grid.cell(45.3, -2.0, 8))]
    pacific = t.loc[grid.to_id(grid.cell(0.0, -140.0, 8))]
    for row in (biscay, pacific):
        assert row["status"] == "land_data" and not row["land"] and row["images"] == 1
    assert biscay["country"] == "France" and pacific["country"] == ""


def test_coverage_without_a_manifest_leaves_the_workspace_alone(ws, geo_cache):
    t = geography.coverage_table(ws, 2)
    assert (t["images"] == 0).all() and geography.status_counts(t)["land_data"] == 0
    assert not ws.has_manifest()


def test_image_counts_beyond_the_manifest_level(ws):
    add_images(ws, [(48.86, 2.35), (48.86, 2.35001), (52.52, 13.40)])
    keys, counts = geography.image_counts(ws, 9)
    expect = np.unique(grid.encode([48.86, 52.52], [2.35, 13.40], 9))
    assert keys.tolist() == expect.tolist() and sorted(counts.tolist()) == [1, 2]
