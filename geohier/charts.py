"""Plotly figures shared by the pages and the CLI, and the numbers behind them.

The numeric helpers (``gini``, ``lorenz``, ``imbalance_stats``, ``count_bins``) are pure
numpy and tested with hand-computed values; the ``fig_*`` functions only draw them. The
Predict page's tables and figures of predictions (``summary_frame`` ... ``tradeoff_figure``)
are here too; its map is ``geohier.maps.prediction_map``.

>>> gini([1, 1, 1, 1]), gini([0, 0, 0, 1])
(0.0, 0.75)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from geohier import geodesy

KEPT_COLOUR = "#2a7ab0"
DROPPED_COLOUR = "#d9822b"


# --------------------------------------------------------------------------- numbers


def _counts(counts) -> np.ndarray:
    a = np.asarray(counts, dtype=np.float64).ravel()
    if a.size and (np.any(~np.isfinite(a)) or np.any(a < 0)):
        raise ValueError("counts must be finite and non-negative")
    return a


def gini(counts) -> float:
    """Gini coefficient of a count distribution: sum |x_i - x_j| / (2 n^2 mean).

    0 when every class has the same count, (n - 1) / n when one class has everything.
    0.0 for no classes or no images.

    >>> round(gini([1, 2, 3]), 6)
    0.222222
    """
    x = np.sort(_counts(counts))
    n, total = x.size, x.sum()
    if n == 0 or total == 0:
        return 0.0
    i = np.arange(1, n + 1)
    # Sorted form of the mean absolute difference: (2 sum i x_(i)) / (n sum x) - (n + 1) / n.
    return float(2.0 * np.dot(i, x) / (n * total) - (n + 1.0) / n)


def lorenz(counts) -> tuple[np.ndarray, np.ndarray]:
    """Lorenz curve: (share of classes, share of images held by the smallest of them),
    from (0, 0) to (1, 1), classes sorted by ascending count.

    >>> [a.tolist() for a in lorenz([3, 1])]
    [[0.0, 0.5, 1.0], [0.0, 0.25, 1.0]]
    """
    x = np.sort(_counts(counts))
    n, total = x.size, x.sum()
    share_classes = np.arange(n + 1, dtype=np.float64) / max(n, 1)
    if total == 0:
        return share_classes, share_classes.copy()
    return share_classes, np.concatenate([[0.0], np.cumsum(x) / total])


def imbalance_stats(counts, min_images: int = 1) -> dict:
    """Summary of a per-class count distribution.

    Keys: classes, images, min, median, max, mean, gini, max_median_ratio,
    share_under_min (share of classes with fewer than ``min_images``), images_under_min
    (share of images in those classes), top10_share (share of images held by the largest
    10% of classes, at least one class).

    >>> s = imbalance_stats([1, 2, 3, 10], min_images=3)
    >>> s["max_median_ratio"], s["share_under_min"], s["images_under_min"]
    (4.0, 0.5, 0.1875)
    """
    x = np.sort(_counts(counts))[::-1]
    n, total = int(x.size), float(x.sum())
    if n == 0:
        return {"classes": 0, "images": 0, "min": 0, "median": 0.0, "max": 0, "mean": 0.0, "gini": 0.0,
                "max_median_ratio": float("nan"), "share_under_min": 0.0, "images_under_min": 0.0,
                "top10_share": 0.0}
    median = float(np.median(x))
    under = x < min_images
    top = max(1, int(np.ceil(0.1 * n)))
    return {
        "classes": n,
        "images": int(total),
        "min": int(x[-1]),
        "median": median,
        "max": int(x[0]),
        "mean": total / n,
        "gini": gini(x),
        "max_median_ratio": float(x[0] / median) if median > 0 else float("inf"),
        "share_under_min": float(under.mean()),
        "images_under_min": float(x[under].sum() / total) if total else 0.0,
        "top10_share": float(x[:top].sum() / total) if total else 0.0,
    }


def count_bins(counts, min_images: int | None = None) -> dict[str, np.ndarray]:
    """Power-of-two bins of images per class: [1], [2, 3], [4, 7], [8, 15], ...

    Returns {"lo", "hi", "label", "classes", "under_min"}: bin bounds (inclusive), a label
    ("1", "2-3", ...), the number of classes in each bin, and how many of them have fewer
    than ``min_images`` images. Classes with 0 images are left out.

    >>> b = count_bins([1, 2, 3, 9], min_images=3)
    >>> b["label"].tolist(), b["classes"].tolist(), b["under_min"].tolist()
    (['1', '2-3', '4-7', '8-15'], [1, 2, 0, 1], [1, 1, 0, 0])
    """
    x = _counts(counts)
    x = x[x > 0].astype(np.int64)
    if not x.size:
        empty = np.array([], dtype=np.int64)
        return {"lo": empty, "hi": empty, "label": np.array([], dtype=str), "classes": empty,
                "under_min": empty}
    nbins = int(np.floor(np.log2(x.max()))) + 1
    b = np.floor(np.log2(x)).astype(np.int64)  # bin index: floor(log2 count)
    lo = 2 ** np.arange(nbins, dtype=np.int64)
    hi = 2 * lo - 1
    label = np.array([str(a) if a == z else f"{a}-{z}" for a, z in zip(lo, hi, strict=True)])
    classes = np.bincount(b, minlength=nbins)
    under = np.bincount(b[x < (min_images or 0)], minlength=nbins)
    return {"lo": lo, "hi": hi, "label": label, "classes": classes, "under_min": under}


# --------------------------------------------------------------------------- figures


def fig_class_histogram(counts, level: int | None = None, min_images: int | None = None,
                        log_y: bool = False) -> go.Figure:
    """Classes per power-of-two bin of images per class (a log-scale count axis), bars
    split into cells kept and cells under ``min_images``."""
    b = count_bins(counts, min_images)
    kept = b["classes"] - b["under_min"]
    fig = go.Figure()
    fig.add_bar(x=b["label"], y=kept, name=f"≥ {min_images} images" if min_images else "cells",
                marker_color=KEPT_COLOUR, hovertemplate="%{x} images: %{y} cells<extra></extra>")
    if min_images and b["under_min"].any():
        fig.add_bar(x=b["label"], y=b["under_min"], name=f"< {min_images} images (dropped)",
                    marker_color=DROPPED_COLOUR, hovertemplate="%{x} images: %{y} cells<extra></extra>")
    title = "Images per cell" + (f" at level {level}" if level is not None else "")
    fig.update_layout(barmode="stack", title=title, bargap=0.05, height=340,
                      margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.25))
    fig.update_xaxes(title="images per cell (log₂ bins)", type="category")
    fig.update_yaxes(title="cells", type="log" if log_y else "linear")
    return fig


def fig_lorenz(counts, level: int | None = None) -> go.Figure:
    """The Lorenz curve of images over classes, with the line of equality and the Gini."""
    xs, ys = lorenz(counts)
    g = gini(counts)
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="equal counts",
                    line=dict(color="#999", dash="dot"), hoverinfo="skip")
    fig.add_scatter(x=xs, y=ys, mode="lines", name="cells", line=dict(color=KEPT_COLOUR),
                    fill="tonexty", fillcolor="rgba(42,122,176,0.12)",
                    hovertemplate="smallest %{x:.0%} of cells hold %{y:.1%} of images<extra></extra>")
    title = f"Lorenz curve{f' at level {level}' if level is not None else ''} — Gini {g:.3f}"
    fig.update_layout(title=title, height=340, margin=dict(l=10, r=10, t=40, b=10), showlegend=False)
    fig.update_xaxes(title="share of cells (smallest first)", tickformat=".0%", range=[0, 1])
    fig.update_yaxes(title="share of images", tickformat=".0%", range=[0, 1])
    return fig


def fig_kept_by_min(counts, minimums: Sequence[int] = (1, 2, 5, 10, 20, 50, 100)) -> go.Figure:
    """Classes kept and share of images kept as the minimum grows (one level, no parent rule)."""
    x = _counts(counts)
    total = x.sum() or 1.0
    kept = [int((x >= m).sum()) for m in minimums]
    share = [float(x[x >= m].sum() / total) for m in minimums]
    fig = go.Figure()
    fig.add_bar(x=[str(m) for m in minimums], y=kept, name="classes kept", marker_color=KEPT_COLOUR)
    fig.add_scatter(x=[str(m) for m in minimums], y=share, name="images kept", yaxis="y2",
                    mode="lines+markers", line=dict(color=DROPPED_COLOUR))
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=30, b=10),
                      yaxis=dict(title="classes"),
                      yaxis2=dict(title="images kept", overlaying="y", side="right", tickformat=".0%",
                                  range=[0, 1.05]),
                      xaxis=dict(title="min images per cell", type="category"),
                      legend=dict(orientation="h", y=-0.3))
    return fig


# --------------------------------------------------------------------------- predictions (Predict page)


def summary_frame(preds: Sequence) -> pd.DataFrame:
    """One row per image: best cell, probability, country, place, and the error when the
    photo has EXIF GPS (or the reason it could not be read)."""
    rows = []
    for p in preds:
        b = p.best
        row = {"image": p.image, "best cell": b.cell if b else None, "prob": b.prob if b else None,
               "joint": b.joint if b else None,
               "country": b.country if b else None, "place": b.place if b else None,
               "lat": round(b.lat, 4) if b else None, "lon": round(b.lon, 4) if b else None,
               "error km": p.true["error_km"] if p.true else None,
               "GeoScore": p.true["geoscore"] if p.true else None, "problem": p.error}
        rows.append(row)
    return pd.DataFrame(rows)


def candidates_frame(pred) -> pd.DataFrame:
    """The kept finest-level cells of one prediction, ranked, with where they are."""
    finest = max(pred.levels)
    rows = [{"rank": i, "cell": c.cell, "prob": c.prob, "joint": c.joint, "parent": c.parent, "country": c.country,
             "place": c.place, "lat": round(c.lat, 4), "lon": round(c.lon, 4),
             "km from truth": (round(float(geodesy.haversine_km(c.lat, c.lon, pred.true["lat"], pred.true["lon"])), 1)
                               if pred.true else None)}
            for i, c in enumerate(pred.levels[finest], 1)]
    return pd.DataFrame(rows)


def levels_frame(pred) -> pd.DataFrame:
    """Every kept candidate of every level (level, cell, prob, joint, parent)."""
    return pd.DataFrame([{"level": lv, "cell": c.cell, "prob": c.prob, "joint": c.joint, "parent": c.parent}
                         for lv in sorted(pred.levels) for c in pred.levels[lv]])


def level_bars(pred) -> go.Figure:
    """One bar chart per level: the kept candidates' probabilities."""
    from plotly.subplots import make_subplots

    levels = sorted(pred.levels)
    fig = make_subplots(rows=1, cols=len(levels), subplot_titles=[f"Level {lv}" for lv in levels])
    for i, lv in enumerate(levels, 1):
        cands = pred.levels[lv]
        fig.add_trace(go.Bar(x=[c.cell for c in cands], y=[c.prob for c in cands], name=f"L{lv}",
                             marker_color=PROB_COLORS[min(i - 1, len(PROB_COLORS) - 1)],
                             hovertemplate="%{x}<br>p = %{y:.3f}<extra></extra>"), row=1, col=i)
        fig.update_xaxes(type="category", tickangle=-45, row=1, col=i)
        fig.update_yaxes(range=[0, 1], row=1, col=i)
    fig.update_layout(showlegend=False, height=300, margin=dict(l=10, r=10, t=40, b=10),
                      yaxis_title="probability")
    return fig


