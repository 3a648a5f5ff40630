"""Accuracy: learning curves per level, distance accuracy, calibration, per country."""

from __future__ import annotations

import os

import pandas as pd
import streamlit as st

from geohier import accuracy_charts as ac
from geohier import benchmark
from geohier import runs as runs_
from geohier.errors import GeohierError
from geohier.leaderboard import Leaderboard, best_rows
from geohier.runs import Run
from pipeline import evaluate
from views._common import workspace

st.title("Accuracy")
ws = workspace()


@st.cache_data(show_spinner=False, max_entries=64)
def _history(run_dir: str, stamp: float) -> list[dict]:
    return Run(run_dir).history()


@st.cache_data(show_spinner=False, max_entries=64)
def _eval(run_dir: str, stamp: float) -> dict | None:
    return Run(run_dir).eval()


runs = [r for r in runs_.list_runs(ws.models_dir)
        if r.metrics_path.exists() or r.eval_path.exists() or r.meta_path.exists()]
# ----------------------------------------------------------------------------- leaderboard


@st.cache_data(show_spinner=False, max_entries=16)
def _points(data_dir: str, truth_hash: str, name: str, stamp: float):
    # up to 50,000 per-image points: read once per leaderboard change, not every rerun
    return Leaderboard(data_dir).points(truth_hash, name)


board = Leaderboard(ws.data_dir)
truth_sets = board.truth_sets()
if truth_sets:
    st.subheader("Leaderboard")
    labels = {t["hash"]: f"{t.get('name', '?')} — {t.get('images', '?')} images ({t['entries']} entries)"
              for t in truth_sets}
    chosen_set = st.selectbox("Truth set", list(labels), format_func=labels.get,
                              help="runs, other systems (`python -m pipeline score`) and baselines scored on "
                                   "the same images; different truth sets are never mixed")
    table = board.table(chosen_set)
    shown = ac.leaderboard_frame(table)
    best = best_rows(table)
    col_of = {"geoscore": "GeoScore", "median_km": "median km", "country_acc": "country",
              **{f"acc_{t}km": f"{t} km" for t in ac.KM_THRESHOLDS}}

    def _mark(frame):
        styles = pd.DataFrame("", index=frame.index, columns=frame.columns)
        for key, i in best.items():
            if key in col_of:
                styles.loc[i, col_of[key]] = "font-weight: bold; background-color: #d9f0d3"
        styles.loc[frame["kind"] == "baseline", "system"] = "color: #777777; font-style: italic"
        return styles

    st.dataframe(shown.style.apply(_mark, axis=None), hide_index=True, use_container_width=True, column_config={
        **{f"{t} km": st.column_config.NumberColumn(format="%.1f%%") for t in ac.KM_THRESHOLDS},
        "country": st.column_config.NumberColumn(format="%.1f%%"),
        "GeoScore": st.column_config.NumberColumn(format="%.0f"),
        "median km": st.column_config.NumberColumn(format="%.0f")})
    st.caption("Best non-baseline value per column in bold green. OSV-5M's protocol: strict < thresholds, "
               "R = 6371 km; a truth image without a prediction counts as a 20,000 km error. Baselines are "
               "trivial guesses on the same images: a model that does not beat them has learned nothing "
               "about place.")
    st.plotly_chart(ac.fig_leaderboard_curve(table), use_container_width=True)
    with_points = [n for n, e in board.entries(chosen_set).items() if e.get("points")]
    if with_points:
        st.markdown("**Where it fails**")
        c1, c2, c3 = st.columns([2, 1, 1])
        who = c1.selectbox("System", with_points)
        view = c2.radio("Map", ["errors", "cell hit rate"], horizontal=True)
        level = c3.selectbox("Level", [1, 3, 5, 8], index=1, disabled=view == "errors")
        points = _points(str(ws.data_dir), chosen_set, who, os.path.getmtime(board.path))
        from streamlit_folium import st_folium

        if view == "errors":
            fmap = ac.error_map(points)
        else:
            fmap = ac.cell_hit_map(points, level)
        st_folium(fmap, height=480, use_container_width=True, returned_objects=[],
                  key=f"errmap-{chosen_set}-{who}-{view}-{level}")
        st.markdown("**Hierarchy diagnostics** — of the images whose guess misses the true L8 cell, how "
                    "many were already in the wrong cell at each coarser level")
        st.dataframe(ac.hierarchy_frame(benchmark.hierarchy_misses(
            points["true_lat"], points["true_lon"], points["pred_lat"], points["pred_lon"])),
            hide_index=True, use_container_width=True, column_config={
                c: st.column_config.NumberColumn(format="%.1f") for c in ("hit rate %", "share of finest misses %")})

