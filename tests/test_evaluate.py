"""pipeline.evaluate on a tiny run: calibration into meta.json, eval.json, CSV aliases, CLI."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CITIES  # noqa: E402

from geohier import splits
from geohier.errors import InputError, WorkspaceError
from pipeline import cli, evaluate

pytestmark = pytest.mark.slow  # trains tiny runs to evaluate: `make test-fast` skips this module

# Clusters of photos in six countries, 6 images each: 4 train, 1 val, 1 test.
CLUSTERS = CITIES
SPLIT_OF = ["train", "train", "train", "train", "val", "test"]


def make_tiny_workspace(ws, levels=(1, 3)):
    """A workspace with 36 tiny JPEGs, splits, and hierarchy.json at ``levels``."""
    from geohier.hierarchy import build_hierarchy
    from tests.conftest import jpeg_bytes

    splits = {}
    with ws.manifest() as m:
        for ci, (lat, lon, color) in enumerate(CLUSTERS):
            for j in range(6):
                shade = tuple(max(0, min(255, c + 7 * j)) for c in color)
                data = jpeg_bytes(size=(40, 32), color=shade)
                i = m.store_image(data, "jpg", source="demo", source_id=f"c{ci}-{j}",
                                  lat=lat + 0.01 * j, lon=lon + 0.01 * j)
                splits[i] = SPLIT_OF[j]
        m.set_splits(splits)
        lat, lon = m.points()
    h = build_hierarchy(lat, lon, levels, min_images=1)
    h.save(ws.hierarchy_path)
    return h


def make_tiny_run(ws, name="tiny", levels=(1, 3), image_size=32, seed=0, extra_meta=None):
    """A finished run dir (resnet18 at 32 px, random weights) for the tiny workspace."""
    from geohier.model import build_model, save_checkpoint
    from geohier.presets import EvalPreset

    h = make_tiny_workspace(ws, levels) if not ws.hierarchy_path.exists() else None
    if h is None:
        from geohier.hierarchy import Hierarchy
        h = Hierarchy.load(ws.hierarchy_path)
    torch.manual_seed(seed)
    model = build_model("resnet18", {lv: h.num_classes[lv] for lv in levels})
    run_dir = ws.models_dir / name
    run_dir.mkdir(parents=True)
    meta = {"hierarchy": h.to_dict(), "hierarchy_hash": h.hash,
            "input": EvalPreset(image_size).to_dict(),
            "temperatures": {str(lv): 1.0 for lv in levels}, "config": {"backbone": "resnet18"},
            "metrics": {}}
    # the run owns the workspace's split, as training records it (geohier.splits)
    own = splits.current(ws)
    splits.attach(run_dir, own, ws)
    meta["split"] = own.describe()
    meta.update(extra_meta or {})
    save_checkpoint(run_dir, model, meta)
    (run_dir / "config.json").write_text(json.dumps({"backbone": "resnet18", "levels": list(levels),
                                                     "split": own.describe()}))
    (run_dir / "status.json").write_text(json.dumps({"state": "done", "epoch": 1, "epochs": 1,
                                                    "progress": 1.0}))
    return run_dir


@pytest.fixture
def tiny_run(ws):
    return make_tiny_run(ws)


def _in01(v):
    return v is not None and 0.0 <= v <= 1.0


def test_calibrate_run_writes_temperatures(ws, tiny_run):
    before = json.loads((tiny_run / "meta.json").read_text())
    out = evaluate.calibrate_run(tiny_run, ws, progress=False)
    meta = json.loads((tiny_run / "meta.json").read_text())
    assert set(out) == {"1", "3"}
    for lv in ("1", "3"):
        t = meta["temperatures"][lv]
        assert 0.05 <= t <= 20.0 and t == out[lv]["temperature"]
        assert out[lv]["n"] == 6  # one val image per cluster
        assert _in01(out[lv]["ece_before"]) and _in01(out[lv]["ece_after"])
        # the fit minimises NLL on exactly these rows
        assert out[lv]["nll_after"] <= out[lv]["nll_before"] + 1e-9
        assert meta["calibration"]["levels"][lv]["ece_after"] == pytest.approx(out[lv]["ece_after"])
    # everything else of meta.json is kept; the run still loads
    assert meta["hierarchy_hash"] == before["hierarchy_hash"] and meta["arch"] == before["arch"]
    from geohier.model import load_run
    load_run(tiny_run)


def test_evaluate_run_writes_eval_json(ws, tiny_run):
    res = evaluate.evaluate_run(tiny_run, ws, progress=False)
    on_disk = json.loads((tiny_run / "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert res["format"] == "geohier-eval/1" and res["run"] == "tiny"
    own = splits.of_run(tiny_run, ws)
    assert res["source"] == {"kind": "split", "split": "test", "data_dir": str(ws.data_dir), "missing_files": 0,
                             "gone": 0, "split_hash": own.hash, "split_own": True}
    assert res["notes"] == []
    assert res["images"] == 6 and res["skipped"] == 0 and res["levels"] == [1, 3]
    for lv in ("1", "3"):
        r = res["per_level"][lv]
        assert r["n"] == 6
        assert all(_in01(r[k]) for k in ("top1", "top5", "top10", "ece_before", "ece_after"))
        assert r["top1"] <= r["top5"] <= r["top10"]
        rel = res["reliability"][lv]
        assert sum(rel["before"]["count"]) == 6 and len(rel["after"]["lo"]) == 15
    # level 1 has 4 classes at most: top-5 covers them all
    assert res["per_level"]["1"]["top5"] == 1.0
    g = res["geo"]
    assert g["n"] == 6 and g["level"] == 3 and g["point"] == "centroid"
    assert g["rule"] in ("hierarchical", "argmax") and "argmax" in res["geo_by_rule"]
    keys = [f"acc_{t}km" for t in (1, 25, 200, 750, 2500)]
    vals = [g[k] for k in keys]
    assert all(_in01(v) for v in vals) and vals == sorted(vals)
    assert 0 <= g["median_km"] <= math.pi * 6371 and 0 <= g["geoscore"] <= 5000
    # evaluate calibrated first (no calibration in meta.json yet)
    assert res["calibration"]["split"] == "val"
    assert isinstance(res["countries"], list)
    for row in res["countries"]:
        assert row["n"] >= 1 and (row["country_acc"] is None or _in01(row["country_acc"]))
    text = evaluate.format_report(res)
    assert "top1" in text and "2500 km" in text and "GeoScore" in text


def test_evaluate_geo_uses_cell_positions(ws):
    """With cell_positions equal to the true points of a one-cluster-per-class level, a
    correct class gives 0 km: check the point source switches and distances are used."""
    h = make_tiny_workspace(ws, (1, 3))
    lat_c, lon_c = h.centroids(3)
    pos = [[float(a) + 0.5, float(b)] for a, b in zip(lat_c, lon_c, strict=True)]
    run = make_tiny_run(ws, "pos", extra_meta={"cell_positions": {"3": pos}})
    res = evaluate.evaluate_run(run, ws, calibrate=False, progress=False)
    assert res["geo"]["point"] == "cell_positions"
    assert "calibration" not in json.loads((run / "meta.json").read_text())
    from geohier.prediction import cell_positions, position_source

    meta = {"cell_positions": {"3": pos}}
    got = cell_positions(h, meta, 3)
    assert position_source(meta, 3, len(got)) == "cell_positions" and got[:2, 0].tolist() == [pos[0][0], pos[1][0]]
    got = cell_positions(h, {}, 3)
    assert position_source({}, 3, len(got)) == "centroid" and got[0, 0] == pytest.approx(lat_c[0])


@pytest.mark.parametrize("cols", [("path", "lat", "lon"), ("id", "latitude", "longitude"),
                                  ("IMG_ID", "LAT", "LON")])
def test_evaluate_external_csv_alias_families(ws, tiny_run, tmp_path, make_jpeg, cols):
    root = tmp_path / "ext"
    rows = []
    for k, (lat, lon, color) in enumerate(CLUSTERS[:3]):
        if cols[0] == "id":  # OSV-5M: a bare numeric id; the image sits in a sub-folder
            make_jpeg(root / "00" / f"{1000 + k}.jpg", size=(40, 32), color=color)
            rows.append({cols[0]: str(1000 + k), cols[1]: lat, cols[2]: lon})
        else:
            make_jpeg(root / f"img{k}.jpg", size=(40, 32), color=color)
            rows.append({cols[0]: f"img{k}.jpg", cols[1]: lat, cols[2]: lon})
    rows.append({cols[0]: "img-missing.jpg", cols[1]: 10.0, cols[2]: 10.0})
    rows.append({cols[0]: "img0.jpg", cols[1]: 95.0, cols[2]: 10.0})  # invalid latitude
    csv = tmp_path / "points.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    res = evaluate.evaluate_run(tiny_run, ws, csv=csv, images_root=root, calibrate=False, progress=False)
    assert res["images"] == 3
    assert res["source"]["kind"] == "csv" and res["source"]["missing_files"] == 1
    assert res["source"]["invalid_coordinates"] == 1
    assert res["geo"]["n"] == 3


def test_csv_missing_column_message(ws, tiny_run, tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("file,latitude,elevation\na.jpg,1,2\n")
    with pytest.raises(InputError, match=r"no longitude column; accepted names.*lon, lng.*Columns found: file, latitude, elevation"):
        evaluate.evaluate_run(tiny_run, ws, csv=csv, progress=False)
    csv.write_text("name,LAT,LON\na.jpg,1,2\n")
    with pytest.raises(InputError, match="no image id or path column"):
        evaluate.read_points_csv(csv)
    with pytest.raises(InputError, match="does not exist"):
        evaluate.read_points_csv(tmp_path / "nope.csv")


def test_evaluate_refuses_running_and_empty_split(ws, tiny_run):
    import subprocess
    import sys

    # another live process is training it: refused
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)  # pipeline train"])
    try:
        (tiny_run / "status.json").write_text(json.dumps({"state": "running", "pid": other.pid}))
        with pytest.raises(WorkspaceError, match="still running"):
            evaluate.evaluate_run(tiny_run, ws, progress=False)
    finally:
        other.kill()
        other.wait()
    # the training process calibrating its own run at the end: allowed
    (tiny_run / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid()}))
    assert set(evaluate.calibrate_run(tiny_run, ws, progress=False)) == {"1", "3"}
    # a run whose process died is failed, not running: evaluating it is allowed
    (tiny_run / "status.json").write_text(json.dumps({"state": "running", "pid": other.pid}))
    before = evaluate.evaluate_run(tiny_run, ws, calibrate=False, progress=False)["geo"]
    (tiny_run / "status.json").write_text(json.dumps({"state": "done"}))
    with ws.manifest() as m:
        test_ids = m.frame(["id"], where="split = 'test'")["id"].tolist()
        m.conn.execute("UPDATE images SET split = 'train' WHERE split = 'test'")
    # the run keeps its own test images whatever the manifest now says: the same numbers
    assert evaluate.evaluate_run(tiny_run, ws, calibrate=False, progress=False)["geo"] == before
    with ws.manifest() as m:  # its test images gone from the workspace: nothing to score
        m.conn.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in test_ids])
    with pytest.raises(InputError, match=r"test split \(6 images.* has no usable image.*: 6 gone"):
        evaluate.evaluate_run(tiny_run, ws, calibrate=False, progress=False)
    with pytest.raises(InputError, match="unknown split"):
        evaluate.evaluate_run(tiny_run, ws, split="train", progress=False)


def cli_main(argv):
    return cli.main(argv)


def test_cli_evaluate(ws, tiny_run, capsys):
    rc = cli_main(["evaluate", "tiny", "--split", "val", "--no-calibrate"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "geolocation" in out.out and "wrote" in out.out
    res = json.loads((tiny_run / "eval.json").read_text())
    assert res["source"]["split"] == "val" and res["calibration"] is None
    assert cli_main(["evaluate", "no-such-run"]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err
    assert cli_main(["evaluate", "tiny", "--images-root", "x"]) == 2


# ----------------------------------------------------------------------------- refinement


def write_split_neighbours(ws, run_dir, splits=("train",)):
    """The run's neighbours.safetensors from its own model's features of the workspace's
    ``splits`` images, as the frozen trainer writes it (manifest ids as ids)."""
    from geohier.dataset import ManifestDataset
    from geohier.hierarchy import Hierarchy
    from geohier.model import load_run
    from geohier.presets import EvalPreset
    from geohier.refine import NeighbourIndex
    from geohier.runs import Run

    model, meta = load_run(run_dir)
    h = Hierarchy.from_dict(meta["hierarchy"])
    finest = max(int(v) for v in meta["arch"]["levels"])
    feats, lat, lon, classes, ids = [], [], [], [], []
    for split in splits:
        ds = ManifestDataset(ws, h, split, transform=EvalPreset.from_meta(meta))
        out = evaluate.collect_logits(model, ds, [finest], progress=False, features=True)
        assert out["features"].shape == (len(out["index"]), model.feature_dim)
        feats.append(out["features"])
        lat.append(out["lat"])
        lon.append(out["lon"])
        classes.append(out["labels"][finest])
        ids.append(ds.ids[out["index"]])
    index = NeighbourIndex.from_features(torch.cat(feats), np.concatenate(lat), np.concatenate(lon),
                                         np.concatenate(classes), finest, ids=np.concatenate(ids),
                                         hierarchy_hash=h.hash)
    index.save(Run(run_dir).neighbours_path)
    return index


def test_evaluate_refine_known_answer(ws):
    """The index holds the test images themselves: with a flat classifier (every cell
    kept) and the nearest neighbour alone deciding, each test image finds itself, so the
    refined guess is exact while the cell's position is not."""
    from geohier.leaderboard import Leaderboard

    flat = {"temperatures": {"1": 1000.0, "3": 1000.0}}
    run = make_tiny_run(ws, "flat", extra_meta=flat)
    write_split_neighbours(ws, run, ("train", "test"))
    res = evaluate.evaluate_run(run, ws, calibrate=False, progress=False, refine=True, refine_k=1, refine_tau=1e-3)
    plain, refined = res["geo_by_rule"]["hierarchical"], res["geo_by_rule"]["hierarchical+refine"]
    assert refined["rule"] == "hierarchical+refine" and refined["point"] == "neighbours"
    assert refined["refined"] == 6 and refined["n"] == 6 and refined["index_rows"] == 30
    assert refined["acc_1km"] == 1.0 and refined["median_km"] < 0.01
    assert plain["median_km"] > 10 and plain["acc_1km"] < 1.0
    assert res["geo"]["rule"] == "hierarchical"  # the headline stays what predict answers by default
    board = Leaderboard(ws.data_dir)
    entries = board.entries(board.truth_sets()[0]["hash"])
    assert entries["flat"]["kind"] == entries["flat +refine"]["kind"] == "run"
    assert entries["flat +refine"]["geo"]["median_km"] < 0.01 < entries["flat"]["geo"]["median_km"]
    assert "hierarchical+refine (k=1, tau=0.001)" in entries["flat +refine"]["note"]
    assert "refined with the nearest training images" in evaluate.format_report(res)


