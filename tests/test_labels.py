"""`python -m pipeline labels`: hierarchy.json, splits in the manifest, the seed export."""

from __future__ import annotations

import json
import os

import pytest

from geohier.errors import InputError
from geohier.hierarchy import Hierarchy
from geohier.workspace import sha256_file
from pipeline import cli
from pipeline.labels import build_labels, export_seed

# 6 images in L1 "1" (two places), 3 in L1 "3", 1 in L1 "2"; two sequences.
POINTS = [
    (10.0, 10.0, "a"), (10.001, 10.0, "a"), (10.002, 10.0, "a"), (10.003, 10.0, None),
    (50.0, 10.0, "b"), (50.01, 10.0, "b"),
    (-40.0, 20.0, None), (-40.1, 20.0, None), (-40.2, 20.0, None),
    (-40.0, -100.0, None),
]


def _populate(ws, make_jpeg, points=POINTS):
    with ws.manifest() as m:
        for i, (lat, lon, seq) in enumerate(points):
            rel = f"images/t/{i:03d}.jpg"
            p = make_jpeg(ws.data_dir / rel, size=(32, 24), color=(10 * i, 100, 200))
            m.add_image(source="photos", lat=lat, lon=lon, sha256=sha256_file(p), path=rel,
                        source_id=f"{i:03d}.jpg", sequence_id=seq)


def _run(ws, *argv, monkeypatch):
    # Only this command's module: the CLI's error handling without the other commands.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("pipeline.labels",))
    return cli.main(["--data", str(ws.data_dir), "--models", str(ws.models_dir), "labels", *argv])


def test_cli_writes_hierarchy_and_splits(ws, make_jpeg, monkeypatch, capsys):
    _populate(ws, make_jpeg)
    assert _run(ws, "--levels", "1,2", "--min-images", "1:2,2:1", "--seed", "3", monkeypatch=monkeypatch) == 0
    out = capsys.readouterr()
    h = Hierarchy.load(ws.hierarchy_path)
    assert h.levels == (1, 2)
    assert h.cells(1) == ["1", "3"]  # "2" has one image < 2
    assert h.cells(2) == ["1/0", "1/2", "3/0"]
    assert h.min_images == {1: 2, 2: 1}
    from geohier import splits

    version = splits.current(ws)  # the split version: recorded in hierarchy.json and kept in data/splits/
    assert h.splits == {"train": 0.8, "val": 0.1, "test": 0.1, "seed": 3, "hash": version.hash}
    assert splits.recorded(ws, version.hash).hash == version.hash and version.info["seed"] == 3
    assert h.images == 10
    with ws.manifest() as m:
        df = m.frame(["id", "sequence_id", "split"])
    assert df["split"].notna().all()
    assert set(df["split"]) <= {"train", "val", "test"}
    assert df[df.sequence_id == "a"]["split"].nunique() == 1
    assert "wrote" in out.out and "classes" in out.out and "splits: train" in out.out
    assert f"{'2':>5} {'1':>5} {'4':>7} {'3':>8} {'1':>8}" in out.out  # level, min, cells, kept, dropped


def test_cli_warns_about_a_level_with_one_class(ws, make_jpeg, monkeypatch, capsys):
    _populate(ws, make_jpeg)
    assert _run(ws, "--levels", "1,2", "--min-images", "4", monkeypatch=monkeypatch) == 0
    err = capsys.readouterr().err
    assert "warning: level 2 has 1 class" in err and "--min-images" in err


