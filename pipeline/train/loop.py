"""One epoch of training and one validation pass, in torchvision's reference shape:
``train_one_epoch(...)`` and ``evaluate(...) -> metrics``, each with explicit arguments.

The validation pass runs the model through ``geohier.forward.forward_batches`` (the one
model-over-loader loop); its metrics are reduced over ranks under torchrun.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import numpy as np
import torch

from geohier.collective import any_rank, gather
from geohier.dataset import IGNORE_INDEX
from geohier.forward import OFFSET, forward_batches
from geohier.metrics import geo_metrics, target_rank
from geohier.model import decode_offsets, unwrap
from pipeline.train.data import TrainError
from pipeline.train.distributed import DistEnv, StopFlag
from pipeline.train.losses import GeoLoss
from pipeline.train.mixing import Mixing

TOPK = (1, 5, 10)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on a GPU that has it (else fp16, with a GradScaler), nothing on a CPU."""
    if device.type == "cuda" and amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


class TopK:
    """Top-1/5/10 hits per level, summed over batches and then over ranks.

    Each batch's hits are counted where its logits are (no copy to the CPU) and summed as
    tensors until ``part``: a step costs two counting passes over (B, C) per level
    (``target_rank``), the same counts as ``geohier.metrics.topk_correct``."""

    def __init__(self, levels):
        self.levels = list(levels)
        self._hits: dict[int, torch.Tensor] = {}  # lv -> (len(TOPK),) hits so far
        self._ks: torch.Tensor | None = None
        self.counts = dict.fromkeys(self.levels, 0)

    def add(self, out: dict[int, torch.Tensor], labels: torch.Tensor) -> None:
        for j, lv in enumerate(self.levels):
            z = out[lv].detach().float()
            rank = target_rank(z, labels[:, j].to(z.device))
            if self._ks is None or self._ks.device != rank.device:
                self._ks = torch.tensor(TOPK, device=rank.device)
            h = (rank[:, None] < self._ks).sum(0)
            self._hits[lv] = self._hits[lv] + h if lv in self._hits else h
            self.counts[lv] += int(rank.shape[0])

    @property
    def hits(self) -> dict[int, dict[int, int]]:
        return {lv: (dict(zip(TOPK, (int(v) for v in self._hits[lv].tolist()), strict=True))
                     if lv in self._hits else dict.fromkeys(TOPK, 0)) for lv in self.levels}

    def part(self) -> dict:
        return {"hits": self.hits, "counts": self.counts}

    def reduce(self, parts: list[dict]) -> dict:
        """{"1": {"top1", "top5", "top10"}, ...} over every rank's ``part``."""
        acc = {}
        for lv in self.levels:
            c = sum(p["counts"][lv] for p in parts)
            acc[str(lv)] = {f"top{k}": (sum(p["hits"][lv][k] for p in parts) / c if c else 0.0) for k in TOPK}
        return acc


def train_one_epoch(model: torch.nn.Module, criterion: GeoLoss, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                    loader, env: DistEnv, *, epoch: int, epochs: int, steps: int, stop: StopFlag,
                    mixing: Mixing, amp: bool, image_size: int, stats: dict,
                    log: Callable[[str], None], on_step: Callable[[int, float], None] | None = None) -> dict:
    """At most ``steps`` optimizer steps over ``loader``; the schedule steps with each.

    ``stats["unreadable"]`` counts the images that did not decode (the first ten are
    logged); ``on_step(i, loss)`` follows each step (i counts this epoch's steps); a
    SIGTERM/SIGINT on any rank (``stop``) ends the epoch early on all. Returns
    {"loss", "levels": {"1": {"top1", "top5", "top10"}}, "lr" (of the last step),
    "steps", "stopped"}."""
    from tqdm import tqdm

    levels = criterion.levels
    model.train()
    loss_sum, n_seen, done, lr = 0.0, 0, 0, optimizer.param_groups[0]["lr"]
    topk = TopK(levels)
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, file=sys.stderr,
               disable=None if env.main else True, dynamic_ncols=True)
    stopped = False
    it = iter(loader)
    for i in range(steps):
        if any_rank(stop.set, env):
            stopped = True
            break
        try:
            batch = next(it)
        except StopIteration:
            break
        _count_skipped(batch.skipped, stats, log)
        x, y = batch.images, batch.labels
        latlon = batch_latlon(loader, batch.index, env.device) if criterion.offset is not None else None
        if x.shape[0] < 2:  # all (or all but one) unreadable: nothing BatchNorm can use
            if not env.distributed:
                continue
            # every rank must take part in the step: a batch whose targets are all ignored
            x = torch.zeros(2, *x.shape[1:]) if x.ndim != 4 else torch.zeros(2, 3, image_size, image_size)
            y = torch.full((2, len(levels)), IGNORE_INDEX, dtype=torch.long)
            if latlon is not None:
                latlon = (torch.zeros(2, dtype=torch.float64, device=env.device),) * 2
        lr = optimizer.param_groups[0]["lr"]
        x = x.to(env.device, non_blocking=True)
        if env.device.type == "cuda" and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(env.device, non_blocking=True)
        x, mix = mixing(x)
        with autocast(env.device, amp):
            out = model(x)  # {lv: (B, C_lv)}
            loss, _ = criterion(out, y, mix, latlon=latlon)
        if not torch.isfinite(loss):
            raise TrainError(f"the loss became {loss.item()} at step {scheduler.last_epoch}: "
                             f"lower --lr (now {scheduler.base_lrs[0]})")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        b = x.shape[0]
        loss_sum += loss.item() * b
        n_seen += b
        with torch.no_grad():
            topk.add(out, y)
        done += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)  # drawn at tqdm's pace
        if on_step is not None:
            on_step(i + 1, loss.item())
    bar.close()
    del it  # shuts the workers down before anything is saved
    parts = gather({"loss": loss_sum, "n": n_seen, **topk.part()}, env)
    n_all = sum(p["n"] for p in parts)
    return {"loss": sum(p["loss"] for p in parts) / n_all if n_all else float("nan"),
            "levels": topk.reduce(parts), "lr": lr, "steps": done, "stopped": stopped}


