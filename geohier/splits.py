"""Splits that belong to runs: the exact train/val/test assignment a run was trained on.

``pipeline labels`` writes each image's split into the manifest, and may be run again at
any time (another seed, other fractions, new images). A run must never be evaluated,
calibrated or resumed on a split other than its own: most of a new test split can be the
old training images. So every assignment is also kept as a *split version*:

- ``Splits``: the image ids of each split (sorted int64 arrays) and a hash of them;
- ``data/splits/<hash>.safetensors``: every version ``labels`` (or a training run) saw,
  written once, never changed;
- ``models/<run>/split.safetensors``: the version the run trained on (a hard link to the
  workspace's copy, else a copy), and ``meta.json``'s ``split`` block with its hash.

``run_ids(run, ws, split)`` answers "which images are this run's test (val, train)
images": the run's own version when it has one, else (runs from before split versions)
the workspace's current assignment, with a note that says so. A run whose recorded
version cannot be found is refused with a ``SplitError`` naming it — never silently
swapped for the current one.

>>> s = Splits.from_assignment([3, 1, 2, 5], ["test", "train", "train", "val"])
>>> s.ids["train"].tolist(), s.counts()
([1, 2], {'train': 2, 'val': 1, 'test': 1})
>>> s.hash == Splits.from_assignment([1, 2, 3, 5], ["train", "train", "test", "val"]).hash
True
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from geohier import geodesy, grid
from geohier.errors import InputError, SplitError, WorkspaceError
from geohier.fileio import atomic_link_or_copy, atomic_write_bytes, open_safetensors
from geohier.workspace import SPLITS, Workspace

FORMAT = "geohier-splits/1"
STORE_DIR = "splits"


@dataclass
class Splits:
    """Image ids per split (``train``/``val``/``test``, sorted int64) and how they were made
    (``info``: seed, fractions, created_at, as ``labels`` recorded them). ``groups``: the
    place group (``group_codes``) each id was dealt with, parallel to ``ids`` (when
    ``labels`` recorded them; not part of the hash): what conformal calibration weighs by,
    as the splits were drawn, whatever the manifest holds later."""

    ids: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)
    groups: dict[str, np.ndarray] | None = None

    def __post_init__(self):
        if self.groups is None:
            self.ids = {s: _sorted_unique(self.ids.get(s, ())) for s in SPLITS}
        else:
            ids, groups = {}, {}
            for s in SPLITS:
                i = np.asarray(self.ids.get(s, ()), dtype=np.int64).ravel()
                g = np.asarray(self.groups.get(s, ()), dtype=np.int64).ravel()
                if g.shape != i.shape:
                    raise InputError(f"split {s}: {i.size} ids but {g.size} group codes")
                order = np.argsort(i, kind="stable")
                i, g = i[order], g[order]
                first = np.r_[True, i[1:] != i[:-1]] if i.size else np.zeros(0, bool)
                ids[s], groups[s] = i[first], g[first]
            self.ids, self.groups = ids, groups
        self._hash: str | None = None

    @classmethod
    def from_assignment(cls, ids: Sequence[int], splits: Sequence[str | None], info: Mapping | None = None,
                        groups: Sequence[int] | None = None) -> Splits:
        """From parallel lists of image ids and split names (None / "" = no split), and
        optionally each image's place group code."""
        ids = np.asarray(ids, dtype=np.int64)
        if isinstance(splits, np.ndarray) and splits.dtype.kind == "U":
            names = splits  # compared in C: 5 M names in ~0.1 s
        else:
            names = np.asarray([s or "" for s in splits], dtype=object)
        if names.shape != ids.shape:
            raise InputError(f"{ids.size} ids but {names.size} split names")
        g = None if groups is None else np.asarray(groups, dtype=np.int64)
        return cls({s: ids[names == s] for s in SPLITS}, dict(info or {}),
                   None if g is None else {s: g[names == s] for s in SPLITS})

    def group_of(self, ids) -> np.ndarray | None:
        """(N,) the recorded place group code of each id (an id in no split: a group of its
        own, -1 - its position), or None when the version recorded no groups.

        >>> s = Splits.from_assignment([5, 3, 9], ["val", "val", "test"], groups=[7, 7, 2])
        >>> s.group_of([3, 9, 4]).tolist()
        [7, 2, -3]
        """
        if self.groups is None:
            return None
        ids = np.asarray(ids, dtype=np.int64).ravel()
        out = -1 - np.arange(ids.size, dtype=np.int64)  # unknown ids: each its own group
        for s in SPLITS:
            have = self.ids[s]
            if not have.size:
                continue
            pos = np.searchsorted(have, ids).clip(0, have.size - 1)
            hit = have[pos] == ids
            out[hit] = self.groups[s][pos[hit]]
        return out

    @property
    def hash(self) -> str:
        """sha256 over each split's name and sorted ids: equal hashes, equal assignments."""
        if self._hash is None:
            h = hashlib.sha256(FORMAT.encode())
            for s in SPLITS:
                h.update(f"|{s}:".encode())
                h.update(self.ids[s].astype("<i8").tobytes())
            self._hash = h.hexdigest()
        return self._hash

    @property
    def short(self) -> str:
        return self.hash[:12]

    def counts(self) -> dict[str, int]:
        return {s: int(self.ids[s].size) for s in SPLITS}

    def __len__(self) -> int:
        return sum(self.counts().values())

    def split_of(self, ids) -> np.ndarray:
        """The split name of each id ("" for ids in none)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(ids.shape, "", dtype=object)
        for s in SPLITS:
            out[np.isin(ids, self.ids[s])] = s
        return out

    def describe(self) -> dict:
        """meta.json's ``split`` block."""
        return {"hash": self.hash, "counts": self.counts(), **{k: v for k, v in self.info.items() if k != "hash"}}

    # ---------------------------------------------------------------- files

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        meta = {"format": FORMAT, "hash": self.hash, "info": json.dumps(self.info, sort_keys=True)}
        tensors = {s: np.ascontiguousarray(self.ids[s]) for s in SPLITS}
        if self.groups is not None:
            tensors.update({f"groups.{s}": np.ascontiguousarray(self.groups[s]) for s in SPLITS})
        return save(tensors, metadata=meta)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Splits:
        """Read a split file; a SplitError naming it when it is unreadable or its content
        does not match its recorded hash."""
        path = Path(path)
        with open_safetensors(path, SplitError, f"cannot read the split file {path}", framework="numpy") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            ids = {s: f.get_tensor(s) for s in SPLITS if s in keys}
            groups = ({s: f.get_tensor(f"groups.{s}") for s in SPLITS if f"groups.{s}" in keys}
                      if any(k.startswith("groups.") for k in keys) else None)
        try:
            info = json.loads(meta.get("info") or "{}")
        except ValueError as exc:
            raise SplitError(f"cannot read the split file {path}: {exc}") from None
        if meta.get("format") != FORMAT:
            raise SplitError(f"{path} is not a geohier split file (format {meta.get('format')!r})")
        try:
            out = cls(ids, info, groups)
        except InputError as exc:
            raise SplitError(f"cannot read the split file {path}: {exc}") from None
        if meta.get("hash") and meta["hash"] != out.hash:
            raise SplitError(f"{path} was changed after it was written (hash {out.short}, recorded "
                             f"{meta['hash'][:12]})")
        return out


