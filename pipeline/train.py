"""``python -m pipeline train``: train a multi-level geolocation classifier.

Wiring in the style of torchvision's references/classification/train.py:
``get_args_parser`` -> ``TrainConfig`` -> ``train(ws, config)``, which calls ``load_data``,
then ``train_one_epoch`` and ``evaluate`` once per epoch. The same command runs under
``torchrun --nproc_per_node N -m pipeline train ...`` (DistributedDataParallel, one
DistributedSampler shard per process, rank 0 alone writes).

A run directory (models/<run>/) receives::

    config.json        the resolved TrainConfig (+ hierarchy hash)
    status.json        state queued|running|done|failed|cancelled, epoch, step, progress, ETA
    log.txt            what the run said (the terminal also gets a tqdm bar)
    metrics.jsonl      one JSON object per epoch: losses, lr, top-k per level, val km metrics
    model.safetensors  + meta.json: the model (geohier.model.save_checkpoint), every epoch
    train_state.safetensors + train_state.json: optimizer moments + counters, for --resume

Loss: cross-entropy per level (weights per level), label smoothing, and optionally PIGEON's
haversine smoothing: the target of an image in class t is q_c ∝ exp(-(d(t, c) - d_min) / tau)
over the class centroids c (computed per batch, (B, C), so large levels cost no (C, C)
matrix). Optimiser: AdamW, linear warm-up then cosine decay, per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geohier import grid
from geohier.dataset import IGNORE_INDEX, ManifestDataset, collate
from geohier.errors import GeohierError, InputError, WorkspaceError
from geohier.model import (
    BACKBONES,
    DEFAULT_BACKBONE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RUN_FORMAT,
    build_model,
    check_backbone,
    save_checkpoint,
    save_tensors_atomic,
    unwrap,
)
from geohier.presets import EvalPreset, TrainPreset
from geohier.workspace import Workspace, atomic_write_text, read_json, utcnow

STATUS_FILE, CONFIG_FILE, LOG_FILE, METRICS_FILE = "status.json", "config.json", "log.txt", "metrics.jsonl"
STATE_TENSORS, STATE_JSON = "train_state.safetensors", "train_state.json"
EARTH_RADIUS_KM = 6371.0
STATUS_EVERY_S = 2.0


class TrainError(GeohierError):
    """Training cannot start or go on (bad data, bad parameters, out of memory)."""


@dataclass
class TrainConfig:
    """Everything a run depends on; stored as the run's config.json."""

    levels: list[int] | None = None  # None: every level of hierarchy.json
    per_level: bool = False  # the seed's shape: one run (one model) per level
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"  # imagenet | none | path/to/backbone.safetensors
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    image_size: int = 224
    label_smoothing: float = 0.1
    haversine_tau: float = 0.0  # km; 0 = off
    level_weights: dict[int, float] | None = None  # None: 1 for every level
    balanced: bool = False
    randaugment: bool = False
    hflip: float = 0.0  # off: a mirrored street swaps the driving side
    mixup: float = 0.0  # Beta(alpha, alpha) of MixUp; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) of CutMix; 0 = off
    head_dropout: float = 0.0
    workers: int = 2
    threads: int | None = None  # CPU compute threads per process; None: cores / processes - 1 if workers
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool | None = None  # None: on when training on CUDA
    run_name: str | None = None
    group: str | None = None  # the set a per-level run belongs to
    max_steps: int | None = None  # per epoch (quick runs, tests)
    limit_train: int | None = None
    limit_val: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.level_weights is not None:
            d["level_weights"] = {str(k): float(v) for k, v in self.level_weights.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("level_weights"):
            kw["level_weights"] = {int(k): float(v) for k, v in kw["level_weights"].items()}
        return cls(**kw)

    def validate(self) -> None:
        """Raise InputError naming the first unusable value."""
        check_backbone(self.backbone)

        def need(ok, msg):
            if not ok:
                raise InputError(msg)

        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        need(16 <= self.image_size <= 2048, f"--image-size must be in [16, 2048] px, got {self.image_size}")
        need(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.haversine_tau >= 0, f"--haversine-tau must be >= 0 km, got {self.haversine_tau}")
        need(0 <= self.hflip <= 1, f"--hflip must be a probability in [0, 1], got {self.hflip}")
        need(self.mixup >= 0 and self.cutmix >= 0, "--mixup/--cutmix alphas must be >= 0")
        need(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        need(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        need(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}")
        need(self.limit_train is None or self.limit_train >= 1, f"--limit-train must be >= 1, got {self.limit_train}")
        need(self.limit_val is None or self.limit_val >= 0, f"--limit-val must be >= 0, got {self.limit_val}")
        if self.run_name is not None and (not self.run_name.strip() or "/" in self.run_name
                                          or self.run_name in (".", "..")):
            raise InputError(f"--run-name {self.run_name!r} must be a plain folder name")
        if self.level_weights:
            bad = {k: v for k, v in self.level_weights.items() if not (v >= 0 and math.isfinite(v))}
            need(not bad, f"--level-weights must be finite and >= 0, got {bad}")


def demo_config(**overrides) -> TrainConfig:
    """The small demo model `make run` trains on the demo world: resnet18 at 64 px, a few
    minutes on 2 CPU cores, no download."""
    cfg = TrainConfig(backbone="resnet18", weights="none", image_size=64, epochs=6, batch_size=64,
                      lr=2e-3, weight_decay=0.05, warmup_epochs=0.5, label_smoothing=0.05,
                      workers=1, run_name=f"demo-resnet18-{_stamp()}")
    return replace(cfg, **overrides)


def _stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def default_run_name(cfg: TrainConfig, levels) -> str:
    return f"{cfg.backbone}-L{'-'.join(str(v) for v in levels)}-{_stamp()}"


def parse_level_weights(text: str | None, levels=None) -> dict[int, float] | None:
    """``"1:1,8:0.5"`` (per level) or ``"1,1,1,0.5"`` (in level order) -> {level: weight}.

    >>> parse_level_weights("1:2,8:0.5")
    {1: 2.0, 8: 0.5}
    >>> parse_level_weights("1,0.5", [1, 3])
    {1: 1.0, 3: 0.5}
    """
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        if all(":" in p for p in parts):
            return {grid.check_level(int(a)): float(b) for a, b in (p.split(":", 1) for p in parts)}
        vals = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"--level-weights {text!r}: use LEVEL:W pairs (1:1,8:0.5) or one weight per level") from None
    if levels is None or len(vals) != len(levels):
        raise InputError(f"--level-weights {text!r}: {len(vals)} weights for levels {list(levels or [])}; "
                         "use LEVEL:W pairs")
    return {int(lv): v for lv, v in zip(levels, vals, strict=True)}


# ----------------------------------------------------------------------------- losses


def haversine_targets(target: torch.Tensor, lat: torch.Tensor, lon: torch.Tensor,
                      tau_km: float) -> torch.Tensor:
    """PIGEON's haversine label smoothing: soft targets (B, C), rows summing to 1.

    ``target`` (B,) class indices; ``lat``/``lon`` (C,) class centroids in degrees. The
    target of class c is exp(-(d(t, c) - d_min) / tau) / Z, d the great-circle distance
    between centroids (d_min = 0: the true class itself), so it peaks at the true class
    and spreads onto its neighbours within a few tau km.
    """
    la, lo = torch.deg2rad(lat.double()), torch.deg2rad(lon.double())  # (C,)
    lt, lg = la[target][:, None], lo[target][:, None]  # (B, 1)
    a = torch.sin((la[None] - lt) / 2) ** 2 + torch.cos(lt) * torch.cos(la[None]) * torch.sin((lo[None] - lg) / 2) ** 2
    d = 2 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(a.clamp(0, 1)))  # (B, C) km
    d = d - d.min(1, keepdim=True).values
    q = torch.exp(-d / float(tau_km))
    return (q / q.sum(1, keepdim=True)).float()  # (B, C)


def level_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
               tau_km: float = 0.0, centroids: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean cross-entropy over the rows whose target is not -100 (0 when there is none).

    With ``tau_km > 0`` the hard target becomes ``haversine_targets`` over ``centroids``;
    label smoothing then mixes in the uniform distribution.
    """
    valid = target != IGNORE_INDEX  # (B,)
    if not bool(valid.any()):
        return logits.sum() * 0.0  # keeps the graph (DDP wants every head used)
    z, t = logits[valid].float(), target[valid]  # (N, C), (N,)
    if tau_km and tau_km > 0 and centroids is not None:
        q = haversine_targets(t, centroids[0], centroids[1], tau_km)  # (N, C)
        if label_smoothing > 0:
            q = q * (1 - label_smoothing) + label_smoothing / z.shape[1]
        return -(q * F.log_softmax(z, dim=1)).sum(1).mean()
    return F.cross_entropy(z, t, label_smoothing=label_smoothing)


class GeoLoss(nn.Module):
    """Weighted sum over levels of ``level_loss``; MixUp/CutMix-aware."""

    def __init__(self, levels, weights=None, label_smoothing=0.0, tau_km=0.0, centroids=None):
        super().__init__()
        self.levels = [int(v) for v in levels]
        self.weights = {lv: float((weights or {}).get(lv, 1.0)) for lv in self.levels}
        self.label_smoothing, self.tau_km = float(label_smoothing), float(tau_km)
        self.centroids = centroids or {}  # {lv: (lat (C,), lon (C,))} tensors on the device

    def forward(self, out: dict[int, torch.Tensor], labels: torch.Tensor, mix=None):
        """``labels`` (B, n_levels); ``mix`` = (lam, perm) or None. Returns (total, {lv: loss})."""
        parts = {}
        for j, lv in enumerate(self.levels):
            y = labels[:, j]  # (B,)
            z, cen = out[lv], self.centroids.get(lv)
            loss = level_loss(z, y, self.label_smoothing, self.tau_km, cen)
            if mix is not None:  # MixUp/CutMix: the loss is linear in the target
                loss = mix[0] * loss + (1 - mix[0]) * level_loss(z, y[mix[1]], self.label_smoothing,
                                                                  self.tau_km, cen)
            parts[lv] = loss
        total = sum(self.weights[lv] * parts[lv] for lv in self.levels)
        return total, parts


def mix_batch(x: torch.Tensor, mixup: float, cutmix: float, gen: torch.Generator):
    """MixUp or CutMix (one of them, at random, when both are on) on a batch.

    Returns (x, (lam, perm)) or (x, None) when both alphas are 0."""
    if (mixup <= 0 and cutmix <= 0) or x.shape[0] < 2:
        return x, None
    use_cut = cutmix > 0 and (mixup <= 0 or torch.rand(1, generator=gen).item() < 0.5)
    alpha = cutmix if use_cut else mixup
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen))).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    if not use_cut:
        return lam * x + (1 - lam) * x[perm], (lam, perm)
    h, w = x.shape[-2:]
    rh, rw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
    y0, y1 = max(cy - rh // 2, 0), min(cy + rh // 2, h)
    x0, x1 = max(cx - rw // 2, 0), min(cx + rw // 2, w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    return x, (lam, perm)


def lr_at(step: int, total: int, warmup: int, base_lr: float, min_ratio: float = 0.01) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio * base_lr``.

    >>> [round(lr_at(s, 10, 2, 1.0), 3) for s in (0, 1, 2, 9)]
    [0.5, 1.0, 1.0, 0.048]
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ----------------------------------------------------------------------------- processes


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_env(device: str = "auto", threads: int | None = None, workers: int = 0) -> DistEnv:
    """Pick the device and, under torchrun (RANK / WORLD_SIZE set), join the process group
    (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = (device or "auto").strip().lower()
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
        dev = torch.device(f"cuda:{local}") if want == "cuda" else torch.device(want)
        torch.cuda.set_device(dev)
    elif want == "cpu":
        dev = torch.device("cpu")
    else:
        raise InputError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    env = DistEnv(rank, world, local, dev, world > 1)
    if threads:
        torch.set_num_threads(int(threads))
    elif dev.type == "cpu":
        # Share the cores between processes and loader workers instead of oversubscribing
        # them: OpenMP threads that wait on a preempted sibling spin, and a 2-core machine
        # with 2 compute threads + a loader worker runs several times slower than with 1.
        cores = max(1, (os.cpu_count() or 1) // world)
        torch.set_num_threads(max(1, cores - (1 if workers > 0 else 0)))
    if env.distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                             rank=rank, world_size=world)
    return env


def _broadcast(obj, env: DistEnv):
    """``obj`` of rank 0 on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world
    torch.distributed.all_gather_object(out, obj)
    return out


def _any(flag: bool, env: DistEnv) -> bool:
    """True on every rank if it is True on one (so all ranks stop at the same step)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device if env.device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves and ends the run as cancelled."""

    def __init__(self):
        self.set, self.signum, self._old = False, None, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a page's thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.set and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.set, self.signum = True, signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _worker_init(_):
    # Workers ignore the job's SIGTERM/SIGINT: the main process decides when to stop and
    # shuts them down cleanly (otherwise they die first and the loader raises).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- run files


class RunFiles:
    """status.json, log.txt and metrics.jsonl of one run; silent on ranks other than 0."""

    def __init__(self, run_dir: Path, env: DistEnv):
        self.dir, self.env = run_dir, env
        self.status: dict = {}
        self._last = 0.0

    def log(self, msg: str) -> None:
        if not self.env.main:
            return
        line = f"{datetime.now().strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        with open(self.dir / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)

    def update(self, force: bool = True, **kw) -> None:
        self.status.update(kw)
        now = time.monotonic()
        if not self.env.main or (not force and now - self._last < STATUS_EVERY_S):
            return
        self._last = now
        self.status["updated_at"] = utcnow()
        self.status["pid"] = os.getpid()
        atomic_write_text(self.dir / STATUS_FILE, json.dumps(self.status, indent=1) + "\n")

    def append_metrics(self, record: dict) -> None:
        if self.env.main:
            with open(self.dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, epochs_done: int) -> None:
        """Drop metric lines of epochs that the resumed run will redo."""
        path = self.dir / METRICS_FILE
        if not self.env.main or not path.exists():
            return
        keep = []
        for line in path.read_text("utf-8").splitlines():
            try:
                if json.loads(line).get("epoch", 0) <= epochs_done:
                    keep.append(line)
            except ValueError:
                continue
        atomic_write_text(path, "".join(k + "\n" for k in keep))


def require_json(path: Path) -> dict:
    """A JSON object from ``path``, or a WorkspaceError naming the file."""
    try:
        d = json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkspaceError(f"cannot read {path}: {exc}") from None
    if not isinstance(d, dict):
        raise WorkspaceError(f"{path} is not a JSON object")
    return d


def save_train_state(run_dir: Path, optimizer: torch.optim.Optimizer, scaler, counters: dict) -> None:
    """Optimizer moments as safetensors, everything else as JSON (no pickle)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    doc = {"format": "geohier-train-state/1", **counters, "optimizer": {"param_groups": groups, "scalars": scalars},
           "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    save_tensors_atomic(run_dir / STATE_TENSORS, tensors or {"empty": torch.zeros(0)})
    atomic_write_text(run_dir / STATE_JSON, json.dumps(doc, indent=1) + "\n")


def load_train_state(run_dir: Path, optimizer: torch.optim.Optimizer, scaler, device) -> dict:
    from safetensors.torch import load_file

    doc = require_json(run_dir / STATE_JSON)
    tensors = load_file(str(run_dir / STATE_TENSORS), device=str(device))
    state: dict = {}
    for key, t in tensors.items():
        if key == "empty":
            continue
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = t
    for pid, kv in doc["optimizer"]["scalars"].items():
        state.setdefault(int(pid), {}).update(kv)
    for st in state.values():  # AdamW keeps "step" as a CPU float tensor
        if "step" in st and torch.is_tensor(st["step"]):
            st["step"] = st["step"].to("cpu")
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in doc["optimizer"]["param_groups"]]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise WorkspaceError(f"{run_dir / STATE_JSON} does not fit this model's optimizer: {exc}") from None
    if doc.get("scaler") and scaler is not None and scaler.is_enabled():
        scaler.load_state_dict(doc["scaler"])
    return doc


# ----------------------------------------------------------------------------- data


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world, ...: each rank evaluates a disjoint share, no padding."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)


class BalancedSampler(torch.utils.data.Sampler):
    """Class-balanced sampling with replacement, sharded over ranks like DistributedSampler:
    every rank draws the same sequence (seed + epoch) and keeps its stride."""

    def __init__(self, weights: np.ndarray, rank: int = 0, world: int = 1, seed: int = 0):
        self.w = torch.as_tensor(weights, dtype=torch.double)
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0
        self.per_rank = math.ceil(len(self.w) / world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.w, self.per_rank * self.world, replacement=True, generator=g)
        return iter(draw[self.rank::self.world].tolist())

    def __len__(self):
        return self.per_rank


def load_data(ws: Workspace, hierarchy, cfg: TrainConfig, levels, env: DistEnv):
    """Datasets and loaders of the train and val splits for ``levels``.

    Returns a dict: train_ds, val_ds, train_loader, val_loader, train_sampler."""
    train_tf = TrainPreset(cfg.image_size, IMAGENET_MEAN, IMAGENET_STD, hflip_prob=cfg.hflip,
                           randaugment=cfg.randaugment)
    eval_tf = EvalPreset(cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)
    train_ds = ManifestDataset(ws, hierarchy, "train", train_tf, limit=cfg.limit_train, seed=cfg.seed,
                               levels=levels)
    if len(train_ds) == 0:
        s = train_ds.stats
        raise TrainError(f"the train split has no usable image ({s['rows']} rows, {s['missing']} files missing, "
                         f"{s['unlabelled']} without a class): run `python -m pipeline labels` "
                         "(which assigns splits) or add images")
    if len(train_ds) < 2:
        raise TrainError("the train split has 1 usable image; training needs at least 2")
    val_ds = ManifestDataset(ws, hierarchy, "val", eval_tf, limit=cfg.limit_val or None, seed=cfg.seed,
                             levels=levels)
    if cfg.limit_val == 0:
        val_ds = torch.utils.data.Subset(val_ds, [])
    if cfg.balanced:
        sampler = BalancedSampler(train_ds.sample_weights(), env.rank, env.world, cfg.seed)
    else:
        sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=env.world, rank=env.rank,
                                                      shuffle=True, seed=cfg.seed)
    per_rank = len(sampler)
    bs = min(cfg.batch_size, per_rank)
    # drop_last: a last batch of one image breaks BatchNorm in train mode
    kw = dict(num_workers=cfg.workers, collate_fn=collate, pin_memory=env.device.type == "cuda",
              worker_init_fn=_worker_init if cfg.workers > 0 else None,
              persistent_workers=False)
    if cfg.workers > 0:
        kw["prefetch_factor"] = 4
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=bs, sampler=sampler,
                                               drop_last=per_rank % bs == 1 or per_rank >= 2 * bs, **kw)
    n_val = len(val_ds)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=max(cfg.batch_size, 1),
                                             sampler=ShardSampler(n_val, env.rank, env.world), **kw)
    return {"train_ds": train_ds, "val_ds": val_ds, "train_loader": train_loader,
            "val_loader": val_loader, "train_sampler": sampler}


