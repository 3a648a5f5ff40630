"""Train: launch a training job in the background, watch it, cancel or resume it.

The form is TrainConfig's page fields (``pipeline.train.config_fields(page=True)``): each
field's label, step and help come from its metadata, its messages from the one validator
that the command line uses too. The model's fields (backbone, weights, image size, frozen)
sit above the form, outside it: changing one reruns the page, so it can suggest frozen
mode for a foundation model and say how much of the workspace's embedding cache a frozen
run would reuse (``pipeline.embed.cache_overview``, cached on the caches' mtimes).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import streamlit as st

from geohier.backbones import BACKBONES, SPEC_HELP, SUGGESTED, is_foundation, parse_spec
from geohier.errors import GeohierError
from geohier.runs import ACTIVE_STATES, Run
from geohier.workspace import Workspace, read_json
from pipeline import jobs
from pipeline.embed import cache_overview, caches_version, matching_caches, same_spec_caches
from pipeline.train.config import WEIGHT_CHOICES, config_fields, recommended_config, validate
from views._common import manifest_version, workspace

SHAPES = {"One model for all levels": False, "One model per level (the seed's shape)": True}
LOCAL_FILE = "local file"
WEIGHT_OPTIONS = (*WEIGHT_CHOICES, LOCAL_FILE)
OTHER = "other…"
BACKBONE_OPTIONS = (*BACKBONES, *SUGGESTED, OTHER)
MODEL_FIELDS = ("backbone", "weights", "image_size", "frozen")  # above the form: they drive the cache panel
FOUNDATION_SIZE = 224  # px: the native input size of the suggested foundation specs
BACKBONE_HELP = (
    "torchvision names (resnet18 ...): ImageNet classifiers, fine-tuned end to end or frozen. "
    "hf:ORG/NAME: a Hugging Face transformers model (CLIP, SigLIP, DINOv2); open_clip:ARCH/PRETRAINED: "
    "an OpenCLIP image tower; timm:NAME: a timm model. These foundation models are best frozen. "
    "A hub model is downloaded on first use (needs the internet; later runs read the local cache); "
    "offline, download its folder where there is a network and pick other... with hf:/path/to/folder "
    "(or open_clip:/path, timm:/path).")
AUGMENTATIONS_IGNORED = (
    "Frozen: each train/val image is embedded once, with the backbone's evaluation preprocessing, and "
    "only the heads train. Image augmentations (mixup, cutmix, hflip, RandAugment) are ignored; "
    "class-balanced sampling still applies (to the features).")

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
    if f.metadata.get("choices"):
        choices = list(f.metadata["choices"])
        return st.selectbox(label, choices, index=choices.index(value) if value in choices else 0, help=help_)
    if kind == "bool":
        return st.checkbox(label, value=bool(value), help=help_)
    if kind == "int":
        return int(st.number_input(label, value=int(value), step=int(ui.get("step", 1)), help=help_))
    if kind == "float":
        return float(st.number_input(label, value=float(value), step=float(ui.get("step", 0.1)),
                                     format=ui.get("format", "%.3f"), help=help_))
    return st.text_input(label, value or "", help=help_).strip() or None


# ----------------------------------------------------------------------------- the model

ss = st.session_state
fields = {f.name: f for f in config_fields(page=True)}


def _init(key: str, value) -> str:
    """A keyed widget's first value (later runs keep what the user chose)."""
    if key not in ss:
        ss[key] = value
    return key


def _kept(key: str, default: str) -> str:
    """The key of a text input that is shown only sometimes: Streamlit forgets a widget's
    value while it is hidden, so a copy is kept to bring it back."""
    return _init(key, ss.get(f"{key}_kept", default))


def _spec() -> str:
    """The backbone spec chosen: a listed one, or the text of "other..."."""
    pick = ss.get("train_backbone")
    return str(ss.get("train_backbone_other") or "").strip() if pick == OTHER else str(pick)


def _suggest_frozen() -> None:
    """A foundation spec was chosen: turn frozen mode on, use its own weights rather than
    a random init, and the suggested specs' native size (OpenCLIP accepts no other)."""
    spec = _spec()
    try:
        foundation = is_foundation(spec)
    except GeohierError:
        return  # the spec's message shows next to it
    ss.pop("train_suggested", None)
    if not foundation:
        return
    changed = []
    if not ss.get("train_frozen"):
        ss.train_frozen = True
        changed.append("frozen backbone on")
    if ss.get("train_weights") == "none":
        ss.train_weights = "pretrained"
        changed.append("weights pretrained (its own, not a random init)")
    if spec in SUGGESTED and int(ss.get("train_image_size") or 0) < FOUNDATION_SIZE:
        ss.train_image_size = FOUNDATION_SIZE
        changed.append(f"image size {FOUNDATION_SIZE} px (its native size)")
    ss.train_suggested = (spec, changed)


def _option(name: str) -> str:
    if name == OTHER:
        return "other… (any spec, or a local folder)"
    return f"{name} (foundation, downloaded on first use)" if name in SUGGESTED else name


def _model_widgets(note: dict) -> dict:
    """Backbone, weights, image size and frozen: their values, their message placeholders
    in ``note``."""
    bb, w, size, fr = (fields[n] for n in MODEL_FIELDS)
    listed = d.backbone in BACKBONE_OPTIONS
    c1, c2 = st.columns(2)
    with c1:
        st.selectbox(bb.metadata["page"]["label"], BACKBONE_OPTIONS, format_func=_option, help=BACKBONE_HELP,
                     key=_init("train_backbone", d.backbone if listed else OTHER), on_change=_suggest_frozen)
        if ss.train_backbone == OTHER:
            st.text_input("Backbone spec", key=_kept("train_backbone_other", "" if listed else d.backbone),
                          placeholder="hf:/path/to/folder", on_change=_suggest_frozen,
                          help=f"{SPEC_HELP}; checked when you press Launch")
            ss.train_backbone_other_kept = ss.train_backbone_other
        note["backbone"] = st.empty()
        spec = _spec()
        if ss.train_backbone == OTHER and spec:
            try:
                parse_spec(spec)  # its form, at once; Launch runs the whole validator (which imports the library)
            except GeohierError as exc:
                note["backbone"].error(str(exc))
        ui = w.metadata["page"]
        listed_w = d.weights in WEIGHT_OPTIONS
        st.selectbox(ui["label"], WEIGHT_OPTIONS, help=ui.get("help"),
                     key=_init("train_weights", d.weights if listed_w else LOCAL_FILE))
        weights = ss.train_weights
        if weights == LOCAL_FILE:
            weights = st.text_input("Local weights file (.safetensors)",
                                    key=_kept("train_weights_file", "" if listed_w else d.weights),
                                    help="backbone weights as safetensors (a geohier checkpoint works too: "
                                         "its heads are ignored)").strip()
            ss.train_weights_file_kept = weights
        note["weights"] = st.empty()
    with c2:
        ui = size.metadata["page"]
        st.number_input(ui["label"], step=int(ui.get("step", 1)), help=ui.get("help"),
                        key=_init("train_image_size", int(d.image_size)))
        note["image_size"] = st.empty()
        ui = fr.metadata["page"]
        st.checkbox(ui["label"], help=ui.get("help"), key=_init("train_frozen", bool(d.frozen)))
        note["frozen"] = st.empty()
    return {"backbone": spec, "weights": weights, "image_size": int(ss.train_image_size),
            "frozen": bool(ss.train_frozen)}


