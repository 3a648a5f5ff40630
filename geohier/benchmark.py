"""The benchmark protocol: truth sets, other systems' predictions, and their scores.

A *truth set* is a CSV of images with their true coordinates in any format that
``geohier.tables`` reads (Im2GPS3k / YFCC4k, OSV-5M's test.csv, plain path,lat,lon), or a
workspace split. A *prediction file* is another system's answers: one row per image with a
key (image / path / id / IMG_ID ...) and predicted coordinates (pred_lat / pred_lon,
predicted_lat / predicted_long, latitude / longitude, lat / lon). Rows are matched by
``tables.image_key`` (file name without extension, any case).

Scores follow OSV-5M's evaluation exactly (``geohier.metrics.distance_metrics``: haversine,
R = 6371 km, strict ``<`` thresholds, unrounded GeoScore plus PIGEON's rounded one) and add
country / region / sub-region / city accuracy (``geohier.geocode``). A truth row without a
prediction is a failure at ``MISSING_KM`` (20,000 km, about half the Earth's circumference:
the farthest a guess can be) unless missing rows are skipped; the result says which.

Every truth set has a ``hash`` (of its keys and coordinates): scores are only ever compared
within one hash (``geohier.leaderboard``).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from geohier import geodesy, grid, metrics, tables
from geohier.errors import InputError

MISSING_KM = 20_000.0
MISSING_POLICIES = ("fail", "skip")
AREA_KEYS = ("country_acc", "region_acc", "subregion_acc", "city_acc")


def truth_hash(keys, lat, lon) -> str:
    """A short, order-free fingerprint of a truth set: its keys and coordinates to 1e-6 deg."""
    lines = sorted(f"{k},{la:.6f},{lo:.6f}" for k, la, lo in zip(keys, lat, lon, strict=True))
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


@dataclass
class TruthSet:
    """Images with known positions. ``keys`` are ``tables.image_key`` values (unique);
    ``refs`` the column values as written; ``areas`` true admin areas from the CSV (OSV-5M's
    unique_country, unique_region, unique_sub-region, unique_city) when it carries them."""

    name: str
    keys: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    refs: np.ndarray
    source: str = "csv"
    path: str | None = None
    areas: pd.DataFrame | None = None
    rows: int = 0
    invalid: Counter = field(default_factory=Counter)
    duplicates: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def hash(self) -> str:
        return truth_hash(self.keys, self.lat, self.lon)

    def info(self) -> dict:
        """What a score or a leaderboard says about the truth set it was computed on."""
        return {"name": self.name, "hash": self.hash, "format": self.source, "path": self.path,
                "images": len(self), "rows": self.rows, "invalid": dict(self.invalid),
                "duplicates": self.duplicates, "true_areas": self.areas is not None}

    def subset(self, keys) -> TruthSet:
        """The rows of these keys (all must be truth keys), in their order."""
        index = {k: i for i, k in enumerate(self.keys)}
        try:
            idx = np.array([index[k] for k in keys], dtype=np.int64)
        except KeyError as exc:
            raise InputError(f"image {exc.args[0]!r} is not in the truth set {self.name}") from None
        areas = self.areas.iloc[idx].reset_index(drop=True) if self.areas is not None else None
        return TruthSet(self.name, self.keys[idx], self.lat[idx], self.lon[idx], self.refs[idx], self.source,
                        self.path, areas, len(idx))

    @classmethod
    def from_points(cls, name: str, keys, lat, lon, source: str = "split") -> TruthSet:
        keys = np.array([str(k) for k in keys], dtype=object)
        return cls(name, keys, np.asarray(lat, np.float64), np.asarray(lon, np.float64), keys.copy(), source,
                   rows=len(keys))


@dataclass
class Rows:
    """Which rows of a truth table make the truth set (``select_rows``): ``keep`` indexes
    the rows kept, in file order; ``lat``, ``lon``, ``refs`` (as written, stripped) and
    ``keys`` (``tables.image_key``) cover every row; ``invalid`` counts the rows left out
    by reason, ``duplicates`` the repeated keys left out (the first row is kept)."""

    keep: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    refs: np.ndarray
    keys: np.ndarray
    invalid: Counter
    duplicates: int

    def skipped(self) -> dict[str, int]:
        """Every row left out, by reason."""
        out = dict(self.invalid)
        if self.duplicates:
            out[tables.DUPLICATE_KEY] = self.duplicates
        return out


def select_rows(rows: list[dict], ref_col: str, lat_col: str, lon_col: str) -> Rows:
    """The rows of a truth table that make its truth set: coordinates that pass
    ``tables.parse_point``, an image id or path, the first row of each key. Both sides of
    an evaluation choose rows with this (``read_truth`` and ``evaluate --csv``'s images),
    so a row is left out of both or of neither."""
    lat, lon, why = tables.points(rows, lat_col, lon_col)
    refs = np.array([(r.get(ref_col) or "").strip() for r in rows], dtype=object)
    invalid = Counter(w for w in why if w)
    ok = np.array([w is None for w in why], dtype=bool) if rows else np.zeros(0, bool)
    no_ref = ok & (refs == "")
    if no_ref.any():
        invalid[tables.MISSING_REF] += int(no_ref.sum())
        ok &= ~no_ref
    keys = np.array([tables.image_key(r) for r in refs], dtype=object)
    _, first = np.unique(keys[ok], return_index=True) if ok.any() else (None, np.zeros(0, np.int64))
    keep = np.flatnonzero(ok)[np.sort(first)]
    return Rows(keep, lat, lon, refs, keys, invalid, int(ok.sum() - keep.size))


def read_truth(path: str | os.PathLike, name: str | None = None) -> TruthSet:
    """A truth CSV (any format ``tables.match_columns`` accepts). Rows with bad coordinates
    are dropped and counted by reason (``invalid``); of repeated keys the first is kept."""
    path = Path(path).expanduser()
    header, rows = tables.read_rows(path)
    cols = tables.match_columns(header, str(path))
    sel = select_rows(rows, cols.path or cols.id, cols.lat, cols.lon)
    keep = sel.keep
    areas = None
    found = {k: tables.find_column(header, a) for k, a in tables.AREA_ALIASES.items()}
    if found["country"]:
        # keep OSV-5M's own column names: geohier.geocode reads their "Name_CC" ids by them
        areas = pd.DataFrame({c.strip().lower(): [(rows[i].get(c) or "").strip() for i in keep]
                              for c in found.values() if c})
    if keep.size == 0:
        raise InputError(f"{path} has no row with usable coordinates ({_counts(sel.invalid) or 'no data rows'})")
    return TruthSet(name or path.stem, sel.keys[keep], sel.lat[keep], sel.lon[keep], sel.refs[keep], cols.source,
                    str(path.resolve()), areas, len(rows), sel.invalid, sel.duplicates)


@dataclass
class Predictions:
    """Another system's answers, keyed like a truth set."""

    name: str
    keys: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    path: str | None = None
    rows: int = 0
    invalid: Counter = field(default_factory=Counter)
    duplicates: int = 0


def read_predictions(path: str | os.PathLike, name: str | None = None) -> Predictions:
    """A prediction CSV: a key column (``tables.KEY_ALIASES``) and predicted coordinates
    (``tables.PRED_ALIASES``). Missing columns are an InputError naming them and the
    accepted names; bad coordinates are counted by reason; of repeated keys the first wins."""
    path = Path(path).expanduser()
    header, rows = tables.read_rows(path)
    shown = ", ".join(h for h in header if h) or "(none)"
    key_col = tables.find_column(header, tables.KEY_ALIASES)
    lat_col = tables.find_column(header, tables.PRED_ALIASES["lat"])
    lon_col = tables.find_column(header, tables.PRED_ALIASES["lon"])
    missing = []
    if key_col is None:
        missing.append(f"an image key ({', '.join(tables.KEY_ALIASES)})")
    if lat_col is None:
        missing.append(f"a predicted latitude ({', '.join(tables.PRED_ALIASES['lat'])})")
    if lon_col is None:
        missing.append(f"a predicted longitude ({', '.join(tables.PRED_ALIASES['lon'])})")
    if missing:
        raise InputError(f"{path} lacks {'; '.join(missing)} (any case). Columns found: {shown}")
    if not rows:
        raise InputError(f"{path} has a header but no prediction rows")
    lat, lon, why = tables.points(rows, lat_col, lon_col)
    keys = np.array([tables.image_key(r.get(key_col) or "") for r in rows], dtype=object)
    invalid = Counter(w for w in why if w)
    ok = np.array([w is None for w in why], dtype=bool) & (keys != "")
    invalid["no image key"] += int(((keys == "") & np.array([w is None for w in why])).sum())
    invalid = +invalid
    _, first = np.unique(keys[ok], return_index=True) if ok.any() else (None, np.zeros(0, np.int64))
    keep = np.flatnonzero(ok)[np.sort(first)]
    return Predictions(name or path.stem, keys[keep], lat[keep], lon[keep], str(path.resolve()), len(rows),
                       invalid, int(ok.sum() - keep.size))


def _counts(c: Counter) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(c.items()))


