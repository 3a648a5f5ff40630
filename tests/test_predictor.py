"""geohier.predictor: the Predictor on tiny runs (resnet18 at 32 px over a tiny
hierarchy), per-level sets, and the loaded-predictor cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import CITIES  # photos in six cities: (lat, lon, colour)

from geohier import geodesy
from geohier.combine import KeepRule
from geohier.errors import GeohierError, InputError
from geohier.predictor import Predictor, load_predictor
from geohier.runs import finished_runs, newest_run, run_choices
from geohier.workspace import utcnow

pytestmark = pytest.mark.slow  # trains tiny runs: `make test-fast` skips this module

# ----------------------------------------------------------------------------- tiny runs


def tiny_hierarchy(levels=(1, 3, 5)):
    from geohier.hierarchy import build_hierarchy

    lat = [c[0] + 0.01 * j for c in CITIES for j in range(3)]
    lon = [c[1] + 0.01 * j for c in CITIES for j in range(3)]
    return build_hierarchy(lat, lon, levels, min_images=1)


def make_tiny_run(run_dir, hierarchy=None, levels=None, image_size=32, seed=0, temperatures=None,
                  state="done", group=None, extra_meta=None):
    """A finished run dir: resnet18 at ``image_size`` px with random weights over a tiny
    hierarchy; ``levels`` (default: all) are its heads."""
    from geohier.model import build_model, save_checkpoint
    from geohier.presets import EvalPreset

    h = hierarchy or tiny_hierarchy()
    levels = tuple(levels or h.levels)
    torch.manual_seed(seed)
    model = build_model("resnet18", {lv: h.num_classes[lv] for lv in levels})
    meta = {"hierarchy": h.to_dict(), "hierarchy_hash": h.hash, "input": EvalPreset(image_size).to_dict(),
            "temperatures": {str(lv): (temperatures or {}).get(lv, 1.0) for lv in levels},
            "config": {"backbone": "resnet18", "group": group}, "metrics": {}}
    meta.update(extra_meta or {})
    save_checkpoint(run_dir, model, meta)
    # created_at: a run from before split versions adopts a workspace split drawn before it
    (run_dir / "config.json").write_text(json.dumps({"backbone": "resnet18", "levels": list(levels),
                                                     "group": group, "created_at": utcnow()}))
    (run_dir / "status.json").write_text(json.dumps({"state": state, "progress": 1.0}))
    return run_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return Predictor.load(tiny_run, device="cpu")


def _photos(tmp_path, make_jpeg):
    a = make_jpeg(tmp_path / "a.jpg", color=(200, 60, 60), gps=(48.8566, 2.3522))
    b = make_jpeg(tmp_path / "b.png", color=(60, 60, 200), fmt="PNG", mode="RGBA")
    c = make_jpeg(tmp_path / "c.webp", size=(90, 40), color=(10, 220, 30), fmt="WEBP")
    return [a, b, c]


def test_predictor_on_a_tiny_run(predictor, tmp_path, make_jpeg):
    paths = _photos(tmp_path, make_jpeg)
    preds = predictor.predict_files(paths, batch_size=2)
    assert [p.image for p in preds] == [str(p) for p in paths]
    h = predictor.hierarchy
    for p in preds:
        assert p.error is None
        assert sorted(p.levels) == [1, 3, 5]
        finest = p.levels[5]
        probs = [c.prob for c in finest]
        assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
        for c in finest:  # a finest candidate carries its position and bounds
            w, s, e, n = c.bbox
            assert s <= c.lat <= n and w <= c.lon <= e
            assert c.cell in h.cells(5)
        for lv, prev in ((3, 1), (5, 3)):  # every candidate's parent was kept a level up
            kept_above = {c.cell: c for c in p.levels[prev]}
            assert all(c.parent in kept_above and c.cell.startswith(c.parent) for c in p.levels[lv])
            # the joint is the path's probability: never more than its parent's
            assert all(c.joint <= kept_above[c.parent].joint + 1e-6 for c in p.levels[lv])
        assert all(c.joint == pytest.approx(c.prob) for c in p.levels[1])
        assert p.best is finest[0]
        assert p.best.country is None or isinstance(p.best.country, str)
        d = json.loads(json.dumps(p.to_dict()))
        assert set(d) >= {"image", "candidates", "best"} and set(d["candidates"]) == {"1", "3", "5"}
        assert set(d["best"]) == {"cell", "lat", "lon", "prob", "joint", "country", "place"}
    # EXIF GPS -> the truth, the error and the GeoScore
    t = preds[0].true
    assert t["lat"] == pytest.approx(48.8566, abs=1e-3) and t["lon"] == pytest.approx(2.3522, abs=1e-3)
    want = float(geodesy.haversine_km(preds[0].best.lat, preds[0].best.lon, t["lat"], t["lon"]))
    assert t["error_km"] == pytest.approx(want, abs=0.01)
    assert t["geoscore"] == pytest.approx(5000 * math.exp(-want / 1492.7), abs=0.1)
    assert preds[1].true is None and "true" not in preds[1].to_dict()


def test_predictions_do_not_depend_on_the_batch(predictor, tmp_path, make_jpeg):
    paths = _photos(tmp_path, make_jpeg)
    rule = KeepRule("topk", top_k=3)
    one = predictor.predict_files(paths, rules=rule, batch_size=1, places=0)
    many = predictor.predict_files(paths, rules=rule, batch_size=8, places=0)
    for a, b in zip(one, many, strict=True):
        assert [c.cell for c in a.levels[5]] == [c.cell for c in b.levels[5]]
        np.testing.assert_allclose([c.prob for c in a.levels[5]], [c.prob for c in b.levels[5]], atol=1e-4)


def test_one_backbone_forward_serves_every_level(predictor, tmp_path, make_jpeg):
    calls = []
    hook = predictor.models[0].backbone.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        predictor.predict_files(_photos(tmp_path, make_jpeg), batch_size=16, places=0)
    finally:
        hook.remove()
    assert calls == [3]


def test_rules_and_temperature_reach_the_combination(predictor, tmp_path, make_jpeg):
    paths = _photos(tmp_path, make_jpeg)[:1]
    p1 = predictor.predict_files(paths, rules=KeepRule("topk", top_k=1), places=0)[0]
    assert all(len(c) == 1 for c in p1.levels.values())
    p2 = predictor.predict_files(paths, rules={1: KeepRule("topk", top_k=2), 3: KeepRule("topk", top_k=1),
                                               5: KeepRule("topk", top_k=4)}, places=0)[0]
    assert len(p2.levels[1]) == 2 and len(p2.levels[3]) == 1
    # a high temperature flattens the first level; switching it off restores it
    hot = Predictor.load(predictor.runs[0], device="cpu")
    hot.temperatures = {lv: 50.0 for lv in hot.levels}
    flat = hot.predict_files(paths, rules=KeepRule("topk", top_k=4), places=0)[0]
    off = hot.predict_files(paths, rules=KeepRule("topk", top_k=4), temperature=False, places=0)[0]
    ref = predictor.predict_files(paths, rules=KeepRule("topk", top_k=4), places=0)[0]
    assert max(c.prob for c in flat.levels[1]) < max(c.prob for c in ref.levels[1])
    assert [c.prob for c in off.levels[1]] == pytest.approx([c.prob for c in ref.levels[1]], abs=1e-5)


def test_bad_inputs_get_an_error_and_the_others_still_run(predictor, tmp_path, make_jpeg):
    from conftest import jpeg_bytes

    good = make_jpeg(tmp_path / "good.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg_bytes(size=(64, 64))[:300])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all\n")
    missing = tmp_path / "missing.jpg"
    preds = predictor.predict_files([empty, good, truncated, text, missing, tmp_path], places=0)
    errors = [p.error for p in preds]
    assert errors[1] is None and preds[1].best is not None
    for i in (0, 2, 3, 4, 5):
        assert errors[i] and str([empty, good, truncated, text, missing, tmp_path][i]) in errors[i]
        assert preds[i].to_dict() == {"image": preds[i].image, "error": errors[i]}
    assert "empty" in errors[0] and "truncated" in errors[2] and "no such file" in errors[4]
    # bytes and file objects (uploads) work too, named by their .name
    import io

    buf = io.BytesIO(jpeg_bytes(gps=(35.68, 139.69)))
    buf.name = "upload.jpg"
    p = predictor.predict_files([buf, b"garbage"], places=0)
    assert p[0].image == "upload.jpg" and p[0].true is not None
    assert p[1].error and p[1].best is None


def test_cell_positions_replace_centroids(tmp_path):
    h = tiny_hierarchy()
    n = h.num_classes[5]
    pos = [[float(i), float(-i)] for i in range(n)]
    pos[0] = [None, None]  # unknown: falls back to the centroid
    run = make_tiny_run(tmp_path / "pos", h, extra_meta={"cell_positions": {"5": pos}})
    p = Predictor.load(run, device="cpu")
    assert p.positions[1].tolist() == [1.0, -1.0]
    lat, lon = h.centroids(5)
    assert p.positions[0].tolist() == [lat[0], lon[0]]


def test_per_level_run_set(tmp_path, make_jpeg):
    h = tiny_hierarchy()
    runs = [make_tiny_run(tmp_path / f"L{lv}", h, levels=(lv,), seed=lv, group="seed") for lv in h.levels]
    p = Predictor.load(runs, device="cpu")
    assert p.levels == (1, 3, 5) and len(p.models) == 3
    pred = p.predict_files([make_jpeg(tmp_path / "x.jpg")], places=0)[0]
    assert pred.error is None and sorted(pred.levels) == [1, 3, 5]
    # a set may skip a level: the parents compose through it
    skip = Predictor.load([runs[0], runs[2]], device="cpu")
    assert skip.levels == (1, 5)
    pred = skip.predict_files([make_jpeg(tmp_path / "x.jpg")], places=0)[0]
    assert all(c.cell.startswith(c.parent) for c in pred.levels[5])
    # run_choices offers the set (sorted by level) and the single runs
    choices = run_choices(tmp_path)
    assert choices[0].label.startswith("set seed") and choices[0].runs == tuple(runs)
    assert len(choices) == 4
    # the same level twice, or another hierarchy, is refused
    dup = make_tiny_run(tmp_path / "L1b", h, levels=(1,), seed=9)
    with pytest.raises(InputError, match="distinct levels"):
        Predictor.load([runs[0], dup], device="cpu")
    other = make_tiny_run(tmp_path / "other", tiny_hierarchy((1, 3)), levels=(3,))
    with pytest.raises(InputError, match="different hierarchies"):
        Predictor.load([runs[0], other], device="cpu")


def test_newest_finished_run_and_the_cache(tmp_path):
    import os
    import time

    models = tmp_path / "models"
    models.mkdir()
    with pytest.raises(GeohierError, match="no finished run"):
        newest_run(models)
    h = tiny_hierarchy((1, 3))
    old = make_tiny_run(models / "old", h)
    new = make_tiny_run(models / "new", h)
    make_tiny_run(models / "running", h, state="running")
    (models / "empty").mkdir()
    past = time.time() - 100
    for f in ("meta.json", "model.safetensors"):
        os.utime(old / f, (past, past))
    assert [r.path for r in finished_runs(models)] == [new, old]
    assert newest_run(models).path == new
    a = load_predictor(new, device="cpu")
    assert load_predictor(new, device="cpu") is a
    # a retrained run (new weights file) is reloaded
    make_tiny_run(models / "new2", h)
    (new / "model.safetensors").write_bytes((models / "new2" / "model.safetensors").read_bytes())
    os.utime(new / "model.safetensors", (past + 50, past + 50))
    assert load_predictor(new, device="cpu") is not a


# ----------------------------------------------------------------------------- refinement


def training_photos(shades=3):
    """Per city, ``shades`` photos (bytes) at the tiny hierarchy's points: [(bytes, lat, lon)]."""
    from conftest import jpeg_bytes

    out = []
    for lat, lon, color in CITIES:
        for j in range(shades):
            shade = tuple(max(0, min(255, c + 25 * j)) for c in color)
            out.append((jpeg_bytes(size=(40, 32), color=shade), lat + 0.01 * j, lon + 0.01 * j))
    return out


