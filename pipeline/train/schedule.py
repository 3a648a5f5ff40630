"""The learning-rate schedule: linear warm-up, then cosine decay to 1% of the peak, per step.

A ``torch.optim.lr_scheduler.LambdaLR`` over the closed form ``warmup_cosine``, rather than
SequentialLR(LinearLR, CosineAnnealingLR): CosineAnnealingLR computes each rate from the
previous one, so a run resumed with more epochs (a longer schedule) would go on from the
old curve; the closed form puts a resumed run exactly where the new length says.
"""

from __future__ import annotations

import math

import torch

MIN_RATIO = 0.01


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = MIN_RATIO) -> float:
    """The factor of the peak rate at ``step`` (0-based) of ``total``: linear warm-up over
    ``warmup`` steps, then cosine decay to ``min_ratio``.

    >>> [round(warmup_cosine(s, 10, 2), 3) for s in (0, 1, 2, 9)]
    [0.5, 1.0, 1.0, 0.048]
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                   start_step: int = 0, min_ratio: float = MIN_RATIO) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of ``optimizer`` (peak rate: each group's ``initial_lr``, else its
    ``lr``), positioned so that the next optimizer step is step ``start_step``; call
    ``step()`` after each optimizer step. ``last_epoch`` counts the steps taken."""
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])

    def factor(step: int) -> float:
        return warmup_cosine(step, total_steps, warmup_steps, min_ratio)

    # last_epoch = start - 1: the constructor's own step() lands on start_step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)
