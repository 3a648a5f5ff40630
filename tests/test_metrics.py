"""geohier.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geohier import metrics

# ----------------------------------------------------------------------------- top-k

def test_topk_hand_computed():
    logits = np.array([
        [0.1, 0.5, 0.2, 0.9],  # target 1: rank 2 (0.9 > 0.5) -> top-1 no, top-2 yes
        [0.7, 0.1, 0.3, 0.2],  # target 0: rank 0
        [0.1, 0.2, 0.3, 0.4],  # target 0: rank 3
    ])
    acc = metrics.topk_accuracy(logits, [1, 0, 0], ks=(1, 2, 3, 4, 10))
    assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(2 / 3),
                   4: 1.0, 10: 1.0}


def test_topk_ignores_negative_targets():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    acc = metrics.topk_accuracy(logits, torch.tensor([0, -1, 1, -100]), ks=(1,))
    assert acc == {1: 0.5}  # rows 0 (right) and 2 (wrong); rows 1 and 3 ignored
    hits, n = metrics.topk_correct(logits, [0, -1, 1, -100], ks=(1, 2))
    assert hits == {1: 1, 2: 2} and n == 2


def test_topk_ties_break_towards_lower_index():
    logits = [[1.0, 1.0, 1.0, 0.0]] * 3
    # target 0 is first among the tied: rank 0; target 1: rank 1; target 2: rank 2
    hits, n = metrics.topk_correct(logits, [0, 1, 2], ks=(1, 2, 3))
    assert hits == {1: 1, 2: 2, 3: 3} and n == 3
    # top-1 agrees with argmax
    assert metrics.topk_accuracy(logits, [int(np.argmax(logits[0]))] * 3, ks=(1,)) == {1: 1.0}


def test_topk_all_ignored_and_shape_errors():
    assert metrics.topk_accuracy(np.zeros((2, 3)), [-1, -1]) == {1: 0.0, 5: 0.0, 10: 0.0}
    with pytest.raises(ValueError, match="targets"):
        metrics.topk_accuracy(np.zeros((2, 3)), [0])
    with pytest.raises(ValueError, match="number of classes"):
        metrics.topk_accuracy(np.zeros((1, 3)), [3])


# ----------------------------------------------------------------------------- distances

def test_haversine_paris_london():
    d = metrics.haversine_km(48.8566, 2.3522, 51.5074, -0.1278)
    assert float(d) == pytest.approx(343.5, abs=0.2)


def test_doctests():
    import doctest

    assert doctest.testmod(metrics).failed == 0


def test_haversine_one_degree_and_antipode():
    assert float(metrics.haversine_km(0, 0, 0, 1)) == pytest.approx(2 * math.pi * 6371 / 360)
    assert float(metrics.haversine_km(0, 0, 0, 180)) == pytest.approx(math.pi * 6371)


def test_geoscore_values():
    assert metrics.geoscore(0.0) == 5000.0
    assert metrics.geoscore(1492.7) == pytest.approx(5000 / math.e)
    np.testing.assert_allclose(metrics.geoscore([0.0, 1492.7 * 2]), [5000.0, 5000 * math.exp(-2)])


def test_geo_metrics_hand_computed():
    # true points at the equator; predictions 0, ~10, ~111, ~556, ~2224 and ~5560 km east
    one_deg = 2 * math.pi * 6371 / 360
    deg = np.array([0.0, 10 / one_deg, 1.0, 5.0, 20.0, 50.0])
    m = metrics.geo_metrics(np.zeros(6), deg, np.zeros(6), np.zeros(6))
    assert m["n"] == 6
    assert m["acc_1km"] == pytest.approx(1 / 6)
    assert m["acc_25km"] == pytest.approx(2 / 6)
    assert m["acc_200km"] == pytest.approx(3 / 6)
    assert m["acc_750km"] == pytest.approx(4 / 6)
    assert m["acc_2500km"] == pytest.approx(5 / 6)
    d = deg * one_deg
    assert m["median_km"] == pytest.approx((d[2] + d[3]) / 2)
    assert m["mean_km"] == pytest.approx(d.mean())
    assert m["geoscore"] == pytest.approx(np.mean(5000 * np.exp(-d / 1492.7)))
    assert m["geoscore_rounded"] == pytest.approx(np.mean(np.round(5000 * np.exp(-d / 1492.7))))
    assert set(m) == {"acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km",
                      "median_km", "mean_km", "geoscore", "geoscore_rounded", "n"} == set(metrics.GEO_KEYS)


def test_geo_metrics_threshold_is_strict_as_osv5m_and_empty():
    # OSV-5M counts d < t: exactly 25 km is not within 25 km, a hair under is
    assert metrics.km_accuracy([25.0], thresholds=(25,)) == {"acc_25km": 0.0}
    assert metrics.km_accuracy([np.nextafter(25.0, 0)], thresholds=(25,)) == {"acc_25km": 1.0}
    # a point 25 km east on the equator, through the haversine: not within 25 km either
    east = 25.0 / (2 * math.pi * 6371 / 360)
    d = float(metrics.haversine_km(0, 0, 0, east))
    assert d == pytest.approx(25.0, abs=1e-9)
    m1 = metrics.geo_metrics([0.0], [east * (1 - 1e-9)], [0.0], [0.0])
    assert m1["acc_25km"] == 1.0


def test_geoscore_rounded_is_per_image():
    # two images whose scores are x.4 and y.6: rounded per image, then averaged
    d = np.array([-1492.7 * math.log(4000.4 / 5000), -1492.7 * math.log(3000.6 / 5000)])
    m = metrics.distance_metrics(d)
    assert m["geoscore"] == pytest.approx(3500.5)
    assert m["geoscore_rounded"] == pytest.approx(3500.5)  # (4000 + 3001) / 2
    m = metrics.distance_metrics(d[:1])
    assert m["geoscore"] == pytest.approx(4000.4) and m["geoscore_rounded"] == 4000.0
    m = metrics.distance_metrics([])
    assert m["n"] == 0 and m["acc_1km"] == 0.0 and math.isnan(m["median_km"]) and math.isnan(m["geoscore_rounded"])


# ----------------------------------------------------------------------------- calibration

def test_ece_perfectly_calibrated_is_zero():
    # 10 rows at confidence 0.8 with 8 right, 4 rows at 0.5 with 2 right -> ECE 0
    probs = [[0.8, 0.2]] * 10 + [[0.5, 0.5]] * 4
    targets = [0] * 8 + [1] * 2 + [0, 0, 1, 1]
    assert metrics.expected_calibration_error(probs, targets) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_computed_and_bins():
    # 4 rows at 0.9 all right (gap 0.1), 4 rows at 0.6 none right (gap 0.6): ECE = 0.35
    probs = [[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 4
    targets = [0] * 4 + [1] * 4
    rb = metrics.reliability_bins(probs, targets, bins=10)
    assert rb["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.6)
    assert rb["n"] == 8 and sum(rb["count"]) == 8
    # 0.9 -> bin (0.8, 0.9], 0.6 -> bin (0.5, 0.6]
    assert rb["count"][8] == 4 and rb["count"][5] == 4
    assert rb["accuracy"][8] == 1.0 and rb["accuracy"][5] == 0.0
    assert rb["confidence"][8] == pytest.approx(0.9)
    assert len(rb["lo"]) == len(rb["hi"]) == 10 and rb["hi"][-1] == 1.0
    # ignored rows do not count
    rb2 = metrics.reliability_bins(probs + [[0.99, 0.01]], targets + [-1], bins=10)
    assert rb2["n"] == 8 and rb2["ece"] == pytest.approx(rb["ece"])


def test_ece_fifteen_bins_default():
    rb = metrics.reliability_bins([[1.0, 0.0]], [0])
    assert rb["bins"] == 15 and rb["count"][14] == 1 and rb["ece"] == 0.0


@pytest.mark.slow
def test_temperature_fit_recovers_two():
    gen = torch.Generator().manual_seed(0)
    n, c = 4000, 10
    base = torch.randn(n, c, generator=gen) * 3.0  # the "true" logits at T=1
    targets = torch.multinomial(torch.softmax(base, 1), 1, generator=gen)[:, 0]
    logits = base * 2.0  # an overconfident model: the true temperature is 2
    t = metrics.fit_temperature(logits, targets)
    assert t == pytest.approx(2.0, rel=0.1)
    # deterministic, and the NLL at the fit is no worse than at 1 or at 2 +- 0.3
    assert metrics.fit_temperature(logits, targets) == t
    assert metrics.nll(logits, targets, t) <= metrics.nll(logits, targets, 1.0)
    assert metrics.nll(logits, targets, t) <= metrics.nll(logits, targets, t * 1.15)
    assert metrics.nll(logits, targets, t) <= metrics.nll(logits, targets, t / 1.15)
    # scaling lowers the calibration error
    before = metrics.expected_calibration_error(metrics.softmax(logits), targets)
    after = metrics.expected_calibration_error(metrics.softmax(logits, t), targets)
    assert after < before


def test_temperature_fit_edge_cases():
    assert metrics.fit_temperature(np.zeros((3, 4)), [-1, -1, -1]) == 1.0
    # always right with a margin: sharpen (the NLL is flat ~0 below T = 0.2)
    assert metrics.T_MIN <= metrics.fit_temperature([[5.0, 0.0]] * 4, [0] * 4) < 0.2
    assert metrics.nll([[0.0, 0.0]], [0]) == pytest.approx(math.log(2))
