"""geohier.runs: the run directory's files, states, listing and resolving; geodesy; forward."""

from __future__ import annotations

import doctest
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from geohier import forward, geodesy, runs
from geohier.errors import InputError, WorkspaceError
from geohier.runs import Run


def _model_files(run: Run) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    run.meta_path.write_text("{}")
    run.weights_path.write_bytes(b"x")


def test_doctests():
    for mod in (runs, geodesy, forward):
        assert doctest.testmod(mod).failed == 0


def test_listing_finished_and_newest(tmp_path):
    models = tmp_path / "models"
    assert runs.list_runs(models) == [] and runs.finished_runs(models) == []
    with pytest.raises(WorkspaceError, match="no finished run in .*python -m pipeline train"):
        runs.newest_run(models)
    b = Run(models / "b_run")
    b.write_config({"epochs": 1})
    a = Run(models / "a_run")
    _model_files(a)
    q = Run(models / "queued")
    q.write_status({"state": "queued"})
    (models / "not_a_run").mkdir()
    assert [r.name for r in runs.list_runs(models)] == ["a_run", "b_run", "queued"]
    assert runs.finished_runs(models) == [a]
    old = time.time() - 100
    os.utime(a.meta_path, (old, old))
    os.utime(a.weights_path, (old, old))
    c = Run(models / "c_run")
    _model_files(c)
    c.write_status({"state": "done"})
    assert runs.finished_runs(models) == [c, a]
    assert runs.newest_run(models) == c
    c.write_status({"state": "failed"})
    assert runs.finished_runs(models) == [a]
    (models / "broken").mkdir()
    Run(models / "broken").meta_path.write_text("{}")
    Run(models / "broken").status_path.write_text("not json")
    assert runs.finished_runs(models) == [a]  # no weights: not finished


def test_state_and_json_documents(tmp_path):
    r = Run(tmp_path / "r")
    assert r.state == "unknown" and r.status() == {} and r.eval() is None
    _model_files(r)
    assert r.state == "done"  # a model and no status: a run from before status files
    r.write_status({"state": "running", "epoch": 2})
    assert r.state == "running" and not r.is_finished()
    r.write_config({"lr": 0.1})
    assert r.config() == {"lr": 0.1} == r.require_config()
    r.write_eval({"geo": {"geoscore": 1.5}})
    assert r.eval()["geo"]["geoscore"] == 1.5
    r.write_job({"pid": 1})
    assert r.job() == {"pid": 1}
    r.write_train_state({"epoch": 3})
    assert r.train_state() == {"epoch": 3}
    r.config_path.write_text("[1, 2]")
    with pytest.raises(WorkspaceError, match="is not a JSON object"):
        r.require_config()
    # every file of the run is named by the module and sits in the run directory
    names = {runs.CONFIG_FILE, runs.STATUS_FILE, runs.LOG_FILE, runs.METRICS_FILE, runs.WEIGHTS_FILE,
             runs.META_FILE, runs.STATE_TENSORS_FILE, runs.STATE_JSON_FILE, runs.EVAL_FILE,
             runs.JOB_FILE, runs.CONSOLE_FILE}
    assert len(names) == 11
    assert r.eval_path == tmp_path / "r" / runs.EVAL_FILE


def test_history_keeps_the_last_record_of_an_epoch_and_truncates(tmp_path):
    r = Run(tmp_path / "r")
    r.path.mkdir()
    for e, loss in ((1, 3.0), (2, 2.0), (3, 1.5)):
        r.append_metrics({"epoch": e, "loss": loss})
    with open(r.metrics_path, "a") as f:
        f.write("garbage\n[]\n")
    r.append_metrics({"epoch": 2, "loss": 1.9})  # a resumed run redid epoch 2
    assert [(h["epoch"], h["loss"]) for h in r.history()] == [(1, 3.0), (2, 1.9), (3, 1.5)]
    r.truncate_metrics(2)
    assert [h["epoch"] for h in r.history()] == [1, 2]
    assert all(json.loads(line) for line in r.metrics_path.read_text().splitlines())


def test_log_tail_prefers_the_log_then_the_console(tmp_path):
    r = Run(tmp_path / "r")
    r.path.mkdir()
    r.console_path.write_text("boot\nbar 10%\rbar 50%\rbar 100%\n")
    assert r.tail(5) == "boot\nbar 100%"
    for i in range(5):
        r.append_log(f"line {i}")
    assert r.tail(2) == "line 3\nline 4"
    assert runs.tail_file(tmp_path / "missing.txt", 3) == []