def _sorted_unique(values) -> np.ndarray:
    # np.unique without return_* takes a hash path in numpy 2.4 that is ~30x slower than a
    # sort for millions of distinct ids (5 M: 7 s against 0.2 s).
    a = np.sort(np.asarray(values, dtype=np.int64).ravel())
    return a[np.r_[True, a[1:] != a[:-1]]] if a.size else a


# ---------------------------------------------------------------- the workspace's versions


def store_dir(ws: Workspace) -> Path:
    return ws.data_dir / STORE_DIR


def store_path(ws: Workspace, split_hash: str) -> Path:
    return store_dir(ws) / f"{split_hash}.safetensors"


def current(ws: Workspace, info: Mapping | None = None) -> Splits | None:
    """The manifest's current assignment (None when no image has a split). ``info``
    defaults to the hierarchy's record of how the splits were drawn."""
    if not ws.has_manifest():
        return None
    with ws.manifest() as m:
        frame = m.frame(["id", "split"], where="split IS NOT NULL")
    if frame.empty:
        return None
    if info is None:
        info = _hierarchy_splits(ws)
    return Splits.from_assignment(frame["id"].to_numpy(np.int64), frame["split"].tolist(), info)


def _hierarchy_splits(ws: Workspace) -> dict:
    try:
        doc = json.loads(ws.hierarchy_path.read_text("utf-8"))
        rec = doc.get("splits") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: rec[k] for k in ("train", "val", "test", "seed") if k in rec} if isinstance(rec, dict) else {}


