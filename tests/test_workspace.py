"""geohier.workspace: where things live, and the SQLite image manifest."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from geohier import grid
from geohier.errors import InputError, InvalidCoordinateError, InvalidLevelError, WorkspaceError
from geohier.runs import list_runs
from geohier.workspace import (
    IMAGE_COLUMNS,
    MANIFEST_LEVEL,
    Manifest,
    Workspace,
    atomic_write_bytes,
    sha256_bytes,
    sha256_file,
)

CAPE_TOWN = (-33.92, 18.42)
NEW_YORK = (40.71, -74.01)
TOKYO = (35.68, 139.69)


def _add(m: Manifest, lat: float, lon: float, n: int, source: str = "demo") -> int:
    return m.add_image(source=source, lat=lat, lon=lon, sha256=f"sha{n}", path=f"images/{n}.jpg",
                       source_id=f"id{n}")


# ------------------------------------------------------------------ Workspace


def test_from_env_precedence_explicit_then_env_then_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GEOHIER_DATA", raising=False)
    monkeypatch.delenv("GEOHIER_MODELS", raising=False)
    ws = Workspace.from_env()
    assert (ws.data_dir, ws.models_dir) == (tmp_path / "data", tmp_path / "models")
    monkeypatch.setenv("GEOHIER_DATA", str(tmp_path / "env_data"))
    monkeypatch.setenv("GEOHIER_MODELS", str(tmp_path / "env_models"))
    ws = Workspace.from_env()
    assert (ws.data_dir, ws.models_dir) == (tmp_path / "env_data", tmp_path / "env_models")
    ws = Workspace.from_env(tmp_path / "mine", "rel_models")
    assert (ws.data_dir, ws.models_dir) == (tmp_path / "mine", tmp_path / "rel_models")
    assert ws.data_dir.is_absolute() and ws.models_dir.is_absolute()


def test_paths_resolve_and_runs(ws):
    assert ws.manifest_path == ws.data_dir / "manifest.sqlite"
    assert ws.images_dir == ws.data_dir / "images"
    assert ws.hierarchy_path == ws.data_dir / "hierarchy.json"
    assert ws.resolve("images/ab/x.jpg") == ws.data_dir / "images/ab/x.jpg"
    assert ws.resolve("/elsewhere/x.jpg") == Path("/elsewhere/x.jpg")
    (ws.models_dir / "b_run").mkdir()
    (ws.models_dir / "b_run" / "config.json").write_text("{}")
    (ws.models_dir / "a_run").mkdir()
    (ws.models_dir / "a_run" / "meta.json").write_text("{}")
    (ws.models_dir / "not_a_run").mkdir()
    assert [r.name for r in list_runs(ws.models_dir)] == ["a_run", "b_run"]
    assert list_runs(ws.models_dir / "missing") == []
    assert not ws.has_manifest()
    ws.manifest().close()
    assert ws.has_manifest()


# ------------------------------------------------------------------ schema


def test_manifest_is_wal_with_the_designed_schema(ws):
    with ws.manifest() as m:
        assert m.conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        images = [r[1] for r in m.conn.execute("PRAGMA table_info(images)")]
        fetch_log = [r[1] for r in m.conn.execute("PRAGMA table_info(fetch_log)")]
    assert images == ["id", "source", "source_id", "sequence_id", "lat", "lon", "captured_at", "cell",
                      "path", "width", "height", "brightness", "sha256", "split", "added_at"]
    assert tuple(images) == IMAGE_COLUMNS
    assert fetch_log == ["cell", "status", "found", "kept", "error", "at"]
    # Reopening an existing manifest keeps it (CREATE ... IF NOT EXISTS).
    with ws.manifest() as m:
        assert m.count() == 0


def test_readers_are_not_blocked_by_a_writer(ws):
    with ws.manifest() as writer, ws.manifest() as reader:
        _add(writer, *TOKYO, 0)
        with writer.transaction():
            _add(writer, *NEW_YORK, 1)
            assert reader.count() == 1  # WAL: the reader sees the last commit, immediately
        assert reader.count() == 2


def test_a_corrupt_manifest_is_a_workspace_error(ws):
    ws.manifest_path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(WorkspaceError, match="manifest.sqlite"):
        ws.manifest()


# ------------------------------------------------------------------ writing rows


def test_add_image_stores_the_l8_cell_and_refuses_duplicates(ws):
    with ws.manifest() as m:
        i = _add(m, *CAPE_TOWN, 1)
        assert isinstance(i, int)
        row = m.frame(where="id = ?", params=(i,)).iloc[0]
        assert row.cell == grid.to_id(grid.cell(*CAPE_TOWN, MANIFEST_LEVEL), sep="")
        assert len(row.cell) == MANIFEST_LEVEL and row.added_at.endswith("+00:00")
        assert _add(m, *NEW_YORK, 1) is None  # same sha256
        assert m.add_image(source="demo", lat=0.0, lon=1.0, sha256="other", path="x",
                           source_id="id1") is None  # same (source, source_id)
        assert m.add_image(source="photos", lat=0.0, lon=1.0, sha256="other", path="x",
                           source_id="id1") is not None  # another source may reuse the id
        assert m.count() == 2
        with pytest.raises(InvalidCoordinateError, match="95"):
            m.add_image(source="demo", lat=95.0, lon=0.0, sha256="bad", path="x")
        # A CHECK failure is bad input, not a "duplicate" (None would hide it).
        with pytest.raises(InputError, match="CHECK constraint"):
            m.add_image(source="demo", lat=1.0, lon=1.0, sha256="s", path="x", split="holdout")
        assert m.count() == 2


def test_add_rows_inserts_in_bulk_like_add_image(ws):
    import pandas as pd

    rows = pd.DataFrame({"source": ["csv", "csv", "csv", "csv"], "source_id": ["a", "b", "a", None],
                         "lat": [CAPE_TOWN[0], NEW_YORK[0], TOKYO[0], 0.5],
                         "lon": [CAPE_TOWN[1], NEW_YORK[1], TOKYO[1], 0.5],
                         "sha256": ["s1", "s2", "s3", "s1"], "path": ["p1", "p2", "p3", "p4"],
                         "split": ["train", None, "val", "test"], "width": [16, None, 16, 16]})
    with ws.manifest() as m:
        assert m.add_rows(rows, chunk=2) == 2  # row 3 repeats (csv, a), row 4 repeats sha s1
        assert m.add_rows(rows) == 0  # all there already
        got = m.frame()
        assert got["sha256"].tolist() == ["s1", "s2"] and got["split"].iloc[0] == "train"
        assert pd.isna(got["split"].iloc[1])
        assert got["cell"].tolist() == [grid.to_id(grid.cell(*p, MANIFEST_LEVEL), sep="") for p in (CAPE_TOWN, NEW_YORK)]
        assert got["width"].iloc[0] == 16 and pd.isna(got["width"].iloc[1])
        assert got["added_at"].iloc[0].endswith("+00:00")
        one = {"source": ["csv"], "lat": [1.0], "lon": [2.0], "sha256": ["s9"], "path": ["p"]}
        for bad, match in (({**one, "cell": ["0"]}, "cell"), ({**one, "lat": [95.0]}, "valid point"),
                           ({**one, "split": ["holdout"]}, "holdout"), ({**one, "path": [None]}, "path")):
            with pytest.raises(InputError, match=match):
                m.add_rows(bad)
        assert m.count() == 2  # nothing of a refused batch is written


def test_store_image_writes_the_file_then_the_row(ws):
    data = b"\xff\xd8 not really a jpeg but bytes are bytes"
    sha = sha256_bytes(data)
    with ws.manifest() as m:
        i = m.store_image(data, ".JPG", source="photos", lat=1.0, lon=2.0, source_id="a")
        assert i is not None
        path = m.frame(["path"]).path[0]
        assert path == f"images/{sha[:2]}/{sha}.jpg"
        assert (ws.data_dir / path).read_bytes() == data
        assert sha256_file(ws.data_dir / path) == sha
        # Duplicate bytes: nothing written, None returned.
        assert m.store_image(data, "jpg", source="photos", lat=3.0, lon=4.0, source_id="b") is None
        assert m.count() == 1
    files = [p for p in ws.images_dir.rglob("*") if p.is_file()]
    assert files == [ws.data_dir / path]  # no temp files left behind


def test_store_image_interrupted_before_the_row_leaves_only_a_file(ws, monkeypatch):
    def boom(self, **row):
        raise KeyboardInterrupt

    with ws.manifest() as m:
        monkeypatch.setattr(Manifest, "add_image", boom)
        with pytest.raises(KeyboardInterrupt):
            m.store_image(b"abc", "png", source="photos", lat=1.0, lon=2.0)
        monkeypatch.undo()
        assert m.count() == 0
        assert len(list(ws.images_dir.rglob("*.png"))) == 1
        # The next import of the same bytes reuses that file and adds the row.
        assert m.store_image(b"abc", "png", source="photos", lat=1.0, lon=2.0) is not None
    assert len(list(ws.images_dir.rglob("*.png"))) == 1


def test_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


# ------------------------------------------------------------------ reading


def test_counts_per_level(ws):
    with ws.manifest() as m:
        for n, point in enumerate([CAPE_TOWN, CAPE_TOWN, NEW_YORK, TOKYO, (-33.5, 18.9)]):
            _add(m, *point, n)
        assert m.counts(1) == {"3": 3, "0": 1, "1": 1}  # Cape Town SE, New York NW, Tokyo NE
        l3 = m.counts(3)
        assert sum(l3.values()) == 5 and l3[grid.to_id(grid.cell(*NEW_YORK, 3))] == 1
        assert l3[grid.to_id(grid.cell(*CAPE_TOWN, 3))] == 3
        l8 = m.counts(8)
        assert l8[grid.to_id(grid.cell(*CAPE_TOWN, 8))] == 2 and len(l8) == 4
        keys, counts = m.count_keys(3)
        assert list(keys) == sorted(keys) and counts.sum() == 5
        assert grid.keys_to_ids(keys, 3) == sorted(l3)
        with pytest.raises(InputError, match="level 8"):
            m.counts(9)
        with pytest.raises(InvalidLevelError):
            m.counts(0)
        lat, lon = m.points()
        np.testing.assert_allclose(lat[:3], [CAPE_TOWN[0], CAPE_TOWN[0], NEW_YORK[0]])
        assert m.summary() == {"images": 5, "cells": 4, "by_source": {"demo": 5},
                               "by_split": {"unassigned": 5}}


def _random_rows(n: int, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    lat = np.clip(rng.normal(30, 30, n), -89, 89)
    lon = rng.uniform(-180, 180, n)
    return pd.DataFrame({"source": rng.choice(["csv", "demo"], n), "lat": lat, "lon": lon,
                         "sha256": [f"s{i}" for i in range(n)], "path": "x.jpg",
                         "split": rng.choice(np.array(["train", "val", "test", None], dtype=object), n)})


def test_counts_from_the_cell_index_match_the_positions(ws):
    from geohier.hierarchy import cell_counts

    rows = _random_rows(3000)
    with ws.manifest() as m:
        m.add_rows(rows, chunk=700)
        lat, lon = m.points(chunk=256)  # several chunks, in id order
        np.testing.assert_array_equal(lat, rows["lat"].to_numpy())
        np.testing.assert_array_equal(lon, rows["lon"].to_numpy())
        got = m.count_levels([1, 3, 5, 8])
        want = cell_counts(lat, lon, [1, 3, 5, 8])
        for lv in (1, 3, 5, 8):
            np.testing.assert_array_equal(got[lv][0], want[lv][0])
            np.testing.assert_array_equal(got[lv][1], want[lv][1])
            assert m.counts(lv) == dict(zip(grid.keys_to_ids(*want[lv][:1], lv), want[lv][1].tolist()))
        # the images of some cells: index ranges of their ids, in the cells' order
        keys = want[3][0][[4, 0, 9]]
        plat, plon = m.points_in(keys, 3)
        at3 = grid.encode(lat, lon, 3)
        inside = np.concatenate([np.flatnonzero(at3 == k) for k in keys])
        np.testing.assert_array_equal(plat, lat[inside])
        np.testing.assert_array_equal(plon, lon[inside])
        assert m.points_in([], 5)[0].size == 0
        with pytest.raises(InputError, match="level 8"):
            m.points_in([0], 9)
        # summary from the (source, split) and cell indexes
        s = m.summary()
        assert s["images"] == 3000 and s["cells"] == len(want[8][0])
        assert s["by_source"] == rows["source"].value_counts().to_dict()
        assert s["by_split"] == rows["split"].fillna("unassigned").value_counts().to_dict()
        # frames: the same rows as frame, in pieces
        parts = list(m.frames(["id", "sha256", "split"], "split IN (?, ?)", ("train", "val"), chunk=500))
        assert max(len(p) for p in parts) == 500
        whole = m.frame(["id", "sha256", "split"], "split IN (?, ?)", ("train", "val"))
        assert np.array_equal(np.concatenate([p["id"].to_numpy() for p in parts]), whole["id"].to_numpy())
        with pytest.raises(InputError, match="nope"):
            next(m.frames(["nope"]))


def test_set_splits_takes_arrays_and_leaves_unchanged_rows_alone(ws):
    with ws.manifest() as m:
        m.add_rows(_random_rows(50).drop(columns=["split"]))
        ids = m.frame(["id"])["id"].to_numpy()
        names = np.array(["train", "val", "test", "train", "train"] * 10)  # "<U5", as labels passes them
        m.set_splits(ids=ids, splits=names)
        assert m.frame(["split"])["split"].tolist() == names.tolist()
        m.conn.execute("CREATE TEMP TABLE updated (id INTEGER)")
        m.conn.execute("CREATE TEMP TRIGGER log AFTER UPDATE ON images BEGIN INSERT INTO updated VALUES (new.id); END")
        m.set_splits(ids=ids, splits=names)  # nothing to change: no row is rewritten
        assert m.conn.execute("SELECT COUNT(*) FROM updated").fetchone()[0] == 0
        names[:3] = "test"
        m.set_splits(ids=ids[:5], splits=names[:5])  # a subset; the other rows keep theirs
        assert m.frame(["split"])["split"].tolist() == names.tolist()
        assert m.conn.execute("SELECT COUNT(*) FROM updated").fetchone()[0] == 2  # train, val -> test; test stays
        with pytest.raises(InputError, match="holdout"):
            m.set_splits(ids=ids[:2], splits=["train", "holdout"])
        with pytest.raises(InputError, match="2 ids but 1"):
            m.set_splits(ids=ids[:2], splits=["train"])
        assert m.frame(["split"])["split"].tolist() == names.tolist()


def test_empty_manifest_reads(ws):
    with ws.manifest() as m:
        assert m.counts(3) == {}
        keys, counts = m.count_keys(3)
        assert keys.dtype == np.int64 and len(keys) == len(counts) == 0
        lat, lon = m.points()
        assert lat.shape == lon.shape == (0,)
        assert m.summary()["images"] == 0
        assert list(m.frame().columns) == list(IMAGE_COLUMNS)


def test_frame_rejects_unknown_columns(ws):
    with ws.manifest() as m, pytest.raises(InputError, match="nope"):
        m.frame(["id", "nope"])


def test_set_splits_validates_then_writes_in_one_transaction(ws):
    with ws.manifest() as m:
        ids = [_add(m, *TOKYO, n) for n in range(3)]
        with pytest.raises(InputError, match="holdout"):
            m.set_splits({ids[0]: "train", ids[1]: "holdout"})
        assert m.frame(["split"]).split.isna().all()  # nothing half-applied
        m.set_splits({ids[0]: "train", ids[1]: "val", ids[2]: "test"})
        assert list(m.frame(["split"]).split) == ["train", "val", "test"]
        assert m.summary()["by_split"] == {"train": 1, "val": 1, "test": 1}
        with pytest.raises(RuntimeError), m.transaction() as conn:
            conn.execute("UPDATE images SET split = NULL")
            raise RuntimeError("rolled back")
        assert list(m.frame(["split"]).split) == ["train", "val", "test"]


def test_fetch_log_upserts(ws):
    with ws.manifest() as m:
        m.log_fetch("0/1", "partial", found=10, kept=3, error="timeout")
        m.log_fetch("0/1", "done", found=12, kept=12)
        m.log_fetch("0/2", "empty")
        status = m.fetch_status()
    assert status["0/1"]["status"] == "done" and status["0/1"]["kept"] == 12
    assert status["0/1"]["error"] is None and status["0/2"]["found"] == 0


# ------------------------------------------------------------------ concurrent writers


def test_store_image_spares_a_concurrent_writers_temp_file_and_removes_a_stale_one(ws):
    data = b"same bytes, two importers"
    sha = sha256_bytes(data)
    folder = ws.images_dir / sha[:2]
    folder.mkdir(parents=True)
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another importer, alive
    theirs = folder / f".{sha}.jpg.{other.pid}-1-abcd.tmp"      # its file, mid-write
    stale = folder / f".{sha}.jpg.{os.getpid()}-1-dead.tmp"     # one of ours, left long ago
    theirs.write_bytes(data[:5])
    stale.write_bytes(data[:3])
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    try:
        with ws.manifest() as m:
            assert m.store_image(data, "jpg", source="photos", lat=1.0, lon=2.0) is not None
    finally:
        other.kill()
        other.wait()
    assert theirs.read_bytes() == data[:5] and not stale.exists()
    assert (folder / f"{sha}.jpg").read_bytes() == data


def test_write_image_file_reads_a_folder_for_stale_temps_once_per_process(ws, monkeypatch):
    # A folder holds ~20,000 files at 5 M images: reading it on every write took 25 ms a copy.
    from geohier import workspace

    swept = []
    real = workspace.remove_stale_temps
    monkeypatch.setattr(workspace, "remove_stale_temps", lambda folder, *a, **k: swept.append(folder) or real(folder))
    blobs = [f"image {n}".encode() for n in range(600)]
    by_folder: dict[str, int] = {}
    for data in blobs:
        rel = workspace.write_image_file(ws.data_dir, data, "JPG")
        sha = sha256_bytes(data)
        assert rel == f"images/{sha[:2]}/{sha}.jpg" and (ws.data_dir / rel).read_bytes() == data
        by_folder[sha[:2]] = by_folder.get(sha[:2], 0) + 1
    assert max(by_folder.values()) > 1  # several writes went into one folder
    assert sorted(Path(f).name for f in swept) == sorted(by_folder)  # each folder read once
    assert workspace.write_image_file(ws.data_dir, blobs[0], "jpg") == f"images/{sha256_bytes(blobs[0])[:2]}/" \
        f"{sha256_bytes(blobs[0])}.jpg"  # already there: nothing written, the same path


def _noisy_photo(path: Path, lat: float, lon: float, seed: int) -> None:
    # noise makes a ~40 KB JPEG: long enough to write that two importers overlap
    from conftest import _dms
    from PIL import Image

    img = Image.frombytes("RGB", (256, 192), np.random.default_rng(seed).bytes(256 * 192 * 3))
    exif = Image.Exif()
    exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: _dms(lat), 3: "E" if lon >= 0 else "W", 4: _dms(lon)}
    img.save(path, "JPEG", exif=exif.tobytes())


def test_many_openers_of_a_new_manifest_all_succeed(tmp_path):
    # Switching a new file into WAL answered "database is locked" at once (no busy handler) to
    # whichever opener lost the race: 4 of 100 rounds of 4 threads failed before _use_wal, and one
    # of two parallel import-photos failed in CI.
    import threading

    from geohier.workspace import Manifest

    failures = []

    def open_close(d):
        try:
            Manifest(d / "manifest.sqlite", d).close()
        except Exception as exc:  # noqa: BLE001 - every failure is the finding
            failures.append(repr(exc))

    for r in range(100):
        d = tmp_path / f"r{r}"
        d.mkdir()
        threads = [threading.Thread(target=open_close, args=(d,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []


def test_use_wal_retries_a_locked_switch_and_gives_up_after_its_wait(monkeypatch):
    import sqlite3

    from geohier import workspace

    class Conn:
        def __init__(self, locked_times, error="database is locked"):
            self.locked, self.error, self.switched = locked_times, error, 0

        def execute(self, sql):
            if sql == "PRAGMA journal_mode":
                return type("R", (), {"fetchone": lambda _self: ("wal" if self.switched else "delete",)})()
            if self.locked:
                self.locked -= 1
                raise sqlite3.OperationalError(self.error)
            self.switched += 1

    monkeypatch.setattr(workspace.time, "sleep", lambda s: None)
    conn = Conn(locked_times=3)
    workspace._use_wal(conn, wait_s=30.0)
    assert conn.switched == 1 and conn.locked == 0
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        workspace._use_wal(Conn(locked_times=10**9), wait_s=0.01)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        workspace._use_wal(Conn(locked_times=1, error="disk I/O error"), wait_s=30.0)
    already = Conn(locked_times=5)
    already.switched = 1
    workspace._use_wal(already, wait_s=30.0)
    assert already.locked == 5  # a file in WAL is not switched again


@pytest.mark.slow
def test_two_concurrent_import_photos_both_succeed_and_add_every_image_once(ws, tmp_path):
    # Before one temp name per writer, one of the two failed ("No such file or directory:
    # .../.<sha>.jpg.<random>.tmp") in 2 of 3 tries: store_image deleted the other's temp file.
    from conftest import ROOT

    photos = tmp_path / "photos"
    photos.mkdir()
    n = 40
    for i in range(n):
        _noisy_photo(photos / f"p{i:02d}.jpg", -40.5 + 2 * i, -100.5 + 5 * i, seed=i)
    env = {**os.environ, "GEOHIER_DATA": str(ws.data_dir), "GEOHIER_MODELS": str(ws.models_dir)}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "import-photos", str(photos)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("Traceback" not in err for _, err in outs)
    with ws.manifest() as m:
        df = m.frame(["sha256", "path", "source_id"])
    assert len(df) == n and df.sha256.nunique() == n and df.source_id.nunique() == n
    files = sorted(p for p in ws.images_dir.rglob("*") if p.is_file() or p.name.startswith("."))
    assert len(files) == n and not [p for p in files if p.name.endswith(".tmp")]
    assert sorted(str(ws.data_dir / p) for p in df.path) == sorted(map(str, files))


# ------------------------------------------------------------------ output paths (coverage --csv)


@pytest.mark.slow
def test_coverage_csv_writes_through_a_symlink(ws, tmp_path, capsys):
    from pipeline.cli import main as cli_main

    real = tmp_path / "out" / "cells.csv"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "cells-link.csv"
    link.symlink_to(real)
    assert cli_main(["coverage", "--level", "1", "--csv", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text().startswith("cell,key,status") and len(real.read_text().splitlines()) == 5
    assert [p.name for p in real.parent.iterdir()] == ["cells.csv"]


def test_coverage_refuses_a_fifo_or_a_directory_with_one_line(ws, tmp_path, capsys):
    from pipeline.cli import main as cli_main

    fifo, folder = tmp_path / "pipe.csv", tmp_path / "folder.csv"
    os.mkfifo(fifo)
    folder.mkdir()
    (folder / "inside").write_text("keep")
    for target, kind in ((fifo, "FIFO"), (folder, "directory")):
        capsys.readouterr()
        assert cli_main(["coverage", "--level", "1", "--csv", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(target) in err and kind in err, err
        assert "Traceback" not in err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert folder.is_dir() and (folder / "inside").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------ fetch progress


def test_fetch_progress_records_and_clears(ws):
    with ws.manifest() as m:
        assert m.fetch_progress("0/1") == [] and m.fetch_progress_counts() == {}
        m.record_subbox("0/1", 0, "2x2/s0", 5, 3)
        m.record_subbox("0/1", 1, "2x2/s0", 2, 2)
        m.record_subbox("0/1", 1, "2x2/s0", 4, 1)  # recorded again: replaced
        m.record_subbox("0/2", 0, "1x1/s0", 0, 0)
        assert sorted(m.fetch_progress("0/1")) == [(0, "2x2/s0", 5), (1, "2x2/s0", 4)]
        assert m.fetch_progress_counts() == {"0/1": 2, "0/2": 1}
        with m.transaction():
            m.clear_fetch_progress("0/1")
        assert m.fetch_progress("0/1") == [] and m.fetch_progress_counts() == {"0/2": 1}
