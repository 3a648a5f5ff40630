"""The benchmark protocol: truth CSV formats, prediction files, scoring, the leaderboard,
and `python -m pipeline score`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from geohier import benchmark, tables
from geohier.errors import InputError
from geohier.leaderboard import Leaderboard, best_rows
from pipeline.cli import main

# Real cities: (key, lat, lon)
PARIS = ("paris_1", 48.8566, 2.3522)
BERLIN = ("berlin_2", 52.5200, 13.4050)
TOKYO = ("tokyo_3", 35.6762, 139.6503)
NYC = ("nyc_4", 40.7128, -74.0060)
POINTS = (PARIS, BERLIN, TOKYO, NYC)

# OSV-5M test.csv's header, as the dataset ships it
OSV5M_HEADER = ("id,latitude,longitude,thumb_original_url,country,sequence,captured_at,lon_bin,lat_bin,cell,"
                "land_cover,road_index,drive_side,climate,soil,dist_sea,quadtree_10_5000,quadtree_10_25000,"
                "quadtree_10_1000,quadtree_10_50000,quadtree_10_12500,quadtree_10_500,quadtree_10_2500,"
                "unique_region,unique_sub-region,unique_city,unique_country,creator_username,creator_id")


def _im2gps(path, points=POINTS):
    """Im2GPS3k's layout: IMG_ID,AUTHOR,LAT,LON,... with CRLF line endings."""
    lines = ["IMG_ID,AUTHOR,LAT,LON,S2CELL_1,S2CELL_2"]
    lines += [f"{k}.jpg,someone,{la},{lo},x,y" for k, la, lo in points]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    return path


def _preds(path, rows, header="image,pred_lat,pred_lon"):
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_im2gps_crlf_truth(tmp_path):
    t = benchmark.read_truth(_im2gps(tmp_path / "im2gps3k_places365.csv"))
    assert t.source == "im2gps3k" and len(t) == 4 and t.name == "im2gps3k_places365"
    assert list(t.keys) == ["paris_1", "berlin_2", "tokyo_3", "nyc_4"]
    assert t.lat[0] == 48.8566 and t.lon[3] == -74.006
    assert t.areas is None
    # the hash depends on the content, not on the row order or the file name
    shuffled = _im2gps(tmp_path / "other.csv", POINTS[::-1])
    assert benchmark.read_truth(shuffled).hash == t.hash
    moved = _im2gps(tmp_path / "moved.csv", [PARIS, BERLIN, TOKYO, ("nyc_4", 40.7, -74.0)])
    assert benchmark.read_truth(moved).hash != t.hash


@pytest.mark.slow
def test_osv5m_truth_with_its_full_header_and_area_columns(tmp_path):
    row = ("2351,{lat},{lon},https://x/y.jpg,FR,seq1,1600000000,1,2,3,4,5,right,6,7,0.5,"
           "1,2,3,4,5,6,7,{region},{sub},{city},{cc},me,42")
    lines = [OSV5M_HEADER,
             row.format(lat=48.8566, lon=2.3522, region="Île-de-France_FR", sub="Paris_Île-de-France_FR",
                        city="Paris_Paris_Île-de-France_FR", cc="FR"),
             row.replace("2351", "2352").format(lat=52.52, lon=13.405, region="State of Berlin_DE", sub="nan",
                                                city="Mitte_nan_State of Berlin_DE", cc="DE")]
    p = tmp_path / "test.csv"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    t = benchmark.read_truth(p)
    assert t.source == "osv5m" and list(t.keys) == ["2351", "2352"]
    assert list(t.areas.columns) == ["unique_country", "unique_region", "unique_sub-region", "unique_city"]
    assert t.areas["unique_region"][0] == "Île-de-France_FR"
    # a perfect system gets every area right, on the CSV's own labels
    g = benchmark.score_points(t.lat, t.lon, t.lat, t.lon, areas=t.areas)
    assert g["country_acc"] == 1.0 and g["region_acc"] == 1.0 and g["n_country"] == 2
    assert g["n_subregion"] == 1  # "nan" is skipped, as OSV-5M does


def test_plain_csv_truth_counts_bad_rows(tmp_path):
    p = tmp_path / "mine.csv"
    p.write_text("path,lat,lon\na.jpg,10,20\nb.jpg,abc,20\nc.jpg,95,20\n,1,1\na.jpg,11,21\n", encoding="utf-8")
    t = benchmark.read_truth(p)
    assert list(t.keys) == ["a"] and t.duplicates == 1 and t.rows == 5
    assert t.invalid == {tables.INVALID_NUMBER: 1, tables.INVALID_RANGE: 1, tables.MISSING_REF: 1}
    bad = tmp_path / "bad.csv"
    bad.write_text("name,x,y\na,1,2\n", encoding="utf-8")
    with pytest.raises(InputError, match="no latitude column; accepted names"):
        benchmark.read_truth(bad)
    none = tmp_path / "none.csv"
    none.write_text("path,lat,lon\na,100,0\n", encoding="utf-8")
    with pytest.raises(InputError, match="no row with usable coordinates"):
        benchmark.read_truth(none)


