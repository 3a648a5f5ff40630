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


# ----------------------------------------------------------------------------- the partition: images with no finest class


def _partition():
    # level 1: classes 0 (two sub-cells at level 2, 10 images, 6 of them in the sub-cells) and
    # 1 (one sub-cell holding all its 4 images)
    tree = Tree.from_parents([1, 2], {2: [0, 0, 1]})
    return cf.Partition.from_counts(tree, {1: np.array([10, 4]), 2: np.array([3, 3, 4])})


def test_partition_node_probabilities_targets_and_areas():
    part = _partition()
    assert part.rest[1].tolist() == pytest.approx([0.4, 0.0]) and part.has_rest
    assert part.size == 5 and part.offsets == {1: 3} and part.node(3) == (1, 0) and part.node(2) == (2, 2)
    lp = part.log_probs({1: torch.zeros(1, 2), 2: torch.zeros(1, 3)})
    # class 0: 0.5, 40% of it in its rest, the rest split between its two sub-cells; class 1: 0.5, its one sub-cell
    assert lp.exp()[0].tolist() == pytest.approx([0.15, 0.15, 0.5, 0.2, 0.0], abs=1e-6)
    # an image's node: its finest class, else the rest of its deepest class, else none
    labels = {1: np.array([0, 0, 1, -1]), 2: np.array([1, -100, 2, -100])}
    assert part.targets(labels).tolist() == [1, 3, 2, -1]
    assert part.targets(labels[2]).tolist() == [1, -1, 2, -1]  # the finest labels alone
    # a rest's area is its cell less its class sub-cells
    assert part.areas({1: np.array([100.0, 50.0]), 2: np.array([20.0, 30.0, 50.0])}).tolist() == [20, 30, 50, 50, 0]
    # temperatures apply per level; a class outside ``allowed`` takes its rest with it
    lp = part.log_probs({1: torch.tensor([[0.0, 0.0]]), 2: torch.zeros(1, 3)}, allowed={1: np.array([True, False])})
    assert lp.exp()[0].tolist() == pytest.approx([0.3, 0.3, 0.0, 0.4, 0.0], abs=1e-6)


def test_partition_without_rests_is_the_finest_joint():
    # every class has images in class sub-cells only (adaptive cells): the nodes are the finest classes
    tree = _tree()
    counts = {1: np.full(PARENTS, CHILDREN), 2: np.ones(PARENTS * CHILDREN)}
    for part in (cf.Partition.from_counts(tree, counts), cf.Partition.plain(tree)):
        assert not part.has_rest
        logits, _ = _sample(4, 1.5, 3)
        lp = part.log_probs(logits, {1: 1.3, 2: 0.7})
        assert torch.allclose(lp[:, :PARENTS * CHILDREN], cf.log_joint(logits, tree, {1: 1.3, 2: 0.7}), atol=1e-5)
        assert float(lp[:, PARENTS * CHILDREN:].exp().sum()) == 0.0


