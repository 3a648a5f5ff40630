"""Benchmark: what one CUDA GPU does with geohier's workloads ("Ready for a GPU").

One run (a few minutes: every case has its own time budget: 5 warm-up steps, then at most 30
timed steps or 15 s; a loader setting 40 s; a heads epoch 40 s, past which it is extrapolated;
and no case starts after ``--budget-s``, default 420 s) prints a markdown table with the GPU's
name, the torch version and the date. Each row is measured in this run; the
"vs" column is the ratio to the part's baseline row, measured in the same run:

1. **finetune**: fine-tuning img/s of geohier's model (``geohier.model.build_model``:
   torchvision's resnet50 with ``weights=None``, nothing downloaded, plus the level heads
   4/64/1,024/5,000) at 224 px, batch 128: forward + ``GeoLoss`` + backward + AdamW step
   on random data; fp32 (baseline), fp32 channels_last, bf16 autocast, bf16 autocast +
   channels_last (``pipeline.train``'s CUDA recipe) and that with ``cudnn.benchmark``.
2. **loader**: a real DataLoader over 512 generated 640 x 480 JPEGs in a temporary folder,
   each decoded and augmented to 224 px as training does (``geohier.dataset._open_image``
   + ``geohier.presets.TrainPreset``, ``geohier.dataset.collate``, the loader options of
   ``pipeline.train.data``), at 0, 2, 4, 8 and all-cores workers (capped by the CPU count):
   img/s of the second epoch, and its ratio to part 1's GPU rate (below 1: the loader is
   the bottleneck).
3. **embed**: frozen-embedding img/s of a ViT-B/16 with random weights built from a config
   (transformers' CLIPVisionConfig(patch_size=16): the vision tower of the suggested
   ``hf:openai/clip-vit-base-patch16``, behind ``geohier.backbones.Backbone``; torchvision's
   ViT-B/16 without transformers or with ``--vit torchvision``) at batch 256 under
   ``torch.inference_mode``, features copied back to the CPU as ``geohier.embeddings``
   does; fp32 (baseline) vs bf16 autocast.
4. **heads**: one epoch of the level heads (``GeoModel.forward_heads`` through
   ``pipeline.train.frozen.HeadsOnly``, ``GeoLoss``, the fused AdamW of a frozen run) over
   1,000,000 cached embeddings (random, (1M, 768) float16 on the GPU, the cache's dtype)
   at batch 4,096: seconds and samples/s, for the class counts 4/64/1,024/5,000 and every
   quadtree cell of levels 1/3/5/8 (4/64/1,024/65,536); fp32 (baseline) vs bf16 autocast.
5. **ddp**: part 1's CUDA recipe wrapped in DistributedDataParallel in a 1-process NCCL
   group (``tcp://127.0.0.1:<free port>``) vs the plain model, timed back to back; a
   missing NCCL prints the row as ``unavailable: <reason>``.

A case that fails (out of memory, ...) prints its row with the error and the run goes on;
the exit status is then 1. Without CUDA the script prints one line saying nothing was
measured and exits 0.

Run: ``.venv/bin/python bench/gpu.py [--quick] [--parts finetune,loader,embed,heads,ddp]
[--budget-s S]``. ``--quick``: toy sizes (resnet18 at 32 px, batch 2; a 2-layer ViT at 32
px; 1,000 embeddings of 64 values), two steps per case, no warm-up: a smoke run of seconds,
whose rates mean nothing. ``--device cpu --quick`` runs every part at those sizes on the CPU, one
thread, gloo for the DDP row: what tests/test_bench_gpu.py checks on machines without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("finetune", "loader", "embed", "heads", "ddp")
LEVELS = (1, 3, 5, 8)  # geohier.grid.DEFAULT_LEVELS
REALISTIC = (4, 64, 1024, 5000)  # what a hierarchy keeps of levels 1/3/5/8 (bench/frozen.py)
EVERY_CELL = (4, 64, 1024, 65536)  # every quadtree cell of levels 1/3/5/8 (4 ** level)
RECIPE = "bf16 autocast channels_last"  # pipeline.train on CUDA (fit.build, loop.autocast)


@dataclass(frozen=True)
class Sizes:
    backbone: str = "resnet50"
    image: int = 224
    batch: int = 128
    warmup: int = 5           # steps before the clock starts (cuDNN/allocator warm-up)
    steps: int = 30           # timed steps per case, at most ...
    seconds: float = 15.0     # ... or this many seconds, whichever comes first
    loader_images: int = 512
    loader_source: tuple[int, int] = (640, 480)
    loader_batch: int = 16    # small: each of 16 workers gets two batches an epoch
    loader_seconds: float = 40.0  # per worker count (two epochs)
    vit: dict = field(default_factory=lambda: dict(image_size=224, patch_size=16, hidden_size=768,
                                                   intermediate_size=3072, num_hidden_layers=12,
                                                   num_attention_heads=12))
    embed_batch: int = 256
    rows: int = 1_000_000
    dim: int = 768
    heads_batch: int = 4096
    class_splits: tuple[tuple[int, ...], ...] = (REALISTIC, EVERY_CELL)
    heads_seconds: float = 40.0  # per epoch; a longer epoch is extrapolated from its first steps


FULL = Sizes()
QUICK = Sizes(backbone="resnet18", image=32, batch=2, warmup=0, steps=2, seconds=5.0, loader_images=8, loader_source=(64, 48),
              loader_batch=2, loader_seconds=20.0,
              vit=dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2),
              embed_batch=2, rows=1000, dim=64, heads_batch=256, class_splits=(REALISTIC,), heads_seconds=10.0)


# ----------------------------------------------------------------------------- plumbing


class Budget(Exception):
    """The run's --budget-s is spent: the case is skipped."""


