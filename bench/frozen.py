"""Benchmark: heads on cached embeddings (train --frozen) vs fine-tuning, and the embedding cache.

A frozen-backbone run embeds each image once into the workspace's embedding cache and then
trains only the level heads on the features, so an epoch should cost a tiny fraction of a
fine-tuning epoch of the same backbone over the same images: goal >= 50x faster.

All on one generated demo world (``pipeline.demo``, rendered at --image-size px, labels
and splits as ``pipeline labels`` makes them), CPU, the demo recipe (``demo_config``:
batch 64, one loader worker), no validation pass in the epochs (``limit_val=0``):

1. one fine-tuning epoch vs one heads epoch, same backbone, same train images, each the
   epoch's ``time_s`` in the run's metrics history (the train loop alone; the last
   fine-tuning epoch, the median of the heads epochs after the first); then the honest
   total: embedding once + N heads epochs vs N fine-tuning epochs, and the break-even N;
2. the embedding throughput of that backbone (img/s of ``geohier.embeddings.embed`` as the
   first frozen run calls it: decode + preprocess + forward + cache writes);
3. the cache's second-run saving: the same frozen run twice, the second reusing every
   embedding; both wall times (``train()`` from call to return) and their ratio;
4. heads on 1M embeddings: one epoch of the level heads over ``--rows`` synthetic feature
   rows (D = ``--dim``) through FrozenFit's own path (``FeatureSet`` + ``FeatureLoader`` +
   ``HeadsOnly`` + its fused AdamW + ``loop.train_one_epoch``), for the class counts of
   the demo world's hierarchy (4,000 images: 4/29/138/342) and a realistic 4/64/1,024/5,000
   split, at batch 1,024 and at the recipe's 64, next to its floor: the epoch's matmul FLOPs
   (forward 2BDC + weight gradient 2BDC, C the classes of all levels) at the GEMM rate
   measured here on the same shapes. By default only the demo split at batch 1,024 runs
   its whole epoch; the others run their first ``--partial-s`` seconds, scaled to all of
   their steps (said so in the output); ``--full`` runs every epoch whole.

Run: ``.venv/bin/python bench/frozen.py [--images N] [--image-size PX] [--backbone SPEC]
[--rows N] [--dim D] [--threads N] [--full]`` (default: about 4 minutes on 2 shared cores;
``--full``: 4,000 images and whole 1M-row epochs, about 35 minutes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

import pipeline.train.fit as fit_mod
import pipeline.train.frozen as frozen_mod
from geohier.model import build_model
from geohier.runs import Run
from geohier.workspace import Workspace
from pipeline import train as T
from pipeline.train import loop
from pipeline.train.distributed import StopFlag, teardown
from pipeline.train.fit import load_hierarchy
from pipeline.train.mixing import Mixing

GOAL = 50.0          # heads epoch at least this many times faster than a fine-tuning epoch
RECIPE_EPOCHS = 6    # the demo recipe's epochs, for the honest total
LEVELS = (1, 3, 5, 8)
DEMO_SPLIT = "demo world, 4,000 images"
SPLITS = {DEMO_SPLIT: (4, 29, 138, 342), "realistic": (4, 64, 1024, 5000)}


class Probe:
    """Wraps ``module.name`` to record what each call took (and returned)."""

    def __init__(self, module, name: str):
        self.module, self.name, self.orig = module, name, getattr(module, name)
        self.calls: list[tuple[float, object]] = []

    def __enter__(self):
        def wrapped(*a, **kw):
            t = time.perf_counter()
            out = self.orig(*a, **kw)
            self.calls.append((time.perf_counter() - t, out))
            return out

        setattr(self.module, self.name, wrapped)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.orig)


def build_world(root: Path, images: int, size: int) -> Workspace:
    from pipeline.demo import build_demo
    from pipeline.labels import build_labels

    ws = Workspace(root / "data", root / "models")
    build_demo(ws, images=images, size=size, show_bar=False)
    build_labels(ws)
    return ws


def quiet_train(ws: Workspace, cfg: T.TrainConfig, log: Path) -> tuple[Path, float]:
    """``train(ws, cfg)`` with its log lines and bars sent to ``log``; (run dir, wall s)."""
    with open(log, "a") as f:
        old, sys.stderr = sys.stderr, f
        try:
            t = time.perf_counter()
            run_dir = T.train(ws, cfg)
            return run_dir, time.perf_counter() - t
        finally:
            sys.stderr = old


def epoch_times(run_dir: Path) -> list[float]:
    return [float(r["time_s"]) for r in Run(run_dir).history()]


def threads_of(cfg: T.TrainConfig) -> int:
    """The compute threads ``train`` gives a run of ``cfg`` on this machine."""
    old = torch.get_num_threads()
    env = T.setup_env("cpu", cfg.threads, cfg.workers)
    n = torch.get_num_threads()
    teardown(env)
    torch.set_num_threads(old)
    return n


# ----------------------------------------------------------------------------- 1M rows


def gemm_rate(batch: int, dim: int, classes: int, seconds: float = 1.0) -> float:
    """The best FLOP/s of the heads' two matmuls on this CPU over about ``seconds`` (at
    least three tries): logits (B, D) x (D, C) and the weight gradient (C, B) x (B, D), all
    levels' heads as one (C, D) matrix. The best try, so the floor it gives is a lower bound."""
    x, w, g = torch.randn(batch, dim), torch.randn(classes, dim), torch.randn(batch, classes)
    x @ w.T
    g.T @ x
    best, tries, start = 0.0, 0, time.perf_counter()
    while tries < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        x @ w.T
        g.T @ x
        best = max(best, 4 * batch * dim * classes / (time.perf_counter() - t))
        tries += 1
    return best


