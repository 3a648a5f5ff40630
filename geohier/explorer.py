"""The threshold explorer: what a keep rule costs and buys, measured on a run's val split.

The model runs over the val split once; its per-level logits are cached in the run
directory (``val_logits.safetensors``, with ``val_logits.json`` for the targets, positions
and what the cache was computed from). After that, every setting of the keep rules is
just ``geohier.combine.combine`` over the cached logits, vectorised over all rows at once,
so a control change is answered in tens of milliseconds for 10,000 images:

- ``hit``: the true finest cell is among the kept finest cells;
- ``top1``: the best finest cell is the true one;
- ``acc_25km`` ... ``acc_2500km``: the best cell's position is within that distance;
- ``kept``: the mean number of finest cells kept (the price of a high hit rate).

``Explorer.sweep`` varies one parameter (k, k_max, p or min_prob) on every level at once and
returns the trade-off curve. The numbers are ``geohier.combine.hierarchical_accuracy``'s,
the function the evaluate command uses too, so for the same rule they agree.

>>> import numpy as np, torch
>>> from geohier.combine import KeepRule, Tree
>>> tree = Tree.from_parents([1, 2], {2: [0, 0, 1, 1]})
>>> val = ValSet((1, 2), {1: torch.tensor([[3.0, 0.0]]), 2: torch.tensor([[2.0, 0.0, 0.0, 0.0]])},
...              {1: np.array([0]), 2: np.array([0])}, np.array([10.0]), np.array([10.0]))
>>> ex = Explorer(val, tree, np.array([[10.0, 10.0], [10, 20], [-10, 100], [-10, 110]]))
>>> ex.evaluate(KeepRule("topk", top_k=1))["top1"]
1.0
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from geohier import forward
from geohier.combine import KeepRule, Tree, hierarchical_accuracy, rules_for
from geohier.errors import InputError, WorkspaceError
from geohier.predictor import Predictor
from geohier.runs import Run
from geohier.workspace import Workspace, atomic_write_text

FORMAT = "geohier-val-logits/1"
CACHE_NAME = "val_logits"
DEFAULT_MAX_ROWS = 10_000
# Logits are cached as float32 (exactly what evaluate sees) up to this many numbers, float16 beyond.
FLOAT32_LIMIT = 64_000_000

#: The swept parameter of each rule and its default values.
SWEEPS: dict[str, tuple[str, tuple]] = {
    "topk": ("top_k", (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)),
    "adaptive": ("k_max", (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)),
    "cumulative": ("cumulative", (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)),
}
#: Target coverages of the coverage rule's curve (``Explorer.coverage_curve``).
COVERAGE_SWEEP = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)
MIN_PROB_SWEEP = ("min_prob", (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5))


@dataclass
class ValSet:
    """Cached per-level logits of a split: ``logits[level]`` (N, C), ``targets[level]`` (N,)
    class indices (-1 where the true cell is no class), true ``lat``/``lon`` (N,), and the
    manifest ``ids`` of the rows."""

    levels: tuple[int, ...]
    logits: dict[int, torch.Tensor]
    targets: dict[int, np.ndarray]
    lat: np.ndarray
    lon: np.ndarray
    ids: np.ndarray | None = None
    info: dict | None = None

    @property
    def rows(self) -> int:
        return int(self.lat.shape[0])


class Explorer:
    """Hierarchical accuracy of keep rules over a ValSet (see the module doc)."""

    def __init__(self, val: ValSet, tree: Tree, positions: np.ndarray,
                 temperatures: Mapping[int, float] | None = None):
        self.val = val
        self.tree = tree
        self.positions = np.asarray(positions, dtype=np.float64)
        self.temperatures = dict(temperatures or {})

    @classmethod
    def for_predictor(cls, predictor: Predictor, ws: Workspace, split: str = "val",
                      max_rows: int = DEFAULT_MAX_ROWS, batch_size: int = 64,
                      progress: Callable[[int, int], None] | None = None, refresh: bool = False) -> Explorer:
        """Load (or compute and cache) the split's logits for a predictor's run(s)."""
        val = load_val_logits(predictor, ws, split, max_rows, batch_size, progress, refresh)
        ex = cls(val, predictor.tree, predictor.positions, predictor.temperatures)
        ex.predictor = predictor
        return ex

    predictor: Predictor | None = None

    limit: object | None = None  # the geohier.limits.Limit a ``limited`` explorer applies

    def limited(self, within) -> Explorer:
        """The explorer of the answers ``predict --within`` gives: classes outside the
        region get zero probability before the keep rules (the Predictor's ``limit``, the
        same masking), class points moved inside the region, over the rows whose true class
        lies inside it (at the finest level where the row has one): how the rules do for
        photos from the region when the answers are held to it. InputError for a bad limit
        or when no row lies inside."""
        if self.predictor is None:
            raise InputError("a region limit needs an explorer built for a predictor (Explorer.for_predictor)")
        limit = self.predictor.limit(within)
        inside = np.zeros(self.val.rows, dtype=bool)
        decided = np.zeros(self.val.rows, dtype=bool)
        for lv in reversed(self.val.levels):
            t = np.asarray(self.val.targets[lv])
            has = (t >= 0) & ~decided
            inside[has] = np.asarray(limit.allowed[lv], dtype=bool)[t[has]]
            decided |= has
        if not inside.any():
            raise InputError(f"none of the {self.val.rows:,} val images lies within {limit.describe()}")
        rows = torch.as_tensor(np.flatnonzero(inside))
        logits = {lv: z.index_select(0, rows) for lv, z in self.val.logits.items()}  # masked when scored
        pick = inside
        val = ValSet(self.val.levels, logits, {lv: np.asarray(t)[pick] for lv, t in self.val.targets.items()},
                     self.val.lat[pick], self.val.lon[pick], None if self.val.ids is None else self.val.ids[pick],
                     self.val.info)
        ex = Explorer(val, self.tree, limit.positions, self.temperatures)
        ex.predictor, ex.limit = self.predictor, limit
        return ex

    def logits(self) -> dict[int, torch.Tensor]:
        """The cached rows' logits as they are scored: with a limit, -inf outside it."""
        if self.limit is None:
            return self.val.logits
        return {lv: z.float().masked_fill(~torch.as_tensor(np.asarray(self.limit.allowed[lv], dtype=bool)),
                                          float("-inf")) for lv, z in self.val.logits.items()}

    def coverage_curve(self, coverages: Sequence[float] = COVERAGE_SWEEP) -> list[dict]:
        """The ``coverage`` rule (conformal prediction regions, ``geohier.conformal``) over
        the cached rows: per target coverage, the share of rows whose point is in its
        region (its finest cell, else its deepest class's rest: ``targets`` at every
        level), the regions' mean/median cells and km² (the curve of area against
        coverage), through the Predictor (``Predictor.conformal_report``). On the val
        split this is the calibration set itself, so the coverage holds by construction;
        ``evaluate`` reports it on the held-out test split. InputError when the run has no
        conformal calibration."""
        if self.predictor is None:
            raise InputError("the coverage rule needs an explorer built for a predictor (Explorer.for_predictor)")
        report = self.predictor.conformal_report(self.logits(), self.val.targets, tuple(coverages))
        return [{"target": float(k), **v} for k, v in report.items()]

    def evaluate(self, rules: KeepRule | Mapping[int, KeepRule] | None = None, temperature: bool = True) -> dict:
        """``hierarchical_accuracy`` of one setting over every cached row."""
        return hierarchical_accuracy(self.logits(), self.tree, self.val.targets, self.val.lat, self.val.lon,
                                     self.positions, rules, self.temperatures if temperature else None)

    def sweep(self, rules: KeepRule | Mapping[int, KeepRule] | None = None, temperature: bool = True,
              param: str | None = None, values: Sequence | None = None) -> list[dict]:
        """The trade-off curve: one ``evaluate`` per value of ``param`` set on every level.

        ``param`` defaults to the finest level's main knob (top_k, k_max or cumulative);
        ``"min_prob"`` sweeps the minimum probability. Each row is the metrics plus
        ``param`` and ``value``. Values a rule refuses are skipped."""
        rules = rules_for(self.tree.levels, rules)
        default_param, default_values = sweep_for(rules[self.tree.levels[-1]], param)
        param = param or default_param
        values = default_values if values is None else values
        rows = []
        for v in values:
            try:
                varied = {lv: replace(r, **{param: v}) for lv, r in rules.items()}
            except InputError:
                continue
            m = self.evaluate(varied, temperature)
            m.update(param=param, value=v)
            rows.append(m)
        return rows