class Unavailable(Exception):
    """The case cannot run here (no NCCL, no bf16): its row says so, it is no failure."""


@dataclass
class Measure:
    items: int
    seconds: float
    steps: int
    peak_gib: float | None = None

    @property
    def rate(self) -> float:
        return self.items / self.seconds

    def note(self) -> str:
        peak = f", peak {self.peak_gib:.1f} GiB" if self.peak_gib is not None else ""
        return f"{self.steps} steps in {self.seconds:.2f} s{peak}"


class Ctx:
    """The device, the sizes, the run's clock and the table being printed."""

    def __init__(self, device, sizes: Sizes, budget_s: float, vit: str):
        import torch

        self.torch, self.device, self.sizes, self.vit = torch, device, sizes, vit
        self.cuda = device.type == "cuda"
        self.deadline = time.perf_counter() + budget_s
        self.failed = 0

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def autocast(self, amp: bool):
        if not amp:
            return contextlib.nullcontext()
        if self.cuda and not self.torch.cuda.is_bf16_supported():
            raise Unavailable("this GPU has no bfloat16")
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> float | None:
        return self.torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.cuda else None

    def row(self, part: str, case: str, rate: str, vs: str = "", notes: str = "") -> None:
        print(f"| {part} | {case} | {rate} | {vs} | {notes} |", flush=True)

    def case(self, part: str, case: str, fn: Callable[[], tuple[str, str, str] | None]):
        """Run one case; its row is what ``fn`` returns (rate, vs, notes), or its error."""
        try:
            if self.left() <= 0:
                raise Budget
            out = fn()
        except Budget:
            self.row(part, case, "skipped", "", "the run's --budget-s is spent")
            return
        except Unavailable as exc:
            self.row(part, case, f"unavailable: {exc}", "", "")
            return
        except Exception as exc:  # an OOM or any other failure: this row, then the next case
            self.failed += 1
            self.row(part, case, f"error: {type(exc).__name__}: {one_line(exc)}", "", "")
            out = None
        finally:
            cleanup(self)
        if out is not None:
            self.row(part, case, *out)


