"""Which cells a fetch works on, and the boxes it searches each cell through.

``--cells`` names the cells (land, all, ids, a file of ids) at one grid level; ``--shard
i/n`` keeps every n-th of the sorted list from the i-th (i from 0), so n machines share
one list without overlap and together cover it. A selection is sized before it is built
(``parse_cells``, microseconds for any text): more than MAX_CELLS cells is refused, saying
which level and how many; ``all`` is built lazily from its shard alone, so ``all`` at level
12 with ``--shard i/16`` never makes the 16.7 M-cell list. The dashboard parses with
``files=False`` (no path is looked at; a list is uploaded) and builds the list in its
background task (``CellSelection.build`` honours a stop event). A cell is searched through ``nx x ny``
equal sub-boxes no larger than the API's bbox limit, in an order that spreads the first
few over the whole cell (so a small per-cell target samples the cell, not one corner).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geohier import grid
from geohier.errors import GeohierError, InputError
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


#: The most cells one fetch run takes: every cell of level 10. The list, its plan and
#: its per-cell progress are held in memory (about 1.5 GB and a minute of planning at
#: this size); a larger selection is refused before anything is built.
MAX_CELLS = 4**10
#: The longest Cells text the dashboard takes (a longer list is uploaded as a file).
MAX_TEXT_CHARS = 100_000
#: The largest file of cell ids (the CLI's --cells FILE, the page's upload).
MAX_FILE_BYTES = 32 * 1024 * 1024
#: How much of a bad value an error message repeats.
_SHOW_CHARS = 40
_GEO_MAX_LEVEL = 10  # geohier.geography.MAX_LEVEL: land is computed down to this level


def _show(text) -> str:
    """``repr`` of (the start of) a bad value, for an error line."""
    text = str(text)
    return repr(text[:_SHOW_CHARS] + "…") if len(text) > _SHOW_CHARS else repr(text)


def _is_id(text: str) -> bool:
    try:
        grid.from_id(text)
    except GeohierError:  # grid.is_cell_id lets a too-deep id's InvalidLevelError through
        return False
    return True


def shard_size(total: int, shard: tuple[int, int] | None) -> int:
    """How many of ``total`` sorted items shard ``i/n`` keeps (every n-th from the i-th).

    >>> shard_size(10, (1, 4)), shard_size(10, None)
    (3, 10)
    """
    if shard is None:
        return int(total)
    i, n = shard
    return max(0, -(-(int(total) - i) // n))


def _too_many(what: str, count: int, level: int, shard: tuple[int, int] | None) -> InputError:
    n_min = -(-count * (shard[1] if shard else 1) // MAX_CELLS)
    where = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    return InputError(
        f"cells {what} at level {level}{where} is {count:,} cells; one fetch takes at most {MAX_CELLS:,} "
        f"(every cell of level 10), since its list and progress are held in memory: pick a coarser level, "
        f"land, or a list of ids, or split it into shards (CLI --shard i/{n_min} or more)")


def _ids_to_keys(ids: Sequence[str]) -> tuple[dict[int, np.ndarray], bool]:
    """Level -> keys of many id strings (numpy string operations, no loop over the ids),
    and whether every id is already in '/'-form without blanks; a malformed id raises
    grid's CellIdError / InvalidLevelError naming it."""
    ids = list(ids)
    if not ids:
        return {}, True
    if not all(isinstance(i, str) for i in ids):
        grid.from_id(next(i for i in ids if not isinstance(i, str)))  # raises, naming it
    raw = np.asarray(ids, dtype=str)
    s = np.strings.strip(raw)
    malformed = (np.strings.str_len(s) == 0) | np.strings.startswith(s, "/") | np.strings.endswith(s, "/") \
        | (np.strings.find(s, "//") >= 0)
    if malformed.any():
        grid.from_id(ids[int(np.flatnonzero(malformed)[0])])
    compact = np.strings.replace(s, "/", "")
    lengths = np.strings.str_len(compact)
    out = {}
    for level in np.unique(lengths).tolist():
        at = np.flatnonzero(lengths == level)
        if not 1 <= level <= grid.MAX_LEVEL:
            grid.from_id(ids[int(at[0])])
        codes = compact[at].astype(f"U{level}").view(np.uint32).reshape(len(at), level).astype(np.int64) - 48
        bad = np.flatnonzero(((codes < 0) | (codes > 3)).any(axis=1))
        if len(bad):
            grid.from_id(ids[int(at[bad[0]])])  # raises with the message of a single bad id
        out[level] = codes @ (4 ** np.arange(level - 1, -1, -1, dtype=np.int64))
    return out, bool((np.strings.str_len(raw) == 2 * lengths - 1).all())


