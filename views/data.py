"""Data: where the images are, how imbalanced the classes are, and the label hierarchy.

Sidebar: the levels, the level to inspect, and the minimum images per class of each
level. Main: getting images (demo world, Mapillary), a map of images per cell, class
imbalance at the inspected level, what each level keeps at these minimums (live, from
counts), and the button that writes hierarchy.json and the splits.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from geohier import charts, grid, maps
from geohier.adaptive import ADAPTIVE_MAX_DEPTH, adaptive_summary, build_adaptive, default_thresholds
from geohier.errors import GeohierError
from geohier.hierarchy import DEFAULT_MIN_IMAGES, Hierarchy, kept_summary, select_classes
from geohier.workspace import Workspace
from pipeline import fetch_cells, tasks
from pipeline.labels import build_labels, cell_table, level_counts, split_report
from views._common import manifest_summary, manifest_version, workspace

# --------------------------------------------------------------------------- cached reads


@st.cache_data(show_spinner="Reading every image's position for the partition ...", max_entries=8)
def _adaptive_preview(data_dir: str, models_dir: str, version: float, thresholds: str, max_depth: int) -> list[dict]:
    """``geohier.adaptive.adaptive_summary`` of the manifest's positions."""
    with Workspace(Path(data_dir), Path(models_dir)).manifest() as m:
        lat, lon = m.points()
    return adaptive_summary(lat, lon, thresholds, max_depth)


@st.cache_data(show_spinner=False, max_entries=4)
def _adaptive_map(data_dir: str, models_dir: str, version: float, thresholds: str, max_depth: int) -> str | None:
    """The map of the finest adaptive level's cells (None over ``maps.IMAGES_MAP_MAX_CELLS``)."""
    with Workspace(Path(data_dir), Path(models_dir)).manifest() as m:
        lat, lon = m.points()
    h = build_adaptive(lat, lon, thresholds, max_depth)
    f = h.levels[-1]
    if h.num_classes[f] > maps.IMAGES_MAP_MAX_CELLS:
        return None
    html = maps.offline_html(maps.images_map(h.keys(f), h.counts(f), [""] * h.num_classes[f], h.depths(f)))
    return html


@st.cache_data(show_spinner=False, max_entries=8)
def _counts(data_dir: str, models_dir: str, version: float, levels: tuple[int, ...]):
    return level_counts(Workspace(Path(data_dir), Path(models_dir)), levels)


@st.cache_data(show_spinner="Looking up the countries of the cells ...", max_entries=8)
def _cells(data_dir: str, models_dir: str, version: float, level: int) -> pd.DataFrame:
    return cell_table(Workspace(Path(data_dir), Path(models_dir)), level)


@st.cache_data(show_spinner=False, max_entries=4)
def _map_html(keys: tuple, counts: tuple, countries: tuple, level: int) -> str:
    return maps.offline_html(maps.images_map(keys, counts, countries, level))


@st.cache_data(show_spinner=False)
def _hierarchy(path: str, mtime: float) -> dict | None:
    try:
        return Hierarchy.load(path).to_dict()
    except GeohierError:
        return None


# --------------------------------------------------------------------------- background work


@st.cache_resource
def _runner() -> tasks.TaskRunner:
    # One runner per server process: a build outlives the reruns that poll it.
    return tasks.TaskRunner()


def _start_fetch(ws: Workspace, spec: str, level: int, per_cell: int, api_url: str) -> None:
    # A button callback: the token leaves the widget state here and lives only in the thread.
    token = st.session_state.get("fetch_token", "")
    st.session_state["fetch_token"] = ""
    try:
        tasks.start_fetch(_runner(), ws, spec, level, per_cell, api_url, token)
    except GeohierError as exc:
        st.session_state["fetch_error"] = str(exc)
        return
    st.session_state.pop("fetch_error", None)


def _task_panel(ws: Workspace, kind: str) -> None:
    key = tasks.task_key(ws, kind)
    task = _runner().get(key)
    if task is None:
        return
    running = task.running

    @st.fragment(run_every=1.0 if running else None)
    def panel():
        t = _runner().get(key)
        if t is None:
            return
        if t.running:
            st.progress(t.fraction, text=f"{t.label()} · {time.time() - t.started:.0f} s")
            if t.detail:
                st.caption(t.detail)
            if t.kind == "fetch" and st.button("Stop the fetch", key="fetch_stop"):
                t.cancel()
        elif t.state == tasks.FAILED:
            st.error(t.error)
        else:
            st.success(t.result or f"{t.kind} {t.state}")
        if not t.running and running and not t.seen_end:
            t.seen_end = True
            st.rerun()  # the whole page: the counts changed

    panel()


def _cells_field(text: str, level: int, upload):
    """The Cells field (or an uploaded list, which wins) checked and sized without building
    the list or reading any server file; the size or the one-line reason shows under it.
    Returns what the Start button passes on: the CellSelection, or the refused text (the
    start then says why)."""
    try:
        if upload is not None:
            selection = fetch_cells.cells_from_upload(upload.name, upload.getvalue(), level)
        else:
            selection = fetch_cells.parse_cells(text, level, files=False)
    except GeohierError as exc:
        st.error(f"Cells: {exc}")
        return text
    st.caption(f"Cells: {selection.describe()}; the list is built when the fetch starts, in the background.")
    return selection


# --------------------------------------------------------------------------- the page