def test_images_with_no_finest_class_are_covered_where_their_point_is():
    """A model calibrated over the nodes, 30% of whose images fall where the hierarchy
    dropped the finest cells: scored on their nodes the coverage holds; scored on the
    finest classes alone it cannot pass the labelled share."""
    tree = _tree()
    rng = np.random.default_rng(0)
    part = cf.Partition(tree, {1: np.full(PARENTS, 0.3)})
    def sample(n, seed):
        logits, _ = _sample(n, 1.5, seed)
        p = part.log_probs(logits).exp().double()
        y = (p.cumsum(1) < torch.as_tensor(rng.random((n, 1)))).sum(1).clamp(max=p.shape[1] - 1).numpy()
        fine = y < PARENTS * CHILDREN  # the node back to the labels a dataset gives
        labels = {1: np.where(fine, tree.parents[2][np.minimum(y, PARENTS * CHILDREN - 1)], y - part.offsets[1]),
                  2: np.where(fine, y, -100)}
        return logits, labels, y
    cal_logits, cal_labels, cal_y = sample(3000, 20)
    test_logits, test_labels, test_y = sample(6000, 21)
    assert np.array_equal(part.targets(cal_labels), cal_y) and 0.25 < (test_labels[2] < 0).mean() < 0.35
    c = cf.Conformal.fit(cf.aps_scores(part.log_probs(cal_logits), part.targets(cal_labels)))
    lp = part.log_probs(test_logits)
    areas = np.ones(part.size)
    for cov in cf.COVERAGES:
        stats = cf.region_stats(lp, part.targets(test_labels), c.threshold(cov), areas)
        assert abs(stats["covered"].mean() - cov) < 0.03, (cov, stats["covered"].mean())
        no_finest = test_labels[2] < 0
        assert stats["covered"][no_finest].mean() > cov - 0.1  # covered through their class's rest
    # on the finest classes alone the unlabelled ones score +inf: the 0.8 threshold is +inf
    old = cf.Conformal.fit(cf.aps_scores(cf.log_joint(cal_logits, tree), cal_labels[2]))
    assert old.threshold(0.8) == math.inf
    # an image in no class cell at all scores +inf and is never covered
    nowhere = {1: np.array([-1]), 2: np.array([-100])}
    assert cf.aps_scores(lp[:1], part.targets(nowhere)).tolist() == [math.inf]
    assert not cf.region_stats(lp[:1], part.targets(nowhere), 10.0, areas)["covered"][0]


def test_region_with_a_rest_draws_its_sub_cells_as_holes():
    parent = grid.keys_to_ids([grid.key(grid.cell(10.0, 10.0, 1))], 1)[0]  # lat 0..90, lon 0..180
    kid = grid.keys_to_ids([grid.key(grid.cell(10.0, 10.0, 2))], 2)[0]  # lat 0..45, lon 0..90
    r = cf.Region("conformal", [], [], 0.5, 1.0, 0.9, 0.5, rest=[parent], rest_minus=[[kid]])
    assert r.n_cells == 1 and r.to_dict()["rest_cells"] == [{"cell": parent, "minus": [kid], "rank": 1}]
    (f,) = cf.region_geojson(r)["features"]
    assert f["properties"] == {"cell": parent, "rest": True, "rank": 1}
    outer, hole = f["geometry"]["coordinates"]
    assert outer == [[0, 0], [180, 0], [180, 90], [0, 90], [0, 0]]
    assert sorted(map(tuple, hole)) == sorted(map(tuple, [[0, 0], [90, 0], [90, 45], [0, 45], [0, 0]]))
    assert "rest_cells" not in cf.Region("conformal", [kid], [0], 0.5, 1.0).to_dict()


def test_a_region_lists_its_rests_at_their_rank():
    # ranked by probability: cell a, the rest of X, cell b, the rest of Y
    r = cf.Region("conformal", ["0/0/1", "0/0/2"], [1, 2], 0.9, 1.0, 0.9, 0.5, rest=["1", "2"],
                  rest_minus=[["1/0"], ["2/3"]], rest_ranks=[2, 4])
    assert r.ranked() == [("0/0/1", False), ("1", True), ("0/0/2", False), ("2", True)]
    assert [f["properties"]["rank"] for f in cf.region_geojson(r)["features"]] == [1, 3, 2, 4]
    assert [d["rank"] for d in r.to_dict()["rest_cells"]] == [2, 4]
    legacy = cf.Region("conformal", ["0/0/1"], [1], 0.9, 1.0, rest=["1"], rest_minus=[["1/0"]])
    assert legacy.ranked() == [("0/0/1", False), ("1", True)]  # no ranks given: rests last


# ----------------------------------------------------------------------------- place groups: weights and cross-fit


