"""Train: launch a training job in the background, watch it, cancel or resume it.

The form is TrainConfig's page fields (``pipeline.train.config_fields(page=True)``): each
field's label, step and help come from its metadata, its messages from the one validator
that the command line uses too.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import streamlit as st

from geohier.errors import GeohierError
from geohier.model import BACKBONES
from geohier.runs import ACTIVE_STATES, Run
from geohier.workspace import read_json
from pages._common import workspace
from pipeline import jobs
from pipeline.train.config import WEIGHT_CHOICES, config_fields, recommended_config, validate

SHAPES = {"One model for all levels": False, "One model per level (the seed's shape)": True}
WEIGHT_OPTIONS = (*WEIGHT_CHOICES, "local file")

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
    hier_levels = [int(v) for v in read_json(ws.hierarchy_path)["levels"]]
except (KeyError, TypeError, ValueError) as exc:
    st.error(f"cannot read {ws.hierarchy_path}: {exc}; rebuild it with `python -m pipeline labels`")
    st.stop()

if "train_defaults" not in st.session_state:
    # the small demo recipe on a CPU, the full defaults on a GPU
    st.session_state.train_defaults = recommended_config(hier_levels)
d = st.session_state.train_defaults


def _widget(f, value):
    """The widget of one TrainConfig field; returns the value it gives the config."""
    ui, kind = f.metadata["page"], f.metadata["kind"]
    label, help_ = ui["label"], ui.get("help")
    if f.name == "levels":
        return sorted(st.multiselect(label, hier_levels, default=value or hier_levels, help=help_))
    if f.name == "per_level":
        shapes = list(SHAPES)
        return SHAPES[st.radio(label, shapes, index=int(bool(value)), help=help_)]
    if f.name == "backbone":
        return st.selectbox(label, BACKBONES, index=BACKBONES.index(value) if value in BACKBONES else 0, help=help_)
    if f.name == "weights":
        choice = st.selectbox(label, WEIGHT_OPTIONS,
                              index=WEIGHT_OPTIONS.index(value) if value in WEIGHT_OPTIONS else 0, help=help_)
        path = st.text_input("Local weights file (.safetensors)", "", help="used when Weights is 'local file'")
        return path.strip() if choice == "local file" else choice
    if kind == "bool":
        return st.checkbox(label, value=bool(value), help=help_)
    if kind == "int":
        return int(st.number_input(label, value=int(value), step=int(ui.get("step", 1)), help=help_))
    if kind == "float":
        return float(st.number_input(label, value=float(value), step=float(ui.get("step", 0.1)),
                                     format=ui.get("format", "%.3f"), help=help_))
    return st.text_input(label, value or "", help=help_).strip() or None


# ----------------------------------------------------------------------------- the form

with st.form("train_form"):
    st.subheader("New run")
    values, note = {}, {}  # field -> its value; field -> placeholder for its message
    fields = config_fields(page=True)
    c1, c2 = st.columns(2)
    for f in fields:
        with c2 if f.metadata["kind"] in ("int", "float") else c1:
            values[f.name] = _widget(f, getattr(d, f.name))
            note[f.name] = st.empty()
    submitted = st.form_submit_button("Launch", type="primary")

if submitted:
    config = replace(d, **values)
    errors = validate(config, tuple(hier_levels))
    for name, msg in errors.items():
        note.get(name, st).error(msg)
    if not errors:
        try:
            run_dir = jobs.launch(ws, config)
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
    if info.state in ACTIVE_STATES:
        if cols[0].button("Cancel", key=f"cancel-{pick}"):
            try:
                jobs.cancel(info.path)
                st.toast(f"Stopping {pick}: it saves its weights first.")
            except GeohierError as exc:
                st.error(str(exc))
    else:
        more = None
        if info.state == "done":
            more = cols[1].number_input("Total epochs", min_value=1, max_value=jobs.MAX_RESUME_EPOCHS,
                                        value=int((info.epochs or 1) + 1), key=f"epochs-{pick}")
        label = "Train longer" if info.state == "done" else "Resume"
        if info.state in ("cancelled", "failed", "done") and cols[0].button(label, key=f"resume-{pick}"):
            try:
                jobs.resume(ws, info.path, epochs=int(more) if more else None)
                st.toast(f"Resumed {pick}.")
            except GeohierError as exc:
                st.error(str(exc))
    st.caption("Log (last lines)")
    st.code(Run(info.path).tail(30) or "(empty)", language=None)


runs_panel()
