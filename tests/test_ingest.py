"""pipeline.ingest: photo folders and CSV manifests into the workspace, every skip counted."""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.cli
from geohier import grid
from geohier.errors import InputError
from geohier.tables import (
    INVALID_EMPTY,
    INVALID_NAN,
    INVALID_NUMBER,
    INVALID_RANGE,
    OUTSIDE_ROOT,
    Locator,
    match_columns,
)
from geohier.workspace import Manifest
from pipeline import ingest
from pipeline.ingest import import_csv, import_photos, parse_time

PARIS = (48.8584, 2.2945)
CAPE_TOWN = (-33.9249, 18.4241)
NEW_YORK = (40.7128, -74.0060)


@pytest.fixture
def cli(monkeypatch):
    """pipeline.cli.main with only this module's commands registered (the other command
    modules are other parts' business)."""
    monkeypatch.setattr(pipeline.cli, "COMMAND_MODULES", ("pipeline.ingest",))
    return pipeline.cli.main


def _broken_gps_jpeg(path: Path) -> Path:
    exif = Image.Exif()
    good = (Fraction(10), Fraction(30), Fraction(0))
    exif[0x8825] = {1: "X", 2: good, 3: "E", 4: good}
    Image.new("RGB", (32, 32), (90, 90, 90)).save(path, "JPEG", exif=exif.tobytes())
    return path


