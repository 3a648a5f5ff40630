"""Plotly figures of the Accuracy page: learning curves, distance accuracy against
published references, reliability diagrams, per-country accuracy.

Inputs are plain data (a run's metrics.jsonl records, an eval.json dict), so the figures
are testable without Streamlit and usable from a notebook.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from geohier.metrics import KM_THRESHOLDS

#: Published accuracies (%) within 1 / 25 / 200 / 750 / 2500 km on Im2GPS3k, a different
#: test set (Flickr photos) from a workspace's own test split: context, not a comparison.
REFERENCES: tuple[dict, ...] = (
    {"name": "ISN (Müller-Budack et al. 2018)", "dataset": "Im2GPS3k",
     "acc": {1: 10.5, 25: 28.0, 200: 36.6, 750: 49.7, 2500: 66.0},
     "cite": "E. Müller-Budack, K. Pustu-Iren, R. Ewerth: Geolocation Estimation of Photos using a "
             "Hierarchical Model and Scene Classification, ECCV 2018 (ISNs M, f*, S3)"},
    {"name": "PIGEOTTO (Haas et al. 2024)", "dataset": "Im2GPS3k",
     "acc": {1: 11.3, 25: 36.7, 200: 53.8, 750: 72.4, 2500: 85.3},
     "cite": "L. Haas, M. Skreta, S. Alberti, C. Finn: PIGEON: Predicting Image Geolocations, CVPR 2024"},
)

KM_LABELS = {1: "1 km (street)", 25: "25 km (city)", 200: "200 km (region)", 750: "750 km (country)",
             2500: "2500 km (continent)"}
PALETTE = ("#2a7ab0", "#d9822b", "#3a9d5d", "#a7465f", "#7a5fb0", "#8c6d3f", "#4f9fb8", "#b05f9a")
SPLIT_DASH = {"train": "dash", "val": "solid"}


def _colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


# ----------------------------------------------------------------------------- learning curves

def history_frame(histories: Mapping[str, Sequence[dict]]) -> pd.DataFrame:
    """Long table of per-level accuracies per epoch: columns run, epoch, split, level,
    metric, value, from ``{run: [metrics.jsonl records]}``."""
    rows = []
    for run, records in histories.items():
        for rec in records:
            epoch = rec.get("epoch")
            for split in ("train", "val"):
                for level, m in (rec.get(split) or {}).items():
                    if not isinstance(m, Mapping):
                        continue
                    for metric, value in m.items():
                        if isinstance(value, (int, float)):
                            rows.append({"run": run, "epoch": epoch, "split": split, "level": int(level),
                                         "metric": metric, "value": float(value)})
    return pd.DataFrame(rows, columns=["run", "epoch", "split", "level", "metric", "value"])


def fig_level_curves(histories: Mapping[str, Sequence[dict]], metric: str = "top1") -> go.Figure:
    """One panel per level: ``metric`` (top1 / top5 / top10) against the epoch, a colour
    per run, train dashed and val solid."""
    df = history_frame(histories)
    df = df[df["metric"] == metric]
    levels = sorted(df["level"].unique().tolist()) or [0]
    fig = make_subplots(rows=1, cols=len(levels), shared_yaxes=True,
                        subplot_titles=[f"level {lv}" for lv in levels] if not df.empty else None)
    runs = list(histories)
    for i, run in enumerate(runs):
        for split in ("train", "val"):
            for j, lv in enumerate(levels):
                part = df[(df["run"] == run) & (df["split"] == split) & (df["level"] == lv)].sort_values("epoch")
                if part.empty:
                    continue
                fig.add_trace(go.Scatter(
                    x=part["epoch"], y=part["value"] * 100, mode="lines+markers",
                    name=f"{run} · {split}", legendgroup=f"{run}-{split}", showlegend=j == 0,
                    line={"color": _colour(i), "dash": SPLIT_DASH[split]},
                    hovertemplate=f"{run} {split} L{lv}<br>epoch %{{x}}<br>{metric} %{{y:.1f}}%<extra></extra>"),
                    row=1, col=j + 1)
    fig.update_yaxes(title_text=f"{metric} accuracy (%)", row=1, col=1, rangemode="tozero")
    fig.update_xaxes(title_text="epoch", dtick=1)
    fig.update_layout(height=360, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      legend={"orientation": "h", "y": -0.25})
    return fig


# ----------------------------------------------------------------------------- distance accuracy

def km_table(evals: Mapping[str, dict]) -> pd.DataFrame:
    """One row per run: accuracy (%) within each threshold, GeoScore, median / mean km,
    images and what was evaluated."""
    rows = []
    for run, ev in evals.items():
        g = ev.get("geo") or {}
        row = {"run": run}
        for t in KM_THRESHOLDS:
            v = g.get(f"acc_{t}km")
            row[f"{t} km"] = None if v is None else 100 * v
        src = ev.get("source") or {}
        row.update({"GeoScore": g.get("geoscore"), "median km": g.get("median_km"), "mean km": g.get("mean_km"),
                    "images": ev.get("images"),
                    "evaluated on": (f"{src.get('split')} split" if src.get("kind") == "split"
                                     else str(src.get("csv", "?")).rsplit("/", 1)[-1]),
                    "rule": g.get("rule")})
        rows.append(row)
    return pd.DataFrame(rows)


def fig_km_accuracy(evals: Mapping[str, dict], references: Sequence[dict] = REFERENCES) -> go.Figure:
    """Accuracy within 1 / 25 / 200 / 750 / 2500 km of each run (solid), with the
    published references as dotted grey lines labelled with their (other) dataset."""
    x = [KM_LABELS[t] for t in KM_THRESHOLDS]
    fig = go.Figure()
    for i, (run, ev) in enumerate(evals.items()):
        g = ev.get("geo") or {}
        y = [None if g.get(f"acc_{t}km") is None else 100 * g[f"acc_{t}km"] for t in KM_THRESHOLDS]
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=run, line={"color": _colour(i), "width": 3},
                                 hovertemplate=f"{run}<br>%{{x}}: %{{y:.1f}}%<extra></extra>"))
    for j, ref in enumerate(references):
        y = [ref["acc"].get(t) for t in KM_THRESHOLDS]
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers+text", name=f"{ref['name']} — on {ref['dataset']}, another dataset",
            line={"color": "#888888" if j == 0 else "#555555", "dash": "dot", "width": 1.5},
            marker={"symbol": "diamond-open"}, text=[None] * (len(x) - 1) + [ref["name"].split(" (")[0]],
            textposition="middle right", textfont={"size": 10, "color": "#666666"},
            hovertemplate=f"{ref['name']} on {ref['dataset']}<br>%{{x}}: %{{y:.1f}}%<extra></extra>"))
    fig.update_layout(yaxis={"title": "images within the distance (%)", "range": [0, 100]},
                      xaxis={"title": "distance from the true location"}, height=400,
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend={"orientation": "h", "y": -0.3})
    return fig


def references_caption(references: Sequence[dict] = REFERENCES) -> str:
    """The caption naming where the reference lines come from."""
    cites = "; ".join(f"{r['name']}: {r['cite']}" for r in references)
    return ("Dotted lines: published results on Im2GPS3k (3,000 Flickr photos), a different test set from "
            f"this workspace's, shown for scale only. {cites}.")


# ----------------------------------------------------------------------------- calibration

def fig_reliability(reliability: Mapping[str, dict], level: int | str | None = None,
                    temperature: float | None = None) -> go.Figure:
    """Reliability diagram of one level: accuracy against mean confidence per bin, before
    and after temperature scaling (``{"before": bins, "after": bins}`` from eval.json),
    with the diagonal of perfect calibration. Marker size follows the bin's count."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                             line={"color": "#aaaaaa", "dash": "dash"}, hoverinfo="skip"))
    styles = {"before": ("#d9822b", "T = 1"), "after": ("#2a7ab0", f"T = {temperature:.2f}" if temperature else "fitted T")}
    for key in ("before", "after"):
        bins = reliability.get(key)
        if not bins:
            continue
        counts = bins["count"]
        keep = [i for i, c in enumerate(counts) if c > 0]
        total = max(1, sum(counts))
        colour, label = styles[key]
        fig.add_trace(go.Scatter(
            x=[bins["confidence"][i] for i in keep], y=[bins["accuracy"][i] for i in keep],
            mode="lines+markers", name=f"{key} ({label}), ECE {100 * bins.get('ece', 0):.1f}%",
            line={"color": colour}, marker={"size": [6 + 24 * (counts[i] / total) ** 0.5 for i in keep]},
            customdata=[[counts[i], bins["lo"][i], bins["hi"][i]] for i in keep],
            hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{customdata[0]} images "
                          "in (%{customdata[1]:.2f}, %{customdata[2]:.2f}]<extra></extra>"))
    title = f"level {level}" if level is not None else None
    fig.update_layout(title=title, xaxis={"title": "confidence (top-1 probability)", "range": [0, 1]},
                      yaxis={"title": "accuracy", "range": [0, 1]}, height=380,
                      margin={"l": 10, "r": 10, "t": 40 if title else 20, "b": 10},
                      legend={"orientation": "h", "y": -0.3})
    return fig


