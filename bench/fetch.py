"""Benchmark of pipeline.fetch against the local fake Mapillary API (50 ms per request).

1. Throughput: images/s and requests/s at the default concurrency vs one request at a
   time (the baseline, on a sample of the cells), rate limit off. Goal: >= 4x.
2. Rate limit: 600 requests/min configured, over ~16 s of searching; the achieved API
   request rate must be >= 90% of the limit and no sliding window (15 s = the 60 s limit
   scaled, and 5 s) may hold more requests than the limit allows. (The client spaces
   requests 2% wider than the limit; windows of about a second can still see one extra
   arrival from thread-scheduling jitter, since this server shares the client's process.)
3. Nothing lost: every image the server holds for the cells ends up in the manifest.

    .venv/bin/python bench/fetch.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test helpers (mapillary_server), not the project

from mapillary_server import MapillaryServer  # noqa: E402

from geohier import grid  # noqa: E402
from geohier.workspace import Workspace  # noqa: E402
from pipeline import fetch as F  # noqa: E402

TOKEN = "MLY|bench|token"
TMP: list[Path] = []
LATENCY = 0.05
LEVEL = 10            # 4 x 2 sub-boxes of <= 0.01 deg² per cell
PER_CELL = 6          # images the server holds per cell (all usable)
RATE = 600.0          # requests/min for the rate part


def cells_at(first: int, n: int) -> list[str]:
    # land-ish cells in Europe, consecutive keys
    base = int(grid.encode([48.0], [5.0], LEVEL)[0])
    return grid.keys_to_ids(np.arange(base + first, base + first + n), LEVEL)


def run(srv: MapillaryServer, cells: list[str], **kw) -> tuple[F.FetchReport, Workspace, float]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    TMP.append(tmp)
    ws = Workspace(tmp / "data", tmp / "models")
    o = F.FetchOptions(api_url=srv.url, per_cell=100, **kw)
    srv.hits.clear()
    t0 = time.perf_counter()
    report = F.fetch(ws, cells, o, TOKEN)
    return report, ws, time.perf_counter() - t0


def lost(srv: MapillaryServer, ws: Workspace, cells: list[str]) -> int:
    want = set()
    for c in cells:
        b = grid.bounds(grid.from_id(c))
        want |= {i.id for i in srv.images.values() if b.west <= i.lon < b.east and b.south <= i.lat < b.north}
    with ws.manifest() as m:
        have = set(m.frame(["source_id"]).source_id)
        status = {s["status"] for s in m.fetch_status().values()}
    return len(want - have) + (0 if status <= {"done"} else 1000)


def max_in_window(t: np.ndarray, window: float) -> int:
    t = np.sort(t)
    return int((np.searchsorted(t, t + window, side="left") - np.arange(len(t))).max())


def main() -> int:
    ok = True
    d = F.FetchOptions()
    print(f"fake API on 127.0.0.1, {LATENCY * 1000:.0f} ms per request, level-{LEVEL} cells "
          f"({len(F.subboxes(cells_at(0, 1)[0]))} sub-boxes, {PER_CELL} images each)")

    # ---------------------------------------------------------------- throughput
    with MapillaryServer(token=TOKEN, latency=LATENCY) as srv:
        all_cells = cells_at(0, 40)
        srv.seed_cells([grid.bounds(grid.from_id(c)) for c in all_cells], PER_CELL, spacing_m=400)
        sample = all_cells[:5]
        r1, ws1, t1 = run(srv, sample, concurrency=1, rate_limit=0)
        n1 = len(srv.hits)
        r8, ws8, t8 = run(srv, all_cells, concurrency=d.concurrency, rate_limit=0)
        n8 = len(srv.hits)
        lost_tp = lost(srv, ws1, sample) + lost(srv, ws8, all_cells)
    base_ips, ours_ips = r1.images_kept / t1, r8.images_kept / t8
    ratio = ours_ips / base_ips
    good = ratio >= 4.0 and lost_tp == 0
    ok &= good
    print("\n[throughput] rate limit off")
    print(f"  baseline (1 at a time, {len(sample)} cells): {base_ips:7.1f} images/s  {n1 / t1:6.1f} requests/s")
    print(f"  yours (concurrency {d.concurrency}, {len(all_cells)} cells): {ours_ips:7.1f} images/s  "
          f"{n8 / t8:6.1f} requests/s")
    print(f"  ratio {ratio:.1f}x  (goal >= 4x; {d.concurrency} searches + {d.concurrency} thumbnails in flight)  lost {lost_tp}  -> {'PASS' if good else 'FAIL'}")

    # ---------------------------------------------------------------- rate limit
    with MapillaryServer(token=TOKEN, latency=LATENCY) as srv:
        cells = cells_at(100, 20)   # 160 searches at 10/s: ~16 s
        srv.seed_cells([grid.bounds(grid.from_id(c)) for c in cells], PER_CELL, spacing_m=400)
        rr, wsr, tr = run(srv, cells, concurrency=d.concurrency, rate_limit=RATE)
        t = np.array([h.t for h in srv.hits_of("images")])
        lost_rate = lost(srv, wsr, cells)
    span = t.max() - t.min()
    achieved = (len(t) - 1) / span * 60.0
    print(f"\n[rate limit] {RATE:g} requests/min, concurrency {d.concurrency}: {len(t)} API requests in {span:.1f} s")
    share = achieved / RATE
    good = 0.9 <= share <= 1.0
    print(f"  achieved {achieved:.0f}/min = {share:.1%} of the limit (goal >= 90%, <= 100%)"
          f"  -> {'PASS' if good else 'FAIL'}")
    ok &= good
    for window in (15.0, 5.0):
        allowed = int(RATE / 60.0 * window)
        worst = max_in_window(t, window)
        good = worst <= allowed
        ok &= good
        print(f"  max in any {window:4.0f} s window: {worst:4d}  (allowed {allowed}; the 60 s limit scaled)"
              f"  -> {'PASS' if good else 'FAIL'}")
    good = lost_rate == 0
    ok &= good
    print(f"  nothing lost: {rr.images_kept} images kept of {len(cells) * PER_CELL} held, "
          f"{rr.done} cells done  -> {'PASS' if good else 'FAIL'}")
    print(f"\n{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        code = main()
    finally:
        for d in TMP:
            shutil.rmtree(d, ignore_errors=True)
    sys.exit(code)
