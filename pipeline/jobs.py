"""Background training jobs for the dashboard: launch, list, tail, cancel, resume.

A job is ``python -m pipeline --data D --models M train ... --run-name NAME`` started as
its own process group (``start_new_session``) from an argv built out of validated
parameters (never a shell string). Everything about a job lives in its run directory,
so jobs survive a dashboard restart::

    models/<run>/status.json   state, progress, ETA (queued here, then train.py's)
                 job.json      pid / process group / process start time / argv of the job
                 console.txt   the process's stdout + stderr (tracebacks, tqdm)
                 log.txt       train.py's own log

A job whose process is gone (or whose pid now belongs to another program) while its
status still says queued/running is reported as ``failed``, with its last log lines, and
that verdict is written back to status.json. At most ``max_jobs()`` jobs run at once
(``GEOHIER_MAX_JOBS``; default 1 on a CPU machine, one per GPU otherwise).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from geohier import grid
from geohier.errors import GeohierError, InputError, WorkspaceError
from geohier.workspace import Workspace, atomic_write_text, read_json, utcnow

REPO_ROOT = Path(__file__).resolve().parents[1]
ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("done", "failed", "cancelled")
STATUS_FILE, JOB_FILE, CONSOLE_FILE, LOG_FILE = "status.json", "job.json", "console.txt", "log.txt"
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
WEIGHT_CHOICES = ("none", "imagenet")

# Popen objects of the jobs this process started: polled so that finished children are
# reaped (a zombie still answers kill(pid, 0)). Jobs from an earlier dashboard are not
# our children; /proc tells whether they live.
_CHILDREN: dict[int, subprocess.Popen] = {}
_LOCK = threading.Lock()


class JobError(GeohierError):
    """A job cannot be launched, cancelled or resumed (the message says why)."""


# ----------------------------------------------------------------------------- parameters

def _backbones() -> tuple[str, ...]:
    try:
        from geohier.model import BACKBONES
        return tuple(BACKBONES)
    except ImportError:  # pragma: no cover - model.py is part of the package
        return ("resnet50", "resnet18", "resnet34", "mobilenet_v3_large", "efficientnet_b0",
                "convnext_tiny")


@dataclass
class TrainParams:
    """What the Train page's form (or a caller) asks of ``pipeline train``.

    ``levels`` is a comma list ("1,3,5,8") or a sequence of ints; ``haversine_tau`` 0
    switches haversine label smoothing off; ``weights`` is none, imagenet or a local
    .safetensors path.
    """

    levels: str | tuple[int, ...] = "1,3,5,8"
    per_level: bool = False
    backbone: str = "resnet18"
    weights: str = "none"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    image_size: int = 96
    label_smoothing: float = 0.0
    haversine_tau: float = 0.0
    balanced: bool = False
    workers: int | None = None  # data-loading processes (None: train.py's default)
    max_steps: int | None = None  # steps per epoch (quick runs, tests; None: whole epochs)

    def levels_tuple(self) -> tuple[int, ...]:
        if isinstance(self.levels, str):
            return grid.parse_levels(self.levels)
        return grid.check_levels(self.levels)


def validate(params: TrainParams, available_levels: tuple[int, ...] | None = None) -> dict[str, str]:
    """Field name -> message for each unusable parameter (empty when all are fine).

    ``available_levels``: the levels of the workspace's hierarchy.json, when known; a level
    outside it is refused (train.py can only train levels that have classes).
    """
    errors: dict[str, str] = {}
    try:
        levels = params.levels_tuple()
        if not levels:
            errors["levels"] = "give at least one level, e.g. 1,3,5,8"
        elif available_levels is not None:
            missing = [lv for lv in levels if lv not in available_levels]
            if missing:
                errors["levels"] = (f"level(s) {missing} are not in hierarchy.json (it has "
                                    f"{', '.join(map(str, available_levels))}); rebuild labels or pick those")
    except (GeohierError, ValueError, TypeError) as exc:
        errors["levels"] = f"{exc}"
    if params.backbone not in _backbones():
        errors["backbone"] = f"unknown backbone {params.backbone!r}; choose one of {', '.join(_backbones())}"
    w = str(params.weights).strip()
    if w not in WEIGHT_CHOICES:
        if not w.endswith(".safetensors"):
            errors["weights"] = f"weights {w!r}: use none, imagenet or a .safetensors file path"
        elif not Path(w).expanduser().is_file():
            errors["weights"] = f"weights file {w} does not exist"

    def check_int(name, lo, hi):
        v = getattr(params, name)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            errors[name] = f"{name.replace('_', ' ')} must be an integer in [{lo}, {hi}], got {v!r}"

    def check_float(name, lo, hi, lo_open=False):
        v = getattr(params, name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
        ok = ok and (lo < v if lo_open else lo <= v) and v <= hi
        if not ok:
            br = "(" if lo_open else "["
            errors[name] = f"{name.replace('_', ' ')} must be a number in {br}{lo}, {hi}], got {v!r}"

    check_int("epochs", 1, 1000)
    check_int("batch_size", 1, 4096)
    check_int("image_size", 16, 1024)
    check_float("lr", 0.0, 10.0, lo_open=True)
    check_float("label_smoothing", 0.0, 0.99)
    check_float("haversine_tau", 0.0, 20000.0)
    if params.workers is not None:
        check_int("workers", 0, 64)
    if params.max_steps is not None:
        check_int("max_steps", 1, 10**9)
    return errors


def train_argv(ws: Workspace, params: TrainParams, run_name: str) -> list[str]:
    """The argv of ``pipeline train`` for validated ``params`` (no shell involved)."""
    levels = ",".join(str(v) for v in params.levels_tuple())
    argv = [sys.executable, "-m", "pipeline", "--data", str(ws.data_dir), "--models", str(ws.models_dir),
            "train", "--run-name", run_name, "--levels", levels,
            "--backbone", params.backbone, "--weights", str(params.weights).strip(),
            "--epochs", str(int(params.epochs)), "--batch-size", str(int(params.batch_size)),
            "--lr", repr(float(params.lr)), "--image-size", str(int(params.image_size)),
            "--label-smoothing", repr(float(params.label_smoothing)),
            "--haversine-tau", repr(float(params.haversine_tau))]
    if params.per_level:
        argv.append("--per-level")
    if params.balanced:
        argv.append("--balanced")
    if params.workers is not None:
        argv += ["--workers", str(int(params.workers))]
    if params.max_steps is not None:
        argv += ["--max-steps", str(int(params.max_steps))]
    return argv


def resume_argv(ws: Workspace, run_dir: Path, epochs: int | None = None) -> list[str]:
    argv = [sys.executable, "-m", "pipeline", "--data", str(ws.data_dir), "--models", str(ws.models_dir),
            "train", "--resume", str(run_dir)]
    if epochs is not None:
        argv += ["--epochs", str(int(epochs))]
    return argv


def default_run_name(params: TrainParams) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{params.backbone}-{stamp}"


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
    try:
        import torch
        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch / no driver: a CPU machine
        return 1


# ----------------------------------------------------------------------------- files

def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def read_status(run_dir: str | os.PathLike) -> dict:
    """A run's status.json ({} when missing or unreadable)."""
    return read_json(Path(run_dir) / STATUS_FILE)