# ----------------------------------------------------------------------------- countries

def country_frame(countries: Sequence[dict]) -> pd.DataFrame:
    """eval.json's per-country rows as a table with percentages."""
    df = pd.DataFrame(list(countries))
    if df.empty:
        return df
    for col in [c for c in df.columns if c.startswith("acc_") or c == "country_acc"]:
        df[col] = df[col].astype(float) * 100
    return df


def fig_country_accuracy(countries: Sequence[dict], metric: str = "country_acc", top: int = 25) -> go.Figure:
    """Horizontal bars of ``metric`` (%) for the ``top`` countries with the most test
    images (the label says how many)."""
    df = country_frame(countries)
    fig = go.Figure()
    if not df.empty and metric in df:
        df = df.sort_values("n", ascending=False).head(top).iloc[::-1]
        fig.add_trace(go.Bar(x=df[metric], y=[f"{c} ({n})" for c, n in zip(df["country"], df["n"], strict=True)],
                             orientation="h", marker={"color": "#2a7ab0"},
                             hovertemplate="%{y}: %{x:.1f}%<extra></extra>"))
    fig.update_layout(xaxis={"title": f"{metric.replace('_', ' ')} (%)", "range": [0, 100]},
                      height=max(260, 22 * min(top, len(df)) + 80), margin={"l": 10, "r": 10, "t": 20, "b": 10})
    return fig


