"""Spatial de-duplication of images in metres: a candidate is kept only when no image
already known or kept lies within the radius (great-circle distance on geohier.geodesy's
sphere, as chords between unit vectors in a KD-tree)."""

from __future__ import annotations

import math
import threading

import numpy as np
from scipy.spatial import cKDTree

from geohier.geodesy import EARTH_RADIUS_KM, km_to_chord, unit_vectors


class Dedup:
    """Spatial de-duplication in metres on the unit sphere (chord distance), thread-safe.

    Points already known sit in a cKDTree; points reserved by this run sit in a small
    pending array, merged into the tree now and then. ``reserve`` claims a point when no
    live point lies within the radius; ``release`` gives the claim back (the thumbnail
    turned out unusable), so a neighbour can take its place.
    """

    REBUILD = 512

    def __init__(self, lat, lon, radius_m: float):
        self.radius_m = float(radius_m)
        # a radius past half the circumference covers the whole sphere
        self.chord = float(km_to_chord(min(self.radius_m / 1000.0, math.pi * EARTH_RADIUS_KM)))
        self._lock = threading.Lock()
        pts = unit_vectors(lat, lon).reshape(-1, 3)
        self._tree_pts = pts
        self._tree = cKDTree(pts) if len(pts) and self.radius_m > 0 else None
        self._dead: set[int] = set()           # tree indices released after a merge
        self._pending: dict[str, np.ndarray] = {}
        self._pending_arr: np.ndarray | None = None
        self._where: dict[str, int] = {}       # key -> tree index once merged

    def reserve(self, key: str, lat: float, lon: float) -> bool:
        if self.radius_m <= 0:
            return True
        p = unit_vectors(lat, lon).reshape(3)
        with self._lock:
            if self._tree is not None:
                near = self._tree.query_ball_point(p, self.chord)
                if any(i not in self._dead for i in near):
                    return False
            if self._pending:
                if self._pending_arr is None:
                    self._pending_arr = np.stack(list(self._pending.values()))
                if (np.linalg.norm(self._pending_arr - p, axis=1) <= self.chord).any():
                    return False
            self._pending[key] = p
            self._pending_arr = None
            if len(self._pending) >= self.REBUILD:
                self._merge()
            return True

    def release(self, key: str) -> None:
        if self.radius_m <= 0:
            return
        with self._lock:
            if self._pending.pop(key, None) is not None:
                self._pending_arr = None
            elif key in self._where:
                self._dead.add(self._where.pop(key))

    def _merge(self) -> None:
        keys = list(self._pending)
        start = len(self._tree_pts)
        self._tree_pts = np.concatenate([self._tree_pts, np.stack(list(self._pending.values()))])
        self._where.update({k: start + j for j, k in enumerate(keys)})
        self._tree = cKDTree(self._tree_pts)
        self._pending.clear()
        self._pending_arr = None

