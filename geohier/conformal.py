"""Prediction regions with a coverage guarantee (split conformal prediction) and abstention.

**The probabilities.** Every finest class gets its *hierarchical joint probability*: the
product, down the levels, of each level's probability of the class's ancestor *given its
parent* (a softmax among siblings, after temperature scaling; ``log_joint``). Unlike the
keep rules' ``joint`` (``geohier.combine``, which only looks at the kept paths), this is a
distribution over ALL finest classes: it sums to 1 whatever a keep rule would keep.

**What a region is made of, and what "covered" means: the partition** (``Partition``). A
fixed-level hierarchy drops the cells with too few images (on the demo world 23% of the
test images are in no finest class), so a set of finest classes can never hold those
images: scored on the finest classes alone they score +inf, and at 0.8 the threshold
itself is +inf (every region is every class) while the coverage stays at the labelled
share. But a region is a set of *places* and the truth is a *point*, so the guarantee is
defined geographically, over something every image has: the regions are made of
*nodes* that tile the classes' cells: every finest class's cell, and for every class of a
coarser level its *rest*, the cell less its class sub-cells at the next level (where the
dropped sub-cells lie). An image is covered when its point is inside its region, i.e.
when its node (its finest class, else the rest of its deepest class) is in the region;
calibration uses the same definition (the score of a val image is the APS mass needed
until the region holds its node). The heads only tell class sub-cells apart, so a rest's
probability is its class's joint probability times the class's share of images outside
its class sub-cells (from the hierarchy's image counts, the data every class was drawn
from; the same for val and test, so exchangeability is untouched), the sub-cells sharing
the remainder. With adaptive cells every image has a finest class, every rest is empty
and the nodes are the finest classes: nothing changes. An image outside every first-level
class scores +inf, and the quantile counts it honestly: it is never covered.

**The score: adaptive prediction sets (APS, Romano, Sesia & Candès 2020).** Rank an image's
nodes by probability; the score of node y is the probability mass of the nodes ranked
above it plus half its own: ``s(x, y) = sum_{p_j > p_y} p_j + u * p_y`` with ``u = 1/2``
(``APS_U``, fixed rather than random, so that the same photo always gets the same region;
any fixed score keeps the guarantee). The region at threshold tau is the prefix of the
ranking whose scores are <= tau (and never less than the top node). Why APS rather than
"every class with p >= t": the region grows until it holds a fixed share of the image's
own probability mass, so its size *adapts to how unsure the model is about this image*:
one cell for a photo of a landmark, a country's worth of cells for an ambiguous road. A
probability cut-off gives every image the same per-class bar and undercovers the hard
images, whose mass is spread over many small probabilities.

**Calibration** (``Conformal.fit``): the scores of the run's val images (after temperature
scaling). Splits are dealt by *place groups* (``geohier.splits``: a capture sequence, else
a ~1 km bucket), so val and test are exchangeable as groups, not as images: photos of one
place share its difficulty, and the classic image quantile (each of n images and +inf
weighing 1/(n + 1)) has no finite-sample guarantee for them. So the images are weighed by
group (``method="groups"``, hierarchical conformal prediction, Lee, Barber & Willett 2023):
each of the K val groups weighs 1/(K + 1), shared equally by its images, +inf weighs
1/(K + 1), and the threshold of coverage 1 - alpha is the smallest score whose weight up
to it reaches 1 - alpha. Then for a random photo of a new place, P(its point is in its
region) >= 1 - alpha, marginally (each place counting once: ``group_coverage``; the share
of test *images* covered weighs the places by their photos and may differ where big
places are harder or easier). Val is the right calibration set: it is drawn exactly as
test is (groups dealt at random), so "a random half of val drawn like test" would be val
again, and test must stay untouched. What a by-group deal does bring is *variance*: with
~120 groups a split's coverage strays by several points from one deal to the next
(``summarise``'s standard errors say how far), so ``evaluate`` also reports a cross-fit
(``crossfit``: the test split's groups dealt into halves, one calibrating, the other
measured, both ways, over random halvings), the coverage the method gives when
calibration and test are drawn alike, free of the luck of the one val/test deal.
``method="images"`` (every image alike) is kept for calibrations without groups (an
external CSV) and those stored before groups. Storing the sorted scores and their
cumulative weights lets any 1 - alpha be asked for at predict time; above ``MAX_STORED``
scores a subset is stored and the next stored one up is used (a threshold at least as
high: still valid, slightly larger regions).

**Abstention.** An image's confidence is its top finest joint probability
(``confidence``); ``abstention_curve`` ranks images by it and reports the accuracy of the
most confident share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from geohier import grid
from geohier.errors import InputError

SCORE = "aps"
APS_U = 0.5
#: What a calibration's scores rank: the partition's nodes (``Partition``), not the finest
#: classes alone (calibrations written before this field ranked those).
SPACE = "partition"
#: How calibration images are weighed (``Conformal``), and how ``evaluate`` weighs them.
METHODS = ("groups", "images")
DEFAULT_METHOD = "groups"
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
        cond = _sibling_log_softmax(z, tree.parents[lv], tree.num_classes[tree.levels[i - 1]])
        out = out.gather(1, par.expand_as(z)) + cond
    return out


def _sibling_log_softmax(z: torch.Tensor, parents: np.ndarray, n_prev: int) -> torch.Tensor:
    """(B, C) log-softmax of ``z`` among the classes of each parent (-inf stays -inf)."""
    par = torch.as_tensor(parents, dtype=torch.long)
    idx = par.expand_as(z)
    m = torch.full((z.shape[0], n_prev), float("-inf")).scatter_reduce(1, idx, z, "amax", include_self=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.zeros((z.shape[0], n_prev)).scatter_add(1, idx, (z - m.gather(1, idx)).exp())
    lse = s.log() + m  # (B, C_prev) log-sum-exp of each parent's children
    return torch.where(torch.isfinite(z), z - lse.gather(1, idx), torch.full_like(z, float("-inf")))


@dataclass
class Partition:
    """The label space of the coverage guarantee: *nodes* that tile every class cell.

    A finest class is a node (its cell). Every class of a coarser level has one more node,
    its *rest*: the part of its cell outside its class sub-cells at the next level (where
    a fixed-level hierarchy dropped the sub-cells with too few images). The nodes are
    disjoint and together cover the first level's class cells, so every image whose point
    is in a class cell at all is in exactly one node: its finest class, else the rest of
    its deepest class (``targets``). Node indices: the finest classes first (index =
    class), then the rests of each coarser level, from ``offsets[level]`` on.

    ``rest[level]`` (C,) is each class's share of its images that are in its rest (the
    hierarchy's image counts: ``from_counts``); the model's heads only tell the class
    sub-cells apart, so the probability of a node is the hierarchical joint with this
    share taken out at every level: p(rest of c) = P(c) r_c and
    p(child k of c) = P(c) (1 - r_c) p(k | c). With adaptive cells every image has a
    finest class, every share is 0 and the node probabilities are ``log_joint``'s.
    """

    tree: object
    rest: dict[int, np.ndarray]

    def __post_init__(self):
        self.levels = tuple(self.tree.levels)
        self.finest = self.levels[-1]
        self.offsets: dict[int, int] = {}
        n = int(self.tree.num_classes[self.finest])
        for lv in self.levels[:-1]:
            self.offsets[lv] = n
            n += int(self.tree.num_classes[lv])
        self.size = n

    @classmethod
    def from_counts(cls, tree, counts: Mapping[int, np.ndarray]) -> Partition:
        """Rest shares from the classes' image counts: 1 - (images of its class sub-cells)
        / (its images); a class without images gets 1 when it has no sub-cell, else 0."""
        rest = {}
        for prev, lv in zip(tree.levels, tree.levels[1:], strict=False):
            n_prev = np.asarray(counts[prev], dtype=np.float64)
            inside = np.bincount(np.asarray(tree.parents[lv], dtype=np.int64),
                                 weights=np.asarray(counts[lv], dtype=np.float64), minlength=n_prev.size)
            has_child = np.bincount(np.asarray(tree.parents[lv], dtype=np.int64), minlength=n_prev.size) > 0
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.where(n_prev > 0, (n_prev - inside) / np.where(n_prev > 0, n_prev, 1.0),
                             (~has_child).astype(np.float64))
            rest[prev] = np.clip(r, 0.0, 1.0)
        return cls(tree, rest)

    @classmethod
    def plain(cls, tree) -> Partition:
        """Without image counts: a class's rest is its whole cell when it has no class
        sub-cell, else empty."""
        rest = {prev: (np.bincount(np.asarray(tree.parents[lv], dtype=np.int64),
                                   minlength=tree.num_classes[prev]) == 0).astype(np.float64)
                for prev, lv in zip(tree.levels, tree.levels[1:], strict=False)}
        return cls(tree, rest)

    @property
    def has_rest(self) -> bool:
        """Whether any rest can hold probability (a fixed-level hierarchy that dropped cells)."""
        return any(bool((r > 0).any()) for r in self.rest.values())

    def node(self, index: int) -> tuple[int, int]:
        """(level, class) of a node: the finest level for a finest class, else the class
        whose rest it is."""
        index = int(index)
        if index < self.tree.num_classes[self.finest]:
            return self.finest, index
        for lv in reversed(self.levels[:-1]):
            if index >= self.offsets[lv]:
                return lv, index - self.offsets[lv]
        raise IndexError(index)

    def targets(self, labels: Mapping[int, np.ndarray] | np.ndarray) -> np.ndarray:
        """(B,) the node of each image from its class labels per level (< 0 = no class):
        its finest class, else the rest of its deepest class; -1 when it has no class at
        the first level. A bare array is the finest labels alone (-1 where none)."""
        if not isinstance(labels, Mapping):
            t = np.asarray(labels, dtype=np.int64).ravel()
            return np.where(t >= 0, t, -1)
        t = np.asarray(labels[self.finest], dtype=np.int64).ravel()
        out = np.where(t >= 0, t, -1)
        for lv in reversed(self.levels[:-1]):
            y = np.asarray(labels[lv], dtype=np.int64).ravel()
            fill = (out < 0) & (y >= 0)
            out[fill] = self.offsets[lv] + y[fill]
        return out

    def areas(self, class_areas: Mapping[int, np.ndarray]) -> np.ndarray:
        """(N,) km² of every node: a finest class's cell; a rest's cell less its class
        sub-cells (``class_areas``: {level: (C,) km²})."""
        parts = [np.asarray(class_areas[self.finest], dtype=np.float64)]
        for prev, lv in zip(self.levels, self.levels[1:], strict=False):
            a = np.asarray(class_areas[prev], dtype=np.float64)
            inside = np.bincount(np.asarray(self.tree.parents[lv], dtype=np.int64),
                                 weights=np.asarray(class_areas[lv], dtype=np.float64), minlength=a.size)
            parts.append(np.clip(a - inside, 0.0, None))
        return np.concatenate(parts)

    def log_probs(self, logits: Mapping[int, torch.Tensor], temperatures: Mapping | None = None,
                  allowed: Mapping[int, np.ndarray] | None = None) -> torch.Tensor:
        """(B, N) log probability of every node (temperatures applied; classes outside
        ``allowed`` and their rests get -inf, the rest renormalised). Rows sum to 1.

        >>> from geohier.combine import Tree
        >>> part = Partition(Tree.from_parents([1, 2], {2: [0, 0]}), {1: np.array([0.5, 1.0])})
        >>> lp = part.log_probs({1: torch.tensor([[0.0, 0.0]]), 2: torch.tensor([[0.0, 0.0]])})
        >>> [round(v, 3) for v in lp.exp()[0].tolist()]  # class 0's two sub-cells and rest, class 1's rest
        [0.125, 0.125, 0.25, 0.5]
        """
        out, rests = None, []
        for i, lv in enumerate(self.levels):
            z = _scaled(logits[lv], temperatures, lv).cpu()
            if allowed is not None and lv in allowed:
                z = z.masked_fill(~torch.as_tensor(np.asarray(allowed[lv], bool)), float("-inf"))
            if i == 0:
                out = torch.log_softmax(z, dim=1)
                continue
            prev = self.levels[i - 1]
            r = torch.as_tensor(self.rest[prev], dtype=torch.float32)
            rests.append(out + r.log())
            cond = _sibling_log_softmax(z, self.tree.parents[lv], self.tree.num_classes[prev])
            par = torch.as_tensor(self.tree.parents[lv], dtype=torch.long)
            out = (out + torch.log1p(-r)).gather(1, par.expand_as(z)) + cond
        lp = torch.cat([out, *rests], dim=1)
        total = torch.logsumexp(lp, dim=1, keepdim=True)  # 1 unless ``allowed`` emptied a class's sub-cells
        return lp - torch.where(torch.isfinite(total), total, torch.zeros_like(total))


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
    images and ``cum``, at each of them, the calibration weight of every score up to it
    (the rest of the weight, up to 1, sits at +inf: the test point's own share and the
    calibration images that scored +inf). ``n`` images in ``groups`` place groups.

    ``method``: ``groups`` (each group weighs 1/(K + 1), shared equally by its images,
    +inf weighs 1/(K + 1); Lee, Barber & Willett 2023) or ``images`` (each image and +inf
    weigh 1/(n + 1): the classic quantile). Only some order statistics are stored beyond
    ``MAX_STORED`` scores (the next stored one up answers: a threshold at least as high).

    Why ``groups`` holds for a random photo of a new place: weigh all K + 1 groups (the
    new one included) alike and let q be the 1 - alpha quantile of that weighted CDF; the
    groups' mean covered share at q is then >= 1 - alpha and, the groups being
    exchangeable, so is the new group's in expectation, which is the chance its random
    photo is covered. The new group's scores are unknown, so its weight sits at +inf:
    a quantile at least q."""

    n: int
    scores: np.ndarray
    cum: np.ndarray
    method: str = "images"
    groups: int | None = None
    score: str = SCORE
    u: float = APS_U
    extra: dict | None = None

    @classmethod
    def fit(cls, scores, groups=None, max_stored: int = MAX_STORED, **extra) -> Conformal:
        """The calibration of ``scores`` (one per calibration image, +inf allowed);
        ``groups``: each image's place group (any hashable labels), or None to weigh
        every image alike."""
        s = np.asarray(scores, dtype=np.float64).ravel()
        if not s.size:
            raise InputError("conformal calibration needs at least one image")
        if groups is None:
            w = np.full(s.size, 1.0 / (s.size + 1))
            method, k = "images", None
        else:
            g = np.asarray(groups, dtype=object).ravel()
            if g.size != s.size:
                raise InputError(f"{g.size} group labels for {s.size} calibration scores")
            codes, uniq = _factorize(g)
            k = int(uniq)
            size = np.bincount(codes, minlength=k)
            w = 1.0 / ((k + 1) * size[codes])
            method = "groups"
        finite = np.isfinite(s)
        order = np.argsort(s[finite], kind="stable")
        sorted_s = s[finite][order]
        if groups is None:  # exact: the k-th smallest weighs k / (n + 1)
            cum = np.arange(1, sorted_s.size + 1, dtype=np.float64) / (s.size + 1)
        else:
            cum = np.cumsum(w[finite][order])
        if sorted_s.size > max_stored:
            keep = np.unique(np.linspace(0, sorted_s.size - 1, max_stored).round().astype(np.int64))
            sorted_s, cum = sorted_s[keep], cum[keep]
        return cls(int(s.size), sorted_s, cum, method, k, extra=dict(extra) or None)

    def threshold(self, coverage: float) -> float:
        """The score threshold of coverage 1 - alpha: the smallest score whose weight up to
        it reaches 1 - alpha (+inf when none does). With ``images`` it is the
        ceil((n + 1)(1 - alpha))-th smallest calibration score."""
        coverage = check_coverage(coverage)
        j = int(np.searchsorted(self.cum, coverage - 1e-9, side="left"))
        return float(self.scores[j]) if j < self.scores.size else float("inf")

    def to_dict(self) -> dict:
        d = {"score": self.score, "space": SPACE, "u": self.u, "n": self.n, "method": self.method,
             "groups": self.groups, "scores": [float(f"{v:.7g}") for v in self.scores.tolist()],
             # rounded down: a stored weight never claims more than it has (a threshold never lower)
             "cum": [math.floor(v * 1e12) / 1e12 for v in self.cum.tolist()]}
        d.update(self.extra or {})
        return d

    @classmethod
    def from_dict(cls, d) -> Conformal | None:
        """The calibration in meta.json's ``conformal`` (None when absent or unusable). One
        written before weights were stored (no ``cum``) is read as ``images``, its
        ``ranks`` (1-based, when only some order statistics were kept) giving the weights;
        ``extra["space"]`` is then missing (see ``Predictor.check_conformal``)."""
        if not isinstance(d, Mapping) or d.get("score") != SCORE:
            return None
        try:
            n = int(d["n"])
            scores = np.asarray(d["scores"], dtype=np.float64)
            u = float(d.get("u", APS_U))
            if d.get("cum") is not None:
                cum = np.asarray(d["cum"], dtype=np.float64)
            else:
                ranks = np.asarray(d["ranks"], dtype=np.int64) if d.get("ranks") is not None \
                    else np.arange(1, scores.size + 1)
                cum = ranks / (n + 1.0)
            method = str(d.get("method") or "images")
            groups = int(d["groups"]) if d.get("groups") is not None else None
        except (KeyError, TypeError, ValueError):
            return None
        if n < 1 or scores.ndim != 1 or scores.size > n or not np.isfinite(scores).all() \
                or cum.shape != scores.shape or not np.isfinite(cum).all() or np.any(np.diff(cum) < 0) \
                or method not in METHODS:
            return None
        skip = ("score", "u", "n", "scores", "ranks", "cum", "method", "groups")
        extra = {k: v for k, v in d.items() if k not in skip}
        return cls(n, scores, cum, method, groups, SCORE, u, extra or None)


