"""Samplers that shard over ranks: disjoint evaluation shares, class-balanced training draws."""

from __future__ import annotations

import math

import numpy as np
import torch


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
