"""The run directory: the one module that knows its file names, its states and its listing.

A training run is a folder under the workspace's models directory::

    models/<run>/
      config.json              the resolved training configuration (+ hierarchy hash)
      status.json              state queued|running|done|failed|cancelled, epoch, progress, ETA
      log.txt                  what the run said
      metrics.jsonl            one JSON object per epoch
      model.safetensors        the weights
      meta.json                architecture, class lists, preprocessing, temperatures
      train_state.safetensors  optimizer moments   } for --resume
      train_state.json         counters, schedules }
      eval.json                the latest evaluation report
      split.safetensors        the image ids of its train/val/test split (geohier.splits)
      job.json / console.txt   the background job's process record and its output

Every reader and writer of these goes through :class:`Run`; listing (every run, finished
runs newest first, per-level sets) and resolving a name or a path go through the
functions below. Nothing else spells the file names.

>>> import tempfile
>>> r = Run(Path(tempfile.mkdtemp()) / "demo")
>>> r.write_status({"state": "running", "epoch": 1})
>>> r.state, r.is_finished()
('running', False)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from geohier.errors import WorkspaceError
from geohier.workspace import atomic_write_text, read_json

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
STATE_TENSORS_FILE = "train_state.safetensors"
STATE_JSON_FILE = "train_state.json"
EVAL_FILE = "eval.json"
JOB_FILE = "job.json"
CONSOLE_FILE = "console.txt"
# runs with embeddings (frozen backbones): the training images' embeddings, positions and
# finest classes, for retrieval refinement (geohier.refine)
NEIGHBOURS_FILE = "neighbours.safetensors"
# a frozen run's backbone weights (a hard link to the embedding cache's copy where possible)
BACKBONE_FILE = "backbone.safetensors"
# the image ids of the train/val/test split the run trained on (geohier.splits)
SPLIT_FILE = "split.safetensors"

ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("done", "failed", "cancelled")

NO_RUN_HELP = ("no finished run in {models}: train one with `python -m pipeline train` (or the Train page); "
               "`make run` builds the demo data and trains the small demo model")


def _dump(data) -> str:
    return json.dumps(data, indent=1) + "\n"


def require_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``, or a WorkspaceError naming the file."""
    try:
        d = json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkspaceError(f"cannot read {path}: {exc}") from None
    if not isinstance(d, dict):
        raise WorkspaceError(f"{path} is not a JSON object")
    return d


