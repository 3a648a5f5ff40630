"""Trivial baselines: what a model must beat to have learned anything about place.

Every evaluation scores these on the same images as the model:

- ``constant``: every image at the training set's geometric median (the point that
  minimises the sum of great-circle distances to the training images) — the best single
  guess for the median error;
- ``prior``: every image at the mean position of the training images of the most populous
  finest cell (what a classifier that ignores the pixels would answer);
- ``random_land``: points uniform by area on land (Natural Earth), fixed seed.

Without a training set, the first two are computed on the truth set itself (which flatters
them: they peek at the answers) and their ``note`` says so.

>>> lat, lon = geometric_median([10.0, 10.0, 10.0, -40.0], [20.0, 20.0, 20.0, 100.0])
>>> round(lat, 3), round(lon, 3)
(10.0, 20.0)
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from geohier import geodesy, grid


def geometric_median(lat, lon, weights=None, iterations: int = 200, tol: float = 1e-12) -> tuple[float, float]:
    """The spherical geometric median (Weiszfeld's iteration on unit vectors, projected
    back onto the sphere each step; it starts at the spherical mean)."""
    xyz = geodesy.unit_vectors(lat, lon).reshape(-1, 3)
    if xyz.shape[0] == 0:
        return float("nan"), float("nan")
    w = np.ones(len(xyz)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    m = (xyz * w[:, None]).sum(0)
    m = m / np.linalg.norm(m) if np.linalg.norm(m) > 1e-12 else xyz[0]
    for _ in range(iterations):
        d = np.arccos(np.clip(xyz @ m, -1.0, 1.0))  # (N,) angular distances
        at = d < 1e-12
        if at.any() and w[at].sum() >= w[~at].sum():
            break  # the median sits on a point that holds half the weight
        inv = np.where(at, 0.0, w / np.maximum(d, 1e-12))
        new = (xyz * inv[:, None]).sum(0)
        norm = np.linalg.norm(new)
        if norm < 1e-12:
            break
        new /= norm
        if np.linalg.norm(new - m) < tol:
            m = new
            break
        m = new
    la, lo = geodesy.to_latlon(m)
    return float(la), float(lo)


def prior_point(lat, lon, level: int = 8) -> tuple[float, float]:
    """The spherical mean of the images in the most populous cell of ``level``."""
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    if lat.size == 0:
        return float("nan"), float("nan")
    keys = grid.encode(lat, lon, level)
    uniq, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    top = np.argmax(counts)  # ties: the lowest key, deterministic
    m = inv == top
    return geodesy.spherical_mean(lat[m], lon[m])


@lru_cache(maxsize=1)
def _land_tree():
    import shapely

    from geohier import geography

    return shapely.STRtree(geography.countries().geoms)


def random_land(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform by area on land (Natural Earth countries), reproducible for a seed."""
    import shapely

    tree = _land_tree()
    rng = np.random.default_rng(seed)
    out_lat, out_lon, have = [], [], 0
    while have < n:
        k = max(1024, 4 * (n - have))  # land is ~29% of the sphere
        lon = rng.uniform(-180.0, 180.0, k)
        lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, k)))  # uniform by area
        hits = tree.query(shapely.points(lon, lat), predicate="intersects")[0]
        on = np.zeros(k, bool)
        on[hits] = True
        out_lat.append(lat[on])
        out_lon.append(lon[on])
        have += int(on.sum())
    return np.concatenate(out_lat)[:n], np.concatenate(out_lon)[:n]


def predictions(truth_lat, truth_lon, train_lat=None, train_lon=None, *, level: int = 8,
                seed: int = 0) -> dict[str, dict]:
    """Each baseline's guesses for the truth images: ``{name: {"lat", "lon", "note"}}``."""
    truth_lat, truth_lon = np.asarray(truth_lat, np.float64), np.asarray(truth_lon, np.float64)
    n = truth_lat.size
    has_train = train_lat is not None and len(train_lat) > 0
    src_lat, src_lon = (train_lat, train_lon) if has_train else (truth_lat, truth_lon)
    src = "the training set" if has_train else "the truth set itself (no training set: it peeks at the answers)"
    med = geometric_median(src_lat, src_lon)
    pri = prior_point(src_lat, src_lon, level)
    rl, ro = random_land(n, seed)
    return {
        "constant": {"lat": np.full(n, med[0]), "lon": np.full(n, med[1]),
                     "note": f"geometric median of {src} at {med[0]:.2f}, {med[1]:.2f}"},
        "prior": {"lat": np.full(n, pri[0]), "lon": np.full(n, pri[1]),
                  "note": f"mean of the most populous L{level} cell of {src}"},
        "random_land": {"lat": rl, "lon": ro, "note": f"uniform on land, seed {seed}"},
    }