def _factorize(values) -> tuple[np.ndarray, int]:
    """(codes, number of distinct values) of any hashable labels, in order of appearance."""
    seen: dict = {}
    codes = np.fromiter((seen.setdefault(v, len(seen)) for v in values), dtype=np.int64, count=len(values))
    return codes, len(seen)


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
    most probable first, and ``rest``: coarser cells of which the region holds the *rest*
    (the cell less its class sub-cells ``rest_minus``, ``Partition``); their total
    probability ``mass`` and ``area_km2``. ``source``: ``conformal`` (with ``coverage`` and
    ``threshold``) or ``kept`` (the cells the keep rules kept). ``rest_ranks``: each rest's
    1-based rank among all the region's nodes (none given: after the finest cells)."""

    source: str
    cells: list[str]
    index: list[int]
    mass: float
    area_km2: float
    coverage: float | None = None
    threshold: float | None = None
    rest: list[str] = field(default_factory=list)
    rest_minus: list[list[str]] = field(default_factory=list)
    rest_ranks: list[int] = field(default_factory=list)

    @property
    def n_cells(self) -> int:
        """Finest cells and rests."""
        return len(self.cells) + len(self.rest)

    def ranks(self) -> tuple[list[int], list[int]]:
        """The 1-based rank of each finest cell and of each rest among the region's nodes,
        most probable first.

        >>> Region("conformal", ["0/1", "0/2"], [1, 2], 0.9, 1.0, rest=["3"], rest_minus=[["3/0"]],
        ...        rest_ranks=[2]).ranks()
        ([1, 3], [2])
        """
        rest = list(self.rest_ranks) or list(range(len(self.cells) + 1, self.n_cells + 1))
        taken = set(rest)
        return [r for r in range(1, self.n_cells + 1) if r not in taken], rest

    def ranked(self) -> list[tuple[str, bool]]:
        """The region's nodes most probable first: ``(cell id, whether it is a rest)``."""
        cell_ranks, rest_ranks = self.ranks()
        out = sorted([(r, c, False) for r, c in zip(cell_ranks, self.cells, strict=True)]
                     + [(r, c, True) for r, c in zip(rest_ranks, self.rest, strict=True)])
        return [(c, is_rest) for _, c, is_rest in out]

    def to_dict(self) -> dict:
        d = {"source": self.source, "n_cells": self.n_cells, "area_km2": round(self.area_km2, 3),
             "mass": round(self.mass, 6), "cells": list(self.cells)}
        if self.rest:  # only when there are: the plain shape stays as it was
            d["rest_cells"] = [{"cell": c, "minus": list(m), "rank": r}
                               for c, m, r in zip(self.rest, self.rest_minus, self.ranks()[1], strict=True)]
        if self.coverage is not None:
            d.update(coverage=self.coverage,
                     threshold=None if not math.isfinite(self.threshold) else round(self.threshold, 6))
        return d


