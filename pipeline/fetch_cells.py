"""Which cells a fetch works on, and the boxes it searches each cell through.

``--cells`` names the cells (land, all, ids, a file of ids) at one grid level; ``--shard
i/n`` keeps every n-th of the sorted list from the i-th (i from 0), so n machines share
one list without overlap and together cover it. A cell is searched through ``nx x ny``
equal sub-boxes no larger than the API's bbox limit, in an order that spreads the first
few over the whole cell (so a small per-cell target samples the cell, not one corner).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geohier import grid
from geohier.errors import InputError
from geohier.workspace import MANIFEST_LEVEL


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n) into (i, n); None stays None.

    >>> parse_shard("1/4")
    (1, 4)
    """
    if text is None or str(text).strip() == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise InputError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard i/n needs n >= 1 and 0 <= i < n (shards are numbered from 0), got {text!r}")
    return i, n


def sort_cells(ids: Iterable[str]) -> list[str]:
    """Unique '/'-form ids, sorted by level then id."""
    cells = {grid.from_id(i) for i in ids}
    return [grid.to_id(c) for c in sorted(cells, key=lambda c: (c.level, grid.to_id(c, sep="")))]


def shard_cells(cells: Sequence[str], shard: tuple[int, int] | None) -> list[str]:
    """Shard ``i`` of ``n`` of the sorted cell list (every n-th cell from the i-th): the
    shards of one list never overlap and together cover it.

    >>> shard_cells(["0", "1", "2", "3"], (1, 2))
    ['1', '3']
    """
    cells = sort_cells(cells)
    if shard is None:
        return cells
    i, n = shard
    return cells[i::n]


def _land_cells(level: int, cache_dir=None) -> list[str]:
    from geohier import geography  # loads Natural Earth polygons: only when land is asked for

    return grid.keys_to_ids(np.asarray(geography.land_keys(level, cache_dir), dtype=np.int64), level)


def select_cells(spec: str = "land", level: int = MANIFEST_LEVEL, shard: str | tuple | None = None,
                 cache_dir=None) -> list[str]:
    """The cells to fetch, sorted, for ``--cells``: ``land`` (cells touching land at
    ``level``, from geohier.geography, cached under ``cache_dir`` when given), ``all``
    (every cell of ``level``), a comma list of cell ids, or a file of ids (one per line;
    blank lines and ``#`` comments ignored); then ``shard`` ("i/n").
    """
    level = grid.check_level(level)
    spec = str(spec).strip()
    if spec == "land":
        ids = _land_cells(level, cache_dir)
    elif spec == "all":
        if level > 12:
            raise InputError(f"--cells all at level {level} is {4**level:,} cells; pick level <= 12 or a list")
        ids = grid.keys_to_ids(grid.all_cells(level), level)
    else:
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if parts and all(grid.is_cell_id(p) for p in parts):
            ids = parts
        elif Path(spec).expanduser().is_file():
            ids = []
            for n, line in enumerate(Path(spec).expanduser().read_text(encoding="utf-8").splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                if not grid.is_cell_id(line):
                    raise InputError(f"{spec}:{n}: not a cell id: {line!r}")
                ids.append(line)
        else:
            bad = [p for p in parts if not grid.is_cell_id(p)]
            raise InputError(f"--cells must be land, all, a comma list of cell ids or a file of ids; "
                             f"{(bad or [spec])[0]!r} is none of these")
    s = shard if isinstance(shard, tuple) or shard is None else parse_shard(shard)
    return shard_cells(ids, s)


# --------------------------------------------------------------------------- sub-boxes


def _bitreverse(v: np.ndarray, bits: int) -> np.ndarray:
    out = np.zeros_like(v)
    for b in range(bits):
        out |= ((v >> b) & 1) << (bits - 1 - b)
    return out


@dataclass(frozen=True)
class SubBoxes:
    """A cell cut into ``nx x ny`` equal sub-boxes no larger than the bbox limit, and the
    order they are searched in: bit-reversed Morton order (a 2-D van der Corput sequence)
    over a seeded toroidal shift, so the first few boxes are spread over the whole cell."""

    cell: str
    bbox: grid.BBox
    nx: int
    ny: int
    order: np.ndarray  # (nx*ny,) flat indices iy * nx + ix, in visiting order
    seed: int

    def __len__(self) -> int:
        return self.nx * self.ny

    @property
    def signature(self) -> str:
        return f"{self.nx}x{self.ny}:{self.seed}"

    def box(self, position: int) -> tuple[float, float, float, float]:
        """(west, south, east, north) of the ``position``-th box in visiting order."""
        flat = int(self.order[position])
        iy, ix = divmod(flat, self.nx)
        b = self.bbox
        dx, dy = (b.east - b.west) / self.nx, (b.north - b.south) / self.ny
        w = b.west + ix * dx
        e = b.east if ix == self.nx - 1 else b.west + (ix + 1) * dx
        s = b.south + iy * dy
        n = b.north if iy == self.ny - 1 else b.south + (iy + 1) * dy
        return (w, s, e, n)


def subboxes(cell_id: str, max_deg2: float = 0.01, seed: int = 0) -> SubBoxes:
    """The sub-boxes of a cell for a bbox limit of ``max_deg2`` square degrees.

    >>> sb = subboxes("0/0/0/0/0/0/0/0", 0.01)
    >>> (sb.nx, sb.ny, len(sb))
    (15, 8, 120)
    """
    c = grid.from_id(cell_id)
    b = grid.bounds(c)
    width, height = b.east - b.west, b.north - b.south
    limit = max_deg2 * 0.999  # headroom for the decimal rounding of the bbox parameter
    side = math.sqrt(limit)
    nx, ny = max(1, math.ceil(width / side)), max(1, math.ceil(height / side))
    while (width / nx) * (height / ny) > limit:
        if width / nx >= height / ny:
            nx += 1
        else:
            ny += 1
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, c.level, c.row, c.col])
    sx, sy = int(rng.integers(nx)), int(rng.integers(ny))
    bits = max(1, math.ceil(math.log2(max(nx, ny))))
    iy, ix = np.divmod(np.arange(nx * ny, dtype=np.int64), nx)
    gx, gy = (ix + sx) % nx, (iy + sy) % ny
    morton = grid.rowcol_to_key(gy, gx, bits)  # interleaved bits of (gy, gx)
    order = np.argsort(_bitreverse(morton, 2 * bits), kind="stable")
    return SubBoxes(grid.to_id(c), b, nx, ny, order, int(seed))


def split4(box):
    """The four quarters of a (west, south, east, north) box: NW, NE, SW, SE."""
    w, s, e, n = box
    mx, my = (w + e) / 2, (s + n) / 2
    return [(w, my, mx, n), (mx, my, e, n), (w, s, mx, my), (mx, s, e, my)]


