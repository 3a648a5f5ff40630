"""Prediction regions with a coverage guarantee (split conformal prediction) and abstention.

**The probabilities.** Every finest class gets its *hierarchical joint probability*: the
product, down the levels, of each level's probability of the class's ancestor *given its
parent* (a softmax among siblings, after temperature scaling; ``log_joint``). Unlike the
keep rules' ``joint`` (``geohier.combine``, which only looks at the kept paths), this is a
distribution over ALL finest classes: it sums to 1 whatever a keep rule would keep.

**The score: adaptive prediction sets (APS, Romano, Sesia & Candès 2020).** Rank an image's
finest classes by joint probability; the score of class y is the probability mass of the
classes ranked above it plus half its own: ``s(x, y) = sum_{p_j > p_y} p_j + u * p_y``
with ``u = 1/2`` (``APS_U``, fixed rather than random, so that the same photo always gets
the same region; any fixed score keeps the guarantee). The region at threshold tau is the
prefix of the ranking whose scores are <= tau (and never less than the top class). Why
APS rather than "every class with p >= t": the region grows until it holds a fixed share
of the image's own probability mass, so its size *adapts to how unsure the model is about
this image*: one cell for a photo of a landmark, a country's worth of cells for an
ambiguous road. A probability cut-off gives every image the same per-class bar and
undercovers the hard images, whose mass is spread over many small probabilities.

**Calibration** (``Conformal.fit``): the scores of the true cells of the run's val images
(after temperature scaling). For coverage 1 - alpha the threshold is the
``ceil((n + 1)(1 - alpha))``-th smallest of the n scores (the finite-sample quantile,
``ceil((n+1)(1-alpha))/n``); an image whose true cell is no class (or has probability 0)
scores +inf and is never covered. Then, for a new image exchangeable with the calibration
ones, P(true cell in region) >= 1 - alpha (marginally, not per image). Storing the sorted
scores lets any 1 - alpha be asked for at predict time; above ``MAX_STORED`` scores a
subset of order statistics is stored and the next stored one up is used (a threshold at
least as high: still valid, slightly larger regions).

**Abstention.** An image's confidence is its top finest joint probability
(``confidence``); ``abstention_curve`` ranks images by it and reports the accuracy of the
most confident share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from geohier import grid
from geohier.errors import InputError

SCORE = "aps"
APS_U = 0.5
#: The coverages evaluate reports.
COVERAGES = (0.8, 0.9, 0.95)
#: Shares of images answered in the abstention table (the most confident first).
SHARES = tuple(round(0.1 * i, 1) for i in range(1, 11))
ABSTAIN_KM = (25, 200, 750, 2500)
#: Calibration scores stored in meta.json beyond which order statistics are subsampled.
MAX_STORED = 5000
CHUNK = 256


# =========================================================================== probabilities


def _scaled(z, temperatures: Mapping | None, level: int) -> torch.Tensor:
    z = torch.as_tensor(z).float()
    if temperatures:
        t = temperatures.get(level, temperatures.get(str(level), 1.0))
        if t is not None and float(t) != 1.0:
            z = z / float(t)
    return z


def log_joint(logits: Mapping[int, torch.Tensor], tree, temperatures: Mapping | None = None,
              allowed: Mapping[int, np.ndarray] | None = None) -> torch.Tensor:
    """(B, C_finest) log of the hierarchical joint probability of every finest class: the
    sum down the levels of log p(ancestor | parent), a log-softmax among the siblings
    (temperatures applied; classes that cannot reach the finest level, or outside
    ``allowed`` ``{level: (C,) bool}``, get -inf). Rows sum to 1 in probability.

    >>> from geohier.combine import Tree
    >>> tree = Tree.from_parents([1, 2], {2: [0, 0, 1]})
    >>> lj = log_joint({1: torch.tensor([[0.0, 0.0]]), 2: torch.tensor([[0.0, 0.0, 5.0]])}, tree)
    >>> [round(v, 3) for v in lj.exp()[0].tolist()]
    [0.25, 0.25, 0.5]
    """
    tt = tree.tensors("cpu")
    out = None
    for i, lv in enumerate(tree.levels):
        z = _scaled(logits[lv], temperatures, lv).cpu() + tt["bias"][lv]
        if allowed is not None and lv in allowed:
            z = z.masked_fill(~torch.as_tensor(np.asarray(allowed[lv], bool)), float("-inf"))
        if i == 0:
            out = torch.log_softmax(z, dim=1)
            continue
        par = torch.as_tensor(tree.parents[lv], dtype=torch.long)
        n_prev = tree.num_classes[tree.levels[i - 1]]
        idx = par.expand_as(z)
        m = torch.full((z.shape[0], n_prev), float("-inf")).scatter_reduce(1, idx, z, "amax", include_self=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = torch.zeros((z.shape[0], n_prev)).scatter_add(1, idx, (z - m.gather(1, idx)).exp())
        lse = s.log() + m  # (B, C_prev) log-sum-exp of each parent's children
        cond = torch.where(torch.isfinite(z), z - lse.gather(1, idx), torch.full_like(z, float("-inf")))
        out = out.gather(1, idx) + cond
    return out


def confidence(logp: torch.Tensor) -> np.ndarray:
    """(B,) an image's confidence: its top finest joint probability."""
    if not logp.shape[0]:
        return np.zeros(0)
    return logp.max(dim=1).values.exp().double().numpy()


