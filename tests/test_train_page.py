"""The Train page (AppTest): prerequisites, form validation next to the fields, runs table."""

from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from geohier.hierarchy import build_hierarchy

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "train.py")


def _page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=60)


def _hierarchy(ws):
    h = build_hierarchy([48.85, 52.52, 40.71, -33.87], [2.35, 13.40, -74.0, 151.21], (1, 3), min_images=1)
    h.save(ws.hierarchy_path)
    return h


def _by_label(widgets, label):
    return next(w for w in widgets if w.label == label)


def test_no_hierarchy_says_what_to_do(ws):
    at = _page().run()
    assert not at.exception
    assert "label hierarchy" in at.info[0].value and "pipeline labels" in at.info[0].value
    assert not at.button  # no manifest: nothing to build labels from


def test_form_renders_with_hierarchy_levels(ws):
    _hierarchy(ws)
    at = _page().run()
    assert not at.exception
    levels = _by_label(at.multiselect, "Levels")
    assert levels.value == [1, 3] and levels.options == ["1", "3"]
    assert _by_label(at.selectbox, "Backbone").value == "resnet18"  # the CPU demo recipe
    assert "No runs yet." in [c.value for c in at.caption]


def test_validation_messages_next_to_fields(ws):
    _hierarchy(ws)
    at = _page().run()
    _by_label(at.number_input, "Epochs").set_value(0)
    _by_label(at.number_input, "Image size (px)").set_value(8)
    _by_label(at.selectbox, "Weights").set_value("local file")
    _by_label(at.text_input, "Local weights file (.safetensors)").set_value("/nope/w.safetensors")
    _by_label(at.text_input, "Run name (optional)").set_value("bad name!")
    at = _by_label(at.button, "Launch").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any("epochs must be an integer in [1, 10000]" in e for e in errors)
    assert any("image size must be an integer in [16, 2048]" in e for e in errors)
    assert any("weights file /nope/w.safetensors does not exist" in e for e in errors)
    assert any("letters, digits" in e for e in errors)
    assert not [p for p in ws.models_dir.iterdir()]  # nothing launched


def test_runs_table_and_log(ws):
    _hierarchy(ws)
    run = ws.models_dir / "r-done"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"backbone": "resnet18", "levels": [1, 3], "epochs": 2}))
    (run / "status.json").write_text(json.dumps({"state": "done", "epoch": 2, "epochs": 2, "progress": 1.0}))
    (run / "log.txt").write_text("epoch 1/2 ok\nepoch 2/2 ok\ndone\n")
    dead = ws.models_dir / "r-dead"
    dead.mkdir()
    (dead / "config.json").write_text(json.dumps({"backbone": "resnet50", "levels": [1]}))
    (dead / "status.json").write_text(json.dumps({"state": "running", "epoch": 0, "epochs": 3,
                                                  "progress": 0.1, "pid": 2**22 + 4321}))
    (dead / "log.txt").write_text("loading data\n")
    at = _page().run()
    assert not at.exception
    df = at.dataframe[0].value
    states = dict(zip(df["run"], df["state"], strict=True))
    assert states == {"r-done": "done", "r-dead": "failed"}  # its process is gone
    assert list(df["progress"])[list(df["run"]).index("r-done")] == 1.0
    pick = _by_label(at.selectbox, "Run")
    at = pick.set_value("r-done").run()
    assert not at.exception
    assert "epoch 2/2 ok" in at.code[0].value
    assert any(b.label == "Train longer" for b in at.button)
    at = _by_label(at.selectbox, "Run").set_value("r-dead").run()
    assert any(b.label == "Resume" for b in at.button)
    assert any("ended without finishing" in e.value for e in at.error)