def write_neighbours(run_dir, photos, level=None, ids=None):
    """The run's neighbours.safetensors from its own model's features of ``photos``
    ([(bytes, lat, lon)]), as the frozen trainer writes it; returns the index."""
    import io

    from PIL import Image

    from geohier.hierarchy import Hierarchy
    from geohier.model import load_run
    from geohier.presets import EvalPreset
    from geohier.refine import NeighbourIndex
    from geohier.runs import Run

    model, meta = load_run(run_dir)
    h = Hierarchy.from_dict(meta["hierarchy"])
    finest = level or max(h.levels)
    preset = EvalPreset.from_meta(meta)
    x = torch.stack([preset(Image.open(io.BytesIO(b)).convert("RGB")) for b, _, _ in photos])
    with torch.inference_mode():
        feats = model.features(x)
    lat = np.array([p[1] for p in photos])
    lon = np.array([p[2] for p in photos])
    classes = h.labels(lat, lon)[max(h.levels)]
    index = NeighbourIndex.from_features(feats, lat, lon, classes, finest, ids=ids, hierarchy_hash=h.hash)
    index.save(Run(run_dir).neighbours_path)
    return index


@pytest.fixture(scope="module")
def refine_run(tmp_path_factory):
    run = make_tiny_run(tmp_path_factory.mktemp("models") / "frozen")
    write_neighbours(run, training_photos(), ids=np.arange(100, 118))
    return run


