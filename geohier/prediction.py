"""What the Predictor answers, and the run facts it reads: the prediction dataclasses
(``Prediction`` per image, its per-level ``Candidate``s, ``Refinement``, ``Points`` of many
images) and the helpers that read a run's meta (``clean_temperatures``, ``cell_positions``,
``position_source``, ``synthetic_note``) or name a point's place (``place_info``).
``geohier.predictor`` imports these; they need no model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from geohier import refine as rf
from geohier.conformal import Region


@dataclass
class Refinement:
    """How a refined candidate's point was found: the cell's own position
    (``cell_lat``/``cell_lon``, where the unrefined guess was) and the training images it
    was averaged from, most similar first: ``{"id", "lat", "lon", "sim", "weight"}``."""

    cell_lat: float
    cell_lon: float
    neighbours: list[dict]
    k: int = rf.DEFAULT_K
    tau: float = rf.DEFAULT_TAU

    def to_dict(self) -> dict:
        return {"cell_lat": round(self.cell_lat, 5), "cell_lon": round(self.cell_lon, 5), "k": self.k,
                "tau": self.tau, "neighbours": [dict(n) for n in self.neighbours]}


@dataclass
class Points:
    """Predicted points of many images (``Predictor.points``): ``lat``/``lon`` (N,), the
    finest class ``cls`` (N,), ``refined`` (N,) bool with refinement (else None), and
    ``source``: ``cell_positions``, ``centroid``, ``offset`` (a hybrid head's guess) or
    ``neighbours``."""

    lat: np.ndarray
    lon: np.ndarray
    cls: np.ndarray
    refined: np.ndarray | None
    source: str


@dataclass
class Candidate:
    """One kept class.

    ``prob``: its probability among the candidates considered at its level (what the keep
    rules look at; the candidates of a level sum to at most 1). ``joint``: the probability
    of its whole path, the product of every level's probability along it (``exp(score)``):
    a cell that is its parent's only child has prob 1 but the joint of its parent.
    ``lat``/``lon``/``bbox``/``country``/``place`` are filled for the finest level
    (``bbox`` = west, south, east, north). ``refined``: set on the finest candidate whose
    point retrieval refinement moved (``lat``/``lon`` are then the refined point)."""

    level: int
    index: int
    cell: str
    prob: float
    score: float
    parent: str | None = None
    lat: float | None = None
    lon: float | None = None
    bbox: tuple[float, float, float, float] | None = None
    country: str | None = None
    place: str | None = None
    refined: Refinement | None = None

    @property
    def joint(self) -> float:
        return math.exp(self.score)

    def to_dict(self) -> dict:
        d = {"cell": self.cell, "prob": round(self.prob, 6), "joint": round(self.joint, 6), "parent": self.parent}
        if self.lat is not None:
            d.update(lat=round(self.lat, 5), lon=round(self.lon, 5), bbox=[round(v, 6) for v in self.bbox],
                     country=self.country, place=self.place)
        if self.refined is not None:
            d["refined"] = self.refined.to_dict()
        return d


@dataclass
class Prediction:
    """The answer for one image: kept candidates per level (finest ranked first), the
    image's EXIF position when it has one (``true``: lat, lon, error_km, geoscore), or
    ``error`` when the image could not be read. ``refined``: None when refinement was not
    asked for, else whether it moved the point (False: no training image in the kept
    cells, the cell's position stands). A refined prediction's best candidate is the cell
    the neighbour evidence chose, moved to the front of the finest level (the others keep
    their order)."""

    image: str
    levels: dict[int, list[Candidate]] = field(default_factory=dict)
    true: dict | None = None
    error: str | None = None
    refined: bool | None = None
    confidence: float | None = None
    region: Region | None = None
    abstained: bool | None = None
    within: str | None = None

    @property
    def best(self) -> Candidate | None:
        if self.error or not self.levels:
            return None
        finest = max(self.levels)
        return self.levels[finest][0] if self.levels[finest] else None

    def to_dict(self) -> dict:
        """The CLI's ``--json`` object (its shape: ``pipeline/predict.py``'s docstring)."""
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        b = self.best
        d = {"image": self.image,
             "candidates": {str(lv): [c.to_dict() for c in cands] for lv, cands in self.levels.items()},
             "best": {"cell": b.cell, "lat": round(b.lat, 5), "lon": round(b.lon, 5), "prob": round(b.prob, 6),
                      "joint": round(b.joint, 6), "country": b.country, "place": b.place}}
        if self.refined is not None:  # only when asked for: the unrefined shape stays as it was
            d["best"]["refined"] = bool(self.refined and b.refined is not None)
            if b.refined is not None:
                d["best"].update(cell_lat=round(b.refined.cell_lat, 5), cell_lon=round(b.refined.cell_lon, 5))
        if self.true is not None:
            d["true"] = dict(self.true)
        # only when asked for (--coverage, --abstain, --within): the plain shape stays as it was
        if self.confidence is not None:
            d["confidence"] = round(self.confidence, 6)
        if self.region is not None:
            d["region"] = self.region.to_dict()
        if self.abstained is not None:
            d["abstained"] = bool(self.abstained)
            if self.abstained:  # "not sure": the region, not a point
                d["best"] = None
        if self.within is not None:
            d["within"] = self.within
        return d


SYNTHETIC_NOTE = (
    "{run} was trained only on the synthetic demo world (generated pictures, not photos): its guesses "
    "on real photos are not meaningful. To geolocate real photos, import or fetch real geotagged images "
    "(Data page, or `python -m pipeline import-photos / import-csv / fetch`) and train on them; with few "
    "images or no GPU, train heads on a frozen foundation backbone "
    "(`python -m pipeline train --frozen --backbone hf:openai/clip-vit-base-patch16`).")


def synthetic_note(meta: Mapping, name: str = "this run") -> str | None:
    """The warning for a run whose training images all came from the demo world (meta's
    ``data.sources``), else None."""
    sources = ((meta.get("data") or {}).get("sources") or {}) if isinstance(meta, Mapping) else {}
    if sources and set(sources) == {"demo"}:
        return SYNTHETIC_NOTE.format(run=name)
    return None


def clean_temperatures(meta: Mapping, levels: Sequence[int] | None = None) -> dict[int, float]:
    """``{level: T}`` from meta's ``temperatures``: the one way every caller reads them. A
    missing, null, non-numeric, non-finite or non-positive value is 1.0 (no scaling);
    ``levels`` (default: the run's) fixes which levels are returned.

    >>> clean_temperatures({"temperatures": {"1": 1.5, "3": None, "5": "x", "8": -2}}, [1, 3, 5, 8])
    {1: 1.5, 3: 1.0, 5: 1.0, 8: 1.0}
    """
    raw = meta.get("temperatures") if isinstance(meta, Mapping) else None
    raw = raw if isinstance(raw, Mapping) else {}
    if levels is None:
        levels = [int(v) for v in ((meta.get("arch") or {}).get("levels") or [int(k) for k in raw])]
    out = {}
    for lv in levels:
        t = raw.get(str(lv), raw.get(lv))
        try:
            t = float(t)
        except (TypeError, ValueError):
            t = 1.0
        out[int(lv)] = t if math.isfinite(t) and t > 0 else 1.0
    return out


def position_source(meta: Mapping, level: int, classes: int) -> str:
    """Where ``cell_positions`` takes a class's point from: ``cell_positions`` (the mean
    of its training images, recorded in meta.json) or ``centroid``."""
    pos = (meta.get("cell_positions") or {}).get(str(level))
    return "cell_positions" if pos is not None and len(pos) == classes else "centroid"


def cell_positions(hierarchy, meta: Mapping, level: int) -> np.ndarray:
    """(C, 2) lat/lon of each class of ``level``: meta's ``cell_positions`` (the mean
    position of the class's training images) where present and finite, else the cell
    centroid (``position_source`` says which)."""
    lat, lon = hierarchy.centroids(level)
    out = np.stack([lat, lon], axis=1).astype(np.float64)
    pos = (meta.get("cell_positions") or {}).get(str(level))
    if pos is not None and len(pos) == len(out):
        arr = np.asarray(pos, dtype=np.float64).reshape(-1, 2)
        good = np.isfinite(arr).all(1)
        out[good] = arr[good]
    return out


def place_info(lat, lon) -> tuple[list[str | None], list[str | None]]:
    """Country and nearest populated place ("town, region") of points, from offline data
    (Natural Earth's countries, ``geography.country_of``; GeoNames towns,
    ``geography.nearest_places`` over ``geohier.places``); None where unknown (a point
    at sea has no country, but still a nearest town)."""
    from geohier import geography

    lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    if not lat.size:
        return [], []
    countries = [c or None for c in geography.country_of(lat, lon)["country"].tolist()]
    places = []
    for f in geography.nearest_places(lat, lon):
        name = ", ".join(v for v in (f.get("place"), f.get("admin1")) if v) or None
        places.append(name)
    return countries, places