def record(ws: Workspace, splits: Splits) -> Path:
    """Keep ``splits`` in the workspace's store (written once; an existing file is left)."""
    path = store_path(ws, splits.hash)
    if not path.is_file():
        splits.save(path)
    return path


def recorded(ws: Workspace, split_hash: str) -> Splits | None:
    path = store_path(ws, split_hash)
    return Splits.load(path) if path.is_file() else None


# ---------------------------------------------------------------- runs


def run_file(run) -> Path:
    from geohier.runs import Run

    return Run(run).split_path


def attach(run, splits: Splits, ws: Workspace) -> Path:
    """Give a run its split: the workspace's stored copy hard-linked into the run
    directory (copied where links are refused; put in place by the one atomic writer).
    Returns the run's file."""
    src = record(ws, splits)
    dest = run_file(run)
    if dest.is_file():
        try:
            if Splits.load(dest).hash == splits.hash:
                return dest
        except SplitError:
            pass
    return atomic_link_or_copy(src, dest)


def recorded_hash(meta: Mapping | None) -> str | None:
    """The split hash a run's meta (or config) records, else None."""
    if not isinstance(meta, Mapping):
        return None
    block = meta.get("split")
    if isinstance(block, Mapping) and block.get("hash"):
        return str(block["hash"])
    return str(meta["split_hash"]) if meta.get("split_hash") else None


def of_run(run, ws: Workspace | None = None, meta: Mapping | None = None) -> Splits | None:
    """A run's own split: its split file, else the workspace's stored version of the hash
    its meta records. None for a run that records no split (trained before split
    versions). A SplitError when it records one that cannot be found or read."""
    from geohier.runs import Run

    run = Run(run)
    if meta is None:
        meta = run.meta() or run.config()
    want = recorded_hash(meta)
    path = run.split_path
    if path.is_file():
        s = Splits.load(path)
        if want and s.hash != want:
            raise SplitError(f"run {run.name}'s {path.name} holds split {s.short}, but its {path.parent.name} "
                             f"records {want[:12]}")
        return s
    if not want:
        return None
    s = recorded(ws, want) if ws is not None else None
    if s is None:
        raise SplitError(f"run {run.name} was trained on split {want[:12]}, whose file is gone "
                         f"(neither {path} nor {store_path(ws, want) if ws is not None else 'the workspace store'} "
                         "exists); its own test images cannot be told apart, so it cannot be evaluated "
                         "on this workspace's splits")
    return s


@dataclass
class RunSplit:
    """The images of one split of a run and where they came from. ``note``: a sentence to
    show when they are not the run's recorded split (an old run), else None."""

    ids: np.ndarray
    hash: str
    own: bool
    note: str | None = None
    splits: Splits | None = None

    def source(self) -> dict:
        return {"split_hash": self.hash, "split_own": self.own, **({"split_note": self.note} if self.note else {})}


