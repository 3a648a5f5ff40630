"""Conformal prediction regions, abstention and region limits, with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geohier import conformal as cf
from geohier import grid, limits
from geohier.combine import Tree
from geohier.errors import InputError
from geohier.geodesy import EARTH_RADIUS_KM

PARENTS, CHILDREN = 10, 10


def _tree():
    return Tree.from_parents([1, 2], {2: np.repeat(np.arange(PARENTS), CHILDREN)})


def _sample(n, sharpness, seed):
    """Logits of a 10 x 10 tree and true classes drawn from the model's own joint
    distribution (a calibrated model), so conformal coverage is exchangeable."""
    g = torch.Generator().manual_seed(seed)
    logits = {1: sharpness * torch.randn(n, PARENTS, generator=g),
              2: sharpness * torch.randn(n, PARENTS * CHILDREN, generator=g)}
    p = cf.log_joint(logits, _tree()).exp().double()
    u = torch.rand(n, 1, generator=g, dtype=torch.float64)
    y = (p.cumsum(1) < u).sum(1).clamp(max=p.shape[1] - 1)
    return logits, y.numpy()


def test_log_joint_is_the_product_of_conditionals_and_sums_to_one():
    logits, _ = _sample(5, 1.0, 0)
    lj = cf.log_joint(logits, _tree(), {1: 2.0, 2: 0.5})
    p1 = torch.softmax(logits[1] / 2.0, 1)
    z2 = (logits[2] / 0.5).reshape(5, PARENTS, CHILDREN)
    expect = (p1[:, :, None] * torch.softmax(z2, 2)).reshape(5, -1)
    assert torch.allclose(lj.exp(), expect, atol=1e-6)
    assert torch.allclose(lj.exp().sum(1), torch.ones(5), atol=1e-5)


def test_log_joint_allowed_mask_renormalises_inside():
    logits, _ = _sample(3, 1.0, 1)
    tree = _tree()
    fine = np.zeros(PARENTS * CHILDREN, bool)
    fine[[3, 4, 57]] = True
    allowed = {2: fine, 1: np.bincount(tree.parents[2][fine], minlength=PARENTS) > 0}
    p = cf.log_joint(logits, tree, allowed=allowed).exp()
    assert torch.allclose(p.sum(1), torch.ones(3), atol=1e-5)
    assert float(p[:, ~torch.as_tensor(fine)].abs().sum()) == 0.0
    assert bool((p[:, torch.as_tensor(fine)] > 0).all())


def test_threshold_is_the_finite_sample_quantile():
    c = cf.Conformal.fit(np.arange(1, 10) / 10)  # n = 9
    assert c.threshold(0.9) == pytest.approx(0.9)  # ceil(10 * 0.9) = 9th
    assert c.threshold(0.5) == pytest.approx(0.5)  # ceil(5) = 5th
    assert c.threshold(0.95) == math.inf  # ceil(9.5) = 10 > 9
    # infinite scores (true cell no class) rank last
    c2 = cf.Conformal.fit([0.1, 0.2, math.inf, math.inf])
    assert c2.threshold(0.4) == pytest.approx(0.2) and c2.threshold(0.6) == math.inf
    for bad in (0, 1, 1.5, "x"):
        with pytest.raises(InputError, match="coverage"):
            c.threshold(bad)
    # round trip through meta.json, and subsampled order statistics never lower the threshold
    assert cf.Conformal.from_dict(c.to_dict()).threshold(0.8) == c.threshold(0.8)
    s = np.random.default_rng(0).random(20_000)
    full, sub = cf.Conformal.fit(s, max_stored=10**6), cf.Conformal.fit(s, max_stored=500)
    assert len(sub.to_dict()["scores"]) <= 500
    for cov in (0.5, 0.8, 0.9, 0.95, 0.99):
        assert full.threshold(cov) <= sub.threshold(cov) <= full.threshold(cov) + 0.005
    assert cf.Conformal.from_dict({"score": "other"}) is None
    assert cf.Conformal.from_dict({"score": "aps", "n": 2, "scores": [0.1, "x"]}) is None


@pytest.mark.slow
def test_coverage_holds_on_a_large_synthetic_test_set_and_sets_shrink_with_sharpness():
    tree = _tree()
    areas = np.ones(PARENTS * CHILDREN)
    mean_cells = {}
    for sharpness in (1.0, 3.0):
        cal_logits, cal_y = _sample(3000, sharpness, 10)
        test_logits, test_y = _sample(20_000, sharpness, 11)
        c = cf.Conformal.fit(cf.aps_scores(cf.log_joint(cal_logits, tree), cal_y))
        logp = cf.log_joint(test_logits, tree)
        for cov in cf.COVERAGES:
            stats = cf.region_stats(logp, test_y, c.threshold(cov), areas)
            # sampling error: the calibration's (Beta, sd ~ sqrt(a(1-a)/n) <= 0.0055) and the
            # test set's (sd <= 0.0035): 0.025 is over 3.5 sd
            assert abs(stats["covered"].mean() - cov) < 0.025, (sharpness, cov, stats["covered"].mean())
            # the region is a prefix whose APS scores are under the threshold: a target is
            # covered exactly when its score is (or it is the top class)
            scores = cf.aps_scores(logp, test_y)
            top = logp.argmax(1).numpy() == test_y
            assert np.array_equal(stats["covered"], (scores <= c.threshold(cov)) | top)
            assert np.array_equal(stats["area_km2"], stats["cells"].astype(float))
            mean_cells[(sharpness, cov)] = stats["cells"].mean()
    for cov in cf.COVERAGES:
        assert mean_cells[(3.0, cov)] < 0.6 * mean_cells[(1.0, cov)]
    assert mean_cells[(1.0, 0.8)] < mean_cells[(1.0, 0.9)] < mean_cells[(1.0, 0.95)]


def test_region_prefix_adapts_to_uncertainty():
    # a sure row: one class; an unsure row (uniform over 4): the region grows
    logp = torch.log(torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]]))
    order, sizes = cf.region_prefix(logp, 0.7)
    assert sizes.tolist() == [1, 3]  # scores 0.485, .. | 0.125, 0.375, 0.625, 0.875
    assert order[0, 0].item() == 0


def test_area_of_a_known_set_of_cells():
    r2 = EARTH_RADIUS_KM ** 2
    assert cf.cells_area_km2(grid.all_cells(1), 1) == pytest.approx(4 * math.pi * r2, rel=1e-9)
    # the level-2 cell (lat 0..45, lon 0..90) and its eastern neighbour (lon 90..180)
    k1 = grid.key(grid.cell(10.0, 10.0, 2))
    k2 = grid.key(grid.cell(10.0, 100.0, 2))
    one = r2 * (math.pi / 2) * math.sin(math.radians(45))
    assert cf.cells_area_km2([k1], 2) == pytest.approx(one, rel=1e-9)
    assert cf.cells_area_km2([k1, k2], 2) == pytest.approx(2 * one, rel=1e-9)
    assert cf.cells_area_km2([], 2) == 0.0


def test_abstention_curve_on_constructed_confidences():
    # 10 images: confidence 1.0 .. 0.1; the 4 most confident are within 25 km, the next 3
    # within 750 km, the last 3 far off
    conf = np.linspace(1.0, 0.1, 10)[::-1].copy()  # given in reverse order
    dist = np.array([10, 10, 10, 10, 500, 500, 500, 9000, 9000, 9000], float)[::-1].copy()
    curve = cf.abstention_curve(conf, dist)
    by = {r["share"]: r for r in curve}
    assert [r["share"] for r in curve] == list(cf.SHARES)
    assert by[0.1]["n"] == 1 and by[0.1]["acc_25km"] == 1.0 and by[0.1]["min_confidence"] == pytest.approx(1.0)
    assert by[0.4]["acc_25km"] == 1.0 and by[0.4]["min_confidence"] == pytest.approx(0.7)
    assert by[0.5]["acc_25km"] == pytest.approx(0.8) and by[0.5]["acc_750km"] == 1.0
    assert by[0.7]["acc_750km"] == 1.0 and by[0.8]["acc_750km"] == pytest.approx(7 / 8)
    assert by[1.0]["n"] == 10 and by[1.0]["acc_25km"] == pytest.approx(0.4)
    assert by[1.0]["acc_2500km"] == pytest.approx(0.7)
    assert cf.abstention_curve([], [])[0]["acc_25km"] is None


def test_confidence_is_the_top_joint_probability():
    logp = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    assert cf.confidence(logp).tolist() == pytest.approx([0.7, 0.4])


# ----------------------------------------------------------------------------- limits


def test_parse_within():
    assert limits.parse_within("country:fr,DE").codes == ("FR", "DE")
    assert limits.parse_within("bbox:41,-5,51.5,9.6").bbox == (41.0, -5.0, 51.5, 9.6)
    for bad in ("", "FR", "city:Paris", "country:", "bbox:1,2,3", "bbox:50,0,40,10", "bbox:a,b,c,d",
                "bbox:0,0,10,0"):
        with pytest.raises(InputError, match="--within"):
            limits.parse_within(bad)


def test_bbox_limit_masks_cells_and_moves_points_inside():
    tree = Tree.from_parents([1, 2], {2: [0, 0, 1, 1]})
    # four level-2-like cells: (w, s, e, n)
    bounds = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [-60, -40, -50, -30], [100, 0, 110, 10]], float)
    pos = np.array([[5, 5], [5, 19], [-35, -55], [5, 105]], float)
    lim = limits.build_limit("bbox:0,5,10,15", tree, pos, bounds)
    assert lim.allowed[2].tolist() == [True, True, False, False]
    assert lim.allowed[1].tolist() == [True, False]
    assert lim.positions[0].tolist() == [5, 5] and lim.positions[1].tolist() == [5, 15]
    with pytest.raises(InputError, match="none of the run"):
        limits.build_limit("bbox:60,0,70,10", tree, pos, bounds)


def test_country_limit_uses_overlap_not_the_main_country():
    from geohier.geography import country_of

    # level-8 cells around Strasbourg straddle France and Germany
    keys = np.unique(grid.encode([48.58, 48.58, 48.4, 43.0, 52.5], [7.75, 7.85, 7.7, 2.0, 13.4], 8))
    bounds = np.stack(grid.key_bounds(keys, 8), 1)
    lat, lon = grid.key_centroids(keys, 8)
    tree = Tree.from_parents([8], {}, {8: len(keys)})
    lim = limits.build_limit("country:FR", tree, np.stack([lat, lon], 1), bounds)
    inside = lim.allowed[8]
    berlin = int(np.flatnonzero(keys == grid.encode([52.5], [13.4], 8)[0])[0])
    assert not inside[berlin] and inside.sum() >= 2
    moved = lim.positions[inside]
    assert set(country_of(moved[:, 0], moved[:, 1])["iso_a2"]) == {"FR"}
    with pytest.raises(InputError, match="unknown country 'XX'"):
        limits.build_limit("country:XX", tree, np.stack([lat, lon], 1), bounds)


@pytest.mark.slow
def test_explorer_coverage_rule_is_the_predictors_report(tmp_path):
    from test_predictor import make_tiny_run

    from geohier.explorer import Explorer, ValSet
    from geohier.predictor import Predictor

    conf = cf.Conformal.fit(np.linspace(0.05, 0.95, 19)).to_dict()
    p = Predictor.load(make_tiny_run(tmp_path / "run", extra_meta={"conformal": conf}), device="cpu")
    g = torch.Generator().manual_seed(0)
    n = 200
    logits = {lv: torch.randn(n, p.tree.num_classes[lv], generator=g) for lv in p.levels}
    targets = {lv: np.zeros(n, np.int64) for lv in p.levels}
    targets[p.finest] = np.arange(n) % p.tree.num_classes[p.finest]
    ex = Explorer(ValSet(p.levels, logits, targets, np.zeros(n), np.zeros(n)), p.tree, p.positions, p.temperatures)
    with pytest.raises(InputError, match="for a predictor"):
        ex.coverage_curve()
    ex.predictor = p
    curve = ex.coverage_curve((0.5, 0.8, 0.95))
    assert [r["target"] for r in curve] == [0.5, 0.8, 0.95]
    assert curve[0]["mean_cells"] <= curve[1]["mean_cells"] <= curve[2]["mean_cells"]
    assert curve[0]["mean_area_km2"] <= curve[1]["mean_area_km2"] <= curve[2]["mean_area_km2"]
    assert curve[1]["threshold"] == pytest.approx(0.8)  # ceil(20 * 0.8) = 16th of 0.05 .. 0.95
    assert curve[1] == {"target": 0.8, **p.conformal_report(logits, targets[p.finest], (0.8,))["0.8"]}