def cells_area_km2(keys, level: int) -> float:
    """The total area in km² of cells (keys of ``level``)."""
    keys = np.asarray(keys, dtype=np.int64)
    return float(grid.key_areas_km2(keys, level).sum()) if keys.size else 0.0


def _ring(w: float, s: float, e: float, n: float) -> list:
    return [[w, s], [e, s], [e, n], [w, n], [w, s]]


def region_geojson(region: Region, level: int | None = None) -> dict:
    """A GeoJSON FeatureCollection of a region for a map layer: one rectangle per finest
    cell (most probable first; properties ``cell`` and ``rank``, its rank among all the
    region's nodes), then one per rest, its coarser cell with its class sub-cells as holes
    (properties ``cell``, ``rest``: true, ``rank``). ``level`` is unused (cells of any depth
    name themselves)."""
    feats = []
    cell_ranks, rest_ranks = region.ranks()
    if region.cells:
        keys, depths = grid.ids_to_depth_keys(region.cells)  # cells of any depth (adaptive levels)
        w, s, e, n = grid.depth_bounds(keys, depths)
        feats += [{"type": "Feature", "properties": {"cell": c, "rank": rank},
                   "geometry": {"type": "Polygon", "coordinates": [_ring(*b)]}}
                  for rank, c, *b in zip(cell_ranks, region.cells, w.tolist(), s.tolist(), e.tolist(), n.tolist(),
                                         strict=True)]
    for c, minus, rank in zip(region.rest, region.rest_minus, rest_ranks, strict=True):
        keys, depths = grid.ids_to_depth_keys([c, *minus])
        w, s, e, n = (v.tolist() for v in grid.depth_bounds(keys, depths))
        rings = [_ring(w[0], s[0], e[0], n[0])] + [_ring(*b)[::-1] for b in zip(w[1:], s[1:], e[1:], n[1:],
                                                                                  strict=True)]
        feats.append({"type": "Feature", "properties": {"cell": c, "rest": True, "rank": rank},
                      "geometry": {"type": "Polygon", "coordinates": rings}})
    return {"type": "FeatureCollection", "features": feats}