def align(truth: TruthSet, preds: Predictions) -> tuple[np.ndarray, np.ndarray, dict]:
    """Predicted (lat, lon) for every truth row, NaN where the system gave none, and the
    matching counts. A file none of whose keys is a truth key is an InputError showing
    examples of both (usually the wrong truth set, or ids vs paths)."""
    index = {k: i for i, k in enumerate(preds.keys)}
    pos = np.array([index.get(k, -1) for k in truth.keys], dtype=np.int64)
    matched = pos >= 0
    if len(preds.keys) and not matched.any():
        raise InputError(
            f"none of the {len(preds.keys)} image keys of {preds.path or preds.name} matches the "
            f"{len(truth)} of the truth set {truth.name} (e.g. {', '.join(map(str, preds.keys[:3]))} vs "
            f"{', '.join(map(str, truth.keys[:3]))}); rows are matched by file name without extension")
    plat = np.where(matched, preds.lat[np.maximum(pos, 0)], np.nan)
    plon = np.where(matched, preds.lon[np.maximum(pos, 0)], np.nan)
    stats = {"matched": int(matched.sum()), "missing": int((~matched).sum()),
             "unmatched_predictions": int(len(preds.keys) - matched.sum()),
             "invalid_predictions": dict(preds.invalid), "duplicate_predictions": preds.duplicates}
    return plat, plon, stats