def run_ids(run, ws: Workspace, split: str, meta: Mapping | None = None) -> RunSplit:
    """The ids of ``split`` ("train" / "val" / "test") of a run: its own version.

    A run that predates split versions records none; when the workspace's splits were
    drawn before the run started they are the ones it trained on: they are adopted (linked
    into the run, so a later relabel keeps them) and the result carries a note saying so.
    Drawn after it started, they may hold its training images: a SplitError. A SplitError
    too when the run records a version that is gone, or the workspace has no split."""
    from geohier.runs import Run

    if split not in SPLITS:
        raise WorkspaceError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    run = Run(run)
    own = of_run(run, ws, meta)
    if own is not None:
        return RunSplit(own.ids[split], own.hash, True, None, own)
    now = current(ws)
    if now is None:
        raise SplitError(f"the workspace {ws.data_dir} has no splits (run `python -m pipeline labels`)")
    drawn, started = _hierarchy_created(ws), _run_started(run, meta)
    if drawn is None or started is None or drawn > started:
        raise SplitError(f"run {run.name} records no split (it predates split versions) and the workspace's "
                         f"splits were drawn {'after it started' if drawn and started else 'at an unknown time'}: "
                         "its test images may be images it trained on; retrain it, or evaluate it with --csv "
                         "on images it never saw")
    attach(run, now, ws)
    return RunSplit(now.ids[split], now.hash, True,
                    f"run {run.name} recorded no split; the workspace's split {now.short}, drawn before it "
                    "started, is now recorded as its own", now)


def _when(text) -> datetime | None:
    try:
        t = datetime.fromisoformat(str(text))
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _hierarchy_created(ws: Workspace) -> datetime | None:
    try:
        return _when(json.loads(ws.hierarchy_path.read_text("utf-8")).get("created_at"))
    except (OSError, ValueError, AttributeError):
        return None


def _run_started(run, meta: Mapping | None) -> datetime | None:
    cfg = run.config()
    return _when(cfg.get("created_at")) or _when((meta or {}).get("created_at"))


def runs_on_other_splits(models_dir: str | os.PathLike, new_hash: str) -> list[tuple[str, str]]:
    """(run name, its split hash) of the runs in ``models_dir`` trained on a split other
    than ``new_hash`` (those that record none are listed with "")."""
    from geohier.runs import list_runs

    out = []
    for run in list_runs(models_dir):
        meta = run.meta() or run.config()
        if not meta or meta.get("per_level_group"):
            continue
        h = recorded_hash(meta) or ""
        if h != new_hash:
            out.append((run.name, h))
    return out


__all__ = ["FORMAT", "RunSplit", "SplitError", "Splits", "attach", "current", "of_run", "record", "recorded",
           "recorded_hash", "run_ids", "runs_on_other_splits", "store_path",
           "assign_splits", "check_fractions", "group_codes", "groups_of", "split_groups", "DEFAULT_FRACTIONS"]


# ---------------------------------------------------------------- drawing the splits (pipeline labels)

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_BUCKET_LEVEL = 15  # cells of ~1.2 x 0.6 km at the equator (narrower towards the poles)
LINK_M = 100.0  # points closer than this across a bucket edge share a group
_DEDUP_LEVEL = 22  # ~10 x 5 m: points in one such cell are one point for the link search


def _known(values) -> np.ndarray:
    s = pd.Series(values, dtype=object)
    return (s.notna() & (s.astype(str).str.strip() != "") & (s.astype(str) != "None")).to_numpy()


def split_groups(lat, lon, sequence_ids=None, link_m: float = LINK_M,
                 bucket_level: int = SPLIT_BUCKET_LEVEL, max_group: int | None = None) -> np.ndarray:
    """The split group of every image, as strings: ``"s:<sequence>"`` when the sequence is
    known, else ``"b:<bucket key>"`` (a ~1 km cell, merged across edges with neighbours
    closer than ``link_m``).

    Merging stops short of a group larger than ``max_group`` images (default: 2% of the
    images, at least 50), so that one dense city of unsequenced photos cannot swallow a
    whole split; the closest pairs merge first.
    """
    codes, names = group_codes(lat, lon, sequence_ids, link_m, bucket_level, max_group)
    return names[codes] if codes.size else np.empty(0, dtype=object)