def test_group_weighted_threshold_known_answers():
    # groups a (2 images) and b (1): K = 2, each group and +inf weigh 1/3; a's images 1/6 each
    c = cf.Conformal.fit([0.2, 0.1, 0.3], groups=["a", "a", "b"])
    assert c.method == "groups" and c.groups == 2 and c.n == 3
    assert c.cum.tolist() == pytest.approx([1 / 6, 1 / 3, 2 / 3])
    assert [c.threshold(v) for v in (0.3, 0.5, 0.6, 0.7)] == pytest.approx([0.2, 0.3, 0.3, math.inf])
    back = cf.Conformal.from_dict(c.to_dict())
    assert back.method == "groups" and back.groups == 2 and back.extra["space"] == cf.SPACE
    assert [back.threshold(v) for v in (0.3, 0.5, 0.7)] == [c.threshold(v) for v in (0.3, 0.5, 0.7)]
    # each image its own group: the classic quantile
    one = cf.Conformal.fit([0.2, 0.1, 0.3], groups=["a", "b", "c"])
    assert [one.threshold(v) for v in (0.5, 0.7, 0.8)] == pytest.approx([0.2, 0.3, math.inf])
    # a calibration written before weights were stored reads as the classic quantile, without ``space``
    legacy = cf.Conformal.from_dict({"score": "aps", "u": 0.5, "n": 9, "scores": [v / 10 for v in range(1, 10)]})
    assert legacy.method == "images" and legacy.threshold(0.9) == pytest.approx(0.9)
    assert "space" not in (legacy.extra or {})
    with pytest.raises(InputError, match="group labels"):
        cf.Conformal.fit([0.1, 0.2], groups=["a"])
    assert cf.Conformal.from_dict({**c.to_dict(), "cum": [0.5, 0.4, 0.6]}) is None  # weights never decrease


def test_group_weighting_holds_coverage_per_place_where_image_weighting_does_not():
    # 20 places with 20 photos each, easy (scores under 0.3), and 80 places with one photo,
    # hard (scores uniform): weighing photos alike, the big easy places set the threshold
    rng = np.random.default_rng(1)
    scores = np.concatenate([0.3 * rng.random(400), rng.random(80)])
    groups = np.concatenate([np.repeat(np.arange(20), 20), np.arange(20, 100)])
    top = np.zeros(scores.size, bool)
    by_group = cf.crossfit(scores, top, groups, method="groups", repeats=40)
    by_image = cf.crossfit(scores, top, groups, method="images", repeats=40)
    for cov in cf.COVERAGES:
        key = f"{cov:g}"
        assert by_group[key]["group_coverage"] >= cov - 0.01, (cov, by_group[key])
        assert by_image[key]["group_coverage"] < cov - 0.15, (cov, by_image[key])
        assert abs(by_image[key]["coverage"] - cov) < 0.03  # the photos' share, which it does target


