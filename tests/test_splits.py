"""Numbers you can trust: a run's own split survives relabelling, corrupt weights are
refused with one line, and evaluate's points are the Predictor's answers image for image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_evaluate import make_tiny_run, make_tiny_workspace

from geohier import benchmark, splits
from geohier.errors import InputError, WorkspaceError
from geohier.predictor import Predictor
from pipeline import cli, evaluate

pytestmark = pytest.mark.slow  # trains tiny runs, relabels and evaluates them: `make test-fast` skips this module


def _main(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------- split versions


def test_splits_round_trip_and_hash(tmp_path):
    s = splits.Splits.from_assignment([5, 1, 2, 9], ["val", "train", "train", "test"], {"seed": 3})
    path = s.save(tmp_path / "s.safetensors")
    back = splits.Splits.load(path)
    assert back.hash == s.hash and back.info == {"seed": 3}
    assert {k: v.tolist() for k, v in back.ids.items()} == {"train": [1, 2], "val": [5], "test": [9]}
    assert back.split_of([9, 1, 4]).tolist() == ["test", "train", ""]
    other = splits.Splits.from_assignment([5, 1, 2, 9], ["train", "train", "train", "test"])
    assert other.hash != s.hash
    path.write_bytes(path.read_bytes()[:40])  # truncated: one error naming the file
    with pytest.raises(splits.SplitError, match="cannot read the split file .*s.safetensors"):
        splits.Splits.load(path)


def test_relabel_keeps_a_runs_test_split(ws, capsys):
    """`labels --seed 5` reshuffles the manifest; the run evaluates on its own test images
    with exactly the score it had, and labels names it."""
    run = make_tiny_run(ws, "tiny")
    rc, _, err = _main(["evaluate", "tiny", "--no-calibrate", "--json"], capsys)
    assert rc == 0, err
    before = json.loads((run / "eval.json").read_text())
    own = splits.of_run(run, ws)
    assert (run / "split.safetensors").is_file() and splits.store_path(ws, own.hash).is_file()

    rc, out, err = _main(["labels", "--levels", "1,3", "--min-images", "1", "--seed", "5"], capsys)
    assert rc == 0, err
    now = splits.current(ws)
    assert now.hash != own.hash  # the manifest's split moved ...
    moved = np.isin(own.ids["test"], now.ids["train"]).sum()
    assert moved > 0  # ... some of the run's test images are now "train"
    assert "trained on an earlier split keep it" in out and "tiny" in out
    assert splits.store_path(ws, now.hash).is_file() and splits.store_path(ws, own.hash).is_file()

    rc, _, err = _main(["evaluate", "tiny", "--no-calibrate", "--json"], capsys)
    assert rc == 0, err
    after = json.loads((run / "eval.json").read_text())
    assert after["geo"]["geoscore"] == before["geo"]["geoscore"]
    assert after["geo_by_rule"] == before["geo_by_rule"]
    assert after["source"]["split_hash"] == own.hash and after["truth"]["hash"] == before["truth"]["hash"]

    # the run's split gone from both places: exit 2 naming it, and nothing written
    (run / "split.safetensors").unlink()
    splits.store_path(ws, own.hash).unlink()
    (run / "eval.json").unlink()
    board = ws.data_dir / "leaderboard" / "leaderboard.json"
    board_before = board.read_bytes() if board.exists() else None
    rc, out, err = _main(["evaluate", "tiny", "--no-calibrate"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"trained on split {own.hash[:12]}, whose file is gone" in err
    assert not (run / "eval.json").exists()
    assert (board.read_bytes() if board.exists() else None) == board_before


def test_a_run_without_a_split_record(ws):
    """A run from before split versions: adopts splits drawn before it started (and says
    so), refuses splits drawn after it started."""
    from test_predictor import make_tiny_run as bare_run

    from geohier.hierarchy import Hierarchy

    make_tiny_workspace(ws, (1, 3))
    h = Hierarchy.load(ws.hierarchy_path)
    run = bare_run(ws.models_dir / "old", h)  # config.created_at: now, after the hierarchy
    got = splits.run_ids(run, ws, "test")
    assert got.note and "recorded no split" in got.note and (run / "split.safetensors").is_file()
    assert splits.of_run(run, ws).hash == splits.current(ws).hash  # adopted: a relabel keeps it now

    run2 = bare_run(ws.models_dir / "older", h)
    cfg = json.loads((run2 / "config.json").read_text())
    cfg["created_at"] = "2020-01-01T00:00:00+00:00"  # started before these splits were drawn
    (run2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WorkspaceError, match="records no split .* drawn after it started"):
        splits.run_ids(run2, ws, "test")
    assert not (run2 / "split.safetensors").exists()


# ----------------------------------------------------------------------------- corrupt weights


def _poison(run_dir, value=float("nan")):
    from safetensors.torch import load_file, save_file

    path = run_dir / "model.safetensors"
    state = load_file(str(path))
    key = next(k for k in sorted(state) if k.startswith("heads.") and k.endswith("weight"))
    state[key] = torch.full_like(state[key], value)
    save_file(state, str(path), metadata={"format": "geohier-run/1"})
    return path


def test_nan_weights_end_predict_and_evaluate_with_one_line(ws, capsys, make_jpeg, tmp_path):
    run = make_tiny_run(ws, "tiny")
    rc, _, err = _main(["evaluate", "tiny", "--no-calibrate"], capsys)
    assert rc == 0, err
    board = ws.data_dir / "leaderboard" / "leaderboard.json"
    board_before = board.read_bytes()
    eval_before = (run / "eval.json").read_bytes()
    path = _poison(run)
    photo = make_jpeg(tmp_path / "p.jpg")
    for argv in (["predict", str(photo), "--run", "tiny"], ["evaluate", "tiny", "--no-calibrate"],
                 ["evaluate", "tiny", "--calibrate"]):
        rc, out, err = _main(argv, capsys)
        assert rc == 2, argv
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert str(path) in err and "NaN or infinite" in err
    assert board.read_bytes() == board_before and (run / "eval.json").read_bytes() == eval_before


def test_non_finite_outputs_are_refused(ws):
    """Finite weights that still give infinite logits (huge values overflow): refused
    by the one inference path, naming the weights file."""
    from geohier.errors import GeohierError

    run = make_tiny_run(ws, "tiny")
    _poison(run, 3e38)
    p = Predictor.load(run, device="cpu")
    z = {lv: torch.full((2, p.tree.num_classes[lv]), float("inf")) for lv in p.levels}
    with pytest.raises(GeohierError, match="model.safetensors gives non-finite outputs"):
        p.points(z)
    with pytest.raises(GeohierError, match="non-finite outputs"):
        p.predict_logits(z, ["a", "b"])


# ----------------------------------------------------------------------------- one inference path


def test_evaluate_points_are_the_predictors_answers(ws):
    """For every walk, the distances behind eval.json's geo_by_rule are those of
    Predictor.predict_files on the same images; the headline's per-image points are
    predict's default answers."""
    from geohier.leaderboard import Leaderboard

    run = make_tiny_run(ws, "tiny", extra_meta={"temperatures": {"1": 0.7, "3": 1.9}})
    res = evaluate.evaluate_run(run, ws, calibrate=False, progress=False)
    own = splits.of_run(run, ws)
    with ws.manifest() as m:
        frame = m.frame(["id", "path", "lat", "lon"])
    frame = frame[frame["id"].isin(own.ids["test"])]
    paths = [str(ws.resolve(p)) for p in frame["path"]]
    p = Predictor.load(run, device="cpu")
    assert set(res["geo_by_rule"]) == set(p.walks()) == {"argmax", "hierarchical"}
    for walk in p.walks():
        preds = p.predict_files(paths, places=0, walk=walk)
        lat = np.array([q.best.lat for q in preds])
        lon = np.array([q.best.lon for q in preds])
        mine = benchmark.score_points(frame["lat"].to_numpy(float), frame["lon"].to_numpy(float), lat, lon)
        for k, v in mine.items():
            if isinstance(v, float):
                assert res["geo_by_rule"][walk][k] == pytest.approx(v, abs=1e-9), (walk, k)
        if walk == p.default_walk:  # image for image: the leaderboard's points are predict's answers
            board = Leaderboard(ws.data_dir)
            pts = board.points(board.truth_sets()[0]["hash"], "tiny")
            got = dict(zip(pts["key"].astype(str), zip(pts["pred_lat"], pts["pred_lon"], strict=True), strict=True))
            for key, a, b in zip(frame["id"].astype(str), lat, lon, strict=True):
                assert got[key] == pytest.approx((a, b), abs=1e-9)
    # and predict's default is the hierarchical walk
    default = p.predict_files(paths[:2], places=0)
    assert [q.best.cell for q in default] == [q.best.cell for q in p.predict_files(paths[:2], places=0,
                                                                                    walk="hierarchical")]