def score_points(true_lat, true_lon, pred_lat, pred_lon, *, missing: str = "fail",
                 areas: pd.DataFrame | None = None, geocode: bool = True) -> dict:
    """The ``geo`` block of one system on one truth set.

    NaN predictions are missing: with ``missing="fail"`` each is an error of MISSING_KM
    (and a wrong country, region, ...), with ``"skip"`` they are left out. The result has
    ``metrics.GEO_KEYS``, the area accuracies (``AREA_KEYS``, None where no truth resolves)
    and ``missing`` = {"n", "policy"}."""
    if missing not in MISSING_POLICIES:
        raise InputError(f"unknown missing-prediction policy {missing!r}; use {' or '.join(MISSING_POLICIES)}")
    true_lat, true_lon = np.asarray(true_lat, np.float64), np.asarray(true_lon, np.float64)
    pred_lat, pred_lon = np.asarray(pred_lat, np.float64), np.asarray(pred_lon, np.float64)
    have = np.isfinite(pred_lat) & np.isfinite(pred_lon)
    d = np.full(true_lat.shape, MISSING_KM)
    d[have] = geodesy.haversine_km(pred_lat[have], pred_lon[have], true_lat[have], true_lon[have])
    if missing == "skip":
        d = d[have]
    out: dict = metrics.distance_metrics(d)
    n_missing = int((~have).sum())
    out["missing"] = {"n": n_missing, "policy": (f"counted as {MISSING_KM:,.0f} km errors" if missing == "fail"
                                                 else "left out")}
    if geocode:
        out.update(_areas(true_lat, true_lon, pred_lat, pred_lon, have, missing, areas))
    return out


def _areas(true_lat, true_lon, pred_lat, pred_lon, have, missing, areas) -> dict:
    from geohier import geocode

    keep = have if missing == "skip" else np.ones(have.shape, bool)  # a NaN guess misses every area
    sub = areas[keep].reset_index(drop=True) if areas is not None else None
    acc = geocode.area_accuracy(pred_lat[keep], pred_lon[keep], true_lat[keep], true_lon[keep], sub)
    out = {k: acc.get(k) for k in AREA_KEYS}
    out.update({f"n_{k[:-4]}": int(acc.get(f"n_{k[:-4]}") or 0) for k in AREA_KEYS})
    return out