def one_line(exc: BaseException, n: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text[:n] + ("..." if len(text) > n else "")


def cleanup(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        ctx.torch.cuda.empty_cache()


def rate_text(rate: float, unit: str = "img/s") -> str:
    return f"{rate:,.0f} {unit}" if rate >= 100 else f"{rate:,.2f} {unit}"


def ratio_text(num: float | None, den: float | None, prefix: str = "") -> str:
    return f"{prefix}{num / den:.2f}x" if num and den else ""


def timed(ctx: Ctx, step: Callable[[], object], items: int, warmup: int | None = None,
          steps: int | None = None, seconds: float | None = None) -> Measure:
    """``warmup`` steps, then at most ``steps`` steps or ``seconds`` (and never past the
    run's budget), the device synchronised before the clock starts and before it stops."""
    s = ctx.sizes
    warmup, steps = s.warmup if warmup is None else warmup, s.steps if steps is None else steps
    seconds = min(s.seconds if seconds is None else seconds, max(ctx.left(), 0.0))
    ctx.reset_peak()
    for _ in range(warmup):
        step()
    ctx.sync()
    t0, n = time.perf_counter(), 0
    while n < steps:
        step()
        n += 1
        if time.perf_counter() - t0 > seconds:
            break
    ctx.sync()
    return Measure(n * items, time.perf_counter() - t0, n, ctx.peak())


# ----------------------------------------------------------------------------- 1. fine-tuning


def train_measure(ctx: Ctx, amp: bool, channels_last: bool, wrap: Callable | None = None) -> Measure:
    """forward + GeoLoss + backward + AdamW of the backbone with the level heads, random data."""
    torch = ctx.torch
    from geohier.model import build_model
    from pipeline.train.losses import GeoLoss

    s, dev = ctx.sizes, ctx.device
    classes = dict(zip(LEVELS, REALISTIC))
    model = build_model(s.backbone, classes, weights="none").to(dev)  # torchvision's, weights=None
    x = torch.randn(s.batch, 3, s.image, s.image, device=dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if wrap is not None:
        model = wrap(model)
    y = torch.stack([torch.randint(0, classes[lv], (s.batch,), device=dev) for lv in LEVELS], 1)
    crit = GeoLoss(LEVELS)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)  # pipeline.train's
    model.train()

    def step():
        with ctx.autocast(amp):
            loss, _ = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(ctx, step, s.batch)


def part_finetune(ctx: Ctx) -> dict[str, float]:
    s = ctx.sizes
    part = f"1 fine-tune {s.backbone} {s.image} px, batch {s.batch}"
    cases = [("fp32", False, False, False), ("fp32 channels_last", False, True, False),
             ("bf16 autocast", True, False, False), (RECIPE, True, True, False)]
    if ctx.cuda:
        cases.append((f"{RECIPE} cudnn.benchmark", True, True, True))
    rates: dict[str, float] = {}
    for name, amp, cl, bench in cases:
        def run(name=name, amp=amp, cl=cl, bench=bench):
            torch = ctx.torch
            old = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = bench
            try:
                m = train_measure(ctx, amp, cl)
            finally:
                torch.backends.cudnn.benchmark = old
            rates[name] = m.rate
            vs = "baseline" if name == "fp32" else ratio_text(m.rate, rates.get("fp32"))
            extra = "; pipeline.train's CUDA recipe" if name == RECIPE else ""
            return rate_text(m.rate), vs, m.note() + extra

        ctx.case(part, name, run)
    return rates


# ----------------------------------------------------------------------------- 2. the loader


class JpegFiles:
    """What ``geohier.dataset.ManifestDataset.__getitem__`` does per image (decode no bigger
    than the transform needs, EXIF orientation, RGB; then the transform), minus the manifest."""

    def __init__(self, paths: list[str], transform, n_levels: int):
        import torch

        self.paths, self.transform = paths, transform
        self.labels = torch.zeros(len(paths), n_levels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from geohier.dataset import _open_image

        img = _open_image(self.paths[i], self.transform)
        return self.transform(img), self.labels[i], i


def make_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """``n`` photo-like JPEGs (smooth colour fields plus grain, quality 90), not pure noise:
    noise compresses badly and decodes slower than a street photo."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    paths = []
    for i in range(n):
        low = rng.integers(0, 256, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-10, 11, img.shape), 0, 255).astype(np.uint8)
        p = folder / f"{i:05d}.jpg"
        Image.fromarray(img).save(p, "JPEG", quality=90)
        paths.append(str(p))
    return paths


def loader_measure(ctx: Ctx, paths: list[str], workers: int) -> tuple[Measure, str]:
    """img/s of the second epoch (the first warms the workers and the page cache), or of
    the first alone when it used the case's budget."""
    torch = ctx.torch
    from geohier.dataset import collate
    from geohier.presets import TrainPreset
    from pipeline.train.distributed import worker_init

    s = ctx.sizes
    ds = JpegFiles(paths, TrainPreset(s.image), len(LEVELS))
    kw = dict(num_workers=workers, collate_fn=collate, pin_memory=ctx.cuda,  # as pipeline.train.data
              worker_init_fn=worker_init if workers else None, persistent_workers=workers > 0)
    if workers:
        kw["prefetch_factor"] = 4
    loader = torch.utils.data.DataLoader(ds, batch_size=s.loader_batch, shuffle=True, **kw)
    budget = min(s.loader_seconds, max(ctx.left(), 0.0))
    start = time.perf_counter()
    try:
        result = None
        for epoch in (1, 2):
            t0, n, complete = time.perf_counter(), 0, True
            for batch in loader:
                n += batch.images.shape[0]
                if time.perf_counter() - start > budget:
                    complete = False
                    break
            m = Measure(n, time.perf_counter() - t0, epoch)
            if epoch == 1:
                result = (m, "epoch 1 (incl. worker start-up)")
                if not complete or time.perf_counter() - start > budget / 2:
                    break  # no time for a second epoch: the first one's rate
            else:
                result = (m, "epoch 2" if complete else "part of epoch 2")
    finally:
        del loader  # its workers end here
    return result


def part_loader(ctx: Ctx, gpu: dict[str, float]) -> None:
    s = ctx.sizes
    cpus = os.cpu_count() or 1
    counts = sorted({w for w in (0, 2, 4, 8, cpus) if w <= cpus})
    w, h = s.loader_source
    part = f"2 loader {s.loader_images} JPEGs {w}x{h} -> {s.image} px"
    name, ref = (RECIPE, gpu.get(RECIPE)) if gpu.get(RECIPE) else \
        max(gpu.items(), key=lambda kv: kv[1], default=(None, None))
    with tempfile.TemporaryDirectory(prefix="geohier-bench-gpu-") as tmp:
        t = time.perf_counter()
        paths = make_jpegs(Path(tmp), s.loader_images, s.loader_source)
        made = time.perf_counter() - t
        for workers in counts:
            def run(workers=workers):
                m, which = loader_measure(ctx, paths, workers)
                note = f"{which}: {m.items} images in {m.seconds:.2f} s, batch {s.loader_batch}"
                if workers == counts[0]:
                    note += f"; {len(paths)} files written in {made:.1f} s"
                if not ref:
                    return rate_text(m.rate), "", note + "; no GPU rate (part 1 not run)"
                step = "GPU" if ctx.cuda else "CPU"
                verdict = "the loader is the bottleneck" if m.rate < ref else f"the {step} step is the bottleneck"
                return (rate_text(m.rate), ratio_text(m.rate, ref, "loader/GPU "),
                        f"{verdict} ({step} {name}: {rate_text(ref)}); {note}")

            ctx.case(part, f"{workers} workers", run)


# ----------------------------------------------------------------------------- 3. embedding


def build_vit(ctx: Ctx):
    """A ViT with random weights from a config (nothing downloaded), as a geohier Backbone."""
    from torch import nn

    from geohier.backbones import Backbone, preprocess_dict

    c = ctx.sizes.vit
    if ctx.vit == "hf":
        try:
            import transformers
        except ImportError:
            transformers = None
        if transformers is not None:
            net = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**c))
            return Backbone("hf:clip-vit-b16-config", "hf", net, c["hidden_size"],
                            preprocess_dict(c["image_size"]), kind="hf"), "transformers CLIPVisionModel"
    import torchvision

    net = torchvision.models.VisionTransformer(
        image_size=c["image_size"], patch_size=c["patch_size"], num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"], hidden_dim=c["hidden_size"], mlp_dim=c["intermediate_size"])
    net.heads = nn.Identity()
    return Backbone("vit_b_16", "torchvision", net, c["hidden_size"], preprocess_dict(c["image_size"])), \
        "torchvision VisionTransformer"


def part_embed(ctx: Ctx) -> None:
    torch = ctx.torch
    s = ctx.sizes
    c = s.vit
    tag = "ViT-B/16" if c["hidden_size"] == 768 and c["num_hidden_layers"] == 12 else "tiny ViT"
    part = f"3 embed {tag} {c['image_size']} px, batch {s.embed_batch}"
    built: dict = {}
    rates: dict[str, float] = {}
    for name, amp in (("fp32", False), ("bf16 autocast", True)):
        def run(name=name, amp=amp):
            if "model" not in built:
                bb, what = build_vit(ctx)
                built["model"], built["what"] = bb.eval().requires_grad_(False).to(ctx.device), what
            model = built["model"]
            x = torch.randn(s.embed_batch, 3, c["image_size"], c["image_size"], device=ctx.device)

            def step():
                with torch.inference_mode(), ctx.autocast(amp):
                    f = model(x)
                return f.float().cpu()  # as geohier.embeddings: features back on the CPU

            m = timed(ctx, step, s.embed_batch)
            rates[name] = m.rate
            params = sum(p.numel() for p in model.parameters())
            vs = "baseline" if name == "fp32" else ratio_text(m.rate, rates.get("fp32"))
            return rate_text(m.rate), vs, f"{m.note()}; {built['what']}, {params / 1e6:.3g} M params, inference_mode"

        ctx.case(part, name, run)
    built.clear()


# ----------------------------------------------------------------------------- 4. heads epoch


def heads_epoch(ctx: Ctx, feats, labels, classes: tuple[int, ...], amp: bool) -> tuple[float, int, int, Measure]:
    """(epoch seconds, steps timed, steps in the epoch, the timed Measure): one epoch of the
    level heads on ``feats``; past ``heads_seconds`` the rest is extrapolated."""
    torch = ctx.torch
    from torch import nn

    from geohier.backbones import Backbone, preprocess_dict
    from geohier.model import GeoModel, ModelConfig
    from pipeline.train.frozen import HeadsOnly, fused_adamw
    from pipeline.train.losses import GeoLoss

    s, dev = ctx.sizes, ctx.device
    rows, dim = feats.shape
    # GeoModel's own heads on a D-dim "backbone" that never runs (the features are cached)
    cfg = ModelConfig(backbone="resnet18", levels=list(LEVELS), num_classes=dict(zip(LEVELS, classes)),
                      frozen=True)
    geo = GeoModel(cfg, Backbone("cached", "torchvision", nn.Identity(), dim, preprocess_dict(224)))
    model = HeadsOnly(geo).to(dev).train()
    crit = GeoLoss(LEVELS)
    opt = fused_adamw(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                        lr=5e-4, weight_decay=0.05))
    total = math.ceil(rows / s.heads_batch)
    order = torch.randperm(rows, device=dev)
    state = {"i": 0}

    def step():
        i = state["i"] % total
        state["i"] += 1
        idx = order[i * s.heads_batch:(i + 1) * s.heads_batch]
        x, y = feats[idx].float(), labels[idx]
        with ctx.autocast(amp):
            loss, _ = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(min(2, total)):  # warm-up, not part of the epoch
        step()
    state["i"] = 0
    m = timed(ctx, step, s.heads_batch, warmup=0, steps=total, seconds=s.heads_seconds)
    done = m.steps
    epoch_s = m.seconds if done == total else m.seconds / done * total
    return epoch_s, done, total, m


def part_heads(ctx: Ctx) -> None:
    torch = ctx.torch
    s, dev = ctx.sizes, ctx.device
    part = f"4 heads epoch {s.rows:,} x {s.dim} embeddings, batch {s.heads_batch:,}"
    data: dict = {}
    for classes in s.class_splits:
        split = "/".join(f"{c:,}" for c in classes)
        base: dict[str, float] = {}
        for name, amp in (("fp32", False), ("bf16 autocast", True)):
            def run(name=name, amp=amp, classes=classes, base=base):
                if "feats" not in data:
                    g = torch.Generator(device=dev).manual_seed(0)
                    data["feats"] = torch.randn(s.rows, s.dim, device=dev, dtype=torch.float16, generator=g)
                labels = torch.stack([torch.randint(0, c, (s.rows,), device=dev) for c in classes], 1)
                epoch_s, done, total, m = heads_epoch(ctx, data["feats"], labels, classes, amp)
                rate = s.rows / epoch_s
                base[name] = epoch_s
                vs = "baseline" if name == "fp32" else ratio_text(base.get("fp32"), epoch_s)
                how = f"{total} steps" if done == total else f"extrapolated from {done} of {total} steps"
                peak = f", peak {m.peak_gib:.1f} GiB" if m.peak_gib is not None else ""
                return (rate_text(rate, "samples/s"), vs,
                        f"epoch {epoch_s:.2f} s ({how}{peak}); float16 features cast per batch")

            ctx.case(part, f"{name}, classes {split}", run)
    data.clear()


# ----------------------------------------------------------------------------- 5. DDP


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def part_ddp(ctx: Ctx, finetune: dict[str, float]) -> None:
    torch = ctx.torch
    dist = torch.distributed
    backend = "nccl" if ctx.cuda else "gloo"
    amp = cl = ctx.cuda  # the recipe pipeline.train uses on this device
    recipe = RECIPE if ctx.cuda else "fp32"
    part = f"5 DDP 1 process ({backend}), {recipe}"
    plain: dict[str, float] = {}

    def run_plain():
        m = train_measure(ctx, amp, cl)
        plain["rate"] = m.rate
        note = m.note()
        if finetune.get(recipe):
            note += f"; part 1's {recipe} row: {rate_text(finetune[recipe])}"
        return rate_text(m.rate), "baseline", note

    def run_ddp():
        if not dist.is_available():
            raise Unavailable("torch.distributed is not built into this torch")
        if backend == "nccl" and not dist.is_nccl_available():
            raise Unavailable("this torch has no NCCL")
        port = free_port()
        try:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                    timeout=timedelta(seconds=120))
        except Exception as exc:
            raise Unavailable(f"init_process_group({backend!r}) failed: {type(exc).__name__}: "
                              f"{one_line(exc)}") from None
        try:
            ids = [ctx.device.index or 0] if ctx.cuda else None
            m = train_measure(ctx, amp, cl, wrap=lambda model: torch.nn.parallel.DistributedDataParallel(
                model, device_ids=ids))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return (rate_text(m.rate), ratio_text(m.rate, plain.get("rate")),
                f"{m.note()}; tcp://127.0.0.1:{port}, world 1")

    ctx.case(part, "plain model", run_plain)
    ctx.case(part, "DistributedDataParallel", run_ddp)


