"""`python -m pipeline predict`: JSON lines, the table, bad files among good ones, options."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, jpeg_bytes
from test_predictor import make_tiny_run, tiny_hierarchy

from pipeline import cli
from pipeline.predict import per_level

pytestmark = pytest.mark.slow  # trains tiny runs to predict with: `make test-fast` skips this module


def main(argv):
    """The real CLI entry (parsing, error handling, exit status) with only this command
    registered, so these tests do not depend on the other commands' modules."""
    saved = cli.COMMAND_MODULES
    cli.COMMAND_MODULES = ("pipeline.predict",)
    try:
        return cli.main(argv)
    finally:
        cli.COMMAND_MODULES = saved


@pytest.fixture
def photos(tmp_path, make_jpeg):
    good = make_jpeg(tmp_path / "paris.jpg", color=(200, 60, 60), gps=(48.8566, 2.3522))
    png = make_jpeg(tmp_path / "plain.png", color=(20, 90, 160), fmt="PNG")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(jpeg_bytes(size=(64, 64))[:250])
    text = tmp_path / "readme.jpg"
    text.write_text("hello\n")
    return {"good": good, "png": png, "empty": empty, "truncated": truncated, "text": text,
            "missing": tmp_path / "nowhere.jpg"}


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_json_one_object_per_image(ws, run_dir, photos, capsys):
    rc = main(["predict", str(photos["good"]), str(photos["png"]), "--json"])  # default: newest run
    out = capsys.readouterr().out
    assert rc == 0
    rows = _json_lines(out)
    assert [r["image"] for r in rows] == [str(photos["good"]), str(photos["png"])]
    for r in rows:
        assert set(r) >= {"image", "candidates", "best"} and "error" not in r
        assert set(r["candidates"]) == {"1", "3", "5"}
        for lv, cands in r["candidates"].items():
            assert cands and all({"cell", "prob", "joint", "parent"} <= set(c) for c in cands)
            assert all(0 <= c["prob"] <= 1 for c in cands)
            if lv == "1":
                assert all(c["parent"] is None for c in cands)
        assert set(r["best"]) == {"cell", "lat", "lon", "prob", "joint", "country", "place"}
        assert r["best"]["cell"] == r["candidates"]["5"][0]["cell"]
        assert -90 <= r["best"]["lat"] <= 90 and -180 <= r["best"]["lon"] <= 180
    assert set(rows[0]["true"]) == {"lat", "lon", "error_km", "geoscore"}
    assert "true" not in rows[1]


def test_bad_files_are_reported_and_the_others_still_run(ws, run_dir, photos, capsys):
    order = ["empty", "good", "truncated", "text", "missing", "png"]
    rc = main(["predict", *(str(photos[k]) for k in order), "--json", "--batch-size", "1"])
    cap = capsys.readouterr()
    assert rc == 0  # at least one image was predicted
    rows = _json_lines(cap.out)
    assert [r["image"] for r in rows] == [str(photos[k]) for k in order]
    by = dict(zip(order, rows, strict=True))
    for k in ("empty", "truncated", "text", "missing"):
        assert set(by[k]) == {"image", "error"} and str(photos[k]) in by[k]["error"]
    assert "best" in by["good"] and "best" in by["png"]
    assert "4 of 6 image(s) could not be read" in cap.err
    assert "Traceback" not in cap.err


def test_all_bad_exits_1(ws, run_dir, photos, capsys):
    rc = main(["predict", str(photos["empty"]), str(photos["missing"]), "--run", str(run_dir)])
    cap = capsys.readouterr()
    assert rc == 1
    assert "error:" in cap.out and "2 of 2" in cap.err


