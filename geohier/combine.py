"""The hierarchical combination: per-level logits -> ranked cells of the finest level.

The combination is done in log space. At the first level the score of a class is its
log-softmax. At every further level only the children of the classes *kept* at the
previous level are candidates; the level's logits are restricted to them (every other
class is masked with -inf before the softmax) and

    score(c) = score(parent(c)) + log_softmax(logits restricted to the candidates)[c]

so a score is the log-probability of a whole path. ``prob`` is the same quantity
normalised over the paths still considered at that level (a softmax of the scores over the
candidates): it is what the keep rules look at and what the user sees. At the first level
it is the plain softmax.

Why not the seed's way: the seed multiplied each child's *logit* by its parent's
probability before a softmax. A logit is not a probability: scaling a negative logit by a
small parent probability pulls it towards 0, i.e. *up*, so the children of an unlikely
parent could outrank those of a likely one. Adding log-probabilities cannot do that
(``tests/test_combine.py`` builds such a case).

What is kept at each level (``KeepRule``, one per level):

- ``adaptive`` (the seed's): k = 1, 2, 3 when the top probability is at least 0.85, 0.65,
  0.40, else ``k_max`` = 6 (thresholds and k_max adjustable);
- ``topk``: a fixed k;
- ``cumulative``: the smallest set whose probabilities reach p (at most ``max_keep``);

then candidates under ``min_prob`` are dropped, except the top one (a level never ends
empty). Classes with no descendant at the finest level can never be an answer and are
masked like the children of a parent that was not kept.

Everything is vectorised over the batch: classes are sorted by cell, so the children of a
class are one contiguous range of indices, and the candidates of a row are the ranges of
its kept classes laid end to end, built with index ops (no Python loop over parents). A
level costs a few passes over (rows x candidates) numbers whatever its number of classes;
big batches are bucketed by how many candidates each row has. ``combine`` is the one
function that the Predictor (``geohier.predictor``), the threshold explorer and the
evaluate command share, so their numbers agree; ``hierarchical_metrics`` scores it.

>>> tree = Tree.from_parents([1, 2], {2: [0, 0, 1, 1]})
>>> logits = {1: torch.tensor([[2.0, 0.0]]), 2: torch.tensor([[0.0, 1.0, 5.0, 5.0]])}
>>> out = combine(logits, tree, KeepRule("topk", top_k=1))
>>> out.index[2].tolist()            # class 1 (child of the kept parent 0), not 2 or 3
[[1]]
"""


from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from geohier import geodesy
from geohier.errors import InputError

RULES = ("adaptive", "topk", "cumulative")
DEFAULT_RULE = "adaptive"
DEFAULT_THRESHOLDS = (0.85, 0.65, 0.40)
DEFAULT_K_MAX = 6
DEFAULT_TOP_K = 5
DEFAULT_CUMULATIVE = 0.9
DEFAULT_MAX_KEEP = 16
#: No rule keeps more classes than this at one level (bounds the candidate tables).
MAX_KEEP = 256


# =========================================================================== keep rules


