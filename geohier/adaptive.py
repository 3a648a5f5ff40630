"""Adaptive cells (``labels --cells adaptive``): nested quadtree partitions whose classes
are cells of any depth, split while they hold enough images; a ``geohier.hierarchy.Hierarchy``
in format ``geohier-hierarchy/2``.

Design (``build_adaptive``): a class of adaptive level k is a quadtree cell of any depth
up to ``max_depth`` (default 16, ~600 x 300 m at the equator). Level k starts from the
cells of level k-1 (level 1 from the four depth-1 quadrants: the root is no class) and
splits each cell at its midpoint, again and again, while it holds at least N_k images and
is shallower than max_depth; children without images are dropped (no image, no class),
children with few images are KEPT, as OSV-5M keeps them: merging a small child back
would overlap its siblings, and keeping it is what labels every image at every level.
With N_1 > N_2 > ... every level refines the one above, so every class has one parent.
Every cell is a contiguous range of Morton keys at max_depth, so the counts are two
binary searches in the sorted keys, and labelling is one encode at max_depth plus a
binary search over the sorted range starts (``Hierarchy.labels``).
"""

from __future__ import annotations

import math

import numpy as np

from geohier import grid
from geohier.errors import GeohierError, InputError
from geohier.hierarchy import Hierarchy

ADAPTIVE_MAX_DEPTH = 16
ADAPTIVE_LEVELS = 4
# Class counts the default thresholds aim at, level by level: those of today's fixed
# levels 1, 3, 5 (4, 64, 1024) and a finest level of 16384.
ADAPTIVE_TARGETS = (4, 64, 1024, 16384)
ADAPTIVE_MIN_SPLIT = 20  # the defaults split no cell of fewer images (below: halve level by level)


def default_thresholds(images: int, levels: int = ADAPTIVE_LEVELS) -> list[int]:
    """Split thresholds N_1 > N_2 > ... for ``images`` images, aiming at the class counts
    of ``ADAPTIVE_TARGETS``: a split cell holds >= N and its children about N/4 each, so a
    level of threshold N has about 2 * images / N classes, hence N_k = 2 * images / T_k
    (at least ``ADAPTIVE_MIN_SPLIT``; a level whose threshold would not fall below the one
    above gets half of it, and the list stops where that reaches 1).

    >>> default_thresholds(100_000)
    [50000, 3125, 196, 20]
    >>> default_thresholds(200)
    [100, 20, 10, 5]
    """
    targets = list(ADAPTIVE_TARGETS[:levels]) + [ADAPTIVE_TARGETS[-1] * 16 ** i
                                                 for i in range(1, levels - len(ADAPTIVE_TARGETS) + 1)]
    out: list[int] = []
    for t in targets:
        n = max(ADAPTIVE_MIN_SPLIT, math.ceil(2 * max(int(images), 1) / t))
        if out and n >= out[-1]:
            n = out[-1] // 2
        if n < 1 or (out and n >= out[-1]):
            break
        out.append(n)
    return out or [1]


