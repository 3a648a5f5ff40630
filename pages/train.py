"""Train: launch a training job in the background, watch it, cancel or resume it."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from geohier.errors import GeohierError
from geohier.model import BACKBONES
from pages._common import workspace
from pipeline import jobs

SHAPES = {"One model for all levels": False, "One model per level (the seed's shape)": True}
WEIGHT_OPTIONS = ("none", "imagenet", "local file")

st.title("Train")
ws = workspace()

if not ws.hierarchy_path.exists():
    st.info("There is no label hierarchy yet. Build it on the Data page, or run "
            "`python -m pipeline labels`, then come back to train.")
    if ws.has_manifest() and st.button("Build labels now (default levels 1,3,5,8)"):
        from pipeline.labels import build_labels

        try:
            with st.spinner("Building hierarchy.json and the train/val/test splits..."):
                build_labels(ws)
            st.rerun()
        except GeohierError as exc:
            st.error(str(exc))
    st.stop()

try:
    hier_levels = [int(v) for v in json.loads(ws.hierarchy_path.read_text("utf-8"))["levels"]]
except (OSError, ValueError, KeyError, TypeError) as exc:
    st.error(f"cannot read {ws.hierarchy_path}: {exc}; rebuild it with `python -m pipeline labels`")
    st.stop()


def _defaults() -> jobs.TrainParams:
    """The small demo recipe on a CPU, train.py's own defaults on a GPU."""
    import torch

    from pipeline.train import TrainConfig, demo_config

    c = TrainConfig() if torch.cuda.is_available() else demo_config()
    return jobs.TrainParams(levels=",".join(map(str, hier_levels)), backbone=c.backbone, weights=c.weights,
                            epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, image_size=c.image_size,
                            label_smoothing=c.label_smoothing, haversine_tau=c.haversine_tau)


if "train_defaults" not in st.session_state:
    st.session_state.train_defaults = _defaults()
d: jobs.TrainParams = st.session_state.train_defaults

# ----------------------------------------------------------------------------- the form

with st.form("train_form"):
    st.subheader("New run")
    note = {}  # field -> placeholder under its widget, for validation messages
    c1, c2 = st.columns(2)
    with c1:
        levels = st.multiselect("Levels", hier_levels, default=hier_levels,
                                help="grid levels to classify (those of hierarchy.json)")
        note["levels"] = st.empty()
        shape = st.radio("Shape", list(SHAPES), help="one backbone with a head per level, or one model per level")
        backbone = st.selectbox("Backbone", BACKBONES, index=BACKBONES.index(d.backbone) if d.backbone in BACKBONES else 0)
        note["backbone"] = st.empty()
        weights_choice = st.selectbox("Weights", WEIGHT_OPTIONS,
                                      index=WEIGHT_OPTIONS.index(d.weights) if d.weights in WEIGHT_OPTIONS else 0,
                                      help="imagenet downloads torchvision's weights once (needs the internet)")
        weights_file = st.text_input("Local weights file (.safetensors)", "",
                                     help="used when Weights is 'local file'")
        note["weights"] = st.empty()
        balanced = st.checkbox("Class-balanced sampling", value=d.balanced)
        run_name = st.text_input("Run name (optional)", "", help="folder name under models/; default: backbone + time")
        note["run_name"] = st.empty()
    with c2:
        epochs = st.number_input("Epochs", min_value=0, max_value=10_000, value=int(d.epochs), step=1)
        note["epochs"] = st.empty()
        batch_size = st.number_input("Batch size", min_value=0, max_value=100_000, value=int(d.batch_size), step=8)
        note["batch_size"] = st.empty()
        lr = st.number_input("Learning rate", min_value=0.0, max_value=100.0, value=float(d.lr), step=1e-4,
                             format="%.5f")
        note["lr"] = st.empty()
        image_size = st.number_input("Image size (px)", min_value=0, max_value=4096, value=int(d.image_size), step=16)
        note["image_size"] = st.empty()
        label_smoothing = st.number_input("Label smoothing", min_value=0.0, max_value=1.0,
                                          value=float(d.label_smoothing), step=0.05, format="%.2f")
        note["label_smoothing"] = st.empty()
        haversine_tau = st.number_input("Haversine smoothing tau (km, 0 = off)", min_value=0.0, max_value=100_000.0,
                                        value=float(d.haversine_tau), step=25.0,
                                        help="PIGEON's label smoothing over nearby cells")
        note["haversine_tau"] = st.empty()
    submitted = st.form_submit_button("Launch", type="primary")

