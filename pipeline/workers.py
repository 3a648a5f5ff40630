"""Worker processes started from any host program (the CLI, a Streamlit page, a notebook).

Pools here use the ``spawn`` start method (a clean interpreter: no copied threads or open
SQLite connections), and a spawned worker first re-imports its parent's ``__main__``. The
workers need nothing from it, and some cannot be run twice: under Streamlit (and AppTest)
``__main__`` is the page script that asked for the work, which dies at once in a worker
(``multiprocessing.Pool`` then restarts it forever; a ``ProcessPoolExecutor`` breaks); a
script without a ``__name__ == "__main__"`` guard would start its work again. So workers
start inside ``bare_main()``.

>>> import sys
>>> before = sys.modules["__main__"]
>>> with bare_main():
...     sys.modules["__main__"].__dict__.get("__file__") is None
True
>>> sys.modules["__main__"] is before
True
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def bare_main() -> Iterator[None]:
    """An empty ``__main__`` for the block: start spawned workers inside it."""
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved
