"""``python -m pipeline labels``: build data/hierarchy.json and the train/val/test splits.

Reads every image's position from the manifest, keeps as classes the cells of each level
with at least --min-images images (a cell whose parent was dropped is dropped too),
writes hierarchy.json atomically, and stores each image's split in the manifest (groups:
capture sequence, else a ~1 km bucket, so near-duplicates never straddle splits).

A level left with fewer than 2 classes is written with a warning (training refuses it
with a message naming the level). ``--export-seed DIR`` also writes the seed's files:
label_map_L{k}.json, l{a}_to_l{b}.json and DIR/L{k}/{split}/{cell}/{image} links.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from geohier import archives, grid
from geohier.adaptive import ADAPTIVE_MAX_DEPTH, build_adaptive, check_max_depth, parse_thresholds
from geohier.errors import InputError, WorkspaceError
from geohier.fileio import atomic_write_bytes
from geohier.hierarchy import DEFAULT_MIN_IMAGES, Hierarchy, build_hierarchy, cell_counts, parse_min_images
from geohier.images import read_source
from geohier.splits import DEFAULT_FRACTIONS, Splits, assign_splits, check_fractions, runs_on_other_splits
from geohier.splits import record as record_split
from geohier.workspace import MANIFEST_LEVEL, SPLITS, Workspace, atomic_write_text

EXPORT_MARKER = ".geohier-export.json"
CELLS = ("fixed", "adaptive")
NO_IMAGES = ("the manifest has no images; build the demo world (`python -m pipeline demo`), "
             "import photos (`import-photos DIR`) or fetch some first")


def build_labels(ws: Workspace, levels: Sequence[int] = grid.DEFAULT_LEVELS,
                 min_images=DEFAULT_MIN_IMAGES, seed: int = 0,
                 fractions=DEFAULT_FRACTIONS, cells: str = "fixed", thresholds=None,
                 max_depth: int = ADAPTIVE_MAX_DEPTH) -> Hierarchy:
    """Build hierarchy.json from the manifest and assign every image's split.

    ``min_images`` is an int, a {level: n} mapping or text such as ``"1:1,3:5"``.
    ``cells="adaptive"`` builds adaptive levels instead (``geohier.adaptive.build_adaptive``:
    levels 1..K, one per threshold, ``thresholds`` defaulting from the image count;
    ``levels`` and ``min_images`` are then unused).
    Raises InputError on an empty manifest; levels with fewer than 2 classes are allowed
    (see ``Hierarchy.problems``). Returns the saved hierarchy.
    """
    if cells not in CELLS:
        raise InputError(f"--cells must be one of {', '.join(CELLS)}, got {cells!r}")
    adaptive = cells == "adaptive"
    levels = grid.check_levels(levels)
    mins = parse_min_images(min_images, levels)
    if adaptive:
        max_depth = check_max_depth(max_depth)
        if thresholds is not None:
            thresholds = parse_thresholds(thresholds)
    fr = check_fractions(fractions)
    if not ws.has_manifest():
        raise InputError(NO_IMAGES)
    with ws.manifest() as m:
        ids, lat, lon, sequences = _positions(m)
        if not ids.size:
            raise InputError(NO_IMAGES)
        h = (build_adaptive(lat, lon, thresholds, max_depth) if adaptive
             else build_hierarchy(lat, lon, levels, mins))
        splits, groups = assign_splits(ids, lat, lon, sequences, fractions=fr, seed=seed, with_groups=True)
        info = {"train": float(fr[0]), "val": float(fr[1]), "test": float(fr[2]), "seed": int(seed)}
        version = Splits.from_assignment(ids, splits, info, groups)  # the place groups: conformal's unit
        # kept before the manifest changes: runs trained on any split keep theirs (geohier.splits)
        record_split(ws, version)
        h.splits = {**info, "hash": version.hash}
        m.set_splits(ids=ids, splits=splits)
    h.save(ws.hierarchy_path)
    return h


def _positions(m) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, lat, lon, sequence ids) of every image, read in chunks into arrays: pandas
    reading 5 M rows at once held each row as a tuple (~1.8 GB at the peak)."""
    cols: dict[str, list[np.ndarray]] = {"id": [], "lat": [], "lon": [], "sequence_id": []}
    dtypes = {"id": np.int64, "lat": np.float64, "lon": np.float64, "sequence_id": object}
    for part in m.frames(list(cols)):
        for c, arrays in cols.items():
            arrays.append(part[c].to_numpy(dtypes[c]))
    out = []
    for c in list(cols):
        arrays = cols.pop(c)
        out.append(np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtypes[c]))
        del arrays
    return tuple(out)


