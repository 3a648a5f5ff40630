"""``import-csv`` on OSV-5M as it is published: rows per second and peak memory, with the
images checked in this process (``--workers 0``, the baseline) and in worker processes, in
the same run.

OSV-5M ships ``images/train/00.zip …`` of 512-pixel JPEGs beside ``train.csv``; every image
is read from its zip, hashed, its header read and decoded small (``pipeline.image_check``).
This writes ``--rows`` unique 512 x 384 JPEGs (~50 kB, textured like a street photo) and a
CSV with OSV-5M's header, in two layouts (``--layout``): ``zips`` of ``--per-zip`` members
(read in place) and ``folders``, OSV-5M unpacked into numbered folders (each image copied
into the workspace: written, fsynced, renamed). Then it runs, each in a fresh process on an
empty workspace, ``python -m pipeline import-csv train.csv --images-root
images/train --workers N`` for each N of ``--workers``, and first, with ``--before REV``,
the same command from ``git archive REV`` (code from before ``--workers``: run without it). ``python -c "import numpy"`` is
measured in the same run for memory. Peak memory is the largest process (the main one
or a worker), not their sum.

    .venv/bin/python bench/import_csv.py                       # 10,000 rows (~2 min)
    .venv/bin/python bench/import_csv.py --rows 2000 --workers 0,2
    .venv/bin/python bench/import_csv.py --before 744c5e8      # and the code before, same run
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from scale import ROOT, fmt_mb, measure

WIDTH, HEIGHT = 512, 384


def write_dataset(folder: Path, rows: int, per_zip: int, seed: int = 0) -> tuple[Path, Path]:
    """``folder/train.csv`` and ``folder/images/train/NN.zip`` (members ``NN/<id>.jpg``)
    or, with ``per_zip`` 0, ``folder/images/train/NN/<id>.jpg`` (10,000 a folder)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = folder / "images" / "train"
    root.mkdir(parents=True)
    table = folder / "train.csv"
    # a smooth scene plus per-image noise: JPEG sizes like a street photo's, and unique bytes
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    scene = np.stack([(x * 0.4 + y * 0.2) % 256, (y * 0.5) % 256, (x * 0.3) % 256], axis=-1)
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "latitude", "longitude", "thumb_original_url", "country", "sequence", "captured_at",
                    "unique_country", "creator_username"])
        step = per_zip or 10_000
        for z in range(0, rows, step):
            with _sink(root, z // step, zipped=bool(per_zip)) as put:
                for i in range(z, min(rows, z + step)):
                    ident = 3859149887465501 + 1000 * i
                    noise = rng.normal(0, 18, (HEIGHT // 4, WIDTH // 4, 3)).repeat(4, 0).repeat(4, 1)
                    px = np.clip(np.roll(scene, i * 7, axis=1) + noise, 0, 255).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(px).save(buf, "JPEG", quality=85)
                    put(f"{z // step:02d}/{ident}.jpg", buf.getvalue())
                    w.writerow([ident, f"{rng.uniform(-50, 65):.6f}", f"{rng.uniform(-170, 175):.6f}", "", "",
                                f"seq{i // 20}", 1_500_000_000 + i, "", ""])
    return table, root


@contextmanager
def _sink(root: Path, n: int, zipped: bool):
    """``put(name, bytes)`` into ``root/NN.zip`` or as ``root/name``."""
    if zipped:
        with zipfile.ZipFile(root / f"{n:02d}.zip", "w", zipfile.ZIP_STORED) as zf:
            yield zf.writestr
        return

    def put(name: str, data: bytes) -> None:
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(data)

    yield put


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--per-zip", type=int, default=5_000)
    ap.add_argument("--layout", default="zips,folders", help="zips (read in place), folders (copied), or both")
    ap.add_argument("--workers", default="0,1,2,auto", help="comma-separated values of --workers to run")
    ap.add_argument("--before", metavar="REV", help="also run this git revision's import-csv (without --workers)")
    ap.add_argument("--cap-mb", type=float, default=6000)
    args = ap.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    base = measure([sys.executable, "-c", "import numpy"], dict(os.environ), args.cap_mb)
    print(f"{cpus} cores; python -c 'import numpy': {base.wall:.2f} s, {fmt_mb(base)}")
    with tempfile.TemporaryDirectory(prefix="geohier-before-") as old:
        runs = [(n, ROOT, ["--workers", n]) for n in (x.strip() for x in args.workers.split(","))]
        if args.before:
            tar = subprocess.run(["git", "-C", str(ROOT), "archive", args.before], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", old], input=tar.stdout, check=True)
            runs.insert(0, (f"(before: {args.before})", Path(old), []))
        for layout in [x.strip() for x in args.layout.split(",")]:
            _layout(args, layout, runs)
    return 0


def _layout(args, layout: str, runs) -> None:
    """Write the dataset in ``layout`` and import it once per run, each into an empty workspace."""
    with tempfile.TemporaryDirectory(prefix="geohier-import-") as tmp:
        work = Path(tmp)
        table, root = write_dataset(work, args.rows, args.per_zip if layout == "zips" else 0)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        how = "read in place from zips" if layout == "zips" else "copied from numbered folders"
        print(f"\n{args.rows:,} JPEGs of {WIDTH} x {HEIGHT} ({size / args.rows / 1e3:.0f} kB each), {how}")
        print("| --workers | wall | rows/s | vs the first | peak (largest process) |\n|---|---:|---:|---:|---:|")
        first = None
        for k, (n, code, flag) in enumerate(runs):
            data = work / f"ws-{k}"
            env = {**os.environ, "PYTHONPATH": str(code), "GEOHIER_DATA": str(data / "data"),
                   "GEOHIER_MODELS": str(data / "models")}
            r = measure([sys.executable, "-m", "pipeline", "import-csv", str(table), "--images-root", str(root),
                         *flag], env, args.cap_mb, cwd=code)
            if not r.ok or not re.search(rf"^\s*added\s+{args.rows}\s*$", r.out, re.M):
                print(f"| {n} | failed (rc {r.rc}) | | | |\n{r.out[-2000:]}")
                continue
            rate = args.rows / r.wall
            first = first or rate
            print(f"| {n} | {r.wall:,.1f} s | {rate:,.0f} | {rate / first:.2f}x | {fmt_mb(r)} |", flush=True)
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