def test_cli_errors_are_one_line(ws, monkeypatch, capsys):
    assert _run(ws, monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the manifest has no images") and err.count("\n") == 1
    assert not ws.hierarchy_path.exists()
    assert _run(ws, "--levels", "3,1", monkeypatch=monkeypatch) == 2
    assert "strictly increasing" in capsys.readouterr().err
    assert _run(ws, "--split", "0.5,0.1,0.1", monkeypatch=monkeypatch) == 2
    assert "sum to 1" in capsys.readouterr().err
    assert _run(ws, "--min-images", "0", monkeypatch=monkeypatch) == 2
    assert ">= 1" in capsys.readouterr().err


def test_build_labels_library_defaults(ws, make_jpeg):
    _populate(ws, make_jpeg)
    h = build_labels(ws, min_images=1)
    assert h.levels == (1, 3, 5, 8)
    assert Hierarchy.load(ws.hierarchy_path) == h
    with pytest.raises(InputError, match="level 9"):
        build_labels(ws, levels=[1, 3], min_images={9: 2})


def test_export_seed_writes_maps_and_links(ws, make_jpeg, monkeypatch, tmp_path, capsys):
    _populate(ws, make_jpeg)
    out = tmp_path / "seed"
    assert _run(ws, "--levels", "1,2,4", "--min-images", "1", "--export-seed", str(out),
                monkeypatch=monkeypatch) == 0
    h = Hierarchy.load(ws.hierarchy_path)
    assert json.loads((out / "label_map_L2.json").read_text()) == h.label_map(2)
    assert json.loads((out / "label_map_L1.json").read_text()) == {"1": 0, "2": 1, "3": 2}
    assert json.loads((out / "l1_to_l2.json").read_text()) == {"0": [0, 1], "1": [2], "2": [3]}
    assert (out / "l2_to_l4.json").exists() and not (out / "l1_to_l3.json").exists()
    with ws.manifest() as m:
        df = m.frame(["id", "path", "split"])
    links = sorted(p for p in out.rglob("*.jpg"))
    assert len(links) == 3 * len(df)  # every image has a class at each level (min 1)
    assert all(p.is_symlink() for p in links)
    first = df.iloc[0]
    cell = h.cells(2)[h.labels([POINTS[0][0]], [POINTS[0][1]])[2][0]]
    link = out / "L2" / first["split"] / cell.replace("/", "_") / "000.jpg"
    assert link.is_symlink()
    assert os.path.samefile(link, ws.data_dir / first["path"])
    assert "symlinks" in capsys.readouterr().out
    # A second export replaces the previous links (no duplicates, no stale folders).
    assert _run(ws, "--levels", "1,2,4", "--min-images", "1", "--export-seed", str(out),
                monkeypatch=monkeypatch) == 0
    assert len(list(out.rglob("*.jpg"))) == 3 * len(df)


def test_export_seed_falls_back_to_hard_links(ws, make_jpeg, tmp_path, monkeypatch):
    _populate(ws, make_jpeg)
    h = build_labels(ws, levels=[1], min_images=1)

    def refuse(*a, **k):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", refuse)
    res = export_seed(ws, h, tmp_path / "seed", progress=False)
    assert res["mode"] == "hardlink" and res["links"] == len(POINTS)
    files = list((tmp_path / "seed" / "L1").rglob("*.jpg"))
    assert files and not any(f.is_symlink() for f in files)
    assert all(f.stat().st_nlink >= 2 for f in files)


def test_export_refuses_a_foreign_folder(ws, make_jpeg, tmp_path):
    _populate(ws, make_jpeg)
    h = build_labels(ws, levels=[1], min_images=1)
    out = tmp_path / "mine"
    (out / "L1").mkdir(parents=True)
    (out / "L1" / "precious.txt").write_text("keep me")
    with pytest.raises(Exception, match="not written by an export"):
        export_seed(ws, h, out, progress=False)
    assert (out / "L1" / "precious.txt").read_text() == "keep me"


def test_level_counts_from_the_stored_cells_and_finer_levels_from_positions(ws, make_jpeg):
    import numpy as np

    from geohier.hierarchy import cell_counts
    from pipeline.labels import level_counts

    assert {lv: k.size for lv, (k, _) in level_counts(ws, [1, 3]).items()} == {1: 0, 3: 0}  # no manifest
    _populate(ws, make_jpeg)
    lat, lon = np.array([p[0] for p in POINTS]), np.array([p[1] for p in POINTS])
    got, want = level_counts(ws, [1, 3, 8, 12]), cell_counts(lat, lon, [1, 3, 8, 12])
    assert list(got) == [1, 3, 8, 12]
    for lv in got:
        assert got[lv][0].tolist() == want[lv][0].tolist() and got[lv][1].tolist() == want[lv][1].tolist()


def test_build_labels_gives_the_splits_of_assign_splits(ws, make_jpeg):
    import numpy as np

    from geohier.splits import assign_splits

    _populate(ws, make_jpeg)
    build_labels(ws, min_images=1, seed=3)
    with ws.manifest() as m:
        f = m.frame(["id", "lat", "lon", "sequence_id", "split"])
    want = assign_splits(f["id"], f["lat"], f["lon"], f["sequence_id"].to_numpy(object), seed=3)
    assert f["split"].tolist() == want.tolist()
    assert set(np.unique(want)) <= {"train", "val", "test"}
