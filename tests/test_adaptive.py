"""Adaptive cells (``labels --cells adaptive``): the partition on constructed points,
hierarchy.json, labels/bounds/areas of cells of any depth, and the readers of a hierarchy
(combination tree, Predictor, evaluate, training, maps) on an adaptive one."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from geohier import grid, maps
from geohier.adaptive import (
    adaptive_partition,
    adaptive_summary,
    build_adaptive,
    default_thresholds,
    parse_thresholds,
)
from geohier.combine import Tree
from geohier.errors import InputError
from geohier.hierarchy import FORMAT, FORMAT_ADAPTIVE, Hierarchy, build_hierarchy

# 8 x (10, 10) -> "1/2/2" at depth 3; 2 x (50, 10) -> "1/0" then "1/0/2"; 1 x (-40, 20) -> "3";
# 1 x (-40, -100) -> "2" (worked out by hand from the quadrant digits, NW=0 NE=1 SW=2 SE=3)
LAT = [10.0] * 8 + [50.0] * 2 + [-40.0, -40.0]
LON = [10.0] * 8 + [10.0] * 2 + [20.0, -100.0]


def test_partition_known_answer():
    h = build_adaptive(LAT, LON, [5, 2], max_depth=3)
    assert h.adaptive and h.levels == (1, 2) and h.max_depth == 3
    # level 1 splits "1" (10 >= 5) and "1/2" (8 >= 5, down to max depth); "1/0" (2) stays
    assert h.cells(1) == ["1/0", "1/2/2", "2", "3"]
    assert h.counts(1).tolist() == [2, 8, 1, 1]
    assert h.depths(1).tolist() == [2, 3, 1, 1]
    # level 2 splits "1/0" (2 >= 2); singletons "2" and "3" are kept as they are
    assert h.cells(2) == ["1/0/2", "1/2/2", "2", "3"]
    assert h.counts(2).tolist() == [2, 8, 1, 1]
    assert h.parents(2).tolist() == [0, 1, 2, 3]
    assert h.parents(1).tolist() == [-1, -1, -1, -1]
    lab = h.labels(LAT, LON)
    assert lab[1].tolist() == [1] * 8 + [0, 0, 3, 2]
    assert lab[2].tolist() == [1] * 8 + [0, 0, 3, 2]
    # a point where no image was: its quadrant's empty children were dropped
    assert h.labels([80.0, float("nan")], [170.0, 0.0])[1].tolist() == [-1, -1]
    assert h.index(1, "1/0") == 0 and h.index(1, "1") == -1 and h.index(1, "1/0/2") == -1
    assert h.index(2, "1/0/2") == 0 and h.index(2, "3") == 3
    assert h.scheme == {"cells": "adaptive", "thresholds": {1: 5, 2: 2}, "max_depth": 3}


def test_bounds_centroids_areas_of_any_depth():
    h = build_adaptive(LAT, LON, [5, 2], max_depth=3)
    w, s, e, n = h.bounds(1)
    assert w.tolist() == [0.0, 0.0, -180.0, 0.0] and e.tolist() == [90.0, 45.0, 0.0, 180.0]
    assert s.tolist() == [45.0, 0.0, -90.0, -90.0] and n.tolist() == [90.0, 22.5, 0.0, 0.0]
    lat, lon = h.centroids(1)
    assert lat.tolist() == [67.5, 11.25, -45.0, -45.0] and lon.tolist() == [45.0, 22.5, -90.0, 90.0]
    areas = h.areas_km2(1)
    assert areas[2] == pytest.approx(grid.area_km2(grid.from_id("2")))
    assert areas[1] == pytest.approx(grid.area_km2(grid.from_id("1/2/2")))
    assert grid.ids_to_depth_keys(h.cells(1))[1].tolist() == h.depths(1).tolist()


def random_points(n=3000, seed=3):
    rng = np.random.default_rng(seed)
    centres = rng.uniform([-60, -170], [70, 170], (12, 2))
    pick = rng.integers(0, 12, n)
    spread = rng.choice([0.05, 1.0, 8.0], n)
    lat = np.clip(centres[pick, 0] + rng.normal(0, 1, n) * spread, -89, 89)
    lon = centres[pick, 1] + rng.normal(0, 1, n) * spread
    return lat, lon


def test_random_partition_nests_counts_and_labels_every_image():
    lat, lon = random_points()
    thresholds = [800, 120, 20, 4]
    h = build_adaptive(lat, lon, thresholds, max_depth=12)
    fine = np.sort(grid.encode(lat, lon, 12))
    labels = h.labels(lat, lon)
    for i, lv in enumerate(h.levels):
        lab = labels[lv]
        assert (lab >= 0).all()  # every image has a class at every level
        assert np.bincount(lab, minlength=h.num_classes[lv]).tolist() == h.counts(lv).tolist()
        assert (h.counts(lv) > 0).all() and h.counts(lv).sum() == lat.size
        ids = h.cells(lv)
        assert ids == sorted(ids)  # class order is id order
        keys, depths = grid.ids_to_depth_keys(ids)  # ids parse with grid.py
        assert depths.tolist() == h.depths(lv).tolist() and keys.tolist() == h.keys(lv).tolist()
        # a leaf stopped splitting: under the threshold, or at max depth
        n = h.counts(lv)
        assert np.all((n < thresholds[i]) | (h.depths(lv) == 12))
        # a class below depth 1 exists because its parent node held >= the threshold
        deep = np.flatnonzero(h.depths(lv) > 1)
        pk, pd = h.keys(lv)[deep] >> 2, h.depths(lv)[deep] - 1
        shift = 2 * (12 - pd)
        held = np.searchsorted(fine, (pk + 1) << shift) - np.searchsorted(fine, pk << shift)
        assert np.all(held >= thresholds[i])
        if i:
            prev = h.levels[i - 1]
            parent_ids = h.cells(prev)
            par = h.parents(lv)
            assert all(c.startswith(parent_ids[p]) for c, p in zip(ids, par.tolist(), strict=True))
            assert np.array_equal(par[lab], labels[prev])  # an image's parent class = its class above
            assert h.num_classes[lv] >= h.num_classes[prev]
    assert Tree.from_hierarchy(h, h.levels).num_classes == h.num_classes


def test_thresholds_defaults_and_errors():
    assert parse_thresholds("50, 5") == [50, 5]
    for bad, msg in (("5,10", "decrease"), ("5,x", "whole numbers"), ("", "empty"), ("0", ">= 1")):
        with pytest.raises(InputError, match=msg):
            parse_thresholds(bad)
    d = default_thresholds(4000)
    assert d == sorted(d, reverse=True) and len(set(d)) == len(d) == 4
    lat, lon = random_points(20_000)
    h = build_adaptive(lat, lon)
    assert h.levels == (1, 2, 3, 4)
    counts = list(h.num_classes.values())
    assert counts == sorted(counts) and counts[0] >= 4 and 16 <= counts[1] <= 256  # aiming at 4, 64, ... (within 4x)
    with pytest.raises(InputError, match="no images"):
        build_adaptive([float("nan")], [0.0])
    with pytest.raises(InputError, match="max-depth"):
        adaptive_partition(LAT, LON, [2], max_depth=30)


def test_summary_previews_counts_and_gini():
    rows = adaptive_summary(LAT, LON, [5, 2], max_depth=3)
    assert [r["classes"] for r in rows] == [4, 4]
    assert rows[0]["without_class"] == 0 and rows[0]["largest"] == 8 and rows[0]["smallest"] == 1
    assert rows[0]["min_depth"] == 1 and rows[0]["max_depth"] == 3 and 0 < rows[0]["gini"] < 1


def test_json_round_trip_and_format(tmp_path):
    h = build_adaptive(LAT, LON, [5, 2], max_depth=3)
    d = h.to_dict()
    assert d["format"] == FORMAT_ADAPTIVE and d["cells"] == "adaptive"
    assert d["thresholds"] == {"1": 5, "2": 2} and d["max_depth"] == 3
    back = Hierarchy.from_dict(json.loads(json.dumps(d)))
    assert back == h and back.adaptive and back.cells(1) == h.cells(1)
    assert back.depths(1).tolist() == h.depths(1).tolist() and back.scheme == h.scheme
    h.save(tmp_path / "h.json")
    loaded = Hierarchy.load(tmp_path / "h.json")
    assert loaded.hash == h.hash and loaded.labels(LAT, LON)[2].tolist() == h.labels(LAT, LON)[2].tolist()
    # a hand-edited file is refused in one line
    bad = dict(d, classes={**d["classes"], "2": {**d["classes"]["2"], "cells": ["1/0/2", "1/2/2", "2", "0"]}})
    with pytest.raises(InputError, match="hash mismatch|parent|disjoint|ascending"):
        Hierarchy.from_dict(bad)
    with pytest.raises(InputError, match="adaptive"):
        Hierarchy.from_dict({**d, "cells": None})
    # an orphan: a level-2 cell outside every level-1 class
    with pytest.raises(InputError, match="no parent class"):
        Hierarchy([1, 2], {1: [1], 2: [0]}, depths={1: [1], 2: [1]},
                  scheme={"thresholds": {1: 2, 2: 1}, "max_depth": 3})


def test_fixed_levels_stay_byte_identical():
    # pinned from main before adaptive cells existed: same hash, same document, same labels
    rng = np.random.default_rng(7)
    lat, lon = rng.uniform(-70, 70, 2000), rng.uniform(-180, 180, 2000)
    h = build_hierarchy(lat, lon, (1, 3, 5, 8), min_images=3)
    assert not h.adaptive and h.to_dict()["format"] == FORMAT and "cells" not in h.to_dict()
    assert h.hash == "28d61c7b30d94f3cd740375e471bf0231b1b4f7b7a14b274e9097656aabb404a"
    d = h.to_dict()
    d.pop("created_at")
    assert hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest() == \
        "095ab7a3ea08098ddc405e5923d35653cf29a16395eb37214ee16845970a689a"
    labels = np.concatenate(list(h.labels(lat, lon).values()))
    assert hashlib.sha256(labels.tobytes()).hexdigest() == \
        "7af05ae40f1b5ce08d89b12ebedc0bf819ab6dd6f8c4aa055bbdd0896ecaf686"
    assert h.depths(5).tolist() == [5] * h.num_classes[5]
    assert np.array_equal(np.stack(h.bounds(5)), np.stack(grid.key_bounds(h.keys(5), 5)))


def test_cells_layer_draws_cells_of_any_depth():
    h = build_adaptive(LAT, LON, [5, 2], max_depth=3)
    keys, depth = maps.cells_of(h.cells(1), 1)
    assert depth.tolist() == [2, 3, 1, 1]
    layer = maps.cells_layer(keys, depth, "#ff0000", tooltip=[("cell", "Cell")])
    payload = json.loads(layer.payload)
    assert payload["depths"] == [2, 3, 1, 1] and payload["keys"] == h.keys(1).tolist()
    fixed = maps.cells_layer([0, 3], 1, "#ff0000")
    assert "depths" not in json.loads(fixed.payload)
    assert maps.cells_of(["0/1", "3/3"], 2)[1] == 2
    with pytest.raises(InputError, match="depths"):
        maps.cells_layer([0, 99], [1, 1], "#ff0000")
    html = maps.images_map(h.keys(1), h.counts(1), [""] * 4, h.depths(1)).get_root().render()
    assert re.search(r'"depths":\s*\[2,\s*3,\s*1,\s*1\]', html)


# ----------------------------------------------------------------------------- readers


def tiny_adaptive():
    from conftest import CITIES

    lat = [c[0] + 0.01 * j for c in CITIES for j in range(3)]
    lon = [c[1] + 0.01 * j for c in CITIES for j in range(3)]
    return build_adaptive(lat, lon, [6, 3, 2], max_depth=10)


def test_predictor_on_an_adaptive_run(tmp_path, make_jpeg):
    from test_predictor import make_tiny_run

    from geohier.predictor import Predictor

    h = tiny_adaptive()
    assert len(set(h.depths(3).tolist())) > 1  # cells of several depths
    run = make_tiny_run(tmp_path / "ada", hierarchy=h)
    p = Predictor.load(run, device="cpu")
    assert p.hierarchy.adaptive and p.hierarchy.hash == h.hash
    a = make_jpeg(tmp_path / "a.jpg", color=(200, 60, 60), gps=(48.8566, 2.3522))
    (pred,) = p.predict_files([a])
    assert pred.error is None and sorted(pred.levels) == [1, 2, 3]
    w, s, e, n = h.bounds(3)
    for c in pred.levels[3]:
        i = h.cells(3).index(c.cell)
        assert c.bbox == pytest.approx((w[i], s[i], e[i], n[i]))
        assert s[i] <= c.lat <= n[i] and w[i] <= c.lon <= e[i]
    assert p.finest_areas().tolist() == pytest.approx(h.areas_km2(3).tolist())
    html = maps.prediction_map(pred, p).get_root().render()
    assert "depths" in html
    from dataclasses import replace

    from geohier.conformal import Region

    with_region = replace(pred, region=Region("conformal", h.cells(3)[:2], [0, 1], 0.5, 1234.0, 0.9, 0.1))
    html = maps.prediction_map(with_region, p).get_root().render()
    assert "90% coverage region: 2 cells" in html and "Region: 2 cells, 1,234 km" in html
    assert maps.prediction_key(with_region) != maps.prediction_key(pred)  # the page's map redraws
    parent = h.cells(1)[0]
    with_rest = replace(pred, region=Region("conformal", h.cells(3)[:1], [0], 0.5, 99.0, 0.9, 0.1, rest=[parent],
                                            rest_minus=[[c for c in h.cells(2) if c.startswith(parent)]]))
    html = maps.prediction_map(with_rest, p).get_root().render()
    assert "90% coverage region: 1 rests" in html and "1 the rest of a coarser cell, dashed" in html
    assert maps.prediction_key(with_rest) != maps.prediction_key(with_region)


def test_evaluate_on_an_adaptive_workspace(ws):
    from test_evaluate import make_tiny_run, make_tiny_workspace

    from pipeline import evaluate

    make_tiny_workspace(ws)
    with ws.manifest() as m:
        lat, lon = m.points()
    h = build_adaptive(lat, lon, [10, 4], max_depth=12)
    h.save(ws.hierarchy_path)
    run = make_tiny_run(ws, levels=(1, 2))
    res = evaluate.evaluate_run(run, ws, progress=False)
    assert res["levels"] == [1, 2] and res["images"] == 6
    assert res["per_level"]["2"]["n"] == 6  # every test image has a class at the finest level
    assert 0 <= res["geo"]["median_km"] < 20_100
    from geohier.leaderboard import Leaderboard

    board = Leaderboard(ws.data_dir)  # the leaderboard says the run's design
    assert "adaptive cells" in board.entries(board.truth_sets()[0]["hash"])["tiny"]["note"]


def test_build_labels_cli(ws, capsys):
    from test_evaluate import make_tiny_workspace

    from pipeline.cli import main
    from pipeline.labels import build_labels

    make_tiny_workspace(ws)
    h = build_labels(ws, cells="adaptive", thresholds="10,4", max_depth=12)
    assert Hierarchy.load(ws.hierarchy_path) == h and h.adaptive
    with ws.manifest() as m:
        lat, lon = m.points()
    assert all((lab >= 0).all() for lab in h.labels(lat, lon).values())
    args = ["labels"]  # the workspace comes from GEOHIER_DATA / GEOHIER_MODELS (the ws fixture)
    assert main(args + ["--cells", "adaptive", "--thresholds", "12,6,3"]) == 0
    out = capsys.readouterr().out
    assert "adaptive cells" in out and Hierarchy.load(ws.hierarchy_path).levels == (1, 2, 3)
    assert main(args + ["--cells", "adaptive", "--thresholds", "3,6"]) == 2
    err = capsys.readouterr().err
    assert "decrease" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_training_end_to_end_on_adaptive_cells(tmp_path):
    from test_train import make_world, tiny

    from geohier.model import load_run
    from geohier.predictor import Predictor
    from pipeline import evaluate
    from pipeline import train as T

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ws = make_world(tmp_path, n=36)
        with ws.manifest() as m:
            lat, lon = m.points()
        build_adaptive(lat, lon, [12, 4], max_depth=8).save(ws.hierarchy_path)
        run = T.train(ws, tiny(epochs=1, run_name="ada"))
        _, meta = load_run(run)
        assert meta["arch"]["levels"] == [1, 2] and meta["hierarchy"]["cells"] == "adaptive"
        res = evaluate.evaluate_run(run, ws, split="val", progress=False)  # make_world has no test split
        assert res["levels"] == [1, 2] and res["per_level"]["2"]["n"] == res["images"] == 6
        p = Predictor.load(run, device="cpu")
        assert p.hierarchy.adaptive and len(p.positions) == p.hierarchy.num_classes[2]
        # the other designs on the same adaptive cells: hybrid head (offsets in cells of any
        # depth) with the hierarchical loss
        both = T.train(ws, tiny(epochs=1, max_steps=2, run_name="ada-both", head="hybrid", loss="hierarchical"))
        res = evaluate.evaluate_run(both, ws, split="val", progress=False)
        assert res["levels"] == [1, 2] and res["images"] == 6
        q = Predictor.load(both, device="cpu")
        assert q.hybrid and np.array_equal(q.bounds, np.stack(q.hierarchy.bounds(2), axis=1))
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- pages


def test_data_page_previews_and_writes_an_adaptive_partition(ws):
    from test_data_page import _page, _populate

    _populate(ws)  # 14 photos: Paris 8, London 3, New York 2, Cape Town 1
    at = _page().run()
    assert not at.exception
    # closed (no adaptive hierarchy yet): the preview, which reads every position, is not computed
    assert not any("images without a class" in d.value.columns for d in at.dataframe)
    at.session_state["adaptive_open"] = True  # the user opens the expander (it reruns the page)
    at.text_input(key="adaptive_thresholds").input("10,4")
    at.number_input(key="adaptive_depth").set_value(8)
    at.run()
    assert not at.exception
    table = next(d.value for d in at.dataframe if "images without a class" in d.value.columns)
    assert table["classes"].tolist() == list(build_adaptive(*_points(ws), [10, 4], max_depth=8).num_classes.values())
    assert table["images without a class"].tolist() == [0, 0]
    at.toggle(key="adaptive_map").set_value(True).run()
    assert not at.exception
    assert any("cells of the finest level" in c.value for c in at.caption)  # and its map
    at.text_input(key="adaptive_thresholds").input("4,10")
    at.run()
    assert not at.exception and any("decrease" in e.value for e in at.error)
    at.text_input(key="adaptive_thresholds").input("10,4")
    at.run()
    at.button(key="adaptive_write").click().run()
    assert not at.exception
    assert any("adaptive cells" in s.value for s in at.success)
    h = Hierarchy.load(ws.hierarchy_path)
    assert h.adaptive and h.scheme["thresholds"] == {1: 10, 2: 4} and h.max_depth == 8
    at.run()  # the page reads the adaptive hierarchy.json back
    assert not at.exception


def _points(ws):
    with ws.manifest() as m:
        return m.points()


def test_predict_page_and_explorer_on_an_adaptive_run(ws):
    from conftest import ROOT, jpeg_bytes
    from streamlit.testing.v1 import AppTest
    from test_explorer import make_workspace
    from test_predictor import make_tiny_run

    make_workspace(ws)
    h = build_adaptive(*_points(ws), [8, 4, 2], max_depth=10)
    h.save(ws.hierarchy_path)
    run = make_tiny_run(ws.models_dir / "ada", h)
    at = AppTest.from_file(str(ROOT / "views" / "predict.py"), default_timeout=120).run()
    assert not at.exception
    at.file_uploader(key="predict_upload").set_value(
        ("paris.jpg", jpeg_bytes(size=(80, 60), gps=(48.8566, 2.3522)), "image/jpeg")).run()
    assert not at.exception and not [e.value for e in at.error]
    assert "Best guess" in {m.label for m in at.metric}
    assert len(at.get("component_instance")) == 2  # the kept cells and the world map, cells of any depth
    at.button(key="explorer_compute").click().run()
    assert not at.exception
    assert (run / "val_logits.safetensors").exists()
    assert "True cell kept" in {m.label for m in at.metric}


def test_accuracy_page_evaluates_an_adaptive_run(ws):
    from conftest import ROOT
    from streamlit.testing.v1 import AppTest
    from test_evaluate import make_tiny_run, make_tiny_workspace

    make_tiny_workspace(ws)
    build_adaptive(*_points(ws), [10, 4], max_depth=12).save(ws.hierarchy_path)
    run = make_tiny_run(ws, levels=(1, 2))
    at = AppTest.from_file(str(ROOT / "views" / "accuracy.py"), default_timeout=120).run()
    assert not at.exception
    at = next(b for b in at.button if b.label == "Evaluate").click().run()
    assert not at.exception, at.exception
    assert (run / "eval.json").exists() and not at.error
    assert at.dataframe


def test_train_page_offers_the_adaptive_levels(ws):
    from conftest import ROOT
    from streamlit.testing.v1 import AppTest

    build_adaptive([48.85, 52.52, 40.71, -33.87], [2.35, 13.40, -74.0, 151.21], [3, 2], max_depth=8) \
        .save(ws.hierarchy_path)
    at = AppTest.from_file(str(ROOT / "views" / "train.py"), default_timeout=60).run()
    assert not at.exception
    levels = next(m for m in at.multiselect if m.label == "Levels")
    assert levels.value == [1, 2] and levels.options == ["1", "2"]
