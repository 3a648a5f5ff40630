"""`predict DIR|CSV --csv OUT.csv`: one row per image in the scoring format, resumable, and
`score OUT.csv --truth T.csv` reads it as it is."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import CITIES

from pipeline import cli
from pipeline.predict import CSV_COLUMNS, csv_inputs

pytestmark = pytest.mark.slow  # trains a tiny run to predict with: `make test-fast` skips this module


@pytest.fixture
def folder(tmp_path, make_jpeg):
    """Four photos of four cities (one PNG, upper-case suffix on another) and a non-image."""
    d = tmp_path / "photos"
    for i, (name, fmt) in enumerate((("c_tokyo.jpg", "JPEG"), ("a_paris.JPG", "JPEG"), ("b_berlin.png", "PNG"),
                                     ("d_sydney.jpeg", "JPEG"))):
        make_jpeg(d / name, color=CITIES[i][2], fmt=fmt)
    (d / "notes.txt").write_text("not a photo\n")
    return d


def truth_csv(path, keys):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "latitude", "longitude"])
        for k, (lat, lon, _) in zip(keys, CITIES, strict=False):
            w.writerow([k, lat, lon])
    return path


def read_out(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_folder_becomes_one_row_per_image_and_scores(ws, run_dir, folder, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    rc = cli.main(["predict", str(folder), "--csv", str(out), "--batch-size", "3"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rows = read_out(out)
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [r["image"] for r in rows] == ["a_paris", "b_berlin", "c_tokyo", "d_sydney"]  # sorted by file name
    for r in rows:
        assert -90 <= float(r["lat"]) <= 90 and -180 <= float(r["lon"]) <= 180
        assert r["cell"].count("/") == 4  # a level-5 cell
        assert 0 < float(r["joint"]) <= float(r["prob"]) <= 1
    assert "wrote 4 row(s)" in cap.out
    assert "predict" in cap.err  # the progress bar
    truth = truth_csv(tmp_path / "truth.csv", ["a_paris", "b_berlin", "c_tokyo", "d_sydney"])
    rc = cli.main(["score", str(out), "--truth", str(truth), "--json", "--no-save"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    text = cap.out.replace(" ", "")
    assert '"matched":4' in text and '"missing":0' in text and '"unmatched_predictions":0' in text


def test_the_points_are_the_predictors(ws, run_dir, folder, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert cli.main(["predict", str(folder / "a_paris.JPG"), "--csv", str(out)]) == 0
    assert cli.main(["predict", str(folder / "a_paris.JPG"), "--json"]) == 0
    best = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["best"]
    (row,) = read_out(out)
    assert row["cell"] == best["cell"]
    assert float(row["lat"]) == pytest.approx(best["lat"], abs=1e-6)
    assert float(row["lon"]) == pytest.approx(best["lon"], abs=1e-6)
    assert float(row["prob"]) == pytest.approx(best["prob"], abs=1e-6)


def test_it_resumes_after_a_kill(ws, run_dir, folder, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert cli.main(["predict", str(folder / "a_paris.JPG"), str(folder / "b_berlin.png"), "--csv", str(out)]) == 0
    first = read_out(out)
    # a kill in the middle of writing a row leaves a cut line
    with open(out, "a") as f:
        f.write("c_tokyo,35.6")
    capsys.readouterr()
    assert cli.main(["predict", str(folder), "--csv", str(out)]) == 0
    cap = capsys.readouterr()
    assert "wrote 2 row(s)" in cap.out and "2 already there" in cap.out
    rows = read_out(out)
    assert rows[:2] == first
    assert [r["image"] for r in rows] == ["a_paris", "b_berlin", "c_tokyo", "d_sydney"]
    assert cli.main(["predict", str(folder), "--csv", str(out)]) == 0
    assert "nothing to do: all 4 image(s) are already in" in capsys.readouterr().out
    assert len(read_out(out)) == 4


def test_a_csv_input_reads_its_image_column_under_the_images_root(ws, run_dir, folder, tmp_path, capsys):
    listing = tmp_path / "list" / "test.csv"
    listing.parent.mkdir()
    listing.write_text("id,latitude,longitude\nb_berlin,52.5,13.4\nd_sydney,-33.9,151.2\nnowhere,1,1\n,2,2\n")
    out = tmp_path / "preds.csv"
    rc = cli.main(["predict", str(listing), "--images-root", str(folder), "--csv", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert [r["image"] for r in read_out(out)] == ["b_berlin", "d_sydney"]
    assert "left out: 1 row(s) or file(s): image not found under the images root" in cap.err
    assert "no image id or path in the row" in cap.err
    rc = cli.main(["score", str(out), "--truth", str(listing), "--no-save"])
    assert rc == 0, capsys.readouterr().err


def test_csv_inputs_keys_and_duplicates(tmp_path, make_jpeg):
    a = make_jpeg(tmp_path / "d" / "X_1.jpg")
    make_jpeg(tmp_path / "d" / "x_1.png")
    found, left = csv_inputs([str(tmp_path / "d"), str(a)])
    assert found == [("x_1", a)]
    assert left == {"repeated image (first row kept)": 2}


@pytest.mark.parametrize("extra, message", [
    (["--json"], "--json does not go with --csv"),
    (["--abstain", "0.5"], "--abstain does not go with --csv"),
    (["--images-root", "."], "--images-root goes with a CSV input"),
])
def test_bad_combinations_are_one_line(ws, run_dir, folder, tmp_path, capsys, extra, message):
    rc = cli.main(["predict", str(folder), "--csv", str(tmp_path / "o.csv"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_a_foreign_output_file_is_refused_untouched(ws, run_dir, folder, tmp_path, capsys):
    out = tmp_path / "other.csv"
    out.write_text("path,lat,lon\na.jpg,1,2\n")
    rc = cli.main(["predict", str(folder), "--csv", str(out)])
    assert rc == 2 and "is not a predict --csv output" in capsys.readouterr().err
    assert out.read_text() == "path,lat,lon\na.jpg,1,2\n"
    rc = cli.main(["predict", str(tmp_path / "missing"), "--csv", str(tmp_path / "o.csv")])
    assert rc == 2 and "no such file or directory" in capsys.readouterr().err
