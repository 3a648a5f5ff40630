"""geohier.fileio: the one atomic writer and the one safetensors reader/writer."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest
import torch

from geohier import fileio
from geohier.errors import InputError, ModelError, WorkspaceError
from geohier.fileio import (
    atomic_file,
    atomic_link_or_copy,
    atomic_write_bytes,
    atomic_write_text,
    open_safetensors,
    read_safetensors,
    remove_stale_temps,
    temp_name,
    write_safetensors,
)

# ------------------------------------------------------------------ the atomic writer


def test_writes_creates_folders_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "a" / "b" / "f.json"
    atomic_write_text(target, "{}\n")
    atomic_write_bytes(target, b"[1]\n")
    assert target.read_bytes() == b"[1]\n"
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]


def test_a_new_file_follows_the_umask_and_a_replaced_one_keeps_its_mode(tmp_path):
    old = os.umask(0o022)
    try:
        new = tmp_path / "new.txt"
        atomic_write_text(new, "x")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644  # not mkstemp's 0600
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        kept.chmod(0o600)
        atomic_write_text(kept, "new")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and kept.read_text() == "new"
    finally:
        os.umask(old)


def test_a_symlink_is_written_through_and_stays_a_link(tmp_path):
    real = tmp_path / "real" / "out.csv"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(os.path.relpath(real, tmp_path))  # relative link
    chain = tmp_path / "chain.csv"
    chain.symlink_to(link)                             # a link to a link
    atomic_write_text(link, "one")
    assert link.is_symlink() and real.read_text() == "one"
    atomic_write_text(chain, "two")
    assert chain.is_symlink() and link.is_symlink() and real.read_text() == "two"
    assert sorted(p.name for p in real.parent.iterdir()) == ["out.csv"]  # the temp went next to the target
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "later" / "made.csv")
    atomic_write_text(dangling, "three")
    assert dangling.is_symlink() and (tmp_path / "later" / "made.csv").read_text() == "three"


def test_a_fifo_is_refused_and_left_as_it_is(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"pipe: it is a FIFO \(named pipe\), not a regular file") as exc:
        atomic_write_text(fifo, "x")
    assert "\n" not in str(exc.value)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temp file either
    link = tmp_path / "to-pipe"
    link.symlink_to(fifo)
    with pytest.raises(InputError, match="the target of the link .*to-pipe"):
        write_safetensors(link, {"a": torch.zeros(1)})
    assert link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_socket_is_refused_and_left_as_it_is(tmp_path):
    import socket

    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(InputError, match="s.sock: it is a socket"):
            atomic_write_text(path, "x")
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_directory_is_refused_and_left_as_it_is(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "inside.txt").write_text("keep")
    with pytest.raises(InputError, match="out: it is a directory, not a regular file; refusing to replace it"):
        atomic_write_bytes(d, b"x")
    assert d.is_dir() and (d / "inside.txt").read_text() == "keep"
    with pytest.raises(InputError, match="directory"):
        atomic_link_or_copy(tmp_path / "missing-is-never-read", d)


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as f:
        f.write(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_temp_names_are_unique_per_process_thread_and_call(tmp_path):
    target = tmp_path / "x.jpg"
    names = {temp_name(target) for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith(f".x.jpg.{os.getpid()}-{threading.get_ident()}-") and n.endswith(".tmp") for n in names)
    other: list[str] = []
    t = threading.Thread(target=lambda: other.append(temp_name(target)))
    t.start()
    t.join()
    assert f"-{threading.get_ident()}-" not in other[0]


def test_concurrent_writers_of_one_file_all_succeed(tmp_path):
    target = tmp_path / "shared.txt"
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for _ in range(20):
                atomic_write_text(target, f"writer {i}\n" * 200)
        except BaseException as exc:  # noqa: BLE001 - collected for the assert
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    lines = set(target.read_text().splitlines())
    assert len(lines) == 1 and lines.pop().startswith("writer ")  # one writer's whole file
    assert [p.name for p in tmp_path.iterdir()] == ["shared.txt"]


def test_remove_stale_temps_spares_fresh_ones_and_other_files(tmp_path):
    old, fresh = tmp_path / ".a.jpg.1-2-ab.tmp", tmp_path / ".a.jpg.3-4-cd.tmp"
    other, keep = tmp_path / ".b.jpg.1-2-ef.tmp", tmp_path / "a.jpg"
    for p in (old, fresh, other, keep):
        p.write_bytes(b"x")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    assert remove_stale_temps(tmp_path, "a.jpg") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, other.name, keep.name])
    assert remove_stale_temps(tmp_path) == 1 and not other.exists() and fresh.exists()
    assert remove_stale_temps(tmp_path / "missing") == 0


def test_link_or_copy_puts_the_same_bytes_in_place(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights")
    dest = tmp_path / "run" / "backbone.safetensors"
    dest.parent.mkdir()
    dest.write_bytes(b"older")
    atomic_link_or_copy(src, dest)
    assert dest.read_bytes() == b"weights" and sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


# ------------------------------------------------------------------ safetensors


def test_safetensors_round_trip_with_metadata(tmp_path):
    path = tmp_path / "t" / "w.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    write_safetensors(path, tensors, metadata={"format": "x/1", "rows": 2})
    back = read_safetensors(path)
    assert set(back) == {"a", "b"} and torch.equal(back["a"], tensors["a"]) and torch.equal(back["b"], tensors["b"])
    with open_safetensors(path) as f:
        assert f.metadata() == {"format": "x/1", "rows": "2"} and sorted(f.keys()) == ["a", "b"]
        assert torch.equal(f.get_tensor("b"), tensors["b"])
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]
    assert fileio.save_tensors_atomic is write_safetensors


def _corrupt_files(tmp_path):
    good = tmp_path / "good.safetensors"
    write_safetensors(good, {"w": torch.ones(64)})
    data = good.read_bytes()
    out = {"missing": tmp_path / "missing.safetensors", "folder": tmp_path / "folder.safetensors"}
    out["folder"].mkdir()
    for name, content in {"empty": b"", "truncated": data[:-40], "header-cut": data[:12],
                          "random": os.urandom(4096), "json": b'{"not": "safetensors"}'}.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(content)
        out[name] = p
    return out


def test_a_corrupt_safetensors_file_is_one_error_naming_it(tmp_path):
    for name, path in _corrupt_files(tmp_path).items():
        with pytest.raises(WorkspaceError) as exc:
            read_safetensors(path)
        msg = str(exc.value)
        assert msg.startswith(f"cannot read {path} as safetensors: ") and "\n" not in msg, (name, msg)
        with pytest.raises(WorkspaceError, match="cannot read"), open_safetensors(path) as f:
            f.get_tensor("w")
    with pytest.raises(ModelError, match=r"^weights x\.safetensors: header too small$"):
        read_safetensors(tmp_path / "empty.safetensors", ModelError, "weights x.safetensors")


def test_open_safetensors_lets_the_callers_own_errors_through(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": torch.ones(2)})
    with pytest.raises(InputError, match="^mine$"), open_safetensors(path):
        raise InputError("mine")
    with pytest.raises(WorkspaceError, match=f"cannot read {path} as safetensors"), open_safetensors(path) as f:
        f.get_tensor("nope")


# ------------------------------------------------------------------ one owner


def test_no_other_module_renames_temp_files_or_calls_safetensors_directly():
    import re

    from conftest import ROOT

    pattern = re.compile(r"\bos\.(replace|rename)\(|\bmkstemp\(|NamedTemporaryFile\(|\bsave_file\(|\bload_file\(")
    files = [ROOT / "app.py"] + sorted(p for d in ("geohier", "pipeline", "views", "bench")
                                       for p in (ROOT / d).rglob("*.py"))
    offenders = []
    for path in files:
        if path == ROOT / "geohier" / "fileio.py":
            continue
        for n, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "write through geohier.fileio instead:\n" + "\n".join(offenders)


def test_a_killed_writers_temp_goes_at_once_a_live_ones_stays(tmp_path):
    """A temporary file whose writing process has ended is removed at once (a resumed
    import or merge leaves nothing behind); a live writer's, however old, is not."""
    import subprocess
    import sys

    from geohier import fileio

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f".x.jpg.{dead.pid}-1-abcd1234.tmp"
    mine = tmp_path / f".x.jpg.{os.getpid()}-1-abcd1234.tmp"
    for p in (gone, mine):
        p.write_bytes(b"partial")
    assert fileio.remove_stale_temps(tmp_path, "x.jpg") == 1
    assert not gone.exists() and mine.exists()
