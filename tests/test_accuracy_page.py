"""The Accuracy page (AppTest) and its figures (geohier.accuracy_charts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from geohier import accuracy_charts as ac
from geohier import metrics

pytestmark = pytest.mark.slow  # trains tiny runs for the page: `make test-fast` skips this module

PAGE = str(Path(__file__).resolve().parents[1] / "views" / "accuracy.py")


def _page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=90)


def _record(epoch, base):
    lv = lambda a: {"top1": a, "top5": min(1.0, a + 0.3), "top10": min(1.0, a + 0.4)}  # noqa: E731
    return {"epoch": epoch, "train_loss": 2.0 / epoch, "val_loss": 2.2 / epoch, "lr": 0.001, "time_s": 3.0,
            "train": {"1": lv(base + 0.1 * epoch), "3": lv(base / 2 + 0.05 * epoch)},
            "val": {"1": lv(base + 0.08 * epoch), "3": lv(base / 2 + 0.04 * epoch)},
            "val_km": {"median_km": 900.0 / epoch, "acc_25km": 0.1 * epoch}}


def _eval_doc(name):
    import numpy as np

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=50)
    targets = rng.integers(0, 4, size=50)
    before = metrics.reliability_bins(probs, targets)
    after = metrics.reliability_bins(metrics.softmax(np.log(probs), 2.0), targets)
    level = {"top1": 0.4, "top5": 1.0, "top10": 1.0, "n": 50, "num_classes": 4, "chance_top1": 0.25,
             "temperature": 2.0, "ece_before": before["ece"], "ece_after": after["ece"]}
    geo = {"acc_1km": 0.02, "acc_25km": 0.1, "acc_200km": 0.3, "acc_750km": 0.6, "acc_2500km": 0.9,
           "median_km": 600.0, "mean_km": 900.0, "geoscore": 2500.0, "n": 50, "level": 3, "point": "centroid",
           "rule": "hierarchical"}
    return {"format": "geohier-eval/1", "run": name, "source": {"kind": "split", "split": "test"}, "images": 50,
            "skipped": 0, "levels": [1, 3], "per_level": {"1": level, "3": dict(level, num_classes=9)},
            "geo": geo, "geo_by_rule": {"hierarchical": geo},
            "reliability": {"1": {"before": before, "after": after}, "3": {"before": before, "after": after}},
            "countries": [{"country": "France", "iso3": "FRA", "n": 30, "country_acc": 0.7, "acc_1km": 0.0,
                           "acc_25km": 0.1, "acc_200km": 0.4, "acc_750km": 0.8, "acc_2500km": 1.0,
                           "median_km": 300.0, "mean_km": 400.0, "geoscore": 3000.0},
                          {"country": "Japan", "iso3": "JPN", "n": 20, "country_acc": 0.2, "acc_1km": 0.0,
                           "acc_25km": 0.0, "acc_200km": 0.1, "acc_750km": 0.3, "acc_2500km": 0.7,
                           "median_km": 1300.0, "mean_km": 1400.0, "geoscore": 1500.0}]}


def fake_run(ws, name, epochs=3, with_eval=True, base=0.2):
    run = ws.models_dir / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"backbone": "resnet18", "levels": [1, 3]}))
    (run / "status.json").write_text(json.dumps({"state": "done", "epoch": epochs, "epochs": epochs,
                                                 "progress": 1.0}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(_record(e, base)) + "\n" for e in range(1, epochs + 1))
                                       + "not json\n")
    if with_eval:
        (run / "eval.json").write_text(json.dumps(_eval_doc(name)))
    return run


# ----------------------------------------------------------------------------- figures

def test_references_are_the_published_rows():
    isn, pig = ac.REFERENCES
    assert [isn["acc"][t] for t in metrics.KM_THRESHOLDS] == [10.5, 28.0, 36.6, 49.7, 66.0]
    assert [pig["acc"][t] for t in metrics.KM_THRESHOLDS] == [11.3, 36.7, 53.8, 72.4, 85.3]
    assert all(r["dataset"] == "Im2GPS3k" for r in ac.REFERENCES)
    cap = ac.references_caption()
    assert "different test set" in cap and "ECCV 2018" in cap and "CVPR 2024" in cap


def test_fig_km_accuracy_traces():
    fig = ac.fig_km_accuracy({"a": _eval_doc("a")})
    names = [t.name for t in fig.data]
    assert names[0] == "a" and list(fig.data[0].y) == pytest.approx([2.0, 10.0, 30.0, 60.0, 90.0])
    assert any("ISN" in n and "another dataset" in n for n in names)
    assert any("PIGEOTTO" in n for n in names)
    assert list(fig.data[-1].y) == [11.3, 36.7, 53.8, 72.4, 85.3]


def test_fig_level_curves_and_history():
    hist = {"r1": [_record(1, 0.2), _record(2, 0.2)], "r2": [_record(1, 0.1)]}
    df = ac.history_frame(hist)
    assert set(df["split"]) == {"train", "val"} and set(df["level"]) == {1, 3}
    fig = ac.fig_level_curves(hist, "top1")
    # 2 runs x 2 splits x 2 levels
    assert len(fig.data) == 8
    val_r1_l1 = next(t for t in fig.data if t.name == "r1 · val" and t.xaxis == "x")
    assert list(val_r1_l1.y) == pytest.approx([28.0, 36.0])
    assert ac.fig_level_curves({}, "top1") is not None  # empty: still a figure


def test_fig_reliability_and_countries():
    ev = _eval_doc("a")
    fig = ac.fig_reliability(ev["reliability"]["1"], 1, 2.0)
    assert [t.name.split(" (")[0] for t in fig.data] == ["perfect calibration", "before", "after"]
    assert "T = 2.00" in fig.data[2].name
    bars = ac.fig_country_accuracy(ev["countries"])
    assert list(bars.data[0].x) == [20.0, 70.0]  # largest country last (top of the chart)
    assert ac.country_frame([]).empty


def test_country_map_is_offline():
    from geohier import maps

    html = maps.offline_html(ac.country_map(_eval_doc("a")["countries"]))
    assert maps.network_references(html) == []
    assert "France" in html and "70.0%" in html


# ----------------------------------------------------------------------------- the page

def test_empty_models_dir_says_what_to_do(ws):
    at = _page().run()
    assert not at.exception
    assert "No trained runs yet" in at.info[0].value


def test_page_with_fake_runs_renders(ws):
    fake_run(ws, "run-a", base=0.2)
    fake_run(ws, "run-b", base=0.1)
    at = _page().run()
    assert not at.exception, at.exception
    assert set(at.sidebar.multiselect[0].value) == {"run-a", "run-b"}
    assert len(at.get("plotly_chart")) >= 3  # curves, km accuracy, reliability (+ country bars or map)
    km = at.dataframe[0].value
    assert list(km["run"]) == list(at.sidebar.multiselect[0].value)
    assert km["2500 km"].tolist() == [90.0, 90.0]
    assert any("Im2GPS3k" in c.value for c in at.caption)
    # per-country as bars, then by another metric
    at = next(r for r in at.radio if r.label == "Show as").set_value("bars").run()
    assert not at.exception
    at = next(s for s in at.selectbox if s.label == "Country metric").set_value("acc_750km").run()
    assert not at.exception


def test_run_without_eval_gets_a_button(ws):
    from test_evaluate import make_tiny_run

    run = make_tiny_run(ws, "tiny")
    at = _page().run()
    assert not at.exception
    assert any("has no evaluation yet" in m.value for m in at.markdown)
    at = next(b for b in at.button if b.label == "Evaluate").click().run()
    assert not at.exception, at.exception
    assert (run / "eval.json").exists()
    assert not at.error
    assert at.dataframe  # the km table of the new evaluation


def test_a_run_whose_split_is_gone_is_refused_on_the_page(ws):
    """After a relabel, a run whose own split file is gone is not scored on the new split:
    the Evaluate button shows the reason, writes nothing."""
    from test_evaluate import make_tiny_run

    from geohier import splits

    run = make_tiny_run(ws, "tiny")
    own = splits.of_run(run, ws)
    (run / "split.safetensors").unlink()
    splits.store_path(ws, own.hash).unlink()
    at = _page().run()
    at = next(b for b in at.button if b.label == "Evaluate").click().run()
    assert not at.exception, at.exception
    assert any(f"trained on split {own.hash[:12]}, whose file is gone" in e.value for e in at.error)
    assert not (run / "eval.json").exists()


def _board(ws):
    from geohier.leaderboard import Leaderboard

    board = Leaderboard(ws.data_dir)
    truth = {"hash": "abc123", "name": "im2gps3k", "images": 3}
    pts = {"key": ["a", "b", "c"], "true_lat": [48.85, 35.68, -33.9], "true_lon": [2.35, 139.65, 18.4],
           "pred_lat": [48.0, 40.0, float("nan")], "pred_lon": [2.0, -74.0, float("nan")]}
    geo = {"acc_1km": 0.0, "acc_25km": 0.0, "acc_200km": 0.33, "acc_750km": 0.33, "acc_2500km": 0.33,
           "geoscore": 1800.0, "median_km": 10000.0, "country_acc": 0.33, "n": 3, "missing": {"n": 1}}
    board.record(truth, "my-run", "run", geo, points=pts)
    board.record(truth, "GeoCLIP", "system", {**geo, "geoscore": 2500.0, "median_km": 900.0})
    board.record(truth, "baseline: constant", "baseline", {**geo, "geoscore": 900.0}, note="training median")
    return board


def test_leaderboard_error_map_and_diagnostics(ws):
    _board(ws)
    at = _page().run()
    assert not at.exception
    frames = [d.value for d in at.dataframe]
    board = next(f for f in frames if "system" in getattr(f, "columns", []) or hasattr(f, "data"))
    data = board.data if hasattr(board, "data") else board
    assert list(data["system"]) == ["GeoCLIP", "my-run", "baseline: constant"]
    assert any("Hierarchy diagnostics" in m.value for m in at.markdown)
    at.radio[0].set_value("cell hit rate").run()
    assert not at.exception


def test_error_and_cell_maps_are_offline():
    import pandas as pd

    from geohier import maps

    pts = pd.DataFrame({"true_lat": [10.0, 20.0, 30.0], "true_lon": [10.0, 20.0, 30.0],
                        "pred_lat": [10.0, 25.0, float("nan")], "pred_lon": [10.0, 20.0, float("nan")]})
    html = maps.offline_html(ac.error_map(pts))
    assert maps.network_references(html) == [] and "2 of 3 images shown" in html
    html = maps.offline_html(ac.cell_hit_map(pts, 3))
    assert maps.network_references(html) == [] and "Hit rate %" in html
    rows = ac.hierarchy_frame([{"level": 1, "hit_rate": 0.5, "wrong_parent": 1, "share": 0.5}])
    assert rows["share of finest misses %"][0] == 50.0


def test_error_legend_names_the_colours_it_draws():
    legend = ac.error_legend()
    assert [label for _, label in legend] == ["≤ 1 km", "25 km", "200 km", "750 km", "2,500 km", "20,000 km"]
    assert legend[0][0] == "#1a9850" and legend[-1][0] == "#7f0000"
    # a 25 km error is drawn yellow (the old legend called it green), one under 1 km green,
    # the antipode (20,015 km) the darkest red
    assert legend[1][0] == "#feda86"
    assert ac.error_colours([0.1, 25.0, 2500.0, 20_015.0]) == ["#1a9850", "#feda86", legend[4][0], "#7f0000"]


# ----------------------------------------------------------------------------- recall vs area, abstention

def _with_regions(doc):
    doc["recall_area"] = {"ranking": "finest cells by joint probability", "level": 3, "n": 50,
                          "points": [{"area_km2": a, "recall": r} for a, r in
                                     ((10.0, 0.1), (1e3, 0.3), (1e5, 0.6), (1e7, 0.9), (5e8, 1.0))]}
    doc["abstention"] = {"confidence": "top hierarchical joint probability", "rule": "hierarchical",
                         "rows": [{"share": s, "n": int(50 * s), "min_confidence": 1 - s / 2,
                                   **{f"acc_{t}km": min(1.0, t / 2500 + (1 - s) / 2) for t in (25, 200, 750, 2500)}}
                                  for s in (0.5, 1.0)]}
    return doc


def _with_conformal(doc, method="groups"):
    doc["conformal"] = {t: {"coverage": c, "coverage_se": 0.04, "group_coverage": g, "group_coverage_se": 0.03,
                            "mean_cells": cells, "median_area_km2": km2, "n": 50,
                            "crossfit": {"coverage": c + 0.05, "group_coverage": g + 0.04, "spread": 0.02}}
                        for t, c, g, cells, km2 in (("0.8", 0.71, 0.76, 86.0, 2.9e7), ("0.9", 0.87, 0.9, 135.0, 9e7))}
    doc["conformal_calibration"] = {"split": "val", "method": method, "images": 403, "groups": 120}
    return doc


def test_conformal_table_rows_per_run_and_target():
    evals = {"by-place": _with_conformal(_eval_doc("a")), "by-photo": _with_conformal(_eval_doc("b"), "images"),
             "old": _eval_doc("old"), "uncalibrated": dict(_eval_doc("u"), conformal=None)}
    t = ac.conformal_table(evals)
    assert t.run.tolist() == ["by-place", "by-place", "by-photo", "by-photo"]
    assert t.target.tolist() == ["80%", "90%"] * 2
    first = t.iloc[0]
    assert first["photos covered"] == pytest.approx(71.0) and first["places covered"] == pytest.approx(76.0)
    assert first["± photos"] == pytest.approx(4.0) and first["cross-fit places"] == pytest.approx(80.0)
    assert first["mean cells"] == 86.0 and first["median km²"] == 2.9e7
    assert t.guaranteed.tolist() == ["places", "places", "photos", "photos"]
    assert ac.conformal_table({"old": _eval_doc("old")}).empty


def test_page_shows_the_prediction_regions_table(ws):
    run = fake_run(ws, "run-regions")
    (run / "eval.json").write_text(json.dumps(_with_conformal(_eval_doc("run-regions"))))
    fake_run(ws, "run-before")
    none = fake_run(ws, "run-uncalibrated")
    (none / "eval.json").write_text(json.dumps(dict(_eval_doc("run-uncalibrated"), conformal=None)))
    at = _page().run()
    at.multiselect[0].set_value(["run-regions", "run-before", "run-uncalibrated"]).run()  # two are shown at first
    assert not at.exception, at.exception
    assert any("Prediction regions" in h.value for h in at.subheader)
    (table,) = [d.value for d in at.dataframe if "photos covered" in d.value.columns]
    assert table.run.tolist() == ["run-regions", "run-regions"] and table.target.tolist() == ["80%", "90%"]
    captions = [c.value for c in at.caption]
    assert any(c.startswith("Not shown: run-before") and "prediction regions" in c for c in captions)
    assert any(c.startswith("No regions for run-uncalibrated") and "--calibrate" in c for c in captions)


def test_fig_recall_area_and_abstention_skip_runs_evaluated_before():
    evals = {"new": _with_regions(_eval_doc("new")), "old": _eval_doc("old")}
    fig = ac.fig_recall_area(evals)
    assert [t.name for t in fig.data] == ["new"]
    assert fig.layout.xaxis.type == "log"
    assert list(fig.data[0].y) == [10.0, 30.0, 60.0, 90.0, 100.0] and fig.data[0].x[-1] == 5e8
    fab = ac.fig_abstention(evals)
    assert [t.name for t in fab.data] == [f"new · {t} km" for t in (25, 200, 750, 2500)]
    assert list(fab.data[-1].x) == [50.0, 100.0] and list(fab.data[-1].y) == [100.0, 100.0]
    assert list(fab.data[0].y) == pytest.approx([100 * (0.01 + 0.25), 100 * 0.01])
    have, missing = ac.with_key(evals, "recall_area")
    assert list(have) == ["new"] and missing == ["old"]
    assert "old" in ac.missing_caption(missing, "recall vs area") and ac.missing_caption([], "x") is None


def test_page_shows_recall_area_and_abstention_curves(ws):
    run = fake_run(ws, "run-new", base=0.2)
    (run / "eval.json").write_text(json.dumps(_with_regions(_eval_doc("run-new"))))
    fake_run(ws, "run-old", base=0.1)
    at = _page().run()
    assert not at.exception, at.exception
    titles = [c.proto.spec for c in at.get("plotly_chart")]
    assert any('"type":"log"' in s.replace(" ", "") and "truths found" in s for s in titles)  # recall vs area
    assert any("images answered, most confident first" in s for s in titles)  # abstention
    assert any("Recall vs area" in m.value for m in at.markdown)
    assert any("Abstention" in h.value for h in at.subheader)
    notes = [c.value for c in at.caption if c.value.startswith("Not shown") and "prediction regions" not in c.value]
    assert len(notes) == 2 and all("run-old" in n and "evaluate" in n for n in notes)