def test_resolve_by_name_or_path(tmp_path):
    models = tmp_path / "models"
    r = Run(models / "mine")
    r.write_config({})
    assert runs.resolve_run(models, "mine") == r
    assert runs.resolve_run(models, r.path).path == r.path.resolve()
    assert runs.resolve_run(models, r) is r
    with pytest.raises(WorkspaceError, match="no run 'other': neither a directory nor a run in"):
        runs.resolve_run(models, "other")


def test_run_key_changes_when_the_weights_change(tmp_path):
    r = Run(tmp_path / "r")
    _model_files(r)
    k1 = r.key()
    time.sleep(0.01)
    r.weights_path.write_bytes(b"xy")
    assert r.key() != k1
    assert runs.runs_key([r.path]) == (r.key(),)
    assert runs.as_runs(str(r.path)) == [r] and runs.as_runs([r, r.path]) == [r, r]


def test_run_choices_group_per_level_sets(tmp_path):
    models = tmp_path / "models"
    for name, levels, group in (("multi", [1, 3], None), ("g1", [1], "set"), ("g3", [3], "set")):
        r = Run(models / name)
        r.path.mkdir(parents=True)
        r.write_meta({"arch": {"levels": levels}, "config": {"group": group}, "hierarchy_hash": "h"})
        r.weights_path.write_bytes(b"x")
    choices = runs.run_choices(models)
    assert choices[0].label == "set set (levels 1,3)"
    assert [p.name for p in choices[0].runs] == ["g1", "g3"]
    assert {c.label.split()[0] for c in choices[1:]} == {"multi", "g1", "g3"}


def test_process_liveness(tmp_path):
    me = os.getpid()
    assert runs.pid_alive(me, runs.process_start_time(me))
    assert not runs.pid_alive(me, runs.process_start_time(me) - 50)  # a reused pid
    assert not runs.pid_alive(None) and not runs.pid_alive(0)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not runs.pid_alive(child.pid, 0.0)
    r = Run(tmp_path / "r")
    r.write_status({"state": "running", "pid": me})
    assert runs.training_pid(r) == (me, None)
    r.write_job({"pid": me, "start_time": runs.process_start_time(me)})
    assert runs.is_training(r)  # pytest's own process stands in for the trainer
    r.write_status({"state": "done"})
    assert not runs.is_training(r)


def test_geodesy_known_values():
    assert float(geodesy.haversine_km(0, 0, 0, 1)) == pytest.approx(2 * math.pi * 6371 / 360)
    assert float(geodesy.haversine_km(0, 0, 0, 180)) == pytest.approx(math.pi * 6371)
    assert float(geodesy.haversine_km(48.8566, 2.3522, 51.5074, -0.1278)) == pytest.approx(343.56, abs=0.01)
    # the mean across the antimeridian is on it, not at lon 0
    lat, lon = geodesy.spherical_mean([0, 0], [179, -179])
    assert lat == pytest.approx(0, abs=1e-9) and abs(lon) == pytest.approx(180)
    assert all(math.isnan(v) for v in geodesy.spherical_mean([0, 0], [0, 180]))
    xyz = geodesy.unit_vectors([10, -45], [20, 170])
    assert np.allclose(np.linalg.norm(xyz, axis=1), 1)
    la, lo = geodesy.to_latlon(xyz)
    assert np.allclose(la, [10, -45]) and np.allclose(lo, [20, 170])
    assert float(geodesy.chord_to_km(geodesy.km_to_chord(1234.5))) == pytest.approx(1234.5)
    la2, lo2 = geodesy.destination(0, 179.5, 90, 111.19492664455873)
    assert float(la2) == pytest.approx(0, abs=1e-9) and float(lo2) == pytest.approx(-179.5)


def test_forward_resolves_devices_and_collects():
    assert forward.resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(InputError, match="unknown device 'tpu9'"):
        forward.resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            forward.resolve_device("cuda")

    class Two(torch.nn.Module):
        def forward(self, x):
            return {1: x.flatten(1)[:, :2], 3: x.flatten(1)[:, :3] * 2}

    class B:
        def __init__(self, n, start, skipped=()):
            self.images = torch.arange(n * 4, dtype=torch.float32).reshape(n, 1, 2, 2) if n else torch.zeros(0)
            self.index = torch.arange(start, start + n)
            self.skipped = list(skipped)

    seen = []
    out = forward.collect(Two(), [B(2, 0), B(0, 2, ["bad"]), B(1, 3)], torch.device("cpu"), {1: 2, 3: 3},
                          progress=seen.append)
    assert out.index.tolist() == [0, 1, 3] and out.skipped == ["bad"]
    assert out.logits[1].shape == (3, 2) and out.logits[3][2].tolist() == [0.0, 2.0, 4.0]
    assert seen == [2, 1, 1]
    empty = forward.collect(Two(), [], torch.device("cpu"), {1: 2, 3: 3})
    assert empty.logits[3].shape == (0, 3) and empty.index.size == 0