def heads_epoch(feats: torch.Tensor, classes: tuple[int, ...], batch: int, budget_s: float | None,
                cfg: T.TrainConfig) -> tuple[float, int, int]:
    """One epoch of the level heads over ``feats`` on FrozenFit's path, or its first steps
    until ``budget_s`` have passed: (seconds, steps timed, steps in the epoch)."""
    n, d = feats.shape
    levels = list(LEVELS[:len(classes)])
    rng = np.random.default_rng(0)
    labels = np.stack([rng.integers(0, c, n) for c in classes], 1)
    data = frozen_mod.FeatureSet(feats, labels, np.zeros(n), np.zeros(n))
    loader = frozen_mod.FeatureLoader(data, batch, shuffle=True, seed=0, drop_last=n >= 2 * batch)
    net = build_model("resnet18", dict(zip(levels, classes, strict=True)), weights="none", frozen=True)
    if net.feature_dim != d:  # the heads a d-dim backbone would get (the backbone itself never runs)
        net.heads = nn.ModuleDict({str(lv): nn.Linear(d, c) for lv, c in zip(levels, classes, strict=True)})
    model = frozen_mod.HeadsOnly(net)
    criterion = T.GeoLoss(levels, cfg.level_weights, cfg.label_smoothing)
    trained = [p for p in model.parameters() if p.requires_grad]  # as _Fit.build, then FrozenFit.build
    opt = torch.optim.AdamW([{"params": [p for p in trained if p.ndim > 1], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}], lr=cfg.lr)
    opt = frozen_mod.fused_adamw(opt)
    total = len(loader)
    sched = T.make_scheduler(opt, total, 0)
    env = T.setup_env("cpu", cfg.threads, cfg.workers)
    stop = StopFlag()
    marks: list[float] = []

    def on_step(i: int, loss: float) -> None:
        if i == 1:
            marks.append(time.perf_counter())
        if budget_s is not None and time.perf_counter() - t > budget_s:
            stop.set = True  # ends the epoch at the next step, as a cancel would

    t = time.perf_counter()
    out = loop.train_one_epoch(model, criterion, opt, sched, torch.amp.GradScaler("cuda", enabled=False), loader,
                               env, epoch=1, epochs=1, steps=total, stop=stop, mixing=Mixing(), amp=False,
                               image_size=cfg.image_size, stats={"unreadable": 0}, log=print, on_step=on_step)
    secs, steps = time.perf_counter() - t, int(out["steps"])
    if steps < total and steps > 1:  # the first step (allocations) once, the others' mean for the rest
        secs = (marks[0] - t) + (secs - (marks[0] - t)) / (steps - 1) * (total - 1)
    elif steps < total:
        secs *= total / max(1, steps)
    return secs, steps, total