# ----------------------------------------------------------------------------- main


def parse_parts(text: str) -> list[str]:
    if text.strip() in ("", "all"):
        return list(PARTS)
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if item.isdigit() and 1 <= int(item) <= len(PARTS):
            item = PARTS[int(item) - 1]
        if item not in PARTS:
            raise argparse.ArgumentTypeError(f"unknown part {item!r}; use {', '.join(PARTS)} (or 1-5)")
        out.append(item)
    return [p for p in PARTS if p in out]


def skip_line(torch) -> str:
    return (f"bench/gpu.py: no CUDA device (torch {torch.__version__}, CPU only): nothing measured "
            "(`--device cpu --quick` runs the measuring code at toy sizes)")


def header(ctx: Ctx, args, parts: list[str]) -> None:
    torch = ctx.torch
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        name = f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB)"
        build = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        tf32 = (f"fp32 matmuls {'TF32' if torch.backends.cuda.matmul.allow_tf32 else 'full fp32 (TF32 off)'}, "
                f"cuDNN convs TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'}")
    else:
        name, build, tf32 = "CPU (no GPU: toy sizes, measuring code only)", "CPU", "CPU"
    print(f"## bench/gpu.py: {name}, torch {torch.__version__} ({build}), {when}")
    print()
    print(f"{os.cpu_count()} CPU cores; {tf32}; {'--quick sizes' if args.quick else 'full sizes'}; "
          f"parts {', '.join(parts)}; budget {args.budget_s:.0f} s")
    print()
    print("| part | case | rate | vs | notes |")
    print("|---|---|---:|---:|---|", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Without CUDA it prints that nothing was measured and exits 0.")
    ap.add_argument("--quick", action="store_true", help="toy sizes, two steps per case: a smoke run")
    ap.add_argument("--parts", type=parse_parts, default=list(PARTS),
                    help=f"comma-separated parts to run, by name or number: {', '.join(PARTS)} (default: all)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto (default): the CUDA GPU, else skip; cpu: the measuring code at toy sizes "
                         "(needs --quick; for tests)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="no case starts after this many seconds (default 420: the run ends within ~8 min)")
    ap.add_argument("--batch", type=int, default=None, help="fine-tuning batch (default 128; --quick 2)")
    ap.add_argument("--vit", choices=("hf", "torchvision"), default="hf",
                    help="part 3's ViT: transformers' CLIP vision tower (default; torchvision's when "
                         "transformers is missing) or torchvision's VisionTransformer")
    args = ap.parse_args(argv)
    if args.device == "cpu" and not args.quick:
        ap.error("--device cpu runs the toy sizes only: add --quick")

    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        line = skip_line(torch)
        if args.device == "cuda":
            print(line, file=sys.stderr)
            return 2
        print(line)
        return 0
    if str(ROOT) not in sys.path:  # run from anywhere, with or without the editable install
        sys.path.insert(0, str(ROOT))
    if args.device == "cpu":
        device = torch.device("cpu")
        torch.set_num_threads(1)  # toy sizes: one thread is fastest, and immune to a busy machine
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    sizes = QUICK if args.quick else FULL
    if args.batch:
        sizes = replace(sizes, batch=args.batch)
    ctx = Ctx(device, sizes, args.budget_s, args.vit)
    parts = args.parts
    header(ctx, args, parts)
    start = time.perf_counter()
    finetune: dict[str, float] = {}
    steps = {"finetune": lambda: finetune.update(part_finetune(ctx)), "loader": lambda: part_loader(ctx, finetune),
             "embed": lambda: part_embed(ctx), "heads": lambda: part_heads(ctx),
             "ddp": lambda: part_ddp(ctx, finetune)}
    for i, name in enumerate(PARTS, 1):
        if name in parts:
            try:
                steps[name]()
            except Exception as exc:  # outside its cases (e.g. writing the JPEGs): the part's row
                ctx.failed += 1
                ctx.row(f"{i} {name}", "(the part)", f"error: {type(exc).__name__}: {one_line(exc)}")
                cleanup(ctx)
    print()
    print(f"total {time.perf_counter() - start:.0f} s; rates are the mean over each case's timed steps "
          f"(after {sizes.warmup} warm-up steps); vs = the case / its part's baseline, same run"
          + (f"; {ctx.failed} case(s) failed" if ctx.failed else ""))
    return 1 if ctx.failed else 0


if __name__ == "__main__":
    sys.exit(main())