@pytest.mark.parametrize("header", ["image,pred_lat,pred_lon", "IMG_ID,predicted_lat,predicted_long",
                                    "id,latitude,longitude", "path,lat,lon"])
def test_prediction_column_aliases(tmp_path, header):
    p = _preds(tmp_path / "sys.csv", [("dir/Paris_1.JPG", 48.85, 2.35), ("berlin_2", 52.5, 13.4)], header)
    preds = benchmark.read_predictions(p)
    assert list(preds.keys) == ["paris_1", "berlin_2"] and preds.lat[0] == 48.85 and preds.name == "sys"


def test_prediction_errors_name_the_columns(tmp_path):
    p = _preds(tmp_path / "sys.csv", [("a", 1)], "image,score")
    with pytest.raises(InputError) as e:
        benchmark.read_predictions(p)
    msg = str(e.value)
    assert "a predicted latitude (pred_lat, predicted_lat" in msg and "a predicted longitude" in msg
    assert "Columns found: image, score" in msg
    empty = _preds(tmp_path / "empty.csv", [])
    with pytest.raises(InputError, match="no prediction rows"):
        benchmark.read_predictions(empty)


def test_keys_that_match_nothing(tmp_path):
    truth = benchmark.read_truth(_im2gps(tmp_path / "t.csv"))
    p = benchmark.read_predictions(_preds(tmp_path / "s.csv", [("zzz", 1, 1), ("yyy", 2, 2)]))
    with pytest.raises(InputError, match="none of the 2 image keys .* matches the 4 of the truth set"):
        benchmark.align(truth, p)


@pytest.mark.slow
def test_score_known_values_and_missing_policies(tmp_path):
    truth = benchmark.read_truth(_im2gps(tmp_path / "t.csv"))
    # Paris exact, Berlin 10 km off, Tokyo ~1 degree off, NYC missing; a bad row and an extra image
    east = 10.0 / (2 * math.pi * 6371 / 360) / math.cos(math.radians(52.52))
    rows = [("paris_1", 48.8566, 2.3522), ("berlin_2", 52.52, 13.405 + east), ("tokyo_3", 36.6762, 139.6503),
            ("nope_9", 0, 0), ("bad", "x", 0)]
    preds = benchmark.read_predictions(_preds(tmp_path / "s.csv", rows))
    assert preds.invalid == {tables.INVALID_NUMBER: 1}
    out = benchmark.score(truth, preds)
    g = out["geo"]
    assert g["n"] == 4 and g["missing"] == {"n": 1, "policy": "counted as 20,000 km errors"}
    assert g["acc_1km"] == 0.25 and g["acc_25km"] == 0.5 and g["acc_200km"] == 0.75 and g["acc_2500km"] == 0.75
    assert g["mean_km"] == pytest.approx((0 + 10 + 111.195 + 20000) / 4, abs=0.05)
    assert g["geoscore"] == pytest.approx(np.mean(5000 * np.exp(-np.array([0, 10, 111.195, 20000]) / 1492.7)),
                                          abs=0.05)
    assert g["country_acc"] == 0.75 and g["n_country"] == 4  # the missing one is a miss
    assert out["matching"]["unmatched_predictions"] == 1 and out["matching"]["missing"] == 1
    skip = benchmark.score(truth, preds, missing="skip")["geo"]
    assert skip["n"] == 3 and skip["missing"]["policy"] == "left out" and skip["acc_25km"] == pytest.approx(2 / 3)
    assert skip["country_acc"] == 1.0 and skip["n_country"] == 3
    with pytest.raises(InputError, match="unknown missing-prediction policy"):
        benchmark.score(truth, preds, missing="maybe")


def test_hierarchy_misses_and_cell_hit_rates():
    tl, to = np.array([10.0, 10.0, -30.0, 45.0]), np.array([10.0, 10.0, 140.0, 5.0])
    pl, po = np.array([10.0, 10.0, 30.0, np.nan]), np.array([10.0, 12.0, -140.0, np.nan])
    rows = benchmark.hierarchy_misses(tl, to, pl, po, (1, 3, 8))
    by = {r["level"]: r for r in rows}
    # three answered: one exact hit, one a neighbour at L8 only, one in the wrong hemisphere
    assert by[8]["finest_misses"] == 2 and by[1]["wrong_parent"] == 1 and by[1]["share"] == 0.5
    assert by[8]["share"] == 1.0
    cells = benchmark.cell_hit_rates(tl, to, pl, po, 1)
    assert cells["images"].sum() == 4 and cells["hits"].sum() == 2


