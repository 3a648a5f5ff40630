"""Peak memory of decoding hostile images: `predict` and `import-photos` of a small JPEG
(the baseline) against images that are small on disk and huge once decoded.

Each case runs in its own subprocess (``python -m pipeline predict IMAGE --run tiny
--json`` over a tiny random-weight resnet18 run at 32 px; ``python -m pipeline
import-photos DIR`` into a fresh workspace; ``geohier.images.open_image`` alone as a
training/eval dataset or the embedder calls it for a 224 px preset, in a process that
imports nothing else; and, for reference only, ``open_image`` at full size, which no
consumer calls any more); its peak RSS is reported by a small launcher process.
The cases (made here, streamed to disk, so the files are small):

- baseline: a 640x480 JPEG with EXIF GPS;
- 9999x9999 PNGs of one colour: 16-bit grey, RGBA, RGB (a few hundred KB each);
- a JPEG of ~0.8 KB whose header claims 9000x9000 (a 16x16 picture with its frame size
  patched: libjpeg pads the missing rows with grey).

Printed per command: the baseline's peak, each case's peak, its delta over the baseline
and the ratio, and whether the goal holds: at most ~600 MB more than the baseline
(issue 16: "any image of at most 100 MP decodes with at most a few hundred MB extra").

    .venv/bin/python bench/image_memory.py
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from PIL import Image  # noqa: E402

GOAL_MB = 600
SIDE = 9999
GPS = (48.8566, 2.3522)  # Paris: import-photos keeps only photos with a position


def _dms(value: float) -> tuple[Fraction, Fraction, Fraction]:
    total = round(abs(value) * 3600 * 100)
    deg, rest = divmod(total, 3600 * 100)
    minutes, cs = divmod(rest, 60 * 100)
    return Fraction(deg), Fraction(minutes), Fraction(cs, 100)


def gps_exif() -> Image.Exif:
    exif = Image.Exif()
    lat, lon = GPS
    exif[0x8825] = {1: "N", 2: _dms(lat), 3: "E", 4: _dms(lon)}
    return exif


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path: Path, mode: str, size: tuple[int, int] = (SIDE, SIDE), exif: bytes | None = None) -> Path:
    """A one-colour PNG of ``size`` in ``mode`` (I;16, RGB, RGBA, L), streamed row by row
    through zlib so that neither the picture nor its compressed bytes are held whole."""
    color_type, depth, pixel = {"I;16": (0, 16, b"\x80\x00"), "L": (0, 8, b"\x80"),
                                "RGB": (2, 8, b"\x20\x80\xc0"), "RGBA": (6, 8, b"\x20\x80\xc0\x80")}[mode]
    w, h = size
    row = b"\x00" + pixel * w  # filter 0 (None) + the pixels
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(h)]
    parts.append(comp.flush())
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)))
        if exif:
            f.write(_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
        f.write(_chunk(b"IDAT", b"".join(parts)))
        f.write(_chunk(b"IEND", b""))
    return path


def jpeg_bomb_bytes(claim: tuple[int, int] = (9000, 9000), exif: bytes | None = None) -> bytes:
    """A 16x16 grey JPEG whose frame header claims ``claim``: a few hundred bytes that a
    full decode pads out to the claimed size."""
    buf = io.BytesIO()
    kw = {"exif": exif} if exif else {}
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, "JPEG", quality=75, **kw)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", claim[1], claim[0])
    return bytes(data)


def make_cases(folder: Path) -> dict[str, Path]:
    exif = gps_exif().tobytes()
    cases = {}
    small = folder / "small.jpg"
    img = Image.new("RGB", (640, 480), (120, 130, 140))
    img.paste(Image.new("RGB", (320, 480), (200, 60, 60)))
    img.save(small, "JPEG", quality=90, exif=exif)
    cases["small JPEG 640x480 (baseline)"] = small
    cases[f"PNG {SIDE}x{SIDE} 16-bit grey"] = write_png_bomb(folder / "grey16.png", "I;16", exif=exif)
    cases[f"PNG {SIDE}x{SIDE} RGBA"] = write_png_bomb(folder / "rgba.png", "RGBA", exif=exif)
    cases[f"PNG {SIDE}x{SIDE} RGB"] = write_png_bomb(folder / "rgb.png", "RGB", exif=exif)
    bomb = jpeg_bomb_bytes(exif=exif)
    path = folder / "bomb.jpg"
    path.write_bytes(bomb)
    cases[f"JPEG {len(bomb)} B claiming 9000x9000"] = path
    return cases


def make_run(models: Path) -> Path:
    """A tiny finished run: resnet18 with random weights at 32 px over a few towns."""
    from geohier.hierarchy import build_hierarchy
    from geohier.model import build_model, save_checkpoint
    from geohier.presets import EvalPreset

    towns = [(48.85, 2.35), (52.52, 13.40), (40.71, -74.0), (-33.87, 151.21), (35.68, 139.69)]
    lat = [t[0] + 0.01 * j for t in towns for j in range(3)]
    lon = [t[1] + 0.01 * j for t in towns for j in range(3)]
    h = build_hierarchy(lat, lon, (1, 3), min_images=1)
    model = build_model("resnet18", {lv: h.num_classes[lv] for lv in h.levels})
    meta = {"hierarchy": h.to_dict(), "hierarchy_hash": h.hash, "input": EvalPreset(32).to_dict(),
            "temperatures": {str(lv): 1.0 for lv in h.levels}, "config": {"backbone": "resnet18"},
            "metrics": {}}
    run = models / "tiny"
    save_checkpoint(run, model, meta)
    (run / "config.json").write_text(json.dumps({"backbone": "resnet18", "levels": list(h.levels)}))
    (run / "status.json").write_text(json.dumps({"state": "done", "progress": 1.0}))
    return run


# The decoder alone: "dataset" opens the image as ManifestDataset does for an EvalPreset(224)
# (geohier.images.decode_side_for when it exists, else a plain open_image as before); the
# size is given by a stand-in with the preset's attributes, so torch is not imported.
DECODE = """
import sys, types
from geohier import images
path, how = sys.argv[1], sys.argv[2]
side = None
if how == "dataset" and hasattr(images, "decode_side_for"):
    side = images.decode_side_for(types.SimpleNamespace(image_size=224, resize_size=224))
