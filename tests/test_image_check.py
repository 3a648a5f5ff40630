"""pipeline.image_check: images checked in worker processes give the same import as in one
process; batches of rows, interrupts, the --workers option, the small brightness decode."""

from __future__ import annotations

import multiprocessing
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.cli
from geohier.workspace import Workspace
from pipeline import image_check
from pipeline.image_check import auto_workers
from pipeline.ingest import import_csv, import_photos

COMPARED = ["source", "source_id", "sequence_id", "lat", "lon", "captured_at", "cell", "path", "width",
            "height", "brightness", "sha256", "split"]


def _workspace(tmp_path: Path, name: str) -> Workspace:
    return Workspace(tmp_path / name / "data", tmp_path / name / "models")


def _frame(ws: Workspace):
    with ws.manifest() as m:
        return m.frame().sort_values("id")[COMPARED].reset_index(drop=True)


def _noisy(path: Path, seed: int, size=(48, 40)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG")
    return path


@pytest.fixture
def csv_set(tmp_path) -> tuple[Path, Path]:
    """A CSV over every outcome an image can have: 14 good ones (in sub-folders, found by
    name), the same bytes under a second id, a truncated JPEG, a text file, a missing file,
    a bad coordinate and a row already seen twice."""
    root = tmp_path / "images"
    lines = ["id,latitude,longitude,captured_at"]
    for i in range(14):
        _noisy(root / f"{i % 3:02d}" / f"im{i}.jpg", seed=i)
        lines.append(f"im{i},{-40 + 6 * i},{-170 + 25 * i},{1_500_000_000 + i}")
    shutil.copy(root / "00" / "im0.jpg", root / "00" / "same.jpg")
    lines.append("same,10,10,")
    full = _noisy(root / "cut_full.jpg", seed=99).read_bytes()
    (root / "cut.jpg").write_bytes(full[: len(full) // 2])
    (root / "cut_full.jpg").unlink()
    (root / "notes.jpg").write_text("not a photo\n")
    lines += ["cut,1,1,", "notes,2,2,", "gone,3,3,", "im1,95,3,", "im2,1,1,"]
    table = tmp_path / "set.csv"
    table.write_text("\n".join(lines) + "\n")
    return table, root


def test_workers_give_the_same_import_as_one_process(tmp_path, csv_set):
    table, root = csv_set
    one, many = _workspace(tmp_path, "one"), _workspace(tmp_path, "many #1?")  # a URI's special characters
    a = import_csv(one, table, root, workers=0)
    b = import_csv(many, table, root, workers=2)
    assert (a.total, a.added, a.duplicates) == (b.total, b.added, b.duplicates) == (20, 14, 2)
    assert a.skipped == b.skipped == {"truncated image": 1, "not an image": 1, "missing file": 1,
                                      "invalid coordinates (out of range)": 1}
    assert a.examples == b.examples and a.cells == b.cells
    fa, fb = _frame(one), _frame(many)
    assert fa.equals(fb), (fa, fb)
    assert fa.source_id.tolist() == [f"im{i}" for i in range(14)]  # committed in the CSV's order
    for ws in (one, many):
        assert all(ws.resolve(p).is_file() for p in _frame(ws).path)
    assert multiprocessing.active_children() == []  # the workers are gone


def test_workers_import_photos_with_gps_as_one_process(tmp_path, make_jpeg):
    photos = tmp_path / "photos"
    for i in range(6):
        make_jpeg(photos / f"p{i}.jpg", gps=(10.0 + 7 * i, 20.0 - 9 * i), color=(20 * i, 40, 90))
    make_jpeg(photos / "nogps.jpg")
    shutil.copy(photos / "p0.jpg", photos / "again.jpg")
    one, many = _workspace(tmp_path, "one"), _workspace(tmp_path, "many")
    a = import_photos(one, photos, workers=0)
    b = import_photos(many, photos, workers=2, link=False)
    assert (a.added, a.duplicates, dict(a.skipped)) == (b.added, b.duplicates, dict(b.skipped)) \
        == (6, 1, {"no GPS": 1})
    assert _frame(one).equals(_frame(many))


def test_an_interrupted_import_with_workers_keeps_its_rows_and_the_rerun_adds_the_rest(tmp_path, ws):
    root = tmp_path / "images"
    lines = ["id,lat,lon"] + [f"im{i},{i},{i}" for i in range(40)]
    for i in range(40):
        _noisy(root / f"im{i}.jpg", seed=i)
    table = tmp_path / "t.csv"
    table.write_text("\n".join(lines) + "\n")

    def stop_at_25(done, total):
        if done == 25:
            raise KeyboardInterrupt

    s = import_csv(ws, table, root, workers=2, progress=stop_at_25)
    assert s.interrupted and s.added < 25
    rows = _frame(ws)
    assert len(rows) == s.added  # what was counted was written, each with its file
    assert all(ws.resolve(p).is_file() for p in rows.path)
    assert multiprocessing.active_children() == []
    again = import_csv(ws, table, root, workers=2)
    assert (again.added, again.duplicates) == (40 - s.added, s.added)
    assert _frame(ws).source_id.tolist() == [f"im{i}" for i in range(40)]


def test_rows_are_written_in_batches_another_connection_sees(tmp_path, ws, monkeypatch):
    root = tmp_path / "images"
    for i in range(10):
        _noisy(root / f"im{i}.jpg", seed=i)
    table = tmp_path / "t.csv"
    table.write_text("id,lat,lon\n" + "".join(f"im{i},{i},{i}\n" for i in range(10)))
    seen = []

    def look(done, total):  # what a concurrent reader sees while the import runs
        with sqlite3.connect(ws.manifest_path) as con:
            seen.append(con.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    monkeypatch.setattr(image_check, "BATCH_ROWS", 4)
    import_csv(ws, table, root, workers=0, progress=look)
    assert seen == [0, 0, 0, 4, 4, 4, 4, 8, 8, 8]  # committed every 4 rows; the last 2 at the end
    with ws.manifest() as m:
        assert m.count() == 10


def test_a_batch_due_is_committed_after_a_skipped_image_too(tmp_path, ws, monkeypatch):
    # the batch clock is looked at after every image: a long run of unreadable ones does not
    # keep the write lock (a concurrent import or labels would wait on it)
    root = tmp_path / "images"
    _noisy(root / "good.jpg", seed=1)
    for i in range(3):
        (root / f"bad{i}.jpg").write_text("not a photo\n")
    table = tmp_path / "t.csv"
    table.write_text("id,lat,lon\ngood,1,1\n" + "".join(f"bad{i},2,2\n" for i in range(3)))
    clock = [0.0]
    monkeypatch.setattr(image_check.time, "monotonic", lambda: clock[0])
    seen = []

    def look(done, total):
        with sqlite3.connect(ws.manifest_path) as con:
            seen.append(con.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        clock[0] += 10.0  # each row takes "10 s": the batch is due from the second row on

    s = import_csv(ws, table, root, workers=0, progress=look)
    assert s.added == 1 and s.skipped == {"not an image": 3}
    assert seen == [0, 1, 1, 1]  # committed after the first unreadable image, not at the end


def test_brightness_from_the_small_decode_is_the_picture_mean(tmp_path, ws):
    y, x = np.mgrid[0:768, 0:1024]
    px = np.stack([x * 255 // 1023, y * 255 // 767, (x + y) % 256], axis=-1).astype(np.uint8)
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(px).save(root / "big.jpg", "JPEG", quality=95)
    (tmp_path / "t.csv").write_text("id,lat,lon\nbig,1,1\n")
    import_csv(ws, tmp_path / "t.csv", root, workers=0)
    full = float(np.asarray(Image.open(root / "big.jpg").convert("L"), dtype=np.float64).mean())
    got = _frame(ws).brightness.iloc[0]
    assert got == pytest.approx(full, abs=0.5)
    assert (_frame(ws).width.iloc[0], _frame(ws).height.iloc[0]) == (1024, 768)


def test_auto_workers(monkeypatch):
    monkeypatch.setattr(image_check.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert auto_workers(image_check.MIN_FOR_WORKERS - 1) == 0  # small imports stay in one process
    assert auto_workers(100_000) == 8
    monkeypatch.setattr(image_check.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert auto_workers(100_000) == 2
    monkeypatch.setattr(image_check.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert auto_workers(100_000) == 0


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_cli_workers_must_be_auto_or_a_count(ws, tmp_path, monkeypatch, capsys, value):
    monkeypatch.setattr(pipeline.cli, "COMMAND_MODULES", ("pipeline.ingest",))
    (tmp_path / "t.csv").write_text("id,lat,lon\n")
    with pytest.raises(SystemExit) as exc:
        pipeline.cli.main(["import-csv", str(tmp_path / "t.csv"), "--images-root", str(tmp_path),
                           "--workers", value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert f"expected 'auto' or a whole number of processes >= 0, got {value!r}" in err


def test_cli_workers_runs_the_import(ws, tmp_path, monkeypatch, capsys, csv_set):
    monkeypatch.setattr(pipeline.cli, "COMMAND_MODULES", ("pipeline.ingest",))
    table, root = csv_set
    assert pipeline.cli.main(["import-csv", str(table), "--images-root", str(root), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "added" in out and "14 images" in out


@pytest.mark.slow
def test_ctrl_c_on_a_parallel_import_counts_what_it_wrote_and_leaves_no_worker(tmp_path, ws):
    # A real Ctrl-C reaches the whole process group: the workers ignore it, the import stops
    # with exit 130, and the summary's "added" equals the rows in the manifest (before the
    # commit was shielded, an interrupt just after an insert left one row uncounted).
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    root = tmp_path / "images"
    for i in range(1500):
        _noisy(root / f"im{i}.jpg", seed=i, size=(16, 16))
    table = tmp_path / "t.csv"
    table.write_text("id,lat,lon\n" + "".join(f"im{i},{i % 80},{i % 170}\n" for i in range(1500)))
    env = {**os.environ, "GEOHIER_DATA": str(ws.data_dir), "GEOHIER_MODELS": str(ws.models_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "import-csv", str(table), "--images-root", str(root),
                             "--workers", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    rows = 0
    while rows < 100 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            with sqlite3.connect(f"file:{ws.manifest_path}?mode=ro", uri=True, timeout=1) as con:
                rows = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        except sqlite3.Error:
            pass
    assert proc.poll() is None, "the import ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "interrupted" in out
    added = int(re.search(r"^\s*added\s+(\d+)", out, re.M).group(1))
    with ws.manifest() as m:
        assert m.count() == added > 0
    for _ in range(50):  # nothing of the import's process group is left running (an exited
        # child that outlived the main process waits as a zombie for init to reap it)
        group = subprocess.run(["ps", "-o", "pid,stat,cmd", "--no-headers", "-g", str(proc.pid)],
                               capture_output=True, text=True).stdout.splitlines()
        running = [line for line in group if line.split()[1][0] != "Z"]
        if not running:
            break
        time.sleep(0.1)
    assert running == []


@pytest.mark.slow
def test_the_import_benchmark_runs_and_prints_its_table():
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, "bench/import_csv.py", "--rows", "30", "--per-zip", "20",
                          "--workers", "0,2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "30 JPEGs of 512 x 384" in text and "read in place from zips" in text and "copied from numbered" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 0 |", "| 2 |"))]
    assert len(rows) == 4 and "failed" not in text and rows[0].split("|")[4].strip() == "1.00x"


def test_workers_do_not_run_the_callers_main_script(tmp_path, ws, monkeypatch, csv_set):
    # A spawned worker re-imports the parent's __main__: a Streamlit page is __main__ while it
    # runs (the full test run failed so, after the page tests), and so is a script without a
    # main guard. The workers start without it.
    import sys
    import types

    marker = tmp_path / "ran"
    script = tmp_path / "page.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('a page script is not a worker')\n")
    page = types.ModuleType("__main__")
    page.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", page)
    table, root = csv_set
    s = import_csv(ws, table, root, workers=2)
    assert s.added == 14 and not marker.exists()
    assert sys.modules["__main__"] is page  # given back


def test_a_worker_that_dies_is_one_clear_error_and_the_rows_before_it_stay(tmp_path, ws):
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from geohier.errors import WorkspaceError
    from pipeline.image_check import Adder, check_image
    from pipeline.ingest import ImportSummary

    good = _noisy(tmp_path / "good.jpg", seed=1)
    s = ImportSummary("csv", "t.csv")
    with ws.manifest() as m:
        adder = Adder(m, s, workers=1)
        done, dead = Future(), Future()
        done.set_result(check_image(good, "good", (1.0, 2.0), copy_into=str(ws.data_dir)))
        dead.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
        row = {"source": "csv", "source_id": "good"}
        adder.pending.extend([(done, (good, "good", False, row)), (dead, (tmp_path / "x.jpg", "x", False, {}))])
        with pytest.raises(WorkspaceError, match="a worker process died while reading x or an image near it"):
            with adder:
                adder.finish()
        assert m.count() == 1 and s.added == 1 and not adder.pending