def _tail_file(path: Path, lines: int, max_bytes: int = 256_000) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    out = []
    for line in data.splitlines():
        # tqdm redraws with \r: keep the last drawing of each line
        line = line.rsplit("\r", 1)[-1].rstrip()
        if line:
            out.append(line)
    return out[-lines:] if lines > 0 else []


def tail_log(run_dir: str | os.PathLike, lines: int = 40) -> str:
    """The last ``lines`` lines of the run's log.txt, else of its console output."""
    run_dir = Path(run_dir)
    got = _tail_file(run_dir / LOG_FILE, lines)
    if not got:
        got = _tail_file(run_dir / CONSOLE_FILE, lines)
    return "\n".join(got)


# ----------------------------------------------------------------------------- processes

def _proc_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (clock ticks since boot), or None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 2 (comm) may contain spaces: split after its closing parenthesis
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None  # field 22 overall


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[0]


def _reap() -> None:
    with _LOCK:
        for pid, p in list(_CHILDREN.items()):
            if p.poll() is not None:
                del _CHILDREN[pid]


def pid_alive(pid: int | None, start_time: str | None = None) -> bool:
    """Whether ``pid`` is a live process (not a zombie), and the same process as the one
    that started at ``start_time`` when that is given (pids are reused)."""
    if not pid or int(pid) <= 0:
        return False
    pid = int(pid)
    _reap()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process: not our job
    state = _proc_state(pid)
    if state == "Z":
        return False
    if start_time is not None:
        now = _proc_start_time(pid)
        if now is not None and now != str(start_time):
            return False
    elif not _looks_like_training(pid):
        return False
    return True