if not runs:
    st.info("No trained runs yet. Train one on the Train page, or run "
            "`python -m pipeline train --backbone resnet18 --image-size 96 --epochs 5`.")
    st.stop()

by_name = {r.name: r for r in runs}
histories = {r.name: _history(str(r.path), r.mtime(runs_.METRICS_FILE)) for r in runs}
evals = {r.name: _eval(str(r.path), r.mtime(runs_.EVAL_FILE)) for r in runs}
newest = sorted(runs, key=lambda r: r.mtime(runs_.METRICS_FILE), reverse=True)

with st.sidebar:
    chosen = st.multiselect("Runs", list(by_name), default=[p.name for p in newest[:2]],
                            help="compare several runs side by side")
    metric = st.selectbox("Per-level metric", ["top1", "top5", "top10"])

if not chosen:
    st.info("Pick one or more runs in the sidebar.")
    st.stop()

# ----------------------------------------------------------------------------- curves

st.subheader("Accuracy per level over epochs")
curves = {n: histories[n] for n in chosen if histories[n]}
if curves:
    st.plotly_chart(ac.fig_level_curves(curves, metric), use_container_width=True)
    st.caption("Train (dashed, on augmented images while learning) and val (solid). Chance at a level is "
               "1 / its number of classes.")
else:
    st.caption("The chosen runs have no finished epoch yet (their metrics history is empty).")

# ----------------------------------------------------------------------------- distances

st.subheader("Distance from the true location")
with_eval = {n: evals[n] for n in chosen if evals[n]}
missing = [n for n in chosen if not evals[n]]
if with_eval:
    col_km, col_area = st.columns(2)
    with col_km:
        st.plotly_chart(ac.fig_km_accuracy(with_eval), use_container_width=True)
        st.caption(ac.references_caption())
    with col_area:
        st.markdown("**Recall vs area**")
        have_area, no_area = ac.with_key(with_eval, "recall_area")
        if have_area:
            st.plotly_chart(ac.fig_recall_area(have_area), use_container_width=True)
            st.caption("The share of test truths inside the model's top-ranked finest cells (by joint probability) "
                       "against the cells' total area: how much of the map must be searched to find the place.")
        note = ac.missing_caption(no_area, "recall vs area")
        if note:
            st.caption(note)
    table = ac.km_table(with_eval)
    st.dataframe(table, hide_index=True, use_container_width=True, column_config={
        **{f"{t} km": st.column_config.NumberColumn(format="%.1f%%") for t in ac.KM_THRESHOLDS},
        "GeoScore": st.column_config.NumberColumn(format="%.0f"),
        "median km": st.column_config.NumberColumn(format="%.0f"),
        "mean km": st.column_config.NumberColumn(format="%.0f"),
    })
for name in missing:
    c1, c2 = st.columns([3, 1])
    if runs_.is_training(by_name[name]):
        c1.write(f"**{name}** is {by_name[name].state}: evaluate it once it has finished.")
        continue
    if not by_name[name].has_model():
        c1.write(f"**{name}** has no saved model to evaluate.")
        continue
    c1.write(f"**{name}** has no evaluation yet.")
    if c2.button("Evaluate", key=f"eval-{name}"):
        try:
            with st.spinner(f"Evaluating {name} on its test split..."):
                evaluate.evaluate_run(by_name[name].path, ws, progress=False)
            st.cache_data.clear()
            st.rerun()
        except GeohierError as exc:
            st.error(str(exc))

if not with_eval:
    st.stop()

# ----------------------------------------------------------------------------- abstention

