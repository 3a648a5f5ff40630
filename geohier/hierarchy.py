"""The label hierarchy: which grid cells are classes at each level, and how they nest.

A ``Hierarchy`` holds, for each level of a strictly increasing set (default 1, 3, 5, 8),
the sorted list of cells that became classes, their image counts, and for every class the
index of its parent class at the previous level. It is what ``data/hierarchy.json``
stores (format ``geohier-hierarchy/1``) and what training, evaluation and inference read.

Rules (``build_hierarchy``):

- a cell is a class at level ``k`` when it holds at least ``min_images[k]`` images;
- counts at every level are raw counts of the images inside the cell, so the images of a
  cell dropped at a fine level still count at the coarser levels;
- a cell whose parent cell (at the previous level of the hierarchy) was dropped is dropped
  too, so every parent index is valid and the -1 labels of an image form a suffix of
  its levels.

A level may end with 0 or 1 class (a small data set, a high minimum): building allows it
and ``Hierarchy.problems()`` lists it; training calls ``Hierarchy.check_trainable()``,
which refuses with an InputError naming the level and suggesting a lower --min-images.

Splits (``assign_splits``) are drawn by groups so that near-duplicates never straddle
train/val/test: the group is the capture sequence when known, else a ~1 km grid bucket
(level ``SPLIT_BUCKET_LEVEL``); buckets that hold points closer than ``link_m`` across
their shared edge are merged so that two photos 100 m apart never land in different
splits because a bucket edge runs between them.

Examples
--------
>>> h = build_hierarchy([10, 11, -40], [10, 11, 20], [1, 2], min_images=1)
>>> h.num_classes
{1: 2, 2: 2}
>>> h.cells(2), h.parents(2).tolist()
(['1/2', '3/0'], [0, 1])
>>> {lv: a.tolist() for lv, a in h.labels([10.5], [10.5]).items()}
{1: [0], 2: [0]}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from geohier import grid
from geohier.errors import GeohierError, InputError, InvalidLevelError
from geohier.workspace import atomic_write_text, utcnow

FORMAT = "geohier-hierarchy/1"
# Adaptive cells are written as /2 so that a geohier that predates them refuses the file
# with one line naming its format instead of failing on cell ids of mixed depths; /1 files
# (fixed levels) are written and read exactly as before.
FORMAT_ADAPTIVE = "geohier-hierarchy/2"
DEFAULT_MIN_IMAGES = 5


# --------------------------------------------------------------------------- min images


def parse_min_images(spec, levels: Sequence[int], default: int = DEFAULT_MIN_IMAGES) -> dict[int, int]:
    """The per-level minimum image count from an int, a mapping, or CLI text.

    Text is ``"5"`` (every level), ``"1:1,3:5,8:10"`` (per level; unnamed levels get
    ``default``), or a mix: ``"5,8:20"`` (5 everywhere except level 8).

    >>> parse_min_images("1:1,8:10", [1, 3, 8])
    {1: 1, 3: 5, 8: 10}
    >>> parse_min_images(3, [1, 2])
    {1: 3, 2: 3}
    """
    levels = grid.check_levels(levels)
    out = dict.fromkeys(levels, default)
    if spec is None:
        pass
    elif isinstance(spec, Mapping):
        for lv, n in spec.items():
            out[_min_level(lv, levels, spec)] = _min_value(n, spec)
    elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        out = dict.fromkeys(levels, _min_value(spec, spec))
    elif isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if not parts:
            raise InputError(f"--min-images is empty; give N or LEVEL:N pairs such as 1:1,3:5, got {spec!r}")
        for part in (p for p in parts if ":" not in p):  # plain numbers set the default first
            out = dict.fromkeys(levels, _min_value(part, spec))
        for part in (p for p in parts if ":" in p):
            lv, _, n = part.partition(":")
            out[_min_level(lv, levels, spec)] = _min_value(n, spec)
    else:
        raise InputError(f"min_images must be an int, a {{level: n}} mapping or text like '1:1,3:5', got {spec!r}")
    return out


def _min_level(lv, levels, spec) -> int:
    try:
        lv = int(str(lv).strip())
    except ValueError:
        raise InputError(f"min-images names level {lv!r}, not an integer, in {spec!r}") from None
    if lv not in levels:
        raise InputError(f"min-images names level {lv}, which is not among the levels {list(levels)} ({spec!r})")
    return lv


def _min_value(n, spec) -> int:
    try:
        v = int(str(n).strip())
    except ValueError:
        raise InputError(f"min-images must be whole numbers >= 1, got {n!r} in {spec!r}") from None
    if v < 1:
        raise InputError(f"min-images must be >= 1, got {v} in {spec!r}")
    return v


# --------------------------------------------------------------------------- selection


def cell_counts(lat, lon, levels: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per level, (keys ascending, image counts) of the cells holding at least one point.

    Points that are not valid coordinates are ignored.

    >>> {lv: (k.tolist(), n.tolist()) for lv, (k, n) in cell_counts([10, 11, -40], [10, 11, 20], [1]).items()}
    {1: ([1, 3], [2, 1])}
    """
    levels = grid.check_levels(levels)
    lat = np.asarray(lat, dtype=np.float64).ravel()
    lon = np.asarray(lon, dtype=np.float64).ravel()
    if lat.shape != lon.shape:
        raise InputError(f"lat and lon differ in length: {lat.size} vs {lon.size}")
    ok = grid.valid_points(lat, lon)
    keys = grid.encode(lat[ok], lon[ok], list(levels))
    out = {}
    for lv in levels:
        k, n = np.unique(keys[lv], return_counts=True)
        out[lv] = (k.astype(np.int64), n.astype(np.int64))
    return out


