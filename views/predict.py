"""Predict: drop street photos, see level by level where the model thinks they were taken,
and tune the keep rules with their effect on val accuracy measured live. Runs with
embeddings can refine the guess to the nearest training images inside the kept cells."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import streamlit as st
from streamlit_folium import st_folium

from geohier import charts, combine, explorer, geodesy, maps
from geohier.errors import GeohierError
from geohier.images import DecodeBusyError, decode_slot
from geohier.predictor import Predictor
from geohier.predictor import load_predictor as load_run_predictor
from geohier.runs import run_choices, runs_key
from views._common import workspace

UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "heic", "heif"]
K_RANGE = (1, 20)
METRICS = {"hit": "True cell kept", "top1": "Top-1 cell", "acc_25km": "Within 25 km",
           "acc_200km": "Within 200 km", "acc_750km": "Within 750 km", "acc_2500km": "Within 2500 km"}

# ----------------------------------------------------------------------------- cached work


@st.cache_resource(show_spinner=False, max_entries=2)
def load_predictor(runs: tuple[str, ...], stamp: tuple) -> Predictor:
    return load_run_predictor(list(runs))


@st.cache_resource(show_spinner=False, max_entries=64)
def upload_logits(runs: tuple[str, ...], stamp: tuple, sha: str, name: str, _data: bytes) -> dict:
    """One forward pass per upload and run: moving a control re-uses these logits (and,
    for a single run, the features that refinement compares with the training images)."""
    predictor = load_predictor(runs, stamp)
    try:
        with decode_slot():  # sessions share images.DECODE_SLOTS; busy after DECODE_WAIT_S
            img, gps = predictor.read_image(_data, name)
    except DecodeBusyError:
        raise  # not cached: the next rerun tries again
    except GeohierError as exc:
        return {"error": str(exc)}
    feats = None
    if len(predictor.models) == 1:
        out, f = predictor.logits_and_features([img])
        feats = f.numpy()  # (1, D)
    else:
        out = predictor.logits([img])
    try:
        predictor.check_finite(out)  # corrupt weights: one line, not a page of NaN
    except GeohierError as exc:
        return {"error": f"{name}: {exc}"}
    logits = {lv: z.cpu().numpy() for lv, z in out.items()}  # {lv: (1, C)}
    img.thumbnail((360, 360))
    return {"logits": logits, "features": feats, "gps": gps, "thumb": img, "error": None}


@st.cache_resource(show_spinner=False, max_entries=16)
def explain_upload(runs: tuple[str, ...], stamp: tuple, sha: str, name: str, _data: bytes, grid: int,
                   temperature: bool, method: str = "occlusion") -> dict:
    """Why the guess, for one upload (``geohier.explain``): occlusion (grid**2 + 1 forwards)
    or Grad-CAM (a forward and a backward), only on demand, and once per photo, method,
    grid and temperature setting."""
    from geohier import explain

    predictor = load_predictor(runs, stamp)
    try:
        with decode_slot():
            img, _ = predictor.read_image(_data, name)
    except DecodeBusyError:
        raise
    except GeohierError as exc:
        return {"error": str(exc)}
    try:
        expl = explain.explain(predictor, img, method, grid=grid, temperature=temperature)
    except GeohierError as exc:  # Grad-CAM of a per-level set, or of a backbone it cannot read
        return {"error": str(exc)}
    img.thumbnail((720, 720))
    return {"error": None, "explanation": expl, "photo": img}


@st.cache_resource(show_spinner=False, max_entries=8)
def world_map(runs: tuple[str, ...], stamp: tuple, sha: str, temperature: bool, within: str,
              best: tuple[float, float], _logp, _true):
    """The world probability map of one upload (``maps.probability_map``), built once per
    photo, temperature setting and region limit."""
    predictor = load_predictor(runs, stamp)
    h = predictor.hierarchy
    return maps.probability_map(h.keys(predictor.finest), predictor.finest, _logp, best=best, true=_true,
                                depths=h.depths(predictor.finest) if h.adaptive else None)


@st.cache_resource(show_spinner=False, max_entries=2)
def load_explorer(runs: tuple[str, ...], stamp: tuple, key: str, data_dir: str, models_dir: str,
                  max_rows: int) -> explorer.Explorer:
    """The explorer over the cached val logits (``key``: what they were computed from)."""
    from pathlib import Path

    from geohier.workspace import Workspace

    predictor = load_predictor(runs, stamp)
    return explorer.Explorer.for_predictor(predictor, Workspace(Path(data_dir), Path(models_dir)),
                                           max_rows=max_rows)


@st.cache_resource(show_spinner=False, max_entries=32)
def sweep_rows(_ex: explorer.Explorer, key: str, rules_json: str, temperature: bool, param: str) -> list[dict]:
    """The trade-off curve; keyed without the swept parameter, so moving that one control
    only moves the marked point."""
    rules = {int(lv): combine.KeepRule.from_dict(r) for lv, r in json.loads(rules_json).items()}
    return _ex.sweep(rules, temperature, param)


# ----------------------------------------------------------------------------- controls


def _key(field: str, scope) -> str:
    return f"predict_{field}_{scope}"


DEFAULTS = {"rule": combine.DEFAULT_RULE, "top_k": combine.DEFAULT_TOP_K, "cumulative": combine.DEFAULT_CUMULATIVE,
            "thresholds": ",".join(f"{t:.2f}" for t in combine.DEFAULT_THRESHOLDS), "k_max": combine.DEFAULT_K_MAX,
            "min_prob": 0.0}


def rule_controls(scope, label: str) -> combine.KeepRule:
    """The widgets of one keep rule (every level, or one); returns the rule."""
    for field, value in DEFAULTS.items():
        if scope != "all":  # a level's controls start from the all-levels setting
            value = st.session_state.get(_key(field, "all"), value)
        st.session_state.setdefault(_key(field, scope), value)
    rule = st.selectbox(f"Rule{label}", combine.RULES, key=_key("rule", scope),
                        help="adaptive: keep 1, 2, 3 classes when the top probability reaches the thresholds, "
                             "else k max; topk: a fixed number; cumulative: the smallest set reaching p")
    st.slider(f"k{label}", *K_RANGE, key=_key("top_k", scope), disabled=rule != "topk",
              help="topk rule: classes kept at this level")
    st.text_input(f"Adaptive thresholds{label}", key=_key("thresholds", scope), disabled=rule != "adaptive",
                  help="keep 1, 2, 3... classes when the top probability reaches these (decreasing)")
    st.slider(f"k max{label}", *K_RANGE, key=_key("k_max", scope), disabled=rule != "adaptive",
              help="adaptive rule: classes kept when the top probability is under every threshold")
    st.slider(f"Cumulative p{label}", 0.05, 0.99, step=0.01, key=_key("cumulative", scope),
              disabled=rule != "cumulative", help="cumulative rule: smallest set whose probability reaches p")
    st.slider(f"Minimum probability{label}", 0.0, 0.5, step=0.005, format="%.3f", key=_key("min_prob", scope),
              help="drop candidates under this probability (the top one is always kept)")
    thresholds = combine.parse_thresholds(st.session_state[_key("thresholds", scope)])
    return combine.KeepRule(rule, top_k=int(st.session_state[_key("top_k", scope)]),
                          cumulative=float(st.session_state[_key("cumulative", scope)]), thresholds=thresholds,
                          k_max=int(st.session_state[_key("k_max", scope)]),
                          min_prob=float(st.session_state[_key("min_prob", scope)]))


def apply_setting(param: str, value, levels) -> None:
    """Button callback: set ``param`` to ``value`` on the Predict controls of every level."""
    v = int(value) if param in ("top_k", "k_max") else float(value)
    for scope in ("all", *levels):
        st.session_state[_key(param, scope)] = v
    st.session_state["predict_applied"] = f"{param} = {value:g} applied to every level"


# ----------------------------------------------------------------------------- page

ws = workspace()
st.title("Predict")
st.caption("Where was this street photo taken? Level by level, the model keeps the likeliest cells and "
           "narrows them down within the kept parents.")

choices = run_choices(ws.models_dir)
if not choices:
    st.info("No trained run yet. Train one on the Train page or with `python -m pipeline train`; "
            "`make run` builds the demo data and trains the small demo model.")
    st.stop()

with st.sidebar:
    labels = [c.label for c in choices]
    label = st.selectbox("Run", labels, key="predict_run",
                         help="the newest finished run first; 'set' = one model per level (the seed's shape)")
    choice = choices[labels.index(label)]
runs = tuple(str(p) for p in choice.runs)
stamp = runs_key(choice.runs)
try:
    with st.spinner("Loading the model..."):
        predictor = load_predictor(runs, stamp)
except GeohierError as exc:
    st.error(str(exc))
    st.stop()
if predictor.synthetic_note:
    st.warning(predictor.synthetic_note, icon="⚠️")

with st.sidebar:
    temperature = st.toggle("Temperature scaling", value=True, key="predict_temperature",
                            help="divide each level's logits by its calibrated temperature (meta.json)")
    same = st.toggle("One rule for every level", value=True, key="predict_same")
    try:
        if same:
            one = rule_controls("all", "")
            rules = dict.fromkeys(predictor.levels, one)
        else:
            rules = {}
            for lv in predictor.levels:
                with st.expander(f"Level {lv} ({predictor.tree.num_classes[lv]:,} classes)",
                                 expanded=lv == predictor.levels[0]):
                    rules[lv] = rule_controls(lv, f" (L{lv})")
    except GeohierError as exc:
        st.error(str(exc))
        st.stop()
    refine = st.toggle("Refine with nearest training images", value=False, key="predict_refine",
                       disabled=not predictor.can_refine,
                       help="move the guess from the cell's position to the similarity-weighted position of the "
                            "most similar training images inside the kept cells (runs trained on a frozen "
                            "backbone's embeddings)")
    if not predictor.can_refine:
        st.caption(f"Refinement is off: {predictor.refine_problem}.")
    refine = refine and predictor.can_refine
    # how sure: a coverage region (conformal), a region limit, abstention
    can_cover = predictor.conformal is not None
    cover_on = st.toggle("Coverage region", value=False, key="predict_coverage_on", disabled=not can_cover,
                         help="the smallest set of cells holding the true one with the chosen probability "
                              "(conformal, calibrated on the run's val split)")
    coverage = st.slider("Coverage", 0.5, 0.99, 0.9, step=0.01, key="predict_coverage",
                         disabled=not (can_cover and cover_on))
    if not can_cover:
        st.caption(f"No coverage region: run `python -m pipeline evaluate {predictor.runs[0].name} --calibrate` "
                   "to calibrate it.")
    coverage = coverage if can_cover and cover_on else None
    within_text = st.text_input("Only within", "", key="predict_within", placeholder="country:FR,DE or bbox:S,W,N,E",
                                help="cells outside get zero probability before the keep rules; no answer is "
                                     "ever outside")
    limit = None
    if within_text.strip():
        try:
            limit = predictor.limit(within_text)
            st.caption(f"Within {limit.describe()}.")
        except GeohierError as exc:
            st.error(str(exc))
    if limit is not None and refine:
        st.caption("Refinement is off inside a region limit (it could move the guess outside).")
        refine = False
    abstain = st.slider("Not sure below confidence", 0.0, 1.0, 0.0, step=0.01, key="predict_abstain",
                        help="answer 'not sure' (the region instead of a point) when the top joint probability "
                             "of a cell is under this (0: always answer)")
    abstain = abstain if abstain > 0 else None
    if st.session_state.get("predict_applied"):
        st.success(st.session_state.pop("predict_applied"))
    st.caption(f"Run `{predictor.name}` · levels {', '.join(map(str, predictor.levels))} · "
               f"input {predictor.presets[0].image_size} px")

files = st.file_uploader("Street photos", type=UPLOAD_TYPES, accept_multiple_files=True, key="predict_upload",
                         help="JPEG, PNG, WebP (HEIC with pillow-heif); EXIF GPS, when present, shows the error")
tab_predict, tab_explore = st.tabs(["Prediction", "Threshold explorer"])

with tab_predict:
    loaded, names, uploads = [], [], []
    for f in files or []:
        data = f.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        with st.spinner(f"Reading {f.name}..."):
            try:
                entry = upload_logits(runs, stamp, sha, f.name, data)
            except DecodeBusyError as exc:
                entry = {"error": f"{f.name}: {exc}"}
        if entry["error"]:
            st.error(entry["error"])
        else:
            loaded.append(entry)
            names.append(f.name)
            uploads.append((sha, data))
    if not files:
        st.info("Drop one or more street photos above. Photos with EXIF GPS also show how far off the guess is.")
    elif loaded:
        logits = {lv: np.concatenate([e["logits"][lv] for e in loaded]) for lv in predictor.levels}
        feats = np.concatenate([e["features"] for e in loaded]) if refine else None
        try:
            preds = predictor.predict_logits(logits, names, [e["gps"] for e in loaded], rules, temperature,
                                             features=feats, refine=refine, coverage=coverage, abstain=abstain,
                                             within=limit)
        except GeohierError as exc:  # an unusable neighbour index: say so, show the unrefined guess
            st.error(f"Refinement failed, showing the cells' positions: {exc}")
            preds = predictor.predict_logits(logits, names, [e["gps"] for e in loaded], rules, temperature,
                                             coverage=coverage, abstain=abstain, within=limit)
        if len(preds) > 1:
            st.dataframe(charts.summary_frame(preds).drop(columns=["problem"]), hide_index=True,
                         column_config={"prob": st.column_config.NumberColumn(format="%.3f")})
        pick = st.selectbox("Photo", range(len(preds)), format_func=lambda i: names[i], key="predict_pick") \
            if len(preds) > 1 else 0
        pred, entry = preds[pick], loaded[pick]
        best = pred.best
        c1, c2 = st.columns([1, 2])
        c1.image(entry["thumb"], caption=names[pick])
        with c2:
            if pred.abstained:
                st.warning(f"Not sure: the confidence ({pred.confidence:.1%}, the top joint probability) is under "
                           f"{abstain:.0%}. The place is somewhere in the {pred.region.n_cells:,} cell(s) on the "
                           f"map ({pred.region.area_km2:,.0f} km²); the best guess below is only the likeliest.")
            st.metric("Best guess", best.place or best.country or best.cell,
                      help=f"cell {best.cell} at {best.lat:.4f}, {best.lon:.4f}")
            m1, m2, m3 = st.columns(3)
            m1.metric("Country", best.country or "–")
            m2.metric("Probability", f"{best.prob:.1%}",
                      help=f"among the level-{max(pred.levels)} cells kept; the whole path's (joint) "
                           f"probability is {best.joint:.1%}")
            m3.metric(f"Cells kept (L{max(pred.levels)})", len(pred.levels[max(pred.levels)]))
            if best.refined is not None:
                moved = float(geodesy.haversine_km(best.lat, best.lon, best.refined.cell_lat, best.refined.cell_lon))
                st.caption(f"Refined: {len(best.refined.neighbours)} nearest training image(s) in this cell moved "
                           f"the guess {moved:,.1f} km from the cell's position "
                           f"(best similarity {best.refined.neighbours[0]['sim']:.3f}).")
            elif pred.refined is False:
                st.caption("Not refined: no training image in the kept cells; the cell's position stands.")
            if pred.region is not None:
                r1, r2 = st.columns(2)
                what = f"{pred.region.coverage:.0%} coverage region" if pred.region.source == "conformal" \
                    else "kept cells"
                r1.metric("Region cells", f"{pred.region.n_cells:,}",
                          help=what + (f" ({len(pred.region.rest)} of them the rest of a coarser cell outside its "
                                       "class sub-cells)" if pred.region.rest else ""))
                r2.metric("Region area", f"{pred.region.area_km2:,.0f} km²",
                          help=f"{what}; joint probability {pred.region.mass:.1%}")
            if pred.true:
                t1, t2 = st.columns(2)
                t1.metric("Error (EXIF GPS)", f"{pred.true['error_km']:,.0f} km")
                t2.metric("GeoScore", f"{pred.true['geoscore']:,.0f}")
        # a mounted map redraws only under a new key: the key follows what the map shows
        st_folium(maps.prediction_map(pred, predictor), height=480, use_container_width=True,
                  returned_objects=[], key=f"predict_map_{pick}_{maps.prediction_key(pred)}")
        # the whole world: every finest class by its joint probability (one canvas layer)
        if st.toggle("World probability map", value=True, key="predict_world",
                     help=f"all {predictor.tree.num_classes[predictor.finest]:,} level-{predictor.finest} classes "
                          "coloured by their joint probability, log scale: a guess split between two continents "
                          "shows as two blotches"):
            row = {lv: logits[lv][pick:pick + 1] for lv in predictor.levels}
            logp = predictor.log_joint(row, temperature, within=limit)[0].numpy()
            true_at = (pred.true["lat"], pred.true["lon"]) if pred.true else None
            # a copy: rendering a folium map twice changes its script (layers added again), so the
            # cached map itself is never rendered
            wmap = copy.deepcopy(world_map(runs, stamp, uploads[pick][0], temperature,
                                           limit.describe() if limit else "", (float(best.lat), float(best.lon)),
                                           logp, true_at))
            st_folium(wmap, height=420, use_container_width=True, returned_objects=[],
                      key=f"predict_world_map_{pick}")
            st.caption(f"Joint probability of every level-{predictor.finest} class (product of each level's "
                       "probability given its parent); the colour spans six powers of ten below the top cell.")
        # why this guess, on demand: occlusion (grid**2 + 1 forwards) or Grad-CAM (a forward and a backward)
        from geohier import explain

        if st.toggle("Why this guess", value=False, key="predict_explain",
                     help="occlusion: mask each patch of the photo in turn and see how much the guess depends on "
                          "it (one forward per patch); Grad-CAM: where the backbone's features (a CNN's last feature "
                          "map, a ViT's patch tokens) hold the evidence for the best cell (one forward and one "
                          "backward)"):
            method = st.radio("Method", explain.METHODS, horizontal=True, key="predict_explain_method",
                              format_func={"occlusion": "occlusion (any backbone)",
                                           "gradcam": "Grad-CAM (CNNs and ViTs)"}.get)
            grid_n, measure = explain.DEFAULT_GRID, "drop"
            if method == "occlusion":
                x1, x2 = st.columns(2)
                grid_n = x1.slider("Patches per side", 3, 12, explain.DEFAULT_GRID, key="predict_explain_grid")
                measure = x2.radio("Show", explain.MEASURES, horizontal=True, key="predict_explain_measure",
                                   format_func={"drop": "probability drop of the best cell",
                                                "moved_km": "km the guess moves"}.get)
            with st.spinner(f"Masking {grid_n * grid_n} patches..." if method == "occlusion" else "Grad-CAM..."):
                try:
                    ex = explain_upload(runs, stamp, uploads[pick][0], names[pick], uploads[pick][1], int(grid_n),
                                        temperature, method)
                except DecodeBusyError as exc:
                    ex = {"error": f"{names[pick]}: {exc}"}
            if ex["error"]:
                st.error(ex["error"])
            elif method == "gradcam":
                e = ex["explanation"]
                st.image(explain.overlay(ex["photo"], e), width=480,
                         caption=f"{names[pick]}: red = the features that raise the best cell's probability")
                st.caption(f"Grad-CAM on `{e.layer}` ({e.cam.shape[0]} x {e.cam.shape[1]} map) in {e.seconds:.2f} s: "
                           f"the feature map weighted by the gradient of best cell {e.base['cell']}'s log joint "
                           "probability. Coarse by nature; occlusion measures what the guess loses patch by patch.")
            else:
                e = ex["explanation"]
                st.image(explain.overlay(ex["photo"], e, measure),
                         caption=f"{names[pick]}: red = the guess depends on this patch", width=480)
                worst = np.unravel_index(int(np.argmax(e.values(measure))), e.drop.shape)
                st.caption(f"{e.forwards} forwards in {e.seconds:.1f} s. Masking a patch (painted the model's mean "
                           f"colour) drops the best cell {e.base['cell']}'s joint probability by up to "
                           f"{e.drop.max():.1%} and moves the guess up to {e.moved_km.max():,.0f} km "
                           f"(strongest: row {worst[0] + 1}, column {worst[1] + 1}). The unmasked guess here is "
                           "the default keep rules' best cell, without region limits.")
        st.plotly_chart(charts.level_bars(pred), width="stretch")
        st.subheader("Candidates")
        st.dataframe(charts.candidates_frame(pred), hide_index=True,
                     column_config={"prob": st.column_config.ProgressColumn("prob", min_value=0.0, max_value=1.0,
                                                                            format="%.3f"),
                                    "joint": st.column_config.NumberColumn(
                                        "joint", format="%.4f", help="probability of the whole path")})
        st.caption("prob: among the cells kept at this level (what the rules use); joint: the product of "
                   "every level's probability along the path.")
        with st.expander("Every level's kept cells"):
            st.dataframe(charts.levels_frame(pred), hide_index=True)
        if best.refined is not None:
            with st.expander("Nearest training images used"):
                st.dataframe(best.refined.neighbours, hide_index=True)

with tab_explore:
    st.caption("How the keep rules above trade accuracy for candidates on the val split: the model runs "
               "once over it, then every control change is re-scored at once.")
    max_rows = int(st.number_input("Val images (at most)", 100, 100_000, explorer.DEFAULT_MAX_ROWS, step=1000,
                                   key="explorer_rows"))
    try:
        key = json.dumps(explorer.cache_key(predictor, ws, "val", max_rows), sort_keys=True)
    except GeohierError as exc:
        key = None
        st.info(str(exc))
    if key is not None and json.loads(key)["split_rows"] == 0:
        st.info("The workspace has no val split yet: build the splits with `python -m pipeline labels`.")
        key = None
    if key is not None:
        ready = explorer.has_cache(predictor, ws, "val", max_rows) or st.session_state.get("explorer_go") == key
        if not ready:
            rows = json.loads(key)["split_rows"]
            st.info(f"The explorer needs the model's outputs on the val split ({min(rows, max_rows):,} images; "
                    "computed once, then cached in the run directory).")
            st.button("Compute val logits", key="explorer_compute",
                      on_click=lambda: st.session_state.update(explorer_go=key))
        if ready:
            try:
                if not explorer.has_cache(predictor, ws, "val", max_rows):
                    bar = st.progress(0.0, text="Val logits...")
                    explorer.load_val_logits(
                        predictor, ws, "val", max_rows,
                        progress=lambda d, t: bar.progress(min(1.0, d / max(t, 1)),
                                                           text=f"Val logits: {d:,} / {t:,} images"))
                    bar.empty()
                ex = load_explorer(runs, stamp, key, str(ws.data_dir), str(ws.models_dir), max_rows)
                if limit is not None:  # the val images from the region, answered within it
                    ex = ex.limited(limit)
            except GeohierError as exc:
                st.error(str(exc))
                st.stop()
            current = ex.evaluate(rules, temperature)
            cols = st.columns(4)
            for col, name in zip(cols, ("hit", "top1"), strict=False):
                col.metric(METRICS[name], f"{current[name]:.1%}")
            cols[2].metric(f"Mean cells kept (L{predictor.finest})", f"{current['kept']:.2f}")
            cols[3].metric("GeoScore", f"{current['geoscore']:,.0f}")
            for col, name in zip(st.columns(4), ("acc_25km", "acc_200km", "acc_750km", "acc_2500km"), strict=True):
                col.metric(METRICS[name], f"{current[name]:.1%}")
            st.caption((f"Within {limit.describe()}: " if limit is not None else "")
                       + f"{current['rows']:,} val images · median error {current['median_km']:,.0f} km · "
                       "true cell kept = the true finest cell is among the kept ones; top-1 = it is the best")
            finest_rule = rules[predictor.finest]
            params = ["top_k", "k_max", "cumulative", "min_prob"]
            default_param = explorer.sweep_for(finest_rule)[0]
            e1, e2 = st.columns(2)
            param = e1.selectbox("Sweep", params, index=params.index(default_param), key="explorer_param",
                                 help="the parameter varied on every level for the curve")
            metric = e2.selectbox("Accuracy", list(METRICS), format_func=METRICS.get, key="explorer_metric")
            base = {lv: dict(r.to_dict(), **{param: combine.KeepRule().to_dict()[param]})
                    for lv, r in rules.items()}
            curve = sweep_rows(ex, key + (f"|within {limit.describe()}" if limit is not None else ""), json.dumps({str(k): v for k, v in base.items()}, sort_keys=True),
                               temperature, param)
            st.plotly_chart(charts.tradeoff_figure(curve, current, metric), width="stretch")
            if curve:
                values = [r["value"] for r in curve]
                a1, a2 = st.columns([2, 1])
                value = a1.select_slider(f"Setting to apply ({param})", values,
                                         value=values[len(values) // 2], key="explorer_value")
                row = curve[values.index(value)]
                a1.caption(f"{param} = {value:g}: {METRICS[metric].lower()} {row[metric]:.1%}, "
                           f"{row['kept']:.2f} cells kept")
                a2.button(f"Apply {param} = {value:g}", key="explorer_apply", on_click=apply_setting,
                          args=(param, value, predictor.levels))
            st.dataframe([{"level": lv, "true cell kept": v.get("hit"), "top-1": v.get("top1"),
                           "cells kept": v["kept"]} for lv, v in current["levels"].items()], hide_index=True)
