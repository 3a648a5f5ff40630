"""The classifier's designs (issue 17): the hybrid head (``train --head hybrid``) and the
hierarchical loss (``train --loss hierarchical``), against known answers, and runs of each
design that save, load, predict and evaluate from their folder alone."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from test_train import make_world, one_thread, tiny  # noqa: F401 - one_thread: an autouse fixture
from test_train_page import started  # noqa: F401 - a fixture: the jobs the Train page starts

from geohier import geodesy
from geohier.errors import InputError, ModelError
from geohier.forward import OFFSET
from geohier.hierarchy import build_hierarchy
from geohier.leaderboard import Leaderboard
from geohier.model import (
    ModelConfig,
    build_model,
    class_bounds,
    decode_offsets,
    derive_level_logits,
    encode_offsets,
    load_run,
)
from geohier.predictor import Predictor
from pipeline import train as T
from pipeline.evaluate import evaluate_run, format_report
from pipeline.train.losses import GeoLoss, OffsetLoss

# ----------------------------------------------------------------------------- the hierarchical loss


def test_the_hierarchical_loss_is_the_nll_of_the_summed_finest_softmax_at_each_level():
    # a 2-level toy: 4 finest classes, the first two under coarse class 0, the last two under 1
    model = build_model("resnet18", {1: 2, 3: 4}, loss="hierarchical", parents={3: [0, 0, 1, 1]})
    assert set(model.heads) == {"3"}  # every coarse class has children: the finest head alone
    with torch.no_grad():
        model.heads["3"].weight.zero_()
        model.heads["3"].bias.copy_(torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])))  # softmax: .1 .2 .3 .4
    out = model.forward_heads(torch.randn(1, model.feature_dim))
    assert out[1].softmax(1)[0].tolist() == pytest.approx([0.3, 0.7], abs=1e-6)
    labels = torch.tensor([[0, 1]])  # coarse class 0, finest class 1
    total, parts = GeoLoss([1, 3])(out, labels)
    # by hand: -ln p(finest 1) - ln(p(finest 0) + p(finest 1)) = -ln 0.2 - ln 0.3
    assert parts[3].item() == pytest.approx(-math.log(0.2), abs=1e-5)
    assert parts[1].item() == pytest.approx(-math.log(0.3), abs=1e-5)
    assert total.item() == pytest.approx(2.813411, abs=1e-5)
    # with level weights, each level's NLL is weighted as for independent heads
    total, _ = GeoLoss([1, 3], {1: 2.0, 3: 0.5})(out, torch.tensor([[1, 3]]))
    assert total.item() == pytest.approx(-2 * math.log(0.7) - 0.5 * math.log(0.4), abs=1e-5)


def test_a_coarse_class_without_finer_classes_is_a_leaf_of_the_one_softmax():
    # fixed levels: coarse class 2's images were too few at the finer level, it has no child
    model = build_model("resnet18", {1: 3, 3: 4}, loss="hierarchical", parents={3: [0, 0, 1, 1]})
    assert {k: v.out_features for k, v in model.heads.items()} == {"1": 1, "3": 4}  # one output: class 2
    with torch.no_grad():
        for head in model.heads.values():
            head.weight.zero_()
        model.heads["3"].bias.copy_(torch.log(torch.tensor([0.1, 0.2, 0.3, 0.2])))
        model.heads["1"].bias.fill_(math.log(0.2))  # the leaves' softmax: .1 .2 .3 .2 | .2
    out = model.forward_heads(torch.randn(1, model.feature_dim))
    assert out[1].softmax(1)[0].tolist() == pytest.approx([0.3, 0.5, 0.2], abs=1e-6)
    # the finest level: the same softmax among the images that have a finest class
    assert out[3].softmax(1)[0].tolist() == pytest.approx([0.125, 0.25, 0.375, 0.25], abs=1e-6)
    # an image of coarse class 2 (no finest class) costs -ln P(class 2) alone
    total, _ = GeoLoss([1, 3])(out, torch.tensor([[2, -100]]))
    assert total.item() == pytest.approx(-math.log(0.2), abs=1e-5)
    assert bool(torch.isfinite(out[1]).all() and torch.isfinite(out[3]).all())
    # three levels: the leaves are every level-5 class and level-3 class 2; their classes per level
    cfg = ModelConfig(backbone="resnet18", num_classes={1: 2, 3: 3, 5: 3}, loss="hierarchical",
                      parents={3: [0, 0, 1], 5: [0, 0, 1]})
    assert {lv: v.tolist() for lv, v in cfg.leaves().items()} == {1: [], 3: [2], 5: [0, 1, 2]}
    assert {lv: v.tolist() for lv, v in cfg.leaf_ancestors().items()} == {
        5: [0, 1, 2, -1], 3: [0, 0, 1, 2], 1: [0, 0, 0, 1]}


def test_derived_level_probabilities_are_the_finest_softmax_summed_and_stay_finite():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 10, generator=g) * 4
    anc = {1: torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2]), 2: torch.tensor([0, 1, 1, 2, 3, 3, 4, 5, 6, 6])}
    derived = derive_level_logits(z, anc, {1: 3, 2: 7})
    p = z.softmax(1)
    for lv, a in anc.items():
        want = torch.zeros(5, int(a.max()) + 1).index_add_(1, a, p)
        assert torch.allclose(derived[lv].softmax(1), want, atol=1e-6)
        assert torch.allclose(derived[lv].softmax(1).sum(1), torch.ones(5), atol=1e-6)
    # logits a thousand apart: a naive log-sum-exp underflows to -inf, this stays finite
    far = torch.tensor([[1000.0, 0.0, -1000.0, -1000.0]])
    d = derive_level_logits(far, {1: torch.tensor([0, 0, 1, 2])}, {1: 4})[1]
    assert bool(torch.isfinite(d).all())
    assert d.softmax(1)[0, :3].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    assert d.softmax(1)[0, 3].item() < 1e-30  # class 3 has no finest descendant: probability ~0


def test_the_design_is_checked_and_recorded_in_the_arch():
    with pytest.raises(ModelError, match="unknown head"):
        ModelConfig(backbone="resnet18", num_classes={1: 2}, head="mystery")
    with pytest.raises(ModelError, match="parent maps of levels \\[3\\]"):
        ModelConfig(backbone="resnet18", num_classes={1: 2, 3: 4}, loss="hierarchical")
    with pytest.raises(ModelError, match="must be 4 class indices"):
        ModelConfig(backbone="resnet18", num_classes={1: 2, 3: 4}, loss="hierarchical", parents={3: [0, 5, 1, 1]})
    cfg = ModelConfig(backbone="resnet18", num_classes={1: 2, 3: 4}, loss="hierarchical", head="hybrid",
                      parents={3: [0, 0, 1, 1]})
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert ModelConfig.from_dict({"backbone": "resnet18", "num_classes": {"1": 2}}).head == "cell"  # old runs
    # the one validator refuses unknown designs (the CLI's one error line, the page's message)
    with pytest.raises(InputError, match="--head: head must be one of cell, hybrid, got 'x'"):
        tiny(head="x").validate()
    with pytest.raises(InputError, match="--loss: loss must be one of independent, hierarchical"):
        tiny(loss="flat").validate()


# ----------------------------------------------------------------------------- the hybrid head


@pytest.mark.slow
def test_the_hybrid_head_cuts_the_median_error_well_below_the_cell_point_on_features_that_know_the_position():
    """Features that encode the finest class and the position inside the cell: heads
    trained on them (classes + offsets, the loss a run uses) guess far closer than the
    cell's point, the guess every cell-only head makes."""
    rng = np.random.default_rng(0)
    n, level = 1200, 3
    lat, lon = rng.uniform(-60, 60, n), rng.uniform(-170, 170, n)
    h = build_hierarchy(lat, lon, [level], min_images=1)
    y = h.labels(lat, lon)[level]
    c = h.num_classes[level]
    bounds = class_bounds(h, level)  # (C, 4) w s e n
    pos = np.zeros((c, 2))
    np.add.at(pos, y, np.stack([lat, lon], 1))
    pos /= np.bincount(y, minlength=c)[:, None]  # the class's mean training position (meta's cell_positions)
    model = build_model("resnet18", {level: c}, head="hybrid")
    d = model.feature_dim
    feats = np.zeros((n, d), np.float32)
    feats[np.arange(n), y] = 1.0  # which cell ...
    b = bounds[y]
    feats[:, c] = (lat - b[:, 1]) / (b[:, 3] - b[:, 1]) - 0.5  # ... and where inside it
    feats[:, c + 1] = (lon - b[:, 0]) / (b[:, 2] - b[:, 0]) - 0.5
    x, labels = torch.as_tensor(feats), torch.as_tensor(y)[:, None]
    latlon = (torch.as_tensor(lat), torch.as_tensor(lon))
    loss = GeoLoss([level], offset=OffsetLoss(pos, bounds, weight=1.0))
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.heads.parameters(), lr=0.05)
    for _ in range(200):
        total, parts = loss(model.forward_heads(x), labels, latlon=latlon)
        opt.zero_grad()
        total.backward()
        opt.step()
    with torch.no_grad():
        out = model.forward_heads(x)
    cls = out[level].argmax(1).numpy()
    assert (cls == y).mean() > 0.99
    off = out[OFFSET][torch.arange(n), torch.as_tensor(cls)].numpy()
    guess = decode_offsets(off, pos[cls], bounds[cls])
    hybrid_km = np.median(geodesy.haversine_km(guess[:, 0], guess[:, 1], lat, lon))
    cell_km = np.median(geodesy.haversine_km(pos[cls, 0], pos[cls, 1], lat, lon))
    assert cell_km > 500  # level 3 cells are 45 x 22.5 degrees
    assert hybrid_km * 4 < cell_km, (hybrid_km, cell_km)  # the issue asks for 2x; the offsets give far more
    # the guess stays inside its cell, and encode/decode are inverses there
    assert ((guess[:, 0] >= bounds[cls, 1]) & (guess[:, 0] <= bounds[cls, 3])).all()
    back = decode_offsets(encode_offsets(lat, lon, pos[y], bounds[y]), pos[y], bounds[y])
    assert np.allclose(back, np.stack([lat, lon], 1))


