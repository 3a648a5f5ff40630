"""Benchmark: the classifier designs of issue 17, side by side (an ablation).

One generated demo world (``pipeline.demo``, fixed seed) and one training budget (the same
backbone, weights none, image size, epochs, batch size, threads and seed for every row);
five designs, each trained with ``pipeline.train.train`` and scored with
``pipeline.evaluate.evaluate_run`` on the test split (the Predictor's answers, the
hierarchical walk; for a hybrid head also its centroid rule, ``+centroid``):

1. seed: fixed levels 1,3,5,8 (``labels``), cell head, independent loss;
2. adaptive cells alone (``labels --cells adaptive``, default thresholds);
3. hybrid head alone (``train --head hybrid``);
4. hierarchical loss alone (``train --loss hierarchical``);
5. all together.

Both labellings use the same split seed and fractions, so every run's recorded split (its
hash, ``geohier.splits``) and test images are the same; the script checks that and prints
the test-set size. Per row: GeoScore, median km, acc@25/200/750/2500 km, the share of the
world's images that get a class at the finest level, the Gini of the finest level's class
counts (``geohier.charts.gini``), the finest level's classes, and the train wall time.

It is a synthetic world and one small CPU budget: the numbers compare the designs under
that budget, not on real photos.

Run: ``.venv/bin/python bench/ablation.py [--images N] [--image-size PX] [--epochs N]
[--threads N]`` (default: 1,500 images at 32 px, 5 epochs, 2 threads; about 10 minutes on 2
shared cores).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from geohier.charts import gini
from geohier.hierarchy import Hierarchy
from geohier.workspace import Workspace
from pipeline import train as T
from pipeline.evaluate import evaluate_run

DESIGNS = (  # name, cells, head, loss
    ("1 seed: fixed L1/3/5/8, cell head, independent loss", "fixed", "cell", "independent"),
    ("2 adaptive cells", "adaptive", "cell", "independent"),
    ("3 hybrid head", "fixed", "hybrid", "independent"),
    ("4 hierarchical loss", "fixed", "cell", "hierarchical"),
    ("5 all together", "adaptive", "hybrid", "hierarchical"),
)
ACC = (25, 200, 750, 2500)


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def label(ws: Workspace, cells: str) -> Hierarchy:
    from pipeline.labels import build_labels

    return build_labels(ws, cells=cells, seed=0)  # same split seed and fractions for both labellings


def coverage(ws: Workspace, h: Hierarchy) -> tuple[float, float, int]:
    """(share of the world's images with a finest class, Gini of the finest class counts, classes)."""
    with ws.manifest() as m:
        lat, lon = m.points()
    finest = max(h.levels)
    labelled = float((h.labels(lat, lon)[finest] >= 0).mean())
    return labelled, gini(h.counts(finest)), int(h.num_classes[finest])


def quiet(fn, log: Path):
    """``fn()`` with its log lines and bars sent to ``log``; (result, wall s)."""
    with open(log, "a") as f:
        old, sys.stderr = sys.stderr, f
        try:
            t = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - t
        finally:
            sys.stderr = old


def row(name: str, geo: dict, labelled: float, g: float, classes: int, train_s: float, n: int) -> str:
    accs = " | ".join(f"{100 * geo[f'acc_{km}km']:.1f}" for km in ACC)
    return (f"| {name} | {geo['geoscore']:.0f} | {geo['median_km']:,.0f} | {accs} | {100 * labelled:.0f}% | "
            f"{g:.2f} | {classes} | {train_s:.0f} | {n} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1500, help="demo world images (default: 1500)")
    ap.add_argument("--image-size", type=int, default=32, help="px, rendered and trained (default: 32)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of every run (default: 5)")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size of every run (default: 64)")
    ap.add_argument("--threads", type=int, default=2, help="compute threads (default: 2)")
    ap.add_argument("--backbone", default="resnet18", help="backbone spec, weights none (default: resnet18)")
    args = ap.parse_args()
    base = T.demo_config(backbone=args.backbone, image_size=args.image_size, epochs=args.epochs,
                         batch_size=args.batch_size, threads=args.threads, workers=1, seed=0, device="cpu")
    started, code = datetime.now(UTC), commit()  # the code that runs: HEAD may move during the run
    rows, sizes, hashes, baselines = [], set(), set(), {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ws = Workspace(root / "data", root / "models")
        log = root / "runs.log"
        from pipeline.demo import build_demo

        t = time.perf_counter()
        quiet(lambda: build_demo(ws, images=args.images, size=args.image_size, show_bar=False), log)
        print(f"demo world: {args.images} images at {args.image_size} px in {time.perf_counter() - t:.0f} s; "
              f"budget: {args.backbone} weights none, {args.epochs} epochs, batch {args.batch_size}, lr {base.lr}, "
              f"{args.threads} thread(s), seed 0, CPU", flush=True)
        current = None
        for i, (name, cells, head, loss) in enumerate(DESIGNS, 1):
            if cells != current:
                h = label(ws, cells)
                current = cells
                labelled, g, classes = coverage(ws, h)
                print(f"labels {cells}: levels {h.levels}, classes "
                      f"{'/'.join(str(h.num_classes[lv]) for lv in h.levels)}, split {h.splits['hash'][:12]}",
                      flush=True)
            cfg = replace(base, head=head, loss=loss, levels=None, run_name=f"ablation-{i}")
            run_dir, train_s = quiet(lambda cfg=cfg: T.train(ws, cfg), log)
            result, eval_s = quiet(lambda run_dir=run_dir: evaluate_run(run_dir, ws, progress=False), log)
            split_hash = result["source"].get("split_hash")
            hashes.add(split_hash)
            n = int(result["images"])
            sizes.add(n)
            baselines = baselines or result.get("baselines") or {}
            rule = result["geo"].get("rule", "hierarchical")
            rows.append(row(name, result["geo"], labelled, g, classes, train_s, n))
            if head == "hybrid":
                cen = result["geo_by_rule"].get(f"{rule}+centroid")
                if cen is not None:
                    rows.append(row(f"{name} (+centroid rule)", cen, labelled, g, classes, train_s, n))
            print(f"  {name}: trained in {train_s:.0f} s, evaluated in {eval_s:.0f} s, GeoScore "
                  f"{result['geo']['geoscore']:.0f} (rule {rule}), {n} test images, split "
                  f"{str(split_hash)[:12]}", flush=True)
    same = len(sizes) == 1 and len(hashes) == 1
    print(f"\ndate {started:%Y-%m-%d %H:%M} UTC, commit {code}; synthetic demo world ({args.images} images, "
          f"seed 0), one small CPU budget ({args.backbone} from scratch, {args.image_size} px, {args.epochs} epochs, "
          f"batch {args.batch_size}, {args.threads} thread(s)); test split: {', '.join(map(str, sorted(sizes)))} "
          f"images, {'the same split in every row' if same else 'SPLITS DIFFER ACROSS ROWS'}\n")
    print("| design | GeoScore | median km | acc@25 km % | acc@200 km % | acc@750 km % | acc@2500 km % | "
          "images with a finest class | Gini (finest) | finest classes | train s | test images |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(r)
    if baselines:
        print("\nbaselines on the same test images (no image looked at; eval.json of run 1): " + "; ".join(
            f"{name} GeoScore {b['geoscore']:.0f}, median {b['median_km']:,.0f} km" for name, b in baselines.items()))
    return 0 if same else 1


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