def sweep_for(rule: KeepRule, param: str | None = None) -> tuple[str, tuple]:
    """(parameter, default values) swept for a rule: its main knob, or ``param``."""
    if param in (None, ""):
        return SWEEPS[rule.rule]
    if param == "min_prob":
        return MIN_PROB_SWEEP
    for name, values in SWEEPS.values():
        if name == param:
            return name, values
    raise InputError(f"cannot sweep {param!r}; choose top_k, k_max, cumulative or min_prob")


# ----------------------------------------------------------------------------- the cache


def _stamp(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _split_ids(predictor: Predictor, ws: Workspace, split: str) -> np.ndarray:
    """The run's own ``split`` image ids (``geohier.splits``); a per-level set must share one."""
    from geohier import splits

    if not ws.has_manifest():
        raise WorkspaceError(f"no manifest in {ws.data_dir}: the explorer needs images with a {split} split "
                             "(python -m pipeline demo, then labels)")
    found = [splits.run_ids(run, ws, split, meta) for run, meta in zip(predictor.runs, predictor.metas, strict=True)]
    if len({f.hash for f in found}) > 1:
        raise WorkspaceError("the runs of this set were trained on different splits ("
                             + ", ".join(f"{r.name}: {f.hash[:12]}" for r, f in zip(predictor.runs, found, strict=True))
                             + "); explore them one at a time")
    return found[0].ids


def cache_key(predictor: Predictor, ws: Workspace, split: str, max_rows: int) -> dict:
    """What a cache was computed from: the weights, the hierarchy, the split's ids."""
    ids = _split_ids(predictor, ws, split)
    return {"format": FORMAT, "split": split, "max_rows": int(max_rows),
            "hierarchy_hash": predictor.hierarchy.hash, "levels": list(predictor.levels),
            "weights": {r.name: _stamp(Run(r).weights_path) for r in predictor.runs},
            "data_dir": str(ws.data_dir),
            "split_ids": hashlib.sha256(ids.tobytes()).hexdigest(), "split_rows": int(ids.size)}


def cache_paths(predictor: Predictor) -> tuple[Path, Path]:
    """(safetensors, json) paths of a predictor's cache: in its (first) run directory."""
    name = CACHE_NAME
    if len(predictor.runs) > 1:  # a per-level set: name the cache after its members
        digest = hashlib.sha256("|".join(str(r.resolve()) for r in predictor.runs).encode()).hexdigest()[:10]
        name = f"{CACHE_NAME}-set-{digest}"
    base = predictor.runs[0]
    return base / f"{name}.safetensors", base / f"{name}.json"


def read_cache(predictor: Predictor, key: dict) -> ValSet | None:
    """The cached ValSet when it exists and matches ``key``; else None."""
    from geohier.fileio import read_safetensors

    tpath, jpath = cache_paths(predictor)
    try:
        doc = json.loads(jpath.read_text("utf-8"))
        if doc.get("key") != key:
            return None
        tensors = read_safetensors(tpath, ValueError)  # unreadable: no cache
        levels = tuple(int(v) for v in doc["levels"])
        logits = {lv: tensors[f"logits.{lv}"].float() for lv in levels}
        targets = {lv: np.asarray(doc["targets"][str(lv)], dtype=np.int64) for lv in levels}
        val = ValSet(levels, logits, targets, np.asarray(doc["lat"], dtype=np.float64),
                     np.asarray(doc["lon"], dtype=np.float64), np.asarray(doc["ids"], dtype=np.int64),
                     {"cached": True, **doc.get("info", {})})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(val.logits[lv].shape != (val.rows, predictor.tree.num_classes[lv]) for lv in levels):
        return None
    return val


def write_cache(predictor: Predictor, key: dict, val: ValSet) -> bool:
    """Write the cache (atomically); False when the run directory is not writable."""
    from geohier.fileio import save_tensors_atomic

    tpath, jpath = cache_paths(predictor)
    numbers = val.rows * sum(int(t.shape[1]) for t in val.logits.values())
    dtype = torch.float32 if numbers <= FLOAT32_LIMIT else torch.float16
    doc = {"format": FORMAT, "key": key, "levels": list(val.levels), "rows": val.rows,
           "dtype": str(dtype).replace("torch.", ""),
           "ids": val.ids.tolist() if val.ids is not None else None,
           "lat": val.lat.tolist(), "lon": val.lon.tolist(),
           "targets": {str(lv): val.targets[lv].tolist() for lv in val.levels},
           "info": val.info or {}}
    try:
        save_tensors_atomic(tpath, {f"logits.{lv}": val.logits[lv].to(dtype).contiguous() for lv in val.levels},
                            metadata={"format": FORMAT})
        atomic_write_text(jpath, json.dumps(doc) + "\n")
    except OSError:
        return False
    return True


def compute_val_logits(predictor: Predictor, ws: Workspace, split: str = "val",
                       max_rows: int = DEFAULT_MAX_ROWS, batch_size: int = 64,
                       progress: Callable[[int, int], None] | None = None) -> ValSet:
    """Run the predictor's model(s) over (at most ``max_rows`` of) the split.

    Rows are those of ``geohier.dataset.ManifestDataset`` (the evaluate command's), a
    seeded sample of ``max_rows`` when the split is larger; images that fail to decode
    are left out."""
    from torch.utils.data import DataLoader

    from geohier.dataset import ManifestDataset, collate

    if max_rows < 1:
        raise InputError(f"max_rows must be >= 1, got {max_rows}")
    t0 = time.perf_counter()
    # Models with the same preset share one pass over the images (a multi-level run: one).
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(predictor.presets):
        groups.setdefault((p.image_size, tuple(p.mean), tuple(p.std)), []).append(i)
    per_group = []
    total = 0
    ids = _split_ids(predictor, ws, split)
    for members in groups.values():
        ds = ManifestDataset(ws, predictor.hierarchy, split, transform=predictor.presets[members[0]],
                             limit=max_rows, seed=0, ids=ids)
        per_group.append((members, ds))
        total += len(ds)
    if per_group[0][1].stats["images"] == 0:
        raise InputError(f"the {split} split of {ws.data_dir} has no usable image "
                         "(build splits with `python -m pipeline labels`)")
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    outs: dict[int, torch.Tensor] = {}
    kept_index = None
    ds0 = per_group[0][1]
    for members, ds in per_group:
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate)
        num_classes = {lv: predictor.tree.num_classes[lv] for i in members for lv in predictor.part_levels[i]}
        got = forward.collect([predictor.models[i] for i in members], loader, predictor.device, num_classes,
                              progress=tick)
        idx = got.index
        if kept_index is None:
            kept_index = idx
        elif not np.array_equal(kept_index, idx):  # a file failed in one pass only: keep the common rows
            common = np.intersect1d(kept_index, idx)
            for lv in list(outs):
                outs[lv] = outs[lv][torch.from_numpy(np.searchsorted(kept_index, common))]
            kept_index = common
        for lv, z in got.logits.items():
            outs[lv] = z[torch.from_numpy(np.searchsorted(idx, kept_index))]
    predictor.check_finite(outs)  # corrupt weights: refused, never swept
    levels = predictor.levels
    cols = list(ds0.levels)
    labels = ds0.labels[kept_index]
    targets = {lv: np.where(labels[:, cols.index(lv)] >= 0, labels[:, cols.index(lv)], -1).astype(np.int64)
               for lv in levels}
    for lv in levels:
        outs.setdefault(lv, torch.zeros(0, predictor.tree.num_classes[lv]))
    info = {"split": split, "rows": int(kept_index.size), "split_rows": int(ds0.stats["rows"]),
            "sampled": bool(ds0.stats["images"] < ds0.stats["rows"] - ds0.stats.get("unlabelled", 0)
                            - ds0.stats.get("missing", 0)),
            "skipped": int(len(ds0) - kept_index.size), "seconds": round(time.perf_counter() - t0, 2),
            "runs": [r.name for r in predictor.runs]}
    return ValSet(tuple(levels), {lv: outs[lv] for lv in levels}, targets, ds0.lat[kept_index],
                  ds0.lon[kept_index], ds0.ids[kept_index], info)


