"""Sizing fetch's cell lists (issue 16 item 5): time and peak memory of
``python -m pipeline fetch --cells all --level L --dry-run`` in fresh processes.

The baseline is the cell-by-cell definition the seed used (every id parsed into a Cell,
sorted by its id string, and the plan's level read by parsing each id again), timed in
this run on the same million cells (all of level 10, the most one run takes). Then the
CLI itself: level 12 is refused in one line (the seed built the 16.7 M-cell list: 7 GB
and rising after 110 s on the page), and the largest shard a run takes, ``all --level
12 --shard 0/16`` (1,048,576 cells), plans within the targets. Goal: the dry run of the
biggest allowed selection within 60 s and 3 GB; level 12 refused within a few seconds of
the interpreter's start-up.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from geohier import grid
from pipeline.fetch_cells import MAX_CELLS, sort_cells

ROOT = Path(__file__).resolve().parents[1]


def seed_sort(ids):
    cells = {grid.from_id(i) for i in ids}
    return [grid.to_id(c) for c in sorted(cells, key=lambda c: (c.level, grid.to_id(c, sep="")))]


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def cli(args: list[str], env: dict) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (GB) of the child, exit code, last stderr/stdout line."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over children so far
    last = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1] if (p.stderr or p.stdout).strip() else ""
    return wall, max(peak, before) / 2**20, p.returncode, last


def main() -> None:
    ids = grid.keys_to_ids(grid.all_cells(10), 10)
    rng = np.random.default_rng(0)
    shuffled = [ids[i] for i in rng.permutation(len(ids))]
    t_seed, a = timed(seed_sort, shuffled)
    t_seed_levels, _ = timed(lambda c: [grid.from_id(x).level for x in c], a)
    t_new, b = timed(sort_cells, shuffled)
    t_new_levels, _ = timed(lambda c: [x.count("/") + 1 for x in c], b)
    assert a == b
    seed, new = t_seed + t_seed_levels, t_new + t_new_levels
    print(f"sort + plan levels of {len(ids):,} shuffled ids: seed {seed:.1f} s, now {new:.1f} s "
          f"({seed / new:.1f}x)")

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GEOHIER_DATA=str(Path(tmp) / "data"), GEOHIER_MODELS=str(Path(tmp) / "models"))
        env.pop("MAPILLARY_ACCESS_TOKEN", None)
        start, _, _, _ = cli(["--help"], env)
        print(f"interpreter + CLI start-up: {start:.1f} s")
        wall, _, code, last = cli(["fetch", "--cells", "all", "--level", "12", "--dry-run"], env)
        print(f"all --level 12 --dry-run: exit {code} in {wall:.1f} s: {last[:110]}...")
        wall, peak, code, last = cli(["fetch", "--cells", "all", "--level", "12", "--shard", "0/16", "--dry-run"], env)
        print(f"all --level 12 --shard 0/16 --dry-run ({MAX_CELLS:,} cells): exit {code} in {wall:.1f} s, "
              f"peak {peak:.2f} GB (goal <= 60 s, <= 3 GB: {'met' if wall <= 60 and peak <= 3 else 'MISSED'})")


if __name__ == "__main__":
    main()
