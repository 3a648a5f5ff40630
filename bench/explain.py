"""Seconds per photo of ``geohier.explain.occlusion`` and ``gradcam`` (``predict --explain``) on this machine.

Occlusion sensitivity costs ``grid**2 + 1`` forwards per photo (50 at the default 7 x 7),
in batches of 16 through the Predictor's own forward. Rows: resnet50 and a ViT-B/16
(timm's ``vit_base_patch16_224``, built from its config, offline) at 224 px (random
weights: the cost does not depend on them) and the test suite's tiny resnet18 at 32 px,
each with one plain forward of one photo as the baseline and the ratio in the same run.
Usage: ``python bench/explain.py [--grid 7] [--repeat 2]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from geohier import explain
from geohier.hierarchy import build_hierarchy
from geohier.model import build_model
from geohier.predictor import Predictor
from geohier.presets import EvalPreset


def predictor(backbone: str, image_size: int) -> Predictor:
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-60, 70, 5000), rng.uniform(-180, 180, 5000)
    h = build_hierarchy(lat, lon, (1, 3, 5), min_images=1)
    torch.manual_seed(0)
    model = build_model(backbone, {lv: h.num_classes[lv] for lv in h.levels}, weights="none").eval()
    meta = {"hierarchy": h.to_dict(), "hierarchy_hash": h.hash, "input": EvalPreset(image_size).to_dict(),
            "arch": {"levels": list(h.levels)}, "temperatures": {}}
    return Predictor([(model, meta, Path(f"{backbone}-{image_size}px"))], "cpu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, default=explain.DEFAULT_GRID)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    print(f"torch threads {torch.get_num_threads()}; grid {args.grid} x {args.grid} "
          f"({args.grid ** 2 + 1} forwards per photo); a 640 x 480 photo")
    for backbone, size in (("resnet50", 224), ("timm:vit_base_patch16_224", 224), ("resnet18", 32)):
        pred = predictor(backbone, size)
        pred.logits([photo])  # warm up
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            pred.logits([photo])
        one = (time.perf_counter() - t0) / args.repeat
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            e = explain.occlusion(pred, photo, grid=args.grid)
        per = (time.perf_counter() - t0) / args.repeat
        print(f"{backbone} at {size} px: one forward {one:.3f} s (baseline); explanation {per:.2f} s per photo "
              f"({per / one:.0f}x one forward; {e.forwards} forwards)")
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            cam = explain.gradcam(pred, photo)
        per_cam = (time.perf_counter() - t0) / args.repeat
        print(f"{backbone} at {size} px: Grad-CAM {per_cam:.2f} s per photo ({per_cam / one:.1f}x one forward; "
              f"{cam.layer}, {cam.cam.shape[0]} x {cam.cam.shape[1]} map); {per / per_cam:.0f}x faster than occlusion")


if __name__ == "__main__":
    main()