def load_val_logits(predictor: Predictor, ws: Workspace, split: str = "val", max_rows: int = DEFAULT_MAX_ROWS,
                    batch_size: int = 64, progress: Callable[[int, int], None] | None = None,
                    refresh: bool = False) -> ValSet:
    """The cached ValSet of a predictor's run(s), computed (and cached) when missing or
    stale: another weights file, hierarchy, split membership or ``max_rows``."""
    key = cache_key(predictor, ws, split, max_rows)
    if not refresh:
        val = read_cache(predictor, key)
        if val is not None:
            return val
    val = compute_val_logits(predictor, ws, split, max_rows, batch_size, progress)
    val.info = dict(val.info or {}, cached=write_cache(predictor, key, val))
    return val


def has_cache(predictor: Predictor, ws: Workspace, split: str = "val", max_rows: int = DEFAULT_MAX_ROWS) -> bool:
    """Whether a fresh cache exists (the page says "computing..." otherwise)."""
    try:
        key = cache_key(predictor, ws, split, max_rows)
    except (WorkspaceError, OSError):
        return False
    tpath, jpath = cache_paths(predictor)
    if not (tpath.exists() and jpath.exists()):
        return False
    try:
        return json.loads(jpath.read_text("utf-8")).get("key") == key
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------- synthetic data


