"""What a training process tells the world while it runs: the run's status (state, epoch,
step, progress, ETA; throttled), its log (and the terminal), its metrics history.

All of it through ``geohier.runs.Run``; every method is silent on ranks other than 0, so
a torchrun job writes each line once.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime

from geohier.runs import Run
from geohier.workspace import utcnow

STATUS_EVERY_S = 2.0


class RunReport:
    """The status, log and metrics of one run as rank ``main`` writes them."""

    def __init__(self, run: Run, main: bool = True):
        self.run, self.main = run, main
        self.status: dict = {}
        self._last = 0.0

    def log(self, msg: str) -> None:
        """A timestamped line in the run's log and on stderr (above the tqdm bar)."""
        if not self.main:
            return
        line = f"{datetime.now().strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        self.run.append_log(line)
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)

    def log_text(self, text: str) -> None:
        """Lines as they are (a traceback) in the run's log only."""
        if self.main:
            self.run.append_log(text)

    def update(self, force: bool = True, **kw) -> None:
        """Merge ``kw`` into the status; write it (at most every 2 s unless ``force``)."""
        self.status.update(kw)
        now = time.monotonic()
        if not self.main or (not force and now - self._last < STATUS_EVERY_S):
            return
        self._last = now
        self.status["updated_at"] = utcnow()
        self.status["pid"] = os.getpid()
        self.run.write_status(self.status)

    def append_metrics(self, record: dict) -> None:
        if self.main:
            self.run.append_metrics(record)

    def truncate_metrics(self, epochs_done: int) -> None:
        """Drop the metric lines of epochs that the resumed run will redo."""
        if self.main:
            self.run.truncate_metrics(epochs_done)
