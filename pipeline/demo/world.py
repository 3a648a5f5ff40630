"""Sampling the demo world: where and when each image is taken, and what its place is like.

Drives start near real populated places (the GeoNames cities of ``geohier.places``),
weighted by population and a per-country coverage factor, jittered and kept on
land; each drive is a burst of 1-8 images. The planet (climate and biome fields, country
style cues) is fixed by ``WORLD_SEED``; the build's seed draws the drives. Chunks of
drives are seeded by ``(seed, chunk)``, so a world is prefix-stable (see ``sample_world``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import numpy as np

from geohier import geodesy, grid, places

DEFAULT_SEED = 0

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


def _hash_seed(*parts) -> int:
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


@lru_cache(maxsize=1)
def _sampling_table() -> tuple[np.ndarray, np.ndarray, dict[str, tuple[float, float]]]:
    """(place indices, cumulative weights, country -> population-weighted centroid)."""
    p = places.places()
    keep = np.flatnonzero(p.population >= MIN_POPULATION)
    codes, inv = np.unique(p.country_code[keep].astype("<U2"), return_inverse=True)
    coverage = np.array([math.exp(COUNTRY_COVERAGE_SIGMA * np.random.default_rng(
        _hash_seed("coverage", WORLD_SEED, c)).standard_normal()) for c in codes])
    w = p.population[keep].astype(np.float64) ** POP_ALPHA * coverage[inv]
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    # Country centroids (weighted by population, on the unit sphere) for regional styles.
    pw = p.population[keep].astype(np.float64)
    xyz = geodesy.unit_vectors(p.lat[keep], p.lon[keep]) * pw[:, None]
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
    centres = geodesy.unit_vectors(table[:, 0], table[:, 1])                           # (B, 3)
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
    xyz = geodesy.unit_vectors(lat, lon)
    zonal = np.interp(np.abs(lat), _ZONAL_T[0], _ZONAL_T[1])
    temp = zonal + 3.0 * _wave_field(xyz, 0) + _blobs(xyz, _COLD)
    a = np.abs(lat)
    moist = (0.55 + 0.3 * np.exp(-((lat - 3) / 11) ** 2) - 0.3 * np.exp(-((a - 25) / 9) ** 2)
             + 0.1 * np.exp(-((a - 52) / 12) ** 2) - 0.15 * np.exp(-((a - 80) / 10) ** 2)
             + 0.12 * _wave_field(xyz, 1) + _blobs(xyz, _DRY))
    relief = np.clip(0.12 + 0.12 * _wave_field(xyz, 2) + _blobs(xyz, _RELIEF), 0, 1)
    return {"temperature": temp, "moisture": np.clip(moist, 0, 1), "relief": relief}


# Biome prototypes in (temperature, moisture); their colours are the renderer's.
_PROTO = np.array([(24, 0.06), (15, 0.33), (8, 0.56), (-6, 0.42), (-16, 0.5), (25, 0.8)])


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
SIGN_SHAPES = ("circle", "triangle", "diamond", "rect", "octagon")


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
    sign_weights: tuple[float, ...]  # over SIGN_SHAPES
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


def _sample_chunk(seed: int, chunk: int) -> dict[str, np.ndarray]:
    """DRIVES_PER_CHUNK drives (all their images), from an RNG seeded by (seed, chunk)."""
    rng = np.random.default_rng([seed, 0x5EED, chunk])
    p = places.places()
    keep, cdf, _ = _sampling_table()
    d = DRIVES_PER_CHUNK
    city = keep[np.minimum(np.searchsorted(cdf, rng.random(d), side="right"), len(keep) - 1)]
    length = rng.choice(np.arange(1, 9), size=d, p=BURST_WEIGHTS / BURST_WEIGHTS.sum())
    pop = p.population[city].astype(np.float64)
    sigma = np.clip(1.0 * (pop / 1e4) ** 0.3, 0.8, 12.0)              # km
    clat, clon = p.lat[city], p.lon[city]
    # Truncated Rayleigh offsets (at 2.5 sigma), redrawn while they leave the land proxy.
    lat0, lon0, r = clat.copy(), clon.copy(), np.zeros(d)
    todo = np.arange(d)
    for _ in range(8):
        u = rng.random(len(todo))
        rr = sigma[todo] * np.sqrt(-2 * np.log(1 - u * (1 - math.exp(-2.5**2 / 2))))
        la, lo = geodesy.destination(clat[todo], clon[todo], rng.uniform(0, 360, len(todo)), rr)
        _, dist = places.nearest(la, lo)
        ok = dist <= LAND_KM
        lat0[todo[ok]], lon0[todo[ok]], r[todo[ok]] = la[ok], lo[ok], rr[ok]
        todo = todo[~ok]
        if not len(todo):
            break
    # Whatever still wanders stays near the centre (cities are on land).
    if len(todo):
        lat0[todo], lon0[todo] = geodesy.destination(clat[todo], clon[todo], rng.uniform(0, 360, len(todo)),
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
        "country": p.country_code[city[drive]].astype("<U2"),
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