def aps_scores(logp: torch.Tensor, targets, u: float = APS_U) -> np.ndarray:
    """(B,) APS score of each row's target class: the mass of the classes more probable than
    it plus ``u`` times its own; +inf for a target < 0 or of probability 0."""
    t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    p = logp.exp().double()
    ok = (t >= 0) & (t < p.shape[1])
    py = p.gather(1, t.clamp(0, max(p.shape[1] - 1, 0))[:, None])  # (B, 1)
    before = (p * (p > py)).sum(1)
    s = before + u * py[:, 0]
    s = torch.where(ok & (py[:, 0] > 0), s, torch.full_like(s, float("inf")))
    return s.numpy()


def region_prefix(logp: torch.Tensor, tau: float, u: float = APS_U) -> tuple[torch.Tensor, torch.Tensor]:
    """(order (B, C) classes by decreasing probability, sizes (B,)): each row's region is
    ``order[row, :size]``, the classes whose APS score is <= ``tau`` (at least the top
    one, never a class of probability 0)."""
    p, order = logp.exp().double().sort(dim=1, descending=True)
    before = p.cumsum(1) - p
    inside = (before + u * p <= tau) & (p > 0)
    sizes = inside.sum(1).clamp(min=1)
    return order, sizes


# =========================================================================== calibration


@dataclass
class Conformal:
    """A split-conformal calibration: the sorted finite ``scores`` of the calibration
    images (their ``ranks``, 1-based, when only some order statistics are kept), ``n``
    images in all (``n - (finite ones)`` scored +inf), and what they were computed with."""

    n: int
    scores: np.ndarray
    ranks: np.ndarray | None = None
    score: str = SCORE
    u: float = APS_U
    extra: dict | None = None

    @classmethod
    def fit(cls, scores, max_stored: int = MAX_STORED, **extra) -> Conformal:
        s = np.asarray(scores, dtype=np.float64).ravel()
        if not s.size:
            raise InputError("conformal calibration needs at least one image")
        finite = np.sort(s[np.isfinite(s)])
        ranks = None
        if finite.size > max_stored:
            ranks = np.unique(np.linspace(1, finite.size, max_stored).round().astype(np.int64))
            finite = finite[ranks - 1]
        return cls(int(s.size), finite, ranks, extra=dict(extra) or None)

    def threshold(self, coverage: float) -> float:
        """The score threshold of coverage 1 - alpha: the ceil((n+1)(1-alpha))-th smallest
        calibration score (+inf when that is more than n, or an infinite score)."""
        coverage = check_coverage(coverage)
        k = math.ceil((self.n + 1) * coverage - 1e-9)
        if k > self.n:
            return float("inf")
        if self.ranks is None:
            return float(self.scores[k - 1]) if k <= self.scores.size else float("inf")
        j = int(np.searchsorted(self.ranks, k, side="left"))
        return float(self.scores[j]) if j < self.scores.size else float("inf")

    def to_dict(self) -> dict:
        d = {"score": self.score, "u": self.u, "n": self.n,
             "scores": [float(f"{v:.7g}") for v in self.scores.tolist()]}
        if self.ranks is not None:
            d["ranks"] = self.ranks.tolist()
        d.update(self.extra or {})
        return d

    @classmethod
    def from_dict(cls, d) -> Conformal | None:
        """The calibration in meta.json's ``conformal`` (None when absent or unusable)."""
        if not isinstance(d, Mapping) or d.get("score") != SCORE:
            return None
        try:
            n = int(d["n"])
            scores = np.asarray(d["scores"], dtype=np.float64)
            ranks = np.asarray(d["ranks"], dtype=np.int64) if d.get("ranks") is not None else None
            u = float(d.get("u", APS_U))
        except (KeyError, TypeError, ValueError):
            return None
        if n < 1 or scores.ndim != 1 or scores.size > n or not np.isfinite(scores).all() \
                or (ranks is not None and ranks.shape != scores.shape):
            return None
        extra = {k: v for k, v in d.items() if k not in ("score", "u", "n", "scores", "ranks")}
        return cls(n, scores, ranks, SCORE, u, extra or None)