def country_map(countries: Sequence[dict], metric: str = "country_acc", height: int = 420):
    """An offline folium choropleth of ``metric`` (0-1, e.g. country_acc or acc_750km)
    per country of the true location (Natural Earth outlines; countries without test
    images stay uncoloured). Built on ``geohier.maps.base_map``, so it needs no network."""
    import folium

    from geohier import geography, maps

    value = {r["country"]: r.get(metric) for r in countries if r.get(metric) is not None}
    n = {r["country"]: r.get("n") for r in countries}
    outlines = geography.country_outlines()
    feats = [f for f in outlines["features"] if f["properties"]["name"] in value]
    colours = maps.color_scale([value[f["properties"]["name"]] for f in feats], vmin=0.0, vmax=1.0,
                               colors=("#d7191c", "#fdae61", "#ffffbf", "#a6d96a", "#1a9641"))
    styled = []
    for f, colour in zip(feats, colours, strict=True):
        name = f["properties"]["name"]
        props = {"name": name, "value": f"{100 * value[name]:.1f}%", "n": int(n.get(name) or 0), "fill": colour}
        styled.append({"type": "Feature", "properties": props, "geometry": f["geometry"]})
    m = maps.base_map(outlines=True, height=height)
    folium.GeoJson(
        {"type": "FeatureCollection", "features": styled}, name=metric.replace("_", " "),
        style_function=lambda feat: {"fillColor": feat["properties"]["fill"], "color": "#555555",
                                     "weight": 0.6, "fillOpacity": 0.8},
        tooltip=folium.GeoJsonTooltip(["name", "value", "n"], aliases=["country", metric.replace("_", " "),
                                                                       "test images"]),
    ).add_to(m)
    maps.add_legend(m, [("#d7191c", "0%"), ("#ffffbf", "50%"), ("#1a9641", "100%")],
                    title=metric.replace("_", " "), note="countries of the true locations")
    return maps.finish(m)


