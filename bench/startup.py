"""Start-up time and peak memory of every CLI command: its ``--help`` and a one-line error,
and ``import-csv`` of a small and a five-times larger CSV (the fixed cost against the per-row one).

Each case runs ``python -m pipeline ...`` in a fresh process against its own empty workspace
(in a temporary directory) and is measured by its own ``os.wait4``: wall seconds and peak
resident memory (ru_maxrss). The baseline, in the same run, is ``python -c "import numpy"``;
the ratio columns are command / baseline. The last column says whether the command imported
torch (a second process runs the same argv through ``pipeline.cli.main`` and looks at
``sys.modules``).

Run: ``.venv/bin/python bench/startup.py`` (a minute or two on a quiet machine; each case runs
``--repeat`` times, default 1, and the fastest wall time and its memory are kept).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, argv after `python -m pipeline --data D --models M`); {tmp} is a scratch folder.
CASES: tuple[tuple[str, list[str]], ...] = (
    ("--help", ["--help"]),
    ("score --help", ["score", "--help"]),
    ("score (missing file)", ["score", "{tmp}/nope.csv", "--truth", "{tmp}/nope.csv"]),
    ("coverage --help", ["coverage", "--help"]),
    ("labels (no images)", ["labels"]),
    ("merge (missing workspace)", ["merge", "{tmp}/nope"]),
    ("import-csv (missing file)", ["import-csv", "{tmp}/nope.csv", "--images-root", "{tmp}"]),
    ("import-photos (missing dir)", ["import-photos", "{tmp}/nope"]),
    ("fetch (no token)", ["fetch"]),
    ("demo --help", ["demo", "--help"]),
    ("quickstart --help", ["quickstart", "--help"]),
    ("embed --help", ["embed", "--help"]),
    ("train --help", ["train", "--help"]),
    ("evaluate --help", ["evaluate", "--help"]),
    ("predict (no run)", ["predict", "{tmp}/nope.jpg"]),
    ("import-csv, 200 rows", ["import-csv", "{tmp}/rows200.csv", "--images-root", "{tmp}/img", "--link"]),
    ("import-csv, 1,000 rows", ["import-csv", "{tmp}/rows1000.csv", "--images-root", "{tmp}/img", "--link"]),
)

# Runs the CLI in-process and reports whether torch got imported, on stderr's last line.
PROBE = ("import sys, runpy\n"
         "sys.argv = ['pipeline'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('pipeline', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "print('TORCH=' + str('torch' in sys.modules), file=sys.stderr)\n")


def make_csvs(tmp: Path) -> None:
    """1,000 distinct 16 x 16 JPEGs under tmp/img and CSVs of the first 200 and of all."""
    from PIL import Image

    (tmp / "img").mkdir()
    rows = []
    for i in range(1000):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (i % 256, (i // 256) * 40, 128)).save(buf, "JPEG", quality=90)
        (tmp / "img" / f"{i:05d}.jpg").write_bytes(buf.getvalue())
        rows.append(f"{i:05d},{-60 + (i % 120):.3f},{-170 + (i * 7) % 340:.3f}")
    for n in (200, 1000):
        (tmp / f"rows{n}.csv").write_text("id,latitude,longitude\n" + "\n".join(rows[:n]) + "\n")


def measure(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """(wall s, peak RSS MiB, exit status) of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, proc.returncode  # ru_maxrss is KiB on Linux


def best(cmd: list[str], env: dict, repeat: int) -> tuple[float, float, int]:
    return min((measure(cmd, env) for _ in range(repeat)), key=lambda r: r[0])


def imports_torch(argv: list[str], env: dict) -> bool:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=False)
    return "TORCH=True" in out.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the fastest is kept (default 1)")
    ap.add_argument("--only", default="", help="run only cases whose label contains this text")
    ap.add_argument("--no-torch-check", action="store_true", help="skip the extra run that checks for torch")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100")
    env.pop("MAPILLARY_ACCESS_TOKEN", None)
    with tempfile.TemporaryDirectory() as tmp:
        make_csvs(Path(tmp))
        base_t, base_m, _ = best([sys.executable, "-c", "import numpy"], env, args.repeat)
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; baseline `python -c \"import numpy\"`: "
              f"{base_t:.2f} s, {base_m:.0f} MiB")
        print(f"| {'command':<28} | {'wall s':>7} | {'x numpy':>7} | {'peak MiB':>8} | {'x numpy':>7} "
              f"| {'exit':>4} | torch |")
        print(f"|{'-' * 30}|{'-' * 9}:|{'-' * 9}:|{'-' * 10}:|{'-' * 9}:|{'-' * 5}:|{'-' * 7}|")
        for i, (label, argv) in enumerate(CASES):
            if args.only and args.only not in label:
                continue
            ws = [f"{tmp}/ws{i}", "--models", f"{tmp}/ws{i}/models"]
            argv = ["--data", *ws] + [a.format(tmp=tmp) for a in argv]
            tries = []
            for _ in range(args.repeat):  # each try (and the torch check) starts from an empty workspace
                tries.append(measure([sys.executable, "-m", "pipeline", *argv], env))
                shutil.rmtree(f"{tmp}/ws{i}", ignore_errors=True)
            wall, mem, rc = min(tries, key=lambda r: r[0])
            torch = "-" if args.no_torch_check else ("yes" if imports_torch(argv, env) else "no")
            print(f"| {label:<28} | {wall:7.2f} | {wall / base_t:7.1f} | {mem:8.0f} | {mem / base_m:7.1f} "
                  f"| {rc:4d} | {torch:<5} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