@dataclass(frozen=True)
class Run:
    """One run directory. Cheap to make: nothing is read until asked for."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------ files

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def status_path(self) -> Path:
        return self.path / STATUS_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    @property
    def state_tensors_path(self) -> Path:
        return self.path / STATE_TENSORS_FILE

    @property
    def state_json_path(self) -> Path:
        return self.path / STATE_JSON_FILE

    @property
    def eval_path(self) -> Path:
        return self.path / EVAL_FILE

    @property
    def job_path(self) -> Path:
        return self.path / JOB_FILE

    @property
    def console_path(self) -> Path:
        return self.path / CONSOLE_FILE

    @property
    def neighbours_path(self) -> Path:
        return self.path / NEIGHBOURS_FILE

    @property
    def backbone_path(self) -> Path:
        return self.path / BACKBONE_FILE

    @property
    def split_path(self) -> Path:
        return self.path / SPLIT_FILE

    # ------------------------------------------------------------------ what it is

    def is_run(self) -> bool:
        """A folder with a config, a model or a status (a queued run has only the last)."""
        return self.path.is_dir() and any(p.exists() for p in (self.config_path, self.meta_path, self.status_path))

    def has_model(self) -> bool:
        return self.meta_path.is_file() and self.weights_path.is_file()

    def has_train_state(self) -> bool:
        return self.state_json_path.is_file() and self.state_tensors_path.is_file()

    def is_finished(self) -> bool:
        """Weights and meta.json exist and the status (when there is one) says done."""
        if not self.has_model():
            return False
        return self.status().get("state") in (None, "done")

    @property
    def state(self) -> str:
        """The recorded state; a run without status.json but with a model is done."""
        return self.status().get("state") or ("done" if self.meta_path.exists() else "unknown")

    def stamp(self) -> float:
        """When the model was last written (0 without one): orders runs newest first."""
        try:
            return max(self.meta_path.stat().st_mtime, self.weights_path.stat().st_mtime)
        except OSError:
            return 0.0

    def key(self) -> tuple:
        """A hashable stamp of the model files (path, mtimes, sizes): a retrained run gets a
        new key, so caches keyed by it reload."""
        stamp = []
        for f in (self.meta_path, self.weights_path):
            try:
                st = f.stat()
                stamp.append((st.st_mtime_ns, st.st_size))
            except OSError:
                stamp.append(None)
        return (str(self.path.resolve()), tuple(stamp))

    def mtime(self, name: str) -> float:
        """A file's modification time (0 when missing): a cache key for pages."""
        try:
            return self.file(name).stat().st_mtime
        except OSError:
            return 0.0

    # ------------------------------------------------------------------ JSON documents

    def status(self) -> dict:
        return read_json(self.status_path)

    def write_status(self, status: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.status_path, _dump(status))

    def config(self) -> dict:
        return read_json(self.config_path)

    def write_config(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, _dump(config))

    def require_config(self) -> dict:
        return require_json(self.config_path)

    def meta(self) -> dict:
        """meta.json as it is ({} when missing); ``geohier.model.read_meta`` checks it."""
        return read_json(self.meta_path)

    def write_meta(self, meta: dict) -> None:
        atomic_write_text(self.meta_path, _dump(meta))

    def job(self) -> dict:
        return read_json(self.job_path)

    def write_job(self, job: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.job_path, _dump(job))

    def eval(self) -> dict | None:
        """eval.json, or None when there is none (or it is unreadable)."""
        return read_json(self.eval_path) or None

    def write_eval(self, result: dict) -> None:
        atomic_write_text(self.eval_path, _dump(result))

    def train_state(self) -> dict:
        return require_json(self.state_json_path)

    def write_train_state(self, doc: dict) -> None:
        atomic_write_text(self.state_json_path, _dump(doc))

    # ------------------------------------------------------------------ metrics history

    def history(self) -> list[dict]:
        """metrics.jsonl's records by epoch (unreadable lines skipped; of an epoch that a
        resumed run repeated, the last)."""
        try:
            lines = self.metrics_path.read_text("utf-8").splitlines()
        except OSError:
            return []
        by_epoch = {}
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "epoch" in rec:
                by_epoch[int(rec["epoch"])] = rec
        return [by_epoch[e] for e in sorted(by_epoch)]

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, epochs_done: int) -> None:
        """Drop the records of epochs after ``epochs_done`` (a resumed run redoes them)."""
        if not self.metrics_path.exists():
            return
        keep = [r for r in self.history() if int(r["epoch"]) <= epochs_done]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))

    # ------------------------------------------------------------------ log

    def append_log(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of log.txt, else of the job's console output."""
        got = tail_file(self.log_path, lines) or tail_file(self.console_path, lines)
        return "\n".join(got)


def tail_file(path: str | os.PathLike, lines: int, max_bytes: int = 256_000) -> list[str]:
    """The last non-empty lines of a text file ([] when missing); of a line that tqdm
    redrew with carriage returns, its last drawing."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    out = [ln.rsplit("\r", 1)[-1].rstrip() for ln in data.split("\n")]  # not splitlines: it splits at \r
    out = [ln for ln in out if ln]
    return out[-lines:] if lines > 0 else []


# ---------------------------------------------------------------------- listing, resolving


def list_runs(models_dir: str | os.PathLike) -> list[Run]:
    """Every run under ``models_dir`` (queued ones too), by name."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    runs = (Run(p) for p in models_dir.iterdir() if p.is_dir())
    return sorted((r for r in runs if r.is_run()), key=lambda r: r.name)


def finished_runs(models_dir: str | os.PathLike) -> list[Run]:
    """Finished runs under ``models_dir``, newest model first."""
    runs = [r for r in list_runs(models_dir) if r.is_finished()]
    return sorted(runs, key=lambda r: (r.stamp(), r.name), reverse=True)


def newest_run(models_dir: str | os.PathLike) -> Run:
    """The most recently finished run, or a WorkspaceError saying how to train one."""
    runs = finished_runs(models_dir)
    if not runs:
        raise WorkspaceError(NO_RUN_HELP.format(models=models_dir))
    return runs[0]


def resolve_run(models_dir: str | os.PathLike, run: str | os.PathLike | Run) -> Run:
    """A run from a directory path or a run name under ``models_dir``; a WorkspaceError
    naming both places when it is neither."""
    if isinstance(run, Run):
        return run
    p = Path(run).expanduser()
    if p.is_dir():
        return Run(p.resolve())
    q = Path(models_dir) / str(run)
    if str(run) and q.is_dir():
        return Run(q)
    raise WorkspaceError(f"no run {str(run)!r}: neither a directory nor a run in {models_dir}")


@dataclass(frozen=True)
class RunChoice:
    """One entry of a run selector: a multi-level run, or a per-level set (``config.group``)."""

    label: str
    runs: tuple[Path, ...]


def run_choices(models_dir: str | os.PathLike) -> list[RunChoice]:
    """Finished runs newest first, after the per-level sets: single-level runs sharing a
    ``config.group`` with distinct levels (the seed's one-model-per-level shape)."""
    singles, groups = [], {}
    for run in finished_runs(models_dir):
        meta = run.meta()
        try:
            levels = [int(v) for v in meta["arch"]["levels"]]
        except (KeyError, TypeError, ValueError):
            continue
        singles.append(RunChoice(f"{run.name} (levels {','.join(map(str, levels))})", (run.path,)))
        group = (meta.get("config") or {}).get("group")
        if group and len(levels) == 1:
            groups.setdefault((str(group), meta.get("hierarchy_hash")), {}).setdefault(levels[0], run.path)
    sets = [RunChoice(f"set {g} (levels {','.join(map(str, sorted(by)))})",
                      tuple(by[lv] for lv in sorted(by)))
            for (g, _), by in groups.items() if len(by) > 1]
    return sets + singles


def runs_key(runs: Iterable[str | os.PathLike | Run]) -> tuple:
    """``Run.key`` of several runs: the cache key of a predictor built from them."""
    return tuple(Run(r).key() if not isinstance(r, Run) else r.key() for r in runs)


def as_runs(runs: str | os.PathLike | Run | Sequence) -> list[Run]:
    """One run or several, as Run objects."""
    if isinstance(runs, (str, os.PathLike, Run)):
        runs = [runs]
    return [r if isinstance(r, Run) else Run(Path(r)) for r in runs]


# ---------------------------------------------------------------------- processes


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None when there is none.
    Recorded beside a pid so that a reused pid is not taken for the same process."""
    import psutil

    try:
        return psutil.Process(int(pid)).create_time()
    except (psutil.Error, ValueError, TypeError):
        return None


def pid_alive(pid: int | None, start_time: float | None = None) -> bool:
    """Whether ``pid`` is a live process (not a zombie) and, when ``start_time`` is given,
    the same process that started then (pids are reused). Without a start time, a process
    whose command line does not run the pipeline is taken for another program."""
    import psutil

    if not pid or int(pid) <= 0:
        return False
    try:
        p = psutil.Process(int(pid))
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if start_time is not None:
            try:
                return abs(p.create_time() - float(start_time)) < 1.0
            except (TypeError, ValueError):
                return False
        cmd = " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return False  # someone else's process: not ours
    return any(w in cmd for w in ("pipeline", "torchrun", "train"))


def training_pid(run: Run) -> tuple[int | None, float | None]:
    """The process training ``run``: the background job's (job.json, with its start time,
    or the job record of the per-level set it belongs to), else the pid train wrote."""
    job = run.job()
    if not job:
        group = run.config().get("group")
        if group:
            job = Run(run.path.parent / str(group)).job()
    if job.get("pid"):
        return int(job["pid"]), job.get("start_time")
    pid = run.status().get("pid")
    return (int(pid), None) if pid else (None, None)


def is_training(run: Run) -> bool:
    """A run whose status is queued/running and whose training process still lives."""
    if run.status().get("state") not in ACTIVE_STATES:
        return False
    return pid_alive(*training_pid(run))