# ----------------------------------------------------------------------------- leaderboard

def leaderboard_frame(table: pd.DataFrame) -> pd.DataFrame:
    """A leaderboard table (``geohier.leaderboard.Leaderboard.table``) for display:
    percentages for accuracies, rounded km, readable headers."""
    out = pd.DataFrame({"system": table["name"], "kind": table["kind"]})
    out["GeoScore"] = table["geoscore"]
    out["median km"] = table["median_km"]
    for t in KM_THRESHOLDS:
        out[f"{t} km"] = 100 * pd.to_numeric(table[f"acc_{t}km"], errors="coerce")
    out["country"] = 100 * pd.to_numeric(table["country_acc"], errors="coerce")
    out["images"] = table["n"]
    out["missing"] = table["missing"]
    out["note"] = table["note"]
    return out


def fig_leaderboard_curve(table: pd.DataFrame, references: Sequence[dict] = REFERENCES) -> go.Figure:
    """The distance curve of every leaderboard row (baselines dashed), with the published
    references dotted, labelled as measured on their own dataset."""
    evals = {}
    for _, row in table.iterrows():
        evals[str(row["name"])] = {"geo": {f"acc_{t}km": row[f"acc_{t}km"] for t in KM_THRESHOLDS}}
    fig = fig_km_accuracy(evals, references)
    for trace, (_, row) in zip(fig.data, table.iterrows()):
        if row["kind"] == "baseline":
            trace.line.dash = "dash"
            trace.line.width = 2
    return fig


#: The error map's colour ramp: log scale from 1 km (green) to 20,000 km (dark red).
ERROR_COLOURS = ("#1a9850", "#fee08b", "#fdae61", "#d73027", "#7f0000")
ERROR_KM_RANGE = (1.0, 20_000.0)


def error_colours(km) -> list[str]:
    """The error map's colour of each error distance (km)."""
    from geohier import maps

    return maps.color_scale(km, log=True, vmin=ERROR_KM_RANGE[0], vmax=ERROR_KM_RANGE[1], colors=ERROR_COLOURS)


def error_legend() -> list[tuple[str, str]]:
    """(colour, label) rows of the error map's legend: the colour each protocol threshold
    gets on the ramp (so a label never names a distance its colour does not have)."""
    marks = (*KM_THRESHOLDS, ERROR_KM_RANGE[1])
    labels = [f"{'≤ ' if i == 0 else ''}{km:,.0f} km" for i, km in enumerate(marks)]
    return list(zip(error_colours(marks), labels, strict=True))


