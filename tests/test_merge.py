"""pipeline.merge: sharded fetches (and any workspaces) combined into one."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geohier import grid
from geohier.errors import InputError
from geohier.workspace import Workspace
from pipeline import cli
from pipeline import fetch as F
from pipeline import merge as G
from tests.mapillary_server import MapillaryServer, thumb_jpeg

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "MLY|4242|merge-token"
CELLS = ["0/1/2/3/0/1/2/3/0/1/2/0", "0/1/2/3/0/1/2/3/0/1/2/1", "0/1/2/3/0/1/2/3/0/1/2/2",
         "0/1/2/3/0/1/2/3/0/1/2/3"]   # level 12: one sub-box each


def other(tmp_path, name) -> Workspace:
    return Workspace(tmp_path / name / "data", tmp_path / name / "models")


def add(w: Workspace, key: str, *, source="mapillary", seq=None, split=None, lat=48.0, lon=2.0, data=None):
    with w.manifest() as m:
        return m.store_image(data or thumb_jpeg(key), "jpg", source=source, source_id=key, sequence_id=seq,
                             lat=lat, lon=lon, split=split)


def frame(w: Workspace):
    with w.manifest() as m:
        return m.frame()


def check_files(w: Workspace) -> None:
    for r in frame(w).itertuples():
        p = w.resolve(r.path)
        assert p.is_file(), f"row {r.id} without its file"
        assert hashlib.sha256(p.read_bytes()).hexdigest() == r.sha256


def _main(argv, monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("pipeline.merge",))
    return cli.main(argv)


@pytest.fixture
def shards(tmp_path):
    """Two workspaces that fetched shards 0/2 and 1/2 of CELLS, and the full set of ids."""
    with MapillaryServer(token=TOKEN) as srv:
        for i, c in enumerate(CELLS):
            srv.seed_cells([grid.bounds(grid.from_id(c))], per_cell=3, prefix=f"c{i}-")
        out = []
        for i in range(2):
            w = other(tmp_path, f"shard{i}")
            cells = F.select_cells(",".join(CELLS), shard=f"{i}/2")
            o = F.FetchOptions(api_url=srv.url, per_cell=10, rate_limit=0, concurrency=2, retries=1)
            report = F.fetch(w, cells, o, TOKEN)
            assert report.done == 2
            out.append(w)
        return out, set(srv.images)


def test_two_shards_merge_into_one(ws, shards):
    (a, b), ids = shards
    assert len(frame(a)) == len(frame(b)) == 6
    report = G.merge(ws, [a.data_dir, b.data_dir])
    df = frame(ws)
    assert set(df.source_id) == ids and len(df) == 12
    assert report.added == 12 and report.duplicates == 0 and report.cells_added == 4
    with ws.manifest() as m:
        st = m.fetch_status()
    assert sorted(st) == sorted(CELLS) and {s["status"] for s in st.values()} == {"done"}
    check_files(ws)
    assert all(not Path(p).is_absolute() for p in df.path)      # copies, inside this workspace
    # sequence ids travel with their rows
    src = frame(a).set_index("source_id").sequence_id
    assert (df.set_index("source_id").sequence_id.loc[src.index] == src).all()
    # a fetch into the merged workspace finds nothing left to do
    assert F.plan(ws, CELLS).todo == []
    assert "12 images added" in report.summary() and "labels" in report.summary()


def test_merging_again_adds_nothing(ws, shards):
    (a, b), _ = shards
    G.merge(ws, [a.data_dir, b.data_dir])
    files = sorted(p for p in ws.images_dir.rglob("*") if p.is_file())
    again = G.merge(ws, [b.data_dir, a.data_dir])
    assert again.added == 0 and again.duplicates == 12 and again.cells_added == again.cells_updated == 0
    assert len(frame(ws)) == 12 and sorted(p for p in ws.images_dir.rglob("*") if p.is_file()) == files


def test_a_source_whose_path_has_uri_characters_merges(ws, tmp_path):
    # the source is opened read-only through a file: URI, where # and ? would end the path
    src = other(tmp_path, "shard #2?")
    add(src, "a")
    report = G.merge(ws, [src.data_dir])
    assert report.added == 1 and frame(ws).source_id.tolist() == ["a"]
    check_files(ws)


def test_duplicates_by_bytes_and_by_source_id(ws, tmp_path):
    a = other(tmp_path, "a")
    add(ws, "mine", source="photos")
    add(a, "same-bytes", data=thumb_jpeg("mine"))       # the bytes of an image already here
    add(ws, "x1")
    add(a, "x1", data=thumb_jpeg("x1-other"))           # the same Mapillary id, other bytes
    add(a, "new")
    report = G.merge(ws, [a.data_dir])
    assert report.added == 1 and report.duplicates == 2
    assert sorted(frame(ws).source_id) == ["mine", "new", "x1"]


def test_a_sequence_keeps_the_first_split(ws, tmp_path):
    a, b = other(tmp_path, "a"), other(tmp_path, "b")
    add(ws, "t1", seq="S", split="train")
    add(a, "a1", seq="S", split="test")                 # S is train here: it stays train
    add(a, "a2", seq="T", split="val")                  # T is new: its first split is val
    add(b, "b1", seq="T", split="test")                 # ... so T's rows from b are val too
    add(b, "b2", seq=None, split="test")                # no sequence: keeps its own
    add(b, "b3", seq="U", split=None)                   # unassigned stays unassigned
    add(b, "b4", seq="S", source="photos", split="val")  # another source's sequence "S"
    report = G.merge(ws, [a.data_dir, b.data_dir])
    split = {k: (v if isinstance(v, str) else None) for k, v in frame(ws).set_index("source_id").split.items()}
    assert split == {"t1": "train", "a1": "train", "a2": "val", "b1": "val", "b2": "test", "b3": None,
                     "b4": "val"}
    assert report.split_adopted == 2
    df = frame(ws)
    assert (df.groupby(["source", "sequence_id"]).split.nunique() <= 1).all()


def test_link_stores_the_source_files_path(ws, tmp_path):
    a = other(tmp_path, "a")
    add(a, "k1")
    add(a, "k2")
    report = G.merge(ws, [a.data_dir], link=True)
    df = frame(ws)
    assert report.added == report.linked == 2
    assert all(Path(p).is_absolute() and Path(p).is_relative_to(a.data_dir) for p in df.path)
    assert not ws.images_dir.exists() or not any(ws.images_dir.rglob("*.jpg"))
    check_files(ws)


def test_missing_and_changed_files_are_skipped(ws, tmp_path):
    a = other(tmp_path, "a")
    add(a, "gone")
    add(a, "changed")
    add(a, "fine")
    rows = frame(a).set_index("source_id").path
    a.resolve(rows["gone"]).unlink()
    a.resolve(rows["changed"]).write_bytes(b"not the same bytes")
    report = G.merge(ws, [a.data_dir])
    assert frame(ws).source_id.tolist() == ["fine"]
    assert (report.added, report.missing, report.corrupt) == (1, 1, 1)
    assert "1 missing and 1 damaged" in report.summary()


def test_fetch_log_takes_the_more_finished_record(ws, tmp_path):
    a = other(tmp_path, "a")
    with ws.manifest() as m:
        m.log_fetch("0/1", "error", 0, 0, "HTTP 500")
        m.log_fetch("0/2", "done", 5, 5)
    with a.manifest() as m:
        m.log_fetch("0/1", "done", 3, 3)
        m.log_fetch("0/2", "partial", 1, 1)
        m.log_fetch("0/3", "empty", 0, 0)
    report = G.merge(ws, [a.data_dir])
    with ws.manifest() as m:
        st = m.fetch_status()
    assert {c: s["status"] for c, s in st.items()} == {"0/1": "done", "0/2": "done", "0/3": "empty"}
    assert st["0/1"]["error"] is None and (report.cells_added, report.cells_updated) == (1, 1)


def test_bad_workspaces_are_one_line_errors(ws, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a workspace: no manifest.sqlite"):
        G.merge(ws, [tmp_path / "empty"])
    add(ws, "k")
    with pytest.raises(InputError, match="into itself"):
        G.merge(ws, [ws.data_dir])
    assert _main(["--data", str(ws.data_dir), "merge", str(tmp_path / "nowhere")], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "error: workspace not found" in err and "Traceback" not in err


def test_cli_merge_prints_a_summary(ws, tmp_path, monkeypatch, capsys):
    a = other(tmp_path, "a")
    add(a, "k1")
    add(a, "k2")
    # a project folder works too: its data/ is the workspace
    code = _main(["--data", str(ws.data_dir), "merge", str(tmp_path / "a")], monkeypatch)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "merged 1 workspace(s): 2 images added" in cap.out and "merge" in cap.err
    assert len(frame(ws)) == 2


CLI = "import sys, pipeline.cli as c; c.COMMAND_MODULES = ('pipeline.merge',); sys.exit(c.main(sys.argv[1:]))"


@pytest.mark.slow
def test_a_killed_merge_resumes(ws, tmp_path):
    a = other(tmp_path, "a")
    n = 1500
    with a.manifest() as m, m.transaction():
        for k in range(n):   # rows and files written directly: building the source fast
            data = thumb_jpeg(f"img{k}", size=(16, 16))
            sha = hashlib.sha256(data).hexdigest()
            rel = Path("images") / sha[:2] / f"{sha}.jpg"
            (a.data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (a.data_dir / rel).write_bytes(data)
            m.add_image(source="mapillary", source_id=f"img{k}", sequence_id=f"s{k // 10}", lat=48.0,
                        lon=2.0 + k * 1e-4, sha256=sha, path=rel.as_posix(), split="train")
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", CLI, "--data", str(ws.data_dir), "merge", str(a.data_dir)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if ws.manifest_path.exists():
                try:
                    con = sqlite3.connect(f"file:{ws.manifest_path}?mode=ro", uri=True, timeout=1)
                    done = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
                    con.close()
                except sqlite3.Error:
                    done = 0
            if done >= 20:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the merge finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    first = len(frame(ws))
    assert 20 <= first < n
    check_files(ws)                                  # no row without its whole file
    report = G.merge(ws, [a.data_dir])
    assert report.added == n - first and report.duplicates == first
    assert len(frame(ws)) == n
    check_files(ws)
    assert not list(ws.images_dir.rglob("*.tmp"))
