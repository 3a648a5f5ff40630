"""Background training jobs for the dashboard: launch, list, cancel, resume, wait.

A job is ``python -m pipeline --data D --models M train ... --run-name NAME`` started as its
own process group (``start_new_session``) from an argv built out of a validated
TrainConfig (``pipeline.train.to_argv``; never a shell string). This module only starts and
stops processes: everything about a job lives in its run directory, read and written
through ``geohier.runs.Run`` (status queued here, then train's; the job record: pid, process
group, process start time and argv; the console: the process's stdout + stderr), so jobs
survive a dashboard restart.

A job whose process is gone (or whose pid now belongs to another program: psutil's start
time tells) while its status still says queued/running is reported as ``failed``, with its
last log lines, and that verdict is written back to its status. At most ``max_jobs()``
jobs run at once (``GEOHIER_MAX_JOBS``; default 1 on a CPU machine, one per GPU otherwise).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from geohier.errors import GeohierError, InputError, WorkspaceError
from geohier.runs import (
    ACTIVE_STATES,
    FINAL_STATES,
    Run,
    list_runs,
    pid_alive,
    process_start_time,
    tail_file,
    training_pid,
)
from geohier.workspace import Workspace, read_json, utcnow
from pipeline.train.config import TrainConfig, format_errors, job_run_name, to_argv, validate

__all__ = ["ACTIVE_STATES", "FINAL_STATES", "JobError", "JobInfo", "active_jobs", "cancel", "job_info", "launch",
           "list_jobs", "max_jobs", "resume", "resume_argv", "train_argv", "wait"]

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_RESUME_EPOCHS = 10_000

# Popen objects of the jobs this process started: polled so that finished children are
# reaped (until then they are zombies) and their exit status can be reported.
_CHILDREN: dict[int, subprocess.Popen] = {}
_LOCK = threading.Lock()


class JobError(GeohierError):
    """A job cannot be launched, cancelled or resumed (the message says why)."""


# ----------------------------------------------------------------------------- commands


def _pipeline(ws: Workspace) -> list[str]:
    return [sys.executable, "-m", "pipeline", "--data", str(ws.data_dir), "--models", str(ws.models_dir)]


def train_argv(ws: Workspace, config: TrainConfig, run_name: str) -> list[str]:
    """The argv of ``pipeline train`` for a validated ``config`` (no shell involved)."""
    return [*_pipeline(ws), "train", *to_argv(replace(config, run_name=run_name))]


def resume_argv(ws: Workspace, run_dir: Path, epochs: int | None = None) -> list[str]:
    argv = [*_pipeline(ws), "train", "--resume", str(run_dir)]
    if epochs is not None:
        argv += ["--epochs", str(int(epochs))]
    return argv


def max_jobs() -> int:
    """How many jobs may run at once: $GEOHIER_MAX_JOBS, else 1 per GPU (1 on CPU)."""
    env = os.environ.get("GEOHIER_MAX_JOBS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise InputError(f"GEOHIER_MAX_JOBS must be an integer, got {env!r}") from None
        if n < 1:
            raise InputError(f"GEOHIER_MAX_JOBS must be >= 1, got {n}")
        return n
    import torch

    return max(1, torch.cuda.device_count())


# ----------------------------------------------------------------------------- listing


@dataclass
class JobInfo:
    """One run as the Train page shows it."""

    name: str
    path: str
    state: str
    progress: float = 0.0
    epoch: int | None = None
    epochs: int | None = None
    eta_s: float | None = None
    error: str | None = None
    pid: int | None = None
    alive: bool = False
    updated_at: str | None = None
    backbone: str | None = None
    levels: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _reap() -> None:
    with _LOCK:
        for pid, p in list(_CHILDREN.items()):
            if p.poll() is not None:
                del _CHILDREN[pid]


def _alive(pid: int | None, start_time) -> bool:
    _reap()  # a finished child of ours is a zombie until polled
    return pid_alive(pid, start_time)


def job_info(run_dir: str | os.PathLike | Run, log_lines: int = 20) -> JobInfo:
    """State of one run, checking that an active one still has its process.

    A run whose status says queued/running but whose process is gone is marked failed on
    disk (error: the last log lines), unless a cancel was requested (then cancelled)."""
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    status, config = run.status(), run.config()
    job = _job_record(run)
    state = run.state
    pid, start = training_pid(run)
    alive = _alive(pid, start)
    if state in ACTIVE_STATES and not alive:
        status = run.status()  # it may have finished between the two reads
        state = status.get("state", state)
        if state in ACTIVE_STATES:
            status = _mark_dead(run, status, job, log_lines)
            state = status["state"]
    progress = status.get("progress")
    if progress is None and status.get("epochs"):
        progress = (status.get("epoch") or 0) / max(1, status["epochs"])
    if state == "done":
        progress = 1.0
    levels = config.get("levels") or job.get("levels") or []
    if isinstance(levels, str):
        levels = [int(v) for v in levels.split(",") if v.strip()]
    return JobInfo(name=run.name, path=str(run.path), state=state,
                   progress=float(min(1.0, max(0.0, progress or 0.0))),
                   epoch=status.get("epoch"), epochs=status.get("epochs") or config.get("epochs"),
                   eta_s=status.get("eta_s") if state in ACTIVE_STATES else None,
                   error=status.get("error"), pid=pid, alive=alive,
                   updated_at=status.get("updated_at"),
                   backbone=config.get("backbone") or job.get("backbone"), levels=list(levels))


def _job_record(run: Run) -> dict:
    """The job record of the run, or of the per-level set it belongs to."""
    job = run.job()
    group = run.config().get("group") if not job else None
    return Run(run.path.parent / str(group)).job() if group else job


def _mark_dead(run: Run, status: dict, job: dict, log_lines: int) -> dict:
    status = dict(status)
    code = None
    with _LOCK:
        p = _CHILDREN.get(int(job.get("pid") or 0))
    if p is not None:
        code = p.poll()
    if job.get("cancel_requested_at"):
        status.update(state="cancelled", error=None)
    else:
        tail = run.tail(log_lines)
        console = "\n".join(tail_file(run.console_path, log_lines))
        if console and console not in tail:
            tail = (tail + "\n" + console).strip()
        why = "the training process ended without finishing" + (f" (exit status {code})" if code is not None else "")
        status.update(state="failed", error=why + (":\n" + tail if tail else ""))
    status["eta_s"] = None
    status["updated_at"] = utcnow()
    run.write_status(status)
    return status


def list_jobs(ws: Workspace) -> list[JobInfo]:
    """Every run of the workspace with its state, active ones first, then newest activity."""
    runs = {str(r.path): r for r in list_runs(ws.models_dir)}
    infos = [job_info(r) for r in runs.values()]
    infos.sort(key=lambda j: (j.state not in ACTIVE_STATES, -_activity(runs[j.path])))
    return infos


def _activity(run: Run) -> float:
    return run.mtime(run.status_path.name) or run.mtime(".")


def active_jobs(ws: Workspace) -> list[JobInfo]:
    return [j for j in list_jobs(ws) if j.state in ACTIVE_STATES]


# ----------------------------------------------------------------------------- launching


def _check_capacity(ws: Workspace, limit: int | None) -> None:
    limit = max_jobs() if limit is None else int(limit)
    running = active_jobs(ws)
    if len(running) >= limit:
        names = ", ".join(j.name for j in running)
        raise JobError(f"{len(running)} job(s) already running ({names}); the limit is {limit} at once "
                       "(set GEOHIER_MAX_JOBS to change it). Wait, or cancel one.")


def _spawn(run: Run, argv: list[str], extra_job: dict) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    with open(run.console_path, "ab") as console:
        proc = subprocess.Popen(argv, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                close_fds=True)
    with _LOCK:
        _CHILDREN[proc.pid] = proc
    run.write_job({"pid": proc.pid, "pgid": proc.pid, "start_time": process_start_time(proc.pid),
                   "argv": argv, "started_at": utcnow(), **extra_job})
    return proc


def _hierarchy_levels(ws: Workspace) -> tuple[int, ...] | None:
    levels = read_json(ws.hierarchy_path).get("levels")
    return tuple(int(v) for v in levels) if levels else None


def launch(ws: Workspace, config: TrainConfig, run_name: str | None = None, *,
           limit: int | None = None, argv: list[str] | None = None) -> Path:
    """Start a training job in the background; returns its run directory at once.

    The run directory is created first with status "queued" (so lists show it before the
    process has imported torch). ``run_name`` (else ``config.run_name``, else backbone +
    time) names it. Raises InputError for bad parameters (every field's message, as the
    command line would print them), WorkspaceError without hierarchy.json, JobError over
    the concurrency limit or for a run name in use. ``argv`` replaces the train command (tests)."""
    available = None
    if argv is None:
        if not ws.hierarchy_path.exists():
            raise WorkspaceError(f"no label hierarchy at {ws.hierarchy_path}: run `python -m pipeline labels` first")
        available = _hierarchy_levels(ws)
    run_name = (run_name or config.run_name or "").strip() or job_run_name(config)
    config = replace(config, run_name=run_name)
    errors = validate(config, available)
    if errors:
        raise InputError(format_errors(errors))
    _check_capacity(ws, limit)
    run = Run(ws.models_dir / run_name)
    ws.models_dir.mkdir(parents=True, exist_ok=True)
    try:
        run.path.mkdir()
    except FileExistsError:
        raise JobError(f"a run named {run_name!r} already exists in {ws.models_dir}; pick another name") from None
    run.write_status({"state": "queued", "epoch": 0, "epochs": int(config.epochs), "step": 0, "steps": None,
                      "progress": 0.0, "eta_s": None, "error": None, "pid": None, "updated_at": utcnow()})
    cmd = argv if argv is not None else train_argv(ws, config, run_name)
    levels = list(config.levels) if config.levels else list(available or ())
    _spawn(run, cmd, {"backbone": config.backbone, "levels": levels, "params": config.to_dict()})
    return run.path


def resume(ws: Workspace, run_dir: str | os.PathLike, *, epochs: int | None = None,
           limit: int | None = None, argv: list[str] | None = None) -> Path:
    """Continue a cancelled or failed run in the background (``train --resume RUN_DIR``)
    from its last saved epoch; ``epochs`` raises its epoch count (which also lets a
    finished run train longer)."""
    run = Run(run_dir)
    info = job_info(run)
    if info.state in ACTIVE_STATES:
        raise JobError(f"run {run.name} is still {info.state}; cancel it before resuming")
    if info.alive:
        raise JobError(f"run {run.name}'s process is still finishing (saving, calibrating); "
                       "try again in a moment")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)
                               or not 1 <= epochs <= MAX_RESUME_EPOCHS):
        raise InputError(f"epochs must be an integer in [1, {MAX_RESUME_EPOCHS}], got {epochs!r}")
    done_epochs = info.epochs or 0
    if info.state == "done" and (epochs is None or epochs <= done_epochs):
        raise JobError(f"run {run.name} has finished its {done_epochs} epochs; resume with more epochs "
                       "to train it longer")
    if argv is None and not run.config_path.exists():
        raise JobError(f"run {run.name} has no config (it never started); launch a new run instead")
    _check_capacity(ws, limit)
    status = run.status()
    status.update(state="queued", error=None, eta_s=None, updated_at=utcnow())
    if epochs is not None:
        status["epochs"] = int(epochs)
    run.write_status(status)
    old = run.job()
    cmd = argv if argv is not None else resume_argv(ws, run.path, epochs)
    _spawn(run, cmd, {"backbone": old.get("backbone"), "levels": old.get("levels", []),
                      "params": old.get("params", {}), "resumed": True})
    return run.path


# ----------------------------------------------------------------------------- stopping


def cancel(run_dir: str | os.PathLike, grace_s: float = 10.0, wait: bool = False) -> str:
    """Ask a running job to stop: SIGTERM to its process group (train saves and ends as
    cancelled), SIGKILL after ``grace_s`` seconds if it is still there. Returns the state.

    With ``wait`` the call blocks until the process is gone; otherwise a daemon thread
    escalates. A job whose process is already gone is marked cancelled."""
    run = Run(run_dir)
    state = run.status().get("state")
    if state not in ACTIVE_STATES:
        raise JobError(f"run {run.name} is {state or 'not a job'}; only queued or running jobs can be cancelled")
    job = run.job()
    pid, start = training_pid(run)
    job["cancel_requested_at"] = utcnow()
    if not job.get("pid") and pid:
        job["pid"] = pid
    run.write_job(job)
    if not _alive(pid, start):
        return _finish_cancel(run)
    # a dashboard job owns its process group (workers included); a run started from a
    # shell may share its group with the shell's pipeline: signal just its process then
    pgid = int(job["pgid"]) if job.get("pgid") else None
    _signal_group(pgid, pid, signal.SIGTERM)

    def escalate():
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not _alive(pid, start):
                break
            time.sleep(0.1)
        else:
            _signal_group(pgid, pid, signal.SIGKILL)
            end = time.monotonic() + 5
            while _alive(pid, start) and time.monotonic() < end:
                time.sleep(0.05)
        _finish_cancel(run)

    if wait:
        escalate()
        return run.status().get("state", "cancelled")
    threading.Thread(target=escalate, name=f"cancel-{run.name}", daemon=True).start()
    return "cancelling"


def _signal_group(pgid: int | None, pid: int, sig: int) -> None:
    try:
        if pgid:
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _finish_cancel(run: Run) -> str:
    """After the process is gone: a run that did not record its own end is cancelled."""
    status = run.status()
    if status.get("state") in ACTIVE_STATES:
        status.update(state="cancelled", eta_s=None, updated_at=utcnow())
        run.write_status(status)
    return status.get("state", "cancelled")


def wait(run_dir: str | os.PathLike, timeout: float = 600.0, poll_s: float = 0.2) -> JobInfo:
    """Block until the job leaves queued/running and its process has exited (train marks
    a run done, then calibrates it), or ``timeout`` s pass; its JobInfo."""
    end = time.monotonic() + timeout
    info = job_info(run_dir)
    while (info.state in ACTIVE_STATES or info.alive) and time.monotonic() < end:
        time.sleep(poll_s)
        info = job_info(run_dir)
    return info