def score_aligned(truth: TruthSet, preds: Predictions, *, missing: str = "fail",
                  geocode: bool = True) -> tuple[dict, np.ndarray, np.ndarray]:
    """``score``'s result and the predicted (lat, lon) aligned to the truth rows (NaN where
    missing), for callers that also keep the per-image points."""
    plat, plon, stats = align(truth, preds)
    geo = score_points(truth.lat, truth.lon, plat, plon, missing=missing, areas=truth.areas, geocode=geocode)
    result = {"system": preds.name, "truth": truth.info(), "geo": geo, "matching": stats,
              "predictions": {"path": preds.path, "rows": preds.rows}}
    return result, plat, plon


def score(truth: TruthSet, preds: Predictions, *, missing: str = "fail", geocode: bool = True) -> dict:
    """Score a prediction file on a truth set: ``{"system", "truth", "geo", "matching"}``."""
    return score_aligned(truth, preds, missing=missing, geocode=geocode)[0]


def baseline_scores(truth: TruthSet, train_lat=None, train_lon=None, *, level: int = 8, seed: int = 0,
                    geocode: bool = True) -> dict:
    """Trivial guesses on the same images (``geohier.baselines``), scored like a system:
    ``{name: {"geo": ..., "note": ...}}``."""
    from geohier import baselines

    out = {}
    for name, b in baselines.predictions(truth.lat, truth.lon, train_lat, train_lon, level=level, seed=seed).items():
        geo = score_points(truth.lat, truth.lon, b["lat"], b["lon"], areas=truth.areas, geocode=geocode)
        out[name] = {"geo": geo, "note": b.get("note", "")}
    return out


def hierarchy_misses(true_lat, true_lon, pred_lat, pred_lon, levels=grid.DEFAULT_LEVELS) -> list[dict]:
    """Where finest-level misses come from: for each level, how many of the images whose
    predicted point is outside the true finest cell were already in the wrong cell at that
    level (``wrong_parent``), as a share of the finest misses (``share``). A share of 0.9 at
    level 1 means 90% of the misses went wrong at the first, coarsest split."""
    levels = sorted(int(v) for v in levels)
    have = np.isfinite(pred_lat) & np.isfinite(pred_lon)
    tl, to = np.asarray(true_lat, np.float64)[have], np.asarray(true_lon, np.float64)[have]
    pl, po = np.asarray(pred_lat, np.float64)[have], np.asarray(pred_lon, np.float64)[have]
    if tl.size == 0:
        return []
    t_cells = grid.encode(tl, to, levels)
    p_cells = grid.encode(pl, po, levels)
    miss = t_cells[levels[-1]] != p_cells[levels[-1]]
    n_miss = int(miss.sum())
    rows = []
    for lv in levels:
        wrong = int((t_cells[lv][miss] != p_cells[lv][miss]).sum())
        rows.append({"level": lv, "hit_rate": float((t_cells[lv] == p_cells[lv]).mean()),
                     "finest_misses": n_miss, "wrong_parent": wrong,
                     "share": (wrong / n_miss) if n_miss else math.nan})
    return rows


def cell_hit_rates(true_lat, true_lon, pred_lat, pred_lon, level: int) -> pd.DataFrame:
    """Per cell of the true points at ``level``: images, hits (predicted point in the same
    cell) and hit rate. Missing predictions are misses."""
    tl, to = np.asarray(true_lat, np.float64), np.asarray(true_lon, np.float64)
    t = grid.encode(tl, to, level)
    have = np.isfinite(pred_lat) & np.isfinite(pred_lon)
    p = np.full(t.shape, -1, dtype=np.int64)
    if have.any():
        p[have] = grid.encode(np.asarray(pred_lat)[have], np.asarray(pred_lon)[have], level)
    frame = pd.DataFrame({"key": t, "hit": (p == t)})
    g = frame.groupby("key")["hit"].agg(["size", "sum"]).reset_index()
    g.columns = ["key", "images", "hits"]
    g["hit_rate"] = g["hits"] / g["images"]
    return g