def _advice(m: dict) -> None:
    """What frozen mode means here, and the suggestion for a foundation spec."""
    try:
        foundation = is_foundation(m["backbone"])
    except GeohierError:
        foundation = False
    done = ss.get("train_suggested")
    if foundation and not m["frozen"]:
        st.warning(f"{m['backbone']} is a foundation model: fine-tuning it end to end needs a GPU (on a CPU "
                   "an epoch takes hours). Tick Frozen backbone to embed each image once and train the heads.")
    elif foundation and done and done[0] == m["backbone"] and done[1]:
        st.info(f"{m['backbone']} is a foundation model, so: {'; '.join(done[1])}. Fine-tuning a ViT on a "
                "CPU is hopeless; frozen, each image is embedded once and an epoch of the heads takes seconds.")
    if m["frozen"]:
        st.caption(AUGMENTATIONS_IGNORED)


@st.cache_data(show_spinner=False, max_entries=16)
def _overview(data_dir: str, models_dir: str, version: tuple) -> dict:
    """``cache_overview`` of the workspace; ``version``: the caches' and manifest's mtimes."""
    return cache_overview(Workspace(Path(data_dir), Path(models_dir)))


def _weights_label(w) -> str:
    w = str(w or "none")
    return Path(w).name if "/" in w else w


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


def _cache_panel(m: dict) -> None:
    """The workspace's embedding caches, and what a frozen run of the chosen model reuses."""
    st.markdown("**Embedding cache** (frozen runs)")
    try:
        over = _overview(str(ws.data_dir), str(ws.models_dir), (caches_version(ws), manifest_version(ws)))
    except (GeohierError, OSError) as exc:
        st.warning(f"cannot read the embedding caches of {ws.data_dir}: {exc}")
        return
    n, splits = over["images"], "/".join(over["splits"])
    good = [c for c in over["caches"] if "error" not in c]
    if good:
        st.dataframe(pd.DataFrame([{
            "spec": c["describe"].get("spec"), "weights": _weights_label(c["describe"].get("weights")),
            "image size": (c["describe"].get("preprocess") or {}).get("image_size"), "features": c["dim"],
            "images": c["n"], f"of {splits} ({n})": c["held"], "on disk": _size(c["bytes"]),
            "updated": c["updated_at"] or "", "key": c["key"],
        } for c in good]), hide_index=True, width="stretch")
    for c in over["caches"]:
        if "error" in c:
            st.warning(f"cache folder {c['path']} cannot be read: {c['error']}")
        elif c.get("bad_shards"):
            st.warning(f"cache {c['key']}: {len(c['bad_shards'])} shard(s) cannot be read and are ignored")
    try:
        matches = matching_caches(over["caches"], m["backbone"], m["weights"], m["image_size"])
    except GeohierError:
        return  # the spec's message shows next to it
    what = f"{m['backbone']} at {m['image_size']} px (weights {_weights_label(m['weights'])})"
    if not n:
        st.caption(f"No {splits} images yet: assign splits on the Data page (`python -m pipeline labels`).")
        return
    if matches:
        best = max(matches, key=lambda c: c["held"])
        rest = n - best["held"]
        st.success(f"{best['held']} of the {n} {splits} images are already embedded by {what} (cache "
                   f"{best['key']}): a frozen run with the same weights reuses them and "
                   + (f"embeds the other {rest}." if rest else "embeds nothing."))
    else:
        others = same_spec_caches(over["caches"], m["backbone"])
        st.info(f"No cache of {what} yet: the first frozen run embeds the {n} {splits} images once; later "
                "runs with the same backbone, weights and image size reuse them."
                + (f" This backbone has caches at {'; '.join(others)}." if others else ""))
    if not m["frozen"]:
        st.caption("Only frozen runs use the cache; a fine-tuning run reads the images every epoch.")


st.subheader("New run")
note: dict = {}  # field -> placeholder for its message
model = _model_widgets(note)
_advice(model)
_cache_panel(model)

# ----------------------------------------------------------------------------- the form

with st.form("train_form"):
    st.markdown("**Training**")
    values = dict(model)  # field -> its value
    c1, c2 = st.columns(2)
    for f in fields.values():
        if f.name in MODEL_FIELDS:
            continue
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
    st.dataframe(table, hide_index=True, width="stretch", column_config={
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
