"""geohier.explorer: the val-logits cache (and its agreement with evaluate), sweeps and
rules over synthetic rows."""

from __future__ import annotations

import pytest
import torch
from conftest import CITIES
from test_predictor import make_tiny_run

from geohier.combine import KeepRule
from geohier.errors import InputError
from geohier.predictor import Predictor

pytestmark = pytest.mark.slow  # trains a tiny run: `make test-fast` skips this module

# ----------------------------------------------------------------------------- explorer

SPLITS = ["train", "train", "val", "val", "test"]


def make_workspace(ws, levels=(1, 3, 5)):
    """Five tiny JPEGs in each city (train, train, val, val, test), the hierarchy built from
    them, saved as the workspace's hierarchy.json; returns it."""
    from conftest import jpeg_bytes

    from geohier.hierarchy import build_hierarchy

    splits = {}
    with ws.manifest() as m:
        for ci, (lat, lon, color) in enumerate(CITIES):
            for j, split in enumerate(SPLITS):
                shade = tuple(max(0, min(255, c + 9 * j)) for c in color)
                i = m.store_image(jpeg_bytes(size=(40, 32), color=shade), "jpg", source="demo",
                                  source_id=f"{ci}-{j}", lat=lat + 0.01 * j, lon=lon + 0.01 * j)
                splits[i] = split
        m.set_splits(splits)
        lat, lon = m.points()
    h = build_hierarchy(lat, lon, levels, min_images=1)
    h.save(ws.hierarchy_path)
    return h


def test_explorer_caches_val_logits_and_matches_evaluate(ws):
    from geohier.explorer import Explorer, cache_paths, has_cache
    from pipeline.evaluate import evaluate_run

    h = make_workspace(ws)
    run = make_tiny_run(ws.models_dir / "tiny", h)
    predictor = Predictor.load(run, device="cpu")
    assert not has_cache(predictor, ws)
    seen = []
    ex = Explorer.for_predictor(predictor, ws, progress=lambda d, t: seen.append((d, t)))
    assert ex.val.rows == 12 and seen[-1] == (12, 12)
    assert has_cache(predictor, ws) and all(p.exists() for p in cache_paths(predictor))
    # the second time comes from the cache, with the same numbers
    again = Explorer.for_predictor(predictor, ws, progress=lambda d, t: pytest.fail("recomputed"))
    assert again.val.info["cached"] is True
    for lv in predictor.levels:
        assert torch.equal(again.val.logits[lv], ex.val.logits[lv])
        assert again.val.targets[lv].tolist() == ex.val.targets[lv].tolist()
    mine = ex.evaluate()  # the default rule, with temperatures, as `predict` and `evaluate` use
    geo = evaluate_run(run, ws, split="val", calibrate=False, progress=False)["geo"]
    assert geo["rule"] == "hierarchical" and geo["n"] == mine["rows"]
    for k in ("acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "median_km", "mean_km", "geoscore"):
        assert mine[k] == pytest.approx(geo[k], abs=1e-6), k
    # a relabelled manifest leaves the run's own val split (and so the cache) as it was
    with ws.manifest() as m:
        first_val = int(m.frame(["id"], where="split = 'val'")["id"].iloc[0])
        m.set_splits({first_val: "train"})
    assert has_cache(predictor, ws)
    # the run's val split changed (here: its file replaced by the manifest's new one): stale
    from geohier import splits

    splits.attach(run, splits.current(ws), ws)
    assert not has_cache(predictor, ws)
    assert Explorer.for_predictor(predictor, ws).val.rows == 11


def test_explorer_sweep_and_rules():
    from geohier.explorer import synthetic, synthetic_hierarchy

    ex = synthetic(rows=500, hierarchy=synthetic_hierarchy((1, 3, 5), points=5000, towns=60), seed=1)
    rows = ex.sweep(KeepRule("topk"), values=(1, 2, 4, 8))
    assert [r["value"] for r in rows] == [1, 2, 4, 8] and rows[0]["param"] == "top_k"
    kept = [r["kept"] for r in rows]
    hits = [r["hit"] for r in rows]
    assert kept == sorted(kept) and hits == sorted(hits) and kept[0] == 1.0
    cum = ex.sweep(KeepRule("cumulative"))
    assert cum[0]["param"] == "cumulative" and len(cum) == 10
    adaptive = ex.sweep(KeepRule(), param="min_prob")
    assert adaptive[0]["value"] == 0.0 and adaptive[-1]["kept"] <= adaptive[0]["kept"]
    with pytest.raises(InputError, match="cannot sweep"):
        ex.sweep(KeepRule(), param="colour")
    # temperatures are applied only when asked for
    ex.temperatures = dict.fromkeys(ex.tree.levels, 5.0)
    hot, cold = ex.evaluate(KeepRule("cumulative", cumulative=0.9)), ex.evaluate(
        KeepRule("cumulative", cumulative=0.9), temperature=False)
    assert hot["kept"] > cold["kept"]


def test_a_region_limit_scores_the_answers_predict_within_gives(ws):
    """The explorer's region limit: the val rows whose truth is inside, answered as
    `predict --within` answers them (the Predictor's own points)."""
    import numpy as np

    from geohier.explorer import Explorer
    from geohier.geodesy import haversine_km

    h = make_workspace(ws)
    predictor = Predictor.load(make_tiny_run(ws.models_dir / "tiny", h), device="cpu")
    ex = Explorer.for_predictor(predictor, ws)
    box = "bbox:30,-10,60,20"  # Paris and Berlin, nothing else among the cities
    lim = ex.limited(box)
    assert lim.val.rows == 4 and set(np.round(lim.val.lat)) == {49.0, 53.0}
    mine = lim.evaluate()
    pts = predictor.points(lim.val.logits, "hierarchical", within=box)
    assert (pts.lat >= 30).all() and (pts.lat <= 60).all() and (pts.lon >= -10).all() and (pts.lon <= 20).all()
    km = haversine_km(lim.val.lat, lim.val.lon, pts.lat, pts.lon)
    assert mine["median_km"] == pytest.approx(float(np.median(km)), abs=1e-6)
    assert mine["acc_200km"] == pytest.approx(float((km <= 200).mean()))
    assert mine["kept"] <= ex.evaluate()["kept"] + 1e-9
    with pytest.raises(InputError, match="none of the run's 6 level-5 cells lies inside"):
        ex.limited("bbox:-80,-10,-70,10")
    sydney = ex.limited("bbox:-40,145,-30,155")
    assert sydney.val.rows == 2
    with pytest.raises(InputError, match="none of the 2 val images lies within"):
        sydney.limited(box)
    with pytest.raises(InputError):
        ex.limited("country:ZZZ")