def batch_latlon(loader, index, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The true (lat, lon) of a batch's images (float64 tensors on ``device``): a hybrid
    head's offset targets. ``index`` indexes the loader's dataset (an image dataset, or a
    frozen run's ``FeatureSet``), as ``batch.index`` does."""
    ds = loader.dataset
    base = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds
    idx = np.asarray(index, dtype=np.int64)
    return (torch.as_tensor(np.asarray(base.lat)[idx], dtype=torch.float64, device=device),
            torch.as_tensor(np.asarray(base.lon)[idx], dtype=torch.float64, device=device))


def _count_skipped(skipped: list, stats: dict, log: Callable[[str], None]) -> None:
    if not skipped:
        return
    stats["unreadable"] += len(skipped)
    for s in skipped[:3]:
        if stats["unreadable"] <= 10:
            log(f"skipped unreadable image {s.path}: {s.reason}")


def evaluate(model: torch.nn.Module, criterion: GeoLoss, loader, env: DistEnv, *,
             positions: tuple[np.ndarray, np.ndarray] | None = None, amp: bool = False,
             stats: dict | None = None) -> dict:
    """Loss (the levels' weighted plain cross-entropy), top-1/5/10 per level and, when
    ``positions`` (lat, lon arrays of the finest level's classes) is given, the km metrics
    of predicting the finest level's argmax (moved by its offset for a hybrid head).
    Returns {"loss", "levels", "km", "n"}."""
    levels = criterion.levels
    net = unwrap(model)  # no DDP hooks: the ranks' shares differ in length
    net.eval()
    ds = loader.dataset
    base = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds
    loss_sum, n_seen = 0.0, 0
    topk = TopK(levels)
    pos: list[list[np.ndarray]] = [[], [], [], []]  # predicted lat, lon; true lat, lon
    for batch, out in forward_batches(net, loader, env.device, amp=amp):
        if batch.skipped and stats is not None:
            stats["unreadable"] += len(batch.skipped)
        if not out:
            continue
        y = batch.labels
        b = y.shape[0]
        latlon = None
        if criterion.offset is not None:
            i = batch.index.numpy()
            latlon = (torch.as_tensor(base.lat[i]), torch.as_tensor(base.lon[i]))
        loss_sum += float(criterion.plain(out, y, latlon)) * b
        n_seen += b
        topk.add(out, y)
        if positions is not None:
            top = out[levels[-1]].argmax(1).numpy()  # (B,) finest-level class
            idx = batch.index.numpy()
            plat, plon = positions[0][top], positions[1][top]
            if OFFSET in out and criterion.offset is not None:  # a hybrid head: its guess
                guess = decode_offsets(out[OFFSET][torch.arange(len(top)), torch.as_tensor(top)].numpy(),
                                       np.stack([plat, plon], 1), criterion.offset.bounds.cpu().numpy()[top])
                plat, plon = guess[:, 0], guess[:, 1]
            for acc, v in zip(pos, (plat, plon, base.lat[idx], base.lon[idx]), strict=True):
                acc.append(v)
    part = {"loss": loss_sum, "n": n_seen, **topk.part(),
            "pos": [np.concatenate(a) if a else np.zeros(0) for a in pos]}
    parts = gather(part, env)
    n_all = sum(p["n"] for p in parts)
    km = {}
    if positions is not None and n_all:
        p = [np.concatenate([t["pos"][i] for t in parts]) for i in range(4)]
        km = geo_metrics(p[0], p[1], p[2], p[3])
    return {"loss": sum(p["loss"] for p in parts) / n_all if n_all else float("nan"),
            "levels": topk.reduce(parts), "km": km, "n": n_all}
