"""Recall vs area (geohier.conformal.truth_areas / recall_area_curve, Predictor.recall_area)
on constructed logits and cell areas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geohier import conformal as cf


def test_truth_areas_sum_the_cells_ranked_above_the_truth():
    p = torch.tensor([[0.1, 0.6, 0.3, 0.0],
                      [0.25, 0.25, 0.4, 0.1],
                      [0.5, 0.5, 0.0, 0.0]])
    areas = np.array([1.0, 10.0, 100.0, 1000.0])
    got = cf.truth_areas(p.log(), [0, 1, 3], areas)
    # row 0: ranking 1 (10), 2 (100), 0 (1): 111; row 1: 2 (100) ranks above, the tie (0) counts
    # after the truth: 100 + 10; row 2: the truth has probability 0: never found
    assert got[0] == pytest.approx(111.0) and got[1] == pytest.approx(110.0) and math.isinf(got[2])
    assert math.isinf(cf.truth_areas(p.log(), [-1, 0, 9], areas)[0])  # no class: never found
    assert cf.truth_areas(p.log()[:0], [], areas).shape == (0,)


def test_recall_area_curve_steps_at_the_known_areas():
    found = np.array([1.0, 10.0, 10.0, 1000.0, np.inf])
    rows = cf.recall_area_curve(found, 1.0, 1e4, points=5)
    assert [r["area_km2"] for r in rows] == pytest.approx([1, 10, 100, 1000, 10000])
    assert [r["recall"] for r in rows] == pytest.approx([0.2, 0.6, 0.6, 0.8, 0.8])
    recalls = [r["recall"] for r in cf.recall_area_curve(np.random.default_rng(0).random(500) * 100, 0.1, 100)]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0  # never decreasing, all found at the end
    assert cf.recall_area_curve([], 1, 10, points=3)[0]["recall"] is None


def test_a_sharper_model_finds_the_truth_in_less_area():
    rng = np.random.default_rng(1)
    n, c = 400, 50
    areas = rng.uniform(10, 1000, c)
    y = rng.integers(0, c, n)
    noise = torch.as_tensor(rng.normal(size=(n, c)), dtype=torch.float32)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(y), c).float()
    curves = []
    for sharp in (0.5, 3.0):
        logp = torch.log_softmax(noise + sharp * onehot, dim=1)
        curves.append([r["recall"] for r in cf.recall_area_curve(cf.truth_areas(logp, y, areas),
                                                                  areas.min(), areas.sum(), 10)])
    assert all(b >= a for a, b in zip(*curves, strict=True)) and curves[1][3] > curves[0][3]
    assert curves[0][-1] == curves[1][-1] == 1.0  # the whole grid holds every truth


def test_predictor_recall_area_matches_a_ranking_by_hand(tmp_path):
    from test_predictor import make_tiny_run

    from geohier.predictor import Predictor

    pred = Predictor.load(make_tiny_run(tmp_path / "tiny"), device="cpu")
    torch.manual_seed(0)
    logits = {lv: torch.randn(7, pred.tree.num_classes[lv]) for lv in pred.levels}
    y = np.arange(7) % pred.tree.num_classes[pred.finest]
    logp = pred.log_joint(logits)
    areas = pred.finest_areas()
    for j in range(7):
        order = torch.argsort(logp[j], descending=True).tolist()
        by_hand = sum(areas[k] for k in order[:order.index(int(y[j])) + 1])
        assert pred.truth_areas(logits, y)[j] == pytest.approx(by_hand, rel=1e-9)
    rep = pred.recall_area(logits, y)
    assert rep["n"] == 7 and rep["level"] == pred.finest and len(rep["points"]) == cf.RECALL_AREA_POINTS
    assert rep["points"][0]["area_km2"] == pytest.approx(areas.min(), rel=1e-6)
    assert rep["points"][-1]["recall"] == 1.0


def test_an_image_with_no_finest_class_is_found_in_its_classes_rest():
    """A truth whose finest cell was dropped counts once the rest of its coarser class is
    searched (the partition the coverage regions use), not never."""
    from geohier.combine import Tree
    from geohier.conformal import Partition

    tree = Tree.from_parents([1, 2], {2: [0, 0, 1]})
    part = Partition.from_counts(tree, {1: np.array([10, 4]), 2: np.array([3, 3, 4])})  # class 0: 4 images dropped
    assert part.size == 5  # three finest cells and the two level-1 classes' rests (class 1's empty)
    z = {1: torch.tensor([[2.0, 0.0]]), 2: torch.tensor([[0.0, 0.0, 0.0]])}
    lp = part.log_probs(z)
    areas = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    rest = part.targets({1: np.array([0]), 2: np.array([-1])})
    assert rest[0] >= 3  # a rest node, after the finest cells
    got = cf.truth_areas(lp, rest, areas)[0]
    order = torch.argsort(lp[0], descending=True).tolist()
    assert got == pytest.approx(sum(areas[k] for k in order[:order.index(int(rest[0])) + 1]))
    assert math.isfinite(got)
