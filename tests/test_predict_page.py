"""The Predict page (AppTest): no run, uploads good and bad, controls, the threshold explorer."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, jpeg_bytes
from streamlit.testing.v1 import AppTest
from test_explorer import make_workspace
from test_predictor import make_tiny_run, tiny_hierarchy

pytestmark = pytest.mark.slow  # trains tiny runs for the page: `make test-fast` skips this module

PAGE = str(ROOT / "views" / "predict.py")


def _page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=120).run()


def _errors(at) -> list[str]:
    return [e.value for e in at.error]


def test_no_run_says_how_to_train(ws):
    at = _page()
    assert not at.exception
    assert "python -m pipeline train" in at.info[0].value and "make run" in at.info[0].value


@pytest.fixture
def tiny(ws):
    return make_tiny_run(ws.models_dir / "tiny", tiny_hierarchy())


def test_no_upload_yet(ws, tiny):
    at = _page()
    assert not at.exception
    assert at.selectbox(key="predict_run").value.startswith("tiny")
    assert any("Drop one or more street photos" in i.value for i in at.info)
    # no manifest: the explorer says what it needs instead of failing
    assert any("no manifest" in i.value for i in at.info)


def test_upload_good_and_bad_files(ws, tiny):
    at = _page()
    at.file_uploader(key="predict_upload").set_value([
        ("paris.jpg", jpeg_bytes(size=(80, 60), gps=(48.8566, 2.3522)), "image/jpeg"),
        ("broken.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg", "image/jpeg"),
        ("empty.png", b"", "image/png"),
        ("tokyo.webp", jpeg_bytes(size=(70, 50), color=(20, 200, 90), fmt="WEBP"), "image/webp"),
    ]).run()
    assert not at.exception
    errors = _errors(at)
    assert len(errors) == 2
    assert any("broken.jpg" in e for e in errors) and any("empty.png" in e for e in errors)
    assert not any("Traceback" in e for e in errors)
    metrics = {m.label: m.value for m in at.metric}
    assert "Best guess" in metrics and "Error (EXIF GPS)" in metrics and "GeoScore" in metrics
    assert metrics["Error (EXIF GPS)"].endswith("km")
    # a summary of both good photos, the candidates of the picked one
    assert at.selectbox(key="predict_pick").options == ["paris.jpg", "tokyo.webp"]
    assert len(at.dataframe) >= 2
    at.selectbox(key="predict_pick").set_value(1).run()
    assert not at.exception
    assert "Error (EXIF GPS)" not in {m.label for m in at.metric}  # tokyo.webp has no GPS


def test_controls_change_the_kept_cells(ws, tiny):
    at = _page()
    at.file_uploader(key="predict_upload").set_value(("a.jpg", jpeg_bytes(), "image/jpeg")).run()
    at.selectbox(key="predict_rule_all").set_value("topk").run()
    at.slider(key="predict_top_k_all").set_value(1).run()
    assert not at.exception
    kept = lambda: next(m.value for m in at.metric if m.label.startswith("Cells kept"))  # noqa: E731
    assert kept() == "1"
    at.slider(key="predict_top_k_all").set_value(3).run()
    assert 1 <= int(kept()) <= 3
    # per-level controls, and the temperature switch
    at.toggle(key="predict_same").set_value(False).run()
    assert not at.exception
    assert at.selectbox(key="predict_rule_5").value == "topk"  # starts from the shared setting
    at.selectbox(key="predict_rule_1").set_value("cumulative").run()
    at.toggle(key="predict_temperature").set_value(False).run()
    assert not at.exception
    # a bad threshold list is a message, not a traceback
    at.selectbox(key="predict_rule_5").set_value("adaptive").run()
    at.text_input(key="predict_thresholds_5").set_value("0.2,0.9").run()
    assert not at.exception and any("decreasing" in e for e in _errors(at))


def test_threshold_explorer(ws):
    h = make_workspace(ws)
    run = make_tiny_run(ws.models_dir / "tiny", h)
    at = _page()
    assert not at.exception
    assert any("val split" in i.value for i in at.info)
    at.button(key="explorer_compute").click().run()
    assert not at.exception
    assert (run / "val_logits.safetensors").exists() and (run / "val_logits.json").exists()
    labels = {m.label for m in at.metric}
    assert {"True cell kept", "Top-1 cell", "Within 25 km", "Within 2500 km"} <= labels
    assert any(m.label.startswith("Mean cells kept") for m in at.metric)
    assert at.selectbox(key="explorer_param").value == "k_max"  # the default rule is adaptive
    # pick a setting on the curve and apply it to the Predict controls
    at.selectbox(key="explorer_param").set_value("top_k").run()
    at.select_slider(key="explorer_value").set_value(2).run()
    at.button(key="explorer_apply").click().run()
    assert not at.exception
    assert at.session_state["predict_top_k_all"] == 2
    assert at.slider(key="predict_top_k_all").value == 2
    # the controls move the explorer's numbers without recomputing the logits
    at.selectbox(key="predict_rule_all").set_value("topk").run()
    assert not at.exception
    kept = next(m.value for m in at.metric if m.label.startswith("Mean cells kept"))
    assert float(kept) <= 2.0
    # a region limit: the val images from inside it, answered within it
    at.text_input(key="predict_within").set_value("bbox:30,-10,60,20").run()
    assert not at.exception
    assert any(c.value.startswith("Within bbox:30,-10,60,20") and "4 val images" in c.value for c in at.caption)
    at.text_input(key="predict_within").set_value("").run()
    assert any(c.value.startswith("12 val images") for c in at.caption)


def test_refine_switch(ws, tiny):
    from test_predictor import training_photos, write_neighbours

    at = _page()
    # a run without neighbours: the switch is there, disabled, and says why
    assert at.toggle(key="predict_refine").disabled
    assert any("has no neighbours.safetensors" in c.value for c in at.caption)
    photos = training_photos()
    write_neighbours(tiny, photos)
    at = _page()
    assert not at.toggle(key="predict_refine").disabled
    data, lat, lon = photos[0]
    at.file_uploader(key="predict_upload").set_value(("paris.jpg", data, "image/jpeg")).run()
    at.selectbox(key="predict_rule_all").set_value("topk").run()
    at.slider(key="predict_top_k_all").set_value(20).run()
    before = next(m for m in at.metric if m.label == "Best guess").help
    assert not any(c.value.startswith("Refined:") for c in at.caption)
    at.toggle(key="predict_refine").set_value(True).run()
    assert not at.exception and not _errors(at)
    assert any(c.value.startswith("Refined:") and "nearest training image" in c.value for c in at.caption)
    after = next(m for m in at.metric if m.label == "Best guess").help
    assert after != before  # the point moved from the cell's position
    used = at.dataframe[-1].value  # the "Nearest training images used" table
    assert list(used.columns) == ["id", "lat", "lon", "sim", "weight"] and 1 <= len(used) <= 10
    # an index that became unreadable: a message, and the unrefined guess still shown
    (tiny / "neighbours.safetensors").write_bytes(b"garbage")
    at.slider(key="predict_top_k_all").set_value(19).run()
    assert not at.exception
    assert any("Refinement failed" in e and "cannot read the neighbour index" in e for e in _errors(at))
    assert next(m for m in at.metric if m.label == "Best guess").help.startswith("cell ")


def test_a_demo_world_run_is_flagged(ws, tiny):
    at = _page()
    assert not any("synthetic demo world" in w.value for w in at.warning)
    meta_path = tiny / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["data"] = {"sources": {"demo": 120}}
    meta_path.write_text(json.dumps(meta))
    at = _page()
    assert not at.exception
    notes = [w.value for w in at.warning if "synthetic demo world" in w.value]
    assert len(notes) == 1 and "not meaningful" in notes[0] and "frozen foundation backbone" in notes[0]


def test_corrupt_weights_are_one_error_box(ws, tiny):
    """NaN weights: the page says which file, once, with no traceback; weights that still
    load but give infinite outputs: each upload says so."""
    from test_splits import _poison

    path = _poison(tiny)
    at = _page()
    assert not at.exception
    assert any(str(path) in e and "NaN or infinite" in e for e in _errors(at))
    _poison(tiny, 3e38)  # finite, but the logits overflow to infinity
    at = _page()
    at.file_uploader(key="predict_upload").set_value([("a.jpg", jpeg_bytes(size=(40, 30)), "image/jpeg")]).run()
    assert not at.exception, at.exception
    assert any("a.jpg" in e and "non-finite outputs" in e for e in _errors(at)), _errors(at)


# ----------------------------------------------------------------------------- coverage, limits, abstention


def test_coverage_region_limit_and_abstention_controls(ws):
    conformal = {"score": "aps", "u": 0.5, "n": 9, "scores": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}
    make_tiny_run(ws.models_dir / "tiny", tiny_hierarchy(), extra_meta={"conformal": conformal})
    at = _page()
    at.file_uploader(key="predict_upload").set_value(("a.jpg", jpeg_bytes(), "image/jpeg")).run()
    assert not at.exception and not at.toggle(key="predict_coverage_on").disabled
    assert "Region cells" not in {m.label for m in at.metric}
    at.toggle(key="predict_coverage_on").set_value(True).run()
    at.slider(key="predict_coverage").set_value(0.9).run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["Region cells"].replace(",", "")) >= 1 and metrics["Region area"].endswith("km²")
    # a region limit: the answer is in France
    at.text_input(key="predict_within").set_value("country:FR").run()
    assert not at.exception and not _errors(at)
    assert any("Within country:FR" in c.value for c in at.sidebar.caption)
    assert {m.label: m.value for m in at.metric}["Country"] == "France"
    at.text_input(key="predict_within").set_value("country:XX").run()
    assert any("unknown country 'XX'" in e for e in _errors(at))
    at.text_input(key="predict_within").set_value("").run()
    # abstention: at 100% every answer is "not sure"
    assert not any("Not sure" in w.value for w in at.warning)
    at.slider(key="predict_abstain").set_value(1.0).run()
    assert not at.exception
    assert any("Not sure: the confidence" in w.value for w in at.warning)


def test_coverage_control_says_how_to_calibrate(ws, tiny):
    at = _page()
    assert not at.exception
    assert at.toggle(key="predict_coverage_on").disabled
    assert any("evaluate tiny --calibrate" in c.value for c in at.sidebar.caption)


def test_world_probability_map_and_why_this_guess(ws, tiny):
    at = _page()
    at.file_uploader(key="predict_upload").set_value(("a.jpg", jpeg_bytes(size=(80, 60)), "image/jpeg")).run()
    assert not at.exception
    assert at.toggle(key="predict_world").value is True
    assert len(at.get("component_instance")) == 2  # st_folium: the kept cells, the world
    assert any("Joint probability of every level-5 class" in c.value for c in at.caption)
    at.toggle(key="predict_world").set_value(False).run()
    assert not at.exception and len(at.get("component_instance")) == 1
    # the explanation costs forwards: off until asked for
    assert at.toggle(key="predict_explain").value is False and len(at.get("image")) == 1
    assert not any("forwards in" in c.value for c in at.caption)
    at.toggle(key="predict_explain").set_value(True).run()
    at.slider(key="predict_explain_grid").set_value(3).run()
    assert not at.exception and not _errors(at)
    note = next(c.value for c in at.caption if "forwards in" in c.value)
    assert note.startswith("10 forwards in")  # 3 x 3 patches + the unmasked photo
    assert len(at.get("image")) == 2  # the photo, and the overlay
    at.radio(key="predict_explain_measure").set_value("moved_km").run()
    assert not at.exception
    # Grad-CAM: one forward and one backward through the resnet18 run
    at.radio(key="predict_explain_method").set_value("gradcam").run()
    assert not at.exception and not _errors(at)
    note = next(c.value for c in at.caption if c.value.startswith("Grad-CAM on"))
    assert "map) in" in note and len(at.get("image")) == 2