def million(args, cfg: T.TrainConfig) -> None:
    n, d = args.rows, args.dim
    t = time.perf_counter()
    feats = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    threads = threads_of(cfg)
    print(f"\n4. heads on {n:,} embeddings (D = {d}, float32, {feats.numel() * 4 / 2**30:.1f} GiB, made in "
          f"{time.perf_counter() - t:.1f} s), {threads} compute thread(s), FrozenFit's loop, one epoch:")
    old = torch.get_num_threads()
    try:
        for name, classes in SPLITS.items():
            for batch in (1024, cfg.batch_size):
                whole = args.full or (name == DEMO_SPLIT and batch == 1024)
                epoch, steps, total = heads_epoch(feats, classes, batch, None if whole else args.partial_s, cfg)
                rate = gemm_rate(batch, d, sum(classes))
                flops = 4 * (total * batch) * d * sum(classes)
                floor = flops / rate
                how = "whole epoch" if steps == total else f"first {steps} of {total} steps timed, scaled"
                print(f"  {'/'.join(map(str, classes)):>15} ({name}), batch {batch:4d}: {epoch:7.1f} s/epoch, "
                      f"{epoch / total * 1e3:6.1f} ms/step ({how}); matmul floor {floor:6.1f} s "
                      f"({flops / 1e12:.2f} TFLOP at {rate / 1e9:.1f} GFLOP/s) -> {epoch / floor:.2f}x the floor")
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=None, help="demo world images (default: 1000; --full: 4000)")
    ap.add_argument("--image-size", type=int, default=64, help="px, rendered and trained (default: 64)")
    ap.add_argument("--backbone", default="resnet18", help="backbone spec, weights none (default: resnet18; "
                    "e.g. timm:test_vit)")
    ap.add_argument("--finetune-epochs", type=int, default=None,
                    help="fine-tuning epochs; the last is timed (default: 2)")
    ap.add_argument("--head-epochs", type=int, default=4, help="epochs of each frozen run (default: 4)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="synthetic feature rows (default: 1,000,000)")
    ap.add_argument("--dim", type=int, default=512, help="feature size of the rows (default: 512)")
    ap.add_argument("--partial-s", type=float, default=10.0,
                    help="seconds timed of each slow 1M-row epoch, then scaled to all its steps (default: 10)")
    ap.add_argument("--threads", type=int, default=None, help="compute threads (default: train's choice)")
    ap.add_argument("--full", action="store_true", help="4,000 images and whole 1M-row epochs")
    ap.add_argument("--skip-million", action="store_true", help="leave out the 1M-row section")
    args = ap.parse_args()
    images = args.images or (4000 if args.full else 1000)
    ft_epochs = args.finetune_epochs or 2
    cfg = T.demo_config(backbone=args.backbone, image_size=args.image_size, device="cpu", limit_val=0,
                        warmup_epochs=0.0, threads=args.threads)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        ws = build_world(root, images, args.image_size)
        h = load_hierarchy(ws)
        with ws.manifest() as m:
            n_train = int(m.conn.execute("SELECT COUNT(*) FROM images WHERE split = 'train'").fetchone()[0])
        threads = threads_of(cfg)
        print(f"demo world: {images} images at {args.image_size} px in {time.perf_counter() - t:.1f} s, "
              f"{n_train} train, classes {'/'.join(str(h.num_classes[lv]) for lv in h.levels)} (levels "
              f"{'/'.join(map(str, h.levels))}); {args.backbone} weights none, batch {cfg.batch_size}, "
              f"{cfg.workers} loader worker(s), {threads} compute thread(s), CPU, no val pass in the epochs")
        log = root / "runs.log"

        ft_dir, ft_wall = quiet_train(ws, replace(cfg, epochs=ft_epochs, run_name="finetune"), log)
        ft = epoch_times(ft_dir)
        fz_cfg = replace(cfg, frozen=True, epochs=args.head_epochs)
        runs = []
        for name in ("frozen-1", "frozen-2"):
            with Probe(frozen_mod, "embed") as emb, Probe(fit_mod, "calibrate") as cal:
                run_dir, wall = quiet_train(ws, replace(fz_cfg, run_name=name), log)
            runs.append({"dir": run_dir, "wall": wall, "embed_s": emb.calls[0][0], "embed": emb.calls[0][1],
                         "calibrate_s": sum(c[0] for c in cal.calls), "epochs": epoch_times(run_dir)})
        first, second = runs
        heads = [s for r in runs for s in r["epochs"][1:]] or first["epochs"]
        head_s, ft_s = statistics.median(heads), ft[-1]
        ratio = ft_s / head_s
        ok = ratio >= GOAL
        print(f"\n1. one epoch over the {n_train} train images, {args.backbone} at {args.image_size} px:")
        print(f"baseline  fine-tuning epoch (backbone + heads):  {ft_s:8.2f} s   (epoch {len(ft)} of {len(ft)}: "
              f"{', '.join(f'{s:.1f}' for s in ft)} s)")
        print(f"geohier   heads epoch on cached embeddings:      {head_s:8.3f} s   (median of epochs 2-"
              f"{args.head_epochs} of both frozen runs: {', '.join(f'{s:.2f}' for s in heads)} s)")
        print(f"ratio     {ratio:.0f}x faster   goal >= {GOAL:.0f}x   {'PASS' if ok else 'FAIL'}")
        emb_s = first["embed_s"]
        for n in (1, RECIPE_EPOCHS):
            fz_total, ft_total = emb_s + n * head_s, n * ft_s
            print(f"          {n} epoch(s), embedding included: {fz_total:.1f} s frozen vs {ft_total:.1f} s "
                  f"fine-tuning = {ft_total / fz_total:.1f}x")
        print(f"          break-even after {emb_s / (ft_s - head_s):.2f} epochs: embedding once ({emb_s:.1f} s) "
              f"costs that many fine-tuning epochs")

        rep = first["embed"]
        print(f"\n2. embedding throughput: {rep['images_per_s']:.1f} img/s ({rep['new']} images in "
              f"{rep['seconds']:.1f} s: decode, preprocess, forward, cache writes), batch {cfg.batch_size}, "
              f"{cfg.workers} loader worker(s), {threads} compute thread(s)")

        rep2 = second["embed"]
        reused = rep2["new"] == 0 and rep2["reused"] == rep["new"] + rep["reused"]
        ok = ok and reused
        print(f"\n3. the same frozen run twice ({args.head_epochs} heads epochs each, wall time of train()):")
        print(f"baseline  first run (embeds {rep['new']}):  {first['wall']:7.1f} s   (embedding {first['embed_s']:.1f} s, "
              f"calibration on val {first['calibrate_s']:.1f} s)")
        print(f"geohier   second run (reuses {rep2['reused']}, embeds {rep2['new']}): {second['wall']:7.1f} s   "
              f"(embed() with nothing to embed {second['embed_s']:.2f} s, calibration on val {second['calibrate_s']:.1f} s)")
        print(f"ratio     {first['wall'] / second['wall']:.1f}x faster   every embedding reused: "
              f"{'yes' if reused else 'NO'}")
        print(f"fine-tuning run for comparison: {ft_wall:.1f} s wall ({ft_epochs} epoch(s) + calibration)")
    if not args.skip_million:
        million(args, cfg)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