@dataclass(frozen=True)
class KeepRule:
    """Which classes of one level are kept (and passed on to the next level).

    >>> KeepRule().describe()
    'adaptive (k=1/2/3 at p>=0.85/0.65/0.4, else 6)'
    >>> KeepRule("topk", top_k=3, min_prob=0.05).describe()
    'top-3, p>=0.05'
    """

    rule: str = DEFAULT_RULE
    top_k: int = DEFAULT_TOP_K
    cumulative: float = DEFAULT_CUMULATIVE
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    k_max: int = DEFAULT_K_MAX
    min_prob: float = 0.0
    max_keep: int = DEFAULT_MAX_KEEP

    def __post_init__(self):
        if self.rule not in RULES:
            raise InputError(f"unknown rule {self.rule!r}; choose one of: {', '.join(RULES)}")
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        for name in ("top_k", "k_max", "max_keep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= int(v) <= MAX_KEEP:
                raise InputError(f"{name.replace('_', '-')} must be an integer between 1 and {MAX_KEEP}, got {v!r}")
            object.__setattr__(self, name, int(v))
        if not (isinstance(self.cumulative, (int, float)) and 0.0 < float(self.cumulative) <= 1.0):
            raise InputError(f"cumulative probability must be in (0, 1], got {self.cumulative!r}")
        if not (isinstance(self.min_prob, (int, float)) and 0.0 <= float(self.min_prob) < 1.0):
            raise InputError(f"min-prob must be in [0, 1), got {self.min_prob!r}")
        th = self.thresholds
        if not th or any(not 0.0 < t <= 1.0 for t in th) or any(b >= a for a, b in zip(th, th[1:], strict=False)):
            raise InputError("adaptive thresholds must be decreasing probabilities in (0, 1] such as "
                             f"0.85,0.65,0.40, got {list(th)}")
        object.__setattr__(self, "cumulative", float(self.cumulative))
        object.__setattr__(self, "min_prob", float(self.min_prob))

    @property
    def limit(self) -> int:
        """The most classes this rule can keep at one level."""
        if self.rule == "topk":
            return self.top_k
        if self.rule == "adaptive":
            return max(self.k_max, len(self.thresholds))
        return self.max_keep

    def keep(self, probs: torch.Tensor) -> torch.Tensor:
        """Kept mask (B, n) of probabilities already sorted in descending order (B, n).

        >>> KeepRule("cumulative", cumulative=0.8).keep(torch.tensor([[0.5, 0.3, 0.2]])).tolist()
        [[True, True, False]]
        """
        n = probs.shape[1]
        ranks = torch.arange(n, device=probs.device)[None, :]  # (1, n)
        if self.rule == "topk":
            keep = (ranks < self.top_k).expand_as(probs)
        elif self.rule == "adaptive":
            top = probs[:, 0]
            k = torch.full_like(top, float(self.k_max))
            # Highest threshold last, so it wins: k = 1 when top >= 0.85, else 2 when >= 0.65 ...
            for i in range(len(self.thresholds) - 1, -1, -1):
                k = torch.where(top >= self.thresholds[i], torch.full_like(k, i + 1.0), k)
            keep = ranks < k[:, None]
        else:
            before = torch.cumsum(probs, dim=1) - probs  # mass of the better candidates
            keep = before < self.cumulative
        if self.min_prob > 0:
            keep = keep & ((probs >= self.min_prob) | (ranks == 0))
        return keep

    def describe(self) -> str:
        if self.rule == "topk":
            s = f"top-{self.top_k}"
        elif self.rule == "cumulative":
            s = f"cumulative p>={self.cumulative:g}"
        else:
            ks = "/".join(str(i + 1) for i in range(len(self.thresholds)))
            ts = "/".join(f"{t:g}" for t in self.thresholds)
            s = f"adaptive (k={ks} at p>={ts}, else {self.k_max})"
        return s + (f", p>={self.min_prob:g}" if self.min_prob > 0 else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = list(self.thresholds)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> KeepRule:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "thresholds" in known:
            known["thresholds"] = tuple(known["thresholds"])
        return cls(**known)


def parse_thresholds(text: str) -> tuple[float, ...]:
    """``"0.85,0.65,0.40"`` -> (0.85, 0.65, 0.4), validated as a KeepRule would.

    >>> parse_thresholds("0.9, 0.5")
    (0.9, 0.5)
    """
    try:
        values = tuple(float(p) for p in str(text).split(",") if p.strip())
    except ValueError:
        raise InputError(f"adaptive thresholds must be comma-separated probabilities such as "
                         f"0.85,0.65,0.40, got {text!r}") from None
    return KeepRule(thresholds=values).thresholds


def rules_for(levels: Sequence[int], rules: KeepRule | Mapping[int, KeepRule] | None) -> dict[int, KeepRule]:
    """One KeepRule per level: a single rule applies to every level; a mapping may name
    some levels only (the others get the default rule)."""
    if rules is None:
        return {lv: KeepRule() for lv in levels}
    if isinstance(rules, KeepRule):
        return dict.fromkeys(levels, rules)
    out = {}
    for lv in levels:
        r = rules.get(lv, rules.get(str(lv))) if isinstance(rules, Mapping) else None
        out[lv] = r if isinstance(r, KeepRule) else KeepRule.from_dict(r) if isinstance(r, Mapping) else KeepRule()
    return out


# =========================================================================== the tree


@dataclass
class Tree:
    """The parent structure of the predicted levels (``tensors`` holds what ``combine``
    gathers from).

    ``parents[level]``: per class, the index of its parent class at the previous predicted
    level (-1 at the first); non-decreasing, so the children of a class are contiguous.
    ``children[level]``: (C_previous, W) table of each previous class's children at
    ``level`` that can reach the finest level, padded with -1 (for inspection).
    ``alive[level]``: classes with at least one descendant at the finest level.
    """

    levels: tuple[int, ...]
    num_classes: dict[int, int]
    parents: dict[int, np.ndarray]
    alive: dict[int, np.ndarray] = field(default_factory=dict)
    children: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        self.levels = tuple(int(v) for v in self.levels)
        if not self.levels:
            raise InputError("a tree needs at least one level")
        finest = self.levels[-1]
        alive = {finest: np.ones(self.num_classes[finest], dtype=bool)}
        for prev, lv in zip(self.levels[-2::-1], self.levels[:0:-1], strict=False):
            par = self.parents[lv]
            alive[prev] = np.bincount(par[alive[lv]], minlength=self.num_classes[prev]) > 0
        self.alive = alive
        for lv in self.levels[1:]:
            if np.any(np.diff(self.parents[lv]) < 0):
                raise InputError(f"level {lv}'s parent indices must be non-decreasing (classes sorted by cell, "
                                 "so that the children of one class are contiguous)")
        self.children = {}
        for prev, lv in zip(self.levels, self.levels[1:], strict=False):
            par = self.parents[lv]
            idx = np.flatnonzero(alive[lv])  # only children that can reach the finest level
            p = par[idx]
            order = np.argsort(p, kind="stable")
            idx, p = idx[order], p[order]
            n_prev = self.num_classes[prev]
            counts = np.bincount(p, minlength=n_prev)
            width = max(int(counts.max()) if counts.size else 0, 1)
            start = np.concatenate([[0], np.cumsum(counts)[:-1]])
            pos = np.arange(idx.size) - start[p]  # rank of each child within its parent
            table = np.full((n_prev, width), -1, dtype=np.int64)
            table[p, pos] = idx
            self.children[lv] = table
        self._torch: dict = {}

    @classmethod
    def from_parents(cls, levels: Sequence[int], parents: Mapping[int, Sequence[int]],
                     num_classes: Mapping[int, int] | None = None) -> Tree:
        """A tree from parent index arrays (``parents[level]`` for every level but the first).

        >>> Tree.from_parents([1, 2], {2: [0, 0, 1]}).children[2].tolist()
        [[0, 1], [2, -1]]
        """
        levels = tuple(int(v) for v in levels)
        par = {lv: np.asarray(parents[lv], dtype=np.int64) for lv in levels[1:]}
        nc = dict(num_classes or {})
        for prev, lv in zip(levels, levels[1:], strict=False):
            nc.setdefault(lv, int(par[lv].size))
            if prev not in nc:
                nc[prev] = int(par[lv].max()) + 1 if par[lv].size else 0
        if len(levels) == 1 and levels[0] not in nc:
            raise InputError("a one-level tree needs num_classes")
        par[levels[0]] = np.full(nc[levels[0]], -1, dtype=np.int64)
        for prev, lv in zip(levels, levels[1:], strict=False):
            p = par[lv]
            if p.size != nc[lv] or (p.size and (p.min() < 0 or p.max() >= nc[prev])):
                raise InputError(f"level {lv}'s parent indices must be in [0, {nc[prev]})")
        return cls(levels, {lv: int(nc[lv]) for lv in levels}, par)

    @classmethod
    def from_hierarchy(cls, hierarchy, levels: Sequence[int] | None = None) -> Tree:
        """The tree of ``levels`` (default: all) of a ``geohier.hierarchy.Hierarchy``; when
        levels are skipped, parent indices are composed through the skipped ones."""
        levels = tuple(hierarchy.levels) if levels is None else tuple(sorted(int(v) for v in levels))
        missing = [lv for lv in levels if lv not in hierarchy.levels]
        if missing:
            raise InputError(f"level(s) {missing} are not in the hierarchy's levels {list(hierarchy.levels)}")
        parents = {lv: hierarchy.ancestors(lv, prev) for prev, lv in zip(levels, levels[1:], strict=False)}
        return cls.from_parents(levels, parents, hierarchy.num_classes)

    def tensors(self, device) -> dict:
        """What ``combine`` gathers from, on ``device`` (cached): per level after the
        first, ``start`` and ``size`` (C_prev + 1,): the first child and the number of
        children of each previous class (children are contiguous, classes being sorted
        by cell), with an extra last entry (0 children) that a kept index of -1 selects;
        for every level, ``bias`` (C,): 0, or -inf for a class that cannot reach the
        finest level."""
        key = str(device)
        if key not in self._torch:
            t = {"start": {}, "size": {}, "bias": {}}
            for prev, lv in zip(self.levels, self.levels[1:], strict=False):
                par, n_prev = self.parents[lv], self.num_classes[prev]
                start = np.append(np.searchsorted(par, np.arange(n_prev), side="left"), 0)
                size = np.append(np.bincount(par, minlength=n_prev), 0)
                t["start"][lv] = torch.from_numpy(start.astype(np.int64)).to(device)
                t["size"][lv] = torch.from_numpy(size.astype(np.int64)).to(device)
            for lv in self.levels:
                t["bias"][lv] = torch.from_numpy(np.where(self.alive[lv], 0.0, -np.inf).astype(np.float32)).to(device)
            self._torch[key] = t
        return self._torch[key]


# =========================================================================== combination


@dataclass
class Combined:
    """What ``combine`` keeps, per level, as padded (B, K_level) tensors sorted by ``prob``.

    ``index``: class indices (-1 past ``count``); ``prob``: probability among the paths
    considered at that level; ``score``: log-probability of the path (-inf past
    ``count``); ``parent``: the parent's class index at the previous level (-1 at the
    first level and past ``count``); ``count``: (B,) classes kept.
    """

    levels: tuple[int, ...]
    index: dict[int, torch.Tensor]
    prob: dict[int, torch.Tensor]
    score: dict[int, torch.Tensor]
    parent: dict[int, torch.Tensor]
    count: dict[int, torch.Tensor]

    @property
    def finest(self) -> int:
        return self.levels[-1]

    def best(self) -> torch.Tensor:
        """(B,) the top finest-level class of every row."""
        return self.index[self.finest][:, 0]

    def contains(self, level: int, targets) -> torch.Tensor:
        """(B,) bool: the target class is among the kept ones (targets < 0 never are)."""
        t = torch.as_tensor(np.asarray(targets), device=self.index[level].device).long()
        return ((self.index[level] == t[:, None]) & (t[:, None] >= 0)).any(1)


def _scale(z: torch.Tensor, temperatures: Mapping | None, level: int) -> torch.Tensor:
    z = z.float()
    if temperatures:
        t = temperatures.get(level, temperatures.get(str(level), 1.0))
        if t is not None and float(t) != 1.0:
            z = z / float(t)
    return z


FIRST_PASS = 8


def _ranked(score: torch.Tensor, lse: torch.Tensor, rule: KeepRule):
    """The best ``rule.limit`` entries of each row of ``score`` (B, M), best first, with
    their probabilities ``exp(score - lse)``: (values, positions, probs), each (B, n).

    Most rows keep a handful of classes: a first top-k of ``FIRST_PASS`` decides them, and
    only rows whose rule keeps all of those are ranked further (top-k is the costly step)."""
    B, M = score.shape
    n = min(rule.limit, M)
    n1 = n if rule.rule == "topk" else min(n, FIRST_PASS)
    top, pos = score.topk(n1, dim=1)  # (B, n1)
    prob = (top - lse).exp()
    if n1 < n and B:
        more = (rule.keep(prob) & torch.isfinite(top))[:, -1]  # rows that keep the whole first pass
        if bool(more.any()):
            rows = more.nonzero().squeeze(1)
            top2, pos2 = score[rows].topk(n, dim=1)
            top = torch.cat([top, top.new_full((B, n - n1), float("-inf"))], dim=1)
            pos = torch.cat([pos, pos.new_zeros((B, n - n1))], dim=1)
            top[rows], pos[rows] = top2, pos2
            prob = (top - lse).exp()
    return top, pos, prob


#: Row buckets of a level step, by how many candidates a row has: each bucket is padded
#: to its own width, so that a few rows with many candidates do not widen every row.
BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BUCKET_MIN = 100_000  # below this many gathered numbers, one pass is cheaper


def _children_step(z_all: torch.Tensor, kp: torch.Tensor, kept: torch.Tensor, kept_score: torch.Tensor,
                   tt: dict, lv: int, temps, rule: KeepRule, rows: torch.Tensor | None = None):
    """One level below the first, for some rows: the candidates of a row are the children
    of its kept classes, laid end to end (each kept class's children are one contiguous
    range of class indices). ``kp``: kept with -1 replaced by the padding entry.
    Returns (score, class, prob, parent), each (b, n), best first."""
    b, K = kp.shape
    n_kids = tt["size"][lv][kp]  # (b, K) children of each kept class (padding: 0)
    ends = n_kids.cumsum(1)  # (b, K) where each kept class's children end in the row
    width = max(int(ends[:, -1].max()), 1) if b else 1
    m = torch.arange(width, device=kp.device).expand(b, width).contiguous()  # (b, M) candidate slots
    slot = torch.searchsorted(ends, m, right=True).clamp(max=K - 1)  # (b, M) which kept class
    valid = m < ends[:, -1:]
    cand = tt["start"][lv][kp].gather(1, slot) + m - (ends - n_kids).gather(1, slot)
    cand = cand.masked_fill(~valid, 0)  # (b, M) class indices
    if rows is None:
        picked = z_all.gather(1, cand)
    else:  # only the candidates of these rows (never a copy of whole rows)
        picked = z_all.reshape(-1).take(rows[:, None] * z_all.shape[1] + cand)
    z = (_scale(picked, temps, lv) + tt["bias"][lv].take(cand)).masked_fill(~valid, float("-inf"))
    # score = parent's score + log-softmax over all the candidates; rank by u = z + parent's
    # score (the same order), probabilities = softmax of u over the candidates.
    u = z + kept_score.gather(1, slot)
    lse_u = torch.logsumexp(u, dim=1, keepdim=True)
    top_u, pos, top_p = _ranked(u, lse_u, rule)
    top_s = top_u - torch.logsumexp(z, dim=1, keepdim=True)
    return top_s, cand.gather(1, pos), top_p, kept.gather(1, slot.gather(1, pos))


@torch.inference_mode()
def combine(logits: Mapping[int, torch.Tensor], tree: Tree,
            rules: KeepRule | Mapping[int, KeepRule] | None = None,
            temperatures: Mapping[int, float] | None = None) -> Combined:
    """Combine per-level logits ``{level: (B, C_level)}`` down the tree (see the module doc).

    ``temperatures``: ``{level: T}``; logits are divided by T before any softmax (None or
    an empty mapping: T = 1). Each level below the first costs a few passes over
    (B, K x W) numbers (K kept parents, W the most children of one parent) gathered from
    the logits, whatever the number of classes; rows are bucketed by how many parents they
    kept. Works on any device; all tensors stay on the logits' device.
    """
    levels = tree.levels
    rules = rules_for(levels, rules)
    first = levels[0]
    device = logits[first].device
    tt = tree.tensors(device)
    B = logits[first].shape[0]
    out = Combined(levels, {}, {}, {}, {}, {})
    kept = kept_score = count = None
    temps = temperatures
    for i, lv in enumerate(levels):
        rule = rules[lv]
        if i == 0:
            # Every class that can reach the finest level is a candidate.
            z = _scale(logits[lv], temps, lv) + tt["bias"][lv]  # (B, C)
            lse = torch.logsumexp(z, dim=1, keepdim=True)  # (B, 1)
            top_z, idx, top_p = _ranked(z, lse, rule)
            top_s = top_z - lse  # log p(class)
            parent = torch.full_like(idx, -1)
        else:
            kp = torch.where(kept >= 0, kept, tt["start"][lv].shape[0] - 1)  # -1 -> the padding entry
            total = tt["size"][lv][kp].sum(1)  # (B,) candidates of each row
            widest = int(total.max()) if B else 0
            bounds = [w for w in BUCKETS if w < widest]
            if B * widest < BUCKET_MIN or not bounds:
                top_s, idx, top_p, parent = _children_step(logits[lv], kp, kept, kept_score, tt, lv, temps, rule)
            else:
                n = min(rule.limit, widest)
                top_s = kept_score.new_full((B, n), float("-inf"))
                top_p = kept_score.new_zeros((B, n))
                idx = kept.new_zeros((B, n))
                parent = kept.new_full((B, n), -1)
                lo = 0
                for hi in [*bounds, widest]:
                    rows = ((total > lo) & (total <= hi)).nonzero().squeeze(1)
                    lo = hi
                    if not rows.numel():
                        continue
                    res = _children_step(logits[lv], kp.index_select(0, rows), kept.index_select(0, rows),
                                         kept_score.index_select(0, rows), tt, lv, temps, rule, rows)
                    w = res[0].shape[1]
                    for full, part in zip((top_s, idx, top_p, parent), res, strict=True):
                        full[:, :w].index_copy_(0, rows, part)
        keep = rule.keep(top_p) & torch.isfinite(top_s)  # (B, n), a prefix of each row
        count = keep.sum(1)
        if B and keep.shape[1] > 1:  # drop columns no row keeps: the next level gathers fewer candidates
            k = max(int(count.max()), 1)
            keep, idx, top_s, top_p, parent = (t[:, :k] for t in (keep, idx, top_s, top_p, parent))
        kept = idx.masked_fill(~keep, -1)  # (B, k)
        kept_score = top_s.masked_fill(~keep, float("-inf"))
        out.index[lv] = kept
        out.prob[lv] = top_p.masked_fill(~keep, 0.0)
        out.score[lv] = kept_score
        out.parent[lv] = parent.masked_fill(~keep, -1)
        out.count[lv] = count
    return out


# =========================================================================== accuracy


def hierarchical_metrics(combined: Combined, targets: Mapping[int, np.ndarray] | np.ndarray,
                         true_lat, true_lon, positions: np.ndarray) -> dict:
    """Accuracy of hierarchical predictions against the truth.

    ``targets``: finest-level class per row (or ``{level: classes}``; < 0 = the true cell
    is no class there: such rows count as misses in the hit rates' numerators and are
    left out of their denominators). ``positions``: (C_finest, 2) lat/lon of each finest
    class (centroid or mean training position); the best class's position is the guess.

    Returns ``rows``, ``top1`` (best class == target), ``hit`` (target among the kept
    finest classes), ``kept`` (mean finest classes kept), ``acc_<t>km`` for 1/25/200/750/2500
    km (best guess within t km of the truth), ``median_km``, ``mean_km``, ``geoscore``, ``n``, and
    ``levels``: {level: {"hit", "kept"}}.
    """
    from geohier import metrics as gm

    finest = combined.finest
    if not isinstance(targets, Mapping):
        targets = {finest: targets}
    best = combined.best().cpu().numpy()
    lat = np.asarray(true_lat, dtype=np.float64)
    lon = np.asarray(true_lon, dtype=np.float64)
    pos = np.asarray(positions, dtype=np.float64)
    d = geodesy.haversine_km(pos[best, 0], pos[best, 1], lat, lon) if best.size else np.zeros(0)
    out: dict = {"rows": int(best.size)}
    levels = {}
    for lv in combined.levels:
        entry = {"kept": float(combined.count[lv].float().mean()) if best.size else 0.0}
        if lv in targets:
            t = np.asarray(targets[lv], dtype=np.int64)
            ok = t >= 0
            hit = combined.contains(lv, t).cpu().numpy()
            entry["hit"] = float(hit[ok].mean()) if ok.any() else 0.0
            top1 = combined.index[lv][:, 0].cpu().numpy() == t
            entry["top1"] = float(top1[ok].mean()) if ok.any() else 0.0
        levels[lv] = entry
    out["top1"] = levels[finest].get("top1", float("nan"))
    out["hit"] = levels[finest].get("hit", float("nan"))
    out["kept"] = levels[finest]["kept"]
    # The geolocation protocol of geohier.metrics (acc_1km ... acc_2500km, median/mean km,
    # GeoScore), exactly as the evaluate command reports it.
    out.update(gm.distance_metrics(d))
    out["levels"] = levels
    return out


def hierarchical_accuracy(logits: Mapping[int, torch.Tensor], tree: Tree, targets, true_lat, true_lon,
                          positions: np.ndarray, rules=None, temperatures=None) -> dict:
    """``combine`` then ``hierarchical_metrics``: the evaluate command and the threshold
    explorer both call this, so their numbers agree for the same rule."""
    return hierarchical_metrics(combine(logits, tree, rules, temperatures), targets, true_lat, true_lon,
                                positions)