def test_evaluate_refine_cli(ws, tiny_run, capsys):
    rc = cli_main(["evaluate", "tiny", "--no-calibrate", "--refine"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "run tiny has no neighbours.safetensors" in err and "frozen backbone" in err
    assert not (tiny_run / "eval.json").exists()
    write_split_neighbours(ws, tiny_run)
    rc = cli_main(["evaluate", "tiny", "--no-calibrate", "--refine"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "refined with the nearest training images (hierarchical+refine, k=10, tau=0.05" in out.out
    res = json.loads((tiny_run / "eval.json").read_text())
    r = res["geo_by_rule"]["hierarchical+refine"]
    assert 0 <= r["refined"] <= r["n"] == 6 and r["index_rows"] == 24
    assert set(res["geo_by_rule"]) == {"argmax", "hierarchical", "hierarchical+refine"}
    # without --refine: no refine rule, as before
    assert cli_main(["evaluate", "tiny", "--no-calibrate"]) == 0
    assert "hierarchical+refine" not in json.loads((tiny_run / "eval.json").read_text())["geo_by_rule"]


# ----------------------------------------------------------------------------- the CSV door

_OPENED: list[str] | None = None
_HOOKED = False


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


@pytest.fixture
def opened():
    """Every file this process opens while the test runs (realpaths), from Python's audit hook."""
    global _OPENED, _HOOKED
    if not _HOOKED:
        import sys

        sys.addaudithook(_audit)
        _HOOKED = True
    _OPENED = []
    yield _OPENED
    _OPENED = None


def test_evaluate_csv_outside_root_and_bad_coordinates(ws, tiny_run, tmp_path, make_jpeg, opened):
    from geohier import tables

    root, outside = tmp_path / "ext", tmp_path / "outside"
    for k, (_, _, color) in enumerate(CLUSTERS[:3]):
        make_jpeg(root / f"img{k}.jpg", size=(40, 32), color=color)
    climb = make_jpeg(outside / "climb.jpg", size=(40, 32), color=(5, 5, 5))
    secret = make_jpeg(outside / "secret.jpg", size=(40, 32))
    other = make_jpeg(outside / "other.jpg", size=(40, 32), color=(9, 9, 9))
    (root / "link.jpg").symlink_to(other)
    (lat0, lon0, _), (lat1, _, _), (lat2, lon2, _) = CLUSTERS[:3]
    csv = tmp_path / "points.csv"
    csv.write_text("path,lat,lon\n"
                   f"img0.jpg,{lat0},{lon0}\n"
                   f"img1.jpg,{lat1},181\n"               # an invalid longitude: left out of both sides
                   f"img2.jpg,{lat2},{lon2}\n"
                   "../outside/climb.jpg,10,10\n"
                   f"{secret},11,11\n"
                   "link.jpg,12,12\n"
                   f"img2.jpg,{lat2},{lon2}\n", encoding="utf-8")
    opened.clear()  # from here on: what reading the CSV and evaluating open
    frame = evaluate.read_points_csv(csv, root)
    assert list(frame["key"]) == ["img0", "img2"] and frame.attrs["rows"] == 7 and frame.attrs["invalid"] == 1
    assert frame.attrs["skipped"] == {tables.INVALID_RANGE: 1, tables.OUTSIDE_ROOT: 3, tables.DUPLICATE_KEY: 1}
    res = evaluate.evaluate_run(tiny_run, ws, csv=csv, images_root=root, calibrate=False, progress=False)
    assert res["images"] == 2 and res["source"]["invalid_coordinates"] == 1
    assert res["truth"]["invalid"] == {tables.INVALID_RANGE: 1}  # the same row left out of the truth set
    assert str((root / "img0.jpg").resolve()) in opened  # the hook sees what is read
    assert not {str(p.resolve()) for p in (climb, secret, other)} & set(opened)


@pytest.mark.parametrize("content, message", [
    (b"path,lat,lon\nimg0.jpg,1,2\nimg\x001.jpg,1,2\n", "line 3: a NUL byte"),
    (b'path,lat,lon\n"img0.jpg"x,1,2\n', "line 2: malformed CSV"),
    (b"path,lat,lon\nimg0.jpg,1,2\ncaf\xe9.jpg,1,2\n", "not UTF-8 text (byte 0xe9 on line 3)"),
    (("path,lat,lon\nimg0.jpg,1,2\nimg1.jpg,1," + "9" * 140_000 + "\n").encode(), "line 3: a field longer than 131,072"),
])
def test_cli_evaluate_csv_malformed_is_one_line(ws, tiny_run, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    rc = cli_main(["evaluate", "tiny", "--no-calibrate", "--csv", str(bad), "--images-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(bad) in err and message in err, err
    assert not (tiny_run / "eval.json").exists()


# ----------------------------------------------------------------------------- conformal regions, abstention


def test_calibrate_stores_conformal_and_evaluate_reports_regions_and_abstention(ws, tiny_run):
    from geohier import conformal as cf
    from geohier.predictor import Predictor

    evaluate.calibrate_run(tiny_run, ws, progress=False)
    meta = json.loads((tiny_run / "meta.json").read_text())
    c = meta["conformal"]
    assert c["score"] == "aps" and c["n"] == 6 and c["split"] == "val" and c["level"] == 3
    assert c["scores"] == sorted(c["scores"]) and len(c["scores"]) <= 6
    assert c["temperatures"] == {k: pytest.approx(v) for k, v in meta["temperatures"].items()}
    res = evaluate.evaluate_run(tiny_run, ws, calibrate=False, progress=False)
    assert set(res["conformal"]) == {"0.8", "0.9", "0.95"}
    # the same numbers by hand from the Predictor's joint probabilities on the test logits
    predictor = Predictor.load(tiny_run, device="cpu")
    ds, _ = evaluate._split_dataset(ws, predictor, "test")
    col = evaluate.collect_logits(predictor, ds, [1, 3], progress=False)
    logp = predictor.log_joint(col["logits"])
    conf = cf.Conformal.from_dict(c)
    for cov in ("0.8", "0.9", "0.95"):
        r = res["conformal"][cov]
        tau = conf.threshold(float(cov))
        # n = 6: ceil(7 * 0.8) = 6 is the largest score; 0.9 and 0.95 need a 7th: no threshold
        assert r["threshold"] == (pytest.approx(max(c["scores"])) if cov == "0.8" else None)
        order, sizes = cf.region_prefix(logp, tau)
        assert r["mean_cells"] == pytest.approx(float(sizes.double().mean()))
        covered = [int(col["labels"][3][j]) in order[j, :sizes[j]].tolist() for j in range(6)]
        assert r["coverage"] == pytest.approx(np.mean(covered))
        areas = predictor.finest_areas()
        km2 = [areas[order[j, :sizes[j]].numpy()].sum() for j in range(6)]
        assert r["median_area_km2"] == pytest.approx(float(np.median(km2)))
        assert r["n"] == 6
    # 0.9 and 0.95 keep every cell with probability > 0: everything covered
    assert res["conformal"]["0.95"]["coverage"] == 1.0
    ab = res["abstention"]
    assert "top hierarchical joint probability" in ab["confidence"]
    assert [r["share"] for r in ab["rows"]] == list(cf.SHARES)
    full = ab["rows"][-1]
    assert full["n"] == 6 and full["acc_25km"] == pytest.approx(res["geo"]["acc_25km"])
    assert full["acc_2500km"] == pytest.approx(res["geo"]["acc_2500km"])
    text = evaluate.format_report(res)
    assert "prediction regions (conformal" in text and "most confident" in text


def test_conformal_weights_images_or_groups_calibrate_the_regions_that_way(ws, tiny_run, capsys):
    from geohier import conformal as cf

    def method():
        return json.loads((tiny_run / "meta.json").read_text())["conformal"]["method"]

    evaluate.calibrate_run(tiny_run, ws, progress=False)
    assert method() == "groups"  # the default: each place group alike
    # asking for photos recalibrates; the report says so and holds the image share up as the guarantee
    assert cli_main(["evaluate", "tiny", "--conformal-weights", "images"]) == 0
    out = capsys.readouterr().out
    assert method() == "images" and "their region (what the calibration guarantees)" in out
    res = json.loads((tiny_run / "eval.json").read_text())
    assert res["conformal_calibration"]["method"] == "images"
    # photo weights by hand: the ceil(7 * 0.8) = 6th smallest of the 6 val scores
    c = cf.Conformal.from_dict(json.loads((tiny_run / "meta.json").read_text())["conformal"])
    assert c.threshold(0.8) == pytest.approx(max(c.scores))
    # without the flag the run keeps what it has, recalibrated or not; --no-calibrate cannot switch it
    res = evaluate.evaluate_run(tiny_run, ws, progress=False)
    assert method() == "images" and res["conformal_calibration"]["method"] == "images"
    res = evaluate.evaluate_run(tiny_run, ws, calibrate=True, progress=False)
    assert method() == "images" and res["conformal_calibration"]["method"] == "images"
    assert cli_main(["evaluate", "tiny", "--no-calibrate", "--conformal-weights", "groups"]) == 2
    err = capsys.readouterr().err
    assert "weighs images, not groups: drop --no-calibrate to recalibrate" in err and "Traceback" not in err
    assert method() == "images"
    assert cli_main(["evaluate", "tiny", "--conformal-weights", "groups"]) == 0
    assert method() == "groups" and "groups' shares (what the calibration guarantees)" in capsys.readouterr().out
    with pytest.raises(InputError, match="unknown conformal weighing 'places'"):
        evaluate.calibrate_run(tiny_run, ws, progress=False, conformal_method="places")


def test_evaluate_without_conformal_says_how_to_calibrate(ws, tiny_run):
    res = evaluate.evaluate_run(tiny_run, ws, calibrate=False, progress=False)
    assert res["conformal"] is None and res["abstention"]["rows"][-1]["n"] == 6
    assert "evaluate it with --calibrate" in evaluate.format_report(res)


def test_evaluate_reports_recall_against_area(ws, tiny_run):
    res = evaluate.evaluate_run(tiny_run, ws, calibrate=False, progress=False)
    ra = res["recall_area"]
    assert ra["n"] == 6 and ra["level"] == 3 and "joint probability" in ra["ranking"]
    recalls = [p["recall"] for p in ra["points"]]
    areas = [p["area_km2"] for p in ra["points"]]
    assert len(recalls) == 30 and recalls == sorted(recalls) and areas == sorted(areas)
    assert recalls[-1] == 1.0  # the whole grid holds every truth
    saved = json.loads((tiny_run / "eval.json").read_text())
    assert saved["recall_area"]["points"] == ra["points"]