ws = workspace()
st.title("Data")
st.caption("Where the images are, how imbalanced the classes are, and the label hierarchy that training uses.")
version = manifest_version(ws)
summary = manifest_summary(str(ws.data_dir), str(ws.models_dir), version)

recent = _runner().recent(tasks.workspace_prefix(ws))
with st.expander("Get images: the offline demo world or Mapillary", expanded=summary["images"] == 0 or bool(recent)):
    demo_tab, fetch_tab = st.tabs(["Demo world", "Mapillary"])
    with demo_tab:
        st.write("Street scenes rendered from their own coordinates near real towns: no token, no internet.")
        c1, c2 = st.columns(2)
        demo_images = c1.number_input("Images", min_value=10, max_value=200_000, value=4000, step=500)
        demo_seed = c2.number_input("Seed", min_value=0, value=0, step=1, key="demo_seed")
        if st.button("Build the demo world", type="primary"):
            tasks.start_demo(_runner(), ws, int(demo_images), int(demo_seed))
        _task_panel(ws, "demo")
    with fetch_tab:
        st.write("Images from the Mapillary API v4 for the chosen cells. The token is used for this fetch "
                 "only: it is not shown, stored or logged. Leave it empty to use the server's "
                 "MAPILLARY_ACCESS_TOKEN, which is only ever sent to https://graph.mapillary.com: another "
                 "API URL needs a token typed here.")
        st.text_input("Mapillary access token", type="password", key="fetch_token")
        c1, c2, c3 = st.columns(3)
        spec = c1.text_input("Cells", value="land", max_chars=fetch_cells.MAX_TEXT_CHARS,
                             help="land, all, or comma-separated cell ids (a longer list: upload it below)")
        fetch_level = c2.number_input("Level of the cells", min_value=1, max_value=12, value=8)
        per_cell = c3.number_input("Images per cell", min_value=1, max_value=5000, value=100)
        cells_file = st.file_uploader("Or a file of cell ids, one per line", type=["txt", "csv"],
                                      max_upload_size=fetch_cells.MAX_FILE_BYTES // 2**20, key="fetch_cells_file")
        spec = _cells_field(spec, int(fetch_level), cells_file)
        api_url = st.text_input("API URL", value="https://graph.mapillary.com",
                                help="another URL (a mirror) only with a token typed above")
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
if len(table) > maps.IMAGES_MAP_MAX_CELLS:
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
        st.success(f"Wrote {ws.hierarchy_path.name}: {h.num_classes} classes, hash {h.hash[:12]}; "
                   f"split version {h.splits['hash'][:12]}.")
        note = split_report(ws, h.splits["hash"])
        if note:
            st.info(note)
        for problem in h.problems():
            st.warning(problem)
        stored = h.to_dict()
        summary = manifest_summary(str(ws.data_dir), str(ws.models_dir), manifest_version(ws))

# Keyed and rerun when opened or closed: the preview reads every image's position (seconds at
# millions of images), so it is computed only while the expander is open.
with st.expander("Adaptive cells: preview and write", expanded=bool(stored and stored.get("cells") == "adaptive"),
                 key="adaptive_open", on_change="rerun") as adaptive_box:
    st.caption("Instead of fixed levels: level k splits quadtree cells while they hold at least N_k images "
               "(N decreasing level by level), so every image has a class at every level and classes are "
               "cells of any depth (`python -m pipeline labels --cells adaptive`).")
    a1, a2 = st.columns(2)
    thresholds_text = a1.text_input(
        "Split thresholds N1,N2,...", key="adaptive_thresholds",
        value=",".join(map(str, (stored or {}).get("thresholds", {}).values()))
        or ",".join(map(str, default_thresholds(summary["images"]))),
        help="one number per level, decreasing; the default aims at about 4, 64, 1024 and 16384 classes")
    max_depth = int(a2.number_input("Max depth", min_value=1, max_value=grid.MAX_LEVEL, key="adaptive_depth",
                                    value=int((stored or {}).get("max_depth", ADAPTIVE_MAX_DEPTH))))
    preview = None
    if adaptive_box.open:
        try:
            preview = _adaptive_preview(str(ws.data_dir), str(ws.models_dir), version, thresholds_text, max_depth)
        except GeohierError as exc:
            st.error(str(exc))
    if preview is not None:
        st.dataframe(pd.DataFrame(preview).rename(columns={"without_class": "images without a class"}),
                     hide_index=True)
        if st.toggle("Map the finest level's cells", key="adaptive_map"):
            preview_map = _adaptive_map(str(ws.data_dir), str(ws.models_dir), version, thresholds_text, max_depth)
            if preview_map is None:
                st.info("The finest level has too many cells to draw.")
            else:
                st.caption(f"The {preview[-1]['classes']:,} cells of the finest level (level {preview[-1]['level']}), "
                           "coloured by images")
                st.iframe(preview_map, height=420)
        if st.button("Write adaptive hierarchy.json and the splits", key="adaptive_write"):
            try:
                with st.spinner("Building the adaptive hierarchy and the splits ..."):
                    h = build_labels(ws, seed=int(split_seed), fractions=split_text, cells="adaptive",
                                     thresholds=thresholds_text, max_depth=max_depth)
            except GeohierError as exc:
                st.error(str(exc))
            else:
                st.success(f"Wrote {ws.hierarchy_path.name} (adaptive cells): {h.num_classes} classes, "
                           f"hash {h.hash[:12]}; split version {h.splits['hash'][:12]}.")
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