PROB_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02")
BEST_COLOR = "#d62728"
TRUE_COLOR = "#2ca02c"


def tradeoff_figure(rows: Sequence[dict], current: dict, metric: str = "hit",
                    label: str | None = None) -> go.Figure:
    """Accuracy (``metric``) against the mean number of finest cells kept over a sweep,
    with the current setting marked."""
    names = {"hit": "true cell among the kept", "top1": "best cell is the true one",
             **{f"acc_{t}km": f"best guess within {t} km" for t in (1, 25, 200, 750, 2500)}}
    fig = go.Figure()
    if rows:
        param = rows[0]["param"]
        fig.add_trace(go.Scatter(
            x=[r["kept"] for r in rows], y=[r[metric] for r in rows], mode="lines+markers+text",
            text=[f"{_short(param)}={r['value']:g}" for r in rows], textposition="top center",
            textfont=dict(size=10), name=f"sweep of {param}",
            hovertemplate="%{text}<br>kept %{x:.2f}<br>%{y:.1%}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[current["kept"]], y=[current[metric]], mode="markers", name=label or "current",
                             marker=dict(symbol="star", size=16, color=BEST_COLOR, line=dict(width=1, color="#222")),
                             hovertemplate="current<br>kept %{x:.2f}<br>%{y:.1%}<extra></extra>"))
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=30, b=10),
                      xaxis_title="mean finest cells kept", yaxis_title=names.get(metric, metric),
                      yaxis_tickformat=".0%", legend=dict(orientation="h", y=-0.2))
    fig.update_xaxes(type="log")
    return fig


def _short(param: str) -> str:
    return {"top_k": "k", "k_max": "k_max", "cumulative": "p", "min_prob": "min p"}.get(param, param)