def split_report(ws: Workspace, split_hash: str) -> str | None:
    """A sentence naming the runs trained on a split other than ``split_hash`` (they keep
    evaluating on their own), or None when there are none."""
    others = runs_on_other_splits(ws.models_dir, split_hash)
    if not others:
        return None
    own = [name for name, h in others if h]
    old = [name for name, h in others if not h]
    parts = []
    if own:
        parts.append(f"{len(own)} run(s) trained on an earlier split keep it and are evaluated, calibrated and "
                     f"resumed on their own images: {_names(own)}")
    if old:
        parts.append(f"{len(old)} run(s) from before split versions record no split and will be evaluated on "
                     f"this new one, saying so: {_names(old)}")
    return "; ".join(parts)


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def level_counts(ws: Workspace, levels: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{level: (keys ascending, images)} of the cells holding images, from the manifest's
    positions (any level, not only those the manifest stores); empty arrays without images."""
    levels = grid.check_levels(levels)
    if not ws.has_manifest():
        return cell_counts([], [], levels)
    stored = [lv for lv in levels if lv <= MANIFEST_LEVEL]  # from the stored cells: no positions read
    with ws.manifest() as m:
        out = m.count_levels(stored)
        finer = [lv for lv in levels if lv > MANIFEST_LEVEL]
        if finer:
            out.update(cell_counts(*m.points(), finer))
    return {lv: out[lv] for lv in levels}


def cell_table(ws: Workspace, level: int) -> pd.DataFrame:
    """One row per cell of ``level`` with images: cell, key, images, country, iso_a2,
    lat, lon (the centre), area_km2; keys ascending. Country comes from the cached
    geography table (levels up to geography.MAX_LEVEL; "" beyond, and for open sea)."""
    from geohier import geography

    level = grid.check_level(level)
    if level <= geography.MAX_LEVEL:
        t = geography.coverage_table(ws, level)
        t = t[t["images"] > 0][["cell", "key", "images", "country", "iso_a2", "lat", "lon"]]
        t = t.reset_index(drop=True)
    else:
        keys, n = level_counts(ws, [level])[level]
        lat, lon = grid.key_centroids(keys, level)
        t = pd.DataFrame({"cell": grid.keys_to_ids(keys, level), "key": keys, "images": n,
                          "country": "", "iso_a2": "", "lat": lat, "lon": lon})
    t["area_km2"] = grid.key_areas_km2(t["key"].to_numpy(np.int64), level).round(1)
    return t


# --------------------------------------------------------------------------- seed export


def export_seed(ws: Workspace, h: Hierarchy, out_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Write the seed's artifacts under ``out_dir``.

    - ``label_map_L{k}.json``: {cell id: class index};
    - ``l{a}_to_l{b}.json`` for consecutive levels: {parent class index: [child class
      indices]} (as strings of the index for keys, JSON-style);
    - ``L{k}/{split}/{cell id with / -> _}/{image file}``: a symbolic link to each image
      with a class at level k and a split (a hard link where symlinks are refused; a copy
      of an image read in place from a zip or tar).

    The L{k} folders of an earlier export (marked by ``.geohier-export.json``) are
    replaced; folders not made by an export are never touched. Returns {"links", "mode",
    "files"}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / EXPORT_MARKER
    level_dirs = [out / f"L{lv}" for lv in h.levels]
    foreign = [d for d in level_dirs if d.exists()] if not marker.exists() else []
    if foreign:
        raise WorkspaceError(f"{foreign[0]} exists and was not written by an export; "
                             "choose an empty or new --export-seed folder")
    files = []
    for lv in h.levels:
        p = out / f"label_map_L{lv}.json"
        atomic_write_text(p, json.dumps(h.label_map(lv), indent=1) + "\n")
        files.append(p.name)
    for name, mapping in h.seed_maps().items():
        p = out / f"{name}.json"
        atomic_write_text(p, json.dumps(mapping) + "\n")
        files.append(p.name)

    with ws.manifest() as m:
        df = m.frame(["id", "lat", "lon", "path", "split"], where="split IS NOT NULL")
    labels = h.labels(df["lat"].to_numpy(np.float64), df["lon"].to_numpy(np.float64))
    for d in level_dirs:
        if d.exists():
            shutil.rmtree(d)  # removes the links, never their targets
    atomic_write_text(marker, json.dumps({"hash": h.hash, "levels": list(h.levels)}) + "\n")

    targets = [ws.resolve(p) for p in df["path"]]
    names = [t.name for t in targets]
    cell_dirs = {lv: [c.replace("/", "_") for c in h.cells(lv)] for lv in h.levels}
    mode = "symlink"
    links = 0
    total = int(sum((labels[lv] >= 0).sum() for lv in h.levels))
    bar = tqdm(total=total, desc="export links", unit="link", disable=not progress, file=sys.stderr)
    made_dirs: set[Path] = set()
    for lv in h.levels:
        for i in np.flatnonzero(labels[lv] >= 0):
            folder = out / f"L{lv}" / df["split"].iat[i] / cell_dirs[lv][labels[lv][i]]
            if folder not in made_dirs:
                folder.mkdir(parents=True, exist_ok=True)
                made_dirs.add(folder)
            dest = folder / names[i]
            if dest.exists() or dest.is_symlink():  # two linked photos with one file name
                dest = folder / f"{df['id'].iat[i]}-{names[i]}"
            if archives.is_member(targets[i]):  # inside a zip or tar: no link can point there
                atomic_write_bytes(dest, read_source(str(targets[i])))
            else:
                mode = _link(targets[i], dest, mode)
            links += 1
            bar.update(1)
    bar.close()
    return {"links": links, "mode": mode if links else "none", "files": files}


def _link(target: Path, dest: Path, mode: str) -> str:
    # Symlink first; once the file system refuses one, hard-link the rest.
    if mode == "symlink":
        try:
            os.symlink(target, dest)
            return mode
        except OSError:
            mode = "hardlink"
    try:
        os.link(target, dest)
    except OSError as exc:
        raise WorkspaceError(f"cannot link {dest} to {target}: neither a symbolic nor a hard link "
                             f"works there ({exc.strerror or exc})") from None
    return mode


# --------------------------------------------------------------------------- CLI


def register(sub) -> None:
    p = sub.add_parser(
        "labels", help="build hierarchy.json (classes per level) and the train/val/test splits",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--levels", default="1,3,5,8", help="comma-separated increasing levels (default: 1,3,5,8)")
    p.add_argument("--min-images", default=str(DEFAULT_MIN_IMAGES), metavar="N|LEVEL:N,...",
                   help="images a cell needs to be a class: one number for every level, or per level "
                        f"such as 1:1,3:5,8:10 (unnamed levels get the default) (default: {DEFAULT_MIN_IMAGES})")
    p.add_argument("--cells", choices=CELLS, default="fixed",
                   help="fixed: the cells of --levels with enough images; adaptive: levels 1..K of quadtree "
                        "cells of any depth, split while they hold --thresholds images, so that every image "
                        "has a class at every level (default: fixed)")
    p.add_argument("--thresholds", default=None, metavar="N1,N2,...",
                   help="adaptive cells: per level, split a cell while it holds at least this many images; "
                        "decreasing, one number per level (default: from the image count, aiming at about "
                        "4, 64, 1024 and 16384 classes)")
    p.add_argument("--max-depth", type=int, default=ADAPTIVE_MAX_DEPTH,
                   help=f"adaptive cells: the deepest quadtree level a cell may reach "
                        f"(default: {ADAPTIVE_MAX_DEPTH}, ~600 m)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split assignment (default: 0)")
    p.add_argument("--split", default="0.8,0.1,0.1", metavar="TRAIN,VAL,TEST",
                   help="split fractions over images (default: 0.8,0.1,0.1)")
    p.add_argument("--export-seed", default=None, metavar="DIR",
                   help="also write the seed's label_map_L*.json, l*_to_l*.json and per-level folders "
                        "of links (default: off)")
    p.set_defaults(func=run)


def run(args, ws: Workspace) -> int:
    cells = getattr(args, "cells", "fixed")
    if cells == "adaptive" and args.levels != "1,3,5,8":
        raise InputError("--levels is for fixed cells; adaptive levels are 1..K, one per --thresholds value")
    levels = grid.parse_levels(args.levels)
    h = build_labels(ws, levels, args.min_images, args.seed, args.split, cells=cells,
                     thresholds=getattr(args, "thresholds", None), max_depth=getattr(args, "max_depth",
                                                                                     ADAPTIVE_MAX_DEPTH))
    print(f"wrote {ws.hierarchy_path} (hash {h.hash[:12]}, {h.images} images"
          + (f", adaptive cells, max depth {h.max_depth})" if h.adaptive else ")"))
    if h.adaptive:
        from geohier.charts import gini

        print(f"{'level':>5} {'split at':>8} {'classes':>8} {'depths':>7} {'median':>7} {'gini':>6} "
              f"{'images kept':>12}")
        for lv in h.levels:
            n, d = h.counts(lv), h.depths(lv)
            kept = int(n.sum())
            print(f"{lv:>5} {h.scheme['thresholds'][lv]:>8} {n.size:>8} {f'{d.min()}-{d.max()}':>7} "
                  f"{float(np.median(n)):>7g} {gini(n):>6.3f} {f'{kept} ({kept / max(h.images, 1):.0%})':>12}")
    else:
        print(f"{'level':>5} {'min':>5} {'cells':>7} {'classes':>8} {'dropped':>8} {'images kept':>12}")
    for lv in h.levels if not h.adaptive else ():
        s = h.stats.get(lv, {})
        kept = s.get("images_kept", int(h.counts(lv).sum()))
        print(f"{lv:>5} {h.min_images[lv]:>5} {s.get('cells_with_images', 0):>7} {h.num_classes[lv]:>8} "
              f"{s.get('dropped', 0):>8} {f'{kept} ({kept / max(h.images, 1):.0%})':>12}")
    with ws.manifest() as m:
        by_split = m.summary()["by_split"]
    print("splits: " + ", ".join(f"{s} {by_split.get(s, 0)}" for s in SPLITS)
          + f" (version {h.splits['hash'][:12]})")
    note = split_report(ws, h.splits["hash"])
    if note:
        print(f"note: {note}")
    for problem in h.problems():
        print(f"warning: {problem}", file=sys.stderr)
    if args.export_seed:
        res = export_seed(ws, h, args.export_seed)
        print(f"exported {len(res['files'])} map files and {res['links']} {res['mode']}s to {args.export_seed}")
    return 0
