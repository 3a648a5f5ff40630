"""geohier.grid: known points pin the digit order; hypothesis round-trips; edges; errors."""

import doctest
import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from geohier import geodesy, grid
from geohier.errors import CellIdError, GeohierError, InvalidCoordinateError, InvalidLevelError


def test_doctests():
    result = doctest.testmod(grid)
    assert result.failed == 0 and result.attempted > 30


@pytest.mark.parametrize(
    "lat, lon, level, expected",
    [
        (-33.92, 18.42, 1, "3"),          # Cape Town: SE
        (40.71, -74.01, 1, "0"),          # New York: NW
        (40.71, -74.01, 3, "0/3/0"),
        (51.5, -0.12, 1, "0"),            # London is just west of Greenwich
        (51.5, 0.12, 1, "1"),             # ... and the City east of it
        (-22.9, -43.2, 1, "2"),           # Rio de Janeiro: SW
        (35.68, 139.69, 2, "1/3"),        # Tokyo: NE, then SE of that quadrant
    ],
)
def test_known_points(lat, lon, level, expected):
    assert grid.to_id(grid.cell(lat, lon, level)) == expected


def test_edges():
    assert grid.cell(90, 0, 3).row == 0
    assert grid.cell(-90, 0, 3).row == 7
    assert grid.cell(0, 180, 3) == grid.cell(0, -180, 3)
    assert grid.cell(0, 180, 3).col == 0
    assert grid.cell(0, 540, 2) == grid.cell(0, -180, 2)          # any finite lon wraps
    assert grid.cell(0, -180.0000001, 2).col == 3                 # just west of the antimeridian
    assert grid.cell(0.0, 0.0, 1) == grid.Cell(1, 0, 1)           # a cell owns its south and west edges
    assert grid.cell(45.0, -90.0, 2) == grid.Cell(2, 0, 1)        # on both edges: the cell N and E of them
    assert grid.bounds(grid.Cell(8, 0, 0)) == pytest.approx((-180, 89.296875, -178.59375, 90))


@pytest.mark.parametrize("lat, lon", [(91, 0), (-90.5, 0), (float("nan"), 0), (0, float("inf")), ("x", 0)])
def test_invalid_points_name_the_value(lat, lon):
    with pytest.raises(InvalidCoordinateError) as info:
        grid.cell(lat, lon, 3)
    assert str(lat)[:3] in str(info.value) or str(lon)[:3] in str(info.value)


def test_invalid_points_vectorised():
    with pytest.raises(InvalidCoordinateError, match="point 1"):
        grid.encode([0, 95, 0], [0, 0, 0], 3)
    assert grid.valid_points([0, 95, np.nan, -90], [0, 0, 0, 180]).tolist() == [True, False, False, True]


@pytest.mark.parametrize("level", [0, -1, 25, 2.5, "3", None, True])
def test_invalid_levels(level):
    with pytest.raises(InvalidLevelError, match=repr(level).replace("(", r"\(").replace(")", r"\)")):
        grid.cell(0, 0, level)


@pytest.mark.parametrize("bad", ["", "4", "0/4", "0//1", "/0/1", "0/1/", "a", "01x", None, 12])
def test_malformed_ids(bad):
    with pytest.raises(CellIdError) as info:
        grid.from_id(bad)
    assert repr(bad) in str(info.value)
    assert isinstance(info.value, GeohierError)


def test_levels_parsing():
    assert grid.parse_levels("1,3,5,8") == (1, 3, 5, 8)
    for bad in ("3,1", "1,1", "a,b", ""):
        with pytest.raises(InvalidLevelError):
            grid.parse_levels(bad)


def test_compact_and_slash_ids_agree():
    assert grid.from_id("01230112") == grid.from_id("0/1/2/3/0/1/1/2")
    assert grid.to_id(grid.from_id("01230112"), sep="") == "01230112"


