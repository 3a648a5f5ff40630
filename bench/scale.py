"""Scale (issue 19): a synthetic OSV-5M-style CSV of 5 M rows through import, labels and
every dashboard page, with the time and peak memory of each.

Every step runs in a fresh subprocess measured by its own ``os.wait4`` (wall seconds, peak
resident memory ``ru_maxrss``); a step that passes ``--cap-mb`` (default 6,000 MB) is
killed and reported as such. The baselines run in the same invocation: ``python -c
"import numpy"`` for memory, and the same step on the 4,000-image demo world (``pipeline
demo --images 4000`` + ``labels``) for labels and pages; ratios are 5 M / baseline.

1. **CSV**: ``--rows`` (default 5,000,000) rows with OSV-5M's columns (id, latitude,
   longitude, thumb_original_url, country, sequence, captured_at, unique_country,
   creator_username): capture sequences (~20 images 15 m apart along a heading) around the
   400 most populous GeoNames places, weighted by the square root of their population,
   60% within ~3 km of the centre, 40% within ~60 km; 10% of the sequences have no
   sequence id (their splits group by ~1 km buckets instead).
2. **import-csv** as a user runs it (it reads, hashes and decodes every image: hours for 5 M
   rows on 2 cores), on ``--import-rows`` (default 20,000) more rows with tiny unique
   16 x 16 PNGs in OSV-5M's numbered sub-folders, and on a quarter of them, into empty
   workspaces (rows/s, and whether the peak grows with rows), with a cProfile breakdown
   per row; then the quarter again into the 5 M-row workspace (do the per-row
   duplicate checks hold up?).
3. **manifest**: the 5 M rows go in through ``Manifest.add_rows`` (the library's bulk
   write: cells computed, duplicates skipped), every row pointing at one shared tiny JPEG.
4. **labels**: ``pipeline labels`` (fixed levels 1,3,5,8) and ``labels --cells adaptive``.
5. **pages**: each page opened by ``streamlit.testing.v1.AppTest`` in its own process:
   the first run (cold caches: what a user waits for when the page opens) and a rerun
   (warm caches: a widget change), and the process's peak memory.

Run: ``.venv/bin/python bench/scale.py`` (~35 min and ~5 GB of disk in a temporary folder;
``--quick`` for 50,000 rows in a few minutes; ``--work DIR --keep`` keeps the files and a
later ``--work DIR --reuse`` starts from them, skipping steps 1-3).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

PAGES = (("Home", "app.py"), ("Coverage", "views/coverage.py"), ("Data", "views/data.py"),
         ("Train", "views/train.py"), ("Accuracy", "views/accuracy.py"), ("Predict", "views/predict.py"))
# (name, page, session-state key set to True): a user action timed after the page is open
ACTIONS = (("Data: open the adaptive-cells expander (its preview)", "views/data.py", "adaptive_open"),)
CITIES = 400
SEQ_MEAN = 20
STEP_M = 15.0
CHUNK = 250_000
KM_PER_DEG = 111.195
COLUMNS = ("id", "latitude", "longitude", "thumb_original_url", "country", "sequence", "captured_at",
           "unique_country", "creator_username")


# ------------------------------------------------------------------ the synthetic CSV


def _cities(n: int = CITIES):
    from geohier.places import places

    p = places()
    top = np.argsort(-p.population, kind="stable")[:n]
    w = np.sqrt(p.population[top].astype(np.float64))
    return p.lat[top], p.lon[top], w / w.sum(), p.country_code[top]


def synthetic_chunks(rows: int, seed: int = 0, first_id: int = 1, chunk: int = CHUNK):
    """DataFrames of OSV-5M-style rows (``COLUMNS``), ``chunk`` rows at a time, ``rows`` in all."""
    rng = np.random.default_rng(seed)
    clat, clon, weight, country = _cities()
    made, seq_no = 0, 0
    while made < rows:
        n = min(chunk, rows - made)
        lengths = rng.geometric(1 / SEQ_MEAN, size=n // 4 + 16)
        s = int(np.searchsorted(np.cumsum(lengths), n)) + 1
        lengths = lengths[:s]
        lengths[-1] -= lengths.sum() - n
        city = rng.choice(clat.size, size=s, p=weight)
        spread = np.where(rng.random(s) < 0.6, 3.0, 60.0)  # km: town or region around it
        lat0 = np.clip(clat[city] + rng.normal(0, 1, s) * spread / KM_PER_DEG, -85, 85)
        lon0 = clon[city] + rng.normal(0, 1, s) * spread / (KM_PER_DEG * np.cos(np.radians(lat0)))
        heading = rng.uniform(0, 2 * np.pi, s)
        seq = np.repeat(np.arange(s), lengths)
        pos = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        dist_km = pos * STEP_M / 1000 + rng.normal(0, 0.002, n)
        lat = np.clip(lat0[seq] + dist_km * np.cos(heading[seq]) / KM_PER_DEG, -89.9, 89.9)
        lon = lon0[seq] + dist_km * np.sin(heading[seq]) / (KM_PER_DEG * np.cos(np.radians(lat)))
        lon = (lon + 180.0) % 360.0 - 180.0
        named = rng.random(s) >= 0.1
        seq_ids = np.where(named, np.char.add("sq", (seq_no + np.arange(s)).astype(str)), "")[seq]
        t0 = rng.integers(1_420_000_000, 1_700_000_000, s)
        ids = np.arange(first_id + made, first_id + made + n)
        cc = country[city][seq]
        yield pd.DataFrame({
            "id": ids, "latitude": np.round(lat, 6), "longitude": np.round(lon, 6),
            "thumb_original_url": np.char.add("https://example.invalid/t/", ids.astype(str)),
            "country": cc, "sequence": seq_ids, "captured_at": t0[seq] + 2 * pos,
            "unique_country": cc, "creator_username": np.char.add("user", (seq % 997).astype(str))})
        made += n
        seq_no += s


def write_csv(path: Path, rows: int, seed: int = 0, first_id: int = 1) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        for i, df in enumerate(synthetic_chunks(rows, seed, first_id)):
            df.to_csv(f, index=False, header=i == 0)


def write_images(csv: Path, root: Path) -> None:
    """A unique 16 x 16 PNG per row of ``csv``, as ``root/<NN>/<id>.png`` (OSV-5M unpacks
    into numbered sub-folders; import-csv finds them by name). Unique bytes: the id is in
    the pixels (sha256 de-duplication would skip shared ones)."""
    from PIL import Image

    ids = pd.read_csv(csv, usecols=["id"])["id"].to_numpy()
    base = np.arange(16 * 16 * 3, dtype=np.uint64).reshape(16, 16, 3)
    for k, i in enumerate(ids):
        folder = root / f"{k // 10_000:02d}"
        if k % 10_000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        px = (((base * 2654435761 + int(i) * 40503) >> 7) & 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px, "RGB").save(buf, "PNG", compress_level=1)
        (folder / f"{i}.png").write_bytes(buf.getvalue())


# ------------------------------------------------------------------ steps run in subprocesses


def stage_build(csv: str, data: str) -> None:
    """Every row of ``csv`` into the workspace at ``data`` through ``Manifest.add_rows``."""
    from PIL import Image

    from geohier.workspace import Workspace

    ws = Workspace(Path(data), Path(data).parent / "models")
    shared = Path(data) / "shared.jpg"
    shared.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (90, 120, 150)).save(shared, "JPEG")
    added = 0
    with ws.manifest() as m:
        for df in pd.read_csv(csv, chunksize=CHUNK, dtype={"sequence": str}, keep_default_na=False,
                              usecols=["id", "latitude", "longitude", "sequence", "captured_at"]):
            ids = df["id"].astype(str)
            when = np.datetime_as_string(df["captured_at"].to_numpy().astype("datetime64[s]"))
            added += m.add_rows(pd.DataFrame({
                "source": "osv5m", "source_id": ids, "sequence_id": df["sequence"].replace("", None),
                "lat": df["latitude"], "lon": df["longitude"], "captured_at": np.char.add(when, "+00:00"),
                "path": str(shared), "width": 16, "height": 16, "brightness": 112.3,
                "sha256": [hashlib.sha256(f"synthetic:{i}".encode()).hexdigest() for i in ids]}))
    print(json.dumps({"added": added}))


def stage_open(data: str) -> None:
    """Open the manifest once (a schema change made since the workspace was built is applied here)."""
    from geohier.workspace import Workspace

    with Workspace(Path(data), Path(data).parent / "models").manifest() as m:
        print(json.dumps({"images": m.count()}))


def stage_reset(data: str) -> None:
    """Bench set-up, not a measured path: every image back to no split, as before a first
    ``labels`` (the library has no call that unsets splits)."""
    import sqlite3

    with sqlite3.connect(Path(data) / "manifest.sqlite", isolation_level=None) as conn:
        conn.execute("UPDATE images SET split = NULL WHERE split IS NOT NULL")
    print(json.dumps({}))


def stage_profile(csv: str, root: str, data: str) -> None:
    """``import_csv`` under cProfile: cumulative seconds of its parts, per row."""
    import cProfile
    import pstats

    from geohier.workspace import Workspace
    from pipeline.ingest import import_csv

    ws = Workspace(Path(data), Path(data).parent / "models")
    prof = cProfile.Profile()
    prof.enable()
    s = import_csv(ws, csv, root)
    prof.disable()
    stats = pstats.Stats(prof).stats
    wanted = {"check_text": "CSV pre-pass (check_text)", "locate": "find the file (Locator)",
              "read_bytes": "read the file", "sha256_bytes": "sha256", "has_source_id": "has_source_id",
              "has_sha": "has_sha", "image_info": "header (image_info)", "open_image": "decode (open_image)",
              "brightness": "brightness", "atomic_write_bytes": "write the copy", "add_image": "insert the row",
              "import_csv": "total"}
    out = {}
    for (_, _, name), (_, _, _, cum, _) in stats.items():
        if name in wanted:
            out[wanted[name]] = out.get(wanted[name], 0.0) + cum
    print(json.dumps({"rows": s.total, "added": s.added, "parts": out}))


def stage_locator(root: str) -> None:
    """Memory of import-csv's by-name index of the images root (built on the first miss)."""
    import tracemalloc

    from geohier.tables import FileIndex

    tracemalloc.start()
    index = FileIndex(root)
    size = tracemalloc.get_traced_memory()[0]
    print(json.dumps({"files": len(index), "bytes": size}))