st.subheader("Abstention: answer only when sure")
have_ab, no_ab = ac.with_key(with_eval, "abstention")
if have_ab:
    st.plotly_chart(ac.fig_abstention(have_ab), use_container_width=True)
    st.caption("Images ranked by confidence (the top hierarchical joint probability of a finest cell); "
               "answering only the most confident share lifts accuracy. Hover for the confidence to pass "
               "to `predict --abstain`.")
note = ac.missing_caption(no_ab, "abstention")
if note:
    st.caption(note)

# ----------------------------------------------------------------------------- prediction regions

st.subheader("Prediction regions: how often the true place is inside")
have_cf, no_cf = ac.with_key(with_eval, "conformal")
if have_cf:
    st.dataframe(ac.conformal_table(have_cf), hide_index=True, use_container_width=True, column_config={
        **{c: st.column_config.NumberColumn(format="%.1f%%") for c in
           ("photos covered", "± photos", "places covered", "± places", "cross-fit photos", "cross-fit places")},
        "mean cells": st.column_config.NumberColumn(format="%.1f"),
        "median km²": st.column_config.NumberColumn(format="%.0f")})
    st.caption("For each target coverage, the share of test photos (and the mean share of test places) whose "
               "point lies in the region `predict --coverage` draws, calibrated on val; the target is promised "
               "for the share named under *guaranteed* (`evaluate --conformal-weights`). Cross-fit: calibrated "
               "on half the test places and measured on the other half, over random halvings, free of the "
               "luck of one val/test deal.")
note = ac.missing_caption([n for n in no_cf if "conformal" not in with_eval[n]], "prediction regions")
if note:
    st.caption(note)
uncalibrated = [n for n in no_cf if "conformal" in with_eval[n]]
if uncalibrated:
    st.caption(f"No regions for {', '.join(uncalibrated)}: the run has no conformal calibration (evaluate it with "
               "--calibrate).")

# ----------------------------------------------------------------------------- per level + calibration

focus = st.selectbox("Run for details", list(with_eval))
ev = with_eval[focus]
for note in ev.get("notes") or []:
    st.warning(note)
per_level = ev.get("per_level") or {}
st.dataframe(pd.DataFrame([{
    "level": int(lv), "classes": r.get("num_classes"), "images": r.get("n"),
    "top-1": 100 * (r.get("top1") or 0), "top-5": 100 * (r.get("top5") or 0), "top-10": 100 * (r.get("top10") or 0),
    "chance top-1": 100 * (r.get("chance_top1") or 0), "temperature": r.get("temperature"),
    "ECE before": 100 * (r.get("ece_before") or 0), "ECE after": 100 * (r.get("ece_after") or 0),
} for lv, r in per_level.items()]), hide_index=True, use_container_width=True, column_config={
    c: st.column_config.NumberColumn(format="%.1f%%")
    for c in ("top-1", "top-5", "top-10", "chance top-1", "ECE before", "ECE after")})

st.subheader("Calibration")
rel = ev.get("reliability") or {}
if rel:
    levels = list(rel)
    level = st.radio("Level", levels, horizontal=True, index=len(levels) - 1)
    st.plotly_chart(ac.fig_reliability(rel[level], level, (per_level.get(level) or {}).get("temperature")),
                    use_container_width=True)
    st.caption("Each point is a bin of test images by the model's top-1 probability; on the diagonal the "
               "confidence is the accuracy. Temperatures are fitted on the val split (minimum NLL).")

st.subheader("Per country")
countries = ev.get("countries") or []
if not countries:
    st.caption("No per-country table in this evaluation (no test image on land, or an older evaluation).")
else:
    metric_c = st.selectbox("Country metric", ["country_acc", "acc_750km", "acc_200km", "acc_25km"],
                            format_func=lambda m: {"country_acc": "predicted point in the right country"}.get(
                                m, f"within {m[4:-2]} km"))
    shown = st.radio("Show as", ["map", "bars"], horizontal=True)
    if shown == "map":
        from streamlit_folium import st_folium

        st_folium(ac.country_map(countries, metric_c), height=440, use_container_width=True,
                  returned_objects=[], key=f"countries-{focus}-{metric_c}")
    else:
        st.plotly_chart(ac.fig_country_accuracy(countries, metric_c), use_container_width=True)
    st.dataframe(ac.country_frame(countries), hide_index=True, use_container_width=True)
