"""Cell lists for fetch (pipeline.fetch_cells): sized before they are built, refused above
MAX_CELLS with the level and the count; any text gets a selection or one line; the page's
form (files=False) never looks at a path; the CLI's --cells FILE gets one line for a
binary, non-UTF-8, oversized or unreadable file."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from geohier import grid
from geohier.errors import InputError
from pipeline import cli
from pipeline import fetch_cells as C

HOSTILE = [
    "/etc/passwd", "/etc/shadow", "../../etc/passwd", "~/.ssh/id_rsa", "file:///etc/passwd", "/dev/zero",
    "/proc/self/environ", "\x00\x01\x02\xff\xfe binary \x7f", "land\x00", "all; rm -rf /", "0/1/2,\x00",
    "é漢字🙂", "0/4", "0" * 30, "1" * 1_000_000, "0/1," * 300_000, "", "   ", ",", "land,all", "%s%n{}",
]


def _old_sort(ids):  # the list-of-Cells definition sort_cells had before it was vectorised
    cells = {grid.from_id(i) for i in ids}
    return [grid.to_id(c) for c in sorted(cells, key=lambda c: (c.level, grid.to_id(c, sep="")))]


# --------------------------------------------------------------------------- sizing


def test_all_at_level_12_is_refused_with_level_count_and_why():
    with pytest.raises(InputError) as e:
        C.parse_cells("all", 12)
    msg = str(e.value)
    assert "level 12" in msg and "16,777,216 cells" in msg and f"{C.MAX_CELLS:,}" in msg
    assert "memory" in msg and "--shard i/16" in msg and "\n" not in msg
    with pytest.raises(InputError, match="level 11.*4,194,304 cells.*i/4 or more"):
        C.select_cells("all", 11)
    with pytest.raises(InputError, match="level 24"):  # 4**24 is never built, only counted
        C.parse_cells("all", 24)


def test_a_shard_of_all_is_sized_exactly_and_built_lazily():
    sel = C.parse_cells("all", 12, "0/16")
    assert (sel.kind, sel.size) == ("all", 4**12 // 16) and sel.size == C.MAX_CELLS
    assert "all at level 12, shard 0/16: 1,048,576 cells" == sel.describe()
    with pytest.raises(InputError, match=r"shard 0/15\).*1,118,482 cells.*i/17 or more"):
        C.parse_cells("all", 12, "0/15")
    # the lazily built shard is the shard of the full sorted list
    full = grid.keys_to_ids(grid.all_cells(5), 5)
    for i in range(3):
        built = C.parse_cells("all", 5, f"{i}/3").build()
        assert built == full[i::3] == C.shard_cells(full, (i, 3))
        assert C.parse_cells("all", 5, f"{i}/3").size == len(built)
    assert C.shard_size(10, (1, 4)) == 3 and C.shard_size(3, (2, 3)) == 1 and C.shard_size(2, (2, 3)) == 0


def test_land_is_sized_by_its_level_and_refused_below_the_geography():
    sel = C.parse_cells("land", 8)
    assert sel.kind == "land" and sel.size == 4**8 and "at most 65,536" in sel.describe()
    with pytest.raises(InputError, match="land is known down to level 10.*level 12 \\(16,777,216 cells\\)"):
        C.parse_cells(" land ", 12)


def test_a_stop_ends_the_build_early():
    stop = threading.Event()
    stop.set()
    assert C.parse_cells("all", 10).build(stop=stop) == []
    assert len(C.parse_cells("all", 10).build(stop=threading.Event())) == 4**10


def test_too_many_ids_are_refused(monkeypatch):
    monkeypatch.setattr(C, "MAX_CELLS", 3)
    with pytest.raises(InputError, match="4 cell ids; one fetch takes at most 3"):
        C.parse_cells("0,1,2,3")
    assert C.parse_cells("0,1,2,3", shard="0/2").size == 2
    with pytest.raises(InputError, match="4 lines"):
        C.cells_from_upload("c.txt", b"0\n1\n2\n3\n")


# --------------------------------------------------------------------------- sort_cells


def test_sort_cells_matches_the_cell_by_cell_definition():
    rng = np.random.default_rng(3)
    ids = []
    for level in (1, 3, 8, 12, 24):
        keys = rng.integers(0, 4**level, 200)
        ids += grid.keys_to_ids(keys, level) + grid.keys_to_ids(keys[:50], level, sep="")
    ids = [f"  {i} " if n % 7 == 0 else i for n, i in enumerate(ids)]
    rng.shuffle(ids)
    assert C.sort_cells(ids) == _old_sort(ids)
    ordered = _old_sort(ids)
    assert C.sort_cells(ordered) == ordered
    assert C.sort_cells([]) == [] and C.sort_cells(["012"]) == ["0/1/2"]
    for bad in ["", "/0", "0/", "0//1", "04", "0" * 25, "é", "\x00", 5, None]:
        with pytest.raises(InputError.__mro__[1]):  # GeohierError: CellIdError or InvalidLevelError
            C.sort_cells(["0/1", bad])


# --------------------------------------------------------------------------- the page's text


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_any_text_in_page_mode_gets_one_short_line(text):
    with pytest.raises(InputError) as e:
        C.parse_cells(text, 8, files=False)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300
    assert "root:" not in msg and "\x00" not in msg


def test_page_mode_never_reads_a_file(tmp_path, monkeypatch):
    f = tmp_path / "cells.txt"
    f.write_text("0/1\n0/2\n")
    assert C.parse_cells(str(f)).ids == ("0/1", "0/2")  # the CLI reads it
    opened = []
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a) or (_ for _ in ()).throw(OSError))
    with pytest.raises(InputError, match="no file on the server is read") as e:
        C.parse_cells(str(f), 8, files=False)
    assert repr(str(f))[:20] in str(e.value) and "0/2" not in str(e.value)
    assert opened == []
    assert C.parse_cells("land", 8, files=False).kind == "land"
    assert C.parse_cells(" 0/1, 013 ", 8, files=False).ids == ("0/1", "0/1/3")


def test_a_long_text_is_refused_before_it_is_parsed():
    with pytest.raises(InputError, match="1,000,000 characters; type at most 100,000.*upload"):
        C.parse_cells("0," * 500_000, files=False)
    assert C.parse_cells("0/1," * 20_000, files=False).size == 1


# --------------------------------------------------------------------------- uploads


def test_an_uploaded_list_is_checked_and_built_later():
    sel = C.cells_from_upload("my cells.txt", b"# mine\n0/1\n\n013  # coast\n0/1\n", 8)
    assert sel.kind == "text" and sel.size == 3 and "upload 'my cells.txt'" in sel.describe()
    assert C.parse_cells(sel) is sel
    assert sel.build() == ["0/1", "0/1/3"]
    bad = C.cells_from_upload("x.txt", b"0/1\nroot:x:0:0:root:/root:/bin/bash" + b"z" * 100 + b"\n")
    with pytest.raises(InputError, match=r"x.txt'?:2: not a cell id: 'root:x:0") as e:
        bad.build()
    assert len(str(e.value)) < 150  # the line is cut
    for data, why in [(b"\x89PNG\r\n\x1a\n\x00\x00", "binary"), (b"0/1\n\xff\xfe\n", "not UTF-8"),
                      (b"\n# nothing\n", "no cell ids")]:
        with pytest.raises(InputError, match=why):
            C.cells_from_upload("../../etc/passwd", data)
    with pytest.raises(InputError, match="upload 'passwd'"):
        C.cells_from_upload("../../etc/passwd", b"\x00")


def test_an_oversized_upload_is_refused(monkeypatch):
    monkeypatch.setattr(C, "MAX_FILE_BYTES", 10)
    with pytest.raises(InputError, match="at most 0 MB"):
        C.cells_from_upload("big.txt", b"0/1\n" * 10)


# --------------------------------------------------------------------------- the CLI's files


def test_cli_cell_files_get_one_line(tmp_path, monkeypatch):
    binary = tmp_path / "cells.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(InputError, match="not a text file of cell ids \\(it holds binary data\\)"):
        C.select_cells(str(binary))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("0/1\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        C.select_cells(str(latin))
    long_line = tmp_path / "long.txt"
    long_line.write_text("0/1\n" + "x" * 10_000 + "\n")
    with pytest.raises(InputError, match=r"long.txt:2: not a cell id: 'xxx") as e:
        C.select_cells(str(long_line))
    assert len(str(e.value)) < 200
    monkeypatch.setattr(C, "MAX_FILE_BYTES", 8)
    with pytest.raises(InputError, match="at most 0 MB"):
        C.select_cells(str(long_line))
    with pytest.raises(InputError, match="is none of these"):
        C.select_cells(str(tmp_path))  # a directory is no file of ids
    if os.geteuid() != 0:
        locked = tmp_path / "locked.txt"
        locked.write_text("0/1\n")
        locked.chmod(0)
        with pytest.raises(InputError, match="cannot read the cell list"):
            C.select_cells(str(locked))


def _main(argv, monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("pipeline.fetch",))
    return cli.main(argv)


def test_cli_dry_run_of_all_at_level_12_refuses_in_one_line(ws, monkeypatch, capsys):
    monkeypatch.delenv("MAPILLARY_ACCESS_TOKEN", raising=False)
    code = _main(["fetch", "--cells", "all", "--level", "12", "--dry-run"], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "level 12" in err and "16,777,216 cells" in err and "Traceback" not in err


def test_cli_dry_run_of_a_shard_of_all(ws, monkeypatch, capsys):
    monkeypatch.delenv("MAPILLARY_ACCESS_TOKEN", raising=False)
    code = _main(["fetch", "--cells", "all", "--level", "6", "--shard", "1/4", "--dry-run"], monkeypatch)
    out = capsys.readouterr().out
    assert code == 0 and "1024 cells; 1024 to fetch" in out.replace(",", "")
    assert "0/0/0/0/0/1" in out and "0/0/0/0/0/0 " not in out  # key 1 is the first of shard 1/4


def test_cli_binary_cells_file_is_one_line(ws, tmp_path, monkeypatch, capsys):
    f = tmp_path / "cells.bin"
    f.write_bytes(b"\x00\xff" * 100)
    code = _main(["fetch", "--cells", str(f), "--dry-run"], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "binary" in err


# --------------------------------------------------------------------------- the page's background build


def test_the_page_builds_the_list_in_its_task_and_stop_ends_it(ws, monkeypatch):
    """start_fetch only sizes the selection: the 1 M-cell list of all at level 10 is built
    in the task's thread, and the page's Stop (task.cancel) ends it before any request."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from mapillary_server import MapillaryServer

    from pipeline import tasks

    building, release = threading.Event(), threading.Event()
    original = grid.keys_to_ids

    def gated(keys, level, sep="/"):  # the first chunk waits until the test has looked
        building.set()
        release.wait(60)
        return original(keys, level, sep)

    monkeypatch.setattr(grid, "keys_to_ids", gated)
    with MapillaryServer(token="tok") as srv:
        runner = tasks.TaskRunner()
        task = tasks.start_fetch(runner, ws, "all", 10, 5, srv.url, "tok")
        assert building.wait(60)  # the build runs ... in the task's thread, the start has returned
        assert task.running and "building the cell list: all at level 10: 1,048,576 cells" in task.detail
        task.cancel()
        release.set()
        assert task.join(60)
        assert task.state == tasks.STOPPED and "stopped while building the cell list" in task.result
        assert srv.hits == []
        with pytest.raises(InputError, match="16,777,216"):
            tasks.start_fetch(runner, ws, "all", 12, 5, srv.url, "tok")
        with pytest.raises(InputError, match="no file on the server is read"):
            tasks.start_fetch(runner, ws, "/etc/passwd", 8, 5, srv.url, "tok")


@pytest.mark.parametrize("text", ["~no-such-user-xyz\n/x", "~2\n3land", "0/1,\ud800", "\udfff/etc", "a\x00b", "~", "/"])
def test_odd_text_in_cli_mode_is_one_line_too(text):
    """A path that cannot be one (no such user's ~, lone surrogates from non-UTF-8 argv,
    NUL) is no file of ids: one line, no RuntimeError or UnicodeEncodeError."""
    with pytest.raises(InputError, match="is none of these") as e:
        C.parse_cells(text, 8)
    assert "\n" not in str(e.value)