def test_leaderboard_keeps_truth_sets_apart(tmp_path):
    board = Leaderboard(tmp_path)
    assert board.truth_sets() == []
    geo = {"geoscore": 3000.0, "median_km": 100.0, "acc_25km": 0.4, "missing": {"n": 0}}
    board.record({"hash": "aaa", "name": "im2gps3k", "images": 4}, "mine", "run", geo,
                 points={"key": ["a", "b"], "true_lat": [1, 2], "true_lon": [3, 4], "pred_lat": [1, np.nan],
                         "pred_lon": [3, np.nan]})
    board.record({"hash": "aaa", "name": "im2gps3k"}, "other", "system", {**geo, "geoscore": 3500.0,
                                                                         "median_km": 150.0})
    board.record({"hash": "aaa", "name": "im2gps3k"}, "baseline: constant", "baseline",
                 {**geo, "geoscore": 4000.0, "median_km": float("nan")})
    board.record({"hash": "bbb", "name": "osv5m"}, "mine", "run", geo)
    sets = {t["hash"]: t for t in board.truth_sets()}
    assert set(sets) == {"aaa", "bbb"} and sets["aaa"]["entries"] == 3 and sets["bbb"]["entries"] == 1
    table = board.table("aaa")
    assert list(table["name"]) == ["other", "mine", "baseline: constant"]  # baselines last
    best = best_rows(table)
    assert table["name"][best["geoscore"]] == "other" and table["name"][best["median_km"]] == "mine"
    assert list(board.table("bbb")["name"]) == ["mine"]
    pts = board.points("aaa", "mine")
    assert list(pts["key"]) == ["a", "b"] and math.isnan(pts["pred_lat"][1])
    assert board.points("aaa", "other") is None
    doc = json.loads(board.path.read_text())
    assert doc["truth_sets"]["aaa"]["entries"]["baseline: constant"]["geo"]["median_km"] is None
    # the same images scored under another name keep their first name; the other is an alias
    board.record({"hash": "aaa", "name": "im2gps3k.csv", "images": 4}, "third", "system", geo)
    truth = {t["hash"]: t for t in board.truth_sets()}["aaa"]
    assert truth["name"] == "im2gps3k" and truth.get("aliases") == ["im2gps3k.csv"]


