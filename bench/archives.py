"""Reading images in place from zips: what one process (a DataLoader worker) holds and how
fast it reads members at random, geohier's reader against one ``zipfile.ZipFile`` per
archive (the baseline, measured in the same run).

OSV-5M's train split is 98 zips of ~50,000 images; a shuffled training epoch touches every
zip from every worker. A ZipFile keeps a ZipInfo per member (~550 B), so a worker that has
opened all 98 holds ~2.7 GB; geohier's ``archives.ArchiveCache`` keeps 64-bit name hashes
and offsets in numpy arrays (~30 B a member) and reads each member from its local header
(name and CRC checked).

    .venv/bin/python bench/archives.py                 # 8 zips x 25,000 members (~1 min)
    .venv/bin/python bench/archives.py --zips 4 --members 5000 --files 20000   # quick

It also measures the by-name index ``import-csv`` builds over an unpacked images root
(OSV-5M's numbered folders): a dict of ``Path`` per file before, ``tables.FileIndex`` now.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

from geohier import archives

PAYLOAD = 256  # bytes per member: the per-member overhead is what is measured


def make_zips(folder: Path, zips: int, members: int) -> list[tuple[Path, str]]:
    refs = []
    for z in range(zips):
        path = folder / f"{z:02d}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for i in range(members):
                name = f"{z:02d}/{3859149887465501 + 1000 * (z * members + i)}.jpg"
                zf.writestr(name, os.urandom(PAYLOAD))
                refs.append((path, name))
    return refs


class Baseline:
    """One ZipFile per archive, kept open (geohier's first reader)."""

    def __init__(self):
        self.open: dict[Path, zipfile.ZipFile] = {}

    def read(self, path: Path, name: str) -> bytes:
        zf = self.open.get(path)
        if zf is None:
            zf = self.open[path] = zipfile.ZipFile(path)
        return zf.read(name)


def measure(label: str, read, refs, sample: list[int]) -> dict:
    tracemalloc.start()
    t0 = time.perf_counter()
    for path in sorted({p for p, _ in refs}):  # touch every archive once (what a shuffled epoch does)
        first = next(n for p, n in refs if p == path)
        read(path, first)
    t_open = time.perf_counter() - t0
    held = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    total = 0
    for i in sample:
        path, name = refs[i]
        total += len(read(path, name))
    t_read = time.perf_counter() - t0
    tracemalloc.stop()
    assert total == PAYLOAD * len(sample)
    return {"label": label, "open_s": t_open, "held_mb": held / 1e6, "per_member_b": held / len(refs),
            "reads_per_s": len(sample) / t_read}


def old_file_index(root: Path) -> dict:
    """The images root's by-name index as it was: a dict of ``Path`` per file and stem."""
    from geohier.tables import IMAGE_EXTENSIONS

    index: dict = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            p = Path(dirpath) / f
            index.setdefault(f, p)
            if Path(f).suffix.lower() in IMAGE_EXTENSIONS:
                index.setdefault(Path(f).stem, p)
    return index


def file_index_rows(folder: Path, files: int) -> list[str]:
    """OSV-5M unpacked: ``files`` empty JPEGs in numbered folders of 2,000; the by-name
    index ``import-csv`` builds over them, before and now (``tables.FileIndex``)."""
    from geohier.tables import FileIndex

    root = folder / "unpacked"
    for i in range(files):
        d = root / f"{i // 2000:02d}"
        if i % 2000 == 0:
            d.mkdir(parents=True)
        (d / f"{3859149887465501 + 1000 * i}.jpg").touch()
    rows = []
    for label, build in (("dict of Path per file (before)", old_file_index), ("tables.FileIndex", FileIndex)):
        tracemalloc.start()
        t0 = time.perf_counter()
        index = build(root)
        dt = time.perf_counter() - t0
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        rows.append(f"| {label} | {files:,} | {dt:.1f} | {held / 1e6:.1f} | {held / files:.0f} |")
        del index
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zips", type=int, default=8)
    ap.add_argument("--members", type=int, default=25_000, help="members per zip")
    ap.add_argument("--reads", type=int, default=20_000, help="random member reads timed")
    ap.add_argument("--files", type=int, default=200_000, help="files of the unpacked tree for the by-name index")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="geohier-bench-archives-") as tmp:
        t0 = time.perf_counter()
        refs = make_zips(Path(tmp), args.zips, args.members)
        print(f"{args.zips} zips x {args.members:,} members of {PAYLOAD} B written in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        sample = random.Random(0).sample(range(len(refs)), min(args.reads, len(refs)))
        base = Baseline()
        b = measure("zipfile.ZipFile per archive (before)", base.read, refs, sample)
        cache = archives.ArchiveCache()
        g = measure("archives.ArchiveCache", lambda p, n: cache.read(archives.member_ref(p, n)), refs, sample)
        index_rows = file_index_rows(Path(tmp), args.files)
    n = len(refs)
    print(f"\n{n:,} members in {args.zips} zips; {len(sample):,} random reads; 2026 machine: {os.cpu_count()} cores\n")
    print("| reader | open all (s) | held (MB) | per member (B) | random reads/s |")
    print("|---|---:|---:|---:|---:|")
    for r in (b, g):
        print(f"| {r['label']} | {r['open_s']:.2f} | {r['held_mb']:.1f} | {r['per_member_b']:.0f} | "
              f"{r['reads_per_s']:,.0f} |")
    print(f"\nratio: held {b['held_mb'] / g['held_mb']:.1f}x smaller, reads {g['reads_per_s'] / b['reads_per_s']:.2f}x, "
          f"open {b['open_s'] / g['open_s']:.2f}x; OSV-5M's 4.9 M train members: "
          f"{b['per_member_b'] * 4.9e6 / 1e9:.2f} GB -> {g['per_member_b'] * 4.9e6 / 1e9:.2f} GB per worker")
    print("\nThe images root's by-name index (import-csv when ids sit in numbered folders):\n")
    print("| index | files | build (s) | held (MB) | per file (B) |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(index_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