def test_area_sums_to_earth():
    total = sum(grid.area_km2(c) for c in (grid.from_key(k, 2) for k in range(16)))
    assert total == pytest.approx(4 * math.pi * 6371.0**2, rel=1e-9)  # geodesy's one radius
    assert geodesy.EARTH_RADIUS_KM == 6371.0
    assert grid.area_km2(grid.Cell(1, 0, 0)) == pytest.approx(127_516_118.0, abs=1.0)  # pi R^2
    keys = grid.all_cells(5)
    assert grid.key_areas_km2(keys, 5).sum() == pytest.approx(total, rel=1e-9)


def test_children_ancestors():
    c = grid.from_id("2/1/3")
    assert [grid.to_id(x) for x in grid.children(c)] == ["2/1/3/0", "2/1/3/1", "2/1/3/2", "2/1/3/3"]
    assert [grid.to_id(a) for a in grid.ancestors(c)] == ["2", "2/1"]
    with pytest.raises(InvalidLevelError):
        grid.parent(grid.from_id("2"))


def test_vectorised_matches_scalar():
    rng = np.random.default_rng(0)
    lat = rng.uniform(-90, 90, 500)
    lon = rng.uniform(-180, 180, 500)
    keys = grid.encode(lat, lon, [1, 3, 5, 8])
    for i in range(0, 500, 37):
        for lv in (1, 3, 5, 8):
            assert grid.from_key(int(keys[lv][i]), lv) == grid.cell(lat[i], lon[i], lv)
    ids = grid.keys_to_ids(keys[8], 8)
    back, level = grid.ids_to_keys(ids)
    assert level == 8 and np.array_equal(back, keys[8])
    assert grid.keys_to_ids(keys[8][:3], 8, sep="")[0] == ids[0].replace("/", "")
    clat, clon = grid.key_centroids(keys[5], 5)
    assert np.array_equal(grid.encode(clat, clon, 5), keys[5])


cells = st.integers(1, 12).flatmap(
    lambda lv: st.tuples(st.just(lv), st.integers(0, (1 << lv) - 1), st.integers(0, (1 << lv) - 1))
).map(lambda t: grid.Cell(*t))
points = st.tuples(st.floats(-90, 90), st.floats(-180, 180, exclude_max=True))


@given(cells)
@example(grid.Cell(1, 1, 1))
@example(grid.Cell(12, 4095, 4095))
def test_centroid_round_trip(c):
    assert grid.cell(*grid.centroid(c), c.level) == c
    assert grid.from_id(grid.to_id(c)) == c
    assert grid.from_key(grid.key(c), c.level) == c


@given(cells.filter(lambda c: c.level < 12))
def test_children_parents(c):
    kids = grid.children(c)
    assert len(set(kids)) == 4
    assert all(grid.parent(k) == c for k in kids)
    assert [grid.key(k) for k in kids] == [4 * grid.key(c) + d for d in range(4)]
    b = grid.bounds(c)
    kb = [grid.bounds(k) for k in kids]
    assert min(x.west for x in kb) == b.west and max(x.north for x in kb) == b.north


@given(points)
@example((90.0, 0.0))
@example((-90.0, 179.999))
def test_fine_id_starts_with_coarse_id(p):
    l8 = grid.to_id(grid.cell(*p, 8))
    l3 = grid.to_id(grid.cell(*p, 3))
    assert l8.startswith(l3 + "/")
    b = grid.bounds(grid.cell(*p, 8))
    assert b.south - 1e-9 <= p[0] <= b.north + 1e-9 and b.west - 1e-9 <= p[1] <= b.east + 1e-9


# Points on and next to every kind of edge: poles, equator, meridians of the finest level,
# the antimeridian from both sides, longitudes that need wrapping, values that round up.
EDGE_LAT = [90.0, -90.0, 0.0, -0.0, 45.0, 89.99999999999999, -89.99999999999999, 0.703125, -0.703125,
            1e-300, -1e-300, 33.3]