def cell_positions(ds: ManifestDataset, level: int, hierarchy) -> list[list[float]]:
    """Mean training-image position per class of ``level`` (the class centroid where a
    class has no training image): averaged as 3-D unit vectors, so it is right across the
    antimeridian."""
    j = ds.levels.index(level)
    y = ds.labels[:, j]
    ok = y >= 0
    lat, lon = np.radians(ds.lat[ok]), np.radians(ds.lon[ok])
    xyz = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], 1)  # (N, 3)
    n = hierarchy.num_classes[level]
    acc = np.zeros((n, 3))
    np.add.at(acc, y[ok], xyz)
    clat, clon = hierarchy.centroids(level)
    out_lat, out_lon = np.array(clat, dtype=float), np.array(clon, dtype=float)
    has = np.linalg.norm(acc, axis=1) > 1e-9
    v = acc[has] / np.linalg.norm(acc[has], axis=1, keepdims=True)
    out_lat[has] = np.degrees(np.arcsin(np.clip(v[:, 2], -1, 1)))
    out_lon[has] = np.degrees(np.arctan2(v[:, 1], v[:, 0]))
    return [[round(float(a), 5), round(float(b), 5)] for a, b in zip(out_lat, out_lon, strict=True)]


# ----------------------------------------------------------------------------- epochs


