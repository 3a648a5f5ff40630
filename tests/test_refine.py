"""geohier.refine on constructed data where the answer is known: embeddings that are a
smooth function of position (so a query's nearest neighbours are the training points
nearest its true position), the kept-cell restriction, ties and empty cells, the file
round trip, and chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geohier import geodesy
from geohier.errors import InputError, WorkspaceError
from geohier.refine import DEFAULT_K, DEFAULT_TAU, NeighbourIndex, kept_lists, refine

# ----------------------------------------------------------------------------- a smooth world

D = 128
RNG = np.random.default_rng(0)
# random Fourier features of the unit vector: E[cos-sim] ~ exp(-(d / 60 km)^2 / 2)
W = torch.from_numpy(RNG.normal(0, 6371 / 60, (3, D))).float()
B0 = torch.from_numpy(RNG.uniform(0, 2 * np.pi, D)).float()


def embed(lat, lon) -> torch.Tensor:
    x = torch.from_numpy(geodesy.unit_vectors(lat, lon)).float()
    return torch.cos(x @ W + B0)


def cell_of(lat, lon):
    """1 x 1 degree cells over lat 40..50, lon 0..10: class = 10 * row + column."""
    return np.floor(np.asarray(lat) - 40).astype(int) * 10 + np.floor(np.asarray(lon)).astype(int)


def centre(c):
    c = np.asarray(c)
    return 40 + c // 10 + 0.5, c % 10 + 0.5


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(1)
    n = 5000
    lat, lon = rng.uniform(40, 50, n), rng.uniform(0, 10, n)
    index = NeighbourIndex.from_features(embed(lat, lon), lat, lon, cell_of(lat, lon), level=5)
    q = 160
    qlat, qlon = rng.uniform(41, 49, q), rng.uniform(1, 9, q)
    feats = embed(qlat, qlon)
    noise = torch.from_numpy(rng.normal(0, 1, (q, D))).float()
    feats = feats + 0.3 * feats.norm(dim=1, keepdim=True) / np.sqrt(D) * noise
    true = cell_of(qlat, qlon)
    kept = []
    for i, c in enumerate(true.tolist()):
        east, south = c + 1, c - 10
        if i % 4 == 0:  # the classifier is wrong: the true cell comes second
            kept.append([(east, 0.5), (c, 0.3), (south, 0.2)])
        else:
            kept.append([(c, 0.6), (east, 0.25), (south, 0.15)])
    return {"index": index, "feats": feats, "qlat": qlat, "qlon": qlon, "true": true, "kept": kept}


@pytest.mark.slow
def test_refined_error_is_far_below_the_cell_centre_error(world):
    kept, index = world["kept"], world["index"]
    top = np.array([k[0][0] for k in kept])
    clat, clon = centre(top)
    out = refine(world["feats"], kept, index, fallback=np.stack([clat, clon], 1))
    before = geodesy.haversine_km(clat, clon, world["qlat"], world["qlon"])
    after = geodesy.haversine_km(out.lat, out.lon, world["qlat"], world["qlon"])
    assert out.refined.all()
    # 1-degree cells: the centre is ~41 km off (median); 50 training points per cell put
    # the similarity-weighted mean of the nearest ones ~6 km off
    assert np.median(before) > 30
    assert np.median(after) < 8 and np.median(after) < 0.2 * np.median(before)
    assert after.mean() < 0.2 * before.mean()
    # neighbour evidence recovers the true cell where the classifier put it second
    wrong = np.arange(len(kept)) % 4 == 0
    assert (top[wrong] == world["true"][wrong]).mean() == 0
    assert (out.cls[wrong] == world["true"][wrong]).mean() > 0.8
    assert (out.cls == world["true"]).mean() > 0.9
    # the details: k neighbours of the chosen cell, most similar first, weights summing to 1
    for i in range(5):
        assert len(out.rows[i]) == DEFAULT_K
        assert (index.classes[out.rows[i]] == out.cls[i]).all()
        assert np.all(np.diff(out.sims[i]) <= 1e-6) and out.weights[i].sum() == pytest.approx(1.0)
        assert set(out.evidence[i]) == {c for c, _ in kept[i]}


def test_a_neighbour_outside_the_kept_cells_is_never_used(world):
    index = world["index"]
    i = 1
    qlat, qlon = world["qlat"][i], world["qlon"][i]
    c = int(world["true"][i])
    # an exact duplicate of the query, filed under a far cell that is not kept
    lat = np.append(index.lat, 10.0)
    lon = np.append(index.lon, 100.0)
    feats = torch.cat([index.emb.float(), world["feats"][i:i + 1]])
    big = NeighbourIndex.from_features(feats, lat, lon, np.append(index.classes, 99), level=5)
    kept = [[(c, 0.6), (c + 1, 0.4)]]
    out = refine(world["feats"][i:i + 1], kept, big, k=3)
    assert out.refined[0] and out.cls[0] in (c, c + 1)
    assert (big.classes[out.rows[0]] != 99).all() and 99 not in out.evidence[0]
    assert geodesy.haversine_km(out.lat[0], out.lon[0], qlat, qlon) < 20
    # kept, it is found first (similarity 1) and pulls the guess to its position
    out = refine(world["feats"][i:i + 1], [[(99, 0.5), (c, 0.5)]], big, k=1, tau=0.01)
    assert out.cls[0] == 99 and out.sims[0][0] == pytest.approx(1.0, abs=2e-3)
    assert (out.lat[0], out.lon[0]) == pytest.approx((10.0, 100.0))


def test_known_weights_and_mean():
    feats = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    index = NeighbourIndex.from_features(feats, [0.0, 0.0, 40.0, -40.0], [10.0, 20.0, 0.0, 0.0], [0, 0, 1, 2],
                                         level=2)
    q = torch.tensor([[2.0, 0.0]])  # not normalised: refine does it
    out = refine(q, [[(0, 0.5), (1, 0.5)]], index, k=2, tau=0.1)
    sims = np.array([1.0, 0.8])
    w = np.exp((sims - 1.0) / 0.1)
    w /= w.sum()
    lat, lon = geodesy.spherical_mean([0.0, 0.0], [10.0, 20.0], w)
    assert out.cls[0] == 0 and out.rows[0].tolist() == [0, 1]
    np.testing.assert_allclose(out.sims[0], sims, atol=1e-3)
    np.testing.assert_allclose(out.weights[0], w, atol=1e-2)
    assert (out.lat[0], out.lon[0]) == pytest.approx((lat, lon), abs=0.02)
    # score_c = p_c * sum exp(sim / tau): a likelier cell with a worse match can still lose ...
    ev = out.evidence[0]
    assert ev[0] == pytest.approx(np.log(0.5) + np.log(np.exp(10.0) + np.exp(8.0)), abs=0.05)
    assert ev[1] == pytest.approx(np.log(0.5) + 0.0, abs=0.05)
    # ... unless the classifier is sure enough: p = 0.99999 on cell 1 outweighs e^10
    out = refine(q, [[(1, 0.99999), (0, 0.00001)]], index, k=2, tau=0.1)
    assert out.cls[0] == 1 and (out.lat[0], out.lon[0]) == pytest.approx((40.0, 0.0))
    # the antimeridian: the mean of 179.9 and -179.9 is 180, not 0
    idx = NeighbourIndex.from_features(torch.ones(2, 2), [5.0, 5.0], [179.9, -179.9], [0, 0], level=1)
    out = refine(torch.ones(1, 2), [[(0, 1.0)]], idx, k=2)
    assert abs(abs(out.lon[0]) - 180.0) < 1e-6 and out.lat[0] == pytest.approx(5.0, abs=1e-3)


def test_ties_empty_cells_and_nothing_kept():
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    index = NeighbourIndex.from_features(feats, [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0, 1, 3], level=4)
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    kept = [
        [(0, 0.5), (1, 0.5)],  # a tie: the earlier kept candidate
        [(1, 0.5), (0, 0.5)],
        [(2, 0.7), (5, 0.2), (9, 0.1)],  # no index row in any kept cell (2 is empty, 5 and 9 beyond)
        [],  # nothing kept
    ]
    fb = np.array([[10.0, 11.0], [12.0, 13.0], [14.0, 15.0], [16.0, 17.0]])
    out = refine(q, kept, index, k=3, fallback=fb)
    assert out.cls.tolist() == [0, 1, 2, -1]
    assert out.refined.tolist() == [True, True, False, False]
    assert (out.lat[0], out.lon[0]) == pytest.approx((1.0, 1.0), abs=1e-6)
    assert (out.lat[1], out.lon[1]) == pytest.approx((2.0, 2.0), abs=1e-6)
    assert out.lat[2:].tolist() == [14.0, 16.0] and out.lon[2:].tolist() == [15.0, 17.0]
    assert out.rows[2].size == 0 and out.evidence[2] == {} and out.evidence[3] == {}
    # an empty kept cell beside one with rows: the one with rows
    out = refine(q[:1], [[(2, 0.9), (3, 0.1)]], index, k=3)
    assert out.cls[0] == 3 and out.refined[0] and out.rows[0].tolist() == [2]
    # no fallback: NaN where nothing was found
    out = refine(q[:1], [[(2, 1.0)]], index)
    assert np.isnan(out.lat[0]) and not out.refined[0]
    # an empty batch
    out = refine(torch.zeros(0, 2), [], index)
    assert out.lat.shape == (0,) and out.rows == []


def test_chunked_search_equals_unchunked(world):
    feats, kept, index = world["feats"][:12], world["kept"][:12], world["index"]
    a = refine(feats, kept, index, chunk=1_000_000)
    b = refine(feats, kept, index, chunk=16)  # every cell's ~50 rows in 4 blocks, merged top-k
    np.testing.assert_array_equal(a.cls, b.cls)
    for ra, rb, sa, sb in zip(a.rows, b.rows, a.sims, b.sims, strict=True):
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_allclose(sa, sb, atol=1e-6)
    np.testing.assert_allclose(a.lat, b.lat, atol=1e-9)
    np.testing.assert_allclose(a.lon, b.lon, atol=1e-9)


def test_from_features_normalises_sorts_and_drops_unlabelled():
    feats = np.array([[3.0, 4.0], [0.0, 2.0], [1.0, 1.0], [5.0, 0.0]])
    index = NeighbourIndex.from_features(feats, [1, 2, 3, 4], [5, 6, 7, 8], [2, 0, -1, 0], level=3)
    assert len(index) == 3 and index.emb.dtype == torch.float16
    np.testing.assert_allclose(index.emb.float().norm(dim=1).numpy(), 1.0, atol=1e-3)
    assert index.classes.tolist() == [0, 0, 2]  # sorted by class, stable
    assert index.ids.tolist() == [1, 3, 0]  # the input rows they came from
    assert index.lat.tolist() == [2.0, 4.0, 1.0]
    assert index.start.tolist() == [0, 2, 2] and index.end.tolist() == [2, 2, 3]
    with pytest.raises(InputError, match="rows but classes"):
        NeighbourIndex.from_features(feats, [1, 2, 3, 4], [5, 6, 7, 8], [0, 1], level=3)
    with pytest.raises(InputError, match="finite latitude"):
        NeighbourIndex.from_features(feats, [1, 2, np.nan, 4], [5, 6, 7, 8], [0, 0, 0, 0], level=3)


def test_save_load_round_trip_and_bad_files(tmp_path, world):
    index = world["index"]
    index.hierarchy_hash = "abc123"
    path = tmp_path / "run" / "neighbours.safetensors"
    index.save(path)
    back = NeighbourIndex.load(path)
    assert back.level == 5 and back.hierarchy_hash == "abc123" and len(back) == len(index)
    assert torch.equal(back.emb, index.emb)
    for name in ("lat", "lon", "classes", "ids", "start", "end"):
        np.testing.assert_array_equal(getattr(back, name), getattr(index, name))
    a = refine(world["feats"][:10], world["kept"][:10], index)
    b = refine(world["feats"][:10], world["kept"][:10], back)
    np.testing.assert_array_equal(a.lat, b.lat)
    # fits its run; another level, class count, embedding size or hierarchy does not
    back.check(5, 100, D, "abc123")
    for args, message in [((3, 100), "for level 5, the run's finest level is 3"),
                          ((5, 50), "has class 9. but level 5 has 50 classes"),
                          ((5, 100, 512), "128-d embeddings, the model's features are 512-d"),
                          ((5, 100, D, "ffff"), "built on hierarchy abc123")]:
        with pytest.raises(WorkspaceError, match=message):
            back.check(*args)
    # unreadable, foreign and incomplete files are one clear error naming the file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WorkspaceError, match="cannot read the neighbour index .*bad.safetensors"):
        NeighbourIndex.load(bad)
    from safetensors.torch import save_file

    save_file({"emb": torch.zeros(2, 2, dtype=torch.float16)}, str(tmp_path / "weights.safetensors"),
              metadata={"format": "geohier-run/1"})
    with pytest.raises(WorkspaceError, match="not a geohier neighbour index"):
        NeighbourIndex.load(tmp_path / "weights.safetensors")
    save_file({"emb": torch.zeros(2, 2, dtype=torch.float16)}, str(tmp_path / "part.safetensors"),
              metadata={"format": "geohier-neighbours/1", "level": "3"})
    with pytest.raises(WorkspaceError, match="lacks lat, lon, classes, ids"):
        NeighbourIndex.load(tmp_path / "part.safetensors")
    with pytest.raises(WorkspaceError, match="no neighbour index at"):
        NeighbourIndex.load(tmp_path / "missing.safetensors")


def test_bad_arguments_and_kept_lists(world):
    index = world["index"]
    with pytest.raises(InputError, match="k .* must be an integer >= 1"):
        refine(world["feats"][:1], world["kept"][:1], index, k=0)
    with pytest.raises(InputError, match="tau .* must be > 0"):
        refine(world["feats"][:1], world["kept"][:1], index, tau=0.0)
    with pytest.raises(InputError, match="queries are 3-d but the neighbour index holds 128-d"):
        refine(torch.zeros(1, 3), [[(0, 1.0)]], index)
    with pytest.raises(InputError, match="B kept lists"):
        refine(world["feats"][:2], world["kept"][:1], index)
    idx = torch.tensor([[4, 2, -1], [7, -1, -1]])
    prob = torch.tensor([[0.7, 0.2, 0.0], [1.0, 0.0, 0.0]])
    assert kept_lists(idx, prob) == [[(4, pytest.approx(0.7)), (2, pytest.approx(0.2))], [(7, 1.0)]]
    assert DEFAULT_TAU > 0
