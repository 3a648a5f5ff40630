"""Accuracy, distance and calibration metrics (numpy / torch, no I/O).

Conventions shared by every function here:

- ``logits`` / ``probs`` are ``(N, C)`` arrays or tensors, ``targets`` ``(N,)`` class
  indices; a target < 0 (``-1`` = cell dropped at this level, ``-100`` = PyTorch's
  ``ignore_index``) is ignored.
- Accuracies are fractions in [0, 1] (pages multiply by 100 for display).
- Distances are great-circle km with R = 6371 km (``geohier.geodesy.haversine_km``), the
  value of the Im2GPS / OSV-5M geolocation protocol.

>>> topk_accuracy([[0.1, 0.9], [0.8, 0.2]], [1, 1], ks=(1, 2))
{1: 0.5, 2: 1.0}
>>> round(geoscore(0.0), 1)
5000.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from geohier import geodesy
from geohier.lazy import torch  # imported on first use: `score` reads metrics without torch

#: Distance thresholds (km) of the standard geolocation protocol: street, city, region,
#: country, continent.
KM_THRESHOLDS: tuple[int, ...] = (1, 25, 200, 750, 2500)

#: GeoGuessr's score scale: 5000 points at 0 km, e-fold every 1492.7 km.
GEOSCORE_MAX = 5000.0
GEOSCORE_SCALE_KM = 1492.7

#: Temperatures are searched in [T_MIN, T_MAX] (a bounded, deterministic 1-D search).
T_MIN, T_MAX = 0.05, 20.0

DEFAULT_BINS = 15


# ----------------------------------------------------------------------------- helpers

def _as_tensor(x, dtype=None) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.cpu()
    return t.to(dtype) if dtype is not None else t


def _valid(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose target is a real class (>= 0)."""
    if logits.ndim != 2:
        raise ValueError(f"expected (N, C) scores, got shape {tuple(logits.shape)}")
    targets = targets.reshape(-1).long()
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of scores but {targets.shape[0]} targets")
    keep = targets >= 0
    if bool((targets[keep] >= logits.shape[1]).any()):
        raise ValueError(f"a target is >= the number of classes ({logits.shape[1]})")
    return logits[keep], targets[keep]


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` as float64 numpy.

    >>> softmax([[0.0, 0.0]]).tolist()
    [[0.5, 0.5]]
    """
    z = _as_tensor(logits, torch.float64) / float(temperature)
    return torch.softmax(z, dim=-1).numpy()


# ----------------------------------------------------------------------------- top-k

def target_rank(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) each valid row's rank of its target among its scores: the classes scored
    strictly above, plus the equal ones with a lower index (so top-1 agrees with argmax);
    rows whose target is < 0 are left out. A hit at k is ``rank < k``. Two counting passes
    where the scores are (the training loop counts on the GPU); the tie term only for rows
    that have a tie."""
    z, t = _valid(z, targets)
    zt = z.gather(1, t[:, None])  # (N, 1) the target's score
    # int32 sums: a bool tensor summed to int64 takes several times as long
    rank = (z > zt).sum(1, dtype=torch.int32)
    tied = (z == zt).sum(1, dtype=torch.int32) > 1  # another class scores exactly the same
    if bool(tied.any()):
        r = tied.nonzero()[:, 0]
        lower = torch.arange(z.shape[1], device=z.device)[None, :] < t[r, None]
        rank[r] += ((z[r] == zt[r]) & lower).sum(1, dtype=torch.int32)
    return rank


def topk_correct(logits, targets, ks: Sequence[int] = (1, 5, 10)) -> tuple[dict[int, int], int]:
    """Counts of rows whose target is among the top k scores, and the number of valid rows.

    Ties are broken towards the lower class index (as ``argmax`` does), so top-1 agrees
    with ``argmax`` and the result never depends on the sort's luck. Use this to
    accumulate over batches; ``topk_accuracy`` is the one-shot ratio.

    >>> topk_correct([[1.0, 1.0, 0.0]], [1], ks=(1, 2))
    ({1: 0, 2: 1}, 1)
    """
    rank = target_rank(_as_tensor(logits, torch.float32), _as_tensor(targets))
    return {int(k): int((rank < int(k)).sum()) for k in ks}, int(rank.shape[0])


def topk_accuracy(logits, targets, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of rows (targets < 0 ignored) whose target is among the top k scores.

    k larger than the number of classes counts every valid row as correct. With no valid
    row the accuracy is 0.0 (accumulate with ``topk_correct`` when batches may be empty).

    >>> topk_accuracy([[3.0, 1.0, 2.0], [0.0, 1.0, 2.0], [5.0, 0.0, 0.0]], [2, 2, -1], ks=(1, 2))
    {1: 0.5, 2: 1.0}
    """
    hits, n = topk_correct(logits, targets, ks)
    return {k: (h / n if n else 0.0) for k, h in hits.items()}


# ----------------------------------------------------------------------------- distances

# one haversine for the whole project (R = 6371 km, as OSV-5M's evaluation)
haversine_km = geodesy.haversine_km


def geoscore(distance_km) -> np.ndarray | float:
    """GeoGuessr score 5000 * exp(-d / 1492.7) of a distance (or an array of them).

    >>> round(geoscore(1492.7), 1)
    1839.4
    """
    d = np.asarray(distance_km, dtype=np.float64)
    s = GEOSCORE_MAX * np.exp(-d / GEOSCORE_SCALE_KM)
    return float(s) if s.ndim == 0 else s


def km_accuracy(distance_km, thresholds: Sequence[float] = KM_THRESHOLDS) -> dict[str, float]:
    """Fraction of distances strictly below each threshold, keyed ``acc_<t>km``.

    Strict ``<`` as in OSV-5M's evaluation: an error of exactly 25 km is not "within 25 km".

    >>> km_accuracy([0.5, 25.0, 3000.0], thresholds=(1, 25, 2500))
    {'acc_1km': 0.3333333333333333, 'acc_25km': 0.3333333333333333, 'acc_2500km': 0.6666666666666666}
    """
    d = np.asarray(distance_km, dtype=np.float64).reshape(-1)
    out = {}
    for t in thresholds:
        name = f"acc_{int(t) if float(t).is_integer() else t}km"
        out[name] = float((d < t).mean()) if d.size else 0.0
    return out


#: The keys of a ``geo`` block (eval.json, ``score``, the leaderboard), in display order.
GEO_KEYS = tuple(f"acc_{t}km" for t in KM_THRESHOLDS) + ("geoscore", "geoscore_rounded", "median_km",
                                                           "mean_km", "n")


def distance_metrics(distance_km, thresholds: Sequence[float] = KM_THRESHOLDS) -> dict[str, float]:
    """The geolocation protocol on precomputed distances (OSV-5M's, exactly):

    ``acc_<t>km`` (strict ``<``) for each threshold; ``geoscore`` = mean of
    5000 * exp(-d / 1492.7), unrounded; ``geoscore_rounded`` = the mean of each image's score
    rounded to an integer first (PIGEON's way of reporting it); ``median_km``, ``mean_km``;
    ``n``. Statistics of an empty set are NaN.

    >>> m = distance_metrics([0.0, 1492.7])
    >>> round(m["geoscore"], 3), m["geoscore_rounded"]
    (3419.699, 3419.5)
    """
    d = np.asarray(distance_km, dtype=np.float64).reshape(-1)
    out: dict[str, float] = km_accuracy(d, thresholds)
    if d.size:
        s = geoscore(d)
        out.update(geoscore=float(np.mean(s)), geoscore_rounded=float(np.mean(np.round(s))),
                   median_km=float(np.median(d)), mean_km=float(d.mean()))
    else:
        out.update(geoscore=float("nan"), geoscore_rounded=float("nan"), median_km=float("nan"),
                   mean_km=float("nan"))
    out["n"] = int(d.size)
    return out


def geo_metrics(pred_lat, pred_lon, true_lat, true_lon,
                thresholds: Sequence[float] = KM_THRESHOLDS) -> dict[str, float]:
    """``distance_metrics`` of the haversine distances between predicted and true points.

    Keys: ``acc_1km``, ``acc_25km``, ``acc_200km``, ``acc_750km``, ``acc_2500km``,
    ``geoscore``, ``geoscore_rounded``, ``median_km``, ``mean_km``, ``n``.

    >>> m = geo_metrics([0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 10.0])
    >>> m["acc_1km"], m["acc_2500km"], round(m["median_km"], 1)
    (0.5, 1.0, 556.0)
    """
    d = haversine_km(pred_lat, pred_lon, true_lat, true_lon)
    return distance_metrics(d, thresholds)


def reliability_bins(probs, targets, bins: int = DEFAULT_BINS) -> dict:
    """Reliability-diagram table of the top-1 prediction in ``bins`` equal-width
    confidence bins (lo, hi] over [0, 1] (the first bin also takes 0).

    Returns ``{"bins", "lo", "hi", "count", "confidence", "accuracy", "n", "ece"}``:
    per-bin lists (mean confidence and accuracy are 0.0 where count is 0), the number
    of valid rows and the expected calibration error.
    """
    if int(bins) < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    bins = int(bins)
    p, t = _valid(_as_tensor(probs, torch.float64), _as_tensor(targets))
    conf, pred = p.max(1) if p.shape[0] else (torch.zeros(0, dtype=torch.float64), torch.zeros(0))
    correct = (pred == t).to(torch.float64) if p.shape[0] else torch.zeros(0, dtype=torch.float64)
    conf_np = conf.numpy()
    # bin b holds (b/bins, (b+1)/bins]
    which = np.clip(np.ceil(conf_np * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.int64)
    sum_conf = np.bincount(which, weights=conf_np, minlength=bins)
    sum_acc = np.bincount(which, weights=correct.numpy(), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sum_conf / np.maximum(count, 1), 0.0)
        mean_acc = np.where(count > 0, sum_acc / np.maximum(count, 1), 0.0)
    n = int(count.sum())
    ece = float(np.sum(count * np.abs(mean_acc - mean_conf)) / n) if n else 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {"bins": bins, "lo": edges[:-1].tolist(), "hi": edges[1:].tolist(),
            "count": count.tolist(), "confidence": mean_conf.tolist(),
            "accuracy": mean_acc.tolist(), "n": n, "ece": ece}


def expected_calibration_error(probs, targets, bins: int = DEFAULT_BINS) -> float:
    """ECE of the top-1 prediction: sum over bins of (count / N) * |accuracy - confidence|.

    >>> expected_calibration_error([[0.8, 0.2]] * 5, [0, 0, 0, 0, 1])
    0.0
    """
    return reliability_bins(probs, targets, bins)["ece"]


def nll(logits, targets, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` (targets < 0 ignored)."""
    z, t = _valid(_as_tensor(logits, torch.float32), _as_tensor(targets))
    if z.shape[0] == 0:
        return float("nan")
    return _nll_sum(z, t, float(temperature)) / z.shape[0]


def _nll_sum(z: torch.Tensor, t: torch.Tensor, temperature: float, chunk: int = 4096) -> float:
    total = 0.0
    for i in range(0, z.shape[0], chunk):  # chunks bound memory for many classes
        zz = z[i:i + chunk].to(torch.float64) / temperature  # (b, C)
        total += float((torch.logsumexp(zz, 1) - zz.gather(1, t[i:i + chunk, None])[:, 0]).sum())
    return total


def fit_temperature(logits, targets, t_min: float = T_MIN, t_max: float = T_MAX) -> float:
    """The temperature T in [t_min, t_max] minimising the NLL of softmax(logits / T).

    The NLL is convex in 1/T, hence unimodal in log T: a bounded Brent search on log T
    finds the global minimum deterministically. Returns 1.0 when no target is valid.

    >>> fit_temperature([[2.0, 0.0], [2.0, 0.0]], [0, 1]) > 10  # 50 % right: flatten fully
    True
    """
    from scipy.optimize import minimize_scalar

    z, t = _valid(_as_tensor(logits, torch.float32), _as_tensor(targets))
    if z.shape[0] == 0:
        return 1.0
    n = z.shape[0]
    res = minimize_scalar(lambda log_t: _nll_sum(z, t, math.exp(log_t)) / n,
                          bounds=(math.log(t_min), math.log(t_max)), method="bounded",
                          options={"xatol": 1e-5})
    return float(math.exp(res.x))
