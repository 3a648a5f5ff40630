"""geohier.infer: the masked log-space combination, the keep rules, temperatures, and the
Predictor on tiny runs (resnet18 at 32 px over a tiny hierarchy)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from geohier import grid
from geohier.errors import GeohierError, InputError
from geohier.infer import (
    Combined,
    KeepRule,
    Predictor,
    Tree,
    combine,
    finished_runs,
    hierarchical_accuracy,
    load_predictor,
    newest_run,
    parse_thresholds,
    run_choices,
)

# ----------------------------------------------------------------------------- helpers


def random_tree(rng, levels=(1, 2, 3), sizes=(4, 12, 40)) -> Tree:
    """Random parents such that every class has at least one child (all alive)."""
    parents = {}
    for (prev_n, n), lv in zip(zip(sizes, sizes[1:], strict=False), levels[1:], strict=False):
        p = np.concatenate([np.arange(prev_n), rng.integers(0, prev_n, n - prev_n)])
        parents[lv] = np.sort(p)
    return Tree.from_parents(levels, parents, dict(zip(levels, sizes, strict=False)))


def random_logits(rng, tree: Tree, batch: int, scale: float = 3.0) -> dict[int, torch.Tensor]:
    return {lv: torch.from_numpy(rng.normal(0, scale, (batch, tree.num_classes[lv])).astype(np.float32))
            for lv in tree.levels}


def _lse(values) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def brute_force(logits_row: dict[int, np.ndarray], tree: Tree, rules: dict[int, KeepRule],
                temps=None) -> dict[int, list[tuple[int, float, float]]]:
    """The combination written as plainly as possible: Python loops and sets, one row.

    Returns per level the kept (class, prob, score), best first."""
    levels = tree.levels
    finest = levels[-1]
    alive = {finest: set(range(tree.num_classes[finest]))}
    for prev, lv in zip(levels[-2::-1], levels[:0:-1], strict=False):
        alive[prev] = {int(tree.parents[lv][c]) for c in alive[lv]}
    out, kept_score = {}, None
    for i, lv in enumerate(levels):
        t = (temps or {}).get(lv, 1.0)
        z = [float(v) / t for v in logits_row[lv]]
        if i == 0:
            cands = sorted(alive[lv])
        else:
            cands = [c for c in range(len(z)) if c in alive[lv] and int(tree.parents[lv][c]) in kept_score]
        lse = _lse([z[c] for c in cands])
        score = {c: (0.0 if i == 0 else kept_score[int(tree.parents[lv][c])]) + z[c] - lse for c in cands}
        norm = _lse(list(score.values()))
        prob = {c: math.exp(score[c] - norm) for c in cands}
        order = sorted(cands, key=lambda c: -prob[c])
        r = rules[lv]
        if r.rule == "topk":
            keep = order[:r.top_k]
        elif r.rule == "adaptive":
            k = r.k_max
            for j, th in enumerate(r.thresholds):
                if prob[order[0]] >= th:
                    k = j + 1
                    break
            keep = order[:k]
        else:
            keep, mass = [], 0.0
            for c in order[:r.max_keep]:
                if mass >= r.cumulative:
                    break
                keep.append(c)
                mass += prob[c]
        keep = [c for j, c in enumerate(keep) if j == 0 or prob[c] >= r.min_prob]
        out[lv] = [(c, prob[c], score[c]) for c in keep]
        kept_score = {c: score[c] for c in keep}
    return out


def as_lists(c: Combined, row: int) -> dict[int, list[tuple[int, float, float]]]:
    out = {}
    for lv in c.levels:
        n = int(c.count[lv][row])
        out[lv] = list(zip(c.index[lv][row, :n].tolist(), c.prob[lv][row, :n].tolist(),
                           c.score[lv][row, :n].tolist(), strict=True))
    return out


def seed_combine(logits: dict[int, torch.Tensor], tree: Tree, k: int) -> dict[int, torch.Tensor]:
    """The seed's combination (one row): child logits times the parent's probability, then a
    softmax over the children of the kept parents; top-k kept at each level."""
    levels = tree.levels
    probs = torch.softmax(logits[levels[0]][0], 0)
    kept = probs.topk(k).indices.tolist()
    out = {levels[0]: probs}
    for lv in levels[1:]:
        z = logits[lv][0]
        masked = torch.full_like(z, float("-inf"))
        for p in kept:
            for c in np.flatnonzero(tree.parents[lv] == p):
                masked[c] = z[c] * probs[p]
        probs = torch.softmax(masked, 0)
        out[lv] = probs
        kept = probs.topk(min(k, int(torch.isfinite(masked).sum()))).indices.tolist()
    return out


# ----------------------------------------------------------------------------- combination


def test_keep_all_matches_the_brute_force_joint():
    """Keeping every class, the finest score is the sum of every level's log-softmax along the
    path: the joint computed by walking each finest class up to the root."""
    rng = np.random.default_rng(0)
    tree = random_tree(rng)
    logits = random_logits(rng, tree, 5)
    c = combine(logits, tree, KeepRule("topk", top_k=200))
    finest = tree.levels[-1]
    logp = {lv: torch.log_softmax(logits[lv], 1).numpy() for lv in tree.levels}
    for row in range(5):
        n = int(c.count[finest][row])
        assert n == tree.num_classes[finest]
        got = dict(zip(c.index[finest][row, :n].tolist(), c.score[finest][row, :n].tolist(), strict=True))
        for cls in range(tree.num_classes[finest]):
            joint, cur = 0.0, cls
            for lv in reversed(tree.levels):
                joint += logp[lv][row, cur]
                cur = int(tree.parents[lv][cur])
            assert got[cls] == pytest.approx(joint, abs=1e-4)
        # prob is the joint normalised over all paths; it is sorted best first
        probs = c.prob[finest][row, :n].numpy()
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert np.all(np.diff(probs) <= 1e-7)


RULES = [
    KeepRule(),
    KeepRule("adaptive", thresholds=(0.7, 0.3), k_max=4),
    KeepRule("adaptive", k_max=20),
    KeepRule("cumulative", cumulative=0.99, max_keep=64),
    KeepRule("topk", top_k=1),
    KeepRule("topk", top_k=3),
    KeepRule("topk", top_k=3, min_prob=0.1),
    KeepRule("cumulative", cumulative=0.5),
    KeepRule("cumulative", cumulative=0.95, max_keep=7),
    KeepRule("cumulative", cumulative=0.9, min_prob=0.05),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.describe())
@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_pruned_combination_matches_the_brute_force(rule, scale):
    rng = np.random.default_rng(1)
    tree = random_tree(rng)
    logits = random_logits(rng, tree, 24, scale)
    rules = dict.fromkeys(tree.levels, rule)
    c = combine(logits, tree, rules)
    for row in range(24):
        want = brute_force({lv: logits[lv][row].numpy() for lv in tree.levels}, tree, rules)
        got = as_lists(c, row)
        for lv in tree.levels:
            assert [g[0] for g in got[lv]] == [w[0] for w in want[lv]], (lv, row)
            np.testing.assert_allclose([g[1] for g in got[lv]], [w[1] for w in want[lv]], atol=1e-5)
            np.testing.assert_allclose([g[2] for g in got[lv]], [w[2] for w in want[lv]], atol=1e-4)


def test_rules_differ_per_level_and_parents_are_reported():
    rng = np.random.default_rng(2)
    tree = random_tree(rng)
    logits = random_logits(rng, tree, 8)
    rules = {1: KeepRule("topk", top_k=2), 2: KeepRule("cumulative", cumulative=0.8), 3: KeepRule("topk", top_k=5)}
    c = combine(logits, tree, rules)
    assert c.index[1].shape[1] == 2 and bool((c.count[1] == 2).all())
    assert bool((c.count[3] <= 5).all())
    for row in range(8):
        want = brute_force({lv: logits[lv][row].numpy() for lv in tree.levels}, tree, rules)
        assert [g[0] for g in as_lists(c, row)[3]] == [w[0] for w in want[3]]
        for lv, prev in ((2, 1), (3, 2)):
            n = int(c.count[lv][row])
            parents = c.parent[lv][row, :n].tolist()
            assert parents == [int(tree.parents[lv][k]) for k in c.index[lv][row, :n].tolist()]
            assert set(parents) <= set(c.index[prev][row, :int(c.count[prev][row])].tolist())
    assert bool((c.parent[1] == -1).all())


def test_adaptive_rule_picks_k_from_the_top_probability():
    rule = KeepRule()  # 0.85 / 0.65 / 0.40, else 6
    probs = torch.tensor([[0.90, 0.05, 0.05, 0, 0, 0, 0],
                          [0.70, 0.20, 0.10, 0, 0, 0, 0],
                          [0.50, 0.30, 0.20, 0, 0, 0, 0],
                          [0.30, 0.20, 0.20, 0.1, 0.1, 0.05, 0.05]])
    assert rule.keep(probs).sum(1).tolist() == [1, 2, 3, 6]
    assert KeepRule(k_max=2).keep(probs).sum(1).tolist() == [1, 2, 3, 2]
    assert KeepRule(thresholds=(0.95, 0.6)).keep(probs).sum(1).tolist() == [2, 2, 6, 6]


def test_cumulative_and_min_prob():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01]])
    assert KeepRule("cumulative", cumulative=0.8).keep(probs).sum(1).tolist() == [2, 1]
    assert KeepRule("cumulative", cumulative=0.81).keep(probs).sum(1).tolist() == [3, 1]
    assert KeepRule("cumulative", cumulative=1.0).keep(probs).sum(1).tolist() == [4, 4]
    # min_prob drops weak candidates but never the top one
    assert KeepRule("topk", top_k=4, min_prob=0.2).keep(probs).sum(1).tolist() == [2, 1]
    assert KeepRule("topk", top_k=4, min_prob=0.99).keep(probs).sum(1).tolist() == [1, 1]


def test_log_space_does_not_boost_unlikely_parents_like_the_seed():
    """Parent A has p=0.9, B p=0.1. Level 2 dislikes every child, A's a bit less (-2) than
    B's (-10). The seed scales logits by the parent probability: A's children become -1.8,
    B's -1.0, so a child of the unlikely parent B wins. In log space A's children win."""
    tree = Tree.from_parents([1, 2], {2: [0, 0, 1, 1]})
    l1 = torch.tensor([[math.log(0.9), math.log(0.1)]])
    l2 = torch.tensor([[-2.0, -2.5, -10.0, -10.5]])
    logits = {1: l1, 2: l2}
    seed = seed_combine(logits, tree, k=2)
    assert int(seed[2].argmax()) == 2  # the seed's answer is a child of B
    c = combine(logits, tree, KeepRule("topk", top_k=2))
    assert int(c.best()[0]) == 0  # ours: a child of A
    assert c.index[2][0].tolist() == [0, 1]
    assert int(c.parent[2][0, 0]) == 0
    # And ours is the joint: p(A) * p(child | level-2 restricted to A and B's children)
    q = torch.softmax(l2[0], 0)
    assert float(c.score[2][0, 0]) == pytest.approx(math.log(0.9) + math.log(float(q[0])), abs=1e-5)


def test_temperature_divides_the_logits():
    rng = np.random.default_rng(3)
    tree = random_tree(rng)
    logits = random_logits(rng, tree, 6)
    temps = {1: 2.0, 2: 0.5, 3: 1.5}
    rule = KeepRule("topk", top_k=3)
    a = combine(logits, tree, rule, temps)
    b = combine({lv: logits[lv] / temps[lv] for lv in tree.levels}, tree, rule)
    for lv in tree.levels:
        assert torch.equal(a.index[lv], b.index[lv])
        torch.testing.assert_close(a.prob[lv], b.prob[lv])
    # the first level's prob is the tempered softmax
    want = torch.softmax(logits[1] / 2.0, 1).topk(3, 1).values
    torch.testing.assert_close(a.prob[1], want)
    # T = 1 everywhere (or none) is the same thing
    c = combine(logits, tree, rule, dict.fromkeys(tree.levels, 1.0))
    d = combine(logits, tree, rule, None)
    assert torch.equal(c.index[3], d.index[3])
    # string keys (as in meta.json) work too
    e = combine(logits, tree, rule, {str(k): v for k, v in temps.items()})
    assert torch.equal(e.index[3], a.index[3])


def test_dead_branches_are_never_kept():
    """Parent 1 has no child at the finest level: even when it is by far the most likely,
    the answer comes from the other branch and the level never ends empty."""
    tree = Tree.from_parents([1, 2, 3], {2: [0, 0, 1], 3: [0, 1, 1]}, {1: 2, 2: 3, 3: 3})
    assert tree.alive[2].tolist() == [True, True, False]
    assert tree.alive[1].tolist() == [True, False]
    logits = {1: torch.tensor([[0.0, 9.0]]), 2: torch.tensor([[0.0, 1.0, 9.0]]),
              3: torch.tensor([[0.0, 1.0, 2.0]])}
    c = combine(logits, tree, KeepRule("topk", top_k=1))
    assert c.index[1].tolist() == [[0]] and c.index[2].tolist() == [[1]]
    assert int(c.best()[0]) in (1, 2)


def test_batch_of_one_and_empty_batch():
    rng = np.random.default_rng(4)
    tree = random_tree(rng)
    one = combine(random_logits(rng, tree, 1), tree)
    assert one.best().shape == (1,)
    empty = combine({lv: torch.zeros(0, n) for lv, n in tree.num_classes.items()}, tree)
    assert empty.best().shape == (0,)


def test_single_level_tree():
    tree = Tree.from_parents([5], {}, {5: 7})
    z = torch.tensor([[0.0, 3.0, 1.0, 0, 0, 0, 0]])
    c = combine({5: z}, tree, KeepRule("topk", top_k=2))
    assert c.index[5].tolist() == [[1, 2]]


def test_keep_rule_validation():
    with pytest.raises(InputError, match="unknown rule 'best'"):
        KeepRule("best")
    with pytest.raises(InputError, match="top-k"):
        KeepRule("topk", top_k=0)
    with pytest.raises(InputError, match="cumulative"):
        KeepRule("cumulative", cumulative=1.5)
    with pytest.raises(InputError, match="min-prob"):
        KeepRule(min_prob=1.0)
    with pytest.raises(InputError, match="decreasing"):
        KeepRule(thresholds=(0.4, 0.8))
    with pytest.raises(InputError, match="0.85,0.65"):
        parse_thresholds("high,low")
    assert parse_thresholds("0.9,0.6,0.3") == (0.9, 0.6, 0.3)
    r = KeepRule("cumulative", cumulative=0.7, min_prob=0.01)
    assert KeepRule.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_hierarchical_accuracy_on_known_values():
    tree = Tree.from_parents([1, 2], {2: [0, 0, 1, 1]})
    positions = np.array([[10.0, 10.0], [10.0, 20.0], [-10.0, 100.0], [-10.0, 110.0]])
    # row 0: confident and right; row 1: best is class 1 but truth is class 0 (kept 2nd)
    logits = {1: torch.tensor([[5.0, 0.0], [5.0, 0.0]]),
              2: torch.tensor([[5.0, 0.0, 0.0, 0.0], [1.0, 1.5, 0.0, 0.0]])}
    m = hierarchical_accuracy(logits, tree, {1: [0, 0], 2: [0, 0]}, [10.0, 10.0], [10.0, 10.0], positions,
                              KeepRule("topk", top_k=2))
    assert m["rows"] == 2
    assert m["top1"] == 0.5 and m["hit"] == 1.0
    assert m["kept"] == 2.0
    d = float(grid.haversine_km(10, 20, 10, 10))
    assert m["acc_25km"] == 0.5 and m["acc_2500km"] == 1.0
    assert m["median_km"] == pytest.approx(d / 2)
    assert m["levels"][1]["hit"] == 1.0


# ----------------------------------------------------------------------------- tiny runs

from conftest import CITIES  # noqa: E402 - photos in six cities: (lat, lon, colour)


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
    (run_dir / "config.json").write_text(json.dumps({"backbone": "resnet18", "levels": list(levels),
                                                     "group": group}))
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
    want = float(grid.haversine_km(preds[0].best.lat, preds[0].best.lon, t["lat"], t["lon"]))
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
    assert finished_runs(models) == [new, old]
    assert newest_run(models) == new
    a = load_predictor(new, device="cpu")
    assert load_predictor(new, device="cpu") is a
    # a retrained run (new weights file) is reloaded
    make_tiny_run(models / "new2", h)
    (new / "model.safetensors").write_bytes((models / "new2" / "model.safetensors").read_bytes())
    os.utime(new / "model.safetensors", (past + 50, past + 50))
    assert load_predictor(new, device="cpu") is not a


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
    # a changed split makes the cache stale
    with ws.manifest() as m:
        first_val = int(m.frame(["id"], where="split = 'val'")["id"].iloc[0])
        m.set_splits({first_val: "train"})
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


def test_row_buckets_give_the_same_answer(monkeypatch):
    """Big batches are split by how many parents each row kept; the result is the same."""
    import geohier.infer as gi

    rng = np.random.default_rng(5)
    tree = random_tree(rng, sizes=(4, 30, 200))
    logits = random_logits(rng, tree, 600, scale=1.0)
    rule = KeepRule("cumulative", cumulative=0.9, max_keep=24)
    monkeypatch.setattr(gi, "BUCKET_MIN", 10**12)
    whole = combine(logits, tree, rule)
    monkeypatch.setattr(gi, "BUCKET_MIN", 0)
    split = combine(logits, tree, rule)
    assert len(set(whole.count[2].tolist())) > 3  # rows kept different numbers of parents
    for lv in tree.levels:
        assert torch.equal(whole.count[lv], split.count[lv])
        torch.testing.assert_close(whole.prob[lv], split.prob[lv])
        for row in range(600):
            n = int(whole.count[lv][row])
            assert set(whole.index[lv][row, :n].tolist()) == set(split.index[lv][row, :n].tolist())