def check_coverage(coverage) -> float:
    try:
        c = float(coverage)
    except (TypeError, ValueError):
        raise InputError(f"coverage must be a number in (0, 1) such as 0.9, got {coverage!r}") from None
    if not 0.0 < c < 1.0:
        raise InputError(f"coverage must be in (0, 1) such as 0.9, got {coverage!r}")
    return c


# =========================================================================== regions


@dataclass
class Region:
    """A prediction region of one image: finest ``cells`` (ids) and ``index`` (classes),
    most probable first, their total joint probability ``mass`` and ``area_km2``.
    ``source``: ``conformal`` (with ``coverage`` and ``threshold``) or ``kept`` (the cells
    the keep rules kept)."""

    source: str
    cells: list[str]
    index: list[int]
    mass: float
    area_km2: float
    coverage: float | None = None
    threshold: float | None = None

    def to_dict(self) -> dict:
        d = {"source": self.source, "n_cells": len(self.cells), "area_km2": round(self.area_km2, 3),
             "mass": round(self.mass, 6), "cells": list(self.cells)}
        if self.coverage is not None:
            d.update(coverage=self.coverage,
                     threshold=None if not math.isfinite(self.threshold) else round(self.threshold, 6))
        return d


def cells_area_km2(keys, level: int) -> float:
    """The total area in km² of cells (keys of ``level``)."""
    keys = np.asarray(keys, dtype=np.int64)
    return float(grid.key_areas_km2(keys, level).sum()) if keys.size else 0.0


def region_stats(logp: torch.Tensor, targets, tau: float, areas: np.ndarray, u: float = APS_U,
                 chunk: int = CHUNK) -> dict:
    """Per row (numpy arrays): ``covered`` (the target is in the region), ``cells`` (region
    size) and ``area_km2`` (its area; ``areas``: (C,) km² of each finest class)."""
    t = np.asarray(targets, dtype=np.int64)
    areas_t = torch.as_tensor(np.asarray(areas, dtype=np.float64))
    covered, sizes, area = [], [], []
    for i in range(0, logp.shape[0], chunk):
        lp = logp[i:i + chunk]
        order, size = region_prefix(lp, tau, u)
        cum = areas_t[order].cumsum(1)
        area.append(cum.gather(1, (size - 1)[:, None])[:, 0].numpy())
        sizes.append(size.numpy())
        tt = torch.as_tensor(t[i:i + chunk])
        pos = torch.where(order == tt.clamp(min=0)[:, None])[1] if lp.shape[0] else torch.zeros(0, dtype=torch.long)
        covered.append(((tt >= 0) & (pos < size)).numpy() if lp.shape[0] else np.zeros(0, bool))
    if not covered:
        return {"covered": np.zeros(0, bool), "cells": np.zeros(0, np.int64), "area_km2": np.zeros(0)}
    return {"covered": np.concatenate(covered), "cells": np.concatenate(sizes), "area_km2": np.concatenate(area)}


