"""``python -m pipeline evaluate``: calibrate a run and measure it.

``calibrate_run`` fits one softmax temperature per level on the val split (minimising
the NLL) and stores it in the run's meta.json with the calibration error before and
after. ``evaluate_run`` measures the run on its test split (or val, or an external CSV
of path, lat, lon) and writes the run's eval report:

- per level: top-1/5/10, NLL and expected calibration error before/after temperature,
  with the reliability-diagram bins of both;
- the geolocation protocol: accuracy within 1/25/200/750/2500 km, median / mean error
  km and mean GeoScore, the predicted point being the centroid of the finest predicted
  cell (or the mean position of its training images when meta.json has
  ``cell_positions``);
- per country of the true location: images, country accuracy (predicted point in the
  same country), km accuracies, median km;
- ``conformal``: for coverages 0.8/0.9/0.95, the prediction regions of
  ``geohier.conformal`` (calibrated by ``calibrate_run`` on the val split, after the
  temperatures, each image weighed by its place group): ``coverage``, the share of images
  whose point is inside their region (finest cells, and the rests of coarser cells where a
  fixed-level hierarchy dropped cells), with ``coverage_se``; ``group_coverage``, the
  place groups' mean share (what the calibration guarantees), with ``group_coverage_se``;
  the regions' mean/median cells and km², the score threshold; and ``crossfit``: the
  coverage when the test split's own place groups, dealt into halves, calibrate each
  other (``geohier.conformal.crossfit``). ``conformal_calibration`` says how the
  calibration was made: split, method, images, groups;
- ``abstention``: accuracy at 25/200/750/2500 km of the most confident 10%..100% of the
  images (confidence: the top hierarchical joint probability);
- ``recall_area``: the share of truths inside the top-ranked finest cells (by joint
  probability) against those cells' cumulative area, at 30 log-spaced areas;
- with ``refine`` (a run that carries ``neighbours.safetensors``): the same protocol for
  the rule ``hierarchical+refine``, the guess moved to the similarity-weighted position
  of the most similar training images inside the kept cells (``geohier.refine``), and a
  leaderboard entry ``<run> +refine`` beside the run's own.

The page's "evaluate" button and the CLI call the same two functions.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from geohier import archives, benchmark, forward, geodesy, metrics, runs, tables
from geohier import conformal as cf
from geohier import refine as rf
from geohier import splits as splits_mod
from geohier.errors import GeohierError, InputError, WorkspaceError
from geohier.leaderboard import Leaderboard
from geohier.prediction import clean_temperatures
from geohier.predictor import Predictor
from geohier.runs import Run
from geohier.workspace import Workspace, json_safe, utcnow
from pipeline.score import num, pct, record_baselines

EVAL_FORMAT = "geohier-eval/1"
SPLIT_CHOICES = ("test", "val")

# External CSVs use pipeline.ingest's column aliases (geohier's own path/lat/lon, OSV-5M's
# id/latitude/longitude, Im2GPS3k's IMG_ID/LAT/LON) and its image locator.


# ----------------------------------------------------------------------------- inputs

def csv_columns(header: list[str], source: str = "the CSV") -> tuple[str, str, str]:
    """(image column, lat column, lon column) of a CSV header, matched by
    ``geohier.tables.match_columns``; InputError naming a missing column and its aliases."""
    cols = tables.match_columns([str(h) for h in header], source)
    return cols.path or cols.id, cols.lat, cols.lon


def read_points_csv(csv: str | os.PathLike, images_root: str | os.PathLike | None = None) -> pd.DataFrame:
    """An external evaluation CSV as a frame of absolute ``path``, ``lat``, ``lon``, ``key``.

    The rows are chosen as the truth set's (``geohier.benchmark.select_rows``: coordinates
    checked by ``tables.parse_point``, an image id or path, the first row of each key), so
    a row is left out of both sides or of neither. Images are looked up under
    ``images_root`` (default: the CSV's folder) as ``pipeline import-csv`` does
    (``tables.Locator``); a path that leads outside the root (``../``, an absolute path
    elsewhere, a symlink out) is left out without its file being opened. A row whose
    image is not found keeps its would-be path (``PointsDataset`` counts it as missing).

    ``frame.attrs``: ``rows`` (data rows of the CSV), ``invalid`` (rows with invalid
    coordinates) and ``skipped`` ({reason: rows} of every row left out of the frame).
    A malformed CSV is an InputError naming the file and the line.
    """
    csv = Path(csv).expanduser()
    if not csv.is_file():
        raise InputError(f"CSV file {csv} does not exist")
    header, rows = tables.read_rows(csv)
    ref_col, latcol, loncol = csv_columns(header, str(csv))
    root = Path(images_root).expanduser() if images_root else csv.parent
    tables.check_images_root(root)
    sel = benchmark.select_rows(rows, ref_col, latcol, loncol)
    skipped = sel.skipped()
    locate = tables.Locator(root)
    keep, paths = [], []
    for i in sel.keep:
        found, why = locate.locate(sel.refs[i])
        if why is not None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        keep.append(i)
        paths.append(str(found) if found is not None else str(root / sel.refs[i]))
    keep = np.asarray(keep, dtype=np.int64)
    out = pd.DataFrame({"path": pd.Series(paths, dtype=object), "lat": sel.lat[keep], "lon": sel.lon[keep],
                        "key": pd.Series(sel.keys[keep], dtype=object)})
    out.attrs["invalid"] = int(sum(n for why, n in sel.invalid.items() if why != tables.MISSING_REF))
    out.attrs["rows"] = len(rows)
    out.attrs["skipped"] = skipped
    return out


class PointsDataset(Dataset):
    """Images at given paths with known positions, labelled by a hierarchy like
    ``geohier.dataset.ManifestDataset`` (same item and attribute shapes)."""

    def __init__(self, frame: pd.DataFrame, hierarchy, transform: Callable | None = None):
        from geohier.dataset import IGNORE_INDEX

        self.levels = [int(v) for v in hierarchy.levels]
        exists = np.array([archives.exists(p) for p in frame["path"]], dtype=bool)
        self.missing_examples = [str(p) for p in frame["path"][~exists][:5]]
        frame = frame[exists].reset_index(drop=True)
        self.paths = frame["path"].to_numpy(object)
        self.keys = (frame["key"] if "key" in frame else frame["path"].map(tables.image_key)).to_numpy(object)
        self.lat = frame["lat"].to_numpy(np.float64)
        self.lon = frame["lon"].to_numpy(np.float64)
        if len(frame):
            per = hierarchy.labels(self.lat, self.lon)
            labels = np.stack([per[lv] for lv in self.levels], 1).astype(np.int64)
        else:
            labels = np.zeros((0, len(self.levels)), np.int64)
        labels[labels < 0] = IGNORE_INDEX
        self.labels = labels
        self.transform = transform
        self.stats = {"rows": int(len(exists)), "missing": int((~exists).sum()), "images": int(len(frame))}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from geohier.dataset import Skipped
        from geohier.images import decode_side_for, open_image

        path = self.paths[i]
        try:
            x = self.transform(open_image(path, max_side=decode_side_for(self.transform)))
        except (GeohierError, OSError, ValueError) as exc:
            return Skipped(int(i), str(path), str(exc).splitlines()[0][:200])
        return x, torch.from_numpy(self.labels[i]), int(i)


# ----------------------------------------------------------------------------- running the model

def collect_logits(model, dataset, levels: list[int], batch_size: int = 64, num_workers: int = 0,
                   device: str | None = None, progress: bool = True, features: bool = False) -> dict:
    """Run ``model`` (a GeoModel, or a Predictor's single model) over ``dataset``:
    ``{"logits": {level: (N, C) float32}, "labels": {level: (N,)}, "lat", "lon" (N,),
    "index" (N,), "skipped": [...]}`` for the images that decoded (and ``"features"`` (N, D)
    float32 with ``features``, for refinement). A Predictor refuses non-finite logits."""
    from geohier.dataset import collate

    predictor = model if isinstance(model, Predictor) else None
    if predictor is not None:
        if len(predictor.models) != 1:
            raise InputError("evaluation runs one run at a time; a per-level set has no single model")
        model = predictor.models[0]
    dev = forward.resolve_device(device)
    model = model.to(dev).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(dataset), desc="evaluate", unit="img", file=sys.stderr, leave=False)
    try:
        out = forward.collect(model, loader, dev, {lv: model.config.num_classes[lv] for lv in levels},
                              progress=bar.update if bar is not None else None, with_features=features)
    finally:
        if bar is not None:
            bar.close()
    if predictor is not None:
        predictor.check_finite(out.logits)
    idx = out.index
    ds_levels = list(dataset.levels)
    labels = {lv: dataset.labels[idx, ds_levels.index(lv)] for lv in levels}
    result = {"logits": out.logits, "labels": labels, "lat": dataset.lat[idx], "lon": dataset.lon[idx],
              "index": idx, "skipped": out.skipped}
    if features:
        result["features"] = out.features
    return result


def _check_not_running(run_dir: Path) -> None:
    """Refuse a run that another live process is still training (it rewrites meta.json and
    the weights). The training process itself may calibrate its own run at the end, and a
    run whose process died counts as failed, not running."""
    run = Run(run_dir)
    state = run.status().get("state")
    pid, start = runs.training_pid(run)
    if pid == os.getpid():
        return
    alive = runs.pid_alive(pid, start)
    if state in runs.ACTIVE_STATES and alive:
        raise WorkspaceError(f"run {run.name} is still {state}; evaluate it when it has finished")
    if alive:
        raise WorkspaceError(f"run {run.name}'s training process is still finishing (calibrating); "
                             "try again in a moment")


def _load(run_dir: Path, device) -> Predictor:
    """The run as users get it: the Predictor (model, hierarchy, temperatures, points)."""
    return Predictor.load(run_dir, device=str(forward.resolve_device(device)))


def _split_dataset(ws: Workspace, predictor: Predictor, split: str) -> tuple:
    """(dataset, RunSplit) of the run's own ``split`` images (``geohier.splits.run_ids``)."""
    from geohier.dataset import ManifestDataset
    from geohier.presets import EvalPreset

    meta = predictor.metas[0]
    own = splits_mod.run_ids(predictor.runs[0], ws, split, meta)
    ds = ManifestDataset(ws, predictor.hierarchy, split, transform=EvalPreset.from_meta(meta), ids=own.ids)
    return ds, own


# ----------------------------------------------------------------------------- calibration


def _check_method(method: str) -> str:
    if method not in cf.METHODS:
        raise InputError(f"unknown conformal weighing {method!r}; use one of {', '.join(cf.METHODS)}")
    return method


def calibrate_run(run_dir: str | os.PathLike, ws: Workspace, batch_size: int = 64,
                  device: str | None = None, num_workers: int = 0, progress: bool = True,
                  collected: dict | None = None, conformal_method: str = cf.DEFAULT_METHOD) -> dict:
    """Fit one temperature per level on the run's own val split and store it in meta.json,
    then the split-conformal calibration of the prediction regions on the same images
    after temperature scaling (meta.json ``conformal``: the sorted APS scores, see
    ``geohier.conformal``). ``conformal_method``: ``groups`` weighs each place group alike
    (the coverage guarantee counts places: the default), ``images`` each image alike (it
    counts photos; a place with many photos weighs more).

    Returns ``{level: {"temperature", "n", "ece_before", "ece_after", "nll_before",
    "nll_after"}}`` (level keys as strings), which is also stored as meta.json's
    ``calibration.levels`` (with the split version it was fitted on); meta.json is
    rewritten atomically. Raises InputError when the val split has no usable image,
    WorkspaceError while the run is still training or when its split is gone."""
    run_dir = Path(run_dir)
    conformal_method = _check_method(conformal_method)
    _check_not_running(run_dir)
    predictor = _load(run_dir, device)
    levels = list(predictor.levels)
    own = None
    if collected is None:
        ds, own = _split_dataset(ws, predictor, "val")
        if len(ds) == 0:
            raise InputError(f"run {run_dir.name}'s val split has no usable image to calibrate on "
                             "(run `python -m pipeline labels` to make splits)")
        collected = collect_logits(predictor, ds, levels, batch_size, num_workers, device, progress)
    out: dict[str, dict] = {}
    temps = {str(lv): t for lv, t in clean_temperatures(predictor.metas[0]).items()}
    for lv in levels:
        z, y = collected["logits"][lv], collected["labels"][lv]
        n = int((np.asarray(y) >= 0).sum())
        t = metrics.fit_temperature(z, y) if n else 1.0
        out[str(lv)] = {"temperature": t, "n": n,
                        "ece_before": metrics.expected_calibration_error(metrics.softmax(z), y) if n else None,
                        "ece_after": metrics.expected_calibration_error(metrics.softmax(z, t), y) if n else None,
                        "nll_before": metrics.nll(z, y, 1.0) if n else None,
                        "nll_after": metrics.nll(z, y, t) if n else None}
        temps[str(lv)] = t
    # re-read the meta right before writing: the smallest window for a concurrent writer
    from geohier.model import read_meta

    # split conformal calibration on the same val images, after temperature scaling: the
    # APS scores of the nodes their points are in (geohier.conformal), through the
    # Predictor, each image weighed by its place group (the unit the splits are dealt in)
    finest = max(levels)
    predictor.temperatures = {int(lv): float(t) for lv, t in temps.items() if int(lv) in levels}
    conformal = None
    scores = predictor.conformal_scores(collected["logits"], collected["labels"])
    groups = splits_mod.groups_of(ws, ds.ids[collected["index"]], own.splits) \
        if own is not None and conformal_method == "groups" else None
    if scores.size:
        conformal = cf.Conformal.fit(scores, groups=groups, level=finest, split="val", fitted_at=utcnow(),
                                     temperatures={str(lv): t for lv, t in predictor.temperatures.items()},
                                     **({"split_hash": own.hash} if own is not None else {})).to_dict()
    fresh = read_meta(run_dir)
    fresh["temperatures"] = temps
    if conformal is not None:
        fresh["conformal"] = json_safe(conformal)
    fresh["calibration"] = json_safe({"split": "val", "fitted_at": utcnow(), "levels": out,
                                      **({"split_hash": own.hash} if own is not None else {})})
    Run(run_dir).write_meta(fresh)
    return json_safe(out)


# ----------------------------------------------------------------------------- evaluation

def refine_rule(levels: list[int]) -> str:
    """The eval.json rule name of refinement: the walk it refines, ``+refine``."""
    return ("hierarchical" if len(levels) > 1 else "argmax") + "+refine"


def _countries(lat, lon) -> tuple[np.ndarray, np.ndarray] | None:
    """(country name, ISO 3166 alpha-3 code) of each point ("" where none)."""
    from geohier.geography import country_of

    if len(lat) == 0:
        return np.zeros(0, object), np.zeros(0, object)
    table = country_of(np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64))
    names = table["country"].fillna("").astype(str).to_numpy(object)
    iso3 = table["iso_a3"].fillna("").astype(str).to_numpy(object) if "iso_a3" in table else np.full(len(names), "")
    iso3 = np.where(np.char.str_len(iso3.astype(str)) == 3, iso3, "").astype(object)  # "-99" = none
    return names, iso3


def country_table(true_lat, true_lon, pred_lat, pred_lon, distances, min_images: int = 1) -> list[dict]:
    """Per country of the true location: ``country`` (name), ``iso3``, ``n``,
    ``country_acc`` (predicted point in the same country), km accuracies, median / mean
    km, GeoScore; largest countries first. Points in no country (the sea) are left out;
    """
    true_name, true_iso = _countries(true_lat, true_lon)
    pred_name = _countries(pred_lat, pred_lon)[0]
    distances = np.asarray(distances, dtype=np.float64)
    rows = []
    for c in sorted({c for c in true_name if c}):
        m = true_name == c
        if int(m.sum()) < min_images:
            continue
        d = metrics.distance_metrics(distances[m])
        row = {"country": str(c), "iso3": str(true_iso[m][0]) or None, "n": int(m.sum()),
               "country_acc": float((pred_name[m] == c).mean())}
        row.update({k: v for k, v in d.items() if k != "n"})
        rows.append(row)
    rows.sort(key=lambda r: (-r["n"], r["country"]))
    return rows


def evaluate_run(run_dir: str | os.PathLike, ws: Workspace, csv: str | os.PathLike | None = None,
                 images_root: str | os.PathLike | None = None, split: str = "test",
                 batch_size: int = 64, device: str | None = None, num_workers: int = 0,
                 calibrate: bool | None = None, progress: bool = True, refine: bool = False,
                 refine_k: int = rf.DEFAULT_K, refine_tau: float = rf.DEFAULT_TAU,
                 within: str | None = None, conformal_method: str | None = None) -> dict:
    """Evaluate a run; write ``eval.json`` into the run and return its content.

    ``csv``: evaluate on an external CSV (path, lat, lon; OSV-5M and Im2GPS3k column names
    accepted; image paths relative to ``images_root``) instead of the workspace's
    ``split``. ``calibrate``: fit temperatures on the val split first (None = only when
    meta.json has none fitted yet and the workspace has a val split). ``refine``: also
    score retrieval refinement (``refine_k`` neighbours per cell, temperature
    ``refine_tau``; see ``geohier.refine``) as its own rule and leaderboard entry; a run
    without ``neighbours.safetensors`` is refused before anything runs. ``within``: score
    the guesses ``predict --within`` gives (a region limit, ``geohier.limits``) on every
    image; its leaderboard entry is ``<run> within <limit>``, beside the unlimited one.
    ``conformal_method`` (``groups`` or ``images``, see ``calibrate_run``): recalibrate
    when the run's conformal calibration weighs its images otherwise (None: keep it, or
    ``groups`` for a new one).
    """
    run_dir = Path(run_dir)
    if split not in SPLIT_CHOICES:
        raise InputError(f"unknown split {split!r}; use one of {', '.join(SPLIT_CHOICES)}")
    _check_not_running(run_dir)
    t0 = time.perf_counter()
    predictor = _load(run_dir, device)
    if within is not None and refine:
        raise InputError("--within and --refine do not go together: refinement may move a guess outside the limit")
    if within is not None:
        predictor.limit(within)  # a bad limit is refused before anything runs
    if refine:
        predictor.refine_k, predictor.refine_tau = int(refine_k), float(refine_tau)
        predictor.neighbour_index()  # refuse before anything runs
    meta = predictor.metas[0]
    stale = predictor.conformal_stale  # a calibration of the finest classes alone, for a hierarchy with rests
    have = predictor.conformal.method if predictor.conformal is not None else None
    if conformal_method is not None:
        _check_method(conformal_method)
        if have is not None and have != conformal_method and calibrate is False:
            raise InputError(f"the run's conformal calibration weighs {have}, not {conformal_method}: "
                             "drop --no-calibrate to recalibrate, or drop --conformal-weights")
        stale = stale or have != conformal_method
    if calibrate or (calibrate is None and ("calibration" not in meta or stale) and _has_split(ws, "val")):
        calibrate_run(run_dir, ws, batch_size, device, num_workers, progress,  # a recalibration keeps the weighing
                      conformal_method=conformal_method or have or cf.DEFAULT_METHOD)
        predictor = _load(run_dir, device)
        predictor.refine_k, predictor.refine_tau = int(refine_k), float(refine_tau)
        meta = predictor.metas[0]
    hierarchy, levels = predictor.hierarchy, list(predictor.levels)
    from geohier.presets import EvalPreset

    notes: list[str] = []
    in_training = None
    if csv is not None:
        frame = read_points_csv(csv, images_root)
        ds = PointsDataset(frame, hierarchy, EvalPreset.from_meta(meta))
        source = {"kind": "csv", "csv": str(Path(csv).expanduser().resolve()),
                  "images_root": str(Path(images_root).expanduser().resolve()) if images_root else None,
                  "rows": frame.attrs.get("rows"), "invalid_coordinates": frame.attrs.get("invalid"),
                  "skipped_rows": frame.attrs.get("skipped") or {},
                  "missing_files": ds.stats["missing"]}
        if len(ds) == 0:
            raise InputError(f"none of the {frame.attrs.get('rows', 0)} rows of {csv} has an image file "
                             f"under {images_root or Path(csv).parent} (e.g. {', '.join(ds.missing_examples[:2])})")
        in_training = training_overlap(ds.paths, predictor, ws)
        source.update(in_training)
        if in_training["in_training"]:
            notes.append(f"{in_training['in_training']} of {len(ds)} images of {Path(csv).name} are in run "
                         f"{run_dir.name}'s training set (same bytes): its scores on them are not held out")
    else:
        ds, own = _split_dataset(ws, predictor, split)
        source = {"kind": "split", "split": split, "data_dir": str(ws.data_dir),
                  "missing_files": ds.stats.get("missing", 0), "gone": ds.gone, **own.source()}
        if own.note:
            notes.append(own.note)
        if len(ds) == 0:
            raise InputError(f"run {run_dir.name}'s {split} split ({own.ids.size} images, split {own.hash[:12]}) "
                             f"has no usable image in {ws.data_dir}: {ds.gone} gone from the manifest, "
                             f"{ds.stats.get('missing', 0)} files missing")
    collected = collect_logits(predictor, ds, levels, batch_size, num_workers, device, progress, features=refine)
    temps = predictor.temperatures
    per_level, reliability = {}, {}
    for lv in levels:
        z, y = collected["logits"][lv], collected["labels"][lv]
        n = int((np.asarray(y) >= 0).sum())
        t = temps.get(lv, 1.0)
        acc = metrics.topk_accuracy(z, y, ks=(1, 5, 10))
        before = metrics.reliability_bins(metrics.softmax(z), y)
        after = metrics.reliability_bins(metrics.softmax(z, t), y)
        per_level[str(lv)] = {"top1": acc[1], "top5": acc[5], "top10": acc[10], "n": n,
                              "num_classes": int(z.shape[1]), "chance_top1": 1.0 / max(1, int(z.shape[1])),
                              "temperature": t, "ece_before": before["ece"], "ece_after": after["ece"],
                              "nll_before": metrics.nll(z, y, 1.0) if n else None,
                              "nll_after": metrics.nll(z, y, t) if n else None}
        reliability[str(lv)] = {"before": before, "after": after}
    finest = max(levels)
    # the truth set: the CSV's rows, or the split's images; `evaluated`: those that decoded
    truth = benchmark.read_truth(csv) if csv is not None else benchmark.TruthSet.from_points(
        f"{split} split of {ws.data_dir.name}", ds.keys, ds.lat, ds.lon)
    keys = ds.keys[collected["index"]]
    evaluated = truth.subset(keys)
    tlat, tlon = collected["lat"], collected["lon"]
    # every point comes from the Predictor: the answers `predict` gives, walk by walk
    points = {walk: predictor.points(collected["logits"], walk, within=within) for walk in predictor.walks()}
    geo_by_rule = {}
    if predictor.hybrid and within is None:  # the centroid rule beside the hybrid guesses: the offsets' gain
        points.update({f"{walk}+centroid": predictor.points(collected["logits"], walk, offset=False)
                       for walk in predictor.walks()})
    for walk, pts in points.items():
        geo_by_rule[walk] = benchmark.score_points(tlat, tlon, pts.lat, pts.lon, areas=evaluated.areas)
        geo_by_rule[walk].update(level=finest, point=pts.source, rule=walk)
    refined = None
    if refine:
        rname = refine_rule(levels)
        pts = predictor.points(collected["logits"], predictor.default_walk, features=collected["features"],
                               refine=True)
        geo_by_rule[rname] = benchmark.score_points(tlat, tlon, pts.lat, pts.lon, areas=evaluated.areas)
        geo_by_rule[rname].update(level=finest, point=pts.source, rule=rname, refined=int(pts.refined.sum()),
                                  k=int(refine_k), tau=float(refine_tau), index_rows=len(predictor.neighbour_index()))
        refined = (rname, pts.lat, pts.lon)
    # the headline uses what `predict` answers: the hierarchical walk when there is one
    rule = predictor.default_walk
    geo = geo_by_rule[rule]
    plat, plon = points[rule].lat, points[rule].lon
    dist = geodesy.haversine_km(plat, plon, tlat, tlon)
    countries = country_table(tlat, tlon, plat, plon, dist)
    # regions with a coverage guarantee (calibrated on val) and abstention, from the Predictor
    conformal = conformal_calibration = None
    if predictor.conformal is not None and predictor.conformal_stale:
        notes.append("the run's conformal calibration predates regions that hold the cells its hierarchy dropped: "
                     "no prediction regions (evaluate it with --calibrate)")
    elif predictor.conformal is not None:
        c = predictor.conformal
        # the images' place groups: what the coverage guarantee counts, and what the
        # cross-fit deals into halves (none for an external CSV)
        groups = splits_mod.groups_of(ws, ds.ids[collected["index"]], own.splits) if csv is None else None
        conformal = predictor.conformal_report(collected["logits"], collected["labels"], cf.COVERAGES, groups=groups)
        extra = c.extra or {}
        conformal_calibration = {"split": extra.get("split"), "method": c.method, "images": c.n, "groups": c.groups,
                                 "space": extra.get("space"), "fitted_at": extra.get("fitted_at"),
                                 "split_hash": extra.get("split_hash"), "crossfit": None}
        if groups is not None:
            cross = predictor.conformal_crossfit(collected["logits"], collected["labels"], groups, cf.COVERAGES,
                                                 c.method)
            for key, r in cross.items():
                conformal[key]["crossfit"] = r
            conformal_calibration["crossfit"] = {
                "split": split, "method": c.method, "repeats": cf.CROSSFIT_REPEATS,
                "how": f"the {split} split's place groups dealt at random into two halves: calibrated on one, "
                       "measured on the other, both ways, averaged over the halvings"}
    abstention = {"confidence": "top hierarchical joint probability of a finest class (product of each level's "
                                "probability given its parent, temperatures applied)",
                  "rule": rule, "rows": cf.abstention_curve(predictor.confidence(collected["logits"]), dist)}
    # recall vs area: the share of truths inside the top-ranked cells (and rests) against their area
    recall_area = predictor.recall_area(collected["logits"], collected["labels"])
    baselines = benchmark.baseline_scores(evaluated, *run_training_points(predictor, ws))
    result = {
        "format": EVAL_FORMAT, "run": run_dir.name, "created_at": utcnow(),
        "source": {**source, **({"within": predictor.limit(within).describe()} if within is not None else {})},
        "images": int(len(collected["index"])), "skipped": len(collected["skipped"]),
        "levels": levels, "per_level": per_level, "geo": geo, "geo_by_rule": geo_by_rule,
        "baselines": {name: {**b["geo"], "note": b["note"]} for name, b in baselines.items()},
        "truth": truth.info(),
        "reliability": reliability,
        "countries": countries,
        "conformal": conformal,
        "conformal_calibration": conformal_calibration,
        "abstention": abstention,
        "recall_area": recall_area,
        "calibration": meta.get("calibration"),
        "hierarchy_hash": meta.get("hierarchy_hash"), "time_s": round(time.perf_counter() - t0, 3),
        "device": str(forward.resolve_device(device)),
        "notes": notes,
    }
    result = json_safe(result)
    Run(run_dir).write_eval(result)
    # the leaderboard scores the run on the whole truth set: images it could not read are
    # missing predictions, as for any other system
    flag = (f"; NOT HELD OUT: {in_training['in_training']} of {len(ds)} images are in its training set"
            if in_training and in_training["in_training"] else "")
    board = Leaderboard(ws.data_dir)
    arch = meta.get("arch") or {}
    design = ("".join(f", {k} {arch[k]}" for k, d in (("head", "cell"), ("loss", "independent"))
                      if arch.get(k, d) != d)  # the run's design when it is not the seed's
              + (", adaptive cells" if predictor.hierarchy.adaptive else ""))
    limited = f" within {predictor.limit(within).describe()}" if within is not None else ""
    entries = [(f"{run_dir.name}{limited}", plat, plon, f"{levels} levels, rule {rule}{limited}{design}{flag}")]
    if refined is not None:  # its own entry, beside the run's, so the table shows whether it helps
        rname, rlat, rlon = refined
        entries.append((f"{run_dir.name} +refine", rlat, rlon,
                        f"{levels} levels, rule {rname} (k={refine_k}, tau={refine_tau:g}){design}{flag}"))
    for name, elat, elon, note in entries:
        entry, full_lat, full_lon = benchmark.score_aligned(truth, benchmark.Predictions(name, keys, elat, elon))
        board.record(truth.info() | {"hash": truth.hash}, name, "run", entry["geo"], note=note,
                     points={"key": truth.keys, "true_lat": truth.lat, "true_lon": truth.lon,
                             "pred_lat": full_lat, "pred_lon": full_lon},
                     **({"extra": {"in_training": in_training["in_training"]}} if flag else {}))
    # on the whole truth set; the same images as eval.json's when every image was read
    record_baselines(board, truth, ws, scores=baselines if len(evaluated) == len(truth) else None)
    return result


def run_training_points(predictor: Predictor, ws: Workspace):
    """(lat, lon) of the run's own training images (the baselines learn from them), or
    (None, None) when it has none recorded and the workspace has no train split."""
    try:
        ids = splits_mod.run_ids(predictor.runs[0], ws, "train", predictor.metas[0]).ids
    except WorkspaceError:
        return None, None
    if not ids.size:
        return None, None
    with ws.manifest() as m:
        frame = m.frame(("id", "lat", "lon"))
    frame = frame[np.isin(frame["id"].to_numpy(np.int64), ids)]
    if frame.empty:
        return None, None
    return frame["lat"].to_numpy(float), frame["lon"].to_numpy(float)


def training_overlap(paths, predictor: Predictor, ws: Workspace) -> dict:
    """How many of the images at ``paths`` are byte-for-byte training images of the run
    (sha256 against the manifest's hashes of its train split): ``{"in_training": n,
    "training_check": "sha256" | "unknown", ...}``; "unknown" (n None) when the run's
    training images cannot be told."""
    from geohier.workspace import sha256_file

    try:
        ids = splits_mod.run_ids(predictor.runs[0], ws, "train", predictor.metas[0]).ids
    except WorkspaceError as exc:
        return {"in_training": None, "training_check": "unknown", "training_check_note": str(exc)}
    if not ws.has_manifest():
        return {"in_training": None, "training_check": "unknown"}
    with ws.manifest() as m:
        frame = m.frame(("id", "sha256"))
    train_sha = set(frame["sha256"][np.isin(frame["id"].to_numpy(np.int64), ids)].dropna().astype(str))
    n = 0
    for p in paths:
        try:
            n += sha256_file(p) in train_sha
        except OSError:
            continue
    return {"in_training": int(n), "training_check": "sha256"}


def _has_split(ws: Workspace, split: str) -> bool:
    if not ws.has_manifest():
        return False
    with ws.manifest() as m:
        return m.count("split = ?", (split,)) > 0


# ----------------------------------------------------------------------------- report

def format_report(result: dict) -> str:
    """A readable plain-text table of an eval.json."""
    lines = [f"run {result['run']}: {result['images']} images"
             + (f" ({result['skipped']} unreadable, skipped)" if result.get("skipped") else "")
             + f" from {_describe(result['source'])}", ""]
    lines.append(f"{'level':>5} {'classes':>7} {'n':>7} {'top1':>7} {'top5':>7} {'top10':>7} "
                 f"{'chance':>7} {'T':>6} {'ECE':>6} {'ECE(T)':>6}")
    for lv, r in result["per_level"].items():
        lines.append(f"{lv:>5} {r['num_classes']:>7} {r['n']:>7} {pct(r['top1'])} {pct(r['top5'])} "
                     f"{pct(r['top10'])} {pct(r['chance_top1'])} {r['temperature']:>6.2f} "
                     f"{num(r['ece_before'], 6, 3)} {num(r['ece_after'], 6, 3)}")
    g = result["geo"]
    lines += ["", f"geolocation (level {g['level']}, predicted point = {g['point']}, rule = {g['rule']}):",
              "  " + "  ".join(f"{t} km {pct(g.get(f'acc_{t}km')).strip()}" for t in metrics.KM_THRESHOLDS),
              f"  median {num(g.get('median_km'), 0, 1).strip()} km, mean {num(g.get('mean_km'), 0, 1).strip()} km, "
              f"GeoScore {num(g.get('geoscore'), 0, 0).strip()}"]
    for name, r in (result.get("geo_by_rule") or {}).items():
        if name.endswith("+refine"):
            lines += [f"refined with the nearest training images ({name}, k={r.get('k')}, tau={r.get('tau')}; "
                      f"{r.get('refined')} of {r.get('n')} images moved):",
                      "  " + "  ".join(f"{t} km {pct(r.get(f'acc_{t}km')).strip()}" for t in metrics.KM_THRESHOLDS),
                      f"  median {num(r.get('median_km'), 0, 1).strip()} km, mean "
                      f"{num(r.get('mean_km'), 0, 1).strip()} km, GeoScore {num(r.get('geoscore'), 0, 0).strip()}"]
        elif name == f"{g['rule']}+centroid":  # a hybrid head: the cell's point, for comparison
            lines += [f"the same cells at their points, without the offsets ({name}):",
                      "  " + "  ".join(f"{t} km {pct(r.get(f'acc_{t}km')).strip()}" for t in metrics.KM_THRESHOLDS),
                      f"  median {num(r.get('median_km'), 0, 1).strip()} km, mean "
                      f"{num(r.get('mean_km'), 0, 1).strip()} km, GeoScore {num(r.get('geoscore'), 0, 0).strip()}"]
    if result.get("conformal"):
        cal = result.get("conformal_calibration") or {}
        how = (f"calibrated on {cal.get('split') or 'val'}: {cal.get('images')} images"
               + (f" in {cal['groups']} place groups, each group weighing alike" if cal.get("method") == "groups"
                  else ", each weighing alike") if cal else "calibrated on val")
        lines += ["", f"prediction regions (conformal, {how}):",
                  f"  {'target':>6} {'images':>7} {'± se':>6} {'groups':>7} {'± se':>6} {'cross-fit':>15} "
                  f"{'mean cells':>10} {'median km2':>12} {'mean km2':>12}"]
        for cov, r in result["conformal"].items():
            cross = r.get("crossfit") or {}
            both = f"{pct(cross.get('coverage'), 7)} {pct(cross.get('group_coverage'), 7)}"
            lines.append(f"  {cov:>6} {pct(r.get('coverage'), 7)} {pct(r.get('coverage_se'), 6)} "
                         f"{pct(r.get('group_coverage'), 7)} {pct(r.get('group_coverage_se'), 6)} {both:>15} "
                         f"{num(r.get('mean_cells'), 10, 1)} {num(r.get('median_area_km2'), 12, 0)} "
                         f"{num(r.get('mean_area_km2'), 12, 0)}")
        by_groups = cal.get("method", "groups") == "groups"
        lines.append("  images: the share of images whose point is in their region"
                     + ("" if by_groups else " (what the calibration guarantees)")
                     + "; groups: the mean of the place groups' shares"
                     + (" (what the calibration guarantees)" if by_groups else "")
                     + "; cross-fit (images, groups): calibrated on half the split's groups, measured on the "
                       "other half, over random halvings")
    elif "conformal" in result:
        lines += ["", "prediction regions: the run has no conformal calibration (evaluate it with --calibrate)"]
    if result.get("abstention"):
        rows = {r["share"]: r for r in result["abstention"]["rows"]}
        lines += ["", "answering only the most confident images (confidence = top joint probability):",
                  f"  {'answered':>8} " + " ".join(f"{f'{t} km':>8}" for t in cf.ABSTAIN_KM)]
        for share in (0.1, 0.25, 0.5, 1.0):
            r = rows.get(share)
            if r is not None:
                lines.append(f"  {pct(share):>8} " + " ".join(f"{pct(r.get(f'acc_{t}km')):>8}" for t in cf.ABSTAIN_KM))
    if result.get("countries"):
        lines += ["", f"{'country':<16} {'n':>6} {'in-ctry':>8} {'25km':>7} {'750km':>7} {'median km':>10}"]
        for r in result["countries"][:15]:
            lines.append(f"{r['country'][:16]:<16} {r['n']:>6} {pct(r.get('country_acc')):>8} "
                         f"{pct(r.get('acc_25km'))} {pct(r.get('acc_750km'))} {num(r.get('median_km'), 10, 1)}")
        if len(result["countries"]) > 15:
            lines.append(f"... {len(result['countries']) - 15} more in {runs.EVAL_FILE}")
    return "\n".join(lines)


def _describe(src: dict) -> str:
    return f"the {src['split']} split" if src.get("kind") == "split" else f"{src.get('csv')}"


# ----------------------------------------------------------------------------- CLI

def register(sub) -> None:
    p = sub.add_parser("evaluate", help="calibrate and evaluate a trained run (writes the run's eval report)",
                       description=__doc__.splitlines()[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory, or a run name under --models")
    p.add_argument("--csv", default=None, help="evaluate on an external CSV of path,lat,lon "
                   "(OSV-5M id/latitude/longitude and Im2GPS3k IMG_ID/LAT/LON accepted) (default: none)")
    p.add_argument("--images-root", default=None,
                   help="folder the CSV's image paths are relative to (default: the CSV's folder)")
    p.add_argument("--split", default="test", choices=SPLIT_CHOICES,
                   help="workspace split to evaluate when no --csv (default: test)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (default: 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    cal = p.add_mutually_exclusive_group()
    cal.add_argument("--calibrate", dest="calibrate", action="store_true", default=None,
                     help="refit the temperatures on the val split first (default: only when none fitted yet)")
    cal.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                     help="keep the run's fitted temperatures as they are")
    p.add_argument("--conformal-weights", dest="conformal_method", choices=cf.METHODS, default=None,
                   help="how the prediction regions' calibration weighs the val images: groups (each place "
                        "group alike: the coverage guarantee counts places) or images (each photo alike: it "
                        "counts photos); recalibrates a run calibrated the other way (default: keep the run's, "
                        "groups for a new calibration)")
    p.add_argument("--refine", action="store_true",
                   help="also score the guess refined to the nearest training images inside the kept cells "
                        f"(runs with {runs.NEIGHBOURS_FILE}), as its own rule and leaderboard entry (default: off)")
    p.add_argument("--within", default=None, metavar="country:CC,...|bbox:S,W,N,E",
                   help="score the guesses predict --within gives (classes outside the region out of the walk); "
                        "its own leaderboard entry '<run> within ...' (default: no limit)")
    p.add_argument("--json", action="store_true", help=f"print {runs.EVAL_FILE} instead of the table")
    p.set_defaults(func=run)


def run(args, ws: Workspace) -> int:
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.images_root and not args.csv:
        raise InputError("--images-root goes with --csv")
    run_dir = runs.resolve_run(ws.models_dir, args.run_dir).path
    result = evaluate_run(run_dir, ws, csv=args.csv, images_root=args.images_root, split=args.split,
                          batch_size=args.batch_size, device=args.device, num_workers=args.workers,
                          calibrate=args.calibrate, progress=sys.stderr.isatty(), refine=args.refine,
                          within=args.within, conformal_method=args.conformal_method)
    for note in result.get("notes") or []:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_report(result))
        print(f"\nwrote {Run(run_dir).eval_path}")
    return 0