def _autocast(env: DistEnv, amp: bool):
    if env.device.type == "cuda" and amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def train_one_epoch(model, criterion, optimizer, loader, env: DistEnv, ctx: dict, epoch: int) -> dict:
    """One pass over the train loader. ``ctx`` carries the run's counters and hooks:
    step, steps_per_epoch, total_steps, warmup_steps, cfg, scaler, files, stop, stats,
    levels, gen. Returns {"loss", "levels": {lv: {"top1", "top5", "top10"}}, "stopped"}."""
    from tqdm import tqdm

    from geohier.metrics import topk_correct

    cfg, files, stop = ctx["cfg"], ctx["files"], ctx["stop"]
    levels = ctx["levels"]
    model.train()
    loss_sum, n_seen = 0.0, 0
    hits = {lv: {1: 0, 5: 0, 10: 0} for lv in levels}
    counts = dict.fromkeys(levels, 0)
    steps = ctx["steps_per_epoch"]
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, file=sys.stderr,
               disable=None if env.main else True, dynamic_ncols=True)
    stopped = False
    it = iter(loader)
    for i in range(steps):
        if _any(stop.set, env):
            stopped = True
            break
        try:
            batch = next(it)
        except StopIteration:
            break
        if batch.skipped:
            ctx["stats"]["unreadable"] += len(batch.skipped)
            for s in batch.skipped[:3]:
                if ctx["stats"]["unreadable"] <= 10:
                    files.log(f"skipped unreadable image {s.path}: {s.reason}")
        x, y = batch.images, batch.labels
        if x.shape[0] < 2:  # all (or all but one) unreadable: nothing BatchNorm can use
            if not env.distributed:
                continue
            x = torch.zeros(2, 3, cfg.image_size, cfg.image_size)
            y = torch.full((2, len(levels)), IGNORE_INDEX, dtype=torch.long)
        lr = lr_at(ctx["step"], ctx["total_steps"], ctx["warmup_steps"], cfg.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        x = x.to(env.device, non_blocking=True)
        if env.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(env.device, non_blocking=True)
        x, mix = mix_batch(x, cfg.mixup, cfg.cutmix, ctx["gen"])
        with ctx["autocast"]():
            out = model(x)  # {lv: (B, C_lv)}
            loss, _ = criterion(out, y, mix)
        if not torch.isfinite(loss):
            raise TrainError(f"the loss became {loss.item()} at step {ctx['step']}: lower --lr (now {cfg.lr})")
        optimizer.zero_grad(set_to_none=True)
        scaler = ctx["scaler"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        b = x.shape[0]
        loss_sum += loss.item() * b
        n_seen += b
        with torch.no_grad():
            for j, lv in enumerate(levels):
                h, n = topk_correct(out[lv].detach().float().cpu(), y[:, j].cpu(), (1, 5, 10))
                for k in h:
                    hits[lv][k] += h[k]
                counts[lv] += n
        ctx["step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        ctx["on_step"](epoch, i + 1, loss.item())
    bar.close()
    del it  # shuts the workers down before anything is saved
    tot = _gather({"loss": loss_sum, "n": n_seen, "hits": hits, "counts": counts}, env)
    n_all = sum(t["n"] for t in tot)
    acc = {}
    for lv in levels:
        c = sum(t["counts"][lv] for t in tot)
        acc[str(lv)] = {f"top{k}": (sum(t["hits"][lv][k] for t in tot) / c if c else 0.0) for k in (1, 5, 10)}
    return {"loss": sum(t["loss"] for t in tot) / n_all if n_all else float("nan"), "levels": acc,
            "stopped": stopped}


@torch.no_grad()
def evaluate(model, loader, env: DistEnv, levels, positions: tuple[np.ndarray, np.ndarray] | None = None,
             level_weights: dict | None = None, autocast=contextlib.nullcontext, stats: dict | None = None) -> dict:
    """Loss (plain cross-entropy), top-1/5/10 per level and, when ``positions`` (lat, lon
    arrays of the finest level's classes) is given, the km metrics of predicting the
    finest level's argmax. Returns {"loss", "levels": {"1": {...}}, "km": {...}, "n"}."""
    from geohier.metrics import geo_metrics, topk_correct

    model.eval()
    ds = loader.dataset
    base = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds
    loss_sum, n_seen = 0.0, 0
    hits = {lv: {1: 0, 5: 0, 10: 0} for lv in levels}
    counts = dict.fromkeys(levels, 0)
    pred_lat, pred_lon, true_lat, true_lon = [], [], [], []
    w = {lv: float((level_weights or {}).get(lv, 1.0)) for lv in levels}
    for batch in loader:
        if batch.skipped and stats is not None:
            stats["unreadable"] += len(batch.skipped)
        if batch.images.shape[0] == 0:
            continue
        x = batch.images.to(env.device, non_blocking=True)
        if env.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch.labels.to(env.device)
        with autocast():
            out = model(x)  # {lv: (B, C_lv)}
        b = x.shape[0]
        loss = sum(w[lv] * level_loss(out[lv], y[:, j]) for j, lv in enumerate(levels))
        loss_sum += float(loss) * b
        n_seen += b
        for j, lv in enumerate(levels):
            h, n = topk_correct(out[lv].float().cpu(), y[:, j].cpu(), (1, 5, 10))
            for k in h:
                hits[lv][k] += h[k]
            counts[lv] += n
        if positions is not None:
            top = out[levels[-1]].argmax(1).cpu().numpy()  # (B,) finest-level class
            pred_lat.append(positions[0][top])
            pred_lon.append(positions[1][top])
            idx = batch.index.numpy()
            true_lat.append(base.lat[idx])
            true_lon.append(base.lon[idx])
    cat = (lambda a: np.concatenate(a) if a else np.zeros(0))  # noqa: E731
    part = {"loss": loss_sum, "n": n_seen, "hits": hits, "counts": counts,
            "pos": (cat(pred_lat), cat(pred_lon), cat(true_lat), cat(true_lon))}
    tot = _gather(part, env)
    n_all = sum(t["n"] for t in tot)
    acc = {}
    for lv in levels:
        c = sum(t["counts"][lv] for t in tot)
        acc[str(lv)] = {f"top{k}": (sum(t["hits"][lv][k] for t in tot) / c if c else 0.0) for k in (1, 5, 10)}
    km = {}
    if positions is not None and n_all:
        p = [np.concatenate([t["pos"][i] for t in tot]) for i in range(4)]
        km = geo_metrics(p[0], p[1], p[2], p[3])
    return {"loss": sum(t["loss"] for t in tot) / n_all if n_all else float("nan"),
            "levels": acc, "km": km, "n": n_all}


# ----------------------------------------------------------------------------- runs


def _prepare_run_dir(ws: Workspace, cfg: TrainConfig, levels) -> Path:
    """The run's directory: new (or created by a job launcher with only status/job files)."""
    name = cfg.run_name or default_run_name(cfg, levels)
    run_dir = ws.models_dir / name
    if (run_dir / CONFIG_FILE).exists() and not any((run_dir / f).exists() for f in ("meta.json", "model.safetensors")) \
            and _read_status(run_dir).get("state") == "failed":
        (run_dir / METRICS_FILE).unlink(missing_ok=True)  # a run that failed before its first epoch: reuse the name
        (run_dir / CONFIG_FILE).unlink()
    if run_dir.exists() and any((run_dir / f).exists() for f in (CONFIG_FILE, "meta.json", "model.safetensors")):
        raise InputError(f"a run named {name!r} already exists in {ws.models_dir}; pick another --run-name "
                         f"or continue it with --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _load_hierarchy(ws: Workspace):
    from geohier.hierarchy import Hierarchy

    if not ws.hierarchy_path.exists():
        raise WorkspaceError(f"no label hierarchy at {ws.hierarchy_path}: run `python -m pipeline labels` first")
    return Hierarchy.load(ws.hierarchy_path)


def resolve_levels(cfg: TrainConfig, hierarchy) -> list[int]:
    levels = list(hierarchy.levels) if not cfg.levels else sorted({int(v) for v in cfg.levels})
    missing = [lv for lv in levels if lv not in hierarchy.levels]
    if missing:
        raise InputError(f"--levels {missing} are not in hierarchy.json (it has "
                         f"{', '.join(map(str, hierarchy.levels))}); rebuild labels with those levels or pick these")
    for lv in levels:
        n = hierarchy.num_classes[lv]
        if n < 2:
            raise InputError(f"level {lv} has {n} class{'es' if n != 1 else ''}; a classifier needs at least 2: "
                             f"lower --min-images for level {lv} in `pipeline labels`, drop the level, or add images")
    return levels


def train(ws: Workspace, config: TrainConfig, resume_dir: str | os.PathLike | None = None) -> Path:
    """Train one run (all of ``config.levels`` on one backbone) and return its directory.

    With ``resume_dir``: continue that run from its last saved epoch (its config.json,
    except for the epoch count, workers, device and max_steps given in ``config``).
    Raises GeohierError for anything a user can fix; the run's status.json then says
    failed with the reason. A SIGTERM/SIGINT ends it as cancelled (returns normally).
    With ``config.per_level`` it trains one run per level (``train_runs``) and returns the
    set's directory (models/<group>/, status.json and config.json of the set).
    """
    if config.per_level:
        runs = train_runs(ws, config)
        return runs[0].parent / runs[0].name.rsplit("-L", 1)[0] if runs else ws.models_dir
    threads = torch.get_num_threads()
    env = setup_env(config.device, config.threads, config.workers)
    try:
        return _train(ws, config, env, Path(resume_dir) if resume_dir else None)
    finally:
        torch.set_num_threads(threads)  # callers (a page, quickstart) keep their setting
        if env.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(ws: Workspace, config: TrainConfig, env: DistEnv, resume_dir: Path | None) -> Path:
    config.validate()
    hierarchy = _load_hierarchy(ws)
    prior = None
    if resume_dir is not None:
        if not (resume_dir / CONFIG_FILE).exists():
            raise WorkspaceError(f"{resume_dir} has no {CONFIG_FILE}: not a run that can be resumed")
        prior = require_json(resume_dir / CONFIG_FILE)
        if prior.get("hierarchy_hash") != hierarchy.hash:
            raise TrainError(f"the workspace's hierarchy changed since run {resume_dir.name} started "
                             f"(hash {str(prior.get('hierarchy_hash'))[:12]} then, {hierarchy.hash[:12]} now): "
                             "its classes no longer match; start a new run")
        run_dir = resume_dir
        cfg = config
    else:
        cfg = config
    levels = resolve_levels(cfg, hierarchy)
    if resume_dir is None:
        run_dir = _broadcast(str(_prepare_run_dir(ws, cfg, levels)) if env.main else None, env)
        run_dir = Path(run_dir)
    cfg = replace(cfg, levels=levels, run_name=run_dir.name)
    files = RunFiles(run_dir, env)
    amp = cfg.amp if cfg.amp is not None else env.device.type == "cuda"
    stop = StopFlag()
    try:
        with stop:  # before "running" is announced: a cancel from then on is always graceful
            files.update(state="running", epoch=0, epochs=cfg.epochs, step=0, steps=None, progress=0.0,
                         eta_s=None, error=None, run=run_dir.name, device=str(env.device), world_size=env.world)
            return _fit(ws, cfg, env, hierarchy, levels, run_dir, files, stop, amp, resumed=prior is not None)
    except torch.OutOfMemoryError:
        msg = (f"out of memory at --batch-size {cfg.batch_size} and --image-size {cfg.image_size} "
               f"on {env.device}: lower --batch-size or --image-size")
        files.update(state="failed", error=msg, eta_s=None)
        files.log(f"failed: {msg}")
        raise TrainError(msg) from None
    except GeohierError as exc:
        files.update(state="failed", error=str(exc), eta_s=None)
        files.log(f"failed: {exc}")
        raise
    except KeyboardInterrupt:
        files.update(state="cancelled", eta_s=None)
        files.log("cancelled (interrupted)")
        raise
    except BaseException as exc:
        files.update(state="failed", error=f"{type(exc).__name__}: {exc}", eta_s=None)
        if env.main:
            with open(run_dir / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(traceback.format_exc())
        raise


def _fit(ws, cfg: TrainConfig, env: DistEnv, hierarchy, levels, run_dir: Path, files: RunFiles,
         stop: StopFlag, amp: bool, resumed: bool) -> Path:
    torch.manual_seed(cfg.seed + env.rank)
    np.random.seed(cfg.seed + env.rank)
    if env.main:
        atomic_write_text(run_dir / CONFIG_FILE, json.dumps(
            {**cfg.to_dict(), "hierarchy_hash": hierarchy.hash, "levels": levels,
             "created_at": utcnow(), "format": RUN_FORMAT}, indent=1) + "\n")
    files.log(f"{'resuming' if resumed else 'starting'} run {run_dir.name}: {cfg.backbone} levels {levels} "
              f"classes {[hierarchy.num_classes[lv] for lv in levels]} on {env.device}"
              + (f" x{env.world} processes" if env.distributed else ""))
    data = load_data(ws, hierarchy, cfg, levels, env)
    train_ds, train_loader, val_loader = data["train_ds"], data["train_loader"], data["val_loader"]
    stats = {"missing": train_ds.stats["missing"], "unlabelled": train_ds.stats["unlabelled"], "unreadable": 0,
             "train_images": len(train_ds), "val_images": len(data["val_ds"])}
    if train_ds.stats["missing"]:
        files.log(f"skipped {train_ds.stats['missing']} train images missing on disk, e.g. "
                  f"{', '.join(train_ds.missing_examples[:3])}")
    if not len(data["val_ds"]):
        files.log("the val split is empty: no validation metrics (run `pipeline labels` to assign splits)")
    num_classes = {lv: hierarchy.num_classes[lv] for lv in levels}
    model = build_model(cfg.backbone, num_classes, weights=cfg.weights, head_dropout=cfg.head_dropout)
    model.to(env.device)
    if env.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    finest = levels[-1]
    pos = cell_positions(train_ds, finest, hierarchy)
    positions = (np.array([p[0] for p in pos]), np.array([p[1] for p in pos]))
    centroids = {}
    if cfg.haversine_tau > 0:
        for lv in levels:
            la, lo = hierarchy.centroids(lv)
            centroids[lv] = (torch.as_tensor(la, device=env.device), torch.as_tensor(lo, device=env.device))
    criterion = GeoLoss(levels, cfg.level_weights, cfg.label_smoothing, cfg.haversine_tau, centroids)
    # no weight decay on norms and biases (torchvision's --norm-weight-decay 0 habit)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    fp16 = amp and env.device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    steps_per_epoch = min(len(train_loader), cfg.max_steps or len(train_loader))
    if steps_per_epoch == 0:
        raise TrainError("the train loader yields no batch; lower --batch-size")
    total_steps = steps_per_epoch * cfg.epochs
    start_epoch, step = 1, 0
    if resumed and (run_dir / STATE_JSON).exists():
        doc = load_train_state(run_dir, optimizer, scaler, env.device)
        unwrap(model).load_state_dict(_load_weights(run_dir, env.device))
        start_epoch, step = int(doc["epoch"]) + 1, int(doc["step"])
        files.truncate_metrics(int(doc["epoch"]))
        files.log(f"resumed after epoch {doc['epoch']} (step {step})")
    elif resumed:
        files.log("no saved epoch to resume from: starting at epoch 1")
        files.truncate_metrics(0)
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * env.rank)
    t_start, step_start = time.monotonic(), step
    eval_time = [0.0]

    def on_step(epoch, i, loss):
        done = ctx["step"] - step_start
        rate = (time.monotonic() - t_start - eval_time[0]) / max(1, done)
        left = total_steps - ctx["step"]
        eta = rate * left + eval_time[0] / max(1, epoch - start_epoch + 1) * (cfg.epochs - epoch + 1)
        files.update(force=False, epoch=epoch - 1, step=ctx["step"], steps=total_steps,
                     progress=round(ctx["step"] / total_steps, 4), eta_s=round(eta, 1), loss=round(loss, 4),
                     skipped={k: stats[k] for k in ("missing", "unreadable")})

    ctx = {"cfg": cfg, "files": files, "stop": stop, "levels": levels, "step": step,
           "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
           "warmup_steps": int(round(cfg.warmup_epochs * steps_per_epoch)), "scaler": scaler,
           "stats": stats, "gen": gen, "autocast": lambda: _autocast(env, amp), "on_step": on_step}
    meta_base = {"format": RUN_FORMAT, "run": run_dir.name, "hierarchy": hierarchy.to_dict(),
                 "hierarchy_hash": hierarchy.hash,
                 "input": EvalPreset(cfg.image_size, IMAGENET_MEAN, IMAGENET_STD).to_dict(),
                 "temperatures": {str(lv): 1.0 for lv in levels}, "config": cfg.to_dict(),
                 "cell_positions": {str(finest): pos}}
    files.update(steps=total_steps, step=step, progress=round(step / total_steps, 4), epoch=start_epoch - 1)
    last = None
    state = "done"
    for epoch in range(start_epoch, cfg.epochs + 1):
        torch.manual_seed(cfg.seed + 7919 * epoch + env.rank)
        data["train_sampler"].set_epoch(epoch)
        t0 = time.monotonic()
        tr = train_one_epoch(model, criterion, optimizer, train_loader, env, ctx, epoch)
        if tr["stopped"]:
            state = "cancelled"
            # the cut epoch counts as not done: --resume redoes it (from these weights)
            _save(run_dir, model, {**meta_base, "metrics": last or {},
                                   "training": {"epoch": epoch - 1, "epochs": cfg.epochs, "state": state}},
                  optimizer, scaler, epoch - 1, (epoch - 1) * steps_per_epoch, env)
            break
        t1 = time.monotonic()
        va = evaluate(model, val_loader, env, levels, positions, cfg.level_weights, ctx["autocast"], stats)
        eval_time[0] += time.monotonic() - t1
        record = {"epoch": epoch, "train_loss": _r(tr["loss"]), "val_loss": _r(va["loss"]),
                  "lr": optimizer.param_groups[0]["lr"], "time_s": round(time.monotonic() - t0, 2),
                  "train": _round_levels(tr["levels"]), "val": _round_levels(va["levels"]) if va["n"] else {},
                  "val_km": {k: _r(v) for k, v in va["km"].items()}, "step": ctx["step"],
                  "skipped": {k: stats[k] for k in ("missing", "unreadable")}}
        files.append_metrics(record)
        last = record
        _save(run_dir, model, {**meta_base, "metrics": record,
                               "training": {"epoch": epoch, "epochs": cfg.epochs, "state": "running"}},
              optimizer, scaler, epoch, ctx["step"], env)
        v1 = " ".join(f"L{lv} {record['val'][str(lv)]['top1']:.3f}" for lv in levels) if record["val"] else "-"
        files.log(f"epoch {epoch}/{cfg.epochs} train_loss {record['train_loss']} val_loss {record['val_loss']} "
                  f"val_top1 {v1} median_km {record['val_km'].get('median_km', '-')} ({record['time_s']} s)")
        files.update(epoch=epoch, step=ctx["step"], progress=round(ctx["step"] / total_steps, 4),
                     skipped={k: stats[k] for k in ("missing", "unreadable")})
        if _any(stop.set, env):
            state = "cancelled" if epoch < cfg.epochs else "done"
            if state == "cancelled":
                break
    if state == "done" and env.main:
        files.update(progress=1.0, eta_s=0.0, step=total_steps, epoch=cfg.epochs)
        _save(run_dir, model, {**meta_base, "metrics": last or {},
                               "training": {"epoch": cfg.epochs, "epochs": cfg.epochs, "state": "done"}},
              optimizer, scaler, cfg.epochs, ctx["step"], env, save_state=False)
        # done before calibrating: calibrate_run refuses a run that is still running
        files.update(state="done", eta_s=0.0, progress=1.0)
        _calibrate(run_dir, ws, files, env)
        files.log(f"done: {run_dir}")
    elif state == "done":
        files.update(state="done", eta_s=0.0, progress=1.0)
    if state == "cancelled":
        files.update(state="cancelled", eta_s=None)
        files.log(f"cancelled ({signal.Signals(stop.signum).name if stop.signum else 'stop'}); "
                  f"weights saved; continue with --resume {run_dir}")
    return run_dir


def _save(run_dir, model, meta, optimizer, scaler, epoch, step, env, save_state=True) -> None:
    if not env.main:
        return
    save_checkpoint(run_dir, model, meta)
    if save_state:
        save_train_state(run_dir, optimizer, scaler, {"epoch": epoch, "step": step})


def _load_weights(run_dir: Path, device) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"), device=str(device))


def _calibrate(run_dir: Path, ws: Workspace, files: RunFiles, env: DistEnv) -> None:
    """pipeline.evaluate.calibrate_run (per-level temperatures on val) when it exists."""
    import inspect

    try:
        from pipeline import evaluate as ev
    except ImportError:
        return
    fn = getattr(ev, "calibrate_run", None)
    if fn is None:
        return
    params = inspect.signature(fn).parameters
    kw = {k: v for k, v in (("progress", False), ("device", str(env.device))) if k in params}
    try:
        result = fn(run_dir, ws, **kw)
        temps = {lv: round(float(r["temperature"]), 3) for lv, r in (result or {}).items()
                 if isinstance(r, dict) and "temperature" in r}
        files.log(f"calibrated on val: temperatures {temps}" if temps else "calibrated on val")
    except GeohierError as exc:
        files.log(f"calibration skipped: {exc}")
    except Exception as exc:  # noqa: BLE001 - a finished model is still usable without temperatures
        files.log(f"calibration failed ({type(exc).__name__}: {exc}); temperatures stay 1.0")


def _r(v, nd: int = 4):
    if isinstance(v, float):
        return None if not math.isfinite(v) else round(v, nd)
    return v


def _round_levels(d: dict) -> dict:
    return {lv: {k: round(v, 4) for k, v in m.items()} for lv, m in d.items()}


def train_runs(ws: Workspace, config: TrainConfig) -> list[Path]:
    """``train`` for one config, or with ``per_level`` the seed's shape: one run per level,
    ``<group>-L<k>``, each an ordinary run with one level (config.group names the set).

    The group name (``config.run_name``) also gets a directory holding the set's
    status.json (overall progress) and a config.json listing the runs, so a job launcher
    that watches ``models/<run_name>/`` sees the whole set."""
    if not config.per_level:
        return [train(ws, config)]
    config.validate()
    hierarchy = _load_hierarchy(ws)
    levels = resolve_levels(config, hierarchy)
    group = config.run_name or f"{config.backbone}-perlevel-L{'-'.join(map(str, levels))}-{_stamp()}"
    names = [f"{group}-L{lv}" for lv in levels]
    return _train_group(ws, config, group, levels, names, resume=False)


def _train_group(ws, config, group, levels, names, resume: bool) -> list[Path]:
    env_rank = int(os.environ.get("RANK", "0"))
    gdir = ws.models_dir / group
    gfiles = RunFiles(gdir, DistEnv(rank=env_rank))
    if env_rank == 0:
        gdir.mkdir(parents=True, exist_ok=True)
        if not resume:
            if (gdir / CONFIG_FILE).exists():
                raise InputError(f"a run named {group!r} already exists in {ws.models_dir}; pick another --run-name")
            atomic_write_text(gdir / CONFIG_FILE, json.dumps(
                {**replace(config, levels=levels, run_name=group).to_dict(), "per_level_group": True,
                 "runs": names, "created_at": utcnow(), "format": RUN_FORMAT}, indent=1) + "\n")
    out = []
    for i, (lv, name) in enumerate(zip(levels, names, strict=True)):
        rdir = ws.models_dir / name
        sub_status = _read_status(rdir)
        if resume and sub_status.get("state") == "done":
            out.append(rdir)
            continue
        gfiles.update(state="running", epoch=0, epochs=config.epochs, step=i, steps=len(levels),
                      progress=round(i / len(levels), 4), eta_s=None, error=None, current=name)
        sub = replace(config, per_level=False, levels=[lv], run_name=name, group=group)
        try:
            if resume and (rdir / CONFIG_FILE).exists():
                out.append(train(ws, sub, resume_dir=rdir))
            else:
                out.append(train(ws, sub))
        except BaseException as exc:
            gfiles.update(state="cancelled" if isinstance(exc, KeyboardInterrupt) else "failed",
                          error=f"{name}: {exc}", eta_s=None)
            raise
        st = _read_status(rdir).get("state")
        if st != "done":
            gfiles.update(state=st or "failed", eta_s=None, error=None if st == "cancelled" else f"{name} {st}")
            return out
    gfiles.update(state="done", progress=1.0, step=len(levels), eta_s=0.0, current=None)
    return out


def _read_status(run_dir: Path) -> dict:
    return read_json(run_dir / STATUS_FILE)


RESUME_OVERRIDES = ("epochs", "workers", "device", "max_steps", "threads")


def resume(ws: Workspace, run_dir: str | os.PathLike, **overrides) -> list[Path]:
    """Continue a cancelled / failed / finished run (or a per-level set) from its last
    saved epoch; ``overrides`` may change epochs (to train longer), workers, device, max_steps."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        alt = ws.models_dir / str(run_dir)
        if alt.is_dir():
            run_dir = alt
        else:
            raise WorkspaceError(f"--resume {run_dir}: no such run directory")
    stored = require_json(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).exists() else None
    if stored is None:
        raise WorkspaceError(f"{run_dir} has no {CONFIG_FILE}: not a run that can be resumed")
    cfg = TrainConfig.from_dict(stored)
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if k in RESUME_OVERRIDES and v is not None})
    if stored.get("per_level_group"):
        levels = [int(v) for v in stored["levels"]]
        return _train_group(ws, replace(cfg, per_level=True), run_dir.name, levels, stored["runs"], resume=True)
    return [train(ws, cfg, resume_dir=run_dir)]


# ----------------------------------------------------------------------------- CLI


def get_args_parser(add_help: bool = True, parser: argparse.ArgumentParser | None = None):
    d = TrainConfig()
    p = parser or argparse.ArgumentParser(description="Train a multi-level geolocation classifier",
                                          add_help=add_help)
    p.add_argument("--levels", default=None,
                   help="comma-separated grid levels to train (default: every level of hierarchy.json)")
    p.add_argument("--per-level", action="store_true",
                   help="the seed's shape: one model (run) per level instead of one shared backbone")
    p.add_argument("--backbone", default=d.backbone, metavar="NAME",
                   help=f"torchvision backbone: {', '.join(BACKBONES)} (default: {d.backbone})")
    p.add_argument("--weights", default=d.weights,
                   help=f"initial backbone weights: imagenet, none or a .safetensors file (default: {d.weights})")
    p.add_argument("--preset", choices=["demo"], default=None,
                   help="start from a preset configuration (demo: resnet18 at 64 px, a few minutes on a CPU); "
                        "other flags given explicitly still apply")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs (default: {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step and process (default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default: {d.lr})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default: {d.weight_decay})")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help=f"linear warm-up length before the cosine decay (default: {d.warmup_epochs})")
    p.add_argument("--image-size", type=int, default=d.image_size, help=f"input size in px (default: {d.image_size})")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help=f"uniform label smoothing (default: {d.label_smoothing})")
    p.add_argument("--haversine-tau", type=float, default=d.haversine_tau, metavar="KM",
                   help="PIGEON haversine label smoothing scale in km, 0 = off (default: 0)")
    p.add_argument("--level-weights", default=None,
                   help="loss weight per level, LEVEL:W pairs (1:1,8:0.5) or one per level (default: 1 each)")
    p.add_argument("--balanced", action="store_true", help="class-balanced sampling at the finest level (default: off)")
    p.add_argument("--randaugment", action="store_true", help="add RandAugment to the train transforms (default: off)")
    p.add_argument("--hflip", type=float, default=d.hflip,
                   help="horizontal flip probability; flips swap the driving side (default: 0)")
    p.add_argument("--mixup", type=float, default=d.mixup, metavar="ALPHA", help="MixUp Beta alpha, 0 = off (default: 0)")
    p.add_argument("--cutmix", type=float, default=d.cutmix, metavar="ALPHA", help="CutMix Beta alpha, 0 = off (default: 0)")
    p.add_argument("--workers", type=int, default=None, help=f"data-loading processes (default: {d.workers})")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU compute threads per process (default: cores / processes, less one "
                        "when loader workers run)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on with CUDA, off on CPU)")
    p.add_argument("--run-name", default=None, help="run directory name under models/ (default: <backbone>-L<levels>-<time>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue this run from its last saved epoch (--epochs may extend it)")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after N steps (default: whole epoch)")
    p.add_argument("--limit-train", type=int, default=None, metavar="N", help="train on a random subset of N images (default: all)")
    p.add_argument("--limit-val", type=int, default=None, metavar="N", help="validate on N images (default: all)")
    return p


_PRESET_DIFF = ("backbone", "weights", "batch_size", "lr", "weight_decay", "warmup_epochs", "image_size",
                "label_smoothing")


def config_from_args(args) -> TrainConfig:
    d = TrainConfig()
    levels = list(grid.parse_levels(args.levels)) if args.levels else None
    kw = dict(levels=levels, per_level=args.per_level, backbone=args.backbone, weights=args.weights,
              batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
              warmup_epochs=args.warmup_epochs, image_size=args.image_size, label_smoothing=args.label_smoothing,
              haversine_tau=args.haversine_tau, balanced=args.balanced, randaugment=args.randaugment,
              hflip=args.hflip, mixup=args.mixup, cutmix=args.cutmix, seed=args.seed, amp=args.amp,
              run_name=args.run_name, threads=args.threads, max_steps=args.max_steps, limit_train=args.limit_train,
              limit_val=args.limit_val)
    for name in ("epochs", "workers", "device"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    kw["level_weights"] = parse_level_weights(args.level_weights, levels) if args.level_weights else None
    if getattr(args, "preset", None) == "demo":
        base = demo_config()
        # flags left at their defaults take the preset's value
        for name in _PRESET_DIFF:
            if kw[name] == getattr(d, name):
                kw[name] = getattr(base, name)
        for name in ("epochs", "workers"):
            kw.setdefault(name, getattr(base, name))
        if kw["run_name"] is None:
            kw["run_name"] = base.run_name
    return TrainConfig(**kw)


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (one backbone, a head per level)",
                       description="Train a multi-level geolocation classifier: one backbone and a linear head "
                                   "per grid level (or, with --per-level, one run per level). Runs under "
                                   "torchrun too.")
    get_args_parser(parser=p)
    p.set_defaults(func=run)


def run(args, ws: Workspace) -> int:
    if args.resume:
        dirs = resume(ws, args.resume, epochs=args.epochs, workers=args.workers, device=args.device,
                      max_steps=args.max_steps, threads=args.threads)
    else:
        dirs = train_runs(ws, config_from_args(args))
    states = [_read_status(d).get("state") for d in dirs]
    if int(os.environ.get("RANK", "0")) == 0:
        for d, s in zip(dirs, states, strict=True):
            print(f"{s}: {d}")
    return 130 if "cancelled" in states else 0


def main(args) -> int:
    """torchvision-style entry: ``main(get_args_parser().parse_args())`` with the default workspace."""
    return run(args, Workspace.from_env())


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