def region_stats(logp: torch.Tensor, targets, tau: float, areas: np.ndarray, u: float = APS_U,
                 chunk: int = CHUNK) -> dict:
    """Per row (numpy arrays): ``covered`` (the target is in the region), ``cells`` (region
    size) and ``area_km2`` (its area; ``areas``: (C,) km² of each class, or of each
    ``Partition`` node when ``logp`` is over the nodes)."""
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


def group_coverage(covered, groups) -> tuple[float | None, float | None, int]:
    """(mean over place groups of each group's covered share, the standard error of the
    images' covered share with the groups as clusters, number of groups)."""
    c = np.asarray(covered, dtype=np.float64).ravel()
    if not c.size:
        return None, None, 0
    codes, k = _factorize(np.asarray(groups, dtype=object).ravel())
    size = np.bincount(codes, minlength=k)
    per = np.bincount(codes, c, minlength=k) / size
    resid = np.bincount(codes, c - c.mean(), minlength=k)  # per group: covered minus its share at the mean
    se = float(np.sqrt((resid ** 2).sum() * k / max(k - 1, 1)) / c.size) if k > 1 else None
    return float(per.mean()), se, int(k)


def group_coverage_se(covered, groups) -> float | None:
    """The standard error of ``group_coverage``'s mean of the groups' shares."""
    c = np.asarray(covered, dtype=np.float64).ravel()
    codes, k = _factorize(np.asarray(groups, dtype=object).ravel())
    if k < 2:
        return None
    per = np.bincount(codes, c, minlength=k) / np.bincount(codes, minlength=k)
    return float(per.std(ddof=1) / math.sqrt(k))


