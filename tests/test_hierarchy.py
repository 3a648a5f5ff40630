"""The label hierarchy (classes per level, parents, labels, JSON) and the split assignment."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from geohier import grid
from geohier.errors import InputError, InvalidLevelError, WorkspaceError
from geohier.hierarchy import (
    Hierarchy,
    build_hierarchy,
    cell_counts,
    kept_summary,
    parse_min_images,
    select_classes,
)
from geohier.splits import assign_splits, split_groups

# A small world at levels 1 and 2 (cells worked out by hand from the quadrant digits):
#   3 x (10, 10)    -> L1 "1", L2 "1/2"
#   1 x (50, 10)    -> L1 "1", L2 "1/0"
#   2 x (-40, 20)   -> L1 "3", L2 "3/0"
#   1 x (-40, -100) -> L1 "2", L2 "2/0"
LAT = [10, 10, 10, 50, -40, -40, -40]
LON = [10, 10, 10, 10, 20, 20, -100]


def test_counts_and_drops_with_min_images():
    h = build_hierarchy(LAT, LON, [1, 2], min_images=2)
    assert h.levels == (1, 2)
    assert h.cells(1) == ["1", "3"]
    assert h.counts(1).tolist() == [4, 2]  # "1/0" (1 image) is dropped at L2 but counts at L1
    assert h.cells(2) == ["1/2", "3/0"]
    assert h.counts(2).tolist() == [3, 2]
    assert h.parents(1).tolist() == [-1, -1]
    assert h.parents(2).tolist() == [0, 1]
    assert h.num_classes == {1: 2, 2: 2}
    assert h.images == 7
    assert h.min_images == {1: 2, 2: 2}
    assert h.stats[2] == {"cells_with_images": 4, "dropped": 2, "images_kept": 5}


def test_a_class_whose_parent_is_dropped_is_dropped():
    h = build_hierarchy(LAT, LON, [1, 2], min_images={1: 2, 2: 1})
    # "2/0" has its 1 image but its parent "2" (1 image < 2) is gone.
    assert h.cells(2) == ["1/0", "1/2", "3/0"]
    assert h.parents(2).tolist() == [0, 0, 1]


def test_per_level_minimum_text_and_defaults():
    assert parse_min_images("1:1,3:5,8:10", [1, 3, 5, 8]) == {1: 1, 3: 5, 5: 5, 8: 10}
    assert parse_min_images("2,8:20", [1, 8]) == {1: 2, 8: 20}
    assert parse_min_images(7, (1, 3)) == {1: 7, 3: 7}
    with pytest.raises(InputError, match="level 4"):
        parse_min_images("4:3", [1, 3])
    with pytest.raises(InputError, match=">= 1"):
        parse_min_images(0, [1, 3])
    with pytest.raises(InputError, match="'x'"):
        parse_min_images("1:x", [1])


def test_labels_are_minus_one_where_dropped():
    h = build_hierarchy(LAT, LON, [1, 2], min_images=2)
    lab = h.labels([10, 50, -40, -40, float("nan")], [10, 10, 20, -100, 0])
    assert lab[1].tolist() == [0, 0, 1, -1, -1]
    assert lab[2].tolist() == [0, -1, 1, -1, -1]
    assert lab[1].dtype == np.int64
    # Shapes are kept.
    assert h.labels(np.full((2, 3), 10.0), np.full((2, 3), 10.0))[2].shape == (2, 3)


def test_arbitrary_levels_and_valid_parents():
    rng = np.random.default_rng(1)
    lat = rng.uniform(-60, 70, 3000)
    lon = rng.uniform(-180, 180, 3000)
    h = build_hierarchy(lat, lon, [2, 4, 7], min_images={2: 1, 4: 20, 7: 2})
    assert h.levels == (2, 4, 7)
    for prev, lv in [(2, 4), (4, 7)]:
        p = h.parents(lv)
        assert p.min() >= 0 and p.max() < h.num_classes[prev]
        assert np.array_equal(h.keys(lv) >> (2 * (lv - prev)), h.keys(prev)[p])
        assert (h.counts(lv) >= h.min_images[lv]).all()
    assert np.all(np.diff(h.keys(7)) > 0)
    lab = h.labels(lat, lon)
    # -1 labels form a suffix: once dropped, dropped at every finer level.
    assert not np.any((lab[4] >= 0) & (lab[2] < 0))
    assert not np.any((lab[7] >= 0) & (lab[4] < 0))
    # Labels agree with the parents: the parent of a point's L7 class is its L4 class.
    ok = lab[7] >= 0
    assert np.array_equal(h.parents(7)[lab[7][ok]], lab[4][ok])
    assert np.array_equal(h.ancestors(7, 2)[lab[7][ok]], lab[2][ok])
    h2 = build_hierarchy(lat, lon, [2, 4], 1)
    assert h2.levels == (2, 4)


def test_counts_sum_to_images_at_every_level_when_nothing_is_dropped():
    rng = np.random.default_rng(2)
    lat, lon = rng.uniform(-80, 80, 500), rng.uniform(-180, 180, 500)
    h = build_hierarchy(lat, lon, [1, 3, 5, 8], 1)
    assert all(int(h.counts(lv).sum()) == 500 for lv in h.levels)
    assert all((lab >= 0).all() for lab in h.labels(lat, lon).values())


def test_child_index_and_seed_maps():
    h = build_hierarchy(LAT, LON, [1, 2], min_images=1)
    assert h.cells(1) == ["1", "2", "3"]
    assert h.cells(2) == ["1/0", "1/2", "2/0", "3/0"]
    indptr, indices = h.child_index(1)
    assert indptr.tolist() == [0, 2, 3, 4]
    assert indices.tolist() == [0, 1, 2, 3]
    assert h.children(1, 0).tolist() == [0, 1]
    assert h.children_map(1) == {0: [0, 1], 1: [2], 2: [3]}
    assert h.seed_maps() == {"l1_to_l2": {"0": [0, 1], "1": [2], "2": [3]}}
    assert h.label_map(2) == {"1/0": 0, "1/2": 1, "2/0": 2, "3/0": 3}
    assert h.parent_map(2) == {"1/0": "1", "1/2": "1", "2/0": "2", "3/0": "3"}
    assert h.parent_map(1) == {}
    with pytest.raises(InvalidLevelError, match="finest"):
        h.child_index(2)
    assert h.index(2, "1/2") == 1 and h.index(2, "0/0") == -1
    with pytest.raises(InputError, match="level 1"):
        h.index(2, "1")


def test_child_index_of_a_class_without_children():
    h = build_hierarchy(LAT, LON, [1, 2], min_images={1: 1, 2: 2})
    assert h.cells(1) == ["1", "2", "3"]
    indptr, _ = h.child_index(1)
    assert indptr.tolist() == [0, 1, 1, 2]  # class "2" has no child class
    assert h.children(1, 1).tolist() == []


def test_centroids():
    h = build_hierarchy(LAT, LON, [1, 2], min_images=1)
    lat, lon = h.centroids(1)
    assert lat.tolist() == [45.0, -45.0, -45.0]
    assert lon.tolist() == [90.0, -90.0, 90.0]


def test_hash_is_the_canonical_json_of_levels_and_cells():
    h = build_hierarchy(LAT, LON, [1, 2], min_images=2)
    text = json.dumps({"levels": [1, 2], "cells": {"1": ["1", "3"], "2": ["1/2", "3/0"]}},
                      sort_keys=True, separators=(",", ":"))
    assert h.hash == hashlib.sha256(text.encode()).hexdigest()
    assert build_hierarchy(LAT, LON, [1, 2], min_images=2).hash == h.hash
    # Different classes -> different hash; same classes with other counts -> same hash.
    assert build_hierarchy(LAT, LON, [1, 2], min_images=1).hash != h.hash
    assert build_hierarchy(LAT + [10], LON + [10], [1, 2], min_images=2).hash == h.hash
    assert build_hierarchy(LAT, LON, [1, 3], min_images=2).hash != h.hash


def test_json_round_trip(tmp_path):
    h = build_hierarchy(LAT, LON, [1, 2], min_images={1: 2, 2: 1})
    h.splits = {"train": 0.8, "val": 0.1, "test": 0.1, "seed": 3}
    path = h.save(tmp_path / "hierarchy.json")
    d = json.loads(path.read_text())
    assert d["format"] == "geohier-hierarchy/1"
    assert d["levels"] == [1, 2]
    assert d["min_images"] == {"1": 2, "2": 1}
    assert d["classes"]["2"] == {"cells": ["1/0", "1/2", "3/0"], "counts": [1, 3, 2], "parent": [0, 0, 1]}
    assert d["images"] == 7 and d["hash"] == h.hash
    h2 = Hierarchy.load(path)
    assert h2 == h
    assert h2.to_dict() == h.to_dict()
    assert h2.splits["seed"] == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_load_refuses_bad_files(tmp_path):
    h = build_hierarchy(LAT, LON, [1, 2], min_images=1)
    d = h.to_dict()
    with pytest.raises(WorkspaceError, match="pipeline labels"):
        Hierarchy.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        Hierarchy.load(tmp_path / "bad.json")
    with pytest.raises(InputError, match="format"):
        Hierarchy.from_dict({**d, "format": "other/1"})
    edited = json.loads(json.dumps(d))
    edited["classes"]["2"]["cells"] = ["1/0", "1/2", "3/0"]
    edited["classes"]["2"]["counts"] = [1, 1, 1]
    edited["classes"]["2"]["parent"] = [0, 0, 2]
    with pytest.raises(InputError, match="hash mismatch"):
        Hierarchy.from_dict(edited)
    wrong_parent = json.loads(json.dumps(d))
    wrong_parent["classes"]["2"]["parent"] = [0, 0, 0, 0]
    with pytest.raises(InputError, match="parent"):
        Hierarchy.from_dict(wrong_parent)
    orphan = json.loads(json.dumps(d))
    orphan["classes"]["1"]["cells"] = ["1", "3"]
    orphan["classes"]["1"]["counts"] = [4, 2]
    with pytest.raises(InputError, match="2/0.*no parent"):
        Hierarchy.from_dict({**orphan, "hash": None})
    with pytest.raises(InputError, match="missing"):
        Hierarchy.from_dict({"format": "geohier-hierarchy/1", "levels": [1]})


def test_validation_of_levels_and_trainability():
    with pytest.raises(InvalidLevelError):
        build_hierarchy(LAT, LON, [3, 1], 1)
    with pytest.raises(InvalidLevelError):
        build_hierarchy(LAT, LON, [0, 1], 1)
    with pytest.raises(InputError, match="no images"):
        build_hierarchy([], [], [1, 2], 1)
    with pytest.raises(InputError, match="no images"):
        build_hierarchy([float("nan")], [0.0], [1], 1)
    h = build_hierarchy(LAT, LON, [1, 2], min_images={1: 1, 2: 3})
    assert h.num_classes[2] == 1
    assert len(h.problems()) == 1
    with pytest.raises(InputError, match=r"level 2 has 1 class.*--min-images"):
        h.check_trainable()
    h0 = build_hierarchy(LAT, LON, [1, 2], min_images=100)
    assert h0.num_classes == {1: 0, 2: 0}
    assert h0.labels([10], [10])[1].tolist() == [-1]
    with pytest.raises(InputError, match="level 1 has 0 classes"):
        h0.check_trainable()
    build_hierarchy(LAT, LON, [1, 2], 1).check_trainable()
    with pytest.raises(InvalidLevelError, match="level 5"):
        h.cells(5)


def test_select_classes_matches_build_and_kept_summary():
    counts = cell_counts(LAT, LON, [1, 2])
    assert counts[1][0].tolist() == [1, 2, 3] and counts[1][1].tolist() == [4, 1, 2]
    masks = select_classes(counts, {1: 2, 2: 1})
    assert masks[1].tolist() == [True, False, True]
    assert masks[2].tolist() == [True, True, False, True]
    rows = kept_summary(counts, {1: 2, 2: 1})
    assert [(r["level"], r["classes"], r["dropped"], r["images_kept"]) for r in rows] == [(1, 2, 1, 6), (2, 3, 1, 6)]


# --------------------------------------------------------------------------- splits


def _offset(lat, lon, metres, bearing_deg):
    # A point `metres` away on a bearing (flat-earth is fine at 100 m).
    b = np.radians(bearing_deg)
    dlat = metres * np.cos(b) / 111_195.0
    dlon = metres * np.sin(b) / (111_195.0 * np.cos(np.radians(lat)))
    return lat + dlat, lon + dlon


def test_same_sequence_same_split_even_far_apart():
    rng = np.random.default_rng(0)
    n = 600
    lat, lon = rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)
    seq = np.array([f"seq{i % 40}" for i in range(n)], dtype=object)
    s = assign_splits(np.arange(n), lat, lon, seq)
    for k in range(40):
        assert len(set(s[seq == f"seq{k}"])) == 1
    assert set(s) == {"train", "val", "test"}


def test_points_100m_apart_without_sequence_share_a_split():
    rng = np.random.default_rng(3)
    m = 800
    lat0, lon0 = rng.uniform(-70, 70, m), rng.uniform(-180, 180, m)
    lat1, lon1 = _offset(lat0, lon0, 95.0, rng.uniform(0, 360, m))
    lat, lon = np.concatenate([lat0, lat1]), np.concatenate([lon0, lon1])
    # Pairs that straddle a bucket edge for sure: across lon 0, across lat 0, across lon 180.
    lat = np.concatenate([lat, [10.0, 10.0, -0.0004, 0.0004, 5.0, 5.0]])
    lon = np.concatenate([lon, [-0.00042, 0.00042, 30.0, 30.0, 179.99958, -179.99958]])
    seq = [None] * lat.size
    s = assign_splits(np.arange(lat.size), lat, lon, seq)
    assert np.array_equal(s[:m], s[m:2 * m])
    assert s[-6] == s[-5] and s[-4] == s[-3] and s[-2] == s[-1]
    g = split_groups(lat[-6:], lon[-6:], seq[-6:])
    assert g[0] == g[1] and g[2] == g[3] and g[4] == g[5]
    assert g[0].startswith("b:")
    raw = split_groups(lat[-6:], lon[-6:], seq[-6:], link_m=0)  # the pairs do straddle bucket edges
    assert raw[0] != raw[1] and raw[2] != raw[3] and raw[4] != raw[5]


def test_points_far_apart_are_separate_groups_and_sequences_win():
    g = split_groups([10, 10, 10.05], [10, 10, 10], [None, "", "abc"])
    assert g[0] == g[1]  # same ~1 km bucket ("" is no sequence)
    assert g[2] == "s:abc"
    g2 = split_groups([10, 10.05], [10, 10], [None, float("nan")])
    assert g2[0] != g2[1]  # ~5.5 km apart


def test_group_codes_name_every_image_as_the_per_image_strings_did():
    # The split of a group hangs on its name's hash: the names must stay exactly
    # "s:<sequence>" / "b:<merged bucket>", whatever the values, in first-appearance order.
    from geohier.splits import SPLIT_BUCKET_LEVEL, _known, _merge_buckets, group_codes

    rng = np.random.default_rng(7)
    n = 600
    lat, lon = rng.uniform(40, 41, n), rng.uniform(10, 11, n)
    pool = np.array([None, "", "  ", "None", float("nan"), "a", "b", "a ", 7, "7", 7.0, np.nan, pd.NA], dtype=object)
    seq = pool[rng.integers(0, pool.size, n)]
    known = _known(seq)
    sp = np.flatnonzero(~known)
    roots = _merge_buckets(lat[sp], lon[sp], grid.encode(lat[sp], lon[sp], SPLIT_BUCKET_LEVEL),
                           SPLIT_BUCKET_LEVEL, 100.0, 50)
    want = np.empty(n, dtype=object)
    want[known] = ["s:" + str(s) for s in seq[known]]
    want[sp] = ["b:" + str(int(b)) for b in roots]
    codes, names = group_codes(lat, lon, seq, max_group=50)
    assert names[codes].tolist() == want.tolist()
    assert names.tolist() == list(dict.fromkeys(want.tolist()))  # first appearance
    assert split_groups(lat, lon, seq, max_group=50).tolist() == want.tolist()
    assert group_codes([], [], None)[0].size == 0


def test_fractions_roughly_respected_and_deterministic():
    rng = np.random.default_rng(4)
    n = 2000
    lat, lon = rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)
    ids = np.arange(n)
    s = assign_splits(ids, lat, lon, None, fractions=(0.8, 0.1, 0.1), seed=0)
    share = {k: float((s == k).mean()) for k in ("train", "val", "test")}
    assert abs(share["train"] - 0.8) < 0.01
    assert abs(share["val"] - 0.1) < 0.01
    assert abs(share["test"] - 0.1) < 0.01
    assert np.array_equal(s, assign_splits(ids, lat, lon, None, seed=0))
    assert not np.array_equal(s, assign_splits(ids, lat, lon, None, seed=1))
    perm = rng.permutation(n)  # the input order does not matter
    assert np.array_equal(assign_splits(ids[perm], lat[perm], lon[perm], None, seed=0), s[perm])
    s2 = assign_splits(ids, lat, lon, None, fractions=(0.5, 0.5, 0.0))
    assert abs((s2 == "train").mean() - 0.5) < 0.01 and not (s2 == "test").any()


def test_fractions_respected_over_images_with_big_sequences():
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 40, 300)
    seq = np.repeat([f"q{i}" for i in range(sizes.size)], sizes)
    n = seq.size
    lat, lon = rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)
    s = assign_splits(np.arange(n), lat, lon, seq)
    assert abs((s == "train").mean() - 0.8) < 0.03
    assert abs((s == "test").mean() - 0.1) < 0.03


def test_a_dense_cluster_does_not_swallow_every_split():
    rng = np.random.default_rng(6)
    n = 3000
    lat = 48.85 + rng.normal(0, 0.03, n)  # one city, points every few metres
    lon = 2.35 + rng.normal(0, 0.04, n)
    s = assign_splits(np.arange(n), lat, lon, None)
    assert 0.7 < (s == "train").mean() < 0.9
    assert (s == "val").mean() > 0.05 and (s == "test").mean() > 0.05


def test_bad_fractions_and_lengths():
    with pytest.raises(InputError, match="sum to 1"):
        assign_splits([1], [0], [0], None, fractions=(0.8, 0.3, 0.1))
    with pytest.raises(InputError, match="three"):
        assign_splits([1], [0], [0], None, fractions=(0.9, 0.1))
    with pytest.raises(InputError, match="three numbers"):
        assign_splits([1], [0], [0], None, fractions="a,b,c")
    with pytest.raises(InputError, match="2 ids"):
        assign_splits([1, 2], [0], [0], None)
    assert assign_splits([], [], [], None).tolist() == []


def test_hierarchy_keys_agree_with_grid_ids():
    h = build_hierarchy([40.71], [-74.01], [1, 3], 1)
    assert h.cells(3) == [grid.to_id(grid.cell(40.71, -74.01, 3))] == ["0/3/0"]
