"""``python -m pipeline score``: score other systems' predictions on a truth set.

Each PRED.csv holds one row per image: a key (image / path / id / IMG_ID ..., matched to
the truth's by file name without extension) and predicted coordinates (pred_lat/pred_lon,
predicted_lat/predicted_long, latitude/longitude or lat/lon). TRUTH.csv is any CSV that
``import-csv`` or ``evaluate --csv`` reads (Im2GPS3k / YFCC4k, OSV-5M's test.csv,
path,lat,lon). The scores use OSV-5M's protocol (geohier.benchmark), come with the trivial
baselines on the same images, and are saved in the workspace's leaderboard under the truth
set's hash, next to the runs evaluated on the same truth set.
"""

from __future__ import annotations

import json
import sys

from geohier import benchmark, metrics, tables
from geohier.errors import InputError
from geohier.leaderboard import Leaderboard
from geohier.workspace import Workspace, json_safe


def training_points(ws: Workspace):
    """(lat, lon) of the workspace's train split, or (None, None) when it has none."""
    if not ws.has_manifest():
        return None, None
    with ws.manifest() as m:
        frame = m.frame(("lat", "lon"), "split = ?", ("train",))
    if frame.empty:
        return None, None
    return frame["lat"].to_numpy(float), frame["lon"].to_numpy(float)


def record_baselines(board: Leaderboard, truth: benchmark.TruthSet, ws: Workspace, geocode: bool = True,
                     scores: dict | None = None) -> dict:
    """Score the baselines on ``truth`` (trained on the workspace's train split when there
    is one), unless ``scores`` already holds them, and record them; returns
    ``{name: {"geo", "note"}}``."""
    base = scores if scores is not None else benchmark.baseline_scores(truth, *training_points(ws), geocode=geocode)
    for name, b in base.items():
        board.record(truth.info() | {"hash": truth.hash}, f"baseline: {name}", "baseline", b["geo"], note=b["note"])
    return base


def score_files(ws: Workspace, preds: list[str], truth_csv: str, names: list[str] | None = None,
                missing: str = "fail", save: bool = True, geocode: bool = True) -> dict:
    """Score each prediction file on the truth CSV; save them (and the baselines) in the
    leaderboard. Returns ``{"truth", "systems": [score ...], "baselines": {...}}``."""
    truth = benchmark.read_truth(truth_csv)
    board = Leaderboard(ws.data_dir)
    systems = []
    for i, path in enumerate(preds):
        p = benchmark.read_predictions(path, names[i] if names else None)
        result, plat, plon = benchmark.score_aligned(truth, p, missing=missing, geocode=geocode)
        systems.append(result)
        if save:
            board.record(truth.info() | {"hash": truth.hash}, p.name, "system", result["geo"],
                         note=f"scored from {path}",
                         points={"key": truth.keys, "true_lat": truth.lat, "true_lon": truth.lon,
                                 "pred_lat": plat, "pred_lon": plon},
                         extra={"matching": result["matching"]})
    baselines = benchmark.baseline_scores(truth, *training_points(ws), geocode=geocode)
    if save:
        record_baselines(board, truth, ws, scores=baselines)
    return {"truth": truth.info(), "systems": systems, "baselines": baselines}


def format_scores(out: dict) -> str:
    t = out["truth"]
    lines = [f"truth set {t['name']} ({t['format']}): {t['images']} images, hash {t['hash']}"]
    left_out = dict(t.get("invalid") or {})
    if t.get("duplicates"):
        left_out[tables.DUPLICATE_KEY] = t["duplicates"]
    if left_out:
        lines.append("  left out: " + ", ".join(f"{n} {why}" for why, n in sorted(left_out.items())))
    head = f"{'system':<28} {'GeoScore':>8} {'median km':>10} " + " ".join(
        f"{str(k) + ' km':>8}" for k in metrics.KM_THRESHOLDS) + f" {'country':>8} {'missing':>8}"
    lines += ["", head]
    rows = [(s["system"], s["geo"]) for s in out["systems"]]
    rows += [(f"baseline: {n}", b["geo"]) for n, b in out["baselines"].items()]
    for name, g in rows:
        lines.append(f"{name[:28]:<28} {num(g.get('geoscore'), 8, 0)} {num(g.get('median_km'), 10, 0)} "
                     + " ".join(pct(g.get(f"acc_{k}km"), 8) for k in metrics.KM_THRESHOLDS)
                     + f" {pct(g.get('country_acc'), 8)} {g['missing']['n']:>8}")
    policies = {s["geo"]["missing"]["policy"] for s in out["systems"]}
    lines += ["", "missing predictions: " + "; ".join(sorted(policies))]
    for s in out["systems"]:
        m = s["matching"]
        bad = sum((m.get("invalid_predictions") or {}).values())
        if m["unmatched_predictions"] or bad or m["duplicate_predictions"]:
            lines.append(f"{s['system']}: {m['unmatched_predictions']} predictions match no truth image, "
                         f"{bad} have unusable coordinates"
                         + (f" ({', '.join(f'{n} {w}' for w, n in m['invalid_predictions'].items())})" if bad else "")
                         + f", {m['duplicate_predictions']} repeat an image")
    for n, b in out["baselines"].items():
        if b.get("note"):
            lines.append(f"baseline {n}: {b['note']}")
    return "\n".join(lines)


def pct(v, width: int = 7) -> str:
    """A fraction as a right-aligned percentage ("-" for None): the reports' columns."""
    return f"{'-':>{width}}" if v is None else f"{100 * v:{width - 1}.1f}%"


def num(v, width: int, digits: int) -> str:
    """A number right-aligned to ``width`` with ``digits`` decimals ("-" for None)."""
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def register(sub) -> None:
    p = sub.add_parser("score", help="score other systems' predictions on a truth set (OSV-5M protocol)",
                       description=__doc__.splitlines()[0])
    p.add_argument("preds", nargs="+", metavar="PRED.csv",
                   help="prediction files: an image key column and predicted lat/lon columns")
    p.add_argument("--truth", required=True, metavar="TRUTH.csv",
                   help="the truth set: any CSV that import-csv accepts (Im2GPS3k, YFCC4k, OSV-5M, path,lat,lon)")
    p.add_argument("--name", default=None,
                   help="the system's name in the leaderboard (default: the file name without extension); "
                        "with several files, a comma list")
    p.add_argument("--skip-missing", action="store_true",
                   help=f"leave out truth images without a prediction (default: count each as a "
                        f"{benchmark.MISSING_KM:,.0f} km error)")
    p.add_argument("--no-save", action="store_true", help="do not record the scores in the leaderboard")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.set_defaults(func=run)


def run(args, ws: Workspace) -> int:
    names = None
    if args.name:
        names = [n.strip() for n in args.name.split(",")]
        if len(names) != len(args.preds) or not all(names):
            raise InputError(f"--name gives {len(names)} name(s) for {len(args.preds)} prediction file(s); "
                             "give one per file, comma-separated")
    out = score_files(ws, args.preds, args.truth, names, "skip" if args.skip_missing else "fail",
                      save=not args.no_save)
    if args.json:
        print(json.dumps(json_safe(out), indent=1, ensure_ascii=False))
    else:
        print(format_scores(out))
        if not args.no_save:
            print(f"\nsaved in {Leaderboard(ws.data_dir).path}", file=sys.stderr)
    return 0