def test_refine_moves_the_guess_to_the_nearest_training_images(refine_run, tmp_path):
    from conftest import jpeg_bytes

    photos = training_photos()
    p = Predictor.load(refine_run, device="cpu")
    assert p.can_refine and p.refine_problem is None
    keep_all = KeepRule("topk", top_k=64)
    p.refine_k, p.refine_tau = 1, 1e-3  # the nearest image alone decides, and gives the point
    i = 4  # Berlin, second shade: the query is that very training photo, with its EXIF GPS
    data, lat, lon = photos[i]
    path = tmp_path / "query.jpg"
    path.write_bytes(jpeg_bytes(size=(40, 32), color=tuple(max(0, min(255, c + 25)) for c in CITIES[1][2]),
                                gps=(lat, lon)))
    plain = p.predict_files([path], rules=keep_all, places=0)[0]
    pred = p.predict_files([path], rules=keep_all, places=1, refine=True)[0]
    assert plain.refined is None and plain.best.refined is None
    b = pred.best
    assert pred.refined is True and b.refined is not None
    assert (b.lat, b.lon) == pytest.approx((lat, lon), abs=1e-6)
    assert pred.true["error_km"] < 0.01
    n = b.refined.neighbours
    assert len(n) == 1 and n[0]["id"] == 100 + i and n[0]["sim"] == pytest.approx(1.0, abs=2e-3)
    assert n[0]["weight"] == pytest.approx(1.0)
    # the chosen cell is the photo's own, first among the finest candidates; the cell's
    # own position is kept beside the refined point
    assert b.cell == p.hierarchy.cells(5)[int(p.hierarchy.labels([lat], [lon])[5][0])]
    assert (b.refined.cell_lat, b.refined.cell_lon) == pytest.approx(tuple(p.positions[b.index]))
    assert sorted(c.cell for c in pred.levels[5]) == sorted(c.cell for c in plain.levels[5])
    d = json.loads(json.dumps(pred.to_dict()))
    assert d["best"]["refined"] is True and d["best"]["lat"] == pytest.approx(lat, abs=1e-5)
    assert d["best"]["cell_lat"] == pytest.approx(b.refined.cell_lat, abs=1e-5)
    assert d["candidates"]["5"][0]["refined"]["neighbours"][0]["id"] == 100 + i
    assert "refined" not in plain.to_dict()["best"]
    # the defaults (k=10 neighbours of the chosen cell) average them: the point stays
    # among the cell's training photos, within a few km of this one
    q = Predictor.load(refine_run, device="cpu")
    pred = q.predict_files([path], rules=keep_all, places=0, refine=True)[0]
    assert pred.refined and 1 <= len(pred.best.refined.neighbours) <= 3
    assert geodesy.haversine_km(pred.best.lat, pred.best.lon, lat, lon) < 5