def group_codes(lat, lon, sequence_ids=None, link_m: float = LINK_M, bucket_level: int = SPLIT_BUCKET_LEVEL,
                max_group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``split_groups`` as (codes (N,) int64, names (G,) object): image i is in group
    ``names[codes[i]]``, groups numbered in order of first appearance. Strings are made per
    group, not per image, and sequence ids are checked once per distinct value: 5 M images
    in ~100 k sequences cost ~100 k strings.

    >>> codes, names = group_codes([10, 10, 10.05], [10, 10, 10], [None, "", "abc"])
    >>> codes.tolist(), names.tolist()
    ([0, 0, 1], ['b:444983390', 's:abc'])
    """
    lat = np.asarray(lat, dtype=np.float64).ravel()
    lon = np.asarray(lon, dtype=np.float64).ravel()
    n = lat.size
    if lon.size != n:
        raise InputError(f"lat and lon differ in length: {n} vs {lon.size}")
    seq = np.asarray(sequence_ids if sequence_ids is not None else [None] * n, dtype=object).ravel()
    if seq.size != n:
        raise InputError(f"sequence_ids has {seq.size} entries for {n} points")
    if not n:
        return np.zeros(0, dtype=np.int64), np.empty(0, dtype=object)
    # Sequences: factorised (None and NaN are no sequence), each distinct value judged once.
    seq_code, seq_values = pd.factorize(pd.Series(seq, dtype=object), sort=False)
    seq_values = np.asarray(seq_values, dtype=object)
    if any(not isinstance(v, str) for v in seq_values):  # 7 and 7.0 are one value but two names
        text = np.array([None if not isinstance(v, str) and pd.isna(v) is True else str(v) for v in seq],
                        dtype=object)
        seq_code, seq_values = pd.factorize(pd.Series(text, dtype=object), sort=False)
        seq_values = np.asarray(seq_values, dtype=object)
    ok = _known(seq_values) if seq_values.size else np.zeros(0, dtype=bool)
    has_seq = (seq_code >= 0) & (ok[np.maximum(seq_code, 0)] if ok.size else False)
    raw = np.where(has_seq, seq_code, -1).astype(np.int64)  # per image: a sequence value, or a bucket below
    table = ["s:" + str(v) for v in seq_values]
    sp = np.flatnonzero(~has_seq)
    if sp.size:
        bucket = grid.encode(lat[sp], lon[sp], bucket_level)
        roots = _merge_buckets(lat[sp], lon[sp], bucket, bucket_level, link_m,
                               max_group if max_group is not None else max(50, math.ceil(0.02 * n)))
        uroots, inv = np.unique(roots, return_inverse=True)
        raw[sp] = len(table) + inv
        table += ["b:" + str(int(b)) for b in uroots]
    # Groups in order of first appearance; distinct values with one name (1 and "1") are one group.
    first, uniq = pd.factorize(raw, sort=False)
    names, merged = pd.factorize(pd.Series(np.asarray(table, dtype=object)[uniq], dtype=object), sort=False)
    return names[first].astype(np.int64), np.asarray(merged, dtype=object)


def _merge_buckets(lat, lon, bucket, bucket_level, link_m, max_group) -> np.ndarray:
    # Union-find over buckets, linked by point pairs closer than link_m in different buckets.
    from scipy.spatial import cKDTree

    ub, inv, size = np.unique(bucket, return_inverse=True, return_counts=True)
    if link_m <= 0 or ub.size < 2:
        return ub[inv]
    # Points in one ~10 m cell are in one bucket: search on one point per such cell.
    fine = grid.encode(lat, lon, max(_DEDUP_LEVEL, bucket_level))
    _, rep = np.unique(fine, return_index=True)
    xyz = geodesy.unit_vectors(lat[rep], lon[rep]) * geodesy.EARTH_RADIUS_M  # (P, 3) metres
    pairs = cKDTree(xyz).query_pairs(link_m, output_type="ndarray")
    if pairs.size == 0:
        return ub[inv]
    a, b = inv[rep[pairs[:, 0]]], inv[rep[pairs[:, 1]]]
    cross = a != b
    a, b, p = a[cross], b[cross], pairs[cross]
    d = np.linalg.norm(xyz[p[:, 0]] - xyz[p[:, 1]], axis=1)
    order = np.argsort(d, kind="stable")
    parent = np.arange(ub.size)
    weight = size.astype(np.int64).copy()

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i in order:
        ra, rb = find(a[i]), find(b[i])
        if ra == rb or weight[ra] + weight[rb] > max_group:
            continue
        if ra > rb:  # the smaller bucket key names the group: independent of input order
            ra, rb = rb, ra
        parent[rb] = ra
        weight[ra] += weight[rb]
    roots = np.array([find(i) for i in range(ub.size)])
    return ub[roots][inv]


def groups_of(ws: Workspace, ids, splits: Splits | None = None) -> np.ndarray:
    """The split group of each image of ``ids``: as ``splits`` (the run's version) recorded
    it when ``labels`` drew it, else (a version from before groups were recorded) drawn
    again over the whole manifest as ``labels`` draws them (the same groups as long as the
    manifest has not changed since); an id no longer in the manifest is a group of its
    own. Conformal calibration weighs images by these groups (``geohier.conformal``)."""
    recorded = splits.group_of(ids) if splits is not None else None
    if recorded is not None:
        return recorded
    ids = np.asarray(ids, dtype=np.int64).ravel()
    with ws.manifest() as m:
        df = m.frame(["id", "lat", "lon", "sequence_id"])
    groups = split_groups(df["lat"].to_numpy(np.float64), df["lon"].to_numpy(np.float64),
                          df["sequence_id"].to_numpy(object)) if len(df) else np.zeros(0, dtype=object)
    pos = pd.Index(df["id"].to_numpy(np.int64)).get_indexer(ids)
    out = np.array([groups[p] if p >= 0 else f"i:{i}" for p, i in zip(pos.tolist(), ids.tolist(), strict=True)],
                   dtype=object)
    return out


def assign_splits(ids, lat, lon, sequence_ids=None, fractions=DEFAULT_FRACTIONS, seed: int = 0,
                  link_m: float = LINK_M, with_groups: bool = False):
    """"train" / "val" / "test" for every image, drawn by groups (``split_groups``).

    Groups are ordered by a seeded hash of their name and dealt out along the cumulative
    image count, so the fractions hold over images up to the size of one group, the result
    does not depend on the order of the input, and the same seed gives the same splits.
    ``ids`` only fixes the length (and is checked against it). ``with_groups``: return
    ``(splits, group codes)`` (``group_codes``' codes, what a split version records).

    >>> assign_splits([1, 2], [10, 10.0001], [10, 10], [None, None]).tolist()
    ['train', 'train']
    """
    ids = np.asarray(ids).ravel()
    fr = check_fractions(fractions)
    codes, names = group_codes(lat, lon, sequence_ids, link_m=link_m)
    if codes.size != ids.size:
        raise InputError(f"{ids.size} ids but {codes.size} points")
    out = np.empty(ids.size, dtype="<U5")
    if not ids.size:
        return (out, codes) if with_groups else out
    sizes = np.bincount(codes, minlength=names.size)
    key = hashlib.sha256(f"geohier-splits:{seed}".encode()).hexdigest()[:16]
    h = pd.util.hash_array(names, hash_key=key, categorize=False)  # (G,) uint64, seeded
    order = np.argsort(h, kind="stable")  # input order matters only on a 64-bit collision
    cum = np.cumsum(sizes[order])
    mid = (cum - sizes[order] / 2.0) / cum[-1]  # a group's centre on the [0, 1] image axis
    bounds = np.cumsum(fr)[:-1]
    group_split = np.empty(names.size, dtype=np.int64)
    group_split[order] = np.searchsorted(bounds, mid, side="right")
    out = np.asarray(SPLITS)[group_split[codes]].astype("<U5")
    return (out, codes) if with_groups else out


def check_fractions(fractions) -> np.ndarray:
    if isinstance(fractions, str):
        try:
            fractions = [float(x) for x in fractions.split(",")]
        except ValueError:
            raise InputError(f"split fractions must be three numbers such as 0.8,0.1,0.1, got {fractions!r}") from None
    fr = np.asarray(list(fractions), dtype=np.float64)
    if fr.size != 3 or not np.all(np.isfinite(fr)) or np.any(fr < 0) or fr.sum() <= 0:
        raise InputError(f"split fractions must be three non-negative numbers (train, val, test), got {fractions!r}")
    if abs(fr.sum() - 1.0) > 1e-6:
        raise InputError(f"split fractions must sum to 1, got {list(fr)} (sum {fr.sum():g})")
    return fr