def synthetic_hierarchy(levels: Sequence[int] = (1, 3, 5, 8), points: int = 150_000, towns: int = 400,
                        min_images: int = 5, seed: int = 0):
    """A hierarchy of realistic shape: ``points`` photo positions around ``towns`` towns of
    Pareto-distributed sizes (a few big cities, many small towns). At the default levels
    it has about 4, 50, 550 and 7,500 classes, up to ~60 children under one parent."""
    from geohier.hierarchy import build_hierarchy

    rng = np.random.default_rng(seed)
    t_lat = rng.uniform(-45, 65, towns)
    t_lon = rng.uniform(-170, 170, towns)
    size = rng.pareto(1.2, towns) + 1
    pick = rng.choice(towns, points, p=size / size.sum())
    lat = np.clip(t_lat[pick] + rng.normal(0, 1.5, points), -89, 89)
    lon = t_lon[pick] + rng.normal(0, 2.0, points)
    return build_hierarchy(lat, lon, levels, min_images=min_images)


def synthetic(rows: int = 10_000, levels: Sequence[int] = (1, 3, 5, 8), hierarchy=None, seed: int = 0,
              skill: float = 3.0) -> Explorer:
    """An Explorer over made-up val rows, for benchmarks and demos.

    The tree is ``hierarchy``'s (default: ``synthetic_hierarchy(levels)``); targets are
    drawn in proportion to the finest classes' image counts; each row's true class gets a
    logit bonus of ``skill`` at every level over N(0, 1) noise; positions are centroids."""
    rng = np.random.default_rng(seed)
    h = hierarchy if hierarchy is not None else synthetic_hierarchy(levels, seed=seed)
    tree = Tree.from_hierarchy(h)
    levels = tree.levels
    finest = levels[-1]
    counts = np.asarray(h.counts(finest), dtype=np.float64) + 1.0
    t = {finest: rng.choice(tree.num_classes[finest], rows, p=counts / counts.sum())}
    for prev, lv in zip(levels[-2::-1], levels[:0:-1], strict=False):
        t[prev] = tree.parents[lv][t[lv]]
    logits = {}
    for lv in levels:
        z = rng.standard_normal((rows, tree.num_classes[lv]), dtype=np.float32)
        z[np.arange(rows), t[lv]] += skill
        logits[lv] = torch.from_numpy(z)
    lat_c, lon_c = h.centroids(finest)
    positions = np.stack([lat_c, lon_c], 1)
    jitter = rng.normal(0, 0.2, (rows, 2))
    lat = np.clip(positions[t[finest], 0] + jitter[:, 0], -90, 90)
    lon = positions[t[finest], 1] + jitter[:, 1]
    val = ValSet(levels, logits, t, lat, lon, np.arange(rows), {"synthetic": True})
    return Explorer(val, tree, positions)
