"""Encoding 1,000,000 random points to levels 1, 3, 5, 8: vectorised vs the seed's way.

The seed found a point's cell by recursing from the root, one quadrant test per level per
point, in Python. The baseline below is written that way and timed on a sample, then
scaled to a million points. Goal: at least 100x.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from geohier import grid  # noqa: E402

N = 1_000_000
SAMPLE = 20_000
LEVELS = (1, 3, 5, 8)
GOAL = 100.0


def seed_cell_id(lat: float, lon: float, level: int) -> str:
    """The seed's recursive quadrant descent for one point (string id)."""
    west, east, south, north = -180.0, 180.0, -90.0, 90.0
    digits = []
    for _ in range(level):
        mid_lon, mid_lat = (west + east) / 2, (south + north) / 2
        if lat >= mid_lat:
            if lon < mid_lon:
                digits.append("0"); east = mid_lon  # noqa: E702
            else:
                digits.append("1"); west = mid_lon  # noqa: E702
            south = mid_lat
        else:
            if lon < mid_lon:
                digits.append("2"); east = mid_lon  # noqa: E702
            else:
                digits.append("3"); west = mid_lon  # noqa: E702
            north = mid_lat
    return "/".join(digits)


def main() -> int:
    rng = np.random.default_rng(0)
    lat = rng.uniform(-90, 90, N)
    lon = rng.uniform(-180, 180, N)

    t0 = time.perf_counter()
    for i in range(SAMPLE):
        for lv in LEVELS:
            seed_cell_id(lat[i], lon[i], lv)
    base = (time.perf_counter() - t0) * N / SAMPLE

    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        keys = grid.encode(lat, lon, LEVELS)
        best = min(best, time.perf_counter() - t0)

    # Same answers on the sample (compare through id strings).
    ids8 = grid.keys_to_ids(keys[8][:2000], 8)
    assert ids8 == [seed_cell_id(lat[i], lon[i], 8) for i in range(2000)], "baseline and grid disagree"

    ratio = base / best
    print(f"encode {N:,} points to levels {LEVELS}")
    print(f"  baseline (seed-style recursion, {SAMPLE:,}-point sample scaled): {base:8.2f} s")
    print(f"  geohier.grid.encode (vectorised):                          {best:8.3f} s")
    print(f"  speed-up: {ratio:,.0f}x   goal >= {GOAL:.0f}x   {'PASS' if ratio >= GOAL else 'FAIL'}")
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