img = images.open_image(path, max_side=side)
print(how, "decode:", img.size, img.mode)
"""


# A small launcher runs each command and reports its child's peak RSS: Linux counts in a
# child's ru_maxrss the memory of the process it was forked from, so forking straight from
# this (large) process would report this process's size, not the command's.
LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def peak_rss(argv: list[str], env: dict) -> tuple[int, float, str]:
    """(exit status, peak RSS in MB, last line of output) of one subprocess."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = [ln for ln in proc.stdout.decode("utf-8", "replace").splitlines() if ln.strip()]
    peak = [int(ln.split()[1]) for ln in lines if ln.startswith("PEAK_KB ")][-1]
    lines = [ln for ln in lines if not ln.startswith("PEAK_KB ")]
    return proc.returncode, peak / 1024.0, (lines[-1] if lines else "")[:110]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--only", nargs="*", help="commands to run (default: all)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-image-memory-"))
    try:
        images = tmp / "images"
        images.mkdir()
        cases = make_cases(images)
        models = tmp / "models"
        models.mkdir()
        run = make_run(models)
        env = {**os.environ, "GEOHIER_MODELS": str(models), "OMP_NUM_THREADS": "1",
               "PYTHONWARNINGS": "ignore"}
        commands = {
            "predict": lambda p, k: [sys.executable, "-m", "pipeline", "predict", str(p), "--run", str(run),
                                     "--json"],
            "import-photos": lambda p, k: [sys.executable, "-m", "pipeline", "import-photos", str(_alone(p, k))],
            # the decoder alone, as a training/eval dataset or embedding calls it (before this
            # change they decoded at full size), in a process that imports nothing else
            "decode (dataset)": lambda p, k: [sys.executable, "-c", DECODE, str(p), "dataset"],
            # reference, no goal: open_image without max_side, which no consumer calls any
            # more (its RGB result alone is 400 MB at 100 MP)
            "decode (full size)": lambda p, k: [sys.executable, "-c", DECODE, str(p), "full"],
        }
        no_goal = {"decode (full size)"}
        if args.only:
            commands = {c: v for c, v in commands.items() if c in args.only}
        failed = False
        for cmd, argv_of in commands.items():
            goal = "reference, no goal" if cmd in no_goal else f"goal: <= {GOAL_MB} MB over the baseline"
            print(f"\n{cmd}: peak RSS of one subprocess per image ({goal})")
            base = None
            for k, (label, path) in enumerate(cases.items()):
                data = tmp / f"data-{cmd}-{k}"
                data.mkdir()
                rc, peak, last = peak_rss(argv_of(path, k), {**env, "GEOHIER_DATA": str(data)})
                if base is None:
                    base = peak
                    print(f"  {label:<36} rc={rc}  peak {peak:7.0f} MB")
                    print(f"      -> {last}")
                    continue
                delta = peak - base
                ok = delta <= GOAL_MB and rc == 0
                verdict = "holds" if ok else "FAILS" if rc == 0 else "ERROR (exit status)"
                if cmd in no_goal:
                    verdict = "(reference)" if rc == 0 else verdict
                else:
                    failed |= not ok
                print(f"  {label:<36} rc={rc}  peak {peak:7.0f} MB  delta {delta:+7.0f} MB  "
                      f"ratio {peak / base:5.2f}x  goal {verdict}")
                print(f"      -> {last}")
        print(f"\ngoal (every case but the reference <= {GOAL_MB} MB over its baseline): "
              f"{'holds' if not failed else 'FAILS'}")
        return 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _alone(path: Path, k: int) -> Path:
    """A folder holding only ``path`` (import-photos takes a folder)."""
    folder = path.parent.parent / f"alone-{k}"
    folder.mkdir(exist_ok=True)
    target = folder / path.name
    if not target.exists():
        os.link(path, target)
    return folder


if __name__ == "__main__":
    sys.exit(main())