def _looks_like_training(pid: int) -> bool:
    """Without a recorded start time (a run started outside the dashboard), a pid whose
    command line is not python running the pipeline was reused by another program."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust kill(pid, 0)
    text = b" ".join(cmd)
    return b"pipeline" in text or b"torchrun" in text or b"train" in text


def _job_pid(run_dir: Path, status: dict, job: dict) -> tuple[int | None, str | None]:
    """The job's process: job.json when a dashboard launched it, else train.py's pid."""
    if job.get("pid"):
        return int(job["pid"]), job.get("start_time")
    pid = status.get("pid")
    return (int(pid), None) if pid else (None, None)


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


def _is_run_dir(p: Path) -> bool:
    return p.is_dir() and any((p / f).exists() for f in ("config.json", "meta.json", STATUS_FILE))


def run_dirs(ws: Workspace) -> list[Path]:
    """Run directories under models/ (also those only queued: status.json, no config yet)."""
    if not ws.models_dir.is_dir():
        return []
    return sorted((p for p in ws.models_dir.iterdir() if _is_run_dir(p)), key=lambda p: p.name)


def job_info(run_dir: str | os.PathLike, log_lines: int = 20) -> JobInfo:
    """State of one run, checking that an active one still has its process.

    A run whose status says queued/running but whose process is gone is marked failed on
    disk (error: the last log lines), unless a cancel was requested (then cancelled)."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    job = read_json(run_dir / JOB_FILE)
    config = read_json(run_dir / "config.json")
    if not job and config.get("group"):
        # one run of a per-level set: the set's directory holds the job's process record
        job = read_json(run_dir.parent / str(config["group"]) / JOB_FILE)
    state = status.get("state") or ("done" if (run_dir / "meta.json").exists() else "unknown")
    pid, start = _job_pid(run_dir, status, job)
    alive = pid_alive(pid, start)
    if state in ACTIVE_STATES and not alive:
        status = read_status(run_dir)  # it may have finished between the two reads
        state = status.get("state", state)
        if state in ACTIVE_STATES:
            status = _mark_dead(run_dir, status, job, log_lines)
            state = status["state"]
    progress = status.get("progress")
    if progress is None and status.get("epochs"):
        progress = (status.get("epoch") or 0) / max(1, status["epochs"])
    if state == "done":
        progress = 1.0
    levels = config.get("levels") or job.get("levels") or []
    if isinstance(levels, str):
        levels = [int(v) for v in levels.split(",") if v.strip()]
    return JobInfo(name=run_dir.name, path=str(run_dir), state=state,
                   progress=float(min(1.0, max(0.0, progress or 0.0))),
                   epoch=status.get("epoch"), epochs=status.get("epochs") or config.get("epochs"),
                   eta_s=status.get("eta_s") if state in ACTIVE_STATES else None,
                   error=status.get("error"), pid=pid, alive=alive,
                   updated_at=status.get("updated_at"),
                   backbone=config.get("backbone") or job.get("backbone"), levels=list(levels))


