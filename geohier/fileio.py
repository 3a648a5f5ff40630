"""The one way geohier writes files, and its one safetensors reader and writer.

Every file the project writes (JSON, CSV, HTML, parquet, images, safetensors) goes
through :func:`atomic_file` / :func:`atomic_path` (or the ``atomic_write_*`` shorthands):

- the bytes go to a temporary file in the target's own directory, named
  ``.<name>.<pid>-<thread>-<random>.tmp`` and created exclusively, so two writers (processes
  or threads) never share or delete each other's temporary files;
- the temporary file is flushed and fsynced, then renamed over the target (a reader sees the
  old file or the new one, never half of one); the directory is fsynced after the rename;
- a target that is a symbolic link is written through: the link's final target is
  replaced and the link stays a link;
- a target that exists and is not a regular file (a directory, FIFO, device or socket) is
  refused with an ``InputError`` naming the path, and left as it is;
- a new file gets the usual ``0666 & ~umask`` mode, a replaced one keeps its mode.

Safetensors: :func:`write_safetensors` (atomic) and :func:`read_safetensors` /
:func:`open_safetensors`, where a missing, truncated, corrupt or random-bytes file is one
error naming the file (a ``WorkspaceError`` unless the caller names another class).

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> atomic_write_text(d / "a.txt", "hello")
>>> (d / "a.txt").read_text()
'hello'
>>> (d / "link.txt").symlink_to(d / "a.txt")
>>> atomic_write_text(d / "link.txt", "through")
>>> (d / "link.txt").is_symlink(), (d / "a.txt").read_text()
(True, 'through')
>>> atomic_write_text(d, "x")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
geohier.errors.InputError: cannot write ...: it is a directory, not a regular file; refusing to replace it
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from geohier.errors import GeohierError, InputError, WorkspaceError

__all__ = ["STALE_TEMP_S", "atomic_file", "atomic_link_or_copy", "atomic_path", "atomic_write_bytes",
           "atomic_write_text", "is_temp_name", "open_safetensors", "read_safetensors", "remove_stale_temps",
           "save_tensors_atomic", "temp_name", "write_safetensors", "write_target"]

TEMP_SUFFIX = ".tmp"
STALE_TEMP_S = 600.0  # a temporary file older than this is a leftover of a killed writer

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


# --------------------------------------------------------------------------- targets


def write_target(path: str | os.PathLike) -> Path:
    """The file that writing ``path`` replaces: ``path`` itself, or the final target of the
    symbolic link(s) at ``path``. An InputError naming ``path`` when that exists and is not a
    regular file (directory, FIFO, device, socket) — such a target is never replaced."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        via = f" (the target of the link {path})" if target != path else ""
        raise InputError(f"cannot write {target}{via}: it is {kind}, not a regular file; refusing to replace it")
    return target


def temp_name(target: str | os.PathLike) -> str:
    """A temporary file name for ``target``, unique per process, thread and call:
    ``.<name>.<pid>-<thread id>-<random>.tmp``."""
    name = Path(target).name
    return f".{name}.{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"


def is_temp_name(name: str, target_name: str | None = None) -> bool:
    """Whether ``name`` looks like a temporary file of this module (of ``target_name``'s, if given)."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return False
    return target_name is None or name.startswith(f".{target_name}.")


def _writer_pid(name: str) -> int | None:
    """The process id in a temporary file name of ``temp_name`` (None when it has none)."""
    stem = name[: -len(TEMP_SUFFIX)].rsplit(".", 1)[-1]
    head = stem.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _writer_gone(name: str) -> bool:
    """Whether the process that made this temporary file has ended (on this machine)."""
    pid = _writer_pid(name)
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False


def remove_stale_temps(directory: str | os.PathLike, target_name: str | None = None,
                       older_than_s: float = STALE_TEMP_S) -> int:
    """Remove the temporary files in ``directory`` (of ``target_name``, if given) that a
    killed writer left: those whose writing process has ended, and any older than
    ``older_than_s`` (a writer on another machine sharing the folder). A live writer's file
    is never touched. Returns how many went."""
    now, n = time.time(), 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if not is_temp_name(entry.name, target_name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and (_writer_gone(entry.name) or now - st.st_mtime >= older_than_s):
                os.unlink(entry.path)
                n += 1
        except FileNotFoundError:
            pass
    return n


def _new_temp(target: Path) -> tuple[Path, int]:
    target.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(8):
        tmp = target.parent / temp_name(target)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except OSError:
            pass  # a new file: 0666 & ~umask, as open() made it
        else:
            os.chmod(tmp, mode)
        return tmp, fd
    raise FileExistsError(f"cannot create a temporary file next to {target}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: Path, target: Path) -> None:
    os.replace(tmp, target)
    _fsync_dir(target.parent)


# --------------------------------------------------------------------------- writers


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s new content into; on a clean exit it is fsynced and
    renamed over ``path`` (see the module doc), on an exception removed (``path`` unchanged)."""
    target = write_target(path)
    tmp, fd = _new_temp(target)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path for a library that writes by file name (safetensors, a copy); on a
    clean exit the file there is fsynced and renamed over ``path``, on an exception removed.
    The path exists (empty) when yielded; the writer may replace it."""
    target = write_target(path)
    tmp, fd = _new_temp(target)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _commit(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module doc)."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_link_or_copy(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make ``path`` a hard link to ``source`` where the file system allows, else a copy;
    put in place by a rename like every other write. Returns the path written."""
    import shutil

    with atomic_path(path) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    return Path(path)


# --------------------------------------------------------------------------- safetensors


def _safetensors_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (SafetensorError, OSError, ValueError, RuntimeError, TypeError, KeyError, OverflowError)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.removeprefix("Error while deserializing header: ")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write torch ``tensors`` (and string ``metadata``) as safetensors to ``path``, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata={str(k): str(v) for k, v in metadata.items()}
                  if metadata else None)


save_tensors_atomic = write_safetensors  # the name model.py's callers know


def read_safetensors(path: str | os.PathLike, error: type[Exception] = WorkspaceError,
                     message: str | None = None, device: str = "cpu") -> dict:
    """Every tensor of a safetensors file (torch, on ``device``); ``error("<message>: <reason>")``
    when it is missing, truncated, corrupt or not safetensors at all. ``message`` defaults to
    ``cannot read <path> as safetensors``."""
    from safetensors.torch import load_file

    message = message or f"cannot read {path} as safetensors"
    try:
        if Path(path).is_dir():
            raise IsADirectoryError(21, "is a directory")
        return load_file(str(path), device=str(device))
    except _safetensors_errors() as exc:
        raise error(f"{message}: {_reason(exc)}") from None


@contextmanager
def open_safetensors(path: str | os.PathLike, error: type[Exception] = WorkspaceError,
                     message: str | None = None, device: str = "cpu", framework: str = "pt") -> Iterator[Any]:
    """``safetensors.safe_open`` of ``path`` (torch tensors, or ``framework="numpy"``), its
    header, metadata and tensors read lazily; any failure to read it (opening or inside the block) is
    ``error("<message>: <reason>")``. Errors of geohier raised inside the block pass through."""
    from safetensors import safe_open

    message = message or f"cannot read {path} as safetensors"
    errors = _safetensors_errors()
    try:
        if Path(path).is_dir():
            raise IsADirectoryError(21, "is a directory")
        with safe_open(str(path), framework=framework, device=str(device)) as f:
            yield f
    except GeohierError:
        raise
    except errors as exc:
        raise error(f"{message}: {_reason(exc)}") from None