def test_no_neighbour_in_the_kept_cells_keeps_the_cell_position(tmp_path, make_jpeg):
    run = make_tiny_run(tmp_path / "frozen")
    p = Predictor.load(run, device="cpu")
    path = make_jpeg(tmp_path / "x.jpg")
    top1 = KeepRule("topk", top_k=1)
    plain = p.predict_files([path], rules=top1, places=0)[0]
    others = [ph for ph in training_photos()
              if p.hierarchy.labels([ph[1]], [ph[2]])[5][0] != plain.best.index]
    write_neighbours(run, others)
    pred = p.predict_files([path], rules=top1, places=0, refine=True)[0]
    assert pred.refined is False and pred.best.refined is None
    assert (pred.best.lat, pred.best.lon) == (plain.best.lat, plain.best.lon)
    assert pred.to_dict()["best"]["refined"] is False


def test_refine_needs_a_single_run_with_a_usable_index(predictor, tmp_path, make_jpeg):
    from geohier.errors import WorkspaceError
    from geohier.refine import NeighbourIndex
    from geohier.runs import Run

    photo = make_jpeg(tmp_path / "x.jpg")
    assert not predictor.can_refine and "has no neighbours.safetensors" in predictor.refine_problem
    with pytest.raises(InputError, match="frozen backbone"):
        predictor.predict_files([photo], refine=True)
    h = tiny_hierarchy()
    runs = [make_tiny_run(tmp_path / f"L{lv}", h, levels=(lv,), seed=lv, group="g") for lv in h.levels]
    for r in runs:
        write_neighbours(r, training_photos(1), level=max(h.levels))
    s = Predictor.load(runs, device="cpu")
    assert not s.can_refine and "single run" in s.refine_problem
    with pytest.raises(InputError, match="per-level set"):
        s.predict_files([photo], refine=True)
    # an unreadable file, or one for another level or embedding size: one clear error
    run = make_tiny_run(tmp_path / "bad")
    p = Predictor.load(run, device="cpu")
    Run(run).neighbours_path.write_bytes(b"garbage")
    assert p.can_refine  # the file is there; reading it is what fails
    with pytest.raises(WorkspaceError, match="cannot read the neighbour index"):
        p.predict_files([photo], refine=True)
    NeighbourIndex.from_features(torch.ones(2, 512), [1, 2], [1, 2], [0, 0], level=3).save(Run(run).neighbours_path)
    with pytest.raises(WorkspaceError, match="run bad: the neighbour index is for level 3"):
        p.predict_files([photo], refine=True)
    NeighbourIndex.from_features(torch.ones(2, 64), [1, 2], [1, 2], [0, 0], level=5).save(Run(run).neighbours_path)
    with pytest.raises(WorkspaceError, match="64-d embeddings, the model's features are 512-d"):
        p.predict_files([photo], refine=True)