def error_map(points: pd.DataFrame, *, max_lines: int = 1500, seed: int = 0, height: int = 480):
    """Lines from each true point to its prediction, coloured by error km (log scale, green
    near, red far), sampled to ``max_lines`` with a fixed seed so the page stays fast.
    Missing predictions are left out (their count is the caller's to show)."""
    import folium

    from geohier import geodesy, maps

    pts = points.dropna(subset=["pred_lat", "pred_lon"])
    if len(pts) > max_lines:
        pts = pts.sample(max_lines, random_state=seed)
    d = geodesy.haversine_km(pts["pred_lat"], pts["pred_lon"], pts["true_lat"], pts["true_lon"])
    colours = error_colours(d)
    m = maps.base_map(height=height)
    group = folium.FeatureGroup(name="errors")
    for (tl, to, pl, po), km, c in zip(pts[["true_lat", "true_lon", "pred_lat", "pred_lon"]].to_numpy(), d, colours):
        folium.PolyLine([(tl, to), (pl, po)], color=c, weight=1.5, opacity=0.7,
                        tooltip=f"{km:,.0f} km").add_to(group)
        folium.CircleMarker((tl, to), radius=2, color="#222222", weight=0.5, fill=True, fill_opacity=1).add_to(group)
    group.add_to(m)
    maps.add_legend(m, error_legend(), title="Error",
                    note=f"{len(pts):,} of {len(points):,} images shown; dots are the true places")
    return maps.finish(m)


def cell_hit_map(points: pd.DataFrame, level: int):
    """Cells of the true points at ``level``, coloured by hit rate (the prediction falls in
    the same cell), with images and hits in the tooltip."""
    from geohier import benchmark, maps

    cells = benchmark.cell_hit_rates(points["true_lat"], points["true_lon"], points["pred_lat"],
                                     points["pred_lon"], level)
    m = maps.base_map()
    colours = maps.color_scale(cells["hit_rate"], vmin=0.0, vmax=1.0,
                               colors=("#d73027", "#fee08b", "#1a9850"))
    layer = maps.cells_layer(cells["key"], level, colours,
                             fields={"images": cells["images"].tolist(), "hits": cells["hits"].tolist(),
                                     "hit %": (100 * cells["hit_rate"]).round(1).tolist()},
                             tooltip=[("cell", "Cell"), ("images", "Images"), ("hits", "Hits"), ("hit %", "Hit rate %")],
                             name=f"L{level} hit rate")
    m.add_child(layer)
    maps.add_legend(m, [("#d73027", "0%"), ("#fee08b", "50%"), ("#1a9850", "100%")],
                    title=f"L{level} hit rate", note="cells of the true points; hit = prediction in the same cell")
    return maps.finish(m)


def hierarchy_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """``geohier.benchmark.hierarchy_misses`` rows for display."""
    return pd.DataFrame([{"level": r["level"], "hit rate %": 100 * r["hit_rate"],
                          "finest misses wrong here": r["wrong_parent"],
                          "share of finest misses %": 100 * r["share"] if r["share"] == r["share"] else None}
                         for r in rows])


# ----------------------------------------------------------------------------- recall vs area, abstention

ABSTAIN_DASH = {25: "dot", 200: "dashdot", 750: "dash", 2500: "solid"}


def with_key(evals: Mapping[str, dict], key: str) -> tuple[dict[str, dict], list[str]]:
    """``({run: eval} of the evaluations that carry ``key``, [runs evaluated before it])``."""
    have = {run: ev for run, ev in evals.items() if ev and ev.get(key)}
    return have, [run for run in evals if run not in have]


def missing_caption(missing: Sequence[str], what: str) -> str | None:
    """The caption naming runs absent from a figure because their eval.json predates it."""
    if not missing:
        return None
    return (f"Not shown: {', '.join(missing)} (evaluated before {what} was recorded; evaluate "
            f"{'it' if len(missing) == 1 else 'them'} again to add {'it' if len(missing) == 1 else 'them'}).")