if submitted:
    weights = weights_file.strip() if weights_choice == "local file" else weights_choice
    params = jobs.TrainParams(levels=",".join(map(str, sorted(levels))), per_level=SHAPES[shape],
                              backbone=backbone, weights=weights, epochs=int(epochs), batch_size=int(batch_size),
                              lr=float(lr), image_size=int(image_size), label_smoothing=float(label_smoothing),
                              haversine_tau=float(haversine_tau), balanced=balanced)
    errors = jobs.validate(params, tuple(hier_levels))
    if not levels:
        errors["levels"] = "pick at least one level"
    if run_name.strip() and not jobs.RUN_NAME_RE.match(run_name.strip()):
        errors["run_name"] = "use letters, digits, '.', '_' or '-' (at most 80)"
    for field, msg in errors.items():
        note.get(field, st).error(msg)
    if not errors:
        try:
            run_dir = jobs.launch(ws, params, run_name.strip() or None)
            st.session_state.selected_run = run_dir.name
            st.success(f"Launched {run_dir.name}: it appears below and updates every 2 s.")
        except GeohierError as exc:
            st.error(str(exc))

# ----------------------------------------------------------------------------- the runs


def _eta(seconds) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


@st.fragment(run_every=2)
def runs_panel() -> None:
    st.subheader("Runs")
    infos = jobs.list_jobs(ws)
    if not infos:
        st.caption("No runs yet.")
        return
    table = pd.DataFrame([{
        "run": j.name, "state": j.state, "progress": j.progress,
        "epoch": f"{j.epoch or 0}/{j.epochs}" if j.epochs else "", "ETA": _eta(j.eta_s),
        "backbone": j.backbone or "", "levels": ",".join(map(str, j.levels)), "updated": j.updated_at or "",
    } for j in infos])
    st.dataframe(table, hide_index=True, use_container_width=True, column_config={
        "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
    })
    names = [j.name for j in infos]
    current = st.session_state.get("selected_run")
    pick = st.selectbox("Run", names, index=names.index(current) if current in names else 0, key="run_pick")
    st.session_state.selected_run = pick
    info = next(j for j in infos if j.name == pick)
    if info.error:
        st.error(info.error.splitlines()[0])
    cols = st.columns(3)
    if info.state in jobs.ACTIVE_STATES:
        if cols[0].button("Cancel", key=f"cancel-{pick}"):
            try:
                jobs.cancel(info.path)
                st.toast(f"Stopping {pick}: it saves its weights first.")
            except GeohierError as exc:
                st.error(str(exc))
    else:
        more = None
        if info.state == "done":
            more = cols[1].number_input("Total epochs", min_value=1, max_value=10_000,
                                        value=int((info.epochs or 1) + 1), key=f"epochs-{pick}")
        label = "Train longer" if info.state == "done" else "Resume"
        if info.state in ("cancelled", "failed", "done") and cols[0].button(label, key=f"resume-{pick}"):
            try:
                jobs.resume(ws, info.path, epochs=int(more) if more else None)
                st.toast(f"Resumed {pick}.")
            except GeohierError as exc:
                st.error(str(exc))
    st.caption("Log (last lines)")
    st.code(jobs.tail_log(info.path, 30) or "(empty)", language=None)


runs_panel()
