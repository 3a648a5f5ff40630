"""Fetch against hostile servers (issue 16): how long a dripping answer holds `fetch`, how
long Ctrl-C takes, and the peak memory of a huge answer, each next to its baseline.

    .venv/bin/python bench/fetch_bounds.py [--huge-mb 300]

Every case runs `python -m pipeline fetch` in a subprocess against tests/mapillary_server.py
on 127.0.0.1 and is killed after a cap (printed as ">= cap") so that a client without the
bounds still ends the benchmark:

- drip: the API sends its whole answer one byte per second; `--timeout 3 --retries 0`
  (goal: ends within ~20 s with one line);
- Ctrl-C: SIGINT 2 s into a fetch held by a dripping thumbnail (once the thumbnail request
  has arrived), timed from the signal (goal: a few seconds);
- huge: a search answer of --huge-mb MB of JSON, and a thumbnail of as many bytes; the
  child's peak RSS against a normal fetch of one small cell (the baseline, same run).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(os.environ.get("GEOHIER_BENCH_ROOT") or Path(__file__).resolve().parents[1])  # another checkout
sys.path.insert(0, str(ROOT))

from geohier import grid  # noqa: E402
from tests.mapillary_server import MapillaryServer  # noqa: E402

TOKEN = "MLY|1|bench-token"
CELL = "0/1/2/3/0/1/2/3/0/1/2/3"   # level 12: one sub-box
CLI = ("import signal, sys, pipeline.cli as c; signal.signal(signal.SIGINT, signal.default_int_handler); "
       "c.COMMAND_MODULES = ('pipeline.fetch',); sys.exit(c.main(sys.argv[1:]))")


def run_cli(srv: MapillaryServer, extra: list[str], cap_s: float, sigint_after: float | None = None,
            sigint_on: str = "thumb"):
    """(seconds, exit code or None when killed at the cap, stderr lines, peak RSS MB)."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, MAPILLARY_ACCESS_TOKEN=TOKEN, PYTHONPATH=str(ROOT), GEOHIER_PROGRESS_EVERY_S="3600")
        args = [sys.executable, "-c", CLI, "--data", str(Path(d) / "data"), "--models", str(Path(d) / "models"),
                "fetch", "--cells", CELL, "--api-url", srv.url, *extra]
        err_path = Path(d) / "err.txt"
        with open(err_path, "w") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
            sent = False
            code = None
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    code = os.waitstatus_to_exitcode(status)
                    break
                now = time.monotonic() - t0
                if (sigint_after is not None and not sent and now >= sigint_after
                        and srv.arrived.get(sigint_on, 0) > 0):
                    os.kill(proc.pid, signal.SIGINT)
                    sent, t0 = True, time.monotonic()  # from here on: the time Ctrl-C takes
                if now >= cap_s:
                    proc.kill()
                    _, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.02)
            proc.returncode = code
        elapsed = time.monotonic() - t0
        lines = [x for x in err_path.read_text().splitlines() if x.strip()]
    return elapsed, code, lines, usage.ru_maxrss / 1024


def world(srv: MapillaryServer) -> None:
    srv.seed_cells([grid.bounds(grid.from_id(CELL))], per_cell=3, spacing_m=200)


def show(name: str, r, cap: float) -> None:
    t, code, lines, rss = r
    when = f">= {cap:.0f} s (killed)" if code is None else f"{t:.1f} s, exit {code}"
    print(f"{name:<34} {when:<24} peak RSS {rss:7.0f} MB  stderr lines: {len(lines)}")
    for line in lines[-3:]:
        print(f"    {line[:150]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--huge-mb", type=int, default=300)
    ap.add_argument("--cap", type=float, default=60.0, help="kill a case after this many seconds")
    a = ap.parse_args()
    cap = a.cap

    with MapillaryServer(token=TOKEN) as srv:
        world(srv)
        base = run_cli(srv, ["--timeout", "3", "--retries", "0"], cap)
    show("baseline: a normal fetch", base, cap)

    with MapillaryServer(token=TOKEN) as srv:
        world(srv)
        srv.inject("drip", times=-1, sleep=1.0)
        drip = run_cli(srv, ["--timeout", "3", "--retries", "0"], cap)
    show("drip API, --timeout 3 --retries 0", drip, cap)

    with MapillaryServer(token=TOKEN) as srv:
        world(srv)
        srv.inject("drip-body", times=-1, target="thumb", sleep=1.0)
        sigint = run_cli(srv, ["--timeout", "600", "--retries", "0"], cap, sigint_after=2.0)
    show("Ctrl-C 2 s into a dripping thumb", sigint, cap)

    with MapillaryServer(token=TOKEN) as srv:
        world(srv)
        srv.inject("huge", times=-1, size=a.huge_mb << 20)
        huge = run_cli(srv, ["--timeout", "120", "--retries", "0"], cap)
    show(f"{a.huge_mb} MB JSON answer", huge, cap)

    with MapillaryServer(token=TOKEN) as srv:
        world(srv)
        srv.inject("huge", times=-1, target="thumb", size=a.huge_mb << 20)
        huge_t = run_cli(srv, ["--timeout", "120", "--retries", "0", "--concurrency", "1"], cap)
    show(f"{a.huge_mb} MB thumbnails", huge_t, cap)

    print(f"extra peak memory: JSON {huge[3] - base[3]:+.0f} MB, thumbnail {huge_t[3] - base[3]:+.0f} MB "
          f"(ratio to the baseline {huge[3] / base[3]:.2f}x / {huge_t[3] / base[3]:.2f}x)")


if __name__ == "__main__":
    main()
