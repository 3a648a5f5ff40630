"""The recursive lat/lon quadtree that every geohier label lives on.

Level ``k`` splits lon [-180, 180) x lat [-90, 90] into ``2**k x 2**k`` equal cells. Each
cell has four children, numbered by quadrant::

    0 = NW | 1 = NE
    -------+-------
    2 = SW | 3 = SE

A cell id is its path of quadrant digits from the root, ``"0/1/2/3"`` (level 4); the
compact form ``"0123"`` is accepted wherever an id is read. Inside arrays a cell is its
*key*: the digits read as a base-4 integer, so ``parent = key >> 2``, the children are
``4 * key + d``, and sorting keys of one level sorts their ids.

Rows count from the north (row 0 touches lat 90), columns from the antimeridian (col 0
starts at lon -180). A cell covers lon [west, east) x lat [south, north): a point on a
parallel or meridian belongs to the cell north or east of it (the seed's ``>=`` tests), so
the equator is in the northern half; lat 90 is clamped into the top row, lat -90 falls in
the bottom row. Lon 180 wraps to -180 (column 0); any finite longitude is wrapped into
[-180, 180).

Examples
--------
>>> cell(-33.92, 18.42, 1)          # Cape Town is in the south-east quadrant
Cell(level=1, row=1, col=1)
>>> to_id(cell(40.71, -74.01, 3))   # New York
'0/3/0'
>>> parent(from_id("0/3/0"))
Cell(level=2, row=1, col=1)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import cache
from typing import NamedTuple

import numpy as np

from geohier import geodesy
from geohier.errors import CellIdError, InvalidCoordinateError, InvalidLevelError

MAX_LEVEL = 24  # 4**24 < 2**63: keys stay exact int64
DEFAULT_LEVELS = (1, 3, 5, 8)

# encode() works through its points in blocks of this many, so that its temporaries
# (3 x 256 KiB) stay in the L2 cache and main memory sees each input read once and each
# output written once: encoding is memory-bound, not compute-bound.
ENCODE_BLOCK = 1 << 15
# Up to this level a row/column -> Morton-bits table (2**level entries) replaces the bit
# arithmetic of _spread_bits: one gather instead of ten shifts and masks.
_TABLE_LEVELS = 12


class Cell(NamedTuple):
    """A grid cell: its level and its row (from the north) and column (from lon -180)."""

    level: int
    row: int
    col: int


class BBox(NamedTuple):
    """A cell's bounds in degrees."""

    west: float
    south: float
    east: float
    north: float


# --------------------------------------------------------------------------- checks


def check_level(level) -> int:
    """Return ``level`` as an int, or raise InvalidLevelError naming it.

    >>> check_level(8)
    8
    """
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
        raise InvalidLevelError(f"level must be an integer >= 1, got {level!r}")
    if not 1 <= int(level) <= MAX_LEVEL:
        raise InvalidLevelError(f"level must be between 1 and {MAX_LEVEL}, got {level!r}")
    return int(level)


def check_levels(levels: Iterable[int]) -> tuple[int, ...]:
    """Validate a strictly increasing, non-empty sequence of levels.

    >>> check_levels([1, 3, 5, 8])
    (1, 3, 5, 8)
    """
    out = tuple(check_level(v) for v in levels)
    if not out:
        raise InvalidLevelError("at least one level is needed, got none")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise InvalidLevelError(f"levels must be strictly increasing, got {list(out)!r}")
    return out


