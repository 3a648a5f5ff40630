"""Background tasks for the dashboard: build the demo world or fetch from Mapillary in a
thread of the server process, poll its progress, stop it.

A page keeps one ``TaskRunner`` per server process (``st.cache_resource``) so that a task
outlives the reruns that poll it; tasks are keyed by workspace and kind, and a second
start of a running task is ignored. A task's thread is named ``geohier-<kind>``. Nothing
secret is kept on a Task: a fetch's token lives only in the thread's arguments.

Training jobs are another matter (separate processes that survive the server):
``pipeline.jobs``.

>>> runner = TaskRunner()
>>> task = runner.start("ws:echo", "echo", lambda task, text: text.upper(), "done")
>>> task.join(10) and (task.state, task.result)
('done', 'DONE')
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from geohier.errors import GeohierError
from geohier.workspace import Workspace

RUNNING, DONE, FAILED, STOPPED = "running", "done", "failed", "stopped"
#: How long a finished task still shows on the page (seconds).
RECENT_S = 600.0


@dataclass
class Task:
    """One background task: what it is, how far it got, how it ended."""

    kind: str
    state: str = RUNNING  # running | done | failed | stopped
    done: int = 0
    total: int = 0
    detail: str = ""
    result: str = ""
    error: str = ""
    started: float = field(default_factory=time.time)
    stop: threading.Event = field(default_factory=threading.Event, repr=False)
    seen_end: bool = False  # the page reran once after the end (its numbers changed)
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def fraction(self) -> float:
        """Share done, in [0, 1] (0 while the total is unknown)."""
        return min(self.done / self.total, 1.0) if self.total else 0.0

    def label(self) -> str:
        """``"demo: 120 / 4,000"``, or ``"demo: starting ..."`` before the first progress."""
        return f"{self.kind}: {self.done:,} / {self.total:,}" if self.total else f"{self.kind}: starting ..."

    def progress(self, done: int, total: int) -> None:
        self.done, self.total = int(done), int(total)

    def cancel(self) -> None:
        """Ask the task to stop (a fetch cuts its requests in flight at once, also a blocked
        read, and logs the unfinished cells partial)."""
        self.stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True when the task has ended."""
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.running


class TaskRunner:
    """The tasks of one server process, by key (see the module doc)."""

    def __init__(self):
        self._tasks: dict[str, Task] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Task | None:
        return self._tasks.get(key)

    def start(self, key: str, kind: str, target: Callable[..., str], *args) -> Task:
        """Run ``target(task, *args)`` in a thread; its return value is the task's result.

        A GeohierError ends the task ``failed`` with its message; any other exception (a
        bug) too, with its type named. A task asked to stop ends ``stopped``. While the
        task under ``key`` runs, this returns it and starts nothing."""
        with self._lock:
            current = self._tasks.get(key)
            if current is not None and current.running:
                return current
            task = Task(kind)
            self._tasks[key] = task

        def body():
            try:
                result = target(task, *args)
                task.result = str(result or "")
                task.state = STOPPED if task.stop.is_set() else DONE
            except GeohierError as exc:
                task.error, task.state = str(exc), FAILED
            except Exception as exc:  # a bug: still end the task and say what broke
                task.error, task.state = f"{type(exc).__name__}: {exc}", FAILED

        task.thread = threading.Thread(target=body, name=f"geohier-{kind}", daemon=True)
        task.thread.start()
        return task

    def recent(self, prefix: str, within_s: float = RECENT_S) -> list[Task]:
        """Tasks whose key starts with ``prefix`` that run or started within ``within_s``."""
        now = time.time()
        return [t for k, t in list(self._tasks.items())
                if k.startswith(prefix) and (t.running or now - t.started < within_s)]


def task_key(ws: Workspace, kind: str) -> str:
    """The key of a workspace's task of one kind."""
    return f"{ws.data_dir}:{kind}"


def workspace_prefix(ws: Workspace) -> str:
    return f"{ws.data_dir}:"


# ---------------------------------------------------------------------- the tasks


def _demo(task: Task, ws: Workspace, images: int, seed: int) -> str:
    from pipeline.demo import build_demo

    out = build_demo(ws, images=images, seed=seed, progress=task.progress, show_bar=False)
    return f"demo world: {out.get('added', 0):,} images added, {out.get('skipped', 0):,} already there"


def start_demo(runner: TaskRunner, ws: Workspace, images: int, seed: int) -> Task:
    """Build ``images`` demo images for ``seed`` in the background."""
    return runner.start(task_key(ws, "demo"), "demo", _demo, ws, int(images), int(seed))


def _fetch(task: Task, ws: Workspace, cells, options, token: str) -> str:
    from pipeline.fetch import fetch
    from pipeline.fetch_cells import CellSelection

    if isinstance(cells, CellSelection):  # sized already; a large list is built here, not in the page
        task.detail = f"building the cell list: {cells.describe()} ..."
        cells = cells.build(cache_dir=ws.cache_dir, stop=task.stop)
        if task.stop.is_set():
            return "stopped while building the cell list; nothing was fetched"
        if not cells:
            raise GeohierError("no cells match that selection")
        task.detail = ""

    def progress(p) -> None:
        task.progress(p.cells_finished, p.cells_total)
        task.detail = (f"{p.images_kept:,} images kept · {p.done} done, {p.empty} empty, {p.errors} errors · "
                       f"{p.requests_per_s:.1f} requests/s")

    return fetch(ws, cells, options, token, progress=progress, stop_event=task.stop).summary()


def start_fetch(runner: TaskRunner, ws: Workspace, spec: str, level: int, per_cell: int, api_url: str,
                token: str = "") -> Task:
    """Fetch ``per_cell`` images for each cell of ``spec`` (land, all, ids, or a
    CellSelection such as an uploaded list) at ``level``
    in the background. The options are checked first: a bad one, no token (neither given
    nor in MAPILLARY_ACCESS_TOKEN) or a selection too large is a GeohierError and starts nothing;
    no matching cell ends the task failed.

    The token typed on the page goes to any API URL; without one, the server's own
    MAPILLARY_ACCESS_TOKEN is used only for the official API over https
    (``pipeline.mapillary.page_token``): another URL is refused before any request."""
    from pipeline.fetch import FetchOptions
    from pipeline.fetch_cells import parse_cells
    from pipeline.mapillary import page_token

    options = FetchOptions(per_cell=int(per_cell), api_url=str(api_url).strip()).validate()
    token = page_token(token, options.api_url)
    # Only checked and sized here (any text: a selection or one line; no path is read): the
    # list itself is built in the task, where the page's Stop can end it.
    cells = parse_cells(spec, int(level), files=False)
    return runner.start(task_key(ws, "fetch"), "fetch", _fetch, ws, cells, options, token)