def summarise(stats: dict, threshold: float, groups=None) -> dict:
    """The eval.json entry of one coverage level; with the images' place ``groups`` also
    ``coverage_se`` (standard error of ``coverage``, the groups as clusters),
    ``group_coverage`` (each group's covered share, averaged: what the ``groups``
    calibration guarantees), ``group_coverage_se`` and ``groups``."""
    n = int(stats["covered"].size)
    out = {"coverage": float(stats["covered"].mean()) if n else None,
           "mean_cells": float(stats["cells"].mean()) if n else None,
           "median_cells": float(np.median(stats["cells"])) if n else None,
           "mean_area_km2": float(stats["area_km2"].mean()) if n else None,
           "median_area_km2": float(np.median(stats["area_km2"])) if n else None,
           "threshold": threshold if math.isfinite(threshold) else None, "n": n}
    if groups is not None:
        gc, se, k = group_coverage(stats["covered"], groups)
        out.update(coverage_se=se, group_coverage=gc, group_coverage_se=group_coverage_se(stats["covered"], groups),
                   groups=k)
    return out


#: Random halvings of the test split's place groups in the cross-fit (``crossfit``).
CROSSFIT_REPEATS = 50


def crossfit(scores, top, groups, coverages=COVERAGES, method: str = "groups",
             repeats: int = CROSSFIT_REPEATS, seed: int = 0) -> dict:
    """Coverage with calibration and test drawn alike: the place groups of one split are
    dealt at random into two halves, one calibrates (``Conformal.fit`` with ``method``)
    and the other is measured, then the other way round, ``repeats`` times. Per coverage
    ``{"coverage", "group_coverage", "spread"}``: the mean over the 2 x ``repeats``
    measurements of the images' covered share and of the groups' mean covered share, and
    the standard deviation of the former (how far one draw of that size strays).

    ``scores``: each image's APS score; ``top``: whether its true node is its most probable
    one (always in the region). An image is covered when ``score <= threshold`` or ``top``.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    t = np.asarray(top, dtype=bool).ravel()
    codes, k = _factorize(np.asarray(groups, dtype=object).ravel())
    out = {f"{c:g}": {"coverage": None, "group_coverage": None, "spread": None} for c in coverages}
    if k < 2:
        return out
    rng = np.random.default_rng(seed)
    got: dict[float, tuple[list, list]] = {c: ([], []) for c in coverages}
    for _ in range(int(repeats)):
        half = np.zeros(k, dtype=bool)
        half[rng.permutation(k)[:k // 2]] = True
        a = half[codes]
        for cal, test in ((a, ~a), (~a, a)):
            fit = Conformal.fit(s[cal], codes[cal] if method == "groups" else None)
            for c in coverages:
                covered = (s[test] <= fit.threshold(c)) | t[test]
                got[c][0].append(covered.mean())
                got[c][1].append(group_coverage(covered, codes[test])[0])
    for c, (img, grp) in got.items():
        out[f"{c:g}"] = {"coverage": float(np.mean(img)), "group_coverage": float(np.mean(grp)),
                         "spread": float(np.std(img))}
    return out


def top_nodes(logp: torch.Tensor, targets) -> np.ndarray:
    """(B,) whether each row's target is its most probable class (with probability > 0)."""
    t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if not logp.shape[0]:
        return np.zeros(0, dtype=bool)
    best = logp.argmax(dim=1)
    ok = (t >= 0) & (t == best) & torch.isfinite(logp.max(dim=1).values)
    return ok.numpy()


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