def parse_levels(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,5,8"`` into a validated level tuple.

    >>> parse_levels("1, 3,5")
    (1, 3, 5)
    """
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise InvalidLevelError(
            f"levels must be comma-separated integers such as 1,3,5,8, got {text!r}"
        ) from None
    return check_levels(values)


def _check_point(lat: float, lon: float) -> None:
    if not (isinstance(lat, (int, float, np.floating, np.integer)) and math.isfinite(lat)):
        raise InvalidCoordinateError(f"latitude must be a finite number, got {lat!r}")
    if not (isinstance(lon, (int, float, np.floating, np.integer)) and math.isfinite(lon)):
        raise InvalidCoordinateError(f"longitude must be a finite number, got {lon!r}")
    if not -90.0 <= lat <= 90.0:
        raise InvalidCoordinateError(f"latitude must be within [-90, 90], got {lat!r}")


def valid_points(lat, lon) -> np.ndarray:
    """Boolean mask of points that ``encode`` accepts (finite, lat within [-90, 90]).

    >>> valid_points([0, 91, float("nan")], [0, 0, 0]).tolist()
    [True, False, False]
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    return np.isfinite(lat) & np.isfinite(lon) & (lat >= -90.0) & (lat <= 90.0)


# ------------------------------------------------------------------ single cells


def cell(lat: float, lon: float, level: int) -> Cell:
    """The cell of ``level`` that contains the point.

    >>> cell(90, 180, 2)                # top row; lon 180 wraps to -180
    Cell(level=2, row=0, col=0)
    >>> cell(-90, 0, 2)
    Cell(level=2, row=3, col=2)
    """
    level = check_level(level)
    _check_point(lat, lon)
    rows, cols = rowcol([lat], [lon], level)
    return Cell(level, int(rows[0]), int(cols[0]))


def _check_cell(c: Cell) -> Cell:
    level = check_level(c.level)
    n = 1 << level
    if not (0 <= c.row < n and 0 <= c.col < n):
        raise CellIdError(f"row/col must be within [0, {n}) at level {level}, got {tuple(c)!r}")
    return c


def bounds(c: Cell) -> BBox:
    """West, south, east, north of a cell in degrees.

    >>> bounds(Cell(1, 0, 0))
    BBox(west=-180.0, south=0.0, east=0.0, north=90.0)
    """
    _check_cell(c)
    n = 1 << c.level
    w, h = 360.0 / n, 180.0 / n
    return BBox(-180.0 + c.col * w, 90.0 - (c.row + 1) * h, -180.0 + (c.col + 1) * w, 90.0 - c.row * h)


def centroid(c: Cell) -> tuple[float, float]:
    """(lat, lon) of the cell's centre.

    >>> centroid(Cell(1, 1, 1))
    (-45.0, 90.0)
    """
    b = bounds(c)
    return ((b.south + b.north) / 2.0, (b.west + b.east) / 2.0)


def parent(c: Cell, level: int | None = None) -> Cell:
    """The ancestor of ``c`` at ``level`` (default: one level up).

    >>> parent(Cell(3, 5, 6), 1)
    Cell(level=1, row=1, col=1)
    """
    _check_cell(c)
    level = c.level - 1 if level is None else check_level(level)
    if not 1 <= level <= c.level:
        raise InvalidLevelError(f"parent level must be within [1, {c.level}], got {level!r}")
    shift = c.level - level
    return Cell(level, c.row >> shift, c.col >> shift)


def children(c: Cell) -> list[Cell]:
    """The four children in digit order (NW, NE, SW, SE).

    >>> [to_id(k) for k in children(from_id("3"))]
    ['3/0', '3/1', '3/2', '3/3']
    """
    _check_cell(c)
    check_level(c.level + 1)
    r, k = 2 * c.row, 2 * c.col
    return [Cell(c.level + 1, r, k), Cell(c.level + 1, r, k + 1),
            Cell(c.level + 1, r + 1, k), Cell(c.level + 1, r + 1, k + 1)]


def ancestors(c: Cell) -> list[Cell]:
    """Every ancestor from level 1 down to the parent of ``c``.

    >>> [to_id(a) for a in ancestors(from_id("0/2/1"))]
    ['0', '0/2']
    """
    return [parent(c, lv) for lv in range(1, c.level)]


def area_km2(c: Cell) -> float:
    """Spherical area of the cell in km² (R = ``geodesy.EARTH_RADIUS_KM``, 6371 km).

    >>> round(area_km2(Cell(1, 0, 0)) / 1e6, 1)   # a quarter of the Earth
    127.5
    """
    b = bounds(c)
    dlon = math.radians(b.east - b.west)
    return geodesy.EARTH_RADIUS_KM**2 * dlon * (math.sin(math.radians(b.north)) - math.sin(math.radians(b.south)))


def to_id(c: Cell, sep: str = "/") -> str:
    """The quadrant-digit id of a cell.

    >>> to_id(Cell(2, 3, 0))
    '2/2'
    >>> to_id(Cell(2, 3, 0), sep="")
    '22'
    """
    _check_cell(c)
    digits = [str(((c.row >> s) & 1) * 2 + ((c.col >> s) & 1)) for s in range(c.level - 1, -1, -1)]
    return sep.join(digits)


def from_id(cell_id: str) -> Cell:
    """Parse ``"0/1/2"`` or compact ``"012"`` into a Cell.

    >>> from_id("1/3")
    Cell(level=2, row=1, col=3)
    """
    if not isinstance(cell_id, str):
        raise CellIdError(f"a cell id must be a string of quadrant digits 0-3, got {cell_id!r}")
    digits = cell_id.strip().replace("/", "")
    if not digits or any(ch not in "0123" for ch in digits) or "//" in cell_id or cell_id.strip().startswith("/") \
            or cell_id.strip().endswith("/"):
        raise CellIdError(f"a cell id is quadrant digits 0-3 such as '0/1/2' or '012', got {cell_id!r}")
    level = check_level(len(digits))
    row = col = 0
    for ch in digits:
        d = int(ch)
        row, col = (row << 1) | (d >> 1), (col << 1) | (d & 1)
    return Cell(level, row, col)


def is_cell_id(text: str) -> bool:
    """True when ``text`` parses as a cell id.

    >>> is_cell_id("0/3"), is_cell_id("0/4")
    (True, False)
    """
    try:
        from_id(text)
    except CellIdError:
        return False
    return True


def key(c: Cell) -> int:
    """The integer key of a cell (its digits as a base-4 number).

    >>> key(from_id("1/3"))
    7
    """
    return int(rowcol_to_key(np.array([c.row]), np.array([c.col]), _check_cell(c).level)[0])


def from_key(k: int, level: int) -> Cell:
    """The cell of ``level`` with key ``k``.

    >>> from_key(7, 2)
    Cell(level=2, row=1, col=3)
    """
    level = check_level(level)
    if not 0 <= int(k) < 4**level:
        raise CellIdError(f"key must be within [0, {4**level}) at level {level}, got {k!r}")
    rows, cols = key_to_rowcol(np.array([k], dtype=np.int64), level)
    return Cell(level, int(rows[0]), int(cols[0]))


def all_cells(level: int) -> np.ndarray:
    """Every key of ``level`` in ascending (id) order.

    >>> all_cells(1).tolist()
    [0, 1, 2, 3]
    """
    return np.arange(4 ** check_level(level), dtype=np.int64)


# ------------------------------------------------------------------ arrays


def rowcol(lat, lon, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised row and column of many points at one level (int64 arrays).

    Raises InvalidCoordinateError naming the first bad point; use ``valid_points`` to
    filter first when bad points are expected.

    >>> rowcol([45.0, -45.0], [-90.0, 90.0], 1)
    (array([0, 1]), array([0, 1]))
    """
    level = check_level(level)
    lat, lon = _points(lat, lon)
    ok = valid_points(lat, lon)
    if not ok.all():
        _raise_invalid(lat.reshape(-1), lon.reshape(-1), ok.reshape(-1))
    n = 1 << level
    x = (_wrap_lon(lon) + 180.0) / 360.0
    y = (lat + 90.0) / 180.0  # 0 at the south pole
    cols = np.minimum((x * n).astype(np.int64), n - 1)
    rows = (n - 1) - np.minimum((y * n).astype(np.int64), n - 1)  # lat 90 -> top row
    return rows, cols


def _points(lat, lon) -> tuple[np.ndarray, np.ndarray]:
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if lat.shape != lon.shape:
        raise InvalidCoordinateError(f"lat and lon differ in shape: {lat.shape} vs {lon.shape}")
    return lat, lon


def _raise_invalid(lat: np.ndarray, lon: np.ndarray, ok: np.ndarray, offset: int = 0):
    """Raise InvalidCoordinateError naming the first point that ``ok`` marks False."""
    i = int(np.flatnonzero(~ok)[0])
    raise InvalidCoordinateError(
        f"point {offset + i} is invalid (lat {float(lat[i])!r}, lon {float(lon[i])!r}): "
        "latitude must be finite and within [-90, 90], longitude finite"
    )


def _wrap_lon(lon: np.ndarray) -> np.ndarray:
    # Wrap longitude into [-180, 180) so that 180 lands in column 0; leave in-range values
    # alone (lon + 180 can round up to 360 just west of the antimeridian; callers clamp).
    inside = (lon >= -180.0) & (lon < 180.0)
    return lon if inside.all() else np.where(inside, lon, np.mod(lon + 180.0, 360.0) - 180.0)


def _spread_bits(v: np.ndarray) -> np.ndarray:
    # Interleave zeros between the bits of v (Morton order), for up to 32-bit values.
    v = v.astype(np.uint64) & np.uint64(0xFFFFFFFF)
    v = (v | (v << np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    v = (v | (v << np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    v = (v | (v << np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    v = (v | (v << np.uint64(2))) & np.uint64(0x3333333333333333)
    v = (v | (v << np.uint64(1))) & np.uint64(0x5555555555555555)
    return v


def _compact_bits(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.uint64) & np.uint64(0x5555555555555555)
    v = (v | (v >> np.uint64(1))) & np.uint64(0x3333333333333333)
    v = (v | (v >> np.uint64(2))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    v = (v | (v >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
    v = (v | (v >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    v = (v | (v >> np.uint64(16))) & np.uint64(0x00000000FFFFFFFF)
    return v


def rowcol_to_key(rows, cols, level: int) -> np.ndarray:
    """Keys from rows and columns (each digit = 2 * row bit + col bit).

    >>> rowcol_to_key(np.array([1]), np.array([3]), 2).tolist()
    [7]
    """
    check_level(level)
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    return ((_spread_bits(rows) << np.uint64(1)) | _spread_bits(cols)).astype(np.int64)


def key_to_rowcol(keys, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns from keys (inverse of ``rowcol_to_key``).

    >>> key_to_rowcol(np.array([7]), 2)
    (array([1]), array([3]))
    """
    check_level(level)
    k = np.asarray(keys, dtype=np.int64).astype(np.uint64)
    return _compact_bits(k >> np.uint64(1)).astype(np.int64), _compact_bits(k).astype(np.int64)


def encode(lat, lon, levels: int | Sequence[int]) -> dict[int, np.ndarray] | np.ndarray:
    """Keys of many points at one level (an array) or at several (a dict level -> array).

    The finest level is computed once; coarser keys are right shifts of it, so a point's
    key at a coarse level is always the prefix of its key at a finer one.

    >>> encode([-33.92], [18.42], 1).tolist()
    [3]
    >>> {lv: k.tolist() for lv, k in encode([40.71], [-74.01], [1, 3]).items()}
    {1: [0], 3: [12]}
    """
    single = isinstance(levels, (int, np.integer)) and not isinstance(levels, bool)
    lv = (check_level(levels),) if single else tuple(sorted(set(check_level(v) for v in levels)))
    if not lv:
        raise InvalidLevelError("at least one level is needed, got none")
    lat, lon = _points(lat, lon)
    shape = lat.shape
    out = _encode_flat(lat.reshape(-1), lon.reshape(-1), lv)
    out = {v: k.reshape(shape) for v, k in out.items()}
    return out[lv[0]] if single else out


@cache
def _morton_tables(level: int) -> tuple[np.ndarray, np.ndarray]:
    """Key bits of each latitude band index (0 = southmost) and of each column at
    ``level``: key = rows_table[band] | cols_table[col]. The band table also flips the
    rows (row 0 is the north)."""
    n = 1 << level
    j = np.arange(n, dtype=np.int64)
    cols_table = _spread_bits(j).astype(np.int64)
    rows_table = (_spread_bits((n - 1) - j) << np.uint64(1)).astype(np.int64)
    rows_table.flags.writeable = cols_table.flags.writeable = False
    return rows_table, cols_table


def _encode_flat(lat: np.ndarray, lon: np.ndarray, levels: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Keys of 1-d float64 points at increasing ``levels``, block by block.

    Per block: check the points (min/max: NaN fails both tests), band and column indices
    of the finest level as in ``rowcol`` (the same float operations, so the same answers
    on every cell edge), their key bits by table lookup (``mode="clip"`` clamps lat 90 and
    a longitude that rounds up to 180 into the last band/column), then each coarser level
    as a right shift of the finest key while that block is still in cache."""
    finest = levels[-1]
    n = 1 << finest
    width, height = 360.0 / n, 180.0 / n  # powers of two times 360 and 180: exact
    size = lat.size
    outs = {v: np.empty(size, dtype=np.int64) for v in levels}
    fine = outs[finest]
    block = max(1, min(ENCODE_BLOCK, size))
    f = np.empty(block, dtype=np.float64)
    idx = np.empty(block, dtype=np.int64)
    bits = np.empty(block, dtype=np.int64)
    tables = _morton_tables(finest) if finest <= _TABLE_LEVELS else None
    for start in range(0, size, block):
        stop = min(start + block, size)
        m = stop - start
        la, lo = lat[start:stop], lon[start:stop]
        fb, ib, kb, key = f[:m], idx[:m], bits[:m], fine[start:stop]
        if not (la.min() >= -90.0 and la.max() <= 90.0
                and math.isfinite(lo.min()) and math.isfinite(lo.max())):
            _raise_invalid(la, lo, valid_points(la, lo), start)
        lo = _wrap_lon(lo)
        np.add(lo, 180.0, out=fb)
        np.divide(fb, width, out=fb)  # == (lon + 180) / 360 * n exactly: n is a power of two
        np.copyto(ib, fb, casting="unsafe")  # float -> int truncates; values are >= 0
        if tables is not None:
            np.take(tables[1], ib, out=key, mode="clip")
        else:
            np.minimum(ib, n - 1, out=ib)
            key[:] = _spread_bits(ib)
        np.add(la, 90.0, out=fb)
        np.divide(fb, height, out=fb)
        np.copyto(ib, fb, casting="unsafe")
        if tables is not None:
            np.take(tables[0], ib, out=kb, mode="clip")
        else:
            np.minimum(ib, n - 1, out=ib)
            np.subtract(n - 1, ib, out=ib)
            kb[:] = _spread_bits(ib) << np.uint64(1)
        np.bitwise_or(key, kb, out=key)
        for v in levels[:-1]:
            np.right_shift(key, 2 * (finest - v), out=outs[v][start:stop])
    return outs


def parent_keys(keys, level: int, parent_level: int) -> np.ndarray:
    """Keys of the ancestors at ``parent_level`` of keys at ``level``.

    >>> parent_keys(np.array([8, 9, 63]), 3, 1).tolist()
    [0, 0, 3]
    """
    level, parent_level = check_level(level), check_level(parent_level)
    if parent_level > level:
        raise InvalidLevelError(f"parent level {parent_level} is finer than level {level}")
    return np.asarray(keys, dtype=np.int64) >> (2 * (level - parent_level))


def key_bounds(keys, level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """West, south, east, north arrays of many keys.

    >>> [a.tolist() for a in key_bounds(np.array([0]), 1)]
    [[-180.0], [0.0], [0.0], [90.0]]
    """
    rows, cols = key_to_rowcol(keys, level)
    n = 1 << level
    w, h = 360.0 / n, 180.0 / n
    west = -180.0 + cols * w
    north = 90.0 - rows * h
    return west, north - h, west + w, north


def key_centroids(keys, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) arrays of the centres of many keys.

    >>> [a.tolist() for a in key_centroids(np.array([3]), 1)]
    [[-45.0], [90.0]]
    """
    w, s, e, n = key_bounds(keys, level)
    return (s + n) / 2.0, (w + e) / 2.0


def key_areas_km2(keys, level: int) -> np.ndarray:
    """Spherical areas in km² of many keys."""
    w, s, e, n = key_bounds(keys, level)
    return geodesy.EARTH_RADIUS_KM**2 * np.radians(e - w) * (np.sin(np.radians(n)) - np.sin(np.radians(s)))


def keys_to_ids(keys, level: int, sep: str = "/") -> list[str]:
    """Id strings of many keys.

    >>> keys_to_ids(np.array([0, 7]), 2)
    ['0/0', '1/3']
    """
    level = check_level(level)
    k = np.asarray(keys, dtype=np.int64)
    shifts = np.arange(2 * (level - 1), -1, -2, dtype=np.int64)
    digits = ((k[:, None] >> shifts[None, :]) & 3).astype(np.uint8) + ord("0")  # (N, level)
    compact = digits.view(f"S{level}").ravel() if k.size else np.array([], dtype=f"S{level}")
    if sep == "":
        return [b.decode() for b in compact]
    return [sep.join(b.decode()) for b in compact]


def compact_ids_to_keys(ids, level: int) -> np.ndarray:
    """Keys of many compact ids of one level (``"0123"``, as the manifest stores cells), vectorised.

    >>> compact_ids_to_keys(["00", "13"], 2).tolist()
    [0, 7]
    """
    level = check_level(level)
    text = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=str).ravel()
    if not text.size:
        return np.array([], dtype=np.int64)
    try:
        digits = text.astype(f"S{level + 1}").view(np.uint8).reshape(text.size, level + 1)
    except UnicodeEncodeError:
        raise CellIdError(f"expected compact level-{level} cell ids (digits 0-3), got non-ASCII text") from None
    bad = (np.char.str_len(text) != level) | np.any((digits[:, :level] < 48) | (digits[:, :level] > 51), axis=1)
    if bad.any():
        raise CellIdError(f"expected compact level-{level} cell ids such as {'0' * level!r}, "
                          f"got {str(text[np.flatnonzero(bad)[0]])!r}")
    shifts = np.arange(2 * (level - 1), -1, -2, dtype=np.int64)
    return ((digits[:, :level].astype(np.int64) - 48) << shifts).sum(axis=1)


def ids_to_keys(ids: Iterable[str]) -> tuple[np.ndarray, int]:
    """Keys and the common level of many id strings; all ids must share one level.

    >>> ids_to_keys(["0/0", "1/3"])
    (array([0, 7]), 2)
    """
    cells = [from_id(i) for i in ids]
    levels = {c.level for c in cells}
    if len(levels) > 1:
        raise CellIdError(f"ids mix levels {sorted(levels)}; pass ids of one level")
    if not cells:
        return np.array([], dtype=np.int64), 0
    level = levels.pop()
    rows = np.array([c.row for c in cells], dtype=np.int64)
    cols = np.array([c.col for c in cells], dtype=np.int64)
    return rowcol_to_key(rows, cols, level), level



# ------------------------------------------------------------- cells of mixed depth
# An adaptive hierarchy's classes are cells of any depth: a cell is then a (key, depth)
# pair, the key read at the cell's own depth. These helpers group the cells by depth (a
# few distinct depths, so a short loop over vectorised calls) and keep the input order.


def depth_bounds(keys, depths) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """West, south, east, north arrays of cells of mixed depths (``key_bounds`` per depth).

    >>> [a.tolist() for a in depth_bounds(np.array([0, 15]), np.array([1, 2]))]
    [[-180.0, 90.0], [0.0, -90.0], [0.0, 180.0], [90.0, -45.0]]
    """
    keys = np.asarray(keys, dtype=np.int64).ravel()
    depths = np.asarray(depths, dtype=np.int64).ravel()
    if keys.shape != depths.shape:
        raise CellIdError(f"{keys.size} keys but {depths.size} depths")
    out = [np.empty(keys.size, dtype=np.float64) for _ in range(4)]
    for d in np.unique(depths).tolist():
        sel = depths == d
        for arr, part in zip(out, key_bounds(keys[sel], check_level(d)), strict=True):
            arr[sel] = part
    return out[0], out[1], out[2], out[3]


def depth_centroids(keys, depths) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) arrays of the centres of cells of mixed depths.

    >>> [a.tolist() for a in depth_centroids(np.array([3]), np.array([1]))]
    [[-45.0], [90.0]]
    """
    w, s, e, n = depth_bounds(keys, depths)
    return (s + n) / 2.0, (w + e) / 2.0


def depth_areas_km2(keys, depths) -> np.ndarray:
    """Spherical areas in km² of cells of mixed depths."""
    w, s, e, n = depth_bounds(keys, depths)
    return geodesy.EARTH_RADIUS_KM**2 * np.radians(e - w) * (np.sin(np.radians(n)) - np.sin(np.radians(s)))


def depth_ids(keys, depths, sep: str = "/") -> list[str]:
    """Id strings of cells of mixed depths, in input order.

    >>> depth_ids(np.array([1, 7]), np.array([1, 2]))
    ['1', '1/3']
    """
    keys = np.asarray(keys, dtype=np.int64).ravel()
    depths = np.asarray(depths, dtype=np.int64).ravel()
    out: list[str] = [""] * keys.size
    for d in np.unique(depths).tolist():
        idx = np.flatnonzero(depths == d)
        for i, s in zip(idx.tolist(), keys_to_ids(keys[idx], d, sep=sep), strict=True):
            out[i] = s
    return out


def ids_to_depth_keys(ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Keys (each at its own depth) and depths of id strings of any depths.

    >>> [a.tolist() for a in ids_to_depth_keys(["1", "1/3"])]
    [[1, 7], [1, 2]]
    """
    cells = [from_id(i) for i in ids]
    depths = np.array([c.level for c in cells], dtype=np.int64)
    keys = np.zeros(len(cells), dtype=np.int64)
    for d in np.unique(depths).tolist():
        idx = np.flatnonzero(depths == d)
        keys[idx] = rowcol_to_key(np.array([cells[i].row for i in idx], dtype=np.int64),
                                  np.array([cells[i].col for i in idx], dtype=np.int64), d)
    return keys, depths
