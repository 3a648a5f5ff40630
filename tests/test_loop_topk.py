"""The top-k bookkeeping (geohier.metrics.target_rank, the epoch loop's TopK) counts what a
brute-force rank counts, and
FeatureLoader's length matches what it yields (both were made cheaper per step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geohier.metrics import target_rank, topk_correct
from pipeline.train.frozen import FeatureLoader, FeatureSet
from pipeline.train.loop import TOPK, TopK
from pipeline.train.samplers import BalancedSampler


@pytest.mark.slow
def test_target_rank_matches_topk_correct_with_ties_ignored_rows_and_nan():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        b, c = int(torch.randint(1, 50, (1,), generator=g)), int(torch.randint(1, 30, (1,), generator=g))
        # integer-valued scores: many exact ties; else continuous ones
        z = torch.randint(-3, 3, (b, c), generator=g).float() if trial % 2 else torch.randn(b, c, generator=g)
        if trial % 5 == 0:
            z[0] = 0.0  # a row of all-equal scores
        if trial % 7 == 0:
            z[-1, 0] = float("nan")
        t = torch.randint(0, c, (b,), generator=g)
        t[torch.rand(b, generator=g) < 0.2] = -100
        hits, n = topk_correct(z, t, TOPK)
        rank = target_rank(z, t)
        ref = [sum(1 for j in range(c) if z[i, j] > z[i, t[i]] or (z[i, j] == z[i, t[i]] and j < t[i]))
               for i in range(b) if t[i] >= 0]  # by hand: above, or tied with a lower index
        assert rank.tolist() == ref
        assert rank.shape[0] == n
        assert {k: int((rank < k).sum()) for k in TOPK} == hits
        acc = TopK([1])
        acc.add({1: z}, t[:, None])
        acc.add({1: z}, t[:, None])
        assert acc.part() == {"hits": {1: {k: 2 * v for k, v in hits.items()}}, "counts": {1: 2 * n}}


def test_target_rank_refuses_what_topk_correct_refuses():
    assert TopK([1, 3]).part()["hits"] == {1: dict.fromkeys(TOPK, 0), 3: dict.fromkeys(TOPK, 0)}
    with pytest.raises(ValueError, match="number of classes"):
        target_rank(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="rows of scores"):
        target_rank(torch.zeros(2, 3), torch.tensor([0]))


@pytest.mark.parametrize("n", [0, 1, 5, 17, 64])
def test_feature_loader_length_is_what_it_yields(n):
    data = FeatureSet(torch.zeros(n, 2), np.zeros((n, 1)), np.zeros(n), np.zeros(n))
    for world in (1, 2, 3):
        for rank in range(world):
            for shuffle in (True, False):
                for drop_last in (True, False):
                    for bs in (1, 4, 64):
                        loader = FeatureLoader(data, bs, shuffle=shuffle, rank=rank, world=world, drop_last=drop_last)
                        batches = list(loader)
                        assert len(loader) == len(batches)
                        if not drop_last:
                            assert sum(len(b.index) for b in batches) == len(loader._rows())
            if n:  # class-balanced draws: as many as the sampler gives this rank
                sampler = BalancedSampler(np.ones(n), rank, world)
                loader = FeatureLoader(data, 4, shuffle=True, rank=rank, world=world, sampler=sampler)
                assert len(loader) == len(list(loader)) == -(-len(sampler) // 4)
