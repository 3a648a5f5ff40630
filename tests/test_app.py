"""The home page (app.py) and the quick-start logic behind `make run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from geohier.runs import Run, finished_runs
from pipeline.cli import main
from pipeline.quickstart import next_step

ROOT = Path(__file__).resolve().parents[1]


def _home(ws) -> AppTest:
    # app.py declares every page; AppTest runs the default one (home).
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()


@pytest.mark.slow
def test_home_on_empty_workspace(ws):
    at = _home(ws)
    assert not at.exception
    assert [m.value for m in at.metric][:3] == ["0", "0", "0"]
    assert "demo" in at.info[0].value


def test_home_counts_images_and_suggests_labels(ws, make_jpeg):
    from conftest import jpeg_bytes

    with ws.manifest() as m:
        for i, (lat, lon) in enumerate([(48.85, 2.35), (48.86, 2.36), (-33.9, 18.4)]):
            m.store_image(jpeg_bytes(color=(i * 60, 20, 20)), "jpg", source="photos", lat=lat, lon=lon)
    at = _home(ws)
    assert not at.exception
    values = [m.value for m in at.metric]
    assert values[0] == "3" and values[1] == "2"  # two Paris photos share an L8 cell
    assert "hierarchy" in at.info[0].value
    assert any("labels" in c.value for c in at.code)


def test_next_step_progression(ws):
    assert "demo" in next_step(ws)["command"]
    run = ws.models_dir / "r1"
    run.mkdir()
    for name in ("config.json", "meta.json", "model.safetensors"):
        (run / name).write_text("{}")
    (run / "status.json").write_text(json.dumps({"state": "running"}))
    assert finished_runs(ws.models_dir) == []
    (run / "status.json").write_text(json.dumps({"state": "done"}))
    assert finished_runs(ws.models_dir) == [Run(run)]
    (ws.models_dir / "broken").mkdir()
    (ws.models_dir / "broken" / "meta.json").write_text("{}")
    (ws.models_dir / "broken" / "status.json").write_text("not json")
    assert finished_runs(ws.models_dir) == [Run(run)]  # no weights: not finished


@pytest.mark.slow
def test_cli_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Traceback" not in err