def _mark_dead(run_dir: Path, status: dict, job: dict, log_lines: int) -> dict:
    status = dict(status)
    code = None
    with _LOCK:
        p = _CHILDREN.get(int(job.get("pid") or 0))
    if p is not None:
        code = p.poll()
    if job.get("cancel_requested_at"):
        status.update(state="cancelled", error=None)
    else:
        tail = tail_log(run_dir, log_lines)
        console = "\n".join(_tail_file(run_dir / CONSOLE_FILE, log_lines))
        if console and console not in tail:
            tail = (tail + "\n" + console).strip()
        why = "the training process ended without finishing" + (f" (exit status {code})" if code is not None else "")
        status.update(state="failed", error=why + (":\n" + tail if tail else ""))
    status["eta_s"] = None
    status["updated_at"] = utcnow()
    _write_json(run_dir / STATUS_FILE, status)
    return status


def list_jobs(ws: Workspace) -> list[JobInfo]:
    """Every run of the workspace with its state, newest activity first."""
    infos = [job_info(p) for p in run_dirs(ws)]
    infos.sort(key=lambda j: (j.state not in ACTIVE_STATES, -_mtime(Path(j.path))))
    return infos


def _mtime(p: Path) -> float:
    try:
        return (p / STATUS_FILE).stat().st_mtime
    except OSError:
        return p.stat().st_mtime if p.exists() else 0.0


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


def _spawn(run_dir: Path, argv: list[str], extra_job: dict) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with open(run_dir / CONSOLE_FILE, "ab") as console:
        proc = subprocess.Popen(argv, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                close_fds=True)
    with _LOCK:
        _CHILDREN[proc.pid] = proc
    job = {"pid": proc.pid, "pgid": proc.pid, "start_time": _proc_start_time(proc.pid),
           "argv": argv, "started_at": utcnow(), **extra_job}
    _write_json(run_dir / JOB_FILE, job)
    return proc


def launch(ws: Workspace, params: TrainParams, run_name: str | None = None, *,
           limit: int | None = None, argv: list[str] | None = None) -> Path:
    """Start a training job in the background; returns its run directory at once.

    The run directory is created first with status "queued" (so lists show it before the
    process has imported torch). Raises InputError for bad parameters (every field's
    message), WorkspaceError without hierarchy.json, JobError over the concurrency limit or
    for a run name in use. ``argv`` replaces the train command (tests)."""
    available = None
    if argv is None:
        if not ws.hierarchy_path.exists():
            raise WorkspaceError(f"no label hierarchy at {ws.hierarchy_path}: run `python -m pipeline labels` first")
        available = _hierarchy_levels(ws)
    errors = validate(params, available)
    if errors:
        raise InputError("; ".join(f"{k}: {v}" for k, v in errors.items()))
    run_name = (run_name or "").strip() or default_run_name(params)
    if not RUN_NAME_RE.match(run_name):
        raise InputError(f"run name {run_name!r}: use letters, digits, '.', '_' or '-' (at most 80)")
    _check_capacity(ws, limit)
    run_dir = ws.models_dir / run_name
    ws.models_dir.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise JobError(f"a run named {run_name!r} already exists in {ws.models_dir}; pick another name") from None
    _write_json(run_dir / STATUS_FILE, {
        "state": "queued", "epoch": 0, "epochs": int(params.epochs), "step": 0, "steps": None,
        "progress": 0.0, "eta_s": None, "error": None, "pid": None, "updated_at": utcnow()})
    cmd = argv if argv is not None else train_argv(ws, params, run_name)
    _spawn(run_dir, cmd, {"backbone": params.backbone, "levels": list(params.levels_tuple()),
                          "params": asdict(params)})
    return run_dir


def _hierarchy_levels(ws: Workspace) -> tuple[int, ...] | None:
    d = read_json(ws.hierarchy_path)
    levels = d.get("levels")
    return tuple(int(v) for v in levels) if levels else None


