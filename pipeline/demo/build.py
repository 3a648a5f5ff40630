"""Building the demo workspace: render the world's images (in worker processes for big
builds), store them and their rows in the manifest, and summarise what was built."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import numpy as np

from geohier import grid
from geohier.errors import InputError
from geohier.workspace import Workspace
from pipeline.demo.render import encode_jpeg, render_scene, scene_params
from pipeline.demo.world import (
    BIOMES,
    DEFAULT_SEED,
    CountryStyle,
    _sampling_table,
    country_style,
    sample_world,
)
from pipeline.workers import bare_main

DEFAULT_IMAGES = 4000
DEFAULT_SIZE = 128
MIN_SIZE, MAX_SIZE = 32, 512
MAX_IMAGES = 2_000_000
SOURCE = "demo"
POOL_MIN_IMAGES = 200      # below this, starting worker processes costs more than it saves
COMMIT_EVERY = 200         # images per manifest transaction


# Worker-side state: the styles of this build's countries (sent once per worker).
_STYLES: dict[str, CountryStyle] = {}


def _init_worker(styles: dict[str, CountryStyle]) -> None:
    _STYLES.clear()
    _STYLES.update(styles)


def _render_task(task) -> tuple[int, bytes, float]:
    index, p, size, seed = task
    arr, _ = render_scene(p, _STYLES[p["country"]], size, seed, index)
    q = int(np.random.default_rng([seed, index, 0x1A]).integers(72, 93))
    grey = float((arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).mean())
    return index, encode_jpeg(arr, q), grey


def imbalance(lat, lon, level: int = 5) -> dict:
    """Cells with images, Gini and max/median of per-cell counts at ``level``."""
    from geohier.charts import gini  # plotly is imported there; a worker process needs none of it

    _, counts = np.unique(grid.encode(lat, lon, level), return_counts=True)
    return {"level": level, "cells": int(len(counts)), "gini": round(gini(counts), 3),
            "max": int(counts.max()), "median": float(np.median(counts)),
            "max_median": round(float(counts.max() / np.median(counts)), 1)}


def _check_args(images, seed, size, workers) -> tuple[int, int, int, int]:
    def as_int(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InputError(f"{name} must be an integer, got {v!r}")
        return int(v)

    images, seed, size = as_int("images", images), as_int("seed", seed), as_int("size", size)
    if not 1 <= images <= MAX_IMAGES:
        raise InputError(f"images must be between 1 and {MAX_IMAGES:,}, got {images}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(f"size must be between {MIN_SIZE} and {MAX_SIZE} px, got {size}")
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    workers = as_int("workers", workers)
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    return images, seed, size, workers


def build_demo(ws: Workspace, images: int = DEFAULT_IMAGES, seed: int = DEFAULT_SEED,
               size: int = DEFAULT_SIZE, workers: int | None = None,
               progress: Callable[[int, int], None] | None = None,
               show_bar: bool = True) -> dict:
    """Render the demo world's ``images`` images for ``seed`` into the workspace.

    Images already there (same seed and index) are skipped, so a rebuild adds nothing and
    a larger build adds only the new ones. ``progress(done, total)`` is called as images are
    stored (for the dashboard); ``show_bar`` draws a tqdm bar on stderr. ``workers`` > 1
    renders in that many processes (default: up to 2); the bytes do not depend on it.

    Returns a summary: images requested, added, skipped, seconds, countries, sequences,
    biome shares, and the L1/L5 imbalance of the world.
    """
    images, seed, size, workers = _check_args(images, seed, size, workers)
    t0 = time.perf_counter()
    world = sample_world(images, seed)
    prefix = f"demo-{seed}-"
    with ws.manifest() as m:
        have = {sid for (sid,) in m.conn.execute(
            "SELECT source_id FROM images WHERE source = ? AND source_id LIKE ?",
            (SOURCE, prefix + "%"))}
        todo = [i for i in range(images) if f"{prefix}{i}" not in have]
        _, _, centroids = _sampling_table()
        countries = sorted({str(c) for c in world["country"][todo]})
        styles = {c: country_style(c, centroids.get(c)) for c in countries}
        tasks = ((i, scene_params(world, i), size, seed) for i in todo)   # lazily: big builds
        bar = None
        if show_bar and todo:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="demo world", unit="img", file=sys.stderr)
        added = dup = done = 0
        pool = None
        try:
            if workers > 1 and len(todo) >= POOL_MIN_IMAGES:
                import multiprocessing as mp
                with bare_main():  # pipeline.workers: the page script is __main__ under Streamlit
                    pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(styles,))
                results = pool.imap(_render_task, tasks, chunksize=16)
            else:
                _init_worker(styles)
                results = map(_render_task, tasks)
            results = iter(results)
            more = True
            while more:  # one transaction per batch of images: fast, and a kill loses little
                more = False
                with m.transaction():
                    for n, (i, data, grey) in enumerate(results, 1):
                        row_id = m.store_image(
                            data, "jpg", source=SOURCE, source_id=f"{prefix}{i}",
                            sequence_id=f"demo-{seed}-s{int(world['drive'][i])}",
                            lat=float(world["lat"][i]), lon=float(world["lon"][i]),
                            captured_at=str(world["captured_at"][i]), width=size, height=size,
                            brightness=round(grey, 2))
                        added += row_id is not None
                        dup += row_id is None
                        done += 1
                        if bar is not None:
                            bar.update(1)
                        if progress is not None:
                            progress(done, len(todo))
                        if n >= COMMIT_EVERY:
                            more = True
                            break
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            if bar is not None:
                bar.close()
        total = m.count()
    bw = world["biome_w"].argmax(axis=1)
    return {
        "seed": seed, "size": size, "requested": images, "added": added,
        "skipped": images - len(todo) + dup, "seconds": round(time.perf_counter() - t0, 1),
        "workspace_images": total,
        "countries": int(len(np.unique(world["country"]))),
        "sequences": int(len(np.unique(world["drive"]))),
        "biomes": {b: int((bw == k).sum()) for k, b in enumerate(BIOMES)},
        "imbalance": {"1": imbalance(world["lat"], world["lon"], 1),
                      "5": imbalance(world["lat"], world["lon"], 5)},
    }
