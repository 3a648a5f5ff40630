"""The workspace's leaderboard: scores of runs, other systems and baselines, per truth set.

Every ``evaluate`` and ``score`` records its result here, under the hash of the truth set
it was computed on (``geohier.benchmark.truth_hash``), so a table never mixes truth sets::

    data/leaderboard/
      leaderboard.json                  {"format", "truth_sets": {hash: {"truth": info,
                                         "entries": {name: {"kind", "geo", "note", "at", ...}}}}}
      <hash>/<entry>.json               that entry's per-image points, for error maps

``kind`` is ``run`` (a geohier run evaluated), ``system`` (another system's predictions
scored) or ``baseline`` (a trivial guess on the same images). Writes are atomic (the file
is re-read right before each write); the per-image points are JSON arrays, no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from geohier import metrics
from geohier.errors import WorkspaceError
from geohier.workspace import atomic_write_text, json_safe, read_json, utcnow

FORMAT = "geohier-leaderboard/1"
DIR_NAME = "leaderboard"
FILE_NAME = "leaderboard.json"
KINDS = ("run", "system", "baseline")
MAX_POINTS = 50_000  # per-image points kept for an error map (a seeded sample beyond)

#: Columns of a leaderboard table, in order (fractions stay fractions; pages format them).
COLUMNS = ("name", "kind", "geoscore", "geoscore_rounded", "median_km", "mean_km",
           *(f"acc_{t}km" for t in metrics.KM_THRESHOLDS), "country_acc", "region_acc", "subregion_acc",
           "city_acc", "n", "missing", "note", "at")
#: Which way is better, per numeric column (True: higher).
HIGHER_IS_BETTER = {"geoscore": True, "geoscore_rounded": True, "median_km": False, "mean_km": False,
                    **{f"acc_{t}km": True for t in metrics.KM_THRESHOLDS}, "country_acc": True,
                    "region_acc": True, "subregion_acc": True, "city_acc": True}


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "entry"
    return f"{s[:60]}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:6]}"


class Leaderboard:
    """The leaderboard of one workspace (``Leaderboard(ws.data_dir)``)."""

    def __init__(self, data_dir: str | os.PathLike):
        self.dir = Path(data_dir) / DIR_NAME
        self.path = self.dir / FILE_NAME

    def load(self) -> dict:
        doc = read_json(self.path)
        if doc and doc.get("format") != FORMAT:
            raise WorkspaceError(f"{self.path} is not a geohier leaderboard (format {FORMAT})")
        doc.setdefault("format", FORMAT)
        doc.setdefault("truth_sets", {})
        return doc

    def truth_sets(self) -> list[dict]:
        """Truth sets with at least one entry, the most recently scored first:
        ``[{"hash", "name", "images", "entries", "at", ...}]``."""
        out = []
        for h, ts in self.load()["truth_sets"].items():
            entries = ts.get("entries") or {}
            if not entries:
                continue
            at = max((e.get("at") or "") for e in entries.values())
            out.append({**(ts.get("truth") or {}), "hash": h, "entries": len(entries), "at": at})
        return sorted(out, key=lambda t: t["at"], reverse=True)

    def record(self, truth: dict, name: str, kind: str, geo: dict, *, note: str = "", points: dict | None = None,
               extra: dict | None = None) -> None:
        """Add or replace the entry ``name`` of truth set ``truth["hash"]``.

        ``points`` (optional): per-image ``key``, ``true_lat``, ``true_lon``, ``pred_lat``,
        ``pred_lon`` arrays for the error map (NaN predictions = missing)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        h = str(truth["hash"])
        entry = {"kind": kind, "geo": json_safe(geo), "note": note, "at": utcnow(), **(extra or {})}
        if points is not None:
            rel = f"{h}/{_slug(name)}.json"
            _write_points(self.dir / rel, points)
            entry["points"] = rel
        doc = self.load()  # re-read: the smallest window for a concurrent writer
        ts = doc["truth_sets"].setdefault(h, {"truth": {}, "entries": {}})
        new = json_safe({k: v for k, v in truth.items() if k != "hash"})
        old = ts.get("truth") or {}
        if old.get("name") and new.get("name") and new["name"] != old["name"]:
            # the same images under another name (a split, then its CSV): the first name stays,
            # the others are kept as aliases, so the table's title does not flip
            aliases = [a for a in dict.fromkeys([*old.get("aliases", []), new["name"]]) if a != old["name"]]
            new = {**new, "name": old["name"], "aliases": aliases}
        elif old.get("aliases"):
            new = {**new, "aliases": old["aliases"]}
        ts["truth"] = new
        ts["entries"][name] = entry
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")

    def entries(self, truth_hash: str) -> dict[str, dict]:
        return dict((self.load()["truth_sets"].get(truth_hash) or {}).get("entries") or {})

    def table(self, truth_hash: str) -> pd.DataFrame:
        """One row per entry of a truth set (``COLUMNS``), best GeoScore first, baselines last."""
        rows = []
        for name, e in self.entries(truth_hash).items():
            g = e.get("geo") or {}
            row = {"name": name, "kind": e.get("kind"), "note": e.get("note") or "", "at": e.get("at")}
            for c in COLUMNS:
                if c in g:
                    row[c] = g[c]
            row["missing"] = (g.get("missing") or {}).get("n", 0)
            rows.append(row)
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        if frame.empty:
            return frame
        frame["_b"] = frame["kind"] == "baseline"
        frame = frame.sort_values(["_b", "geoscore"], ascending=[True, False], na_position="last")
        return frame.drop(columns="_b").reset_index(drop=True)

    def points(self, truth_hash: str, name: str) -> pd.DataFrame | None:
        """The per-image points of an entry (key, true_lat, true_lon, pred_lat, pred_lon), or
        None when it has none."""
        rel = self.entries(truth_hash).get(name, {}).get("points")
        if not rel:
            return None
        try:
            d = json.loads((self.dir / rel).read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return pd.DataFrame({k: d[k] for k in ("key", "true_lat", "true_lon", "pred_lat", "pred_lon")}).astype(
            {"true_lat": float, "true_lon": float, "pred_lat": float, "pred_lon": float})


def best_rows(table: pd.DataFrame) -> dict[str, int]:
    """Column -> index of the best non-baseline row (ties: the first)."""
    out = {}
    cand = table[table["kind"] != "baseline"] if "kind" in table else table
    for c, higher in HIGHER_IS_BETTER.items():
        if c in cand and cand[c].notna().any():
            col = pd.to_numeric(cand[c], errors="coerce")
            out[c] = int(col.idxmax() if higher else col.idxmin())
    return out


def _write_points(path: Path, points: dict) -> None:
    n = len(points["key"])
    idx = np.arange(n)
    if n > MAX_POINTS:
        idx = np.sort(np.random.default_rng(0).choice(n, MAX_POINTS, replace=False))
    doc = {"format": FORMAT, "total": n, "sampled": bool(n > MAX_POINTS),
           "key": [str(points["key"][i]) for i in idx]}
    for k in ("true_lat", "true_lon", "pred_lat", "pred_lon"):
        v = np.asarray(points[k], dtype=np.float64)[idx]
        doc[k] = [None if not np.isfinite(x) else round(float(x), 6) for x in v]
    atomic_write_text(path, json.dumps(doc, separators=(",", ":")) + "\n")