def sort_cells(ids: Iterable[str]) -> list[str]:
    """Unique '/'-form ids, sorted by level then id (vectorised: a million ids take a
    second or two; a list that already is sorted '/'-form comes back as it is).

    >>> sort_cells(["3", "0/1", "013", "01"])
    ['3', '0/1', '0/1/3']
    """
    ids = list(ids)
    by_level, canonical = _ids_to_keys(ids)
    if canonical and len(by_level) == 1:
        keys = next(iter(by_level.values()))
        if (keys[1:] > keys[:-1]).all():
            return ids
    out: list[str] = []
    for level, keys in sorted(by_level.items()):
        keys = np.sort(keys)
        out += grid.keys_to_ids(keys[np.r_[True, keys[1:] != keys[:-1]]], level)
    return out


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


def _land_cells(level: int, cache_dir=None) -> np.ndarray:
    from geohier import geography  # loads Natural Earth polygons: only when land is asked for

    return np.asarray(geography.land_keys(level, cache_dir), dtype=np.int64)


def read_cell_file(path: str | Path) -> str:
    """The text of a file of cell ids (the CLI's ``--cells FILE``), or one line saying why
    not: unreadable, larger than MAX_FILE_BYTES, binary or not UTF-8."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read the cell list {str(path)!r}: {exc.strerror or exc}") from None
    return decode_cell_list(data, str(path))


def decode_cell_list(data: bytes, source: str) -> str:
    """Bytes of a cell list (a file, an upload) as text, or one line saying why not; no
    byte of it is repeated in the message."""
    if len(data) > MAX_FILE_BYTES:
        raise InputError(f"{source}: a cell list may hold at most {MAX_FILE_BYTES // 2**20} MB")
    if b"\0" in data:
        raise InputError(f"{source}: not a text file of cell ids (it holds binary data)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{source}: not a text file of cell ids (not UTF-8 text)") from None


def cells_from_text(text: str, source: str) -> list[str]:
    """The sorted unique ids of a cell list: one id per line, blank lines and ``#``
    comments ignored; a bad line is named by its number (and its first characters)."""
    numbered = [(n, line) for n, line in enumerate((raw.split("#", 1)[0].strip() for raw in text.splitlines()), 1)
                if line]
    try:
        return sort_cells(line for _, line in numbered)
    except GeohierError:
        n, line = next((n, line) for n, line in numbered if not _is_id(line))
        raise InputError(f"{source}:{n}: not a cell id: {_show(line)}") from None


@dataclass(frozen=True)
class CellSelection:
    """A checked ``--cells`` selection, sized but not built: ``parse_cells`` makes it in
    microseconds from any text, ``build`` makes the list (possibly in a background task).

    ``kind`` is ``land``, ``all``, ``ids`` (parsed ids, sorted) or ``text`` (an uploaded
    list, parsed when built); ``size`` is the number of cells (at most that many for land
    and text)."""

    kind: str
    level: int
    shard: tuple[int, int] | None = None
    ids: tuple[str, ...] = ()
    text: str = field(default="", repr=False)
    source: str = ""
    size: int = 0

    def describe(self) -> str:
        """What it holds, in words: ``"all at level 8: 65,536 cells"``."""
        part = f", shard {self.shard[0]}/{self.shard[1]}" if self.shard else ""
        if self.kind == "all":
            return f"all at level {self.level}{part}: {self.size:,} cells"
        if self.kind == "land":
            return f"land at level {self.level}{part}: at most {self.size:,} cells (those touching land)"
        if self.kind == "ids":
            return f"{self.size:,} cell id{'s' if self.size != 1 else ''}{part}"
        return f"{self.source}{part}: at most {self.size:,} cell ids"

    def build(self, cache_dir=None, stop=None) -> list[str]:
        """The sorted cell ids. ``stop`` (a threading.Event) set while it works ends it
        early with the cells made so far (the caller checks ``stop``)."""
        i, n = self.shard or (0, 1)
        if self.kind == "all":
            out: list[str] = []
            total, step = 4**self.level, (1 << 16) * n
            for first in range(i, total, step):
                if stop is not None and stop.is_set():
                    break
                out += grid.keys_to_ids(np.arange(first, min(first + step, total), n, dtype=np.int64), self.level)
            return out
        if self.kind == "land":
            return grid.keys_to_ids(_land_cells(self.level, cache_dir)[i::n], self.level)
        if self.kind == "ids":
            return list(self.ids[i::n])
        cells = cells_from_text(self.text, self.source)[i::n]
        if len(cells) > MAX_CELLS:
            raise InputError(f"{self.source}: {len(cells):,} cells; one fetch takes at most {MAX_CELLS:,}")
        return cells


def parse_cells(spec, level: int = MANIFEST_LEVEL, shard: str | tuple | None = None, *,
                files: bool = True) -> CellSelection:
    """Check a ``--cells`` value and size it, building nothing: ``land`` (cells touching
    land at ``level``), ``all`` (every cell of ``level``), a comma list of cell ids, or
    (only with ``files``, the CLI) a file of ids, one per line. A selection of more than
    MAX_CELLS cells is refused, saying how many and why. Any text gets a
    CellSelection or one InputError line that repeats at most its first characters; with
    ``files=False`` (the dashboard) no path is looked at. A CellSelection passes through."""
    if isinstance(spec, CellSelection):
        return spec
    level = grid.check_level(level)
    s = shard if isinstance(shard, tuple) or shard is None else parse_shard(shard)
    if not isinstance(spec, str):
        raise InputError(f"cells must be text, got {type(spec).__name__}")
    if not files and len(spec) > MAX_TEXT_CHARS:
        raise InputError(f"the cells text is {len(spec):,} characters; type at most {MAX_TEXT_CHARS:,} "
                         f"(land, all or cell ids) or upload a file of ids")
    text = spec.strip()
    if text == "land":
        if level > _GEO_MAX_LEVEL:
            raise InputError(f"cells land is known down to level {_GEO_MAX_LEVEL} "
                             f"({4**_GEO_MAX_LEVEL:,} cells), got level {level} ({4**level:,} cells)")
        return CellSelection("land", level, s, size=shard_size(4**level, s))
    if text == "all":
        count = shard_size(4**level, s)
        if count > MAX_CELLS:
            raise _too_many("all", count, level, s)
        return CellSelection("all", level, s, size=count)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        ids = sort_cells(parts) if parts else None
    except GeohierError:
        ids = None
    if ids is not None:
        count = shard_size(len(ids), s)
        if count > MAX_CELLS:
            raise InputError(f"{count:,} cell ids; one fetch takes at most {MAX_CELLS:,}")
        return CellSelection("ids", level, s, ids=tuple(ids), size=count)
    if files and text and "\0" not in text:
        try:  # "~x" of no user, surrogates, NUL: no file either
            path = Path(text).expanduser()
            is_file = path.is_file()
        except (OSError, ValueError, RuntimeError):
            is_file = False
        if is_file:
            ids = cells_from_text(read_cell_file(path), text)
            count = shard_size(len(ids), s)
            if count > MAX_CELLS:
                raise InputError(f"{text}: {count:,} cell ids; one fetch takes at most {MAX_CELLS:,}")
            return CellSelection("ids", level, s, ids=tuple(ids), size=count, source=text)
    bad = next((p for p in parts if not _is_id(p)), text)
    if files:
        raise InputError(f"--cells must be land, all, a comma list of cell ids or a file of ids; "
                         f"{_show(bad)} is none of these")
    raise InputError(f"cells must be land, all or comma-separated cell ids such as 0/1/2 (a list in a file: "
                     f"upload it; no file on the server is read); {_show(bad)} is none of these")


def cells_from_upload(name: str, data: bytes, level: int = MANIFEST_LEVEL) -> CellSelection:
    """An uploaded list of cell ids (one per line), checked for size and text but parsed
    only when built (a big list is built in the background)."""
    source = f"upload {_show(Path(str(name)).name)}"
    text = decode_cell_list(bytes(data), source)
    lines = sum(1 for line in text.splitlines() if line.split("#", 1)[0].strip())
    if lines > MAX_CELLS:
        raise InputError(f"{source}: {lines:,} lines; one fetch takes at most {MAX_CELLS:,} cells")
    if not lines:
        raise InputError(f"{source}: no cell ids in it")
    return CellSelection("text", grid.check_level(level), None, text=text, source=source, size=lines)


def select_cells(spec: str = "land", level: int = MANIFEST_LEVEL, shard: str | tuple | None = None,
                 cache_dir=None, *, files: bool = True) -> list[str]:
    """The cells to fetch, sorted, for ``--cells`` (see parse_cells): ``land`` (cells
    touching land at ``level``, from geohier.geography, cached under ``cache_dir`` when
    given), ``all`` (every cell of ``level``), a comma list of cell ids, or a file of ids
    (one per line; blank lines and ``#`` comments ignored); then ``shard`` ("i/n").
    """
    return parse_cells(spec, level, shard, files=files).build(cache_dir)


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