def test_table(ws, run_dir, photos, capsys):
    rc = main(["predict", str(photos["good"]), str(photos["text"]), "--run", "tiny", "--show", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "run tiny" in out and "best" in out and "level 1:" in out and "level 3:" in out
    assert "EXIF GPS" in out and "GeoScore" in out
    assert f"{photos['text']}\n  error:" in out


def test_per_level_rules(ws, run_dir, photos, capsys):
    rc = main(["predict", str(photos["good"]), "--json", "--rule", "topk", "--top-k", "2,1:1,5:3"])
    r = _json_lines(capsys.readouterr().out)[0]
    assert rc == 0
    assert len(r["candidates"]["1"]) == 1 and len(r["candidates"]["3"]) <= 2 and len(r["candidates"]["5"]) <= 3
    rc = main(["predict", str(photos["good"]), "--json", "--rule", "cumulative", "--cumulative", "0.01",
               "--no-temperature"])
    r = _json_lines(capsys.readouterr().out)[0]
    assert rc == 0 and all(len(c) == 1 for c in r["candidates"].values())
    rc = main(["predict", str(photos["good"]), "--json", "--min-prob", "0.999", "--k-max", "4",
               "--adaptive-thresholds", "0.99,0.98"])
    r = _json_lines(capsys.readouterr().out)[0]
    assert rc == 0 and all(len(c) == 1 for c in r["candidates"].values())


@pytest.mark.parametrize("argv, message", [
    (["--rule", "best"], "unknown rule 'best'"),
    (["--top-k", "0"], "top-k must be an integer between 1"),
    (["--top-k", "9:2"], "names level 9"),
    (["--cumulative", "lots"], "bad value 'lots'"),
    (["--adaptive-thresholds", "0.2,0.9"], "decreasing"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--run", "nope"], "no run 'nope': neither a directory nor a run in"),
])
def test_bad_options(ws, run_dir, photos, capsys, argv, message):
    rc = main(["predict", str(photos["good"]), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and "error: " in err and message in err


def test_no_run_says_how_to_train(ws, photos, capsys):
    rc = main(["predict", str(photos["good"])])
    err = capsys.readouterr().err
    assert rc == 2 and "no finished run" in err and "pipeline train" in err


def test_per_level_set(ws, hierarchy, photos, capsys):
    runs = [make_tiny_run(ws.models_dir / f"L{lv}", hierarchy, levels=(lv,), seed=lv, group="g")
            for lv in hierarchy.levels]
    rc = main(["predict", str(photos["good"]), "--json", "--runs", ",".join(str(r) for r in runs)])
    r = _json_lines(capsys.readouterr().out)[0]
    assert rc == 0 and set(r["candidates"]) == {"1", "3", "5"}
    rc = main(["predict", str(photos["good"]), "--runs", "L1,L1"])
    assert rc == 2 and "distinct levels" in capsys.readouterr().err


def test_per_level_parser():
    assert per_level("0.5", [1, 3], float, "x") == {1: 0.5, 3: 0.5}
    assert per_level("3:0.2,0.5", [1, 3], float, "x") == {1: 0.5, 3: 0.2}


def test_module_entry_point(ws, run_dir, photos):
    """The real command line: JSON on stdout, nothing else, exit 0."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(photos["good"]),
                           str(photos["empty"]), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = _json_lines(proc.stdout)
    assert "best" in rows[0] and "error" in rows[1]


def test_refine(ws, run_dir, photos, capsys):
    from test_predictor import training_photos, write_neighbours

    rc = main(["predict", str(photos["good"]), "--refine"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "run tiny has no neighbours.safetensors" in err
    write_neighbours(run_dir, training_photos())
    rc = main(["predict", str(photos["good"]), str(photos["empty"]), "--json", "--refine", "--rule", "topk",
               "--top-k", "64"])
    rows = _json_lines(capsys.readouterr().out)
    assert rc == 0 and "error" in rows[1]
    best = rows[0]["best"]
    assert best["refined"] is True and {"cell_lat", "cell_lon"} <= set(best)
    block = rows[0]["candidates"]["5"][0]["refined"]
    assert block["k"] == 10 and block["tau"] == 0.05 and 1 <= len(block["neighbours"]) <= 10
    assert {"id", "lat", "lon", "sim", "weight"} == set(block["neighbours"][0])
    # the refined point is a weighted mean of the neighbours' positions
    lats = [n["lat"] for n in block["neighbours"]]
    assert min(lats) - 1e-4 <= best["lat"] <= max(lats) + 1e-4
    rc = main(["predict", str(photos["good"]), "--refine"])
    out = capsys.readouterr().out
    assert rc == 0 and "refined (k=10, tau=0.05)" in out and "refined from the cell's" in out
    # a per-level set cannot refine
    runs = [make_tiny_run(ws.models_dir / f"L{lv}", tiny_hierarchy(), levels=(lv,), seed=lv, group="g")
            for lv in (1, 3, 5)]
    rc = main(["predict", str(photos["good"]), "--refine", "--runs", ",".join(str(r) for r in runs)])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a single run" in err


def _mark_demo_only(run_dir):
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["data"] = {"sources": {"demo": 120}}
    meta_path.write_text(json.dumps(meta))


def test_a_demo_world_run_says_once_that_its_guesses_mean_nothing(ws, run_dir, photos, capsys):
    rc = main(["predict", str(photos["good"]), str(photos["png"]), "--json"])
    assert rc == 0 and "synthetic demo world" not in capsys.readouterr().err
    _mark_demo_only(run_dir)
    from geohier.predictor import _load_cached

    _load_cached.cache_clear()  # the meta changed within the file clock's resolution
    rc = main(["predict", str(photos["good"]), str(photos["png"]), "--json"])
    captured = capsys.readouterr()
    assert rc == 0 and len(_json_lines(captured.out)) == 2  # stdout stays JSON
    assert captured.err.count("trained only on the synthetic demo world") == 1
    assert "import or fetch real geotagged images" in captured.err and "--frozen" in captured.err


# ----------------------------------------------------------------------------- regions, limits, abstention

CONFORMAL = {"score": "aps", "u": 0.5, "n": 9, "scores": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}


@pytest.fixture
def calibrated_run(ws, hierarchy):
    return make_tiny_run(ws.models_dir / "tiny", hierarchy, extra_meta={"conformal": CONFORMAL})


@pytest.fixture
def city_photos(tmp_path, make_jpeg):
    from conftest import CITIES

    return [str(make_jpeg(tmp_path / f"city{i}.jpg", color=color)) for i, (_, _, color) in enumerate(CITIES)]


def test_coverage_needs_a_conformal_calibration(ws, run_dir, photos, capsys):
    rc = main(["predict", str(photos["good"]), "--coverage", "0.9"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "no conformal calibration" in err and "evaluate tiny --calibrate" in err


def test_coverage_json_returns_the_region_and_its_area(ws, calibrated_run, city_photos, capsys):

    from geohier import grid

    rc = main(["predict", *city_photos, "--coverage", "0.9", "--json"])
    rows = _json_lines(capsys.readouterr().out)
    assert rc == 0 and len(rows) == 6
    sizes = {}
    for row in rows:
        r = row["region"]
        assert r["source"] == "conformal" and r["coverage"] == 0.9 and r["threshold"] == pytest.approx(0.9)
        assert r["n_cells"] == len(r["cells"]) >= 1 and 0 < row["confidence"] <= 1
        keys, level = grid.ids_to_keys(r["cells"])
        assert level == 5
        assert r["area_km2"] == pytest.approx(float(grid.key_areas_km2(keys, level).sum()), rel=1e-6)
        assert 0 < r["mass"] <= 1.0 + 1e-6
        sizes[row["image"]] = r["n_cells"]
        assert "abstained" not in row and row["best"] is not None
    # a lower coverage never gives a larger region
    main(["predict", *city_photos, "--coverage", "0.5", "--json"])
    for row in _json_lines(capsys.readouterr().out):
        assert row["region"]["n_cells"] <= sizes[row["image"]]
    assert main(["predict", city_photos[0], "--coverage", "1.5"]) == 2
    assert "coverage must be in (0, 1)" in capsys.readouterr().err
    assert main(["predict", city_photos[0], "--coverage", "0.9", "--no-temperature"]) == 2
    assert "drop --no-temperature" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["country:FR", "country:DEU,Brazil", "bbox:30,-80,50,-60"])
def test_within_never_answers_outside(ws, run_dir, city_photos, capsys, limit):
    from geohier.geography import country_of
    from geohier.limits import parse_within

    rc = main(["predict", *city_photos, "--within", limit, "--json", "--rule", "topk", "--top-k", "3"])
    rows = _json_lines(capsys.readouterr().out)
    assert rc == 0 and len(rows) == 6
    w = parse_within(limit)
    for row in rows:
        assert row["within"] == w.describe()
        cands = row["candidates"]["5"]
        lat = [c["lat"] for c in cands] + [row["best"]["lat"]]
        lon = [c["lon"] for c in cands] + [row["best"]["lon"]]
        if w.kind == "bbox":
            s, west, n, e = w.bbox
            assert all(s <= v <= n for v in lat) and all(west <= v <= e for v in lon), row
        else:
            allowed = {"FR"} if limit == "country:FR" else {"DE", "BR"}
            assert set(country_of(lat, lon)["iso_a2"]) <= allowed, row
            assert row["best"]["country"] in ({"France"} if limit == "country:FR" else {"Germany", "Brazil"})


@pytest.mark.parametrize("argv, message", [
    (["--within", "country:XX"], "unknown country 'XX'"),
    (["--within", "bbox:1,2,3"], "bbox:S,W,N,E takes four numbers"),
    (["--within", "bbox:-60,-30,-50,-20"], "none of the run's"),  # the South Atlantic
    (["--abstain", "2"], "--abstain must be a probability"),
])
def test_within_and_abstain_bad_values_are_one_line(ws, run_dir, city_photos, capsys, argv, message):
    rc = main(["predict", city_photos[0], *argv])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_abstain_answers_not_sure_with_the_region(ws, calibrated_run, city_photos, capsys):
    # P = 1: every image is below it (the model is never certain); P = 0: none is
    assert main(["predict", *city_photos[:3], "--abstain", "1", "--json"]) == 0
    for row in _json_lines(capsys.readouterr().out):
        assert row["abstained"] is True and row["best"] is None
        assert row["region"]["source"] == "kept" and row["region"]["cells"] == \
            [c["cell"] for c in row["candidates"]["5"]]
    assert main(["predict", *city_photos[:3], "--abstain", "1", "--coverage", "0.8", "--json"]) == 0
    for row in _json_lines(capsys.readouterr().out):
        assert row["abstained"] is True and row["region"]["source"] == "conformal"
    assert main(["predict", *city_photos[:3], "--abstain", "0", "--json"]) == 0
    for row in _json_lines(capsys.readouterr().out):
        assert row["abstained"] is False and row["best"]["cell"] and "region" not in row
    assert main(["predict", city_photos[0], "--abstain", "1"]) == 0
    out = capsys.readouterr().out
    assert "not sure: confidence" in out and "kept cells" in out


def test_not_sure_lists_the_region_most_probable_first_rests_at_their_rank():
    from geohier.conformal import Region
    from geohier.prediction import Prediction
    from pipeline.predict import format_table

    region = Region("conformal", ["0/0/1", "0/0/2"], [1, 2], 0.9, 1234.0, 0.9, 0.5, rest=["1", "2"],
                    rest_minus=[["1/0"], ["2/3"]], rest_ranks=[2, 4])
    text = format_table(Prediction("x.jpg", confidence=0.1, region=region, abstained=True), show=3)
    listed = [line.strip() for line in text.splitlines()[2:]]
    assert listed == ["0/0/1", "1 (rest: the cell less its class sub-cells)", "0/0/2", "... 1 more"]
    assert "4 cell(s), 2 of them a coarser cell's rest, 1,234 km² (0.9 coverage region" in text
