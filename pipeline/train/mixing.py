"""MixUp and CutMix on a batch of images (one of them, at random, when both are on)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def mix_batch(x: torch.Tensor, mixup: float, cutmix: float, gen: torch.Generator):
    """MixUp or CutMix on a batch ``x`` (B, 3, H, W).

    Returns (x, (lam, perm)) or (x, None) when both alphas are 0: the loss of the mixed
    batch is lam * loss(y) + (1 - lam) * loss(y[perm])."""
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


@dataclass
class Mixing:
    """The run's mixing: its two Beta alphas and its random generator (seeded per rank)."""

    mixup: float = 0.0
    cutmix: float = 0.0
    gen: torch.Generator | None = None

    def __call__(self, x: torch.Tensor):
        if self.gen is None:
            self.gen = torch.Generator().manual_seed(0)
        return mix_batch(x, self.mixup, self.cutmix, self.gen)