def test_offsets_are_clamped_to_the_cell_and_wrap_the_antimeridian():
    bounds = np.array([[135.0, 0.0, 180.0, 22.5]])
    pos = np.array([[10.0, 170.0]])
    assert decode_offsets(np.array([[5.0, -0.5]]), pos, bounds).tolist() == [[22.5, 147.5]]
    # a point just across the antimeridian is a small eastward offset, not a 359-degree one
    off = encode_offsets(np.array([10.0]), np.array([-179.0]), np.array([[10.0, 179.0]]), bounds)
    assert off[0].tolist() == pytest.approx([0.0, 2.0 / 45.0])


# ----------------------------------------------------------------------------- runs of each design


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("designs"))


DESIGNS = {
    "hybrid": dict(head="hybrid"),
    "hierarchical": dict(loss="hierarchical"),
    "frozen-both": dict(frozen=True, head="hybrid", loss="hierarchical", epochs=2, lr=1e-2),
}


@pytest.mark.slow
@pytest.mark.slow  # trains three tiny runs: `make test-fast` skips it
@pytest.mark.parametrize("name", list(DESIGNS))
def test_a_run_of_each_design_saves_loads_predicts_and_evaluates_from_its_folder(world, tmp_path, name):
    kw = DESIGNS[name]
    run = T.train(world, tiny(run_name=f"design-{name}", max_steps=2, **kw))
    meta = json.loads((run / "meta.json").read_text())
    assert meta["arch"]["head"] == kw.get("head", "cell") and meta["arch"]["loss"] == kw.get("loss", "independent")
    # from the folder alone: a copy elsewhere rebuilds the same model
    alone = tmp_path / "elsewhere" / run.name
    shutil.copytree(run, alone)
    model, _ = load_run(alone)
    hybrid, hier = kw.get("head") == "hybrid", kw.get("loss") == "hierarchical"
    assert (OFFSET in model.heads) == hybrid and ("1" in model.heads) == (not hier)
    predictor = Predictor.load(alone)
    assert predictor.hybrid == hybrid
    with world.manifest() as m:
        paths = [world.resolve(p) for p in m.frame(["path"], where="split = 'val'")["path"]]
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    logits = predictor.logits(images)
    assert (OFFSET in logits) == hybrid
    if hier:  # the coarse level's probabilities are the finest softmax summed into it
        anc = torch.as_tensor(predictor.hierarchy.ancestors(3, 1))
        summed = torch.zeros(len(images), logits[1].shape[1]).index_add_(1, anc, logits[3].softmax(1))
        assert torch.allclose(logits[1].softmax(1), summed, atol=1e-5)
    # predict_logits' best point is what points() (evaluate's path) says, row by row
    preds = predictor.predict_logits(logits, [p.name for p in paths], places=0)
    pts = predictor.points(logits, predictor.default_walk)
    assert [(round(p.best.lat, 4), round(p.best.lon, 4)) for p in preds] == \
        [(round(a, 4), round(b, 4)) for a, b in zip(pts.lat, pts.lon, strict=True)]
    assert pts.source == ("offset" if hybrid else "cell_positions")
    if hybrid:  # the guesses are offsets from the cell's point, inside the cell
        cell = predictor.points(logits, predictor.default_walk, offset=False)
        assert not np.allclose(pts.lat, cell.lat)
        b = predictor.bounds[pts.cls]
        assert ((pts.lat >= b[:, 1] - 1e-9) & (pts.lat <= b[:, 3] + 1e-9)).all()
    assert predictor.predict_files(paths[:1])[0].best is not None
    # evaluate: eval.json reports the hybrid guesses and the centroid rule side by side
    result = evaluate_run(run, world, split="val", progress=False)
    rules = result["geo_by_rule"]
    if hybrid:
        assert {"hierarchical", "hierarchical+centroid", "argmax", "argmax+centroid"} <= set(rules)
        assert rules["hierarchical"]["point"] == "offset"
        assert rules["hierarchical+centroid"]["point"] == "cell_positions"
        assert "without the offsets (hierarchical+centroid)" in format_report(result)  # the CLI prints both
    else:
        assert set(rules) == {"hierarchical", "argmax"}
    assert result["geo"] == rules["hierarchical"]
    # the leaderboard's note says the run's design
    board = Leaderboard(world.data_dir)
    notes = {n: e.get("note", "") for t in board.truth_sets() for n, e in board.entries(t["hash"]).items()}
    note = notes[run.name]
    assert ("head hybrid" in note) == hybrid and ("loss hierarchical" in note) == hier
    if kw.get("frozen"):  # refinement wins where it finds neighbours; the hybrid point elsewhere
        result = evaluate_run(run, world, split="val", progress=False, refine=True)
        assert result["geo_by_rule"]["hierarchical+refine"]["point"] == "neighbours"


# ----------------------------------------------------------------------------- the Train page


@pytest.mark.slow  # a Streamlit page run: `make test-fast` skips it
def test_the_train_page_offers_the_designs_and_they_reach_the_job_argv(ws, started):  # noqa: F811 - the fixture
    from test_train_page import _by_label, _hierarchy, _page

    _hierarchy(ws)
    at = _page().run()
    head, loss = _by_label(at.selectbox, "Head"), _by_label(at.selectbox, "Loss")
    assert (head.value, head.options) == ("cell", ["cell", "hybrid"])
    assert (loss.value, loss.options) == ("independent", ["independent", "hierarchical"])
    head.set_value("hybrid")
    loss.set_value("hierarchical")
    _by_label(at.number_input, "Offset loss weight (hybrid head)").set_value(2.0)
    at = _by_label(at.button, "Launch").click().run()
    assert not at.exception and not [e.value for e in at.error]
    (argv,) = started
    assert argv[argv.index("--head") + 1] == "hybrid" and argv[argv.index("--loss") + 1] == "hierarchical"
    assert argv[argv.index("--offset-weight") + 1] == "2.0"