def resume(ws: Workspace, run_dir: str | os.PathLike, *, epochs: int | None = None,
           limit: int | None = None, argv: list[str] | None = None) -> Path:
    """Continue a cancelled or failed run in the background (``train --resume RUN_DIR``)
    from its last saved epoch; ``epochs`` raises its epoch count (which also lets a
    finished run train longer)."""
    run_dir = Path(run_dir)
    info = job_info(run_dir)
    if info.state in ACTIVE_STATES:
        raise JobError(f"run {run_dir.name} is still {info.state}; cancel it before resuming")
    if info.alive:
        raise JobError(f"run {run_dir.name}'s process is still finishing (saving, calibrating); "
                       "try again in a moment")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= 1000):
        raise InputError(f"epochs must be an integer in [1, 1000], got {epochs!r}")
    done_epochs = info.epochs or 0
    if info.state == "done" and (epochs is None or epochs <= done_epochs):
        raise JobError(f"run {run_dir.name} has finished its {done_epochs} epochs; resume with more epochs "
                       "to train it longer")
    if argv is None and not (run_dir / "config.json").exists():
        raise JobError(f"run {run_dir.name} has no config.json (it never started); launch a new run instead")
    _check_capacity(ws, limit)
    status = read_status(run_dir)
    status.update(state="queued", error=None, eta_s=None, updated_at=utcnow())
    if epochs is not None:
        status["epochs"] = int(epochs)
    _write_json(run_dir / STATUS_FILE, status)
    old = read_json(run_dir / JOB_FILE)
    cmd = argv if argv is not None else resume_argv(ws, run_dir, epochs)
    _spawn(run_dir, cmd, {"backbone": old.get("backbone"), "levels": old.get("levels", []),
                          "params": old.get("params", {}), "resumed": True})
    return run_dir


def cancel(run_dir: str | os.PathLike, grace_s: float = 10.0, wait: bool = False) -> str:
    """Ask a running job to stop: SIGTERM to its process group (train.py saves and ends as
    cancelled), SIGKILL after ``grace_s`` seconds if it is still there. Returns the state.

    With ``wait`` the call blocks until the process is gone; otherwise a daemon thread
    escalates. A job whose process is already gone is marked cancelled."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    job = read_json(run_dir / JOB_FILE)
    state = status.get("state")
    if state not in ACTIVE_STATES:
        raise JobError(f"run {run_dir.name} is {state or 'not a job'}; only queued or running jobs can be cancelled")
    pid, start = _job_pid(run_dir, status, job)
    job["cancel_requested_at"] = utcnow()
    if not job.get("pid") and pid:
        job["pid"] = pid
    _write_json(run_dir / JOB_FILE, job)
    if not pid_alive(pid, start):
        return _finish_cancel(run_dir)
    # a dashboard job owns its process group (workers included); a run started from a
    # shell may share its group with the shell's pipeline: signal just its process then
    pgid = int(job["pgid"]) if job.get("pgid") else None
    _signal_group(pgid, pid, signal.SIGTERM)

    def escalate():
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not pid_alive(pid, start):
                break
            time.sleep(0.1)
        else:
            _signal_group(pgid, pid, signal.SIGKILL)
            end = time.monotonic() + 5
            while pid_alive(pid, start) and time.monotonic() < end:
                time.sleep(0.05)
        _finish_cancel(run_dir)

    if wait:
        escalate()
        return read_status(run_dir).get("state", "cancelled")
    threading.Thread(target=escalate, name=f"cancel-{run_dir.name}", daemon=True).start()
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


def _finish_cancel(run_dir: Path) -> str:
    """After the process is gone: a run that did not record its own end is cancelled."""
    status = read_status(run_dir)
    if status.get("state") in ACTIVE_STATES:
        status.update(state="cancelled", eta_s=None, updated_at=utcnow())
        _write_json(run_dir / STATUS_FILE, status)
    return status.get("state", "cancelled")


def wait(run_dir: str | os.PathLike, timeout: float = 600.0, poll_s: float = 0.2) -> JobInfo:
    """Block until the job leaves queued/running and its process has exited (train.py
    marks a run done, then calibrates it), or ``timeout`` s pass; its JobInfo."""
    end = time.monotonic() + timeout
    info = job_info(run_dir)
    while (info.state in ACTIVE_STATES or info.alive) and time.monotonic() < end:
        time.sleep(poll_s)
        info = job_info(run_dir)
    return info