def test_evaluate_csv_flags_training_images(ws, tmp_path, capsys):
    """An external CSV that repeats the run's training images: counted by sha256 and the
    leaderboard row says so."""
    from geohier.leaderboard import Leaderboard

    run = make_tiny_run(ws, "tiny")
    own = splits.of_run(run, ws)
    with ws.manifest() as m:
        frame = m.frame(["id", "path", "lat", "lon"])
    train = frame[frame["id"].isin(own.ids["train"])].head(3)
    test = frame[frame["id"].isin(own.ids["test"])].head(2)
    rows = ["path,lat,lon"] + [f"{p},{a},{b}" for p, a, b in
                               zip(list(train["path"]) + list(test["path"]), list(train["lat"]) + list(test["lat"]),
                                   list(train["lon"]) + list(test["lon"]), strict=True)]
    csv = tmp_path / "ext.csv"
    csv.write_text("\n".join(rows) + "\n")
    res = evaluate.evaluate_run(run, ws, csv=csv, images_root=ws.data_dir, calibrate=False, progress=False)
    assert res["source"]["in_training"] == 3 and res["source"]["training_check"] == "sha256"
    assert any("3 of 5 images" in n for n in res["notes"])
    board = Leaderboard(ws.data_dir)
    entry = board.entries(board.truth_sets()[0]["hash"])["tiny"]
    assert "NOT HELD OUT: 3 of 5" in entry["note"] and entry["in_training"] == 3


