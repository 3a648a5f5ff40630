"""geohier.geocode: offline reverse geocoding and OSV-5M-style admin-area accuracy; and
the UTF-8 country names of geohier.geography."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from geohier import geocode, geography
from geohier.errors import InputError, InvalidCoordinateError

PARIS = (48.857, 2.352)
PARIS_2 = (48.85, 2.34)  # another spot in central Paris (GeoNames also lists its quarters)
ABIDJAN = (5.35, -4.0)
BERLIN = (52.52, 13.40)
STRASBOURG = (48.58, 7.75)
KEHL = (48.57, 7.82)  # across the Rhine from Strasbourg, in Germany
MID_PACIFIC = (30.0, -140.0)  # ~1,800 km from the nearest town


def _lists(*points):
    return [p[0] for p in points], [p[1] for p in points]


# --------------------------------------------------------------------------- reverse


def test_reverse_known_places():
    df = geocode.reverse(*_lists(PARIS, ABIDJAN, MID_PACIFIC))
    assert list(df.columns) == [*geocode.COLUMNS, "resolved"]
    paris, abidjan, sea = df.to_dict("records")
    assert (paris["country_code"], paris["country"], paris["region"], paris["city"]) == (
        "FR", "France", "Île-de-France", "Paris")
    assert paris["resolved"] and abidjan["resolved"]
    assert abidjan["country_code"] == "CI" and abidjan["city"] == "Abidjan"
    assert not sea["resolved"]
    assert all(sea[c] == "" for c in geocode.COLUMNS)


def test_reverse_radius_and_any_distance():
    assert not geocode.reverse(*_lists(MID_PACIFIC))["resolved"].item()
    # With no radius (how OSV-5M geocodes predictions) every point gets its nearest place.
    anywhere = geocode.reverse(*_lists(MID_PACIFIC), max_km=None)
    assert anywhere["resolved"].item() and anywhere["country_code"].item() != ""


def test_reverse_is_right_across_the_antimeridian():
    # Just east of the antimeridian in Fiji's Taveuni: the nearest place is on the same
    # island (lon ~ -179.9), never one at lon +179 picked by a flat lat/lon distance.
    df = geocode.reverse([-16.8], [-179.97])
    assert df["country_code"].item() == "FJ"


def test_reverse_nan_does_not_resolve_and_bad_points_raise():
    df = geocode.reverse([np.nan, 48.857], [0.0, 2.352])
    assert df["resolved"].tolist() == [False, True]
    with pytest.raises(InvalidCoordinateError, match=r"point 1 .*lat 95\.0"):
        geocode.reverse([10.0, 95.0], [0.0, 0.0])
    with pytest.raises(InvalidCoordinateError, match="differ in length"):
        geocode.reverse([1.0, 2.0], [1.0])


def test_reverse_empty_and_many_points():
    assert len(geocode.reverse([], [])) == 0
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-60, 70, 5000), rng.uniform(-180, 180, 5000)
    df = geocode.reverse(lat, lon)
    assert len(df) == 5000 and 0.2 < df["resolved"].mean() < 0.8
    assert (df.loc[df["resolved"], "country_code"] != "").all()


def test_normalize_label():
    assert geocode.normalize_label("Île-de-France") == geocode.normalize_label("ile de  FRANCE")
    assert geocode.normalize_label("Côte d'Ivoire") == "cote d ivoire"
    for missing in (None, float("nan"), "", " nan ", "NaN"):
        assert geocode.normalize_label(missing) == ""


# --------------------------------------------------------------------------- accuracy


def test_identical_points_score_one():
    lat, lon = _lists(PARIS, ABIDJAN, BERLIN, STRASBOURG)
    acc = geocode.area_accuracy(lat, lon, lat, lon)
    for level in geocode.LEVELS:
        if acc[f"n_{level}"]:
            assert acc[f"{level}_acc"] == 1.0
    assert acc["n_country"] == 4 and acc["n_region"] == 4 and acc["n_city"] == 4


def test_germany_versus_france_is_a_country_miss():
    acc = geocode.area_accuracy(*_lists(KEHL), *_lists(STRASBOURG))
    assert acc["country_acc"] == 0.0 and acc["region_acc"] == 0.0 and acc["city_acc"] == 0.0
    assert acc["n_country"] == 1


def test_two_points_in_one_city_are_a_city_hit():
    acc = geocode.area_accuracy(*_lists(PARIS_2), *_lists(PARIS))
    assert acc["country_acc"] == acc["region_acc"] == acc["city_acc"] == 1.0


def test_truths_that_do_not_resolve_are_skipped():
    # A truth in the open sea counts at no level; a prediction there simply misses.
    acc = geocode.area_accuracy(*_lists(PARIS, PARIS), *_lists(MID_PACIFIC, PARIS))
    assert acc["n_country"] == 1 and acc["country_acc"] == 1.0
    acc = geocode.area_accuracy(*_lists(MID_PACIFIC), *_lists(MID_PACIFIC))
    assert acc == {"country_acc": None, "region_acc": None, "subregion_acc": None, "city_acc": None,
                   "n_country": 0, "n_region": 0, "n_subregion": 0, "n_city": 0}
    acc = geocode.area_accuracy([np.nan], [np.nan], *_lists(PARIS))  # no prediction
    assert acc["country_acc"] == 0.0 and acc["n_country"] == 1


def test_subregion_counts_only_truths_with_admin2():
    # Vienna has an admin-2 ("Wien Stadt"); Paris has none in the data (it equals the
    # city's name), so a Paris truth is skipped for sub-region.
    acc = geocode.area_accuracy(*_lists((48.21, 16.37), PARIS), *_lists((48.2082, 16.3738), PARIS))
    assert acc["n_subregion"] == 1 and acc["subregion_acc"] == 1.0
    assert acc["n_city"] == 2


def test_truth_labels_override_geocoding():
    # The true points are nonsense (0, 0): only the labels say where the photos are.
    osv = pd.DataFrame({
        "country": ["FR", "FR", "DE"],
        "region": ["Île-de-France_FR", "Île-de-France_FR", "nan"],
        "sub-region": ["Paris_Île-de-France_FR", "Paris_Île-de-France_FR", "nan"],
        "city": ["Paris_Paris_Île-de-France_FR", "Lyon_Rhône_Auvergne-Rhône-Alpes_FR", np.nan],
    })
    acc = geocode.area_accuracy(*_lists(PARIS, PARIS, BERLIN), [0, 0, 0], [0, 0, 0], truth=osv)
    assert acc["country_acc"] == 1.0 and acc["n_country"] == 3
    assert acc["region_acc"] == 1.0 and acc["n_region"] == 2  # "nan" skipped
    # Paris has no admin-2 in the data; it matches the admin-2 of its own name.
    assert acc["subregion_acc"] == 1.0 and acc["n_subregion"] == 2
    assert acc["city_acc"] == 0.5 and acc["n_city"] == 2
    # The same points geocoded: (0, 0) is open sea, so nothing counts.
    assert geocode.area_accuracy(*_lists(PARIS, PARIS, BERLIN), [0, 0, 0], [0, 0, 0])["n_country"] == 0


def test_truth_plain_names_and_missing_columns():
    # Plain names, any case or accents, country by name; no city column: geocoded.
    names = pd.DataFrame({"country": ["france", "Côte d'Ivoire", "Atlantis"],
                          "region": ["ILE DE FRANCE", None, "x"]})
    lat, lon = _lists(PARIS, ABIDJAN, PARIS)
    acc = geocode.area_accuracy(lat, lon, lat, lon, truth=names)
    assert acc["n_country"] == 3 and acc["country_acc"] == pytest.approx(2 / 3)  # Atlantis misses
    assert acc["n_region"] == 2 and acc["region_acc"] == 0.5
    assert acc["n_city"] == 3 and acc["city_acc"] == 1.0


def test_area_accuracy_input_errors():
    with pytest.raises(InputError, match="2 predicted points for 1 true points"):
        geocode.area_accuracy([1, 2], [1, 2], [1], [1])
    with pytest.raises(InputError, match="truth labels have 2 rows for 1 true points"):
        geocode.area_accuracy([1], [1], [1], [1], truth=pd.DataFrame({"country": ["FR", "DE"]}))


# --------------------------------------------------------------------------- geography names


def test_country_names_are_utf8():
    assert geography.country_of(*ABIDJAN).loc[0, "country"] == "Côte d'Ivoire"
    names = list(geography.countries().name)
    assert not [n for n in names if "Ã" in n or "Â" in n]
    assert {"Curaçao", "Åland", "St-Barthélemy"} <= set(names)
