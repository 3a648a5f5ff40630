"""Helpers shared by the dashboard pages: the workspace, and cached reads of it.

Pages stay thin: they call geohier/ and pipeline/ functions; this module only adds
Streamlit caching keyed on the files' modification times so a rerun costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from geohier.workspace import Workspace


def workspace() -> Workspace:
    """The workspace of this dashboard (GEOHIER_DATA / GEOHIER_MODELS or data/, models/)."""
    return Workspace.from_env()


def manifest_version(ws: Workspace) -> float:
    """A value that changes whenever the manifest changes (for cache keys).

    The WAL file changes on every write, the main file on checkpoints: use both."""
    stamp = 0.0
    for suffix in ("", "-wal"):
        p = str(ws.manifest_path) + suffix
        if os.path.exists(p):
            st_ = os.stat(p)
            stamp += st_.st_mtime_ns + st_.st_size
    return stamp


@st.cache_data(show_spinner=False)
def manifest_summary(data_dir: str, models_dir: str, version: float) -> dict:
    ws = Workspace(Path(data_dir), Path(models_dir))
    if not ws.has_manifest():
        return {"images": 0, "cells": 0, "by_source": {}, "by_split": {}}
    with ws.manifest() as m:
        return m.summary()
