"""pipeline.jobs: background training jobs (fake commands for speed, one real train run)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace

import pytest

from geohier.errors import InputError, WorkspaceError
from geohier.runs import Run
from pipeline import jobs
from pipeline.train import TrainConfig, validate

# A stand-in for `pipeline train`: writes status.json like train.py, ends as cancelled on
# SIGTERM, or (mode "crash") prints a few lines and dies without a word in status.json.
FAKE = r"""
import json, os, signal, sys, time
run_dir, mode = sys.argv[1], sys.argv[2]
def status(**kw):
    p = os.path.join(run_dir, "status.json")
    d = json.load(open(p)) if os.path.exists(p) else {}
    d.update(kw, pid=os.getpid())
    tmp = p + ".tmp"
    json.dump(d, open(tmp, "w"))
    os.replace(tmp, p)
if mode == "crash":
    print("loading data", flush=True)
    print("Traceback: something broke", flush=True)
    sys.exit(3)
if mode == "graceful":
    signal.signal(signal.SIGTERM, lambda *a: (status(state="cancelled"), sys.exit(0)))
elif mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
status(state="running", epoch=0, epochs=2, progress=0.25, eta_s=30.0)
with open(os.path.join(run_dir, "log.txt"), "a") as f:
    f.write("epoch 1/2 started\n")
if mode == "quick":
    status(state="done", progress=1.0, epoch=2)
    sys.exit(0)
for _ in range(600):
    time.sleep(0.05)