def test_val_and_test_drawn_by_place_groups():
    """Photos of one place share its difficulty. Dealt at random, val's groups calibrate
    test's on average; dealt unluckily (val = the easiest places) val's threshold fails on
    test, and the cross-fit on the test split alone still finds the coverage."""
    rng = np.random.default_rng(0)
    n_groups, size = 80, 5
    hard = rng.random(n_groups)
    scores = np.clip(0.8 * hard[:, None] + 0.2 * rng.random((n_groups, size)), 0, 1).ravel()
    groups = np.repeat(np.arange(n_groups), size)
    got = {cov: [] for cov in (0.8, 0.9)}
    for _ in range(100):
        val = np.isin(groups, rng.permutation(n_groups)[:n_groups // 2])
        for cov in got:
            covered = scores[~val] <= cf.Conformal.fit(scores[val], groups[val]).threshold(cov)
            got[cov].append(cf.group_coverage(covered, groups[~val])[0])
    for cov, values in got.items():
        assert np.mean(values) >= cov - 0.01 and np.std(values) > 0.03  # right on average, one draw strays
    unlucky = np.isin(groups, np.argsort(hard)[:n_groups // 2])
    test = ~unlucky
    for cov in (0.8, 0.9):
        covered = scores[test] <= cf.Conformal.fit(scores[unlucky], groups[unlucky]).threshold(cov)
        assert covered.mean() < cov - 0.5
        cross = cf.crossfit(scores[test], np.zeros(test.sum(), bool), groups[test], (cov,))[f"{cov:g}"]
        assert cov - 0.03 <= cross["group_coverage"] <= cov + 0.08, cross
    gc, se, k = cf.group_coverage([1, 0, 1, 1], ["a", "a", "b", "c"])
    assert (gc, k) == (pytest.approx(2.5 / 3), 3) and se > 0


@pytest.mark.slow
def test_predictor_regions_hold_the_dropped_cells(tmp_path):
    from conftest import CITIES
    from test_predictor import make_tiny_run

    from geohier.hierarchy import build_hierarchy
    from geohier.predictor import Predictor

    # three photos per city; the first city's third photo, 110 km off, is alone in its level-8
    # cell: dropped (min 2), so that city's level-3 cell has a rest
    lat = [c[0] + 0.01 * j for c in CITIES for j in range(3)]
    lon = [c[1] + 0.01 * j for c in CITIES for j in range(3)]
    lat[2] += 1.0
    h = build_hierarchy(lat, lon, (1, 3, 8), min_images={1: 1, 3: 1, 8: 2})
    legacy = {"score": "aps", "u": 0.5, "n": 9, "scores": [v / 10 for v in range(1, 10)]}
    p = Predictor.load(make_tiny_run(tmp_path / "run", h, extra_meta={"conformal": legacy}), device="cpu")
    assert p.partition.has_rest and p.conformal_stale
    with pytest.raises(InputError, match="predates"):
        p.check_conformal()
    labels = h.labels(lat[:3], lon[:3])
    assert labels[8].tolist()[2] == -1 and labels[3][2] >= 0
    node = p.conformal_targets(labels)[2]
    assert p.partition.node(node) == (3, labels[3][2])
    # a calibration over the nodes: every image scores finitely, the dropped one through its rest
    g = torch.Generator().manual_seed(0)
    logits = {lv: torch.randn(3, p.tree.num_classes[lv], generator=g) for lv in p.levels}
    scores = p.conformal_scores(logits, labels)
    assert np.isfinite(scores).all()
    fresh = cf.Conformal.fit(scores, groups=["a", "a", "b"], split="val").to_dict()
    p = Predictor.load(make_tiny_run(tmp_path / "run2", h, extra_meta={"conformal": fresh}), device="cpu")
    assert not p.conformal_stale
    report = p.conformal_report(logits, labels, (0.5,), groups=["a", "a", "b"])["0.5"]
    assert report["groups"] == 2 and report["n"] == 3
    # the regions at a threshold that keeps every node with probability: all three covered
    lp = p.region_log_probs(logits)
    big = p.conformal_regions(lp, 0.7)  # the calibration's weight reaches 2/3: +inf
    assert big[0].threshold == math.inf
    for j, r in enumerate(big):
        alive = (lp[j].exp() > 0).numpy()
        assert r.n_cells == int(alive.sum()) and r.mass == pytest.approx(1.0, abs=1e-6)
        assert r.area_km2 == pytest.approx(float(p.node_areas()[alive].sum()), rel=1e-6)
    rest_cell = h.cells(3)[labels[3][2]]
    assert rest_cell in big[2].rest and p._sub_cells(3, labels[3][2]) == big[2].rest_minus[big[2].rest.index(rest_cell)]
    # the nodes come out in the order of their probabilities, rests where they rank
    for j, r in enumerate(big):
        probs = {}
        for k in np.flatnonzero((lp[j].exp() > 0).numpy()).tolist():
            lv, cls = p.partition.node(k)
            probs[(h.cells(lv)[cls], lv != p.finest)] = float(lp[j, k].exp())
        assert r.ranked() == sorted(probs, key=lambda node: -probs[node])


def test_groups_of_are_the_groups_the_splits_were_dealt_in(ws):
    from geohier import splits

    points = [(48.85, 2.35, "seq-1"), (40.0, -3.7, "seq-1"), (45.0, 7.0, None), (45.0003, 7.0, None),
              (10.0, 10.0, None)]  # one sequence far apart; two photos 33 m apart; one alone
    with ws.manifest() as m:
        ids = [m.add_image(source="demo", lat=la, lon=lo, sha256=f"{i:064x}", path=f"/x/{i}.jpg", sequence_id=s)
               for i, (la, lo, s) in enumerate(points)]
    g = splits.groups_of(ws, [*ids, 999])
    assert g[0] == g[1] == "s:seq-1" and g[2] == g[3] and len({g[0], g[2], g[4]}) == 3 and g[5] == "i:999"
    lat, lon, seq = zip(*points, strict=True)
    assert g[:5].tolist() == splits.split_groups(lat, lon, seq).tolist()