EDGE_LON = [-180.0, 180.0, 179.99999999999997, -179.99999999999997, 0.0, -90.0, 1.40625, -1.40625,
            540.0, -540.0001, 1e6, 360.0, 17.7]


def _reference_keys(lat, lon, level):
    rows, cols = grid.rowcol(lat, lon, level)
    return grid.rowcol_to_key(rows, cols, level)


@pytest.mark.parametrize("levels", [(1, 3, 5, 8), (2,), (12,), (10, 13), (1, 16, 24)])
def test_encode_matches_rowcol_on_edges_and_across_blocks(levels, monkeypatch):
    monkeypatch.setattr(grid, "ENCODE_BLOCK", 7)  # many blocks, a short last one
    lat, lon = (a.ravel() for a in np.meshgrid(EDGE_LAT, EDGE_LON))
    rng = np.random.default_rng(1)
    lat = np.concatenate([lat, rng.uniform(-90, 90, 300)])
    lon = np.concatenate([lon, rng.uniform(-400, 400, 300)])
    keys = grid.encode(lat, lon, levels)
    for lv in levels:
        assert keys[lv].dtype == np.int64
        assert np.array_equal(keys[lv], _reference_keys(lat, lon, lv)), lv


def test_encode_keeps_shapes_and_takes_empty_input():
    lat = np.array([[10.0, -10.0], [45.0, 90.0]])
    lon = np.array([[20.0, -20.0], [180.0, 0.0]])
    keys = grid.encode(lat, lon, [1, 8])
    assert keys[8].shape == (2, 2) and np.array_equal(keys[1], keys[8] >> 14)
    assert keys[8][1, 1] == grid.key(grid.cell(90.0, 0.0, 8))
    assert grid.encode(np.float64(-33.92), 18.42, 1).tolist() == 3
    empty = grid.encode([], [], [3, 5])
    assert empty[3].shape == (0,) and empty[5].dtype == np.int64
    with pytest.raises(InvalidCoordinateError, match="differ in shape"):
        grid.encode([0, 1], [0], 3)


def test_invalid_point_in_a_later_block_is_named(monkeypatch):
    monkeypatch.setattr(grid, "ENCODE_BLOCK", 4)
    lat = np.zeros(10)
    lon = np.zeros(10)
    lon[9] = np.nan
    with pytest.raises(InvalidCoordinateError, match=r"point 9 is invalid \(lat 0.0, lon nan\)"):
        grid.encode(lat, lon, [1, 3])
    lat[6] = -90.5
    with pytest.raises(InvalidCoordinateError, match="point 6 "):
        grid.encode(lat, lon, 3)


@given(points, st.integers(1, 24))
@example((90.0, 179.99999999999997), 24)
@example((-90.0, -180.0), 13)
def test_encode_agrees_with_cell(p, level):
    assert int(grid.encode([p[0]], [p[1]], level)[0]) == grid.key(grid.cell(*p, level))



@given(st.integers(min_value=1, max_value=12), st.lists(st.integers(min_value=0), min_size=1, max_size=40))
def test_compact_ids_to_keys_round_trips(level, raw):
    keys = np.array([k % 4**level for k in raw], dtype=np.int64)
    ids = grid.keys_to_ids(keys, level, sep="")
    np.testing.assert_array_equal(grid.compact_ids_to_keys(ids, level), keys)
    assert grid.compact_ids_to_keys(ids, level).tolist() == [grid.key(grid.from_id(i)) for i in ids]


@pytest.mark.parametrize("bad", [["01"], ["0123"], ["0a1"], ["0/1"], ["01é"]])
def test_compact_ids_to_keys_refuses_other_text(bad):
    with pytest.raises(CellIdError):
        grid.compact_ids_to_keys(bad, 3)
    assert grid.compact_ids_to_keys([], 3).tolist() == []