"""


def fake_argv(ws, name, mode):
    return [sys.executable, "-c", FAKE, str(ws.models_dir / name), mode]


def wait_for(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(autouse=True)
def _no_env_limit(monkeypatch):
    monkeypatch.delenv("GEOHIER_MAX_JOBS", raising=False)


@pytest.fixture
def cleanup():
    """Kill whatever a test launched and left running."""
    started = []
    yield started
    for run_dir in started:
        try:
            info = jobs.job_info(run_dir)
            if info.state in jobs.ACTIVE_STATES:
                jobs.cancel(run_dir, grace_s=0.5, wait=True)
        except Exception:  # noqa: BLE001 - best effort
            pass


# ----------------------------------------------------------------------------- parameters

def test_validate_reports_each_bad_field():
    ok = TrainConfig()
    assert validate(ok) == {}
    bad = TrainConfig(levels=[1, 0], backbone="vgg", weights="/no/such.safetensors", epochs=0,
                      batch_size=-1, lr=0.0, image_size=8, label_smoothing=1.5, haversine_tau=-1.0)
    errs = validate(bad)
    assert set(errs) == {"levels", "backbone", "weights", "epochs", "batch_size", "lr", "image_size",
                         "label_smoothing", "haversine_tau"}
    assert "resnet18" in errs["backbone"] and "does not exist" in errs["weights"]
    assert validate(TrainConfig(weights="foo"))["weights"].startswith("weights 'foo'")
    errs = validate(TrainConfig(levels=[1, 3, 9]), available_levels=(1, 3, 5, 8))
    assert "level(s) [9] are not in hierarchy.json" in errs["levels"]


def test_train_argv_parses_with_train_parser(ws):
    from pipeline.train import config_from_args, get_args_parser

    params = TrainConfig(levels=[1, 3], per_level=True, backbone="resnet34", weights="none",
                         epochs=3, batch_size=16, lr=0.002, image_size=64, label_smoothing=0.1,
                         haversine_tau=25.0, balanced=True, workers=0, max_steps=2)
    argv = jobs.train_argv(ws, params, "my-run")
    assert argv[:3] == [sys.executable, "-m", "pipeline"]
    assert all(isinstance(a, str) for a in argv)
    i = argv.index("train")
    assert argv[1:i] == ["-m", "pipeline", "--data", str(ws.data_dir), "--models", str(ws.models_dir)]
    cfg = config_from_args(get_args_parser().parse_args(argv[i + 1:]))
    assert (cfg.levels, cfg.per_level, cfg.backbone, cfg.weights, cfg.epochs, cfg.batch_size) == \
        ([1, 3], True, "resnet34", "none", 3, 16)
    assert (cfg.lr, cfg.image_size, cfg.label_smoothing, cfg.haversine_tau, cfg.balanced) == \
        (0.002, 64, 0.1, 25.0, True)
    assert (cfg.run_name, cfg.workers, cfg.max_steps) == ("my-run", 0, 2)
    assert cfg == replace(params, run_name="my-run")
    r = jobs.resume_argv(ws, ws.models_dir / "x", epochs=5)
    args = get_args_parser().parse_args(r[r.index("train") + 1:])
    assert args.resume == str(ws.models_dir / "x") and args.epochs == 5


def test_launch_refuses_bad_input(ws):
    with pytest.raises(WorkspaceError, match="run `python -m pipeline labels` first"):
        jobs.launch(ws, TrainConfig())
    with pytest.raises(InputError, match="--epochs: epochs must be an integer"):
        jobs.launch(ws, TrainConfig(epochs=0), argv=["true"])
    with pytest.raises(InputError, match="run name 'a b'"):
        jobs.launch(ws, TrainConfig(), "a b", argv=["true"])
    with pytest.raises(InputError, match="weights file /no/w.safetensors does not exist"):
        jobs.launch(ws, TrainConfig(weights="/no/w.safetensors"), argv=["true"])
    assert not ws.models_dir.exists() or not any(ws.models_dir.iterdir())


# ----------------------------------------------------------------------------- fake jobs

def test_launch_list_tail_and_graceful_cancel(ws, cleanup):
    run = jobs.launch(ws, TrainConfig(epochs=2), "g1", argv=fake_argv(ws, "g1", "graceful"))
    cleanup.append(run)
    assert run == ws.models_dir / "g1"
    # the run is visible at once, queued or already running
    infos = {j.name: j for j in jobs.list_jobs(ws)}
    assert infos["g1"].state in ("queued", "running") and infos["g1"].alive
    job = json.loads((run / "job.json").read_text())
    assert job["pid"] == job["pgid"] and job["argv"][-1] == "graceful"
    assert os.getpgid(job["pid"]) == job["pid"]  # its own process group
    assert wait_for(lambda: jobs.job_info(run).state == "running")
    info = jobs.job_info(run)
    assert info.progress == 0.25 and info.eta_s == 30.0 and info.epochs == 2
    assert wait_for(lambda: "epoch 1/2 started" in Run(run).tail())
    assert jobs.cancel(run, grace_s=5, wait=True) == "cancelled"
    info = jobs.job_info(run)
    assert info.state == "cancelled" and not info.alive and info.eta_s is None


def test_cancel_escalates_to_sigkill(ws, cleanup):
    run = jobs.launch(ws, TrainConfig(), "s1", argv=fake_argv(ws, "s1", "stubborn"))
    cleanup.append(run)
    assert wait_for(lambda: jobs.job_info(run).state == "running")
    t0 = time.monotonic()
    assert jobs.cancel(run, grace_s=0.5, wait=True) == "cancelled"
    assert time.monotonic() - t0 < 10
    assert not jobs.job_info(run).alive
    with pytest.raises(jobs.JobError, match="only queued or running jobs can be cancelled"):
        jobs.cancel(run)


def test_cancel_in_background_thread(ws, cleanup):
    run = jobs.launch(ws, TrainConfig(), "b1", argv=fake_argv(ws, "b1", "stubborn"))
    cleanup.append(run)
    assert wait_for(lambda: jobs.job_info(run).state == "running")
    assert jobs.cancel(run, grace_s=0.3) == "cancelling"
    assert wait_for(lambda: jobs.job_info(run).state == "cancelled", timeout=15)


def test_dead_process_is_failed_with_log_tail(ws, cleanup):
    run = jobs.launch(ws, TrainConfig(), "c1", argv=fake_argv(ws, "c1", "crash"))
    cleanup.append(run)
    assert wait_for(lambda: jobs.job_info(run).state == "failed")
    info = jobs.job_info(run)
    assert "ended without finishing" in info.error
    assert "Traceback: something broke" in info.error
    # the verdict is on disk: a restarted dashboard sees the same
    assert Run(run).status()["state"] == "failed"


def test_reused_pid_is_not_our_job(ws):
    """status.json says running with a live pid that is another program (this test)."""
    run = ws.models_dir / "r1"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid()}))
    (run / "job.json").write_text(json.dumps({"pid": os.getpid(), "pgid": os.getpid(),
                                              "start_time": "1"}))  # not this process's start
    (run / "log.txt").write_text("epoch 1 started\n")
    info = jobs.job_info(run)
    assert info.state == "failed" and "epoch 1 started" in info.error
    # a pid that no longer exists, recorded by train.py itself (no job.json)
    run2 = ws.models_dir / "r2"
    run2.mkdir()
    (run2 / "status.json").write_text(json.dumps({"state": "running", "pid": 2**22 + 12345}))
    assert jobs.job_info(run2).state == "failed"


def test_concurrency_limit(ws, cleanup, monkeypatch):
    run = jobs.launch(ws, TrainConfig(), "l1", argv=fake_argv(ws, "l1", "graceful"), limit=1)
    cleanup.append(run)
    with pytest.raises(jobs.JobError, match=r"1 job\(s\) already running \(l1\); the limit is 1"):
        jobs.launch(ws, TrainConfig(), "l2", argv=fake_argv(ws, "l2", "graceful"), limit=1)
    assert not (ws.models_dir / "l2").exists()
    monkeypatch.setenv("GEOHIER_MAX_JOBS", "2")
    assert jobs.max_jobs() == 2
    run2 = jobs.launch(ws, TrainConfig(), "l2", argv=fake_argv(ws, "l2", "graceful"))
    cleanup.append(run2)
    monkeypatch.setenv("GEOHIER_MAX_JOBS", "zero")
    with pytest.raises(InputError, match="GEOHIER_MAX_JOBS"):
        jobs.max_jobs()
    monkeypatch.delenv("GEOHIER_MAX_JOBS")
    assert jobs.max_jobs() >= 1
    with pytest.raises(jobs.JobError, match="already exists"):
        jobs.launch(ws, TrainConfig(), "l1", argv=fake_argv(ws, "l1", "graceful"), limit=5)


def test_resume_fake(ws, cleanup):
    run = jobs.launch(ws, TrainConfig(), "z1", argv=fake_argv(ws, "z1", "graceful"))
    cleanup.append(run)
    assert wait_for(lambda: jobs.job_info(run).state == "running")
    with pytest.raises(jobs.JobError, match="still running; cancel it before resuming"):
        jobs.resume(ws, run, argv=fake_argv(ws, "z1", "quick"))
    jobs.cancel(run, wait=True)
    jobs.resume(ws, run, argv=fake_argv(ws, "z1", "quick"))
    assert Run(run).status()["state"] in ("queued", "running", "done")
    assert json.loads((run / "job.json").read_text())["resumed"] is True
    assert jobs.wait(run, timeout=20).state == "done"
    with pytest.raises(jobs.JobError, match="finished its 2 epochs"):
        jobs.resume(ws, run, argv=fake_argv(ws, "z1", "quick"))


# ----------------------------------------------------------------------------- the real thing

@pytest.mark.slow
def test_real_train_job_and_resume(ws, cleanup):
    from test_evaluate import make_tiny_workspace

    make_tiny_workspace(ws, (1, 3))
    params = TrainConfig(levels=[1, 3], backbone="resnet18", weights="none", epochs=1, batch_size=8,
                         lr=0.001, image_size=32, workers=0, max_steps=1)
    run = jobs.launch(ws, params, "real")
    cleanup.append(run)
    assert Run(run).status()["state"] in ("queued", "running")
    info = jobs.wait(run, timeout=300)
    assert info.state == "done", Run(run).tail() + "\n" + (run / "console.txt").read_text()[-2000:]
    assert info.progress == 1.0
    for f in ("config.json", "meta.json", "model.safetensors", "metrics.jsonl", "log.txt"):
        assert (run / f).exists(), f
    meta = json.loads((run / "meta.json").read_text())
    assert set(meta["temperatures"]) == {"1", "3"}
    assert meta["calibration"]["split"] == "val"  # train.py calibrates through pipeline.evaluate
    # train longer: resume with 2 epochs
    jobs.resume(ws, run, epochs=2)
    info = jobs.wait(run, timeout=300)
    assert info.state == "done" and info.epochs == 2, Run(run).tail()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    # then the CLI evaluates it on its test split
    from pipeline.cli import main

    assert main(["evaluate", "real", "--no-calibrate"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["images"] == 6 and ev["geo"]["point"] == "cell_positions" and ev["geo"]["rule"] == "hierarchical"