def test_evaluate_within_scores_predicts_limited_answers(ws, capsys):
    """evaluate --within: every scored guess lies inside the limit (the points predict
    --within gives), in an entry of its own beside the run's."""
    from geohier.leaderboard import Leaderboard

    run = make_tiny_run(ws, "tiny")
    bbox = "bbox:30,-10,60,20"  # Europe: Paris and Berlin
    rc, _, err = _main(["evaluate", "tiny", "--no-calibrate"], capsys)
    assert rc == 0, err
    rc, _, err = _main(["evaluate", "tiny", "--no-calibrate", "--within", bbox], capsys)
    assert rc == 0, err
    res = json.loads((run / "eval.json").read_text())
    assert res["source"]["within"].startswith("bbox") and res["geo"]["point"] == "within"
    board = Leaderboard(ws.data_dir)
    entries = board.entries(board.truth_sets()[0]["hash"])
    name = next(n for n in entries if n.startswith("tiny within "))
    assert "tiny" in entries and entries[name]["geo"] != entries["tiny"]["geo"]
    pts = board.points(board.truth_sets()[0]["hash"], name)
    lat, lon = pts["pred_lat"].to_numpy(float), pts["pred_lon"].to_numpy(float)
    assert ((lat >= 30) & (lat <= 60) & (lon >= -10) & (lon <= 20)).all()
    # and the Predictor's own answers agree with them
    p = Predictor.load(run, device="cpu")
    with ws.manifest() as m:
        frame = m.frame(["id", "path"])
    frame = frame[frame["id"].isin(splits.of_run(run, ws).ids["test"])]
    preds = p.predict_files([str(ws.resolve(x)) for x in frame["path"]], places=0, within=bbox)
    got = dict(zip(pts["key"].astype(str), zip(lat, lon, strict=True), strict=True))
    for key, q in zip(frame["id"].astype(str), preds, strict=True):
        assert got[key] == pytest.approx((q.best.lat, q.best.lon), abs=1e-9)
    rc, _, err = _main(["evaluate", "tiny", "--within", "country:ZZ"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_from_assignment_takes_a_numpy_array_of_names():
    ids = np.array([9, 3, 5, 3, 7], dtype=np.int64)
    names = ["val", "train", "test", "train", None]
    s = splits.Splits.from_assignment(ids, names)
    fast = splits.Splits.from_assignment(ids, np.array(["val", "train", "test", "train", ""]))
    assert fast.hash == s.hash and fast.ids["train"].tolist() == [3] and fast.counts() == s.counts()
    assert splits._sorted_unique([5, 1, 5, 3]).tolist() == [1, 3, 5] and splits._sorted_unique([]).size == 0
    with pytest.raises(InputError, match="2 ids but 1"):
        splits.Splits.from_assignment([1, 2], np.array(["train"]))


def test_a_split_version_records_the_place_groups_it_was_dealt_in(ws):
    """labels records each image's place group with the split version: evaluate weighs by
    those, even after images were added to the manifest (the groups drawn again would move)."""
    from geohier import splits as sp
    from pipeline import cli

    with ws.manifest() as m:
        for i in range(40):
            m.add_image(source="t", source_id=str(i), lat=10.0 + (i // 4) * 0.5, lon=20.0, sha256=f"{i:064x}",
                        path=f"images/{i}.jpg", sequence_id=f"seq{i // 4}")
    assert cli.main(["labels", "--levels", "1", "--min-images", "1"]) == 0
    version = sp.current(ws)
    saved = sp.recorded(ws, version.hash)
    assert saved is not None and saved.groups is not None and saved.hash == version.hash
    ids = np.concatenate([saved.ids[s] for s in sp.SPLITS])
    codes = saved.group_of(ids)
    with ws.manifest() as m:
        seq = dict(zip(m.frame(["id", "sequence_id"])["id"], m.frame(["id", "sequence_id"])["sequence_id"]))
    by_seq = {}
    for i, c in zip(ids.tolist(), codes.tolist()):  # one group per sequence, as they were dealt
        by_seq.setdefault(seq[i], set()).add(c)
    assert all(len(v) == 1 for v in by_seq.values()) and len({next(iter(v)) for v in by_seq.values()}) == 10
    assert (sp.groups_of(ws, ids, saved) == codes).all()
    # a version from before groups were recorded: drawn again from the manifest
    old = sp.Splits(saved.ids, saved.info)
    again = sp.groups_of(ws, ids, old)
    assert len(set(again.tolist())) == 10 and old.group_of(ids) is None
