"""geohier.combine: the masked log-space combination, the keep rules, temperatures, the
tree, and the hierarchical accuracy metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from geohier import geodesy
from geohier.combine import (
    Combined,
    KeepRule,
    Tree,
    combine,
    hierarchical_accuracy,
    parse_thresholds,
)
from geohier.errors import InputError

# ----------------------------------------------------------------------------- helpers


def random_tree(rng, levels=(1, 2, 3), sizes=(4, 12, 40)) -> Tree:
    """Random parents such that every class has at least one child (all alive)."""
    parents = {}
    for (prev_n, n), lv in zip(zip(sizes, sizes[1:], strict=False), levels[1:], strict=False):
        p = np.concatenate([np.arange(prev_n), rng.integers(0, prev_n, n - prev_n)])
        parents[lv] = np.sort(p)
    return Tree.from_parents(levels, parents, dict(zip(levels, sizes, strict=False)))


def random_logits(rng, tree: Tree, batch: int, scale: float = 3.0) -> dict[int, torch.Tensor]:
    return {lv: torch.from_numpy(rng.normal(0, scale, (batch, tree.num_classes[lv])).astype(np.float32))
            for lv in tree.levels}


def _lse(values) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def brute_force(logits_row: dict[int, np.ndarray], tree: Tree, rules: dict[int, KeepRule],
                temps=None) -> dict[int, list[tuple[int, float, float]]]:
    """The combination written as plainly as possible: Python loops and sets, one row.

    Returns per level the kept (class, prob, score), best first."""
    levels = tree.levels
    finest = levels[-1]
    alive = {finest: set(range(tree.num_classes[finest]))}
    for prev, lv in zip(levels[-2::-1], levels[:0:-1], strict=False):
        alive[prev] = {int(tree.parents[lv][c]) for c in alive[lv]}
    out, kept_score = {}, None
    for i, lv in enumerate(levels):
        t = (temps or {}).get(lv, 1.0)
        z = [float(v) / t for v in logits_row[lv]]
        if i == 0:
            cands = sorted(alive[lv])
        else:
            cands = [c for c in range(len(z)) if c in alive[lv] and int(tree.parents[lv][c]) in kept_score]
        lse = _lse([z[c] for c in cands])
        score = {c: (0.0 if i == 0 else kept_score[int(tree.parents[lv][c])]) + z[c] - lse for c in cands}
        norm = _lse(list(score.values()))
        prob = {c: math.exp(score[c] - norm) for c in cands}
        order = sorted(cands, key=lambda c: -prob[c])
        r = rules[lv]
        if r.rule == "topk":
            keep = order[:r.top_k]
        elif r.rule == "adaptive":
            k = r.k_max
            for j, th in enumerate(r.thresholds):
                if prob[order[0]] >= th:
                    k = j + 1
                    break
            keep = order[:k]
        else:
            keep, mass = [], 0.0
            for c in order[:r.max_keep]:
                if mass >= r.cumulative:
                    break
                keep.append(c)
                mass += prob[c]
        keep = [c for j, c in enumerate(keep) if j == 0 or prob[c] >= r.min_prob]
        out[lv] = [(c, prob[c], score[c]) for c in keep]
        kept_score = {c: score[c] for c in keep}
    return out


def as_lists(c: Combined, row: int) -> dict[int, list[tuple[int, float, float]]]:
    out = {}
    for lv in c.levels:
        n = int(c.count[lv][row])
        out[lv] = list(zip(c.index[lv][row, :n].tolist(), c.prob[lv][row, :n].tolist(),
                           c.score[lv][row, :n].tolist(), strict=True))
    return out


def seed_combine(logits: dict[int, torch.Tensor], tree: Tree, k: int) -> dict[int, torch.Tensor]:
    """The seed's combination (one row): child logits times the parent's probability, then a
    softmax over the children of the kept parents; top-k kept at each level."""
    levels = tree.levels
    probs = torch.softmax(logits[levels[0]][0], 0)
    kept = probs.topk(k).indices.tolist()
    out = {levels[0]: probs}
    for lv in levels[1:]:
        z = logits[lv][0]
        masked = torch.full_like(z, float("-inf"))
        for p in kept:
            for c in np.flatnonzero(tree.parents[lv] == p):
                masked[c] = z[c] * probs[p]
        probs = torch.softmax(masked, 0)
        out[lv] = probs
        kept = probs.topk(min(k, int(torch.isfinite(masked).sum()))).indices.tolist()
    return out


# ----------------------------------------------------------------------------- combination


def test_keep_all_matches_the_brute_force_joint():
    """Keeping every class, the finest score is the sum of every level's log-softmax along the
    path: the joint computed by walking each finest class up to the root."""
    rng = np.random.default_rng(0)
    tree = random_tree(rng)
    logits = random_logits(rng, tree, 5)
    c = combine(logits, tree, KeepRule("topk", top_k=200))
    finest = tree.levels[-1]
    logp = {lv: torch.log_softmax(logits[lv], 1).numpy() for lv in tree.levels}
    for row in range(5):
        n = int(c.count[finest][row])
        assert n == tree.num_classes[finest]
        got = dict(zip(c.index[finest][row, :n].tolist(), c.score[finest][row, :n].tolist(), strict=True))
        for cls in range(tree.num_classes[finest]):
            joint, cur = 0.0, cls
            for lv in reversed(tree.levels):
                joint += logp[lv][row, cur]
                cur = int(tree.parents[lv][cur])
            assert got[cls] == pytest.approx(joint, abs=1e-4)
        # prob is the joint normalised over all paths; it is sorted best first
        probs = c.prob[finest][row, :n].numpy()
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert np.all(np.diff(probs) <= 1e-7)


RULES = [
    KeepRule(),
    KeepRule("adaptive", thresholds=(0.7, 0.3), k_max=4),
    KeepRule("adaptive", k_max=20),
    KeepRule("cumulative", cumulative=0.99, max_keep=64),
    KeepRule("topk", top_k=1),
    KeepRule("topk", top_k=3),
    KeepRule("topk", top_k=3, min_prob=0.1),
    KeepRule("cumulative", cumulative=0.5),
    KeepRule("cumulative", cumulative=0.95, max_keep=7),
    KeepRule("cumulative", cumulative=0.9, min_prob=0.05),
]


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.describe())
@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_pruned_combination_matches_the_brute_force(rule, scale):
    rng = np.random.default_rng(1)
    tree = random_tree(rng)
    logits = random_logits(rng, tree, 24, scale)
    rules = dict.fromkeys(tree.levels, rule)
    c = combine(logits, tree, rules)
    for row in range(24):
        want = brute_force({lv: logits[lv][row].numpy() for lv in tree.levels}, tree, rules)
        got = as_lists(c, row)
        for lv in tree.levels:
            assert [g[0] for g in got[lv]] == [w[0] for w in want[lv]], (lv, row)
            np.testing.assert_allclose([g[1] for g in got[lv]], [w[1] for w in want[lv]], atol=1e-5)
            np.testing.assert_allclose([g[2] for g in got[lv]], [w[2] for w in want[lv]], atol=1e-4)


def test_rules_differ_per_level_and_parents_are_reported():
    rng = np.random.default_rng(2)
    tree = random_tree(rng)
    logits = random_logits(rng, tree, 8)
    rules = {1: KeepRule("topk", top_k=2), 2: KeepRule("cumulative", cumulative=0.8), 3: KeepRule("topk", top_k=5)}
    c = combine(logits, tree, rules)
    assert c.index[1].shape[1] == 2 and bool((c.count[1] == 2).all())
    assert bool((c.count[3] <= 5).all())
    for row in range(8):
        want = brute_force({lv: logits[lv][row].numpy() for lv in tree.levels}, tree, rules)
        assert [g[0] for g in as_lists(c, row)[3]] == [w[0] for w in want[3]]
        for lv, prev in ((2, 1), (3, 2)):
            n = int(c.count[lv][row])
            parents = c.parent[lv][row, :n].tolist()
            assert parents == [int(tree.parents[lv][k]) for k in c.index[lv][row, :n].tolist()]
            assert set(parents) <= set(c.index[prev][row, :int(c.count[prev][row])].tolist())
    assert bool((c.parent[1] == -1).all())


def test_adaptive_rule_picks_k_from_the_top_probability():
    rule = KeepRule()  # 0.85 / 0.65 / 0.40, else 6
    probs = torch.tensor([[0.90, 0.05, 0.05, 0, 0, 0, 0],
                          [0.70, 0.20, 0.10, 0, 0, 0, 0],
                          [0.50, 0.30, 0.20, 0, 0, 0, 0],
                          [0.30, 0.20, 0.20, 0.1, 0.1, 0.05, 0.05]])
    assert rule.keep(probs).sum(1).tolist() == [1, 2, 3, 6]
    assert KeepRule(k_max=2).keep(probs).sum(1).tolist() == [1, 2, 3, 2]
    assert KeepRule(thresholds=(0.95, 0.6)).keep(probs).sum(1).tolist() == [2, 2, 6, 6]


def test_cumulative_and_min_prob():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01]])
    assert KeepRule("cumulative", cumulative=0.8).keep(probs).sum(1).tolist() == [2, 1]
    assert KeepRule("cumulative", cumulative=0.81).keep(probs).sum(1).tolist() == [3, 1]
    assert KeepRule("cumulative", cumulative=1.0).keep(probs).sum(1).tolist() == [4, 4]
    # min_prob drops weak candidates but never the top one
    assert KeepRule("topk", top_k=4, min_prob=0.2).keep(probs).sum(1).tolist() == [2, 1]
    assert KeepRule("topk", top_k=4, min_prob=0.99).keep(probs).sum(1).tolist() == [1, 1]


def test_log_space_does_not_boost_unlikely_parents_like_the_seed():
    """Parent A has p=0.9, B p=0.1. Level 2 dislikes every child, A's a bit less (-2) than
    B's (-10). The seed scales logits by the parent probability: A's children become -1.8,
    B's -1.0, so a child of the unlikely parent B wins. In log space A's children win."""
    tree = Tree.from_parents([1, 2], {2: [0, 0, 1, 1]})
    l1 = torch.tensor([[math.log(0.9), math.log(0.1)]])
    l2 = torch.tensor([[-2.0, -2.5, -10.0, -10.5]])
    logits = {1: l1, 2: l2}
    seed = seed_combine(logits, tree, k=2)
    assert int(seed[2].argmax()) == 2  # the seed's answer is a child of B
    c = combine(logits, tree, KeepRule("topk", top_k=2))
    assert int(c.best()[0]) == 0  # ours: a child of A
    assert c.index[2][0].tolist() == [0, 1]
    assert int(c.parent[2][0, 0]) == 0
    # And ours is the joint: p(A) * p(child | level-2 restricted to A and B's children)
    q = torch.softmax(l2[0], 0)
    assert float(c.score[2][0, 0]) == pytest.approx(math.log(0.9) + math.log(float(q[0])), abs=1e-5)


@pytest.mark.slow
def test_temperature_divides_the_logits():
    rng = np.random.default_rng(3)
    tree = random_tree(rng)
    logits = random_logits(rng, tree, 6)
    temps = {1: 2.0, 2: 0.5, 3: 1.5}
    rule = KeepRule("topk", top_k=3)
    a = combine(logits, tree, rule, temps)
    b = combine({lv: logits[lv] / temps[lv] for lv in tree.levels}, tree, rule)
    for lv in tree.levels:
        assert torch.equal(a.index[lv], b.index[lv])
        torch.testing.assert_close(a.prob[lv], b.prob[lv])
    # the first level's prob is the tempered softmax
    want = torch.softmax(logits[1] / 2.0, 1).topk(3, 1).values
    torch.testing.assert_close(a.prob[1], want)
    # T = 1 everywhere (or none) is the same thing
    c = combine(logits, tree, rule, dict.fromkeys(tree.levels, 1.0))
    d = combine(logits, tree, rule, None)
    assert torch.equal(c.index[3], d.index[3])
    # string keys (as in meta.json) work too
    e = combine(logits, tree, rule, {str(k): v for k, v in temps.items()})
    assert torch.equal(e.index[3], a.index[3])


def test_dead_branches_are_never_kept():
    """Parent 1 has no child at the finest level: even when it is by far the most likely,
    the answer comes from the other branch and the level never ends empty."""
    tree = Tree.from_parents([1, 2, 3], {2: [0, 0, 1], 3: [0, 1, 1]}, {1: 2, 2: 3, 3: 3})
    assert tree.alive[2].tolist() == [True, True, False]
    assert tree.alive[1].tolist() == [True, False]
    logits = {1: torch.tensor([[0.0, 9.0]]), 2: torch.tensor([[0.0, 1.0, 9.0]]),
              3: torch.tensor([[0.0, 1.0, 2.0]])}
    c = combine(logits, tree, KeepRule("topk", top_k=1))
    assert c.index[1].tolist() == [[0]] and c.index[2].tolist() == [[1]]
    assert int(c.best()[0]) in (1, 2)


def test_batch_of_one_and_empty_batch():
    rng = np.random.default_rng(4)
    tree = random_tree(rng)
    one = combine(random_logits(rng, tree, 1), tree)
    assert one.best().shape == (1,)
    empty = combine({lv: torch.zeros(0, n) for lv, n in tree.num_classes.items()}, tree)
    assert empty.best().shape == (0,)


def test_single_level_tree():
    tree = Tree.from_parents([5], {}, {5: 7})
    z = torch.tensor([[0.0, 3.0, 1.0, 0, 0, 0, 0]])
    c = combine({5: z}, tree, KeepRule("topk", top_k=2))
    assert c.index[5].tolist() == [[1, 2]]


def test_keep_rule_validation():
    with pytest.raises(InputError, match="unknown rule 'best'"):
        KeepRule("best")
    with pytest.raises(InputError, match="top-k"):
        KeepRule("topk", top_k=0)
    with pytest.raises(InputError, match="cumulative"):
        KeepRule("cumulative", cumulative=1.5)
    with pytest.raises(InputError, match="min-prob"):
        KeepRule(min_prob=1.0)
    with pytest.raises(InputError, match="decreasing"):
        KeepRule(thresholds=(0.4, 0.8))
    with pytest.raises(InputError, match="0.85,0.65"):
        parse_thresholds("high,low")
    assert parse_thresholds("0.9,0.6,0.3") == (0.9, 0.6, 0.3)
    r = KeepRule("cumulative", cumulative=0.7, min_prob=0.01)
    assert KeepRule.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_hierarchical_accuracy_on_known_values():
    tree = Tree.from_parents([1, 2], {2: [0, 0, 1, 1]})
    positions = np.array([[10.0, 10.0], [10.0, 20.0], [-10.0, 100.0], [-10.0, 110.0]])
    # row 0: confident and right; row 1: best is class 1 but truth is class 0 (kept 2nd)
    logits = {1: torch.tensor([[5.0, 0.0], [5.0, 0.0]]),
              2: torch.tensor([[5.0, 0.0, 0.0, 0.0], [1.0, 1.5, 0.0, 0.0]])}
    m = hierarchical_accuracy(logits, tree, {1: [0, 0], 2: [0, 0]}, [10.0, 10.0], [10.0, 10.0], positions,
                              KeepRule("topk", top_k=2))
    assert m["rows"] == 2
    assert m["top1"] == 0.5 and m["hit"] == 1.0
    assert m["kept"] == 2.0
    d = float(geodesy.haversine_km(10, 20, 10, 10))
    assert m["acc_25km"] == 0.5 and m["acc_2500km"] == 1.0
    assert m["median_km"] == pytest.approx(d / 2)
    assert m["levels"][1]["hit"] == 1.0


@pytest.mark.slow
def test_row_buckets_give_the_same_answer(monkeypatch):
    """Big batches are split by how many parents each row kept; the result is the same."""
    import geohier.combine as gi

    rng = np.random.default_rng(5)
    tree = random_tree(rng, sizes=(4, 30, 200))
    logits = random_logits(rng, tree, 600, scale=1.0)
    rule = KeepRule("cumulative", cumulative=0.9, max_keep=24)
    monkeypatch.setattr(gi, "BUCKET_MIN", 10**12)
    whole = combine(logits, tree, rule)
    monkeypatch.setattr(gi, "BUCKET_MIN", 0)
    split = combine(logits, tree, rule)
    assert len(set(whole.count[2].tolist())) > 3  # rows kept different numbers of parents
    for lv in tree.levels:
        assert torch.equal(whole.count[lv], split.count[lv])
        torch.testing.assert_close(whole.prob[lv], split.prob[lv])
        for row in range(600):
            n = int(whole.count[lv][row])
            assert set(whole.index[lv][row, :n].tolist()) == set(split.index[lv][row, :n].tolist())
