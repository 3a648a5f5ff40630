"""``python -m pipeline predict IMAGE...``: where were these photos taken?

A thin parser over ``geohier.predictor``: it picks the run (``--run``, a per-level set with
``--runs``, or the newest finished run), turns the flags into one keep rule per level, and
prints a table or, with ``--json``, one JSON object per image and line
(``geohier.prediction.Prediction.to_dict``)::

    {"image": "a.jpg",
     "candidates": {"1": [{"cell": "0", "prob": 0.93, "joint": 0.93, "parent": null}, ...], ...,
                    "8": [{"cell": "0/1/...", "prob": .., "joint": .., "parent": "0/1/..", "lat": ..,
                           "lon": .., "bbox": [w, s, e, n], "country": .., "place": ..}, ...]},
     "best": {"cell", "lat", "lon", "prob", "joint", "country", "place"},
     "true": {"lat", "lon", "error_km", "geoscore"}}          # only with EXIF GPS
    {"image": "broken.jpg", "error": "broken.jpg is truncated or corrupt (...)"}

With ``--refine`` (a run that carries ``neighbours.safetensors``), the guess moves to the
similarity-weighted position of the most similar training images inside the kept cells
(``geohier.refine``): ``best`` gains ``refined`` (true/false) and the cell's own position
``cell_lat``/``cell_lon``, and the chosen finest candidate a ``refined`` block with the
neighbours used (id, lat, lon, sim, weight). A run without the file is refused (exit 2).

With ``--coverage P`` (a run calibrated by ``evaluate --calibrate``), each object gains
``confidence`` (the top joint probability of a finest cell) and ``region``: ``{"source":
"conformal", "coverage": P, "threshold", "n_cells", "area_km2", "mass", "cells": [...]}``,
the area that holds the true place with probability >= P (``geohier.conformal``): finest
cells, and with a fixed-level hierarchy that dropped cells also ``"rest_cells": [{"cell",
"minus": [...], "rank"}]``, coarser cells less their class sub-cells (where the dropped
cells lie), each with its rank among all the region's cells (1: the most probable).
With ``--abstain P``: ``abstained`` (true when the confidence is under P); an abstained
image has ``"best": null`` and a ``region`` (the conformal one with ``--coverage``, else
the kept cells, ``"source": "kept"``). With ``--within country:FR,DE`` or
``--within bbox:S,W,N,E``: ``within`` names the limit, and every candidate lies inside it
(``geohier.limits``).

With ``--explain DIR``: for each readable photo, ``DIR/<name>.explain.png`` (the photo
with an occlusion-sensitivity heat map: red where masking a patch drops the best cell's
joint probability most) and ``DIR/<name>.explain.json`` (the grid of drops and of km the
guess moves; ``geohier.explain``). ``--explain-method gradcam`` writes Grad-CAM instead
(single-model runs, a CNN or a ViT backbone: one forward and one backward per photo).

``prob`` is a cell's probability among the candidates considered at its level (what the
keep rules use); ``joint`` the probability of its whole path (the product of every level's
probability along it). A file that cannot be read gets ``error`` instead of ``best``; the
others still run.
Exit status: 0 when at least one image was predicted, 1 when none could be, 2 for a bad
option or run (``error: ...``).

With ``--csv OUT.csv`` (batch prediction into the scoring format), the inputs may also be a
directory (every image file in it, sorted by name) or a CSV (its image column, as
``evaluate --csv`` reads it: ``path`` or ``id`` names, images found under ``--images-root``,
default the CSV's folder). One row per image goes to OUT.csv: ``image`` (the image key,
``geohier.tables.image_key``: the file name without extension), ``lat``, ``lon``, ``cell``
(the best finest cell), ``prob`` (its probability at its level) and ``joint`` (the
probability of its whole path), written a batch at a time under a progress bar on stderr.
It is resumable: images whose key is already in OUT.csv are skipped, so a run that was
killed continues where it stopped. ``python -m pipeline score OUT.csv --truth T.csv``
scores it as it is.

Per-level values: ``--rule``, ``--top-k``, ``--cumulative``, ``--min-prob`` and ``--k-max``
take one value for every level or ``LEVEL:VALUE`` pairs, e.g. ``--top-k 1:1,8:5`` (unnamed
levels keep the default), as ``labels --min-images`` does.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from geohier import combine, explain, tables
from geohier.errors import InputError
from geohier.images import FORMAT_EXTENSIONS
from geohier.prediction import Prediction
from geohier.predictor import load_predictor
from geohier.runs import NEIGHBOURS_FILE, newest_run, resolve_run
from geohier.workspace import Workspace

EPILOG = ("exit status: 0 when at least one image was predicted (unreadable ones are reported "
          "per image), 1 when none could be, 2 for a bad option or run")


def register(sub) -> None:
    p = sub.add_parser(
        "predict", help="predict where photos were taken (hierarchical, level by level)",
        description="Predict where street photos were taken: per-level candidates, the best cell with "
                    "its country and nearest town, and the error when the photo has EXIF GPS.",
        epilog=EPILOG)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (JPEG, PNG, WebP; HEIC with pillow-heif); with --csv also a directory "
                        "(its image files) or a CSV (its image column)")
    p.add_argument("--run", default=None,
                   help="run directory or name under the models directory (default: the newest finished run)")
    p.add_argument("--runs", default=None, metavar="DIR,DIR",
                   help="a per-level set: comma-separated run directories of one level each, same hierarchy "
                        "(default: none)")
    p.add_argument("--rule", default=combine.DEFAULT_RULE,
                   help=f"keep rule per level: {' | '.join(combine.RULES)}, or LEVEL:RULE pairs "
                        f"(default: {combine.DEFAULT_RULE})")
    p.add_argument("--top-k", default=str(combine.DEFAULT_TOP_K), metavar="K",
                   help=f"classes kept per level by the topk rule, or LEVEL:K pairs (default: {combine.DEFAULT_TOP_K})")
    p.add_argument("--cumulative", default=str(combine.DEFAULT_CUMULATIVE), metavar="P",
                   help="probability mass kept per level by the cumulative rule, or LEVEL:P pairs "
                        f"(default: {combine.DEFAULT_CUMULATIVE})")
    p.add_argument("--min-prob", default="0", metavar="P",
                   help="drop candidates under this probability (the top one is always kept), or "
                        "LEVEL:P pairs (default: 0)")
    p.add_argument("--adaptive-thresholds", default=",".join(f"{t:.2f}" for t in combine.DEFAULT_THRESHOLDS),
                   metavar="T1,T2,..",
                   help="adaptive rule: keep 1, 2, 3.. classes when the top probability reaches these "
                        "(default: 0.85,0.65,0.40)")
    p.add_argument("--k-max", default=str(combine.DEFAULT_K_MAX), metavar="K",
                   help=f"adaptive rule: classes kept below the last threshold, or LEVEL:K pairs "
                        f"(default: {combine.DEFAULT_K_MAX})")
    p.add_argument("--max-keep", type=int, default=combine.DEFAULT_MAX_KEEP, metavar="K",
                   help=f"cumulative rule: at most this many classes per level (default: {combine.DEFAULT_MAX_KEEP})")
    p.add_argument("--no-temperature", action="store_true",
                   help="ignore the run's per-level temperatures (default: use them)")
    p.add_argument("--refine", action="store_true",
                   help=f"move the guess to the nearest training images inside the kept cells (runs with "
                        f"{NEIGHBOURS_FILE}; default: the cell's position)")
    p.add_argument("--coverage", type=float, default=None, metavar="P",
                   help="add the prediction region that holds the true place with probability >= P (e.g. 0.9; "
                        "conformal, calibrated by `evaluate --calibrate` on the run's val split): its cells and "
                        "area in km² (default: none)")
    p.add_argument("--within", default=None, metavar="LIMIT",
                   help="answer only inside country:CODES (ISO codes, e.g. country:FR,DE) or bbox:S,W,N,E: "
                        "cells outside get zero probability before the keep rules (default: anywhere)")
    p.add_argument("--abstain", type=float, default=None, metavar="P",
                   help="answer 'not sure' (the region, --coverage's or the kept cells, instead of a point) "
                        "when the confidence (top joint probability of a finest cell) is below P (default: never)")
    p.add_argument("--explain", default=None, metavar="DIR",
                   help="also write why each guess: an occlusion-sensitivity overlay <name>.explain.png and its "
                        f"grid values <name>.explain.json into DIR ({explain.DEFAULT_GRID}x{explain.DEFAULT_GRID} "
                        f"patches, {explain.DEFAULT_GRID ** 2 + 1} forwards per photo; default: none)")
    p.add_argument("--explain-method", choices=explain.METHODS, default="occlusion",
                   help="how --explain explains: occlusion (one forward per patch) or gradcam (a CNN's last feature "
                        "map or a ViT's patch tokens, one forward and one backward per photo) (default: occlusion)")
    p.add_argument("--json", action="store_true", help="one JSON object per image and line (default: a table)")
    p.add_argument("--csv", default=None, metavar="OUT.csv",
                   help="write one row per image (image key, lat, lon, best cell, prob, joint) to this CSV, "
                        "the format `score` reads; resumable: images already in it are skipped (default: none)")
    p.add_argument("--images-root", default=None, metavar="DIR",
                   help="with --csv and a CSV input: where its image paths or ids are found (default: the "
                        "CSV's folder)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per forward pass (default: 16)")
    p.add_argument("--show", type=int, default=5, metavar="N",
                   help="finest-level candidates listed per image in the table (default: 5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto, a GPU when there is one)")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------- options


def per_level(text, levels: Sequence[int], convert: Callable, name: str) -> dict[int, object]:
    """``"5"`` -> every level 5; ``"1:1,8:5"`` -> those levels (others absent).

    >>> per_level("1:2,8:5", [1, 3, 8], int, "top-k")
    {1: 2, 8: 5}
    >>> per_level("3", [1, 8], int, "top-k")
    {1: 3, 8: 3}
    """
    out: dict[int, object] = {}
    text = str(text).strip()
    if not text:
        raise InputError(f"--{name} is empty")
    parts = [p.strip() for p in text.split(",") if p.strip()]
    for part in parts:
        if ":" in part:
            lv_text, _, value = part.partition(":")
            try:
                lv = int(lv_text)
            except ValueError:
                raise InputError(f"--{name}: {lv_text!r} is not a level in {text!r}") from None
            if lv not in levels:
                raise InputError(f"--{name} names level {lv}, which the run does not predict "
                                 f"(its levels: {', '.join(map(str, levels))})")
            out[lv] = _convert(value, convert, name)
        else:
            v = _convert(part, convert, name)
            out.update(dict.fromkeys(levels, v) | {k: w for k, w in out.items()})
    return out


def _convert(value: str, convert: Callable, name: str):
    try:
        return convert(value.strip())
    except InputError:
        raise
    except (TypeError, ValueError):
        raise InputError(f"--{name}: bad value {value!r}") from None


def _rule_name(v: str) -> str:
    if v not in combine.RULES:
        raise InputError(f"unknown rule {v!r}; choose one of: {', '.join(combine.RULES)}")
    return v


def rules_from_args(args, levels: Sequence[int]) -> dict[int, combine.KeepRule]:
    """One KeepRule per level from the parsed flags."""
    thresholds = combine.parse_thresholds(args.adaptive_thresholds)
    fields = {
        "rule": per_level(args.rule, levels, _rule_name, "rule"),
        "top_k": per_level(args.top_k, levels, int, "top-k"),
        "cumulative": per_level(args.cumulative, levels, float, "cumulative"),
        "min_prob": per_level(args.min_prob, levels, float, "min-prob"),
        "k_max": per_level(args.k_max, levels, int, "k-max"),
    }
    out = {}
    for lv in levels:
        kw = {k: v[lv] for k, v in fields.items() if lv in v}
        out[lv] = combine.KeepRule(thresholds=thresholds, max_keep=args.max_keep, **kw)
    return out


def resolve_runs(ws: Workspace, run: str | None = None, runs: str | Sequence | None = None) -> list[Path]:
    """The run directories to load: ``runs`` (a set), ``run`` (a directory, or a name under
    the models directory), else the newest finished run."""
    if run and runs:
        raise InputError("give --run or --runs, not both")
    if runs:
        items = [r.strip() for r in runs.split(",")] if isinstance(runs, str) else [str(r) for r in runs]
        return [resolve_run(ws.models_dir, r).path for r in items if r]
    if run:
        return [resolve_run(ws.models_dir, run).path]
    return [newest_run(ws.models_dir).path]


# ----------------------------------------------------------------------------- output


def format_table(pred: Prediction, show: int = 5) -> str:
    """A readable block for one image."""
    if pred.error is not None:
        return f"{pred.image}\n  error: {pred.error}\n"
    b = pred.best
    if pred.abstained:
        r = pred.region
        lines = [pred.image, f"  not sure: confidence {pred.confidence:.3f} is under --abstain; the place is in "
                             f"{_describe_region(r)}"]
        named = [f"{cell} (rest: the cell less its class sub-cells)" if is_rest else cell
                 for cell, is_rest in r.ranked()]  # most probable first
        lines += [f"      {cell}" for cell in named[:show]]
        if len(named) > show:
            lines.append(f"      ... {len(named) - show} more")
        return "\n".join(lines) + "\n"
    lines = [pred.image,
             f"  best   {b.cell}  {b.lat:.4f}, {b.lon:.4f}  p={b.prob:.3f} (joint {b.joint:.3f})  "
             f"{b.country or '(no country)'} · {b.place or '?'}"]
    if b.refined is not None:
        r = b.refined
        lines.append(f"  refined from the cell's {r.cell_lat:.4f}, {r.cell_lon:.4f} by the {len(r.neighbours)} "
                     f"nearest training image(s) (best similarity {r.neighbours[0]['sim']:.3f})")
    elif pred.refined is False:
        lines.append("  not refined: no training image in the kept cells")
    if pred.true:
        t = pred.true
        lines.append(f"  true   {t['lat']:.4f}, {t['lon']:.4f} (EXIF GPS)  error {t['error_km']:,.1f} km  "
                     f"GeoScore {t['geoscore']:.0f}")
    if pred.confidence is not None:
        lines.append(f"  confidence {pred.confidence:.3f} (top joint probability)")
    if pred.region is not None:
        lines.append(f"  region {_describe_region(pred.region)}")
    finest = max(pred.levels)
    lines.append(f"  {'#':>2}  {'cell (level ' + str(finest) + ')':<24} {'prob':>6} {'joint':>6}  {'lat':>8} "
                 f"{'lon':>9}  country / place")
    for i, c in enumerate(pred.levels[finest][:show], 1):
        where = " / ".join(v for v in (c.country, c.place) if v) or ""
        lines.append(f"  {i:>2}  {c.cell:<24} {c.prob:>6.3f} {c.joint:>6.3f}  {c.lat:>8.3f} {c.lon:>9.3f}  {where}")
    more = len(pred.levels[finest]) - show
    if more > 0:
        lines.append(f"      ... {more} more")
    for lv in sorted(pred.levels):
        if lv == finest:
            continue
        kept = ", ".join(f"{c.cell} {c.prob:.2f}" for c in pred.levels[lv])
        lines.append(f"  level {lv}: {kept}")
    return "\n".join(lines) + "\n"


def _describe_region(r) -> str:
    what = (f"{r.coverage:g} coverage region" if r.source == "conformal" else "kept cells")
    rest = f", {len(r.rest)} of them a coarser cell's rest" if r.rest else ""
    return f"{r.n_cells} cell(s){rest}, {r.area_km2:,.0f} km² ({what}, joint probability {r.mass:.3f})"


def run(args: argparse.Namespace, ws: Workspace) -> int:
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.csv is not None:
        return run_csv(args, ws)
    if args.images_root is not None:
        raise InputError("--images-root goes with --csv (and a CSV input)")
    if args.explain is not None:  # refuse a bad directory before any forward
        target = Path(args.explain).expanduser()
        if target.exists() and not target.is_dir():
            raise InputError(f"--explain {args.explain}: not a directory")
    paths = resolve_runs(ws, args.run, args.runs)
    predictor = load_predictor(paths, device=args.device)
    rules = rules_from_args(args, predictor.levels)
    if args.explain is not None and args.explain_method == "gradcam" and len(predictor.models) != 1:
        raise InputError("--explain-method gradcam needs a single-model run; this set combines "
                         f"{len(predictor.models)} runs (use occlusion)")
    if predictor.synthetic_note:
        print(f"note: {predictor.synthetic_note}", file=sys.stderr)
    preds = predictor.predict_files(args.images, rules=rules, temperature=not args.no_temperature,
                                    batch_size=args.batch_size, places=args.show if not args.json else 10,
                                    refine=args.refine, coverage=args.coverage, abstain=args.abstain,
                                    within=args.within)
    out = sys.stdout
    if not args.json:
        out.write(f"run {predictor.name}  levels {','.join(map(str, predictor.levels))}  "
                  f"rules: {'; '.join(f'L{lv} {r.describe()}' for lv, r in rules.items())}"
                  f"{'  (no temperature)' if args.no_temperature else ''}"
                  f"{f'  refined (k={predictor.refine_k}, tau={predictor.refine_tau:g})' if args.refine else ''}"
                  f"{f'  within {predictor.limit(args.within).describe()}' if args.within else ''}\n\n")
    for p in preds:
        if args.json:
            out.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
        else:
            out.write(format_table(p, args.show) + "\n")
        out.flush()
    if args.explain is not None:
        records = explain.write_explanations(predictor, args.images, args.explain, batch_size=args.batch_size,
                                             temperature=not args.no_temperature, method=args.explain_method)
        done = [r for r in records if "png" in r]
        if done:
            per = sum(r["seconds"] for r in done) / len(done)
            print(f"explanations: {len(done)} overlay(s) in {args.explain} ({per:.2f} s per photo)", file=sys.stderr)
    failed = sum(p.error is not None for p in preds)
    if failed:
        print(f"{failed} of {len(preds)} image(s) could not be read", file=sys.stderr)
    return 1 if failed == len(preds) else 0


# ----------------------------------------------------------------------------- --csv

CSV_COLUMNS = ("image", "lat", "lon", "cell", "prob", "joint")
IMAGE_SUFFIXES = frozenset({f".{e}" for e in FORMAT_EXTENSIONS.values()} | {".jpeg", ".tiff", ".heif"})


def csv_inputs(items: Sequence[str], images_root: str | None = None) -> tuple[list[tuple[str, Path | str]], dict]:
    """The images ``predict --csv`` is given, as ``[(image key, path)]`` in input order (the
    first of a repeated key kept), and ``{reason: count}`` of what was left out.

    An item is a directory (its image files, sorted by name; not its sub-folders), a CSV
    (its image column, ``path`` or ``id`` names as ``evaluate --csv``; images found under
    ``images_root``, default the CSV's folder, by ``geohier.tables.Locator``), or an image
    file. A missing item, or a CSV without an image column, is an InputError. Images found
    inside zips or tars under the root come as member references (str, read in place)."""
    out: list[tuple[str, Path | str]] = []
    seen: set[str] = set()
    left: dict[str, int] = {}
    had_csv = False

    def add(key: str, path: Path | str) -> None:
        if key in seen:
            left[tables.DUPLICATE_KEY] = left.get(tables.DUPLICATE_KEY, 0) + 1
            return
        seen.add(key)
        out.append((key, path))

    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            for f in sorted(p.iterdir(), key=lambda f: f.name):
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                    add(tables.image_key(f.name), f)
        elif p.suffix.lower() in (".csv", ".tsv") and p.is_file():
            had_csv = True
            header, rows = tables.read_rows(p)
            col = (tables.find_column(header, tables.CSV_ALIASES["path"])
                   or tables.find_column(header, tables.CSV_ALIASES["id"]))
            if col is None:
                shown = ", ".join(h for h in header if h) or "(none)"
                raise InputError(f"{p} has no image id or path column; accepted names (any case): "
                                 f"{tables.aliases('id')} (an id) or {tables.aliases('path')} (a path). "
                                 f"Columns found: {shown}")
            root = Path(images_root).expanduser() if images_root else p.parent
            tables.check_images_root(root)
            locate = tables.Locator(root)
            for row in rows:
                ref = (row.get(col) or "").strip()
                if not ref:
                    left[tables.MISSING_REF] = left.get(tables.MISSING_REF, 0) + 1
                    continue
                found, why = locate.locate(ref)
                if found is None:
                    why = why or "image not found under the images root"
                    left[why] = left.get(why, 0) + 1
                    continue
                add(tables.image_key(ref), found)
        elif p.is_file():
            add(tables.image_key(p.name), p)
        else:
            raise InputError(f"{item}: no such file or directory")
    if images_root is not None and not had_csv:
        raise InputError("--images-root goes with a CSV input")
    return out, left


def done_keys(out: Path) -> set[str]:
    """The image keys already in a ``predict --csv`` output (empty for a new file). A last
    line cut short by a kill is dropped first; a file with other columns is refused."""
    if not out.exists() or out.stat().st_size == 0:
        return set()
    if not out.is_file():
        raise InputError(f"--csv {out}: not a file")
    data = out.read_bytes()
    if not data.endswith(b"\n"):
        with open(out, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        if out.stat().st_size == 0:
            return set()
    header, rows = tables.read_rows(out)
    if [h.strip().lower() for h in header] != list(CSV_COLUMNS):
        raise InputError(f"--csv {out} exists and is not a predict --csv output (columns: {', '.join(header)}); "
                         "give a new file, or the one an earlier run wrote to continue it")
    return {r["image"] for r in rows}


def run_csv(args: argparse.Namespace, ws: Workspace) -> int:
    """``predict ... --csv OUT.csv``: see the module's docstring."""
    for flag, value in (("--json", args.json), ("--explain", args.explain), ("--coverage", args.coverage),
                        ("--abstain", args.abstain)):
        if value not in (None, False):
            raise InputError(f"{flag} does not go with --csv (one point per image)")
    out = Path(args.csv).expanduser()
    if out.is_dir():
        raise InputError(f"--csv {args.csv}: a directory, not a CSV file")
    if not out.parent.is_dir():
        raise InputError(f"--csv {args.csv}: no such directory {out.parent}")
    inputs, left = csv_inputs(args.images, args.images_root)
    for why, n in sorted(left.items()):
        print(f"left out: {n} row(s) or file(s): {why}", file=sys.stderr)
    done = done_keys(out)
    todo = [(k, p) for k, p in inputs if k not in done]
    if not inputs:
        raise InputError(f"no image to predict in {', '.join(args.images)}")
    if not todo:
        print(f"nothing to do: all {len(inputs)} image(s) are already in {out}")
        return 0
    predictor = load_predictor(resolve_runs(ws, args.run, args.runs), device=args.device)
    rules = rules_from_args(args, predictor.levels)
    if predictor.synthetic_note:
        print(f"note: {predictor.synthetic_note}", file=sys.stderr)
    from geohier.progress import progress_bar

    written = failed = 0
    bs = args.batch_size
    new = not out.exists() or out.stat().st_size == 0
    with open(out, "a", encoding="utf-8", newline="") as fh, \
            progress_bar(total=len(todo), desc="predict", unit="img") as bar:
        w = csv.writer(fh, lineterminator="\n")
        if new:
            w.writerow(CSV_COLUMNS)
            fh.flush()
        for start in range(0, len(todo), bs):
            chunk = todo[start:start + bs]
            preds = predictor.predict_files([str(p) for _, p in chunk], names=[k for k, _ in chunk], rules=rules,
                                            temperature=not args.no_temperature, batch_size=bs, places=0,
                                            refine=args.refine, within=args.within)
            for (key, path), pred in zip(chunk, preds, strict=True):
                b = pred.best if pred.error is None else None
                if b is None:
                    failed += 1
                    bar.write(f"{path}: {pred.error or 'no prediction'}", file=sys.stderr)
                    continue
                w.writerow([key, f"{b.lat:.6f}", f"{b.lon:.6f}", b.cell, f"{b.prob:.6f}", f"{b.joint:.6f}"])
                written += 1
            fh.flush()  # whole rows on disk after every batch: a kill loses at most this batch
            bar.update(len(chunk))
    skipped = len(inputs) - len(todo)
    print(f"wrote {written} row(s) to {out}" + (f"; {skipped} already there" if skipped else "")
          + (f"; {failed} image(s) could not be read" if failed else ""))
    return 1 if written == 0 and failed else 0
