"""Modules imported on first use, so that a light command does not pay for a heavy one.

``torch`` takes about a second and over 1 GB of memory to import; a module that uses it in
a few functions only (``geohier.metrics``: the distance metrics ``score`` needs are numpy)
takes this proxy instead of ``import torch``::

    from geohier.lazy import torch   # the real import happens at the first torch.<name>

>>> m = LazyModule("json")
>>> m.dumps([1])
'[1]'
"""

from __future__ import annotations

import importlib


class LazyModule:
    """Stands for the module ``name``; the first attribute lookup imports it."""

    def __init__(self, name: str):
        self.__dict__["_name"] = name
        self.__dict__["_module"] = None

    def _load(self):
        if self._module is None:
            self.__dict__["_module"] = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attr: str):
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{' (loaded)' if self._module is not None else ''}>"


torch = LazyModule("torch")
