"""Hierarchical prediction: latency and throughput against the seed's way, and the
threshold explorer's response time.

1. Per-image latency at 224 px, same image, random weights (``weights="none"``):
   - plain: one torchvision resnet50 forward (the floor);
   - seed: four separate resnet50 models, one per level (1, 3, 5, 8), then the seed's
     combination: for each kept parent, a Python loop writes its children's logits times
     the parent's probability into a -inf mask, then a softmax;
   - ours: one resnet50 backbone with four heads (``geohier.model``) and
     ``geohier.combine.combine`` (log space, vectorised).
   Goals: ours <= 1.15x plain, and >= 3.4x faster than the seed's way.
2. Batch throughput (images/s) of the three.
3. The combination alone per image (seed's loop vs ``combine``), and the explorer: one
   control change (``Explorer.evaluate``) over 10,000 synthetic val rows at the default
   levels, against the seed's loop over the same rows (timed on 200, scaled); goal well
   under a second (<= 0.5 s) for the adaptive, top-5 and cumulative rules; plus a
   10-point sweep (the trade-off curve).

The hierarchy is ``geohier.explorer.synthetic_hierarchy``: 150,000 synthetic photo
positions around 400 towns (min 5 images per class), about 7,500 level-8 classes and up to
~60 children under one parent, as a real data set would have. Times are the best of a few
interleaved repeats, single-threaded by default (the machine may be shared).
Run: ``.venv/bin/python bench/predict.py [--repeats N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torchvision

from geohier.combine import KeepRule, Tree, combine
from geohier.explorer import synthetic, synthetic_hierarchy
from geohier.model import build_model

LEVELS = (1, 3, 5, 8)
LATENCY_VS_PLAIN = 1.15
SPEEDUP_VS_SEED = 3.4
EXPLORER_GOAL_S = 0.5


def seed_combine(logits: dict, children: dict, levels, k_rule) -> int:
    """The seed's way, one image: adaptive top-k, then per kept parent a Python loop that
    fills its children's masked logits (times the parent's probability); returns the best
    finest class."""
    probs = torch.softmax(logits[levels[0]][0], 0)
    kept = probs.topk(min(k_rule(probs), probs.numel())).indices.tolist()
    for prev, lv in zip(levels, levels[1:], strict=False):
        z = logits[lv][0]
        masked = torch.full_like(z, float("-inf"))
        for p in kept:
            for c in children[prev][p]:
                masked[c] = z[c] * probs[p]
        probs = torch.softmax(masked, 0)
        n = int(torch.isfinite(masked).sum())
        kept = probs.topk(min(k_rule(probs), n)).indices.tolist()
    return kept[0]


def seed_k(probs) -> int:
    top = float(probs.max())
    return 1 if top >= 0.85 else 2 if top >= 0.65 else 3 if top >= 0.40 else 6


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def line(name: str, base: float, ours: float, ratio: float, goal: str, ok: bool | None, unit: str = "ms") -> None:
    scale = 1000.0 if unit == "ms" else 1.0
    print(f"{name:<34} baseline {base * scale:9.1f} {unit}   ours {ours * scale:9.1f} {unit}   "
          f"ratio {ratio:6.2f}x   goal {goal:<8} {'-' if ok is None else 'PASS' if ok else 'FAIL'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per measure (default: 7)")
    ap.add_argument("--batch", type=int, default=8, help="batch size of the throughput test (default: 8)")
    ap.add_argument("--rows", type=int, default=10_000, help="explorer val rows (default: 10000)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default: 1, steady on a shared machine; the ratios hold either way)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    args = ap.parse_args(argv)
    threads = max(1, min(args.threads, len(os.sched_getaffinity(0))))
    torch.set_num_threads(threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    h = synthetic_hierarchy(LEVELS)
    nc = h.num_classes
    tree = Tree.from_hierarchy(h)
    children = {lv: h.children_map(lv) for lv in LEVELS[:-1]}  # the seed's l1_to_l3 ... maps
    print(f"device {dev}, {threads} thread(s); classes per level {nc}; setup {time.perf_counter() - t0:.1f} s")

    plain = torchvision.models.resnet50(weights=None).eval().to(dev)
    ours = build_model("resnet50", nc, weights="none").eval().to(dev)
    seeds = [build_model("resnet50", {lv: nc[lv]}, weights="none").eval().to(dev) for lv in LEVELS]
    rule = KeepRule()  # the seed's adaptive rule
    x1 = torch.randn(1, 3, 224, 224, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run_plain(x):
        plain(x)
        sync()

    def run_ours(x):
        out = combine(ours(x), tree, rule)
        out.best().tolist()
        sync()

    def run_seed(x):
        logits = {}
        for m in seeds:  # one model per level
            logits.update(m(x))
        for i in range(x.shape[0]):
            seed_combine({lv: z[i:i + 1].cpu() for lv, z in logits.items()}, children, LEVELS, seed_k)
        sync()

    with torch.inference_mode():
        # ------------------------------------------------------------ latency, batch of 1
        for f in (run_plain, run_ours, run_seed):  # warm-up
            f(x1)
        tp, to, ts = [], [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit all three alike
            tp += timed(lambda: run_plain(x1), 1)
            to += timed(lambda: run_ours(x1), 1)
            ts += timed(lambda: run_seed(x1), 1)
        p, o, s = min(tp), min(to), min(ts)
        print(f"\nper-image latency at 224 px (best of {args.repeats}; medians: plain "
              f"{statistics.median(tp) * 1e3:.0f} ms, ours {statistics.median(to) * 1e3:.0f} ms, "
              f"seed {statistics.median(ts) * 1e3:.0f} ms)")
        line("ours vs one plain resnet50 forward", p, o, o / p, f"<= {LATENCY_VS_PLAIN}x", o / p <= LATENCY_VS_PLAIN)
        line("ours vs the seed's way", s, o, s / o, f">= {SPEEDUP_VS_SEED}x", s / o >= SPEEDUP_VS_SEED)
        # ------------------------------------------------------------ throughput
        xb = torch.randn(args.batch, 3, 224, 224, device=dev)
        run_plain(xb), run_ours(xb), run_seed(xb)
        reps = max(2, (args.repeats + 1) // 2)
        bp, bo, bs = [], [], []
        for _ in range(reps):
            bp += timed(lambda: run_plain(xb), 1)
            bo += timed(lambda: run_ours(xb), 1)
            bs += timed(lambda: run_seed(xb), 1)
        n = args.batch
        print(f"\nbatch throughput, batch of {n} (best of {reps}): plain {n / min(bp):.1f} img/s, "
              f"ours {n / min(bo):.1f} img/s, seed {n / min(bs):.1f} img/s")
        line("batch: ours vs plain (time)", min(bp), min(bo), min(bo) / min(bp), f"<= {LATENCY_VS_PLAIN}x",
             min(bo) / min(bp) <= LATENCY_VS_PLAIN)
        line("batch: ours vs the seed's way", min(bs), min(bo), min(bs) / min(bo), f">= {SPEEDUP_VS_SEED}x",
             min(bs) / min(bo) >= SPEEDUP_VS_SEED)

    # ---------------------------------------------------------------- combination, explorer
    ex = synthetic(rows=args.rows, hierarchy=h)
    rows = {lv: z for lv, z in ex.val.logits.items()}
    sample = 200  # the seed's loop is timed on a sample and scaled to all rows
    one = [{lv: z[i:i + 1] for lv, z in rows.items()} for i in range(sample)]
    t_seed = min(timed(lambda: [seed_combine(r, children, LEVELS, seed_k) for r in one], 2)) / sample
    t_ours = min(timed(lambda: [combine(r, tree, rule).best().tolist() for r in one], 2)) / sample
    print(f"\nthe combination alone, per image, on {sample} synthetic val rows (uncertain logits)")
    line("per image: ours vs the seed's loop", t_seed, t_ours, t_seed / t_ours, "-", None)
    print(f"\nthreshold explorer: {args.rows:,} synthetic val rows")
    worst = 0.0
    for r in (KeepRule(), KeepRule("topk", top_k=5), KeepRule("cumulative", cumulative=0.9)):
        ex.evaluate(r)
        t = min(timed(lambda r=r: ex.evaluate(r), 3))
        worst = max(worst, t)
        m = ex.evaluate(r)
        print(f"  {r.describe():<48} {t * 1e3:7.1f} ms  (hit {m['hit']:.3f}, kept {m['kept']:.2f})")
    t_sweep = min(timed(lambda: ex.sweep(KeepRule()), 1))
    print(f"  a 10-point sweep (the trade-off curve)           {t_sweep * 1e3:7.1f} ms")
    line("explorer: one control change", t_seed * args.rows, worst, t_seed * args.rows / worst,
         f"<= {EXPLORER_GOAL_S} s", worst <= EXPLORER_GOAL_S, unit="s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
