"""Region limits: restrict a run's answers to countries or a bounding box.

``--within country:FR,DE`` (ISO 3166 alpha-2 or alpha-3 codes, or Natural Earth names) or
``--within bbox:S,W,N,E`` (degrees; W > E crosses the antimeridian). A finest class is
*inside* when its cell overlaps the region with a positive area (a cell that only touches
a border is outside; the countries are Natural Earth's 10 m polygons from
``geohier.geography.countries``, the ones the cell geography is computed from). Classes
outside get zero probability before the keep rules (their logits, and those of coarser
classes with no class inside below them, become -inf), so the combination renormalises
over the inside ones.

A class's point (the mean of its training images, or the cell's centre) can lie outside
the region even when its cell overlaps it: such points are moved into the region (the
nearest point of the box; a point on the surface of the cell's part of the countries), so
an answer is never outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geohier.errors import InputError

KINDS = ("country", "bbox")


@dataclass(frozen=True)
class Within:
    """A parsed ``--within``: ``kind`` country (``codes``: ISO alpha-2/3 or names, upper
    case) or bbox (``bbox``: south, west, north, east)."""

    kind: str
    codes: tuple[str, ...] = ()
    bbox: tuple[float, float, float, float] | None = None

    def describe(self) -> str:
        if self.kind == "country":
            return "country:" + ",".join(self.codes)
        return "bbox:" + ",".join(f"{v:g}" for v in self.bbox)


def parse_within(text) -> Within:
    """``"country:FR,DE"`` or ``"bbox:S,W,N,E"``.

    >>> parse_within("country:fr, de").codes
    ('FR', 'DE')
    >>> parse_within("bbox:40,-5,52,10").bbox
    (40.0, -5.0, 52.0, 10.0)
    """
    raw = str(text or "").strip()
    kind, sep, rest = raw.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS or not rest.strip():
        raise InputError(f"--within takes country:CODES (e.g. country:FR,DE) or bbox:S,W,N,E (e.g. "
                         f"bbox:41,-5,51.5,9.6), got {raw!r}")
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    if kind == "country":
        return Within("country", tuple(dict.fromkeys(p.upper() for p in parts)))
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise InputError(f"--within bbox:S,W,N,E takes four numbers in degrees, got {rest!r}") from None
    if len(vals) != 4 or not np.isfinite(vals).all():
        raise InputError(f"--within bbox:S,W,N,E takes four numbers in degrees, got {rest!r}")
    s, w, n, e = vals
    if not (-90 <= s < n <= 90) or not (-180 <= w <= 180 and -180 <= e <= 180) or w == e:
        raise InputError(f"--within bbox:S,W,N,E needs -90 <= S < N <= 90 and W != E in [-180, 180], got {rest!r}")
    return Within("bbox", bbox=vals)


@dataclass
class Limit:
    """A region limit applied to a hierarchy: ``allowed[level]`` (C,) bool per level and
    ``positions`` (C_finest, 2) lat/lon, each class's point moved inside the region."""

    within: Within
    allowed: dict[int, np.ndarray]
    positions: np.ndarray

    def describe(self) -> str:
        finest = max(self.allowed)
        return f"{self.within.describe()} ({int(self.allowed[finest].sum())} cells)"


def _lon_in(lon, w, e):
    return (lon >= w) & (lon <= e) if w < e else (lon >= w) | (lon <= e)


def _bbox_mask(bounds: np.ndarray, bbox) -> np.ndarray:
    s, w, n, e = bbox
    cw, cs, ce, cn = bounds.T
    lat_ok = (cs < n) & (cn > s)
    if w < e:
        lon_ok = (cw < e) & (ce > w)
    else:  # across the antimeridian: [w, 180] or [-180, e]
        lon_ok = (ce > w) | (cw < e)
    return lat_ok & lon_ok


def _clamp_bbox(pos: np.ndarray, bbox) -> np.ndarray:
    s, w, n, e = bbox
    out = pos.copy()
    out[:, 0] = np.clip(out[:, 0], s, n)
    lon = out[:, 1]
    if w < e:
        out[:, 1] = np.clip(lon, w, e)
    else:
        outside = ~_lon_in(lon, w, e)
        to_w = np.abs(lon - w) <= np.abs(lon - e)
        out[:, 1] = np.where(outside, np.where(to_w, w, e), lon)
    return out


def _country_indices(codes) -> np.ndarray:
    from geohier import geography

    c = geography.countries()
    names = np.array([str(v).upper() for v in c.name], dtype=object)
    a2 = np.array([str(v).upper() for v in c.iso_a2], dtype=object)
    a3 = np.array([str(v).upper() for v in c.iso_a3], dtype=object)
    found = []
    for code in codes:
        m = (a2 == code) | (a3 == code) | (names == code)
        if not m.any():
            raise InputError(f"--within: unknown country {code!r}; use ISO 3166 codes such as FR, DEU, or "
                             "a Natural Earth name such as France")
        found.extend(np.flatnonzero(m).tolist())
    return np.asarray(sorted(set(found)), dtype=np.int64)


def _country_mask(bounds: np.ndarray, codes) -> tuple[np.ndarray, object]:
    """(C,) cells overlapping the countries with a positive area, and their union."""
    import shapely

    from geohier import geography

    c = geography.countries()
    wanted = _country_indices(codes)
    boxes = shapely.box(bounds[:, 0], bounds[:, 1], bounds[:, 2], bounds[:, 3])
    bi, pj = c.tree.query(boxes, predicate="intersects")
    sel = np.isin(c.part_country[pj], wanted)
    bi, pj = bi[sel], pj[sel]
    real = ~shapely.touches(boxes[bi], c.parts[pj])
    mask = np.zeros(len(bounds), dtype=bool)
    mask[bi[real]] = True
    union = shapely.union_all(c.geoms[wanted])
    return mask, union


def build_limit(within: Within | str, tree, positions: np.ndarray, bounds: np.ndarray) -> Limit:
    """The limit of ``within`` for a predictor's ``tree`` (its finest classes' ``bounds``
    (C, 4) west, south, east, north and ``positions`` (C, 2)); InputError when no class
    is inside."""
    import shapely

    w = within if isinstance(within, Within) else parse_within(within)
    finest = tree.levels[-1]
    pos = np.asarray(positions, dtype=np.float64)
    if w.kind == "bbox":
        mask = _bbox_mask(bounds, w.bbox)
        new_pos = _clamp_bbox(pos, w.bbox)
    else:
        mask, union = _country_mask(bounds, w.codes)
        new_pos = pos.copy()
        idx = np.flatnonzero(mask)
        if idx.size:
            shapely.prepare(union)
            inside = shapely.contains_xy(union, pos[idx, 1], pos[idx, 0])
            move = idx[~inside]
            if move.size:
                b = bounds[move]
                parts = shapely.intersection(shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3]), union)
                pts = shapely.point_on_surface(parts)
                new_pos[move, 0] = shapely.get_y(pts)
                new_pos[move, 1] = shapely.get_x(pts)
    if not mask.any():
        raise InputError(f"--within {w.describe()}: none of the run's {mask.size} level-{finest} cells lies "
                         "inside it (the run was not trained on images from there)")
    allowed = {finest: mask}
    for prev, lv in zip(tree.levels[-2::-1], tree.levels[:0:-1], strict=False):
        allowed[prev] = np.bincount(tree.parents[lv][allowed[lv]], minlength=tree.num_classes[prev]) > 0
    return Limit(w, allowed, new_pos)

