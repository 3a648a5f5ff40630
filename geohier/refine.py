"""Retrieval refinement inside the kept cells (as PIGEON does): the guess moves from a
cell's fixed position to where the most similar training images were taken.

A run with embeddings (a frozen backbone) carries ``neighbours.safetensors``: the
training images' L2-normalised embeddings (float16), positions and finest-level classes
(:class:`NeighbourIndex`). For a query image, the hierarchy has kept a few finest cells
``c`` with probabilities ``p_c``; :func:`refine` searches only the index rows of those
cells, by exact cosine similarity, and

- takes each kept cell's ``k`` most similar rows (its neighbours);
- scores each cell by its probability times its neighbour evidence,
  ``score_c = p_c * sum_{its top-k} exp(sim / tau)`` (a kernel density of the query's
  embedding among the cell's images, weighted by what the classifier thinks);
- places the guess at the similarity-weighted spherical mean of the best cell's
  neighbours, weights ``softmax(sim / tau)``.

A query with no index row in any of its kept cells keeps its unrefined point.

Defaults, and why:

- ``k = DEFAULT_K = 10``: enough neighbours to average out one image's position noise,
  few enough to stay local (the weights fall off with similarity anyway); PIGEON-style
  refinement averages a small neighbourhood, not the whole cell. A cell with fewer than
  ``k`` images contributes only those: data-rich cells gather more evidence, which is a
  prior in their favour.
- ``tau = DEFAULT_TAU = 0.05``: cosine similarities of foundation-model embeddings of
  street photos spread over a few tenths; at tau = 0.05 a similarity gap of 0.05 is a
  factor e in weight, so near-duplicates dominate the average while a neighbourhood of
  similar images still shares it, and strong retrieval evidence can overturn a
  classifier probability ratio of a few times, but not a confident classifier. Large tau:
  the plain mean of the top-k and the classifier's ranking; small tau: the nearest
  neighbour wins.

The search is exact: rows are sorted by class, so a cell's rows are one contiguous range;
for every cell kept by some query of the batch, one matmul of those queries against the
cell's rows, ``chunk`` rows at a time, with a running top-k. Memory stays at (queries of
the cell x ``chunk``) similarities whatever the index size; the cost is the rows of the
kept cells, not the whole index (fine up to a few million rows). Everything is torch and
numpy: no workspace, no model.

>>> feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
>>> index = NeighbourIndex.from_features(feats, [10.0, 11.0, -30.0], [20.0, 21.0, 40.0], [0, 0, 1], level=3)
>>> out = refine(torch.tensor([[1.0, 0.05]]), [[(0, 0.6), (1, 0.4)]], index, k=2)
>>> int(out.cls[0]), bool(out.refined[0]), 10.0 < float(out.lat[0]) < 11.0
(0, True, True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from geohier import geodesy
from geohier.errors import InputError, WorkspaceError
from geohier.fileio import open_safetensors, write_safetensors

FORMAT = "geohier-neighbours/1"
DEFAULT_K = 10
DEFAULT_TAU = 0.05
#: Index rows per similarity block: (queries of one cell) x CHUNK float32 at a time.
CHUNK = 65_536
_KEYS = ("emb", "lat", "lon", "classes", "ids")


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class NeighbourIndex:
    """The training images of a run, for retrieval: ``emb`` (N, D) float16 L2-normalised,
    ``lat``/``lon`` (N,) float64 degrees, ``classes`` (N,) int64 finest-level class index
    at ``level``, ``ids`` (N,) int64 (the caller's row ids, e.g. manifest image ids; by
    default the rows' order as given). Rows are kept sorted by class (stable), so each
    class's rows are ``start[c]:end[c]``. ``hierarchy_hash``: the hierarchy the classes
    index, when known (checked against a run's)."""

    emb: torch.Tensor
    lat: np.ndarray
    lon: np.ndarray
    classes: np.ndarray
    level: int
    ids: np.ndarray | None = None
    hierarchy_hash: str | None = None
    start: np.ndarray = field(init=False, repr=False)
    end: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.emb, torch.Tensor) or self.emb.ndim != 2:
            raise InputError(f"neighbour embeddings must be an (N, D) tensor, got {type(self.emb).__name__} "
                             f"of shape {tuple(getattr(self.emb, 'shape', ()))}")
        n = int(self.emb.shape[0])
        self.lat = np.asarray(self.lat, dtype=np.float64).reshape(-1)
        self.lon = np.asarray(self.lon, dtype=np.float64).reshape(-1)
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        self.ids = np.arange(n, dtype=np.int64) if self.ids is None else np.asarray(self.ids, np.int64).reshape(-1)
        for name in ("lat", "lon", "classes", "ids"):
            if getattr(self, name).shape[0] != n:
                raise InputError(f"neighbour index: {name} has {getattr(self, name).shape[0]} rows, "
                                 f"the embeddings {n}")
        if isinstance(self.level, bool) or int(self.level) < 1:
            raise InputError(f"neighbour index: level must be an integer >= 1, got {self.level!r}")
        self.level = int(self.level)
        if n and self.classes.min() < 0:
            raise InputError("neighbour index: class indices must be >= 0 (leave out rows without a class)")
        if not (np.isfinite(self.lat).all() and np.isfinite(self.lon).all()):
            raise InputError("neighbour index: every row needs a finite latitude and longitude")
        if self.emb.dtype != torch.float16:
            self.emb = self.emb.to(torch.float16)
        if n and np.any(np.diff(self.classes) < 0):
            order = np.argsort(self.classes, kind="stable")
            self.emb = self.emb[torch.from_numpy(order).to(self.emb.device)]
            self.lat, self.lon = self.lat[order], self.lon[order]
            self.classes, self.ids = self.classes[order], self.ids[order]
        self.emb = self.emb.contiguous()
        n_cls = int(self.classes.max()) + 1 if n else 0
        self.start = np.searchsorted(self.classes, np.arange(n_cls), side="left")
        self.end = np.searchsorted(self.classes, np.arange(n_cls), side="right")

    def __len__(self) -> int:
        return int(self.emb.shape[0])

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    @classmethod
    def from_features(cls, feats, lat, lon, classes, level: int, *, ids=None,
                      hierarchy_hash: str | None = None) -> NeighbourIndex:
        """An index from raw features (N, D) (tensor or array; any float dtype): each row is
        L2-normalised, then stored as float16. Rows whose class is < 0 (no class at
        ``level``) are left out."""
        f = torch.as_tensor(np.asarray(feats) if not isinstance(feats, torch.Tensor) else feats)
        if f.ndim != 2:
            raise InputError(f"features must be (N, D), got shape {tuple(f.shape)}")
        classes = np.asarray(classes, dtype=np.int64).reshape(-1)
        if classes.shape[0] != f.shape[0]:
            raise InputError(f"features have {f.shape[0]} rows but classes {classes.shape[0]}")
        keep = classes >= 0
        lat = np.asarray(lat, dtype=np.float64).reshape(-1)
        lon = np.asarray(lon, dtype=np.float64).reshape(-1)
        ids = np.arange(len(classes), dtype=np.int64) if ids is None else np.asarray(ids, np.int64).reshape(-1)
        for name, v in (("lat", lat), ("lon", lon), ("ids", ids)):
            if v.shape[0] != classes.shape[0]:
                raise InputError(f"features have {f.shape[0]} rows but {name} {v.shape[0]}")
        if not keep.all():
            sel = torch.from_numpy(np.flatnonzero(keep)).to(f.device)
            f, lat, lon, classes, ids = f[sel], lat[keep], lon[keep], classes[keep], ids[keep]
        emb = _normalise(f).to(torch.float16)
        return cls(emb, lat, lon, classes, level, ids=ids, hierarchy_hash=hierarchy_hash)

    def to(self, device: str | torch.device) -> NeighbourIndex:
        """The same index with its embeddings on ``device`` (the rest stays numpy)."""
        self.emb = self.emb.to(device)
        return self

    # ------------------------------------------------------------------ file

    def save(self, path: str | os.PathLike) -> None:
        """Write the index as safetensors (atomically: a temporary file, then a rename);
        metadata: format, level, rows, dim and the hierarchy hash. No pickle."""
        tensors = {"emb": self.emb.detach().to("cpu", torch.float16).contiguous(),
                   "lat": torch.from_numpy(np.ascontiguousarray(self.lat)),
                   "lon": torch.from_numpy(np.ascontiguousarray(self.lon)),
                   "classes": torch.from_numpy(np.ascontiguousarray(self.classes)),
                   "ids": torch.from_numpy(np.ascontiguousarray(self.ids))}
        meta = {"format": FORMAT, "level": str(self.level), "rows": str(len(self)), "dim": str(self.dim)}
        if self.hierarchy_hash:
            meta["hierarchy_hash"] = str(self.hierarchy_hash)
        write_safetensors(path, tensors, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> NeighbourIndex:
        """Read an index written by :meth:`save`; a WorkspaceError naming the file when it
        is missing, unreadable, of another format, or inconsistent."""
        path = Path(path)
        if not path.is_file():
            raise WorkspaceError(f"no neighbour index at {path}")
        with open_safetensors(path, WorkspaceError, f"cannot read the neighbour index {path}") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise WorkspaceError(f"{path} is not a geohier neighbour index (format {FORMAT}, "
                                     f"found {meta.get('format')!r})")
            missing = [k for k in _KEYS if k not in f.keys()]
            if missing:
                raise WorkspaceError(f"{path} lacks {', '.join(missing)}: not a complete neighbour index")
            t = {k: f.get_tensor(k) for k in _KEYS}
        try:
            level = int(meta.get("level", ""))
        except ValueError:
            raise WorkspaceError(f"{path}: metadata has no usable level ({meta.get('level')!r})") from None
        if t["emb"].ndim != 2 or t["emb"].dtype != torch.float16:
            raise WorkspaceError(f"{path}: emb must be (N, D) float16, got {t['emb'].dtype} {tuple(t['emb'].shape)}")
        try:
            return cls(t["emb"].to(device), t["lat"].numpy(), t["lon"].numpy(), t["classes"].numpy(), level,
                       ids=t["ids"].numpy(), hierarchy_hash=meta.get("hierarchy_hash") or None)
        except InputError as exc:
            raise WorkspaceError(f"{path}: {exc}") from None

    def check(self, level: int, num_classes: int, dim: int | None = None, hierarchy_hash: str | None = None,
              where: str = "") -> None:
        """Refuse (WorkspaceError) an index that does not fit a run: another finest level,
        a class beyond ``num_classes``, another embedding size or another hierarchy."""
        if self.level != int(level):
            raise WorkspaceError(f"{where}the neighbour index is for level {self.level}, the run's finest level "
                                 f"is {level}")
        if len(self) and int(self.classes.max()) >= int(num_classes):
            raise WorkspaceError(f"{where}the neighbour index has class {int(self.classes.max())} but level "
                                 f"{level} has {num_classes} classes")
        if dim is not None and self.dim != int(dim):
            raise WorkspaceError(f"{where}the neighbour index holds {self.dim}-d embeddings, the model's "
                                 f"features are {dim}-d")
        if hierarchy_hash and self.hierarchy_hash and self.hierarchy_hash != hierarchy_hash:
            raise WorkspaceError(f"{where}the neighbour index was built on hierarchy {self.hierarchy_hash[:12]}, "
                                 f"the run's is {hierarchy_hash[:12]}")


# ---------------------------------------------------------------------- the search


@dataclass
class Refined:
    """What :func:`refine` found, per query (B rows).

    ``lat``/``lon``: the refined point, or the fallback where ``refined`` is False;
    ``cls``: the chosen finest class (the top kept one where not refined, -1 when none
    was kept); ``rows``/``sims``/``weights``: per query, the chosen cell's neighbours
    (index rows, most similar first), their cosine similarities and averaging weights
    (empty where not refined); ``ids``: the same neighbours' ids; ``evidence``: per
    query, {class: log score} of the kept cells that had neighbours."""

    lat: np.ndarray
    lon: np.ndarray
    cls: np.ndarray
    refined: np.ndarray
    rows: list[np.ndarray]
    sims: list[np.ndarray]
    weights: list[np.ndarray]
    ids: list[np.ndarray]
    evidence: list[dict[int, float]]


def kept_lists(index: torch.Tensor, prob: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Per row, ``[(class, prob), ...]`` from padded (B, K) class indices (-1 = none) and
    probabilities, such as ``geohier.combine.Combined``'s finest ``index``/``prob``."""
    idx = index.cpu().numpy()
    p = prob.float().cpu().numpy()
    return [[(int(c), float(q)) for c, q in zip(ri, rp, strict=True) if c >= 0] for ri, rp in zip(idx, p, strict=True)]


def _block_sims(q: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """(m, n) float32 cosine similarities of normalised queries and index rows."""
    if block.device.type == "cpu":  # half matmuls are slow (or missing) on CPUs
        return q.float() @ block.float().T
    return (q.to(block.dtype) @ block.T).float()


def refine(query: torch.Tensor, kept: Sequence[Sequence[tuple[int, float]]], index: NeighbourIndex,
           k: int = DEFAULT_K, tau: float = DEFAULT_TAU, fallback=None, chunk: int = CHUNK) -> Refined:
    """Refine B queries (see the module doc).

    ``query``: (B, D) features (normalised here); ``kept``: per query, the finest-level
    candidates ``[(class, prob), ...]`` the hierarchy kept, likeliest first; ``fallback``:
    (B, 2) lat/lon kept where no neighbour is found (default NaN). Ties in score go to
    the earlier kept candidate. ``chunk``: index rows per similarity block."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
        raise InputError(f"k (neighbours per cell) must be an integer >= 1, got {k!r}")
    if not (isinstance(tau, (int, float)) and np.isfinite(tau) and float(tau) > 0):
        raise InputError(f"tau (similarity temperature) must be > 0, got {tau!r}")
    k, tau, chunk = int(k), float(tau), max(1, int(chunk))
    query = torch.as_tensor(query)
    B = int(query.shape[0]) if query.ndim == 2 else -1
    if B < 0 or len(kept) != B:
        raise InputError(f"refine needs (B, D) queries and B kept lists, got {tuple(query.shape)} and {len(kept)}")
    if B and query.shape[1] != index.dim:
        raise InputError(f"the queries are {query.shape[1]}-d but the neighbour index holds {index.dim}-d embeddings")
    fb = np.full((B, 2), np.nan) if fallback is None else np.asarray(fallback, dtype=np.float64).reshape(B, 2)
    K = max((len(c) for c in kept), default=0)
    cls_k = np.full((B, max(K, 1)), -1, dtype=np.int64)
    logp = np.full((B, max(K, 1)), -np.inf)
    for i, cands in enumerate(kept):
        for j, (c, p) in enumerate(cands):
            cls_k[i, j] = int(c)
            logp[i, j] = np.log(p) if p > 0 else -np.inf
    top_sim = torch.full((B, max(K, 1), k), float("-inf"))
    top_row = torch.full((B, max(K, 1), k), -1, dtype=torch.long)
    q = _normalise(query.to(index.emb.device)) if B else query
    n_cls = len(index.start)
    # (query, slot) pairs grouped by class: one matmul per kept class of the batch
    qi, sj = np.nonzero(cls_k >= 0)
    cs = cls_k[qi, sj]
    has_rows = cs < n_cls
    qi, sj, cs = qi[has_rows], sj[has_rows], cs[has_rows]
    order = np.argsort(cs, kind="stable")
    qi, sj, cs = qi[order], sj[order], cs[order]
    bounds = np.flatnonzero(np.diff(cs)) + 1
    for g_q, g_s, g_c in zip(np.split(qi, bounds), np.split(sj, bounds), np.split(cs, bounds), strict=True):
        if not g_c.size:
            continue
        c = int(g_c[0])
        s, e = int(index.start[c]), int(index.end[c])
        if e <= s:
            continue
        qc = q[torch.from_numpy(g_q).to(q.device)]  # (m, D)
        best_s = best_r = None
        for lo in range(s, e, chunk):
            hi = min(e, lo + chunk)
            sims = _block_sims(qc, index.emb[lo:hi])  # (m, n)
            v, r = sims.topk(min(k, hi - lo), dim=1)
            r = r + lo
            if best_s is not None:
                v, pos = torch.cat([best_s, v], 1).topk(min(k, best_s.shape[1] + v.shape[1]), dim=1)
                r = torch.cat([best_r, r], 1).gather(1, pos)
            best_s, best_r = v, r
        n = best_s.shape[1]
        ti, tj = torch.from_numpy(g_q), torch.from_numpy(g_s)
        top_sim[ti, tj, :n] = best_s.cpu()
        top_row[ti, tj, :n] = best_r.cpu()
    # score_c = p_c * sum exp(sim / tau), in logs; cells without neighbours are -inf
    log_ev = torch.logsumexp(top_sim / tau, dim=2).double().numpy()  # (B, K)
    score = logp + log_ev
    score[cls_k < 0] = -np.inf
    best = score.argmax(1) if B else np.zeros(0, np.int64)  # the first of equal maxima: kept order
    ok = np.isfinite(score[np.arange(B), best]) if B else np.zeros(0, bool)
    lat, lon = fb[:, 0].copy(), fb[:, 1].copy()
    cls = cls_k[:, 0].copy()
    rows, sims, weights, ids, evidence = [], [], [], [], []
    for i in range(B):
        evidence.append({int(cls_k[i, j]): float(score[i, j]) for j in range(cls_k.shape[1])
                         if cls_k[i, j] >= 0 and np.isfinite(score[i, j])})
        if not ok[i]:
            rows.append(np.zeros(0, np.int64))
            sims.append(np.zeros(0, np.float32))
            weights.append(np.zeros(0, np.float64))
            ids.append(np.zeros(0, np.int64))
            continue
        j = int(best[i])
        valid = top_row[i, j] >= 0
        r = top_row[i, j][valid].numpy()
        sv = top_sim[i, j][valid].numpy()
        w = np.exp((sv.astype(np.float64) - float(sv.max())) / tau)
        w /= w.sum()
        xyz = (geodesy.unit_vectors(index.lat[r], index.lon[r]) * w[:, None]).sum(0)
        if np.linalg.norm(xyz) > 1e-12:
            la, lo = geodesy.to_latlon(xyz)
            lat[i], lon[i] = float(la), float(lo)
            cls[i] = int(cls_k[i, j])
        else:  # the neighbours cancel out (antipodes): no mean, keep the unrefined point
            ok[i] = False
            r, sv, w = np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0)
        rows.append(r)
        sims.append(sv)
        weights.append(w)
        ids.append(index.ids[r])
    return Refined(lat, lon, cls, ok, rows, sims, weights, ids, evidence)