def _noisy_gps_jpeg(latlon) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    exif = Image.Exif()
    lat, lon = latlon
    exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: (Fraction(abs(lat)).limit_denominator(10**6), 0, 0),
                    3: "E" if lon >= 0 else "W", 4: (Fraction(abs(lon)).limit_denominator(10**6), 0, 0)}
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture
def photo_dir(tmp_path, make_jpeg) -> Path:
    root = tmp_path / "photos"
    make_jpeg(root / "paris.jpg", gps=PARIS, color=(10, 20, 30))
    make_jpeg(root / "trip" / "cape.jpg", gps=CAPE_TOWN, orientation=6, size=(64, 48), color=(200, 100, 50))
    shutil.copy(root / "paris.jpg", root / "trip" / "paris_copy.jpg")          # same bytes
    make_jpeg(root / "nogps.jpg")
    (root / "notes.txt").write_text("not a photo\n")
    _broken_gps_jpeg(root / "broken.jpg")
    make_jpeg(root / "trip" / "mars.jpg", gps=(95.0, 10.0))                   # latitude 95
    full = _noisy_gps_jpeg(NEW_YORK)
    (root / "cut.jpg").write_bytes(full[: len(full) * 2 // 3])                # truncated scan data
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")                         # hidden: ignored
    return root


def _count(text: str, reason: str) -> int:
    """The number printed on a summary line ``  <reason>   <n>``."""
    match = re.search(rf"^ +{re.escape(reason)} +(\d+)", text, re.MULTILINE)
    assert match, f"no line for {reason!r} in:\n{text}"
    return int(match.group(1))


def _rows(ws):
    with ws.manifest() as m:
        return m.frame().set_index("source_id")


# ------------------------------------------------------------------ import-photos


def test_import_photos_counts_every_outcome(ws, photo_dir):
    calls = []
    s = import_photos(ws, photo_dir, progress=lambda done, total: calls.append((done, total)))
    assert s.total == 8  # .DS_Store is not looked at
    assert (s.added, s.duplicates) == (2, 1)
    assert s.skipped == {"no GPS": 1, "not an image": 1, "broken EXIF": 1,
                         "invalid coordinates": 1, "truncated image": 1}
    assert calls[-1] == (8, 8) and len(calls) == 8
    rows = _rows(ws)
    assert sorted(rows.index) == ["paris.jpg", "trip/cape.jpg"]
    cape = rows.loc["trip/cape.jpg"]
    assert (cape.lat, cape.lon) == pytest.approx(CAPE_TOWN, abs=1e-4)
    assert (cape.width, cape.height) == (48, 64)  # orientation 6: stored as displayed
    assert cape.cell == grid.to_id(grid.cell(*CAPE_TOWN, 8), sep="")
    assert cape.source == "photos" and 0 < cape.brightness < 255
    for row in rows.itertuples():
        stored = ws.resolve(row.path)
        assert stored.is_file() and stored.is_relative_to(ws.images_dir)
        assert stored.suffix == ".jpg"
    # Per-cell counts in the summary and the printed lines.
    assert s.cells_at(1) == {"1": 1, "3": 1}  # Paris NE, Cape Town SE
    text = "\n".join(s.lines())
    for word in ("added", "duplicates", "no GPS", "not an image", "broken EXIF",
                 "invalid coordinates", "cells touched", "top L8 cells", "nogps.jpg"):
        assert word in text


def test_reimport_adds_nothing(ws, photo_dir):
    import_photos(ws, photo_dir)
    before = sorted(p.name for p in ws.images_dir.rglob("*") if p.is_file())
    again = import_photos(ws, photo_dir)
    assert again.added == 0 and again.duplicates == 3
    with ws.manifest() as m:
        assert m.count() == 2
    assert sorted(p.name for p in ws.images_dir.rglob("*") if p.is_file()) == before


def test_link_stores_absolute_paths_and_copies_nothing(ws, photo_dir):
    s = import_photos(ws, photo_dir, link=True)
    assert s.added == 2
    rows = _rows(ws)
    assert rows.loc["paris.jpg", "path"] == str((photo_dir / "paris.jpg").resolve())
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in rows.path)
    assert not ws.images_dir.exists() or not any(ws.images_dir.rglob("*.jpg"))


def test_no_recursive_stays_in_the_folder(ws, photo_dir):
    s = import_photos(ws, photo_dir, recursive=False)
    assert s.total == 5 and s.added == 1


def test_same_relative_name_from_two_folders_is_kept_twice(ws, tmp_path, make_jpeg):
    make_jpeg(tmp_path / "cam1" / "IMG_0001.JPG", gps=PARIS)
    make_jpeg(tmp_path / "cam2" / "IMG_0001.JPG", gps=NEW_YORK)
    assert import_photos(ws, tmp_path / "cam1").added == 1
    assert import_photos(ws, tmp_path / "cam2").added == 1
    ids = sorted(_rows(ws).index)
    assert ids[0] == "IMG_0001.JPG" and ids[1].startswith("IMG_0001.JPG#")


# The shared folder next to the repository (../shared), wherever the checkout lives.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def test_real_photos_without_gps_are_counted_not_crashed(ws):
    shared = SHARED / "photos"
    if not shared.is_dir():
        pytest.skip(f"shared photos not present ({shared})")
    s = import_photos(ws, shared)
    assert s.added == 0 and s.skipped["no GPS"] == s.total > 0


def test_missing_folder_is_an_input_error(ws, tmp_path):
    with pytest.raises(InputError, match="nowhere"):
        import_photos(ws, tmp_path / "nowhere")


def test_interrupted_import_leaves_no_row_without_its_file(ws, tmp_path, make_jpeg, monkeypatch):
    for i in range(5):
        make_jpeg(tmp_path / "in" / f"p{i}.jpg", gps=(10.0 + i, 20.0 + i))
    real_add = Manifest.add_image
    calls = {"n": 0}

    def flaky_add(self, **row):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_add(self, **row)

    monkeypatch.setattr(Manifest, "add_image", flaky_add)
    s = import_photos(ws, tmp_path / "in")
    assert s.interrupted and s.added == 2
    rows = _rows(ws)
    assert len(rows) == 2
    assert all(ws.resolve(p).is_file() for p in rows.path)
    assert not list(ws.images_dir.rglob("*.tmp"))  # no half-written temp files either
    # The next run picks up where it stopped (reusing the file already written).
    monkeypatch.setattr(Manifest, "add_image", real_add)
    s = import_photos(ws, tmp_path / "in")
    assert (s.added, s.duplicates) == (3, 2)
    assert len(list(ws.images_dir.rglob("*.jpg"))) == 5


# ------------------------------------------------------------------ CLI


def test_cli_import_photos(ws, photo_dir, cli, capsys):
    assert cli(["import-photos", str(photo_dir)]) == 0
    out, err = capsys.readouterr()
    assert _count(out, "added") == 2 and _count(out, "no GPS") == 1
    assert "manifest: 2 images" in out and "Traceback" not in out + err
    assert cli(["import-photos", str(photo_dir), "--link", "--no-recursive"]) == 0
    assert _count(capsys.readouterr().out, "added") == 0


def _void_gps_jpeg(path: Path) -> Path:
    exif = Image.Exif()
    good = (Fraction(10), Fraction(30), Fraction(0))
    exif[0x8825] = {1: "N", 2: good, 3: "E", 4: good, 9: "V"}  # GPSStatus V: no fix
    Image.new("RGB", (32, 32), (90, 90, 90)).save(path, "JPEG", exif=exif.tobytes())
    return path


def test_void_gps_and_library_warnings_are_counted(ws, tmp_path, make_jpeg):
    root = tmp_path / "in"
    make_jpeg(root / "paris.jpg", gps=PARIS)
    _void_gps_jpeg(root / "void.jpg")
    apng = (Path(__file__).parent / "data" / "invalid_apng.png").read_bytes()
    (root / "anim.png").write_bytes(apng)
    (root / "anim2.png").write_bytes(apng + b"\0")  # other bytes, the same warning
    s = import_photos(ws, root)
    assert s.added == 1 and s.skipped["GPS void"] == 1 and s.skipped["no GPS"] == 2
    message = "UserWarning: Invalid APNG, will use default PNG image if possible"
    assert s.warnings == {message: 2}
    assert s.warning_examples[message] == ["anim.png", "anim2.png"]
    assert s.to_dict()["warnings"] == {message: 2}
    text = "\n".join(s.lines())
    assert _count(text, "GPS void") == 1 and _count(text, "library warnings") == 2
    assert f"    {message}  2   e.g. anim.png, anim2.png" in text


def test_cli_routes_warnings_into_the_summary(ws, tmp_path, cli, capsys):
    root = tmp_path / "in"
    root.mkdir()
    (root / "anim.png").write_bytes((Path(__file__).parent / "data" / "invalid_apng.png").read_bytes())
    _void_gps_jpeg(root / "void.jpg")
    assert cli(["import-photos", str(root)]) == 0
    out, err = capsys.readouterr()
    assert _count(out, "library warnings") == 1 and _count(out, "GPS void") == 1
    assert "Invalid APNG" in out and "Invalid APNG" not in err
    assert "Warning" not in err and "Traceback" not in err


def test_cli_import_photos_missing_dir(ws, tmp_path, cli, capsys):
    assert cli(["import-photos", str(tmp_path / "nope")]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: no such directory"
    assert "Traceback" not in err


def test_cli_interrupted_exit_130(ws, photo_dir, cli, capsys, monkeypatch):
    def stop(self, **row):
        raise KeyboardInterrupt

    monkeypatch.setattr(Manifest, "add_image", stop)
    assert cli(["import-photos", str(photo_dir)]) == 130
    assert "interrupted" in capsys.readouterr().out


# ------------------------------------------------------------------ import-csv


def _write(path: Path, text: str, encoding="utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def test_osv5m_csv(ws, tmp_path, make_jpeg):
    root = tmp_path / "images"
    make_jpeg(root / "1001.jpg")                 # at the root
    make_jpeg(root / "00" / "1002.jpg", color=(1, 2, 3))   # in an OSV-5M shard folder
    csv_path = _write(tmp_path / "train.csv",
                      "id,latitude,longitude,thumb_original_url,country,sequence,captured_at\n"
                      f"1001,{PARIS[0]},{PARIS[1]},http://x,FR,seqA,1622548800000\n"
                      f"1002,{CAPE_TOWN[0]},{CAPE_TOWN[1]},http://y,ZA,seqB,\n"
                      "1003,1.0,2.0,http://z,XX,seqC,\n")
    s = import_csv(ws, csv_path, root)
    assert s.source == "osv5m" and (s.total, s.added) == (3, 2)
    assert s.skipped == {"missing file": 1} and s.examples["missing file"] == ["1003"]
    rows = _rows(ws)
    assert set(rows.source) == {"osv5m"}
    r = rows.loc["1001"]
    assert (r.lat, r.lon) == pytest.approx(PARIS)
    assert r.sequence_id == "seqA" and r.captured_at == "2021-06-01T12:00:00+00:00"
    assert rows.loc["1002", "sequence_id"] == "seqB"
    again = import_csv(ws, csv_path, root)
    assert again.added == 0 and again.duplicates == 2


def test_im2gps3k_csv(ws, tmp_path, make_jpeg):
    root = tmp_path / "im2gps3k"
    make_jpeg(root / "123_abc@N00.jpg")
    csv_path = _write(tmp_path / "im2gps3k_places365.csv",
                      "IMG_ID,AUTHOR,LAT,LON,S3_Label\n"
                      f"123_abc@N00.jpg,someone,{NEW_YORK[0]},{NEW_YORK[1]},1\n")
    s = import_csv(ws, csv_path, root, link=True)
    assert s.source == "im2gps3k" and s.added == 1
    row = _rows(ws).loc["123_abc@N00.jpg"]
    assert row.path == str((root / "123_abc@N00.jpg").resolve())
    assert (row.lat, row.lon) == pytest.approx(NEW_YORK)


@pytest.mark.parametrize("path_col", ["path", "Filename", "IMAGE", "img_path"])
def test_generic_csv_aliases_bom_and_delimiters(ws, tmp_path, make_jpeg, path_col):
    root = tmp_path / "imgs"
    make_jpeg(root / "sub" / "a.png", fmt="PNG")
    make_jpeg(root / "b.jpg", color=(3, 3, 3))
    text = (f"{path_col};Lat;Lng\n"
            f"sub/a.png;{CAPE_TOWN[0]};{CAPE_TOWN[1]}\n"
            f"b;{PARIS[0]};{PARIS[1]}\n")        # no extension: .jpg found
    csv_path = tmp_path / "list.csv"
    csv_path.write_bytes("\ufeff".encode() + text.encode())  # BOM, semicolons
    s = import_csv(ws, csv_path, root)
    assert s.source == "csv" and s.added == 2, s.lines()
    rows = _rows(ws)
    assert sorted(rows.index) == ["b", "sub/a.png"]
    assert ws.resolve(rows.loc["sub/a.png", "path"]).suffix == ".png"


def test_csv_invalid_coordinates_are_counted_by_reason(ws, tmp_path, make_jpeg):
    root = tmp_path / "imgs"
    make_jpeg(root / "ok.jpg")
    (root / "text.jpg").write_text("hello")
    csv_path = _write(tmp_path / "x.csv",
                      "path,lat,lon\n"
                      "ok.jpg,10,20\n"
                      "a.jpg,,20\n"          # empty
                      "b.jpg,abc,20\n"       # not a number
                      "c.jpg,nan,20\n"       # NaN
                      "d.jpg,95,20\n"        # out of range
                      "e.jpg,10,-200\n"      # out of range
                      "f.jpg,10,inf\n"       # infinite
                      "text.jpg,10,20\n"     # not an image
                      ",10,20\n"             # no path
                      "gone.jpg,10,20\n")    # missing file
    s = import_csv(ws, csv_path, root)
    assert s.added == 1 and s.total == 10
    assert s.skipped == {INVALID_EMPTY: 1, INVALID_NUMBER: 1, INVALID_NAN: 2, INVALID_RANGE: 2,
                         "not an image": 1, ingest.MISSING_REF: 1, "missing file": 1}
    assert s.examples[INVALID_RANGE] == ["line 6", "line 7"]  # file lines, header = line 1
    text = "\n".join(s.lines())
    assert _count(text, "invalid coordinates") == 6 and _count(text, "out of range") == 2
    assert _count(text, "missing file") == 1 and "no GPS" not in text  # CSV rows have no EXIF to miss


def test_csv_missing_column_messages(tmp_path):
    with pytest.raises(InputError) as info:
        match_columns(["path", "lat"], "x.csv")
    msg = str(info.value)
    assert "x.csv has no longitude column" in msg and "lon, lng, long, longitude" in msg
    assert "Columns found: path, lat" in msg
    with pytest.raises(InputError, match="no latitude column; accepted names .*lat, latitude"):
        match_columns(["id", "lon"], "x.csv")
    with pytest.raises(InputError, match="no image id or path column.*img_id.*filename"):
        match_columns(["LAT", "LON", "note"], "x.csv")


def test_csv_recognises_datasets():
    assert match_columns(["id", "latitude", "longitude", "sequence"]).source == "osv5m"
    assert match_columns(["id", "latitude", "longitude"]).source == "csv"
    assert match_columns(["IMG_ID", "LAT", "LON"]).source == "im2gps3k"
    cols = match_columns([" Path ", "LATITUDE", "Long", "Timestamp"])
    assert (cols.path, cols.lat, cols.lon, cols.captured_at) == (" Path ", "LATITUDE", "Long", "Timestamp")


def test_csv_bad_files(ws, tmp_path):
    root = tmp_path
    with pytest.raises(InputError, match="empty"):
        import_csv(ws, _write(tmp_path / "empty.csv", ""), root)
    with pytest.raises(InputError, match="not UTF-8"):
        import_csv(ws, _write(tmp_path / "latin.csv", "path,lat,lon\ncafé.jpg,1,2\n", "latin-1"), root)
    with pytest.raises(InputError, match="no such file"):
        import_csv(ws, tmp_path / "none.csv", root)
    with pytest.raises(InputError, match="no such directory"):
        import_csv(ws, _write(tmp_path / "ok.csv", "path,lat,lon\n"), tmp_path / "nowhere")
    header_only = import_csv(ws, _write(tmp_path / "h.csv", "path,lat,lon\n"), root)
    assert header_only.total == 0 and header_only.added == 0


def test_parse_time():
    assert parse_time("1622548800") == "2021-06-01T12:00:00+00:00"
    assert parse_time("1622548800000") == "2021-06-01T12:00:00+00:00"
    assert parse_time("2021-06-01T14:00:00+02:00") == "2021-06-01T12:00:00+00:00"
    assert parse_time("2021-06-01 14:00:00") == "2021-06-01T14:00:00"
    assert parse_time("") is None and parse_time("yesterday") is None and parse_time("nan") is None


def test_cli_import_csv(ws, tmp_path, make_jpeg, cli, capsys):
    make_jpeg(tmp_path / "imgs" / "a.jpg")
    csv_path = _write(tmp_path / "l.csv", "filename,latitude,longitude\na.jpg,10,20\nb.jpg,99,20\n")
    assert cli(["import-csv", str(csv_path), "--images-root", str(tmp_path / "imgs")]) == 0
    out, err = capsys.readouterr()
    assert _count(out, "added") == 1
    assert _count(out, "out of range") == 1 and "Traceback" not in err
    latin = _write(tmp_path / "latin.csv", "path,lat,lon\ncafé.jpg,1,2\n", "latin-1")
    assert cli(["import-csv", str(latin), "--images-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not UTF-8" in err and "Traceback" not in err
    assert cli(["import-csv", str(tmp_path / "gone.csv"), "--images-root", str(tmp_path)]) == 2
    assert "gone.csv: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # --images-root is required: argparse's own exit 2
        cli(["import-csv", str(csv_path)])
    assert stop.value.code == 2 and "--images-root" in capsys.readouterr().err
    bad = _write(tmp_path / "bad.csv", "path,lat\na.jpg,1\n")
    assert cli(["import-csv", str(bad), "--images-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no longitude column" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ the CSV door: paths and malformed files

_OPENED: list[str] | None = None
_HOOKED = False


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


@pytest.fixture
def opened():
    """Every file this process opens while the test runs (realpaths), from Python's audit
    hook: builtins.open, io.open and os.open all report there."""
    global _OPENED, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    _OPENED = []
    yield _OPENED
    _OPENED = None


@pytest.fixture
def escape(tmp_path, make_jpeg):
    """An images root with one good image, and files outside it that rows reach by ``../``,
    an absolute path, a symlinked file and a symlinked folder."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    make_jpeg(root / "ok.jpg", color=(10, 10, 10))
    secrets = [make_jpeg(outside / f"secret{i}.jpg", color=(40 * i, 50, 60)) for i in range(4)]
    (root / "link.jpg").symlink_to(secrets[2])
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    csv_path = _write(tmp_path / "escape.csv",
                      "path,lat,lon\n"
                      "ok.jpg,10,20\n"
                      "../outside/secret0.jpg,10,20\n"      # climbs out
                      f"{secrets[1]},10,20\n"                # absolute, elsewhere
                      "link.jpg,10,20\n"                     # a symlinked file leading out
                      "linkdir/secret3.jpg,10,20\n"          # through a symlinked folder
                      "secret3,10,20\n")                     # by name: the index must not follow linkdir
    return root, csv_path, [str(p.resolve()) for p in secrets]


def test_csv_rows_outside_images_root_are_skipped_unread(ws, escape, opened):
    root, csv_path, secrets = escape
    s = import_csv(ws, csv_path, root)
    assert (s.total, s.added) == (6, 1)
    assert s.skipped == {OUTSIDE_ROOT: 4, "missing file": 1}, s.skipped
    assert s.examples[OUTSIDE_ROOT] == ["../outside/secret0.jpg", secrets[1], "link.jpg", "linkdir/secret3.jpg"]
    assert str((root / "ok.jpg").resolve()) in opened  # the hook sees what is read
    assert not set(secrets) & set(opened), "a file outside the images root was opened"
    assert list(_rows(ws).index) == ["ok.jpg"]
    assert _count("\n".join(s.lines()), OUTSIDE_ROOT) == 4


def test_csv_allow_outside_root_imports_them(ws, escape, cli, capsys):
    root, csv_path, _ = escape
    assert cli(["import-csv", str(csv_path), "--images-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert _count(out, OUTSIDE_ROOT) == 4 and _count(out, "added") == 1
    assert cli(["import-csv", str(csv_path), "--images-root", str(root), "--allow-outside-root"]) == 0
    out = capsys.readouterr().out
    assert _count(out, "added") == 4 and _count(out, "duplicates") == 1, out
    assert "outside images root" not in out
    # the by-name index never follows a symlinked folder, allowed or not
    assert _count(out, "missing file") == 1
    assert sorted(_rows(ws).index) == sorted(["ok.jpg", "../outside/secret0.jpg", str(escape[2][1]),
                                              "link.jpg", "linkdir/secret3.jpg"])


def test_locator_keeps_inside_paths(tmp_path, make_jpeg):
    root = tmp_path / "r"
    a = make_jpeg(root / "sub" / "a.jpg")
    (root / "inner.jpg").symlink_to(a)               # a symlink that stays inside: fine
    loc = Locator(root)
    assert loc.locate("sub/../sub/a.jpg") == (a.resolve(), None)
    assert loc.locate(str(a)) == (a.resolve(), None)  # absolute, but inside the root
    assert loc.locate("inner.jpg") == (a.resolve(), None)
    assert loc.locate("a") == (a.resolve(), None)     # by name, in a sub-folder
    assert loc.locate("..") == (None, OUTSIDE_ROOT) and loc.locate("../r/sub/a.jpg") == (None, OUTSIDE_ROOT)
    assert loc.locate("nope.jpg") == (None, None)


@pytest.mark.parametrize("name, content, message", [
    ("nul.csv", b"path,lat,lon\na.jpg,1,2\nb.jpg\x00,1,2\n", "line 3: a NUL byte"),
    ("quote.csv", b'path,lat,lon\na.jpg,1,2\n"b.jpg"x,1,2\n', "line 3: malformed CSV"),
    ("open.csv", b'path,lat,lon\na.jpg,1,2\n"b.jpg,1,2\nc.jpg,3,4\n', "lines 3-4: malformed CSV (a quote opened on line 3"),
    ("latin.csv", "path,lat,lon\na.jpg,1,2\ncafé.jpg,1,2\n".encode("latin-1"), "line 3)"),
    ("bighead.csv", ("path,lat,lon," + "h" * 140_000 + "\na.jpg,1,2,x\n").encode(), "line 1: a field longer than 131,072"),
    ("bigfield.csv", ("path,lat,lon\na.jpg,1,2\nb.jpg,1," + "9" * 140_000 + "\n").encode(),
     "line 3: a field longer than 131,072"),
])
def test_cli_import_csv_malformed_is_one_line(ws, tmp_path, make_jpeg, cli, capsys, name, content, message):
    make_jpeg(tmp_path / "a.jpg")
    bad = tmp_path / name
    bad.write_bytes(content)
    assert cli(["import-csv", str(bad), "--images-root", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and str(bad) in err and message in err, err
    assert not ws.has_manifest() or _rows(ws).empty  # refused before the good first row was imported
