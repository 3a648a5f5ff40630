"""Progress bars for long jobs that stay readable in a log.

On a terminal a bar redraws in place as tqdm always does. When stderr is not a terminal
(CI, a background job's console file, ``> log``) every redraw would be a new chunk of
text: a five-minute fetch wrote over a megabyte of bar lines. There the bar prints one
plain line (ending in a newline, no carriage returns) at most every ``every_s`` seconds,
plus its first and its last state, whatever the caller does (``update``, ``refresh``,
``set_postfix``)::

    from geohier.progress import progress_bar
    with progress_bar(total=len(cells), desc="fetch", unit="cell") as bar:
        ...
        bar.update(1)

Long commands (fetch, merge) and the library's long loops (``geohier.embeddings.embed``)
create their bars here so they all behave the same.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

DEFAULT_EVERY_S = 10.0   # a log line every 10 s: a 5-minute fetch writes about 30 lines
EVERY_ENV = "GEOHIER_PROGRESS_EVERY_S"


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, StringIO)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class LogBar(tqdm):
    """A tqdm bar that, off a terminal, prints whole lines at most every ``every_s`` seconds.

    ``clock`` (seconds, monotonic) is injectable so that tests need not wait."""

    def __init__(self, *args, every_s: float = DEFAULT_EVERY_S,
                 clock: Callable[[], float] = time.monotonic, **kwargs):
        self._every_s = float(every_s)
        self._clock = clock
        self._last_line: float | None = None
        self._lines = 0
        super().__init__(*args, **kwargs)

    def refresh(self, nolock=False, lock_args=None):
        now = self._clock()
        if self._last_line is not None and now - self._last_line < self._every_s:
            return False  # too soon for another log line; the last state is printed at close
        self._last_line = now
        return super().refresh(nolock=nolock, lock_args=lock_args)

    def display(self, msg=None, pos=None):
        if msg == "":  # tqdm clearing a leave=False bar: nothing to clear in a log
            return False
        text = self.__str__() if msg is None else msg
        # a newline between lines (none before the first); close() ends the last one
        self.fp.write(("\n" if self._lines else "") + text)
        self.fp.flush()
        self._lines += 1
        return True


def progress_bar(total: int | None = None, desc: str | None = None, unit: str = "it", *, file=None,
                 every_s: float | None = None, clock: Callable[[], float] | None = None, **kwargs) -> tqdm:
    """A tqdm bar on ``file`` (default: stderr): a normal bar on a terminal, else a
    :class:`LogBar` printing a line every ``every_s`` seconds (default: $GEOHIER_PROGRESS_EVERY_S
    or 10). Extra keywords go to tqdm."""
    file = sys.stderr if file is None else file
    if is_terminal(file):
        return tqdm(total=total, desc=desc, unit=unit, file=file, dynamic_ncols=True, **kwargs)
    if every_s is None:
        try:
            every_s = float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S))
        except ValueError:
            every_s = DEFAULT_EVERY_S
    # tqdm's own interval check is cheap; ours (in refresh) decides when a line is written
    kwargs.setdefault("mininterval", min(1.0, every_s))
    kwargs.setdefault("ascii", True)
    return LogBar(total=total, desc=desc, unit=unit, file=file, every_s=every_s,
                  clock=clock or time.monotonic, **kwargs)
