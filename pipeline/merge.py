"""``python -m pipeline merge WORKSPACE... [--link]``: bring other workspaces into this one.

``fetch --shard i/n`` splits one fetch over n machines, each into its own workspace; merge
combines them (or any workspaces: demo, imports) into the current one (``--data`` /
GEOHIER_DATA): their images, manifest rows and fetch_log.

- De-duplicated: an image whose sha256 or whose (source, source_id) is already here is
  skipped, so merging the same workspace twice adds nothing.
- Atomic per image and resumable: the file is written to a temporary name and renamed
  (``Manifest.store_image``), then its row is inserted; a merge killed at any point leaves
  no partial file and no row without its file, and a rerun continues where it stopped.
  ``--link`` stores the source file's absolute path instead of a copy (the source
  workspace must then stay where it is).
- Sequence ids are kept. Splits: the first split a capture sequence has wins. A merged row
  whose (source, sequence_id) already has a split here (from this workspace, or from a row
  merged before it) takes that split; otherwise it keeps its own, which then becomes its
  sequence's. So a sequence never ends up in two splits. Rows without a sequence keep
  theirs. ``labels`` reassigns every split anyway; run it after a merge to rebuild
  hierarchy.json for the new images.
- fetch_log: a source's cell record is taken when this workspace has none for the cell or
  a less finished one (done > empty > partial > error). It is merged after the source's
  images, so a cell never reads ``done`` here without its images.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from geohier import archives
from geohier.errors import ImageReadError, InputError
from geohier.images import read_source
from geohier.progress import progress_bar
from geohier.workspace import Manifest, Workspace, open_read_only, sha256_bytes
from pipeline.fetch import clean_stale_temps

STATUS_RANK = {"error": 0, "partial": 1, "empty": 2, "done": 3}
ROW_COLUMNS = ("source", "source_id", "sequence_id", "lat", "lon", "captured_at", "path", "width", "height",
               "brightness", "sha256", "split")


@dataclass
class MergeReport:
    workspaces: int = 0
    rows: int = 0                      # rows read from the sources
    added: int = 0                     # new rows here
    linked: int = 0                    # of those, stored as links to the source's file
    duplicates: int = 0                # same sha256 or (source, source_id) as a row here
    missing: int = 0                   # source rows whose file is gone
    corrupt: int = 0                   # source files whose bytes no longer match their sha256
    split_adopted: int = 0             # merged rows that took their sequence's split
    cells_added: int = 0               # fetch_log records new here
    cells_updated: int = 0             # fetch_log records replaced by a more finished one
    problems: list[str] = field(default_factory=list)  # a few examples of missing / corrupt files

    def summary(self) -> str:
        text = (f"merged {self.workspaces} workspace(s): {self.added} images added"
                + (f" ({self.linked} linked)" if self.linked else "")
                + f", {self.duplicates} already here")
        if self.missing or self.corrupt:
            text += f", {self.missing} missing and {self.corrupt} damaged file(s) skipped"
        if self.split_adopted:
            text += f", {self.split_adopted} took their sequence's split"
        text += f"; fetch_log: {self.cells_added} cells added, {self.cells_updated} updated"
        if self.added:
            text += "\nrun `python -m pipeline labels` to rebuild hierarchy.json and the splits"
        return text

    def to_dict(self) -> dict:
        return asdict(self)


def find_workspace(path: str | Path) -> Path:
    """The data directory at ``path``: the folder holding manifest.sqlite, or a project folder
    whose data/ holds it. Raises InputError naming what was looked for."""
    p = Path(path).expanduser().resolve()
    for d in (p, p / "data"):
        if (d / "manifest.sqlite").is_file():
            return d
    if not p.exists():
        raise InputError(f"workspace not found: {p}")
    raise InputError(f"not a workspace: no manifest.sqlite in {p} (nor in {p / 'data'})")


def _sequence_splits(m: Manifest) -> dict[tuple[str, str], str]:
    rows = m.conn.execute("SELECT source, sequence_id, MIN(split) FROM images"
                          " WHERE sequence_id IS NOT NULL AND split IS NOT NULL GROUP BY source, sequence_id")
    return {(src, seq): split for src, seq, split in rows}


def _merge_fetch_log(m: Manifest, con: sqlite3.Connection, report: MergeReport) -> None:
    have = m.fetch_status()
    try:
        rows = con.execute("SELECT cell, status, found, kept, error FROM fetch_log").fetchall()
    except sqlite3.OperationalError:  # a workspace that never fetched may lack the table
        return
    for cell, status, found, kept, error in rows:
        mine = have.get(cell)
        if mine is not None and STATUS_RANK.get(mine["status"], -1) >= STATUS_RANK.get(status, -1):
            continue
        m.log_fetch(cell, status, found or 0, kept or 0, error)
        if mine is None:
            report.cells_added += 1
        else:
            report.cells_updated += 1


def merge(ws: Workspace, sources: Sequence[str | Path], *, link: bool = False,
          progress: Callable[[int, int], None] | None = None) -> MergeReport:
    """Merge the workspaces at ``sources`` (data directories, see :func:`find_workspace`)
    into ``ws``; returns a MergeReport. ``progress(done, total)`` is called every 64 source
    rows and after the last. See the module docstring for de-duplication, splits and fetch_log."""
    dirs = [find_workspace(s) for s in sources]
    if not dirs:
        raise InputError("merge needs at least one workspace to merge from")
    here = ws.data_dir.resolve()
    for d in dirs:
        if d == here:
            raise InputError(f"cannot merge a workspace into itself: {d}")
    report = MergeReport(workspaces=len(dirs))
    cons = [open_read_only(d / "manifest.sqlite") for d in dirs]
    try:
        total = sum(int(c.execute("SELECT COUNT(*) FROM images").fetchone()[0]) for c in cons)
        clean_stale_temps(ws)  # temp files of a merge or fetch that was killed
        done = 0
        with ws.manifest() as m:
            seq_split = _sequence_splits(m)
            for d, con in zip(dirs, cons, strict=True):
                cur = con.execute(f"SELECT {', '.join(ROW_COLUMNS)} FROM images ORDER BY id")
                for values in cur:
                    _merge_row(m, Workspace(d, d), dict(zip(ROW_COLUMNS, values, strict=True)), link,
                               seq_split, report)
                    done += 1
                    if progress is not None and (done % 64 == 0 or done == total):
                        progress(done, total)
                _merge_fetch_log(m, con, report)
    finally:
        for c in cons:
            c.close()
    return report


def _merge_row(m: Manifest, src: Workspace, row: dict, link: bool, seq_split: dict, report: MergeReport) -> None:
    report.rows += 1
    if m.has_sha(row["sha256"]) or (row["source_id"] is not None
                                    and m.has_source_id(row["source"], row["source_id"])):
        report.duplicates += 1
        return
    path = src.resolve(row.pop("path"))
    sha = row.pop("sha256")
    if not archives.exists(path):  # a file, or a member of a zip or tar read in place
        report.missing += 1
        if len(report.problems) < 5:
            report.problems.append(f"missing file {path}")
        return
    key = (row["source"], row["sequence_id"])
    if row["sequence_id"] is not None:
        first = seq_split.get(key)
        if first is not None and row["split"] != first:
            row["split"] = first
            report.split_adopted += 1
        elif first is None and row["split"] is not None:
            seq_split[key] = row["split"]
    if link:
        new = m.add_image(sha256=sha, path=str(path), **row)
        report.linked += new is not None
    else:
        try:
            data = read_source(str(path))
        except ImageReadError:
            report.missing += 1
            return
        if sha256_bytes(data) != sha:  # changed since it was stored: not the image the row describes
            report.corrupt += 1
            if len(report.problems) < 5:
                report.problems.append(f"file changed since it was stored: {path}")
            return
        new = m.store_image(data, path.suffix.lstrip(".") or "jpg", **row)
    if new is not None:
        report.added += 1
    else:
        report.duplicates += 1


# --------------------------------------------------------------------------- CLI


def register(sub) -> None:
    p = sub.add_parser(
        "merge", help="combine other workspaces (e.g. sharded fetches) into this one",
        description="Bring other workspaces' images, manifest rows and fetch_log into this workspace "
                    "(--data / $GEOHIER_DATA), skipping images already here (same sha256 or source id). "
                    "Resumable; a sequence keeps the first split it had. Run labels afterwards.")
    p.add_argument("workspaces", nargs="+", metavar="WORKSPACE",
                   help="data directory of a workspace to merge from (one holding manifest.sqlite)")
    p.add_argument("--link", action="store_true",
                   help="store links to the other workspaces' files instead of copies (default: copy)")
    p.set_defaults(func=run)


def run(args, ws: Workspace) -> int:
    with progress_bar(desc="merge", unit="img") as bar:
        def show(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        report = merge(ws, args.workspaces, link=args.link, progress=show)
    print(report.summary())
    for line in report.problems:
        print(f"  {line}", file=sys.stderr)
    return 0
