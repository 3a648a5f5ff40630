"""``python -m pipeline coverage``: the grid's coverage status at one level.

Prints how many cells are ocean, land without images and land with images; ``--html``
writes the Coverage page's map as a standalone file that opens offline; ``--csv`` writes
the table of cells (both atomically, through a symbolic link to its target; a directory,
FIFO or device is refused). The work is ``geohier.geography.coverage_table`` and
``geohier.maps.coverage_map``, which the page calls too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from geohier import geography, grid, maps
from geohier.fileio import atomic_write_text, write_target
from geohier.workspace import Workspace

DEFAULT_LEVEL = 8


def write_outputs(ws: Workspace, level: int, html: str | Path | None = None,
                  csv: str | Path | None = None) -> dict[str, int]:
    """Compute the coverage table of ``level``, write the optional HTML map and CSV, and
    return the cells per status. An output that is a directory, FIFO or device is refused
    (InputError) before any work; a symbolic link is written through to its target."""
    for path in (html, csv):
        if path:
            write_target(path)
    table = geography.coverage_table(ws, level)
    if html:
        atomic_write_text(Path(html), maps.offline_html(maps.coverage_map(table, level)))
    if csv:
        atomic_write_text(Path(csv), table.to_csv(index=False))
    return geography.status_counts(table)


def run(args: argparse.Namespace, ws: Workspace) -> int:
    counts = write_outputs(ws, args.level, args.html, args.csv)
    width = max(len(s) for s in counts)
    print(f"level {args.level}: {4 ** args.level:,} cells")
    for status, n in counts.items():
        print(f"  {status:<{width}}  {n:>9,}")
    for flag, path in (("map", args.html), ("table", args.csv)):
        if path:
            print(f"wrote {flag}: {path}")
    return 0


def _level(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"level must be an integer, got {text!r}") from None
    if not 1 <= value <= geography.MAX_LEVEL:
        raise argparse.ArgumentTypeError(f"level must be within 1..{geography.MAX_LEVEL}, got {value}")
    return grid.check_level(value)


def register(sub) -> None:
    p = sub.add_parser("coverage", help="coverage status per cell: ocean / land / land with images",
                       description="Coverage status of every cell of one grid level: ocean, land "
                                   "without images, land with images. Prints the counts; writes "
                                   "the map (offline HTML) and the table (CSV) on request.")
    p.add_argument("--level", type=_level, default=DEFAULT_LEVEL,
                   help=f"grid level, 1..{geography.MAX_LEVEL} (default: {DEFAULT_LEVEL})")
    p.add_argument("--html", metavar="FILE", default=None,
                   help="write the map as a standalone HTML file that opens offline (default: none)")
    p.add_argument("--csv", metavar="FILE", default=None,
                   help="write the table of cells as CSV (default: none)")
    p.set_defaults(func=run)