def stage_page(script: str, *keys: str) -> None:
    """Open one page with AppTest: the first run (cold caches) and a rerun (warm); then, with
    ``keys``, a run with those session-state keys set to True (an expander opened)."""
    t0 = time.perf_counter()
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / script), default_timeout=3600)
    t1 = time.perf_counter()
    at.run()
    t2 = time.perf_counter()
    at.run()
    t3 = time.perf_counter()
    out = {"import_s": t1 - t0, "open_s": t2 - t1, "rerun_s": t3 - t2}
    if keys:
        for k in keys:
            at.session_state[k] = True
        at.run()
        out["action_s"] = time.perf_counter() - t3
    out["problems"] = [str(e.value)[:300] for e in at.exception] + [str(e.value)[:300] for e in at.error]
    print(json.dumps(out))


STAGES = {"build": stage_build, "open": stage_open, "reset": stage_reset, "profile": stage_profile,
          "locator": stage_locator, "page": stage_page}


# ------------------------------------------------------------------ measuring


class Result:
    def __init__(self, wall: float, peak_mb: float, rc: int, out: str, killed: bool):
        self.wall, self.peak_mb, self.rc, self.out, self.killed = wall, peak_mb, rc, out, killed

    def json(self) -> dict:
        for line in reversed(self.out.strip().splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        return {}

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.killed


# A small launcher (python -S: a few MB) forks the measured command and reports its rusage: the
# ru_maxrss of a child forked straight from this process would start at this process's own size.
LAUNCHER = ("import json, os, sys\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os.execv(sys.argv[2], sys.argv[2:])\n"
            "_, status, usage = os.wait4(pid, 0)\n"
            "open(sys.argv[1], 'w').write(json.dumps([usage.ru_maxrss, os.waitstatus_to_exitcode(status)]))\n")


def measure(cmd: list[str], env: dict, cap_mb: float, log: Path | None = None, cwd: Path = ROOT) -> Result:
    """Wall seconds and peak RSS (MB) of one fresh process (the largest of it and the
    children it waited for); killed above ``cap_mb``."""
    import psutil

    out = open(log, "w+") if log else tempfile.TemporaryFile("w+")  # noqa: SIM115 - read back below
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rusage.json"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(report), *cmd], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd)
        launcher, killed = psutil.Process(proc.pid), False
        while proc.poll() is None:
            try:
                for child in launcher.children(recursive=True):
                    if child.memory_info().rss > cap_mb * 1e6:
                        child.kill()
                        killed = True
            except psutil.Error:
                pass
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        maxrss_kib, rc = json.loads(report.read_text()) if report.exists() else (0, proc.returncode)
    out.seek(0)
    text = out.read()
    out.close()
    return Result(wall, maxrss_kib * 1024 / 1e6, rc, text, killed)


def fmt_s(r: Result) -> str:
    if r.killed:
        return "killed"
    return f"{r.wall:,.1f} s" if r.wall >= 10 else f"{r.wall:.2f} s"


def fmt_mb(r: Result) -> str:
    return f"> {r.peak_mb:,.0f} MB (killed)" if r.killed else f"{r.peak_mb:,.0f} MB"


def ratio(a: float, b: float) -> str:
    return f"{a / b:,.1f}x" if b > 0 else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5_000_000, help="rows of the synthetic CSV (default 5,000,000)")
    ap.add_argument("--import-rows", type=int, default=20_000,
                    help="rows imported by import-csv with real files (default 20,000)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 50,000 rows, 2,000 imported")
    ap.add_argument("--work", default=None, help="folder for the files (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep --work afterwards")
    ap.add_argument("--reuse", action="store_true", help="reuse the CSV, images and workspaces in --work")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: import,labels,pages")
    ap.add_argument("--pages", default="", help="only the pages whose names contain one of these (comma-separated)")
    ap.add_argument("--demo-images", type=int, default=4000,
                    help="images of the demo world, the baseline workspace (default 4,000)")
    ap.add_argument("--cap-mb", type=float, default=6000, help="kill a step above this peak RSS (default 6000)")
    ap.add_argument("--stage", nargs="+", help=argparse.SUPPRESS)  # internal: one measured step
    args = ap.parse_args()
    if args.stage:
        STAGES[args.stage[0]](*args.stage[1:])
        return 0
    if args.quick:
        args.rows, args.import_rows = min(args.rows, 50_000), min(args.import_rows, 2_000)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    work = Path(args.work or tempfile.mkdtemp(prefix="geohier-scale-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        failed = run(args, work, skip)
    finally:
        if not args.keep and (args.work is None or not args.reuse):
            shutil.rmtree(work, ignore_errors=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def run(args, work: Path, skip: set[str]) -> list[str]:
    """Every step; returns the ones that failed (a non-zero exit, a kill, a page error)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("MAPILLARY_ACCESS_TOKEN", None)
    py, me = sys.executable, str(Path(__file__).resolve())
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    table: list[tuple[str, str, str, str]] = []  # step, baseline, geohier at N rows, ratio
    failed: list[str] = []

    def cli(data: Path, *argv: str, log: str) -> Result:
        r = measure([py, "-m", "pipeline", "--data", str(data), "--models", str(data.parent / "models"), *argv],
                    env, args.cap_mb, logs / log)
        if not r.ok:
            failed.append(log)
            print(f"  ! {log}: exit {r.rc}{' (killed)' if r.killed else ''}; see {logs / log}", flush=True)
        return r

    def stage(*argv: str, log: str, data: Path | None = None) -> Result:
        e = env if data is None else dict(env, GEOHIER_DATA=str(data), GEOHIER_MODELS=str(data.parent / "models"))
        r = measure([py, me, "--stage", *argv], e, args.cap_mb, logs / log)
        if not r.ok or r.json().get("problems"):
            failed.append(log)
            print(f"  ! {log}: exit {r.rc}{' (killed)' if r.killed else ''}; see {logs / log}", flush=True)
        return r

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.rows:,} rows, work {work}", flush=True)
    base = measure([py, "-c", "import numpy"], env, args.cap_mb)
    print(f"baseline `python -c \"import numpy\"`: {base.wall:.2f} s, {base.peak_mb:.0f} MB", flush=True)

    # 1. the CSV
    big_csv, big = work / "big.csv", work / "big" / "data"
    if not (args.reuse and big_csv.exists()):
        t = time.perf_counter()
        write_csv(big_csv, args.rows)
        print(f"CSV: {args.rows:,} rows, {big_csv.stat().st_size / 1e6:,.0f} MB in {time.perf_counter() - t:.0f} s",
              flush=True)

    # the demo world: the baseline workspace
    demo = work / "demo" / "data"
    if not (args.reuse and (demo / "manifest.sqlite").exists()):
        shutil.rmtree(demo.parent, ignore_errors=True)
        r = cli(demo, "demo", "--images", str(args.demo_images), log="demo.log")
        print(f"demo world: {args.demo_images:,} images in {r.wall:.0f} s", flush=True)

    # 2. import-csv, the real path
    n_imp = args.import_rows
    n_small = max(n_imp // 4, 1)
    imp_csv, imp_small, imp_root = work / "import.csv", work / "import_small.csv", work / "import_images"
    if "import" not in skip:
        if not (args.reuse and (imp_root / "done").exists()):
            shutil.rmtree(imp_root, ignore_errors=True)
            write_csv(imp_csv, n_imp, seed=1, first_id=100_000_000)
            pd.read_csv(imp_csv, nrows=n_small, dtype=str, keep_default_na=False).to_csv(imp_small, index=False)
            t = time.perf_counter()
            write_images(imp_csv, imp_root)
            (imp_root / "done").write_text("")
            print(f"import images: {n_imp:,} PNGs of 16 x 16 in {time.perf_counter() - t:.0f} s", flush=True)
        runs = {}
        for label, csv in ((n_small, imp_small), (n_imp, imp_csv)):
            d = work / f"imp{label}" / "data"
            shutil.rmtree(d.parent, ignore_errors=True)
            runs[label] = cli(d, "import-csv", str(csv), "--images-root", str(imp_root), log=f"import{label}.log")
            rr = runs[label]
            print(f"import-csv {label:,} rows into an empty workspace: {fmt_s(rr)}, {label / rr.wall:,.0f} rows/s, "
                  f"peak {fmt_mb(rr)}", flush=True)
        a, b = runs[n_small], runs[n_imp]
        per_row = (b.wall - a.wall) / max(n_imp - n_small, 1)
        table.append((f"`import-csv`, {n_small:,} / {n_imp:,} rows (16 px PNGs, copied) into an empty workspace",
                      f"numpy {base.wall:.2f} s, {base.peak_mb:.0f} MB",
                      f"{fmt_s(a)} / {fmt_s(b)} ({1 / per_row:,.0f} rows/s beyond start-up); "
                      f"peak {fmt_mb(a)} / {fmt_mb(b)}",
                      f"{b.peak_mb / a.peak_mb:.2f}x memory for {n_imp / n_small:.0f}x rows"))
        d = work / "implink" / "data"
        shutil.rmtree(d.parent, ignore_errors=True)
        rl = cli(d, "import-csv", str(imp_csv), "--images-root", str(imp_root), "--link", log="import_link.log")
        print(f"import-csv --link {n_imp:,} rows: {fmt_s(rl)}, {n_imp / rl.wall:,.0f} rows/s, peak {fmt_mb(rl)}",
              flush=True)
        table.append((f"`import-csv --link`, {n_imp:,} rows into an empty workspace", "-",
                      f"{fmt_s(rl)} ({n_imp / rl.wall:,.0f} rows/s), peak {fmt_mb(rl)}", "-"))
        loc = stage("locator", str(imp_root), log="locator.log").json()
        if loc:
            per = loc["bytes"] / max(loc["files"], 1)
            print(f"  import-csv's by-name index of the images root: {per:,.0f} B per file "
                  f"({per * args.rows / 1e9:,.2f} GB for {args.rows:,} files)", flush=True)
        d = work / "prof" / "data"
        shutil.rmtree(d.parent, ignore_errors=True)
        p = stage("profile", str(imp_small), str(imp_root), str(d), log="profile.log").json()
        if p:
            tot = p["parts"].get("total", 0.0) or 1.0
            parts = sorted(((k, v) for k, v in p["parts"].items() if k != "total"), key=lambda kv: -kv[1])
            print(f"  per row (cProfile, {p['rows']:,} rows, {1e3 * tot / p['rows']:.2f} ms/row): " + ", ".join(
                f"{k} {1e3 * v / p['rows']:.2f} ms ({v / tot:.0%})" for k, v in parts), flush=True)

    # 3. the 5 M-row manifest through Manifest.add_rows
    if not (args.reuse and (big / "manifest.sqlite").exists()):
        shutil.rmtree(big.parent, ignore_errors=True)
        r = stage("build", str(big_csv), str(big), log="build.log")
        size = sum(f.stat().st_size for f in big.glob("manifest.sqlite*")) / 1e6
        print(f"manifest: {r.json().get('added', 0):,} rows through Manifest.add_rows in {fmt_s(r)}, "
              f"peak {fmt_mb(r)}, {size:,.0f} MB on disk", flush=True)
        table.append((f"`Manifest.add_rows`: {args.rows:,} rows (the big workspace built)", "-",
                      f"{fmt_s(r)} ({args.rows / r.wall:,.0f} rows/s), peak {fmt_mb(r)}, {size:,.0f} MB", "-"))
    else:
        r = stage("open", str(big), log="open.log")
        print(f"manifest: reused, opened in {fmt_s(r)} ({r.json().get('images', 0):,} images; a schema change "
              "since it was built, such as a new index, is made here)", flush=True)

    if "import" not in skip:
        d = work / "bigimp"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(big.parent, d, ignore=shutil.ignore_patterns("cache", "splits"))
        rr = cli(d / "data", "import-csv", str(imp_small), "--images-root", str(imp_root), log="import_big.log")
        a = runs[n_small]
        print(f"import-csv {n_small:,} rows into the {args.rows:,}-row workspace: {fmt_s(rr)} "
              f"({n_small / rr.wall:,.0f} rows/s; into an empty one {n_small / a.wall:,.0f}), peak {fmt_mb(rr)}",
              flush=True)
        table.append((f"`import-csv`, {n_small:,} rows into the {args.rows:,}-row workspace",
                      f"{fmt_s(a)}, {fmt_mb(a)} (into an empty one)", f"{fmt_s(rr)}, {fmt_mb(rr)}",
                      f"{ratio(rr.wall, a.wall)} / {ratio(rr.peak_mb, a.peak_mb)}"))
        shutil.rmtree(d)

    # 4. labels: the first labelling (no image has a split yet), adaptive cells (the same splits:
    # no row changes), and a relabelling with another seed (most rows change split)
    if "labels" not in skip:
        for data in (demo, big):
            stage("reset", str(data), log=f"reset_{data.parent.name}.log")
        for label, argv, tag in (("fixed 1,3,5,8, first", [], "fixed"),
                                 ("--cells adaptive, same splits", ["--cells", "adaptive"], "adaptive"),
                                 ("fixed 1,3,5,8, --seed 1", ["--seed", "1"], "seed1")):
            b = cli(demo, "labels", *argv, log=f"labels_demo_{tag}.log")
            r = cli(big, "labels", *argv, log=f"labels_big_{tag}.log")
            print(f"labels {label}: demo {fmt_s(b)}, {fmt_mb(b)}; {args.rows:,} rows {fmt_s(r)}, {fmt_mb(r)}",
                  flush=True)
            table.append((f"`labels` {label}", f"{fmt_s(b)}, {fmt_mb(b)} ({args.demo_images:,}-image demo)",
                          f"{fmt_s(r)}, {fmt_mb(r)}", f"{ratio(r.wall, b.wall)} / {ratio(r.peak_mb, b.peak_mb)}"))

    # 5. pages
    if "pages" not in skip:
        for data in (demo, big):  # derived tables (geography per level) are rebuilt, as on a first visit
            shutil.rmtree(data / "cache", ignore_errors=True)
        wanted = [w.strip().lower() for w in args.pages.split(",") if w.strip()]
        for name, script in PAGES:
            if wanted and not any(w in name.lower() for w in wanted):
                continue
            res = {}
            for which, data in (("demo", demo), ("big", big)):
                r = stage("page", script, log=f"page_{name}_{which}.log", data=data)
                res[which] = (r, r.json())
            (b, bj), (r, rj) = res["demo"], res["big"]
            probs = rj.get("problems") or []
            open_b, open_r = bj.get("open_s", float("nan")), rj.get("open_s", float("nan"))
            print(f"page {name}: demo open {open_b:.2f} s, rerun {bj.get('rerun_s', float('nan')):.2f} s, "
                  f"{fmt_mb(b)}; {args.rows:,} rows open {open_r:.2f} s, rerun {rj.get('rerun_s', float('nan')):.2f} s, "
                  f"{fmt_mb(r)}" + (f"; problems: {probs}" if probs else ""), flush=True)
            table.append((f"page {name}: open / rerun, peak",
                          f"{open_b:.2f} / {bj.get('rerun_s', float('nan')):.2f} s, {fmt_mb(b)}",
                          (f"{open_r:.2f} / {rj.get('rerun_s', float('nan')):.2f} s, {fmt_mb(r)}" if r.ok
                           else f"failed ({'killed' if r.killed else f'exit {r.rc}'}), {fmt_mb(r)}")
                          + (" (page error)" if probs else ""),
                          f"{ratio(open_r, open_b)} / {ratio(r.peak_mb, b.peak_mb)}"))

        for name, script, key in ACTIONS:
            if wanted and not any(w in name.lower() for w in wanted):
                continue
            res = {}
            for which, data in (("demo", demo), ("big", big)):
                r = stage("page", script, key, log=f"action_{which}.log", data=data)
                res[which] = (r, r.json())
            (b, bj), (r, rj) = res["demo"], res["big"]
            act_b, act_r = bj.get("action_s", float("nan")), rj.get("action_s", float("nan"))
            probs = rj.get("problems") or []
            print(f"page {name}: demo {act_b:.2f} s, {fmt_mb(b)}; {args.rows:,} rows {act_r:.2f} s, {fmt_mb(r)}"
                  + (f"; problems: {probs}" if probs else ""), flush=True)
            table.append((f"page {name}, peak", f"{act_b:.2f} s, {fmt_mb(b)}",
                          f"{act_r:.2f} s, {fmt_mb(r)}" + (" (page error)" if probs else ""),
                          f"{ratio(act_r, act_b)} / {ratio(r.peak_mb, b.peak_mb)}"))

    print()
    print(f"| step | baseline (same run) | {args.rows:,} rows | ratio (time / memory) |")
    print("| --- | --- | --- | --- |")
    for row in table:
        print("| " + " | ".join(row) + " |")
    return failed


if __name__ == "__main__":
    sys.exit(main())
