"""Data: where the images are, how imbalanced the classes are, and the label hierarchy.

Sidebar: the levels, the level to inspect, and the minimum images per class of each
level. Main: getting images (demo world, Mapillary), a map of images per cell, class
imbalance at the inspected level, what each level keeps at these minimums (live, from
counts), and the button that writes hierarchy.json and the splits.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from geohier import charts, grid
from geohier.errors import GeohierError
from geohier.hierarchy import DEFAULT_MIN_IMAGES, Hierarchy, kept_summary, select_classes
from geohier.workspace import Workspace
from pages._common import manifest_summary, manifest_version, workspace
from pipeline.labels import build_labels, cell_table, level_counts

MAX_MAP_CELLS = 60_000  # one canvas layer copes; beyond, the browser would crawl
RAMP = ("#ffeda0", "#feb24c", "#fd8d3c", "#e31a1c", "#800026")  # warm: stands out on the blue sea


# --------------------------------------------------------------------------- cached reads


@st.cache_data(show_spinner=False, max_entries=8)
def _counts(data_dir: str, models_dir: str, version: float, levels: tuple[int, ...]):
    return level_counts(Workspace(Path(data_dir), Path(models_dir)), levels)


@st.cache_data(show_spinner="Looking up the countries of the cells ...", max_entries=8)
def _cells(data_dir: str, models_dir: str, version: float, level: int) -> pd.DataFrame:
    return cell_table(Workspace(Path(data_dir), Path(models_dir)), level)


@st.cache_data(show_spinner=False, max_entries=4)
def _map_html(keys: tuple, counts: tuple, countries: tuple, level: int) -> str:
    from geohier import maps

    n = np.asarray(counts)
    m = maps.base_map()
    colours = maps.color_scale(n, log=True, vmin=1, vmax=max(int(n.max()), 2), colors=RAMP)
    maps.cells_layer(np.asarray(keys), level, colours, fields={"images": n, "country": list(countries)},
                     tooltip=[("cell", "Cell"), ("country", "Country"), ("images", "Images")],
                     name=f"Images per level-{level} cell", fill_opacity=0.8,
                     weight=0.5 if level <= 6 else 0.2).add_to(m)
    w, south, e, north = (float(f(a)) for f, a in zip((np.min, np.min, np.max, np.max),
                                                        grid.key_bounds(np.asarray(keys), level), strict=True))
    m.fit_bounds([[max(south, -80.0), w], [min(north, 80.0), e]])  # zoom to the data
    top = max(int(n.max()), 1)
    stops = sorted({1, *[10**k for k in range(1, 7) if 10**k < top], top})
    legend = maps.color_scale(stops, log=True, vmin=1, vmax=max(top, 2), colors=RAMP)
    maps.add_legend(m, list(zip(legend, [f"{s:,}" for s in stops], strict=True)),
                    title="Images per cell", note="log colour scale")
    return maps.offline_html(m)


@st.cache_data(show_spinner=False)
def _hierarchy(path: str, mtime: float) -> dict | None:
    try:
        return Hierarchy.load(path).to_dict()
    except GeohierError:
        return None


# --------------------------------------------------------------------------- background work


@dataclass
class Task:
    """A demo build or a fetch running in a background thread (no secrets in here)."""

    kind: str
    state: str = "running"  # running | done | failed | stopped
    done: int = 0
    total: int = 0
    detail: str = ""
    result: str = ""
    error: str = ""
    started: float = field(default_factory=time.time)
    stop: threading.Event = field(default_factory=threading.Event)
    seen_end: bool = False


@st.cache_resource
def _tasks() -> dict[str, Task]:
    # One registry per server process, keyed by data dir + kind: a build outlives reruns.
    return {}


def _start(kind: str, ws: Workspace, target, *args) -> None:
    key = f"{ws.data_dir}:{kind}"
    current = _tasks().get(key)
    if current is not None and current.state == "running":
        return
    task = Task(kind)
    _tasks()[key] = task

    def body():
        try:
            task.result = target(task, *args)
            task.state = "stopped" if task.stop.is_set() else "done"
        except GeohierError as exc:
            task.error, task.state = str(exc), "failed"
        except Exception as exc:  # a bug: still end the task and say what broke
            task.error, task.state = f"{type(exc).__name__}: {exc}", "failed"

    threading.Thread(target=body, name=f"geohier-{kind}", daemon=True).start()


def _run_demo(task: Task, ws: Workspace, images: int, seed: int) -> str:
    from pipeline.demo import build_demo

    def progress(done: int, total: int) -> None:
        task.done, task.total = int(done), int(total)

    out = build_demo(ws, images=images, seed=seed, progress=progress, show_bar=False)
    return f"demo world: {out.get('added', 0):,} images added, {out.get('skipped', 0):,} already there"


def _run_fetch(task: Task, ws: Workspace, cells: list[str], options, token: str) -> str:
    from pipeline.fetch import fetch

    def progress(p) -> None:
        task.done, task.total = p.cells_finished, p.cells_total
        task.detail = (f"{p.images_kept:,} images kept · {p.done} done, {p.empty} empty, {p.errors} errors · "
                       f"{p.requests_per_s:.1f} requests/s")

    report = fetch(ws, cells, options, token, progress=progress, stop_event=task.stop)
    return report.summary()


def _start_fetch(ws: Workspace, spec: str, level: int, per_cell: int, api_url: str) -> None:
    # A button callback: the token leaves the widget state here and lives only in the thread.
    token = st.session_state.get("fetch_token", "")
    st.session_state["fetch_token"] = ""
    try:
        from pipeline.fetch import FetchOptions, read_token, select_cells

        token = token.strip() or read_token()  # else MAPILLARY_ACCESS_TOKEN
        options = FetchOptions(per_cell=int(per_cell), api_url=api_url.strip()).validate()
        cells = select_cells(spec, level)
        if not cells:
            raise GeohierError("no cells match that selection")
    except GeohierError as exc:
        st.session_state["fetch_error"] = str(exc)
        return
    st.session_state.pop("fetch_error", None)
    _start("fetch", ws, _run_fetch, ws, cells, options, token)


def _task_panel(ws: Workspace, kind: str) -> None:
    task = _tasks().get(f"{ws.data_dir}:{kind}")
    if task is None:
        return
    running = task.state == "running"

    @st.fragment(run_every=1.0 if running else None)
    def panel():
        t = _tasks().get(f"{ws.data_dir}:{kind}")
        if t is None:
            return
        frac = t.done / t.total if t.total else 0.0
        label = f"{t.kind}: {t.done:,} / {t.total:,}" if t.total else f"{t.kind}: starting ..."
        if t.state == "running":
            st.progress(min(frac, 1.0), text=f"{label} · {time.time() - t.started:.0f} s")
            if t.detail:
                st.caption(t.detail)
            if t.kind == "fetch" and st.button("Stop the fetch", key="fetch_stop"):
                t.stop.set()
        elif t.state == "failed":
            st.error(t.error)
        else:
            st.success(t.result or f"{t.kind} {t.state}")
        if t.state != "running" and running and not t.seen_end:
            t.seen_end = True
            st.rerun()  # the whole page: the counts changed

    panel()


# --------------------------------------------------------------------------- the page

ws = workspace()
st.title("Data")
st.caption("Where the images are, how imbalanced the classes are, and the label hierarchy that training uses.")
version = manifest_version(ws)
summary = manifest_summary(str(ws.data_dir), str(ws.models_dir), version)

recent = [t for k, t in _tasks().items() if k.startswith(f"{ws.data_dir}:")
          and (t.state == "running" or time.time() - t.started < 600)]
with st.expander("Get images: the offline demo world or Mapillary", expanded=summary["images"] == 0 or bool(recent)):
    demo_tab, fetch_tab = st.tabs(["Demo world", "Mapillary"])
    with demo_tab:
        st.write("Street scenes rendered from their own coordinates near real towns: no token, no internet.")
        c1, c2 = st.columns(2)
        demo_images = c1.number_input("Images", min_value=10, max_value=200_000, value=4000, step=500)
        demo_seed = c2.number_input("Seed", min_value=0, value=0, step=1, key="demo_seed")
        if st.button("Build the demo world", type="primary"):
            _start("demo", ws, _run_demo, ws, int(demo_images), int(demo_seed))
        _task_panel(ws, "demo")
    with fetch_tab:
        st.write("Images from the Mapillary API v4 for the chosen cells. The token is used for this fetch "
                 "only: it is not shown, stored or logged. Leave it empty to use MAPILLARY_ACCESS_TOKEN.")
        st.text_input("Mapillary access token", type="password", key="fetch_token")
        c1, c2, c3 = st.columns(3)
        spec = c1.text_input("Cells", value="land", help="land, all, or comma-separated cell ids")
        fetch_level = c2.number_input("Level of the cells", min_value=1, max_value=12, value=8)
        per_cell = c3.number_input("Images per cell", min_value=1, max_value=5000, value=100)
        api_url = st.text_input("API URL", value="https://graph.mapillary.com")
        st.button("Start the fetch", on_click=_start_fetch,
                  args=(ws, spec, int(fetch_level), int(per_cell), api_url))
        if st.session_state.get("fetch_error"):
            st.error(st.session_state["fetch_error"])
        _task_panel(ws, "fetch")

if summary["images"] == 0:
    st.info("The workspace has no images yet: build the demo world or fetch from Mapillary above, or from a "
            "shell run `python -m pipeline demo` or `python -m pipeline import-photos DIR`.")
    st.stop()

# --- sidebar: levels, inspected level, minimums
stored = _hierarchy(str(ws.hierarchy_path), ws.hierarchy_path.stat().st_mtime) if ws.hierarchy_path.exists() else None
default_levels = ",".join(map(str, stored["levels"])) if stored else ",".join(map(str, grid.DEFAULT_LEVELS))
levels_text = st.sidebar.text_input("Levels", value=default_levels, help="comma-separated, increasing, e.g. 1,3,5,8")
try:
    levels = grid.parse_levels(levels_text)
except GeohierError as exc:
    st.error(str(exc))
    st.stop()
level = st.sidebar.selectbox("Level to inspect", levels, index=len(levels) - 1)
st.sidebar.markdown("**Minimum images per class**")
mins = {}
for lv in levels:
    default = int((stored or {}).get("min_images", {}).get(str(lv), DEFAULT_MIN_IMAGES))
    mins[lv] = int(st.sidebar.number_input(f"Level {lv}", min_value=1, value=default, step=1, key=f"min_{lv}"))

counts = _counts(str(ws.data_dir), str(ws.models_dir), version, levels)
masks = select_classes(counts, mins)
keys, n = counts[level]

c1, c2, c3, c4 = st.columns(4)
c1.metric("Images", f"{summary['images']:,}")
c2.metric(f"Cells with images (L{level})", f"{len(keys):,}")
c3.metric(f"Classes kept (L{level})", f"{int(masks[level].sum()):,}")
c4.metric(f"Gini (L{level})", f"{charts.gini(n):.3f}")

# --- map
st.subheader(f"Images per cell at level {level}")
try:
    table = _cells(str(ws.data_dir), str(ws.models_dir), version, level)
except GeohierError as exc:  # e.g. the geography data is missing
    st.warning(f"no countries: {exc}")
    table = pd.DataFrame({"cell": grid.keys_to_ids(keys, level), "key": keys, "images": n, "country": ""})
if len(table) > MAX_MAP_CELLS:
    st.info(f"{len(table):,} cells are too many to draw; inspect a coarser level.")
else:
    try:
        html = _map_html(tuple(table["key"].tolist()), tuple(table["images"].tolist()),
                         tuple(table["country"].astype(str).tolist()), level)
        st.iframe(html, height=480)
    except GeohierError as exc:
        st.warning(f"the map cannot be drawn: {exc}")

# --- imbalance
st.subheader(f"Class imbalance at level {level}")
stats = charts.imbalance_stats(n, mins[level])
c1, c2, c3, c4 = st.columns(4)
c1.metric("Gini", f"{stats['gini']:.3f}", help="0 = every cell has as many images; 1 = one cell has all")
c2.metric("Max / median", f"{stats['max_median_ratio']:,.1f}")
c3.metric(f"Cells under {mins[level]}", f"{stats['share_under_min']:.0%}",
          help=f"holding {stats['images_under_min']:.1%} of the images")
c4.metric("Top 10% of cells hold", f"{stats['top10_share']:.0%}")
left, right = st.columns(2)
left.plotly_chart(charts.fig_class_histogram(n, level, mins[level]), width="stretch")
right.plotly_chart(charts.fig_lorenz(n, level), width="stretch")

rows = []
for lv in levels:
    s = charts.imbalance_stats(counts[lv][1], mins[lv])
    rows.append({"level": lv, "cells": s["classes"], "gini": round(s["gini"], 3),
                 "max/median": round(s["max_median_ratio"], 1), "under min": f"{s['share_under_min']:.0%}",
                 "top 10% hold": f"{s['top10_share']:.0%}"})
st.dataframe(pd.DataFrame(rows), hide_index=True)

# Two cached reads of one manifest version can still differ by a write in between: match by key.
at_key = np.minimum(np.searchsorted(keys, table["key"].to_numpy()), max(len(keys) - 1, 0))
table = table.assign(kept=(masks[level][at_key] & (keys[at_key] == table["key"].to_numpy())) if len(keys) else False)
shown = ["cell", "country", "images", "kept"]
k = min(10, len(table))
big, small = st.columns(2)
big.markdown(f"**Largest {k} cells**")
big.dataframe(table.nlargest(k, "images")[shown], hide_index=True)
small.markdown(f"**Smallest {k} cells**")
small.dataframe(table.nsmallest(k, "images")[shown], hide_index=True)
st.download_button(f"Download the level-{level} cell table (CSV)", table.drop(columns=["key"]).to_csv(index=False),
                   file_name=f"cells_L{level}.csv", mime="text/csv")

# --- what the minimums keep, and writing the hierarchy
st.subheader("Classes kept at these minimums")
st.caption("Live from the counts: a cell is a class when it has the minimum and its parent cell is a class.")
kept = pd.DataFrame(kept_summary(counts, mins))
kept["share_kept"] = (100 * kept["share_kept"]).round(1)
st.dataframe(kept.rename(columns={"share_kept": "% images kept"}), hide_index=True)
thin = kept[kept["classes"] < 2]
for lv in thin["level"]:
    st.warning(f"Level {lv} keeps fewer than 2 classes: training needs at least 2; lower its minimum.")

c1, c2 = st.columns(2)
split_text = c1.text_input("Split fractions train,val,test", value="0.8,0.1,0.1")
split_seed = c2.number_input("Split seed", min_value=0, value=int(((stored or {}).get("splits") or {}).get("seed", 0)))
if st.button("Write hierarchy.json and the splits", type="primary"):
    try:
        with st.spinner("Building the hierarchy and the splits ..."):
            h = build_labels(ws, levels, mins, int(split_seed), split_text)
    except GeohierError as exc:
        st.error(str(exc))
    else:
        st.success(f"Wrote {ws.hierarchy_path.name}: {h.num_classes} classes, hash {h.hash[:12]}.")
        for problem in h.problems():
            st.warning(problem)
        stored = h.to_dict()
        summary = manifest_summary(str(ws.data_dir), str(ws.models_dir), manifest_version(ws))

if stored:
    splits = summary.get("by_split", {})
    st.caption(f"Current hierarchy: levels {stored['levels']}, classes "
               f"{ {int(k): len(v['cells']) for k, v in stored['classes'].items()} }, hash {stored['hash'][:12]}, "
               f"built {stored['created_at']}; splits " + ", ".join(f"{s} {splits.get(s, 0):,}"
                                                                    for s in ("train", "val", "test")))
else:
    st.caption("No hierarchy.json yet: choose the minimums and write it (or `python -m pipeline labels`).")