def summarise(stats: dict, threshold: float) -> dict:
    """The eval.json entry of one coverage level."""
    n = int(stats["covered"].size)
    return {"coverage": float(stats["covered"].mean()) if n else None,
            "mean_cells": float(stats["cells"].mean()) if n else None,
            "median_cells": float(np.median(stats["cells"])) if n else None,
            "mean_area_km2": float(stats["area_km2"].mean()) if n else None,
            "median_area_km2": float(np.median(stats["area_km2"])) if n else None,
            "threshold": threshold if math.isfinite(threshold) else None, "n": n}


# =========================================================================== abstention


def abstention_curve(conf, distances_km, shares: Sequence[float] = SHARES,
                     km: Sequence[int] = ABSTAIN_KM) -> list[dict]:
    """Accuracy when answering only the most confident images: for each share s, the
    ceil(s * N) images of highest ``conf`` (ties: the earlier first), ``n``, the lowest
    confidence answered (``min_confidence``, the threshold to pass to ``--abstain``) and
    ``acc_<t>km``: the share of them whose guess is within t km.

    >>> abstention_curve([0.9, 0.1], [10.0, 5000.0], shares=(0.5, 1.0), km=(25,))
    [{'share': 0.5, 'n': 1, 'min_confidence': 0.9, 'acc_25km': 1.0}, {'share': 1.0, 'n': 2, 'min_confidence': 0.1, 'acc_25km': 0.5}]
    """
    c = np.asarray(conf, dtype=np.float64)
    d = np.asarray(distances_km, dtype=np.float64)
    order = np.argsort(-c, kind="stable")
    out = []
    for s in shares:
        k = min(c.size, math.ceil(float(s) * c.size - 1e-9))
        row = {"share": float(s), "n": int(k), "min_confidence": float(c[order[k - 1]]) if k else None}
        sel = d[order[:k]]
        for t in km:
            row[f"acc_{t}km"] = float((sel <= t).mean()) if k else None
        out.append(row)
    return out


# =========================================================================== recall vs area

#: Points of eval.json's ``recall_area`` curve (log-spaced areas).
RECALL_AREA_POINTS = 30


def truth_areas(logp: torch.Tensor, targets, areas) -> np.ndarray:
    """(B,) km² searched before the truth is found: the summed areas of the finest cells
    ranked above each row's true class by joint probability, plus its own (ties with
    the truth count after it); +inf when the target is no class or has probability 0.

    >>> lp = torch.tensor([[0.5, 0.3, 0.2]]).log()
    >>> truth_areas(lp, [1], [10.0, 20.0, 40.0]).tolist()
    [30.0]
    """
    t = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
    a = torch.as_tensor(np.asarray(areas, dtype=np.float64))
    if not logp.shape[0]:
        return np.zeros(0)
    c = logp.shape[1]
    ok = (t >= 0) & (t < c)
    safe = t.clamp(0, max(c - 1, 0))
    ly = logp.gather(1, safe[:, None])  # (B, 1)
    before = (logp > ly).to(torch.float64) @ a  # (B,)
    out = before + a[safe]
    out = torch.where(ok & torch.isfinite(ly[:, 0]), out, torch.full_like(out, float("inf")))
    return out.numpy()


def recall_area_curve(truth_area, lo: float, hi: float, points: int = RECALL_AREA_POINTS) -> list[dict]:
    """Recall against area: at ``points`` log-spaced areas from ``lo`` to ``hi`` km² (the
    smallest cell, the whole grid), the share of rows whose truth is inside the top-ranked
    cells covering that area (``truth_area <= area``).

    >>> recall_area_curve([1.0, 10.0, float("inf")], 1.0, 100.0, points=3)
    [{'area_km2': 1.0, 'recall': 0.333333}, {'area_km2': 10.0, 'recall': 0.666667}, {'area_km2': 100.0, 'recall': 0.666667}]
    """
    t = np.asarray(truth_area, dtype=np.float64)
    lo, hi = float(lo), float(max(hi, lo))
    grid_ = np.geomspace(lo, hi, max(2, int(points))) if hi > lo else np.array([lo])
    n = t.size
    # a float's last bits must not drop a truth at exactly the grid's end
    return [{"area_km2": round(float(a), 6 if a < 1 else 1),
             "recall": round(float((t <= a * (1 + 1e-9)).mean()), 6) if n else None} for a in grid_]
