"""The Predictor: a run directory (or a per-level set of them) ready to say where photos
were taken.

``Predictor.load(run)`` rebuilds the model(s) from their directories alone
(``geohier.model.load_run``); ``predict_files`` reads photos (paths, bytes, uploads),
runs them through ``geohier.forward`` in batches and combines the per-level logits with
``geohier.combine.combine``; the finest candidates get a position (the mean of the
class's training images, else the cell centroid), a bounding box, and a country and
nearest town from offline data. With ``refine=True`` (a single run that carries
``neighbours.safetensors``), the guess moves from the cell's position to the
similarity-weighted position of the most similar training images inside the kept cells
(``geohier.refine``). A run with a hybrid head (``geohier.model``) answers with the kept
cell's point moved by the offset the model predicts for that cell (clamped to the cell,
``geohier.model.decode_offsets``), in ``points`` and ``predict_logits`` alike; ``points(...,
offset=False)`` gives the cell's point (the centroid rule evaluate reports beside it). With
refinement as well, refinement wins: it replaces the point wherever it finds training images
in the kept cells (real positions of similar images are finer evidence than a regression
inside the cell, and it may pick another kept cell); where it finds none, the hybrid point
stands. With a ``within`` limit the limit's points stand (an offset could leave the limit).
``load_predictor`` keeps the last few predictors loaded,
keyed by the runs' model files (``geohier.runs.runs_key``) and the device, so the CLI and
the pages load a run once and reload it when it is retrained.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from geohier import conformal as cf
from geohier import geodesy
from geohier import refine as rf
from geohier.combine import Combined, KeepRule, Tree, combine, rules_for
from geohier.conformal import Region
from geohier.errors import GeohierError, InputError, WorkspaceError
from geohier.forward import OFFSET, forward_batches, resolve_device
from geohier.prediction import (
    Candidate,
    Points,
    Prediction,
    Refinement,
    cell_positions,
    clean_temperatures,
    place_info,
    position_source,
    synthetic_note,
)
from geohier.runs import NEIGHBOURS_FILE, Run, as_runs, runs_key

#: How the finest class is chosen: ``hierarchical`` walks down the levels (keep rules,
#: children of the kept parents); ``argmax`` takes the finest head alone.
WALKS = ("hierarchical", "argmax")

#: Predictors kept loaded by ``load_predictor`` (the CLI loads one per process; the pages
#: switch between a couple of runs).
CACHE_SIZE = 2


class Predictor:
    """A run (or a per-level set of runs) ready to predict.

    ``Predictor.load(run_dir)`` or ``Predictor.load([run_L1, run_L3, ...])``; the models
    are rebuilt from their directories alone (``geohier.model.load_run``). One backbone
    forward serves every level of a multi-level model.
    """

    def __init__(self, parts: Sequence[tuple[torch.nn.Module, dict, Path]], device: str | torch.device = "cpu"):
        from geohier.hierarchy import Hierarchy
        from geohier.presets import EvalPreset

        if not parts:
            raise InputError("a predictor needs at least one run")
        self.device = torch.device(device)
        self.models = [m for m, _, _ in parts]
        self.metas = [meta for _, meta, _ in parts]
        self.runs = [Path(r) for _, _, r in parts]
        hashes = {meta.get("hierarchy_hash") for meta in self.metas}
        if len(hashes) > 1:
            raise InputError("the runs were trained on different hierarchies ("
                             + ", ".join(f"{r.name}: {str(m.get('hierarchy_hash'))[:12]}"
                                         for r, m in zip(self.runs, self.metas, strict=False)) + "); a set must share one")
        part_levels = [[int(v) for v in meta["arch"]["levels"]] for meta in self.metas]
        flat = [lv for lvs in part_levels for lv in lvs]
        if len(set(flat)) != len(flat):
            raise InputError("the runs of a set must predict distinct levels, got "
                             + ", ".join(f"{r.name}: {lvs}" for r, lvs in zip(self.runs, part_levels, strict=False)))
        self.part_levels = part_levels
        self.hierarchy = Hierarchy.from_dict(self.metas[0]["hierarchy"])
        self.levels = tuple(sorted(flat))
        self.tree = Tree.from_hierarchy(self.hierarchy, self.levels)
        self.finest = self.levels[-1]
        temps = {}
        for meta, lvs in zip(self.metas, part_levels, strict=False):
            temps.update(clean_temperatures(meta, lvs))
        self.temperatures = temps
        self.presets = [EvalPreset.from_meta(meta) for meta in self.metas]
        meta_pos = next((m for m, lvs in zip(self.metas, part_levels, strict=False) if self.finest in lvs), self.metas[0])
        self.positions = cell_positions(self.hierarchy, meta_pos, self.finest)  # (C, 2)
        self.position_source = position_source(meta_pos, self.finest, len(self.positions))
        # the "argmax" walk: the finest head alone, as a one-level tree
        self._flat_tree = Tree.from_hierarchy(self.hierarchy, (self.finest,))
        self.cells = {lv: self.hierarchy.cells(lv) for lv in self.levels}
        self.bounds = np.stack(self.hierarchy.bounds(self.finest), axis=1)  # (C, 4) w, s, e, n; any depth
        # a hybrid head (on the model of the finest level) regresses the offset inside its cells
        self.hybrid = (meta_pos.get("arch") or {}).get("head") == "hybrid"
        self._place_cache: dict[int, tuple] = {}
        self.refine_k = rf.DEFAULT_K
        self.refine_tau = rf.DEFAULT_TAU
        self._index: tuple[tuple, rf.NeighbourIndex] | None = None
        self._limits: dict[str, object] = {}
        self._partition: cf.Partition | None = None
        self._node_areas: np.ndarray | None = None

    @property
    def synthetic_note(self) -> str | None:
        """The warning to show once when every run here learned from the synthetic demo
        world alone (None otherwise)."""
        notes = [synthetic_note(m, f"run {self.name}") for m in self.metas]
        return notes[0] if notes and all(notes) else None

    @classmethod
    def load(cls, runs: str | os.PathLike | Run | Sequence[str | os.PathLike | Run],
             device: str = "auto") -> Predictor:
        """Load a run directory, or several per-level ones (``device="auto"``: CUDA if present)."""
        from geohier.model import load_run

        dev = resolve_device(device)
        parts = []
        for run in as_runs(runs):
            if not run.path.is_dir():
                raise WorkspaceError(f"run directory {run.path} does not exist")
            model, meta = load_run(run.path, device=dev)
            parts.append((model, meta, run.path))
        return cls(parts, dev)

    @property
    def name(self) -> str:
        return "+".join(r.name for r in self.runs)

    def rules(self, rules=None) -> dict[int, KeepRule]:
        return rules_for(self.levels, rules)

    # ------------------------------------------------------------------ refinement

    @property
    def refine_problem(self) -> str | None:
        """Why this predictor cannot refine (None when it can): refinement needs a single
        run that carries the training images' embeddings (``neighbours.safetensors``)."""
        if len(self.runs) != 1:
            return ("refinement needs a single run with neighbours: a per-level set of runs has no shared "
                    "embedding of the images")
        if not Run(self.runs[0]).neighbours_path.is_file():
            return (f"run {self.runs[0].name} has no {NEIGHBOURS_FILE}: only runs trained on a frozen "
                    "backbone's embeddings carry the training images' embeddings that refinement searches")
        return None

    @property
    def can_refine(self) -> bool:
        return self.refine_problem is None

    def neighbour_index(self) -> rf.NeighbourIndex:
        """The run's neighbour index, on the predictor's device (loaded once; reloaded when
        the file changes), checked against the run. InputError when the predictor cannot
        refine, WorkspaceError when the file is unusable."""
        problem = self.refine_problem
        if problem:
            raise InputError(problem)
        path = Run(self.runs[0]).neighbours_path
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError as exc:
            raise WorkspaceError(f"cannot read the neighbour index {path}: {exc}") from None
        if self._index is None or self._index[0] != stamp:
            index = rf.NeighbourIndex.load(path, device=self.device)
            index.check(self.finest, self.tree.num_classes[self.finest], getattr(self.models[0], "feature_dim", None),
                        self.metas[0].get("hierarchy_hash"), where=f"run {self.runs[0].name}: ")
            self._index = (stamp, index)
        return self._index[1]

    # ------------------------------------------------------------------ forward

    def logits(self, images: Sequence) -> dict[int, torch.Tensor]:
        """Per-level logits ``{level: (B, C)}`` float32 on the CPU of PIL images, through
        ``geohier.forward`` (one forward per model; autocast on a GPU, as evaluate runs)."""
        from geohier.dataset import Batch

        groups: dict[tuple, list[int]] = {}
        for i, preset in enumerate(self.presets):  # models with the same preset share the input batch
            groups.setdefault((preset.image_size, tuple(preset.mean), tuple(preset.std)), []).append(i)
        out: dict[int, torch.Tensor] = {}
        index = torch.arange(len(images))
        for members in groups.values():
            preset = self.presets[members[0]]
            x = torch.stack([preset(img) for img in images])  # (B, 3, S, S)
            batch = Batch(x, torch.empty(0, dtype=torch.long), index, [])
            for i in members:
                for _, z in forward_batches(self.models[i], [batch], self.device):
                    if self.finest not in self.part_levels[i]:
                        z.pop(OFFSET, None)  # offsets are the finest level's (a per-level set's other runs)
                    out.update(z)
        return self._levels_of(out)

    def _levels_of(self, out: Mapping) -> dict:
        """The levels' logits of a forward's outputs, and a hybrid head's offsets."""
        return {lv: out[lv] for lv in self.levels} | ({OFFSET: out[OFFSET]} if OFFSET in out else {})

    def logits_and_features(self, images: Sequence) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """``(logits, (B, D) float32 CPU features)`` of PIL images: one forward of a single
        run's model (refinement compares the features with the neighbour index)."""
        from geohier.dataset import Batch

        if len(self.models) != 1:
            raise InputError("features come from a single run; a per-level set of runs has no shared features")
        x = torch.stack([self.presets[0](img) for img in images])  # (B, 3, S, S)
        batch = Batch(x, torch.empty(0, dtype=torch.long), torch.arange(len(images)), [])
        out, feats = {}, torch.zeros(0)
        for _, z, f in forward_batches(self.models[0], [batch], self.device, with_features=True):
            out, feats = z, f
        return self._levels_of(out), feats

    # ------------------------------------------------------------------ predict

    def predict_images(self, images: Sequence, names: Sequence[str] | None = None, rules=None,
                       temperature: bool = True, batch_size: int = 16, gps: Sequence | None = None,
                       places: int = 10, refine: bool = False, walk: str = "hierarchical",
                       coverage: float | None = None, abstain: float | None = None,
                       within=None) -> list[Prediction]:
        """Predictions for PIL images (RGB). ``gps``: per image (lat, lon) or None (the true
        position, to report the error). ``places``: how many of the finest candidates get a
        country and place name (the lookups are the slow part). ``refine``: move the guess
        to the nearest training images inside the kept cells (``can_refine`` runs only)."""
        if refine:
            self.neighbour_index()  # refuse before any forward
        names = list(names) if names is not None else [f"image {i + 1}" for i in range(len(images))]
        gps = list(gps) if gps is not None else [None] * len(images)
        out: list[Prediction] = []
        bs = max(1, int(batch_size))
        for start in range(0, len(images), bs):
            chunk = images[start:start + bs]
            if refine:
                logits, feats = self.logits_and_features(chunk)
            else:
                logits, feats = self.logits(chunk), None
            out += self.predict_logits(logits, names[start:start + bs], gps[start:start + bs],
                                       rules, temperature, places, features=feats, refine=refine, walk=walk,
                                       coverage=coverage, abstain=abstain, within=within)
        return out

    def predict_logits(self, logits: Mapping[int, torch.Tensor], names: Sequence[str], gps: Sequence | None = None,
                       rules=None, temperature: bool = True, places: int = 10, features=None,
                       refine: bool = False, walk: str = "hierarchical", coverage: float | None = None,
                       abstain: float | None = None, within=None) -> list[Prediction]:
        """Predictions from per-level logits ``{level: (B, C)}`` (e.g. cached by a page, so
        that moving a control does not run the model again). ``refine`` needs the images'
        ``features`` (B, D) (``logits_and_features``). ``walk``: see ``WALKS``.

        ``coverage``: add the conformal region of that coverage (``conformal_region``; the
        run needs a conformal calibration). ``abstain``: a prediction whose confidence
        (top finest joint probability, ``confidence``) is under it is ``abstained`` ("not
        sure": the region — the conformal one with ``coverage``, else the kept finest
        cells — instead of a point). ``within``: a region limit (``limit``), applied
        before the keep rules; every answer lies inside it."""
        limit = self.limit(within) if within is not None else None
        if limit is not None and refine:
            raise InputError("--within and --refine do not go together: refinement may move a guess outside "
                             "the limit")
        if coverage is not None:
            self.check_conformal(temperature)
        if abstain is not None:
            abstain = _check_share(abstain, "abstain")
        combined = self._combine(logits, walk, rules, temperature, within=limit)
        gps = list(gps) if gps is not None else [None] * len(names)
        found = None
        if refine:
            found = (self._refine(combined, features), self.neighbour_index())
        positions = limit.positions if limit is not None else None
        offsets = self._offsets(logits) if limit is None else None
        preds = [self._prediction(combined, j, names[j], gps[j], places, found,
                                  positions=positions if offsets is None else self.offset_positions(offsets[j]))
                 for j in range(len(names))]
        if coverage is not None or abstain is not None:
            logp = self.log_joint(logits, temperature, within=limit)
            conf = cf.confidence(logp)
            regions = self.conformal_regions(self.region_log_probs(logits, temperature, within=limit), coverage) \
                if coverage is not None else None
            for j, pred in enumerate(preds):
                pred.confidence = float(conf[j])
                if regions is not None:
                    pred.region = regions[j]
                if abstain is not None:
                    pred.abstained = bool(conf[j] < abstain)
                    if pred.abstained and pred.region is None:
                        pred.region = self.kept_region(combined, j)
        if limit is not None:
            for pred in preds:
                pred.within = limit.within.describe()
        return preds

    # ------------------------------------------------------------------ regions, confidence, limits

    def limit(self, within) -> object:
        """The ``geohier.limits.Limit`` of a ``--within`` text (or a ``Within``, or a Limit
        itself) for this predictor's classes (built once per text)."""
        from geohier import limits

        if isinstance(within, limits.Limit):
            return within
        w = within if isinstance(within, limits.Within) else limits.parse_within(within)
        key = w.describe()
        if key not in self._limits:
            self._limits[key] = limits.build_limit(w, self.tree, self.positions, self.bounds)
        return self._limits[key]

    def log_joint(self, logits: Mapping, temperature: bool = True, within=None) -> torch.Tensor:
        """(B, C_finest) log hierarchical joint probabilities of every finest class
        (``geohier.conformal.log_joint``; the run's temperatures; -inf outside ``within``)."""
        z = {lv: torch.as_tensor(logits[lv]).float().cpu() for lv in self.levels}
        self.check_finite(z)
        limit = self.limit(within) if within is not None else None
        return cf.log_joint(z, self.tree, self.temperatures if temperature else None,
                            limit.allowed if limit is not None else None)

    def confidence(self, logits: Mapping, temperature: bool = True, chunk: int = 1024) -> np.ndarray:
        """(N,) each row's confidence: its top finest joint probability."""
        n = int(torch.as_tensor(logits[self.finest]).shape[0])
        parts = [cf.confidence(self.log_joint({lv: torch.as_tensor(logits[lv])[i:i + chunk] for lv in self.levels},
                                              temperature)) for i in range(0, n, chunk)]
        return np.concatenate(parts) if parts else np.zeros(0)

    @property
    def partition(self) -> cf.Partition:
        """The nodes prediction regions are made of (``geohier.conformal.Partition``): the
        finest classes and every coarser class's rest, with rest shares from the
        hierarchy's image counts."""
        if self._partition is None:
            self._partition = cf.Partition.from_counts(self.tree, {lv: self.hierarchy.counts(lv) for lv in self.levels})
        return self._partition

    def node_areas(self) -> np.ndarray:
        """(N,) km² of every node of ``partition``."""
        if self._node_areas is None:
            self._node_areas = self.partition.areas({lv: self.hierarchy.areas_km2(lv) for lv in self.levels})
        return self._node_areas

    def region_log_probs(self, logits: Mapping, temperature: bool = True, within=None) -> torch.Tensor:
        """(B, N) log probability of every node of ``partition`` (the run's temperatures;
        -inf outside ``within``)."""
        z = {lv: torch.as_tensor(logits[lv]).float().cpu() for lv in self.levels}
        self.check_finite(z)
        limit = self.limit(within) if within is not None else None
        return self.partition.log_probs(z, self.temperatures if temperature else None,
                                        limit.allowed if limit is not None else None)

    @property
    def conformal(self) -> cf.Conformal | None:
        """The run's conformal calibration (meta.json ``conformal``), None without one (or
        for a per-level set of runs, which is never calibrated as one)."""
        if len(self.metas) != 1:
            return None
        return cf.Conformal.from_dict(self.metas[0].get("conformal"))

    @property
    def conformal_stale(self) -> bool:
        """Whether the run's conformal calibration ranked the finest classes alone (written
        before ``space``) while its partition has rests with probability: it no longer
        fits the regions (``check_conformal`` refuses it, ``evaluate`` fits it again)."""
        c = self.conformal
        return c is not None and (c.extra or {}).get("space") != cf.SPACE and self.partition.has_rest

    def check_conformal(self, temperature: bool = True) -> cf.Conformal:
        """The conformal calibration, or an InputError saying how to get one. A calibration
        written before regions could hold rests (no ``space``) ranked the finest classes
        alone: it is refused where the partition has rests with probability (elsewhere
        the two rankings are the same)."""
        c = self.conformal
        how = f"run `python -m pipeline evaluate {self.runs[0].name} --calibrate` to fit it on the run's val split"
        if c is None:
            raise InputError(f"run {self.name} has no conformal calibration for --coverage: {how}")
        if self.conformal_stale:
            raise InputError(f"run {self.name}'s conformal calibration predates regions that hold the cells its "
                             f"hierarchy dropped: {how} again")
        if not temperature:
            raise InputError("--coverage was calibrated with the run's temperatures: drop --no-temperature")
        return c

    def conformal_targets(self, labels) -> np.ndarray:
        """(N,) each image's node (``Partition.targets``): from its labels per level
        ``{level: (N,)}`` (< 0 = no class), or from the finest labels alone."""
        return self.partition.targets(labels)

    def conformal_scores(self, logits: Mapping, labels, chunk: int = 1024) -> np.ndarray:
        """(N,) APS scores of each image's node (``conformal_targets``; +inf for an image
        in no class cell)."""
        t = self.conformal_targets(labels)
        n = t.size
        parts = [cf.aps_scores(self.region_log_probs({lv: torch.as_tensor(logits[lv])[i:i + chunk]
                                                      for lv in self.levels}), t[i:i + chunk], self._aps_u())
                 for i in range(0, n, chunk)]
        return np.concatenate(parts) if parts else np.zeros(0)

    def _aps_u(self) -> float:
        c = self.conformal
        return c.u if c is not None else cf.APS_U

    def finest_areas(self) -> np.ndarray:
        """(C,) km² of each finest class's cell."""
        return self.hierarchy.areas_km2(self.finest)

    def conformal_regions(self, logp: torch.Tensor, coverage: float) -> list[Region]:
        """The conformal region of each row of ``region_log_probs``: the nodes (finest cells
        and rests) a coverage of ``coverage`` keeps, with their area."""
        c = self.check_conformal()
        tau = c.threshold(coverage)
        order, sizes = cf.region_prefix(logp, tau, c.u)
        areas = self.node_areas()
        part = self.partition
        n_fine = self.tree.num_classes[self.finest]
        p = logp.exp().double()
        out = []
        for j in range(logp.shape[0]):
            nodes = order[j, :int(sizes[j])].tolist()
            fine = [k for k in nodes if k < n_fine]
            rest, minus, ranks = [], [], []
            for rank, k in enumerate(nodes, start=1):
                if k >= n_fine:
                    lv, cls = part.node(k)
                    rest.append(self.cells[lv][cls])
                    minus.append(self._sub_cells(lv, cls))
                    ranks.append(rank)
            out.append(Region("conformal", [self.cells[self.finest][k] for k in fine], fine,
                              float(p[j, nodes].sum()), float(areas[nodes].sum()), float(coverage), tau,
                              rest, minus, ranks))
        return out

    def _sub_cells(self, level: int, cls: int) -> list[str]:
        """The cells of a class's class sub-cells at the next predicted level."""
        nxt = self.levels[self.levels.index(level) + 1]
        kids = np.flatnonzero(self.tree.parents[nxt] == cls)
        return [self.cells[nxt][k] for k in kids.tolist()]

    def kept_region(self, combined: Combined, row: int) -> Region:
        """The finest cells the keep rules kept for one row, as a region."""
        n = int(combined.count[self.finest][row])
        idx = combined.index[self.finest][row, :n].tolist()
        score = combined.score[self.finest][row, :n]
        areas = self.finest_areas()
        return Region("kept", [self.cells[self.finest][k] for k in idx], idx, float(score.exp().sum()),
                      float(areas[idx].sum()))

    def conformal_report(self, logits: Mapping, labels, coverages=cf.COVERAGES, chunk: int = 1024,
                         groups=None) -> dict:
        """eval.json's ``conformal``: per coverage, the share of rows whose true node (their
        finest cell, else the rest of their deepest class: ``conformal_targets`` of
        ``labels``) is in its region, i.e. whose point is inside the region, the regions'
        mean/median cells and km², the threshold; with the rows' place ``groups`` also the
        groups' mean covered share and the standard error (``geohier.conformal.summarise``)."""
        c = self.check_conformal()
        t = self.conformal_targets(labels)
        areas = self.node_areas()
        stats: dict[float, list] = {cov: [] for cov in coverages}
        for i in range(0, t.size, chunk):
            logp = self.region_log_probs({lv: torch.as_tensor(logits[lv])[i:i + chunk] for lv in self.levels})
            for cov in coverages:
                stats[cov].append(cf.region_stats(logp, t[i:i + chunk], c.threshold(cov), areas, c.u))
        out = {}
        for cov, parts in stats.items():
            merged = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in
                      ("covered", "cells", "area_km2")}
            out[f"{cov:g}"] = cf.summarise(merged, c.threshold(cov), groups)
        return out

    def conformal_crossfit(self, logits: Mapping, labels, groups, coverages=cf.COVERAGES, method: str = "groups",
                           chunk: int = 1024) -> dict:
        """``geohier.conformal.crossfit`` on these rows: calibrated on half their place
        groups and measured on the other half, both ways, over random halvings."""
        t = self.conformal_targets(labels)
        scores, top = [], []
        for i in range(0, t.size, chunk):
            logp = self.region_log_probs({lv: torch.as_tensor(logits[lv])[i:i + chunk] for lv in self.levels})
            scores.append(cf.aps_scores(logp, t[i:i + chunk], self._aps_u()))
            top.append(cf.top_nodes(logp, t[i:i + chunk]))
        if not scores:
            return cf.crossfit(np.zeros(0), np.zeros(0, bool), np.zeros(0, object), coverages, method)
        return cf.crossfit(np.concatenate(scores), np.concatenate(top), groups, coverages, method)

    # ------------------------------------------------------------------ the one path to points

    def walks(self) -> tuple[str, ...]:
        """The walks this predictor can score: ``argmax`` always, ``hierarchical`` with
        several levels (with one level they are the same walk)."""
        return ("argmax", "hierarchical") if len(self.levels) > 1 else ("argmax",)

    @property
    def default_walk(self) -> str:
        """What ``predict`` answers: the hierarchical walk when there are several levels."""
        return self.walks()[-1]

    def _combine(self, logits: Mapping, walk: str, rules=None, temperature: bool = True,
                 within=None) -> Combined:
        """``combine`` for a walk: ``hierarchical`` down every level (keep rules, masking),
        ``argmax`` the finest head alone. Refuses non-finite logits (corrupt weights).
        ``within``: a region limit; classes outside get -inf logits (zero probability)."""
        if walk not in WALKS:
            raise InputError(f"unknown walk {walk!r}; use one of {', '.join(WALKS)}")
        tree = self.tree if walk == "hierarchical" else self._flat_tree
        z = {lv: torch.as_tensor(logits[lv]).float() for lv in tree.levels}
        self.check_finite(z)
        if within is not None:
            allowed = self.limit(within).allowed
            z = {lv: v.masked_fill(~torch.as_tensor(allowed[lv], device=v.device), float("-inf"))
                 for lv, v in z.items()}
        return combine(z, tree, rules_for(tree.levels, rules), self.temperatures if temperature else None)

    def check_finite(self, logits: Mapping[int, torch.Tensor]) -> None:
        """A ModelError naming the run's weights when a model produced NaN or infinite
        logits: nothing computed from them means anything."""
        bad = [lv for lv, z in logits.items() if z.numel() and not bool(torch.isfinite(z).all())]
        if bad:
            from geohier.model import ModelError

            files = ", ".join(str(Run(r).weights_path) for r in self.runs)
            raise ModelError(f"{files} gives non-finite outputs (NaN or infinity) at level {bad[0]}: the weights "
                             "are corrupt; retrain the run or restore its weights")

    def _offsets(self, logits: Mapping, offset: bool = True) -> torch.Tensor | None:
        """A hybrid head's (N, C_finest, 2) offsets in ``logits`` (None when this is not a
        hybrid run, they are missing, or ``offset`` is False: the centroid rule)."""
        if not (offset and self.hybrid and OFFSET in logits):
            return None
        return torch.as_tensor(logits[OFFSET]).float().cpu()

    def offset_points(self, cls, offsets) -> np.ndarray:
        """(N, 2) hybrid guesses: the points of finest classes ``cls`` (N,) moved by their
        predicted ``offsets`` (N, 2), clamped to their cells (``geohier.model.decode_offsets``)."""
        from geohier.model import decode_offsets

        cls = np.asarray(cls, dtype=np.int64)
        return decode_offsets(np.asarray(offsets, dtype=np.float64), self.positions[cls], self.bounds[cls])

    def offset_positions(self, offsets) -> np.ndarray:
        """(C, 2) every finest class's hybrid point for one image's offsets (C, 2)."""
        return self.offset_points(np.arange(len(self.positions)), offsets)

    def _refine(self, combined: Combined, features, fallback: np.ndarray | None = None) -> rf.Refined:
        """Retrieval refinement of a combination's kept finest cells; rows without a
        training image there keep the best cell's position (``fallback`` (N, 2) when
        given: a hybrid head's points)."""
        index = self.neighbour_index()
        if features is None:
            raise InputError("refinement needs the images' features (Predictor.logits_and_features)")
        kept = rf.kept_lists(combined.index[self.finest], combined.prob[self.finest])
        best = combined.best().cpu().numpy()
        return rf.refine(torch.as_tensor(features), kept, index, k=self.refine_k, tau=self.refine_tau,
                         fallback=self.positions[np.maximum(best, 0)] if fallback is None else fallback)

    def points(self, logits: Mapping, walk: str = "hierarchical", *, features=None, refine: bool = False,
               chunk: int = 1024, offset: bool = True, within=None) -> Points:
        """Predicted points of many rows of logits ``{level: (N, C)}`` (and features (N, D)
        with ``refine``), in chunks of ``chunk`` rows: what ``predict_logits``'s best
        candidate says for each row, without building the per-image objects. The
        evaluation scores these, so its numbers are the answers users get. A hybrid run's
        points are its offset guesses (``logits["offset"]``); ``offset=False``: the cell's
        point instead (the centroid rule). ``within``: a region limit, as ``predict_logits``
        applies it (classes outside it out of the walk, the limit's points, no offsets)."""
        limit = self.limit(within) if within is not None else None
        if limit is not None and refine:
            raise InputError("--within and --refine do not go together: refinement may move a guess outside "
                             "the limit")
        if refine:
            self.neighbour_index()
        n = int(torch.as_tensor(logits[self.finest]).shape[0])
        offsets = self._offsets(logits, offset) if limit is None else None
        positions = limit.positions if limit is not None else self.positions
        source = ("neighbours" if refine else "offset" if offsets is not None
                  else "within" if limit is not None else self.position_source)
        cls, lat, lon, moved = [], [], [], []
        for i in range(0, n, max(1, int(chunk))):
            part = {lv: torch.as_tensor(logits[lv])[i:i + chunk] for lv in self.levels}
            combined = self._combine(part, walk, within=limit)
            best = np.maximum(combined.best().cpu().numpy(), 0)
            cls.append(best)
            guess = None
            if offsets is not None:
                off = offsets[i:i + chunk]
                guess = self.offset_points(best, off[torch.arange(len(best)), torch.as_tensor(best)].numpy())
            if refine:
                found = self._refine(combined, torch.as_tensor(features)[i:i + chunk], fallback=guess)
                lat.append(np.asarray(found.lat, np.float64))
                lon.append(np.asarray(found.lon, np.float64))
                moved.append(np.asarray(found.refined, bool))
            elif guess is not None:
                lat.append(guess[:, 0])
                lon.append(guess[:, 1])
            else:
                lat.append(positions[best, 0])
                lon.append(positions[best, 1])
        if not n:
            return Points(np.zeros(0), np.zeros(0), np.zeros(0, np.int64), None if not refine else np.zeros(0, bool),
                          source)
        return Points(np.concatenate(lat), np.concatenate(lon), np.concatenate(cls).astype(np.int64),
                      np.concatenate(moved) if refine else None, source)

    def read_image(self, src, name: str | None = None):
        """``(RGB image, EXIF (lat, lon) or None)`` of a path, bytes or file object; raises
        an InputError naming the file when it cannot be read. Big photos are decoded
        straight to a few times the model's input size (JPEG DCT scaling): the preset's
        resize needs no more, and a 50 MP photo is never held at full size."""
        from geohier.images import open_image, read_gps, read_source

        name = name or _source_name(src, 0)
        max_side = max(1024, 4 * max(p.image_size for p in self.presets))
        data = io.BytesIO(read_source(src, name))  # read once; the name stays in messages
        data.name = name
        img = open_image(data, max_side=max_side)
        return img, read_gps(data)

    def _prediction(self, c: Combined, row: int, name: str, gps, places: int,
                    found: tuple[rf.Refined, rf.NeighbourIndex] | None = None,
                    positions: np.ndarray | None = None) -> Prediction:
        levels: dict[int, list[Candidate]] = {}
        for i, lv in enumerate(c.levels):
            n = int(c.count[lv][row])
            idx = c.index[lv][row, :n].tolist()
            prob = c.prob[lv][row, :n].tolist()
            score = c.score[lv][row, :n].tolist()
            par = c.parent[lv][row, :n].tolist()
            prev_cells = self.cells[c.levels[i - 1]] if i else None
            levels[lv] = [Candidate(lv, k, self.cells[lv][k], float(p), float(s),
                                    prev_cells[q] if prev_cells is not None and q >= 0 else None)
                          for k, p, s, q in zip(idx, prob, score, par, strict=False)]
        finest = levels[self.finest]
        pos = self.positions if positions is None else positions
        for cand in finest:
            cand.lat, cand.lon = (float(v) for v in pos[cand.index])
            cand.bbox = tuple(float(v) for v in self.bounds[cand.index])
        named = [c.index for c in finest[:places]]
        if positions is None:
            missing = [k for k in named if k not in self._place_cache]
            if missing:
                countries, towns = place_info(self.positions[missing, 0], self.positions[missing, 1])
                self._place_cache.update(zip(missing, zip(countries, towns, strict=False), strict=False))
            for cand in finest[:places]:
                cand.country, cand.place = self._place_cache[cand.index]
        elif named:  # points moved into a region limit: name them where they are now
            countries, towns = place_info(pos[named, 0], pos[named, 1])
            for cand, country, town in zip(finest[:places], countries, towns, strict=False):
                cand.country, cand.place = country, town
        pred = Prediction(name, levels)
        if found is not None:
            pred.refined = bool(found[0].refined[row])
            if pred.refined:
                self._refine_candidate(finest, *found, row, places)
        if gps is not None and pred.best is not None:
            from geohier.metrics import geoscore

            lat, lon = float(gps[0]), float(gps[1])
            d = float(geodesy.haversine_km(pred.best.lat, pred.best.lon, lat, lon))
            pred.true = {"lat": round(lat, 6), "lon": round(lon, 6), "error_km": round(d, 3),
                         "geoscore": round(float(geoscore(d)), 1)}
        return pred

    def _refine_candidate(self, finest: list[Candidate], found: rf.Refined, index: rf.NeighbourIndex, row: int,
                          places: int) -> None:
        """Move the chosen cell's candidate to the front with the refined point."""
        chosen = int(found.cls[row])
        pos = next((i for i, cand in enumerate(finest) if cand.index == chosen), None)
        if pos is None:  # cannot happen: refine only chooses among the kept cells
            return
        cand = finest.pop(pos)
        finest.insert(0, cand)
        rows = found.rows[row]
        neighbours = [{"id": int(i), "lat": round(float(la), 6), "lon": round(float(lo), 6),
                       "sim": round(float(s), 4), "weight": round(float(w), 4)}
                      for i, la, lo, s, w in zip(found.ids[row], index.lat[rows], index.lon[rows],
                                                 found.sims[row], found.weights[row], strict=True)]
        cand.refined = Refinement(cand.lat, cand.lon, neighbours, self.refine_k, self.refine_tau)
        cand.lat, cand.lon = float(found.lat[row]), float(found.lon[row])
        if places > 0:
            countries, towns = place_info([cand.lat], [cand.lon])
            cand.country, cand.place = countries[0], towns[0]

    def predict_files(self, sources: Sequence, names: Sequence[str] | None = None, rules=None,
                      temperature: bool = True, batch_size: int = 16, places: int = 10,
                      refine: bool = False, walk: str = "hierarchical", coverage: float | None = None,
                      abstain: float | None = None, within=None) -> list[Prediction]:
        """Predictions for image files: paths, bytes, or file objects (uploads). A source
        that cannot be read gets a Prediction with ``error`` (the message); the others
        still run. Results come in the order of ``sources``. ``refine``: see
        ``predict_images`` (a predictor that cannot refine is refused before any file is
        read). ``coverage``/``abstain``/``within``: see ``predict_logits`` (refused before
        any file is read when the run cannot do them)."""
        if refine:
            self.neighbour_index()
        if within is not None:
            within = self.limit(within)
        if coverage is not None:
            self.check_conformal(temperature)
            cf.check_coverage(coverage)
        if abstain is not None:
            _check_share(abstain, "abstain")
        names = list(names) if names is not None else [_source_name(s, i) for i, s in enumerate(sources)]
        results: list[Prediction | None] = [None] * len(sources)
        good: list[int] = []
        imgs, gps = [], []
        bs = max(1, int(batch_size))

        def flush():
            preds = self.predict_images(imgs, [names[i] for i in good], rules, temperature, bs, gps, places,
                                        refine=refine, walk=walk, coverage=coverage, abstain=abstain,
                                        within=within)
            for i, p in zip(good, preds, strict=False):
                results[i] = p
            good.clear()
            imgs.clear()
            gps.clear()

        for i, src in enumerate(sources):
            try:
                img, where = self.read_image(src, names[i])
            except GeohierError as exc:
                results[i] = Prediction(names[i], error=str(exc))
                continue
            good.append(i)
            imgs.append(img)
            gps.append(where)
            if len(imgs) >= bs:  # predict as we go: never hold more than a batch of images
                flush()
        if imgs:
            flush()
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ recall vs area

    def truth_areas(self, logits: Mapping, labels, chunk: int = 256) -> np.ndarray:
        """(N,) km² searched before each row's truth is found, ranking the prediction
        regions' nodes (``partition``: the finest cells and the coarser cells' rests) by
        probability (``geohier.conformal.truth_areas``). ``labels``: per level ``{level:
        (N,)}`` (an image with no finest class is found in its class's rest) or the finest
        labels alone; +inf for an image in no class cell."""
        t = self.conformal_targets(labels)
        areas = self.node_areas()
        parts = [cf.truth_areas(self.region_log_probs({lv: torch.as_tensor(logits[lv])[i:i + chunk]
                                                       for lv in self.levels}), t[i:i + chunk], areas)
                 for i in range(0, t.size, chunk)]
        return np.concatenate(parts) if parts else np.zeros(0)

    def recall_area(self, logits: Mapping, labels, points: int = cf.RECALL_AREA_POINTS) -> dict:
        """eval.json's ``recall_area``: the share of truths inside the top-ranked nodes
        (finest cells and rests, as ``truth_areas``) against their cumulative area, at
        ``points`` log-spaced areas from the smallest finest cell to the whole grid."""
        found = self.truth_areas(logits, labels)
        finest = self.finest_areas()
        return {"ranking": "finest cells and coarser cells' rests by hierarchical joint probability "
                           "(temperatures applied)",
                "level": self.finest, "n": int(found.size),
                "points": cf.recall_area_curve(found, float(finest.min()), float(finest.sum()), points)}


def _check_share(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"--{name} must be a probability in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise InputError(f"--{name} must be a probability in [0, 1], got {value!r}")
    return v


def _source_name(src, i: int) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return str(getattr(src, "name", None) or f"image {i + 1}")


def load_predictor(runs: str | os.PathLike | Run | Sequence[str | os.PathLike | Run],
                   device: str = "auto") -> Predictor:
    """``Predictor.load`` through a small cache keyed by the runs' model files and the
    device: a retrained run is reloaded, the same run is not."""
    paths = tuple(r.path for r in as_runs(runs))
    return _load_cached(paths, runs_key(paths), str(resolve_device(device)))


@lru_cache(maxsize=CACHE_SIZE)
def _load_cached(paths: tuple[Path, ...], key: tuple, device: str) -> Predictor:
    # ``key`` is only part of the cache key: new weights, a new entry.
    return Predictor.load(list(paths), device)