def select_classes(counts: Mapping[int, tuple[np.ndarray, np.ndarray]],
                   min_images) -> dict[int, np.ndarray]:
    """Which cells become classes: per level, a boolean mask over ``counts[level][0]``.

    ``counts`` is ``cell_counts``' result (or ``Manifest.count_keys`` per level); a cell is
    kept when its count reaches the level's minimum and its parent cell at the previous
    level is kept. Cheap: the page calls it on every slider move.

    >>> c = {1: (np.array([0, 1]), np.array([5, 1])), 2: (np.array([0, 1, 4]), np.array([4, 1, 1]))}
    >>> {lv: m.tolist() for lv, m in select_classes(c, 2).items()}
    {1: [True, False], 2: [True, False, False]}
    """
    levels = grid.check_levels(sorted(counts))
    mins = parse_min_images(min_images, levels)
    out: dict[int, np.ndarray] = {}
    prev_lv = prev_kept = None
    for lv in levels:
        keys, n = (np.asarray(a, dtype=np.int64) for a in counts[lv])
        keep = n >= mins[lv]
        if prev_lv is not None:
            keep &= _lookup(prev_kept, keys >> (2 * (lv - prev_lv))) >= 0
        out[lv] = keep
        prev_lv, prev_kept = lv, keys[keep]
    return out


def kept_summary(counts: Mapping[int, tuple[np.ndarray, np.ndarray]], min_images) -> list[dict]:
    """Per level: min_images, cells with images, classes kept and dropped, images kept.

    >>> c = {1: (np.array([0, 1]), np.array([5, 1]))}
    >>> kept_summary(c, 2)[0]["classes"], kept_summary(c, 2)[0]["images_kept"]
    (1, 5)
    """
    levels = grid.check_levels(sorted(counts))
    mins = parse_min_images(min_images, levels)
    masks = select_classes(counts, mins)
    rows = []
    for lv in levels:
        n = np.asarray(counts[lv][1], dtype=np.int64)
        m = masks[lv]
        total = int(n.sum())
        rows.append({"level": lv, "min_images": mins[lv], "cells_with_images": int(n.size),
                     "classes": int(m.sum()), "dropped": int((~m).sum()), "images": total,
                     "images_kept": int(n[m].sum()),
                     "share_kept": float(n[m].sum() / total) if total else 0.0})
    return rows


# --------------------------------------------------------------------------- hierarchy


