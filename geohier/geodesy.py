"""Distances and directions on the sphere: the one place that knows the Earth's radius.

Every distance in geohier is a great-circle distance on a sphere of radius
``EARTH_RADIUS_KM`` = 6371 km, the value the geolocation benchmarks use (OSV-5M's
evaluation, Im2GPS3k / YFCC4k papers, PIGEON), so that a score computed here is the score
a paper would print. Areas, de-duplication radii and haversine label smoothing use the
same radius.

Arrays broadcast like numpy ufuncs; angles are degrees at the doors, radians inside.

>>> round(float(haversine_km(0, 0, 0, 1)), 3)
111.195
>>> lat, lon = spherical_mean([10, -10], [20, 20])
>>> round(lat, 6), round(lon, 6)
(0.0, 20.0)
"""

from __future__ import annotations

import numpy as np

EARTH_RADIUS_KM = 6371.0
EARTH_RADIUS_M = EARTH_RADIUS_KM * 1000.0


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km between (lat1, lon1) and (lat2, lon2), in degrees.

    The haversine formula on radians with R = 6371 km (OSV-5M's ``haversine``).

    >>> round(float(haversine_km(0, 0, 0, 180)), 1)
    20015.1
    """
    la1, lo1, la2, lo2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
    a = np.sin((la2 - la1) / 2) ** 2 + np.cos(la1) * np.cos(la2) * np.sin((lo2 - lo1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def unit_vectors(lat, lon) -> np.ndarray:
    """Points as unit vectors on the sphere, shape ``(..., 3)`` (x towards lon 0, z north).

    Euclidean distances between unit vectors are chords: a KD-tree over them finds
    great-circle neighbours (``chord_to_km`` / ``km_to_chord`` convert radii).
    """
    la = np.radians(np.asarray(lat, dtype=np.float64))
    lo = np.radians(np.asarray(lon, dtype=np.float64))
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def to_latlon(xyz) -> tuple[np.ndarray, np.ndarray]:
    """Degrees (lat, lon) of vectors ``(..., 3)``; they need not be unit length."""
    xyz = np.asarray(xyz, dtype=np.float64)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    return np.degrees(np.arctan2(z, np.hypot(x, y))), np.degrees(np.arctan2(y, x))


def spherical_mean(lat, lon, weights=None) -> tuple[float, float]:
    """The (weighted) mean direction of points, in degrees: the normalised sum of their
    unit vectors. Unlike the mean of the coordinates it is right across the antimeridian.
    Points whose vectors cancel out (antipodes) have no mean: (nan, nan)."""
    xyz = unit_vectors(lat, lon).reshape(-1, 3)
    w = np.ones(len(xyz)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    s = (xyz * w[:, None]).sum(axis=0)
    if not np.isfinite(s).all() or np.linalg.norm(s) < 1e-12:
        return float("nan"), float("nan")
    la, lo = to_latlon(s)
    return float(la), float(lo)


def km_to_chord(km) -> np.ndarray:
    """The chord length (on the unit sphere) of a great-circle distance in km."""
    return 2 * np.sin(np.asarray(km, dtype=np.float64) / (2 * EARTH_RADIUS_KM))


def chord_to_km(chord) -> np.ndarray:
    """The great-circle distance in km of a chord length on the unit sphere."""
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.clip(np.asarray(chord, dtype=np.float64) / 2, 0.0, 1.0))


def destination(lat, lon, bearing_deg, dist_km) -> tuple[np.ndarray, np.ndarray]:
    """The point ``dist_km`` from (lat, lon) along the initial bearing (degrees from north)."""
    la, lo = np.radians(np.asarray(lat, dtype=np.float64)), np.radians(np.asarray(lon, dtype=np.float64))
    b = np.radians(np.asarray(bearing_deg, dtype=np.float64))
    d = np.asarray(dist_km, dtype=np.float64) / EARTH_RADIUS_KM
    la2 = np.arcsin(np.sin(la) * np.cos(d) + np.cos(la) * np.sin(d) * np.cos(b))
    lo2 = lo + np.arctan2(np.sin(b) * np.sin(d) * np.cos(la), np.cos(d) - np.sin(la) * np.sin(la2))
    return np.degrees(la2), (np.degrees(lo2) + 540.0) % 360.0 - 180.0
