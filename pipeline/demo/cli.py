"""``python -m pipeline demo [--images N] [--seed S]``: the demo world's command."""

from __future__ import annotations

import argparse

from geohier.workspace import Workspace
from pipeline.demo.build import DEFAULT_IMAGES, DEFAULT_SIZE, MAX_SIZE, MIN_SIZE, build_demo
from pipeline.demo.world import DEFAULT_SEED


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="build the synthetic demo world (no token, no internet)",
        description="Render a synthetic street-level dataset near real populated places into the "
                    "workspace. Deterministic from --seed; rerunning adds nothing new.")
    p.add_argument("--images", type=_positive_int, default=DEFAULT_IMAGES,
                   help=f"number of images (default: {DEFAULT_IMAGES})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"world seed; another seed adds other images (default: {DEFAULT_SEED})")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help=f"image width and height in px, {MIN_SIZE}-{MAX_SIZE} (default: {DEFAULT_SIZE})")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="rendering processes (default: up to 2)")
    p.set_defaults(func=run)


def run(args, ws: Workspace) -> int:
    s = build_demo(ws, images=args.images, seed=args.seed, size=args.size, workers=args.workers)
    imb = s["imbalance"]["5"]
    print(f"demo world (seed {s['seed']}): added {s['added']} images, skipped {s['skipped']} already "
          f"there, in {s['seconds']} s; {s['countries']} countries, {s['sequences']} sequences; "
          f"L5: {imb['cells']} cells, Gini {imb['gini']}, max/median {imb['max_median']}; "
          f"workspace: {s['workspace_images']} images")
    return 0