class Hierarchy:
    """Classes per level (sorted cell keys), their image counts and parent indices.

    Build one with ``build_hierarchy`` or read one with ``Hierarchy.load``; it is immutable
    in practice (the arrays are read-only).
    """

    def __init__(self, levels: Sequence[int], keys: Mapping[int, np.ndarray],
                 counts: Mapping[int, np.ndarray] | None = None, min_images=None,
                 splits: Mapping | None = None, created_at: str | None = None,
                 images: int | None = None, stats: Mapping | None = None,
                 depths: Mapping[int, np.ndarray] | None = None, scheme: Mapping | None = None):
        self.levels: tuple[int, ...] = grid.check_levels(levels)
        missing = [lv for lv in self.levels if lv not in keys]
        if missing:
            raise InputError(f"the hierarchy lacks classes for level(s) {missing}")
        self._keys: dict[int, np.ndarray] = {}
        self._counts: dict[int, np.ndarray] = {}
        self._parents: dict[int, np.ndarray] = {}
        self._depths: dict[int, np.ndarray] = {}
        self.adaptive: bool = depths is not None
        self.scheme: dict | None = None
        self.max_depth: int | None = None
        if self.adaptive:
            self._init_adaptive(keys, counts, depths, scheme or {})
        prev = None
        for lv in self.levels if not self.adaptive else ():
            k = np.asarray(keys[lv], dtype=np.int64).ravel()
            if k.size and (np.any(np.diff(k) <= 0) or k[0] < 0 or k[-1] >= 4**lv):
                raise InputError(f"level {lv}'s cells must be distinct level-{lv} cells in ascending order")
            c = (np.zeros(k.size, dtype=np.int64) if counts is None
                 else np.asarray(counts[lv], dtype=np.int64).ravel())
            if c.size != k.size:
                raise InputError(f"level {lv} has {k.size} cells but {c.size} counts")
            if prev is None:
                p = np.full(k.size, -1, dtype=np.int64)
            else:
                p = _lookup(self._keys[prev], k >> (2 * (lv - prev)))
                if np.any(p < 0):
                    orphan = grid.keys_to_ids(k[p < 0][:1], lv)[0]
                    raise InputError(f"level {lv}'s cell {orphan} has no parent class at level {prev}")
            d = np.full(k.size, lv, dtype=np.int64)
            for a in (k, c, p, d):
                a.setflags(write=False)
            self._keys[lv], self._counts[lv], self._parents[lv], self._depths[lv] = k, c, p, d
            prev = lv
        if self.adaptive:
            min_images = None  # a class of an adaptive level holds >= 1 image; the scheme has the thresholds
        self.min_images: dict[int, int] = (parse_min_images(min_images, self.levels)
                                           if min_images is not None else dict.fromkeys(self.levels, 1))
        self.splits: dict | None = dict(splits) if splits else None
        self.created_at: str = created_at or utcnow()
        self.images: int = int(images) if images is not None else int(self._counts[self.levels[0]].sum())
        self.stats: dict = {int(k): dict(v) for k, v in (stats or {}).items()}
        self._hash: str | None = None

    def _init_adaptive(self, keys, counts, depths, scheme) -> None:
        # Classes are (key, depth) cells; each is the range [start, end) of keys at
        # max_depth, so sorted starts order the classes (= the ids' order, since the cells
        # of a level are disjoint), and a parent is the class of the level above whose range
        # holds the child's.
        try:
            self.max_depth = grid.check_level(int(scheme.get("max_depth", 0)))
            thresholds = {int(k): int(v) for k, v in (scheme.get("thresholds") or {}).items()}
        except (TypeError, ValueError, GeohierError):
            raise InputError("an adaptive hierarchy needs max_depth (1-24) and thresholds per level") from None
        if sorted(thresholds) != list(self.levels):
            raise InputError(f"an adaptive hierarchy needs a threshold for each level {list(self.levels)}, "
                             f"got {sorted(thresholds)}")
        self.scheme = {"cells": "adaptive", "thresholds": thresholds, "max_depth": self.max_depth}
        self._starts: dict[int, np.ndarray] = {}
        self._ends: dict[int, np.ndarray] = {}
        big = self.max_depth
        prev = None
        for lv in self.levels:
            k = np.asarray(keys[lv], dtype=np.int64).ravel()
            d = np.asarray(depths[lv], dtype=np.int64).ravel()
            c = (np.zeros(k.size, dtype=np.int64) if counts is None
                 else np.asarray(counts[lv], dtype=np.int64).ravel())
            if not (d.size == k.size == c.size):
                raise InputError(f"level {lv} has {k.size} cells, {d.size} depths and {c.size} counts")
            if d.size and (d.min() < 1 or d.max() > big):
                raise InputError(f"level {lv}'s cells must be of depth 1 to {big}")
            if k.size and (k.min() < 0 or np.any(k >= 4 ** d)):
                raise InputError(f"level {lv} has a key outside its cell's depth")
            shift = 2 * (big - d)
            start, end = k << shift, (k + 1) << shift
            if k.size and np.any(end[:-1] > start[1:]):
                raise InputError(f"level {lv}'s cells must be disjoint and in ascending order")
            if prev is None:
                p = np.full(k.size, -1, dtype=np.int64)
            else:
                ps, pe = self._starts[prev], self._ends[prev]
                p = np.searchsorted(ps, start, side="right").astype(np.int64) - 1
                bad = (p < 0) | (end > pe[np.maximum(p, 0)]) if ps.size else np.ones(k.size, bool)
                if np.any(bad):
                    i = int(np.flatnonzero(bad)[0])
                    orphan = grid.depth_ids(k[i:i + 1], d[i:i + 1])[0]
                    raise InputError(f"level {lv}'s cell {orphan} has no parent class at level {prev}")
            for a in (k, c, p, d, start, end):
                a.setflags(write=False)
            self._keys[lv], self._counts[lv], self._parents[lv], self._depths[lv] = k, c, p, d
            self._starts[lv], self._ends[lv] = start, end
            prev = lv

    def __repr__(self) -> str:
        return f"Hierarchy(levels={list(self.levels)}, num_classes={self.num_classes}, hash={self.hash[:12]})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Hierarchy) and self.hash == other.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    # ---------------------------------------------------------------- per level

    def _check(self, level) -> int:
        lv = grid.check_level(level)
        if lv not in self._keys:
            raise InvalidLevelError(f"level {lv} is not in this hierarchy's levels {list(self.levels)}")
        return lv

    def keys(self, level: int) -> np.ndarray:
        """Int64 grid keys of the level's classes (class index = position), each read at
        its cell's depth (``depths``): with fixed levels every depth is the level and the
        keys ascend; with adaptive cells pair them with ``depths`` (or use ``bounds``,
        ``centroids``, ``areas_km2``, which work for both)."""
        return self._keys[self._check(level)]

    def depths(self, level: int) -> np.ndarray:
        """Per class, the depth of its cell (the level itself with fixed levels)."""
        return self._depths[self._check(level)]

    def cells(self, level: int) -> list[str]:
        """Cell ids ("0/1/2") of the level's classes, in class-index order."""
        lv = self._check(level)
        if self.adaptive:
            return grid.depth_ids(self._keys[lv], self._depths[lv])
        return grid.keys_to_ids(self._keys[lv], lv)

    def bounds(self, level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """West, south, east, north arrays of the level's class cells (any depth)."""
        lv = self._check(level)
        return grid.depth_bounds(self._keys[lv], self._depths[lv])

    def areas_km2(self, level: int) -> np.ndarray:
        """Spherical area in km² of each class cell of the level (any depth)."""
        lv = self._check(level)
        return grid.depth_areas_km2(self._keys[lv], self._depths[lv])

    def counts(self, level: int) -> np.ndarray:
        """Images per class at build time (int64)."""
        return self._counts[self._check(level)]

    def parents(self, level: int) -> np.ndarray:
        """Per class, the index of its parent class at the previous level (-1 at the first)."""
        return self._parents[self._check(level)]

    @property
    def num_classes(self) -> dict[int, int]:
        return {lv: int(self._keys[lv].size) for lv in self.levels}

    def previous(self, level: int) -> int | None:
        """The level before ``level`` in this hierarchy, or None for the first."""
        i = self.levels.index(self._check(level))
        return self.levels[i - 1] if i else None

    def next(self, level: int) -> int | None:
        """The level after ``level`` in this hierarchy, or None for the last."""
        i = self.levels.index(self._check(level))
        return self.levels[i + 1] if i + 1 < len(self.levels) else None

    def lookup(self, level: int, keys) -> np.ndarray:
        """Class indices of grid keys of ``level`` (int64, -1 where the cell is no class).

        With adaptive cells the keys are read at ``max_depth`` and the answer is the class
        whose cell holds each of them."""
        lv = self._check(level)
        keys = np.asarray(keys, dtype=np.int64)
        if not self.adaptive:
            return _lookup(self._keys[lv], keys)
        starts, ends = self._starts[lv], self._ends[lv]
        if not starts.size:
            return np.full(keys.shape, -1, dtype=np.int64)
        i = np.searchsorted(starts, keys, side="right").astype(np.int64) - 1
        ok = (i >= 0) & (keys < ends[np.maximum(i, 0)])
        return np.where(ok, i, -1).astype(np.int64)

    def index(self, level: int, cell_id: str) -> int:
        """The class index of one cell id, or -1 when it is not a class.

        Raises InputError when the id is of another level."""
        c = grid.from_id(cell_id)
        lv = self._check(level)
        if self.adaptive:  # a class of any depth: the id must name the class's cell exactly
            i = int(self.lookup(lv, [grid.key(c) << (2 * (self.max_depth - c.level))])[0]) \
                if c.level <= self.max_depth else -1
            return i if i >= 0 and int(self._depths[lv][i]) == c.level else -1
        if c.level != lv:
            raise InputError(f"cell {cell_id!r} is of level {c.level}, not {lv}")
        return int(self.lookup(lv, [grid.key(c)])[0])

    def labels(self, lat, lon) -> dict[int, np.ndarray]:
        """Class index of every point at every level: {level: int64 array}.

        -1 where the point's cell was dropped at that level, and for points that are not
        valid coordinates (NaN, |lat| > 90).
        """
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        if lat.shape != lon.shape:
            raise InputError(f"lat and lon differ in shape: {lat.shape} vs {lon.shape}")
        ok = grid.valid_points(lat, lon)
        out = {lv: np.full(lat.shape, -1, dtype=np.int64) for lv in self.levels}
        if ok.any() and self.adaptive:  # encode once at max_depth, then a range search per level
            fine = grid.encode(lat[ok], lon[ok], self.max_depth)
            for lv in self.levels:
                out[lv][ok] = self.lookup(lv, fine)
        elif ok.any():
            keys = grid.encode(lat[ok], lon[ok], list(self.levels))
            for lv in self.levels:
                out[lv][ok] = _lookup(self._keys[lv], keys[lv])
        return out

    def centroids(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        """(lat, lon) arrays of the cell centres of the level's classes (any depth)."""
        lv = self._check(level)
        if self.adaptive:
            return grid.depth_centroids(self._keys[lv], self._depths[lv])
        return grid.key_centroids(self._keys[lv], lv)

    def ancestors(self, level: int, to_level: int) -> np.ndarray:
        """For each class of ``level``, the index of its ancestor class at the coarser
        ``to_level`` (both in this hierarchy; ``to_level == level`` gives arange)."""
        lv, to = self._check(level), self._check(to_level)
        if to > lv:
            raise InvalidLevelError(f"to_level {to} is finer than level {lv}")
        idx = np.arange(self._keys[lv].size, dtype=np.int64)
        cur = lv
        while cur != to:
            idx = self._parents[cur][idx]
            cur = self.previous(cur)
        return idx

    def child_index(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        """CSR children of the level's classes at the next level: (indptr, indices).

        The children of class ``i`` are ``indices[indptr[i]:indptr[i + 1]]`` (class
        indices at ``self.next(level)``). Because keys are sorted, children of one parent
        are contiguous, so ``indices`` is simply ``arange``. Masked inference uses this to
        keep only the children of the chosen coarse classes.
        """
        lv = self._check(level)
        nxt = self.next(lv)
        if nxt is None:
            raise InvalidLevelError(f"level {lv} is the finest level of this hierarchy; it has no children")
        parents = self._parents[nxt]
        indptr = np.searchsorted(parents, np.arange(self._keys[lv].size + 1), side="left").astype(np.int64)
        return indptr, np.arange(parents.size, dtype=np.int64)

    def children(self, level: int, index: int) -> np.ndarray:
        """Class indices at the next level whose parent is class ``index`` of ``level``."""
        indptr, indices = self.child_index(level)
        return indices[indptr[index]:indptr[index + 1]]

    def label_map(self, level: int) -> dict[str, int]:
        """The seed's label_map_L{k}: {cell id: class index}."""
        return {c: i for i, c in enumerate(self.cells(level))}

    def parent_map(self, level: int) -> dict[str, str]:
        """{cell id of a class at ``level``: cell id of its parent class} (empty at the first level)."""
        prev = self.previous(level)
        if prev is None:
            return {}
        parent_ids = self.cells(prev)
        return {c: parent_ids[p] for c, p in zip(self.cells(level), self._parents[level].tolist(), strict=True)}

    def children_map(self, level: int) -> dict[int, list[int]]:
        """The seed's l1_to_l3-style map: {parent class index at ``level``: [child class
        indices at the next level]}; every class of ``level`` appears, possibly with []."""
        indptr, indices = self.child_index(level)
        return {i: indices[indptr[i]:indptr[i + 1]].tolist() for i in range(indptr.size - 1)}

    def seed_maps(self) -> dict[str, dict[str, list[int]]]:
        """{"l1_to_l3": {"0": [0, 1, ...], ...}, "l3_to_l5": ...} for consecutive levels,
        JSON-ready (string keys), named after the actual levels."""
        return {f"l{a}_to_l{b}": {str(k): v for k, v in self.children_map(a).items()}
                for a, b in zip(self.levels[:-1], self.levels[1:], strict=True)}

    # ---------------------------------------------------------------- checks

    def problems(self) -> list[str]:
        """Why this hierarchy cannot be trained on (empty when it can)."""
        out = []
        for lv in self.levels:
            n = self.num_classes[lv]
            if n < 2 and self.adaptive:
                out.append(
                    f"level {lv} has {n} class{'es' if n != 1 else ''} (training needs at least 2): "
                    f"lower --thresholds for level {lv} (now {self.scheme['thresholds'][lv]}), drop the level, "
                    "or add images")
            elif n < 2:
                out.append(
                    f"level {lv} has {n} class{'es' if n != 1 else ''} (training needs at least 2): "
                    f"lower --min-images for level {lv} (now {self.min_images.get(lv)}), drop the level, "
                    "or add images")
        return out

    def check_trainable(self) -> None:
        """Raise InputError naming the first level with fewer than 2 classes."""
        probs = self.problems()
        if probs:
            raise InputError(probs[0])

    # ---------------------------------------------------------------- identity and files

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of the levels and every level's cell list.

        Counts, minimums and dates are not part of it: two hierarchies with one hash have
        exactly the same classes in the same order, so a model fits either."""
        if self._hash is None:
            payload = {"levels": list(self.levels),
                       "cells": {str(lv): self.cells(lv) for lv in self.levels}}
            text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
            self._hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return self._hash

    def to_dict(self) -> dict:
        """The hierarchy.json document."""
        d = {
            "format": FORMAT if not self.adaptive else FORMAT_ADAPTIVE,
            "levels": list(self.levels),
            "min_images": {str(lv): int(self.min_images[lv]) for lv in self.levels},
            "splits": self.splits,
            "created_at": self.created_at,
            "images": int(self.images),
            "hash": self.hash,
            "classes": {str(lv): {"cells": self.cells(lv),
                                  "counts": self._counts[lv].tolist(),
                                  "parent": self._parents[lv].tolist()} for lv in self.levels},
        }
        if self.stats:
            d["stats"] = {str(lv): v for lv, v in self.stats.items()}
        if self.adaptive:
            d["cells"] = "adaptive"
            d["thresholds"] = {str(lv): int(v) for lv, v in self.scheme["thresholds"].items()}
            d["max_depth"] = int(self.max_depth)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Hierarchy:
        """Rebuild from a hierarchy.json document; refuses an inconsistent one.

        Checks the format tag, that every level's cells are of that level and sorted,
        that the stored parent indices match the cells, and that the stored hash matches."""
        if not isinstance(d, Mapping) or d.get("format") not in (FORMAT, FORMAT_ADAPTIVE):
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise InputError(f"not a geohier hierarchy (format {got!r}, expected {FORMAT!r} or {FORMAT_ADAPTIVE!r})")
        adaptive = d.get("format") == FORMAT_ADAPTIVE
        if adaptive and d.get("cells") != "adaptive":
            raise InputError(f"invalid hierarchy: format {FORMAT_ADAPTIVE} needs cells \"adaptive\", "
                             f"got {d.get('cells')!r}")
        try:
            levels = grid.check_levels(int(v) for v in d["levels"])
            classes = d["classes"]
            keys, counts, depths = {}, {}, {}
            for lv in levels:
                entry = classes[str(lv)]
                if adaptive:
                    k, depths[lv] = grid.ids_to_depth_keys(entry["cells"])
                else:
                    k, got_lv = grid.ids_to_keys(entry["cells"])
                    if entry["cells"] and got_lv != lv:
                        raise InputError(f"level {lv}'s cells are of level {got_lv}")
                keys[lv] = k
                counts[lv] = np.asarray(entry.get("counts") or [0] * len(entry["cells"]), dtype=np.int64)
            scheme = {"thresholds": d.get("thresholds"), "max_depth": d.get("max_depth")} if adaptive else None
            h = cls(levels, keys, counts, min_images={int(k): int(v) for k, v in (d.get("min_images") or {}).items()}
                    or None, splits=d.get("splits"), created_at=d.get("created_at"), images=d.get("images"),
                    stats={int(k): v for k, v in (d.get("stats") or {}).items()},
                    depths=depths if adaptive else None, scheme=scheme)
            for lv in levels:
                stored = classes[str(lv)].get("parent")
                if stored is not None and list(stored) != h._parents[lv].tolist():
                    raise InputError(f"level {lv}'s parent indices do not match its cells")
        except GeohierError as exc:
            raise InputError(f"invalid hierarchy: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"invalid hierarchy: missing or malformed field {exc}") from None
        if d.get("hash") and d["hash"] != h.hash:
            raise InputError(f"hierarchy hash mismatch: stored {d['hash'][:12]}..., computed {h.hash[:12]}... "
                             "(the file was edited; rebuild it with `python -m pipeline labels`)")
        return h

    @classmethod
    def load(cls, path: str | os.PathLike) -> Hierarchy:
        """Read hierarchy.json; a missing file is a WorkspaceError telling how to make one."""
        from geohier.errors import WorkspaceError

        path = Path(path)
        if not path.exists():
            raise WorkspaceError(f"no hierarchy at {path}; build it with `python -m pipeline labels`")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> Path:
        """Write hierarchy.json atomically (temporary file + rename)."""
        path = Path(path)
        atomic_write_text(path, _dumps(self.to_dict()))
        return path


def _dumps(d: dict) -> str:
    # One line per top-level field and per level's list: readable, and small at 50k classes.
    def field(key, value, indent):
        return f"{' ' * indent}{json.dumps(key)}: {json.dumps(value, separators=(', ', ': '))}"

    lines = [field(k, v, 1) for k, v in d.items() if k != "classes"]
    levels = []
    for lv, entry in d["classes"].items():
        inner = ",\n".join(field(k, v, 3) for k, v in entry.items())
        levels.append(f"  {json.dumps(lv)}: {{\n{inner}\n  }}")
    lines.append(' "classes": {\n' + ",\n".join(levels) + "\n }")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    # Index of each key in sorted_keys, -1 when absent.
    keys = np.asarray(keys, dtype=np.int64)
    if sorted_keys.size == 0:
        return np.full(keys.shape, -1, dtype=np.int64)
    idx = np.searchsorted(sorted_keys, keys)
    idx_c = np.minimum(idx, sorted_keys.size - 1)
    return np.where(sorted_keys[idx_c] == keys, idx_c, -1).astype(np.int64)


def build_hierarchy(lat, lon, levels: Sequence[int] = grid.DEFAULT_LEVELS,
                    min_images=DEFAULT_MIN_IMAGES) -> Hierarchy:
    """Build the classes of every level from image positions.

    ``min_images`` is an int (every level), a {level: n} mapping or CLI text (see
    ``parse_min_images``). Invalid points are ignored. Raises InputError when there are no
    valid points; levels left with fewer than 2 classes are allowed here (see
    ``Hierarchy.problems``).

    >>> h = build_hierarchy([1, 1, 1, -1], [1, 1, 1, 1], [1, 3], min_images={1: 1, 3: 2})
    >>> h.num_classes, h.counts(1).tolist()
    ({1: 2, 3: 1}, [3, 1])
    """
    levels = grid.check_levels(levels)
    mins = parse_min_images(min_images, levels)
    counts = cell_counts(lat, lon, levels)
    total = int(counts[levels[0]][1].sum())
    if total == 0:
        raise InputError("no images with valid coordinates to build a hierarchy from")
    masks = select_classes(counts, mins)
    stats = {r["level"]: {k: r[k] for k in ("cells_with_images", "dropped", "images_kept")}
             for r in kept_summary(counts, mins)}
    return Hierarchy(levels, {lv: counts[lv][0][masks[lv]] for lv in levels},
                     {lv: counts[lv][1][masks[lv]] for lv in levels},
                     min_images=mins, images=total, stats=stats)