@pytest.mark.slow
def test_score_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GEOHIER_DATA", str(tmp_path / "data"))
    truth = _im2gps(tmp_path / "im2gps3k.csv")
    a = _preds(tmp_path / "sysA.csv", [(k, la, lo) for k, la, lo in POINTS])
    b = _preds(tmp_path / "sysB.csv", [(k, la + 1, lo) for k, la, lo in POINTS[:3]], "IMG_ID,latitude,longitude")
    assert main(["score", str(a), str(b), "--truth", str(truth), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["system"] for s in out["systems"]] == ["sysA", "sysB"]
    assert out["systems"][0]["geo"]["acc_1km"] == 1.0 and out["systems"][0]["geo"]["geoscore"] == 5000.0
    assert out["systems"][1]["geo"]["missing"]["n"] == 1
    assert set(out["baselines"]) == {"constant", "prior", "random_land"}
    assert "truth set" in out["baselines"]["constant"]["note"]  # no training set here: flagged
    board = Leaderboard(tmp_path / "data")
    t = out["truth"]["hash"]
    assert set(board.table(t)["name"]) == {"sysA", "sysB", "baseline: constant", "baseline: prior",
                                           "baseline: random_land"}
    # the plain report
    assert main(["score", str(a), "--truth", str(truth), "--name", "best ever", "--no-save"]) == 0
    text = capsys.readouterr().out
    assert "best ever" in text and "GeoScore" in text and "missing predictions: counted as 20,000 km errors" in text
    assert "best ever" not in set(board.table(t)["name"])


@pytest.mark.parametrize("args, message", [
    (["--truth", "{t}", "{missing}"], "no such file"),
    (["--truth", "{t}", "{nokey}"], "lacks an image key"),
    (["--truth", "{t}", "{other}"], "matches the 4 of the truth set"),
    (["--truth", "{t}", "{a}", "--name", "x,y"], "--name gives 2 name"),
])
def test_score_cli_errors_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("GEOHIER_DATA", str(tmp_path / "data"))
    paths = {"t": _im2gps(tmp_path / "t.csv"), "missing": tmp_path / "nope.csv",
             "nokey": _preds(tmp_path / "nokey.csv", [(1, 2)], "pred_lat,pred_lon"),
             "other": _preds(tmp_path / "other.csv", [("q", 1, 2)]),
             "a": _preds(tmp_path / "a.csv", [("paris_1", 1, 2)])}
    argv = ["score"] + [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- the CSV door: one coordinate check

def test_parse_point_is_the_one_coordinate_check(tmp_path):
    assert tables.parse_point("48.8566", "2.3522") == (48.8566, 2.3522, None)
    for lat, lon, why in [("10", "181", tables.INVALID_RANGE), ("-91", "0", tables.INVALID_RANGE),
                          ("", "0", tables.INVALID_EMPTY), ("x", "0", tables.INVALID_NUMBER),
                          ("0", "inf", tables.INVALID_NAN), ("nan", "0", tables.INVALID_NAN)]:
        la, lo, w = tables.parse_point(lat, lon)
        assert w == why and math.isnan(la) and math.isnan(lo)
    # a truth set and a prediction file leave out the same bad rows, with the same reasons
    rows = "".join(f"{k}.jpg,{la},{lo}\n" for k, la, lo in [("a", 10, 20), ("b", 10, 181), ("c", "", 1),
                                                            ("a", 11, 21)])
    truth = benchmark.read_truth(_preds(tmp_path / "t.csv", [], "path,lat,lon\n" + rows.rstrip("\n")))
    assert list(truth.keys) == ["a"] and truth.invalid == {tables.INVALID_RANGE: 1, tables.INVALID_EMPTY: 1}
    assert truth.duplicates == 1
    preds = benchmark.read_predictions(_preds(tmp_path / "p.csv", [], "image,lat,lon\n" + rows.rstrip("\n")))
    assert list(preds.keys) == ["a"] and preds.invalid == truth.invalid and preds.duplicates == 1
    sel = benchmark.select_rows([{"p": "a", "y": "1", "x": "181"}, {"p": "", "y": "1", "x": "2"},
                                 {"p": "b", "y": "1", "x": "2"}], "p", "y", "x")
    assert sel.keep.tolist() == [2] and sel.skipped() == {tables.INVALID_RANGE: 1, tables.MISSING_REF: 1}


def test_score_cli_counts_bad_rows_by_reason(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GEOHIER_DATA", str(tmp_path / "data"))
    truth = _im2gps(tmp_path / "t.csv", POINTS + (("bad_5", 10.0, 181.0), ("bad_6", "x", 1.0), PARIS))
    preds = _preds(tmp_path / "p.csv", [(k, la, lo) for k, la, lo in POINTS] + [("paris_1", 1, 999)])
    assert main(["score", str(preds), "--truth", str(truth), "--no-save"]) == 0
    out = capsys.readouterr().out
    assert ("left out: 1 invalid coordinates (not a number), 1 invalid coordinates (out of range), "
            "1 repeated image (first row kept)") in out
    assert "4 images" in out
    assert "1 have unusable coordinates (1 invalid coordinates (out of range)), 0 repeat an image" in out


@pytest.mark.parametrize("side", ["truth", "pred"])
@pytest.mark.parametrize("content, message", [
    (b"image,lat,lon\npari\x00s_1,1,2\n", "line 2: a NUL byte"),
    (b'image,lat,lon\n"paris_1"x,1,2\n', "line 2: malformed CSV"),
    (b'image,lat,lon\nparis_1,1,2\n"berlin_2,1,2\n', "line 3: malformed CSV (a quote opened on line 3"),
    (b"image,lat,lon\nparis_1,1,2\nberlin_\xe9,1,2\n", "not UTF-8 text (byte 0xe9 on line 3)"),
    (("image,lat,lon," + "h" * 140_000 + "\nparis_1,1,2,x\n").encode(), "line 1: a field longer than 131,072"),
    (("image,lat,lon\nparis_1,1," + "9" * 140_000 + "\n").encode(), "line 2: a field longer than 131,072"),
])
def test_score_cli_malformed_csv_is_one_line(tmp_path, capsys, monkeypatch, side, content, message):
    monkeypatch.setenv("GEOHIER_DATA", str(tmp_path / "data"))
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    good_truth = _im2gps(tmp_path / "t.csv")
    good_preds = _preds(tmp_path / "p.csv", [(k, la, lo) for k, la, lo in POINTS])
    argv = ["score", str(bad), "--truth", str(good_truth)] if side == "pred" else \
        ["score", str(good_preds), "--truth", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(bad) in err and message in err, err
    assert not (tmp_path / "data").exists() or not Leaderboard(tmp_path / "data").truth_sets()