def fig_recall_area(evals: Mapping[str, dict]) -> go.Figure:
    """Per run (eval.json ``recall_area``), the share of test truths inside the top-ranked
    finest cells against those cells' cumulative area (log km²). Runs without the block
    are skipped (see ``with_key``)."""
    have, _ = with_key(evals, "recall_area")
    fig = go.Figure()
    for i, (run, ev) in enumerate(have.items()):
        pts = ev["recall_area"].get("points") or []
        fig.add_trace(go.Scatter(
            x=[p["area_km2"] for p in pts], y=[None if p["recall"] is None else 100 * p["recall"] for p in pts],
            mode="lines+markers", name=run, line={"color": _colour(i), "width": 3, "shape": "hv"},
            marker={"size": 5},
            hovertemplate=f"{run}<br>%{{x:,.0f}} km²: %{{y:.1f}}% of truths<extra></extra>"))
    for area, label in ((1e4, "a metro area"), (3e5, "a country (Italy)"), (1e7, "a continent")):
        fig.add_vline(x=area, line={"color": "#bbbbbb", "dash": "dot", "width": 1},
                      annotation={"text": label, "font": {"size": 10, "color": "#777777"}})
    fig.update_layout(xaxis={"title": "area of the top-ranked cells searched (km², log)", "type": "log"},
                      yaxis={"title": "truths found (%)", "range": [0, 100]}, height=400,
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend={"orientation": "h", "y": -0.3})
    return fig


def conformal_table(evals: Mapping[str, dict]) -> pd.DataFrame:
    """One row per run and target coverage of eval.json's ``conformal`` (runs without it
    are skipped, see ``with_key``): the test photos and the place groups covered by their
    prediction regions (%, with standard errors), the cross-fit (calibrated on half the
    split's groups, measured on the other half), the regions' mean cells and median area,
    and how the calibration weighed its images (``guaranteed``: which share the target is
    promised for)."""
    have, _ = with_key(evals, "conformal")

    def pct(v):
        return None if v is None else 100 * float(v)

    rows = []
    for run, ev in have.items():
        cal = ev.get("conformal_calibration") or {}
        method = cal.get("method") or "groups"
        for target, r in ev["conformal"].items():
            cross = r.get("crossfit") or {}
            rows.append({"run": run, "target": f"{100 * float(target):g}%",
                         "photos covered": pct(r.get("coverage")), "± photos": pct(r.get("coverage_se")),
                         "places covered": pct(r.get("group_coverage")), "± places": pct(r.get("group_coverage_se")),
                         "cross-fit photos": pct(cross.get("coverage")),
                         "cross-fit places": pct(cross.get("group_coverage")),
                         "mean cells": r.get("mean_cells"), "median km²": r.get("median_area_km2"),
                         "guaranteed": "places" if method == "groups" else "photos"})
    return pd.DataFrame(rows, columns=["run", "target", "photos covered", "± photos", "places covered", "± places",
                                       "cross-fit photos", "cross-fit places", "mean cells", "median km²",
                                       "guaranteed"])


def fig_abstention(evals: Mapping[str, dict], km: Sequence[int] = (25, 200, 750, 2500)) -> go.Figure:
    """Per run (eval.json ``abstention``), accuracy within each distance of ``km`` against
    the share of test images answered, the most confident first (colour: run; dash:
    distance). Runs without the block are skipped."""
    have, _ = with_key(evals, "abstention")
    fig = go.Figure()
    for i, (run, ev) in enumerate(have.items()):
        rows = ev["abstention"].get("rows") or []
        x = [100 * r["share"] for r in rows]
        for t in km:
            y = [None if r.get(f"acc_{t}km") is None else 100 * r[f"acc_{t}km"] for r in rows]
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="lines+markers", name=f"{run} · {t} km", legendgroup=run,
                line={"color": _colour(i), "dash": ABSTAIN_DASH.get(t, "solid"), "width": 2},
                customdata=[r.get("min_confidence") for r in rows],
                hovertemplate=(f"{run}, within {t} km<br>%{{x:.0f}}% answered: %{{y:.1f}}%"
                               "<br>confidence ≥ %{customdata:.3f}<extra></extra>")))
    fig.update_layout(xaxis={"title": "images answered, most confident first (%)", "range": [0, 102]},
                      yaxis={"title": "answered images within the distance (%)", "range": [0, 100]},
                      height=420, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      legend={"orientation": "h", "y": -0.3})
    return fig