def parse_thresholds(spec) -> list[int]:
    """``"1000,100,10"`` (or a sequence of ints) as a strictly decreasing list of ints >= 1.

    >>> parse_thresholds("1000, 100,10")
    [1000, 100, 10]
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()] if isinstance(spec, str) else list(spec)
    try:
        out = [int(str(p).strip()) for p in parts]
    except ValueError:
        raise InputError(f"--thresholds must be whole numbers such as 1000,100,10, got {spec!r}") from None
    if not out:
        raise InputError(f"--thresholds is empty; give one number per level such as 1000,100,10, got {spec!r}")
    if any(v < 1 for v in out):
        raise InputError(f"--thresholds must be >= 1, got {spec!r}")
    if any(b >= a for a, b in zip(out, out[1:])):
        raise InputError(f"--thresholds must decrease level by level (each level splits finer), got {spec!r}")
    return out


def check_max_depth(value) -> int:
    """``value`` as a max depth (1-24), or InputError."""
    try:
        return grid.check_level(int(value))
    except (TypeError, ValueError, GeohierError):
        raise InputError(f"--max-depth must be a whole number from 1 to {grid.MAX_LEVEL}, got {value!r}") from None


def adaptive_partition(lat, lon, thresholds, max_depth: int = ADAPTIVE_MAX_DEPTH
                       ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per level, (keys at their own depth, depths, image counts) of the adaptive cells,
    in ascending (id) order; invalid points are ignored.

    >>> [(k.tolist(), d.tolist(), n.tolist()) for k, d, n in adaptive_partition(
    ...     [10, 10, 10, -40], [10, 10, 10, 20], [3], max_depth=2)]
    [([6, 3], [2, 1], [3, 1])]
    """
    thresholds = parse_thresholds(thresholds)
    big = check_max_depth(max_depth)
    lat = np.asarray(lat, dtype=np.float64).ravel()
    lon = np.asarray(lon, dtype=np.float64).ravel()
    if lat.shape != lon.shape:
        raise InputError(f"lat and lon differ in length: {lat.size} vs {lon.size}")
    ok = grid.valid_points(lat, lon)
    fine = np.sort(grid.encode(lat[ok], lon[ok], big))

    def count(k, d):
        shift = 2 * (big - d)
        return (np.searchsorted(fine, (k + 1) << shift) - np.searchsorted(fine, k << shift)).astype(np.int64)

    k = np.arange(4, dtype=np.int64)
    d = np.ones(4, dtype=np.int64)
    c = count(k, d)
    k, d, c = k[c > 0], d[c > 0], c[c > 0]
    out = []
    for n_split in thresholds:
        done_k, done_d, done_c = [], [], []
        while k.size:
            split = (c >= n_split) & (d < big)
            done_k.append(k[~split])
            done_d.append(d[~split])
            done_c.append(c[~split])
            ck = ((k[split] * 4)[:, None] + np.arange(4, dtype=np.int64)).ravel()
            cd = np.repeat(d[split] + 1, 4)
            cc = count(ck, cd)
            k, d, c = ck[cc > 0], cd[cc > 0], cc[cc > 0]
        k, d, c = np.concatenate(done_k), np.concatenate(done_d), np.concatenate(done_c)
        order = np.argsort(k << (2 * (big - d)), kind="stable")
        k, d, c = k[order], d[order], c[order]
        out.append((k, d, c))
    return out


def build_adaptive(lat, lon, thresholds=None, max_depth: int = ADAPTIVE_MAX_DEPTH) -> Hierarchy:
    """An adaptive hierarchy (levels named 1, 2, ... one per threshold) from image positions.

    ``thresholds`` default to ``default_thresholds`` of the number of valid points. Every
    valid point has a class at every level. Raises InputError when there are no valid points.

    >>> h = build_adaptive([10, 10, 10, -40], [10, 10, 10, 20], [4, 2], max_depth=2)
    >>> h.cells(1), h.cells(2), h.parents(2).tolist()
    (['1', '3'], ['1/2', '3'], [0, 1])
    """
    lat = np.asarray(lat, dtype=np.float64).ravel()
    lon = np.asarray(lon, dtype=np.float64).ravel()
    total = int(grid.valid_points(lat, lon).sum()) if lat.shape == lon.shape else 0
    if total == 0:
        raise InputError("no images with valid coordinates to build a hierarchy from")
    thresholds = parse_thresholds(default_thresholds(total) if thresholds is None else thresholds)
    parts = adaptive_partition(lat, lon, thresholds, max_depth)
    levels = list(range(1, len(parts) + 1))
    stats = {lv: {"cells_with_images": int(k.size), "dropped": 0, "images_kept": int(c.sum()),
                  "max_depth_reached": int(d.max()) if d.size else 0}
             for lv, (k, d, c) in zip(levels, parts, strict=True)}
    return Hierarchy(levels, {lv: p[0] for lv, p in zip(levels, parts, strict=True)},
                     {lv: p[2] for lv, p in zip(levels, parts, strict=True)}, images=total, stats=stats,
                     depths={lv: p[1] for lv, p in zip(levels, parts, strict=True)},
                     scheme={"thresholds": dict(zip(levels, thresholds, strict=True)), "max_depth": max_depth})


def adaptive_summary(lat, lon, thresholds=None, max_depth: int = ADAPTIVE_MAX_DEPTH) -> list[dict]:
    """Per level of the partition ``build_adaptive`` would make: level, threshold, classes,
    images, images without a class, depth range, smallest/median/largest class, Gini.
    The Data page previews a partition with it before writing it."""
    from geohier.charts import gini

    h = build_adaptive(lat, lon, thresholds, max_depth)
    valid = int(grid.valid_points(np.asarray(lat, float).ravel(), np.asarray(lon, float).ravel()).sum())
    rows = []
    for lv in h.levels:
        n, d = h.counts(lv), h.depths(lv)
        rows.append({"level": lv, "threshold": h.scheme["thresholds"][lv], "classes": int(n.size),
                     "images": valid, "without_class": int(valid - n.sum()),
                     "min_depth": int(d.min()), "max_depth": int(d.max()),
                     "smallest": int(n.min()), "median": float(np.median(n)), "largest": int(n.max()),
                     "gini": round(float(gini(n)), 4)})
    return rows
