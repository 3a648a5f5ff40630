"""geohier.baselines: the trivial guesses every evaluation is compared with."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from geohier import baselines, geodesy, geography


def test_doctests():
    assert doctest.testmod(baselines).failed == 0


def test_geometric_median_beats_the_mean_on_a_skewed_set():
    lat = np.array([48.85, 48.86, 48.84, 48.85, 35.68])
    lon = np.array([2.35, 2.36, 2.34, 2.33, 139.65])
    med = baselines.geometric_median(lat, lon)
    mean = geodesy.spherical_mean(lat, lon)
    total = lambda p: geodesy.haversine_km(p[0], p[1], lat, lon).sum()  # noqa: E731
    assert total(med) < total(mean)
    assert geodesy.haversine_km(*med, 48.85, 2.35) < 5  # it stays in Paris
    assert baselines.geometric_median([12.0], [34.0]) == pytest.approx((12.0, 34.0))
    la, lo = baselines.geometric_median([0.0, 0.0], [179.0, -179.0])  # across the antimeridian
    assert abs(lo) > 178.9 and abs(la) < 1e-6


def test_prior_is_the_mean_of_the_most_populous_cell():
    lat = [10.0, 10.1, 10.2, -40.0]
    lon = [20.0, 20.1, 20.2, 100.0]
    la, lo = baselines.prior_point(lat, lon, 8)
    assert la == pytest.approx(10.1, abs=0.01) and lo == pytest.approx(20.1, abs=0.01)


@pytest.mark.slow
def test_random_land_is_on_land_and_reproducible():
    la, lo = baselines.random_land(300, seed=3)
    assert la.shape == (300,)
    assert (geography.country_of(la, lo)["country"].fillna("") != "").all()
    la2, lo2 = baselines.random_land(300, seed=3)
    assert np.array_equal(la, la2) and np.array_equal(lo, lo2)
    assert not np.array_equal(la, baselines.random_land(300, seed=4)[0])


def test_predictions_flag_a_missing_training_set():
    truth_lat, truth_lon = np.array([48.85, 52.52]), np.array([2.35, 13.40])
    out = baselines.predictions(truth_lat, truth_lon)
    assert set(out) == {"constant", "prior", "random_land"}
    assert "truth set itself" in out["constant"]["note"] and "truth set itself" in out["prior"]["note"]
    assert all(len(v["lat"]) == 2 for v in out.values())
    out = baselines.predictions(truth_lat, truth_lon, [35.68], [139.65])
    assert "training set" in out["constant"]["note"] and out["constant"]["lat"][0] == pytest.approx(35.68)
