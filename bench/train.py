"""Benchmark: one epoch of the multi-level model vs the seed's four per-level runs.

The seed trained one ResNet per level (L1, L3, L5, L8): four backbones see every image.
geohier's default model shares one backbone and adds a linear head per level, so an epoch
should cost about one per-level run: goal <= 0.35x the four runs' time.

Both sides run ``pipeline.train.train`` on the same generated workspace (a few hundred
small JPEGs, levels 1/3/5/8, resnet18 at 48 px, CPU) and are timed by the epoch's
``time_s`` in its metrics history (train loop only: no val split). A second section compares the
data loader's throughput alone with the model step's throughput alone, to show which one
bounds an epoch.

Run: ``.venv/bin/python bench/train.py [--images N] [--image-size PX] [--backbone NAME]``
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from geohier.hierarchy import build_hierarchy
from geohier.runs import Run
from geohier.workspace import Workspace
from pipeline import train as T

GOAL = 0.35
LEVELS = (1, 3, 5, 8)


def make_workspace(root: Path, n: int, size: int, seed: int = 0) -> Workspace:
    """``n`` JPEGs clustered around a few dozen places (so L8 has classes), all in train."""
    rng = np.random.default_rng(seed)
    ws = Workspace(root / "data", root / "models")
    centres = np.column_stack([rng.uniform(-55, 65, 24), rng.uniform(-170, 170, 24)])
    pick = rng.integers(0, len(centres), n)
    lat = np.clip(centres[pick, 0] + rng.normal(0, 0.3, n), -89, 89)
    lon = centres[pick, 1] + rng.normal(0, 0.6, n)
    with ws.manifest() as m:
        ids = {}
        for i in range(n):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            arr[: size // 2] = (pick[i] * 10) % 255  # a little signal
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=85)
            ids[m.store_image(buf.getvalue(), "jpg", source="bench", source_id=str(i),
                              lat=float(lat[i]), lon=float(lon[i]))] = "train"
        m.set_splits(ids)
    build_hierarchy(lat, lon, list(LEVELS), min_images=1).save(ws.hierarchy_path)
    return ws


def epoch_time(run_dir: Path) -> float:
    return float(Run(run_dir).history()[-1]["time_s"])


def loader_vs_step(ws: Workspace, cfg: T.TrainConfig, batches: int = 6) -> tuple[float, float]:
    """Images/s of the train loader alone, and of forward+backward+AdamW alone."""
    from geohier.hierarchy import Hierarchy
    from geohier.model import build_model

    h = Hierarchy.load(ws.hierarchy_path)
    env = T.setup_env("cpu", cfg.threads, cfg.workers)  # the thread count train() uses
    data = T.load_data(ws, h, cfg, list(LEVELS), env)
    loader = data.train_loader
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        n += batch.images.shape[0]
        if i + 1 >= batches:
            break
    load_rate = n / (time.perf_counter() - t0)
    model = build_model(cfg.backbone, h.num_classes)
    crit = T.GeoLoss(LEVELS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    y = torch.stack([torch.randint(0, h.num_classes[lv], (cfg.batch_size,)) for lv in LEVELS], 1)
    model.train()
    for i in range(batches + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss, _ = crit(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step_rate = batches * cfg.batch_size / (time.perf_counter() - t0)
    return load_rate, step_rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=320, help="training images (default: 320)")
    ap.add_argument("--image-size", type=int, default=48, help="input px (default: 48)")
    ap.add_argument("--backbone", default="resnet18", help="backbone (default: resnet18)")
    ap.add_argument("--workers", type=int, default=1, help="loader processes (default: 1)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        ws = make_workspace(root, args.images, 64)
        print(f"workspace: {args.images} images in {time.perf_counter() - t:.1f} s; "
              f"{args.backbone} at {args.image_size} px, levels {LEVELS}, CPU")
        cfg = T.TrainConfig(backbone=args.backbone, weights="none", image_size=args.image_size, epochs=1,
                            batch_size=32, warmup_epochs=0.0, workers=args.workers, device="cpu",
                            limit_val=0, levels=list(LEVELS))
        quiet = open(root / "stderr.txt", "w")  # keep the runs' own log lines off the report
        old, sys.stderr = sys.stderr, quiet
        try:
            multi_dir = T.train(ws, replace(cfg, run_name="multi"))
            per_dirs = T.train_runs(ws, replace(cfg, per_level=True, run_name="seed"))
        finally:
            sys.stderr = old
            quiet.close()
        multi = epoch_time(multi_dir)
        per = [epoch_time(d) for d in per_dirs]
        base = sum(per)
        ratio = multi / base
        print(f"baseline  four per-level runs (seed): {base:7.2f} s  "
              f"({' + '.join(f'L{lv} {s:.2f}' for lv, s in zip(LEVELS, per, strict=True))})")
        print(f"geohier   one multi-level model:      {multi:7.2f} s")
        print(f"ratio     {ratio:.3f}x   goal <= {GOAL}x   {'PASS' if ratio <= GOAL else 'FAIL'}")
        load_rate, step_rate = loader_vs_step(ws, cfg)
        bound = "data loader" if load_rate < step_rate else "model step"
        print(f"throughput  loader alone {load_rate:8.1f} img/s ({args.workers} worker(s))   "
              f"model step alone {step_rate:8.1f} img/s   -> bound by the {bound} "
              f"(loader/step {load_rate / step_rate:.2f}, {torch.get_num_threads()} compute thread(s))")
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
