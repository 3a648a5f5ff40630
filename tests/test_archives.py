"""Datasets read as published: OSV-5M's folders of zips and WebDataset tars, imported,
trained on, evaluated and predicted from with no extraction (``geohier.archives``)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
import zipfile

import numpy as np
import pytest
from conftest import jpeg_bytes

from geohier import archives
from geohier.errors import ImageReadError
from geohier.images import open_image
from geohier.tables import Locator
from pipeline import cli
from pipeline.ingest import COMPRESSED_TAR, NO_METADATA, import_csv, import_wds

# OSV-5M's test.csv header, in full
OSV_HEADER = ("id,latitude,longitude,thumb_original_url,country,sequence,captured_at,lon_bin,lat_bin,cell,"
              "region,sub-region,city,land_cover,road_index,drive_side,climate,soil,dist_sea,quadtree_10_5000,"
              "quadtree_10_25000,quadtree_10_1000,quadtree_10_50000,quadtree_10_12500,quadtree_10_500,"
              "quadtree_10_2500,unique_region,unique_sub-region,unique_city,unique_country,creator_username,"
              "creator_id").split(",")

# (lat, lon) of the places the images are taken around, one colour each
PLACES = [(48.85, 2.35), (52.52, 13.40), (35.68, 139.69), (-33.87, 151.21), (40.71, -74.0), (-23.55, -46.63)]


def _image(i: int) -> bytes:
    return jpeg_bytes(size=(40, 32), color=((37 * i) % 256, (91 * i) % 256, (53 * i + 7) % 256))


def _point(i: int) -> tuple[float, float]:
    lat, lon = PLACES[i % len(PLACES)]
    return lat + 0.01 * (i // len(PLACES)), lon + 0.01 * (i // len(PLACES))


def osv5m_layout(root, n=24, zips=2, split="test"):
    """``root/images/<split>/00.zip …`` (members in a folder inside, as OSV-5M's are) and
    ``root/<split>.csv`` with OSV-5M's full header; returns (csv path, images root, ids)."""
    img_dir = root / "images" / split
    img_dir.mkdir(parents=True)
    ids = [str(3859149887465501 + 1000 * i) for i in range(n)]
    per = -(-n // zips)
    for z in range(zips):
        with zipfile.ZipFile(img_dir / f"{z:02d}.zip", "w") as zf:
            for i in range(z * per, min(n, (z + 1) * per)):
                zf.writestr(f"{z:02d}/{ids[i]}.jpg", _image(i))
    path = root / f"{split}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(OSV_HEADER)
        for i, ident in enumerate(ids):
            lat, lon = _point(i)
            row = dict.fromkeys(OSV_HEADER, "")
            row.update(id=ident, latitude=lat, longitude=lon, country="FR", sequence=f"seq{i}",
                       captured_at=1600000000 + i)
            w.writerow([row[h] for h in OSV_HEADER])
    return path, img_dir, ids


def wds_shard(path, samples):
    """A WebDataset tar: per sample ``<key>.jpg`` + ``<key>.json`` (either may be None)."""
    with tarfile.open(path, "w") as tf:
        for key, image, meta in samples:
            for ext, data in (("jpg", image), ("json", None if meta is None else
                                               (meta if isinstance(meta, bytes) else json.dumps(meta).encode()))):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


# --------------------------------------------------------------------------- the reader


def test_a_member_reference_reads_from_a_zip_and_a_tar(tmp_path):
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("inner/1.jpg", _image(1))
    t = wds_shard(tmp_path / "b.tar", [("k/2", _image(2), {"lat": 1, "lon": 2})])
    assert archives.read_member(archives.member_ref(z, "inner/1.jpg")) == _image(1)
    assert archives.read_member(archives.member_ref(t, "k/2.jpg")) == _image(2)
    img = open_image(archives.member_ref(z, "inner/1.jpg"))  # every reader takes the reference
    assert img.size == (40, 32)
    assert archives.exists(archives.member_ref(t, "k/2.json"))
    assert not archives.exists(archives.member_ref(t, "k/3.jpg"))
    assert not archives.exists(archives.member_ref(tmp_path / "gone.zip", "x.jpg"))
    with pytest.raises(ImageReadError, match="no member 'inner/9.jpg'") as e:
        archives.read_member(archives.member_ref(z, "inner/9.jpg"))
    assert e.value.reason == "missing file"
    with pytest.raises(ImageReadError, match="no such archive"):
        archives.read_member(archives.member_ref(tmp_path / "gone.zip", "x.jpg"))
    with pytest.raises(ImageReadError, match="over the 100-byte limit") as e:
        archives.read_member(archives.member_ref(z, "inner/1.jpg"), max_bytes=100)
    assert e.value.reason == "too large"
    (tmp_path / "fake.zip").write_bytes(b"not an archive at all" * 40)
    with pytest.raises(ImageReadError, match="cannot read the archive"):
        archives.read_member(archives.member_ref(tmp_path / "fake.zip", "x.jpg"))


def test_a_zip_bomb_member_is_refused_by_its_declared_size(tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb.jpg", b"\0" * (3 << 20))
    assert z.stat().st_size < 20_000
    with pytest.raises(ImageReadError) as e:
        archives.read_member(archives.member_ref(z, "bomb.jpg"), max_bytes=1 << 20)
    assert e.value.reason == "too large"


def test_each_process_opens_its_own_archives(tmp_path):
    """DataLoader workers (forked) read members from the same zips as their parent."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(16):
            zf.writestr(f"{i}.jpg", _image(i))
    refs = [archives.member_ref(z, f"{i}.jpg") for i in range(16)]
    archives.read_member(refs[0])  # the parent has it open before the fork

    class Members(Dataset):
        def __len__(self):
            return len(refs)

        def __getitem__(self, i):
            return torch.tensor(list(archives.read_member(refs[i])[:64]), dtype=torch.uint8), os.getpid()

    got = list(DataLoader(Members(), batch_size=4, num_workers=2, multiprocessing_context="fork"))
    data = torch.cat([b[0] for b in got])
    expected = torch.stack([torch.tensor(list(_image(i)[:64]), dtype=torch.uint8) for i in range(16)])
    assert torch.equal(data, expected)
    assert os.getpid() not in {int(p) for b in got for p in b[1]}


def test_the_locator_finds_ids_inside_zips_by_file_name_without_extension(tmp_path):
    csv_path, root, ids = osv5m_layout(tmp_path, n=6, zips=2)
    loc = Locator(root)
    found, why = loc.locate(ids[4])
    assert why is None and found == archives.member_ref((root / "01.zip").resolve(), f"01/{ids[4]}.jpg")
    assert loc.locate(f"{ids[0]}.jpg")[0] == archives.member_ref((root / "00.zip").resolve(), f"00/{ids[0]}.jpg")
    assert loc.locate(f"{ids[0]}.png") == (None, None)  # a different file
    assert loc.locate("nope") == (None, None)
    assert loc.locate("../x") == (None, "outside images root")
    assert len(loc.members) == 6

    with pytest.MonkeyPatch.context() as mp:  # every name colliding: the archive's own names decide
        mp.setattr(archives, "name_hash", lambda name: 5)
        assert Locator(root).locate(ids[4])[0] == found and Locator(root).locate("nope") == (None, None)
    one = Locator(root / "00.zip")  # the root may be one zip
    assert one.locate(ids[1])[0].endswith(f"00.zip!/00/{ids[1]}.jpg")
    assert one.locate(ids[4]) == (None, None)


def test_a_zip_symlinked_from_outside_the_root_is_not_read(tmp_path):
    _, root, ids = osv5m_layout(tmp_path / "ds", n=4, zips=1)
    other = tmp_path / "elsewhere"
    other.mkdir()
    os.replace(root / "00.zip", other / "00.zip")
    (root / "00.zip").symlink_to(other / "00.zip")
    assert Locator(root).locate(ids[0]) == (None, None)
    assert Locator(root, allow_outside=True).locate(ids[0])[0].startswith(str(other))


# --------------------------------------------------------------------------- import


def test_import_csv_reads_osv5m_zips_in_place(ws, tmp_path, capsys):
    csv_path, root, ids = osv5m_layout(tmp_path, n=12, zips=3)
    with open(csv_path, "a", newline="") as f:  # a row whose image is in no zip
        csv.writer(f).writerow(["999", 1.0, 2.0] + [""] * (len(OSV_HEADER) - 3))
    rc = cli.main(["import-csv", str(csv_path), "--images-root", str(root)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"added\s+12\n", out) and re.search(r"missing file\s+1\s", out)
    with ws.manifest() as m:
        df = m.frame(["source", "source_id", "path", "lat", "lon", "sequence_id", "width", "sha256"])
    assert len(df) == 12 and set(df["source"]) == {"osv5m"}
    assert all("!/" in p and archives.is_member(p) for p in df["path"])
    assert set(df["source_id"]) == set(ids) and set(df["width"]) == {40}
    assert not ws.images_dir.exists() or not any(ws.images_dir.rglob("*.*"))  # nothing extracted or copied
    row = df[df["source_id"] == ids[5]].iloc[0]
    assert (row["lat"], row["lon"]) == pytest.approx(_point(5))
    assert open_image(ws.resolve(row["path"])).size == (40, 32)
    # the same again: duplicates by id without reading a member
    s = import_csv(ws, csv_path, root)
    assert (s.added, s.duplicates, s.skipped["missing file"]) == (0, 12, 1)


def test_import_csv_copy_and_a_single_zip(ws, tmp_path):
    csv_path, root, ids = osv5m_layout(tmp_path, n=8, zips=2)
    s = import_csv(ws, csv_path, root / "01.zip", copy=True)
    assert (s.added, s.skipped["missing file"]) == (4, 4)
    with ws.manifest() as m:
        paths = list(m.frame(["path"])["path"])
    assert len(paths) == 4 and not any(archives.is_member(p) for p in paths)
    assert all(ws.resolve(p).is_file() for p in paths)


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nope", "no such directory"),
    (lambda d: (d / "x.txt").write_text("hi") and d / "x.txt", "neither a directory nor a .zip or .tar"),
    (lambda d: (d / "x.zip").write_bytes(b"garbage") and d / "x.zip", "not a readable zip or uncompressed tar"),
])
def test_import_csv_bad_roots_are_one_line(ws, tmp_path, capsys, make, message):
    csv_path, _, _ = osv5m_layout(tmp_path, n=2, zips=1)
    rc = cli.main(["import-csv", str(csv_path), "--images-root", str(make(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_import_wds_reads_shards_in_place(ws, tmp_path, capsys):
    shards = tmp_path / "wds"
    shards.mkdir()
    wds_shard(shards / "000.tar", [(f"s{i:03d}", _image(i), {"id": f"osv{i}", "latitude": _point(i)[0],
                                                             "longitude": _point(i)[1], "country": "FR"})
                                   for i in range(5)]
              + [("nojson", _image(50), None), ("noimg", None, {"latitude": 1, "longitude": 2}),
                 ("badjson", _image(51), b"{not json"), ("nocoords", _image(52), {"country": "FR"}),
                 ("far", _image(53), {"lat": 95, "lon": 2})])
    wds_shard(shards / "001.tar", [(f"t{i}", _image(10 + i), {"lat": _point(10 + i)[0], "lon": _point(10 + i)[1]})
                                   for i in range(3)])
    with open(shards / "002.tar.gz", "wb") as f:
        f.write(b"\x1f\x8b" + b"\0" * 100)
    rc = cli.main(["import-wds", str(shards)])
    out = capsys.readouterr().out
    assert rc == 0, out
    with ws.manifest() as m:
        df = m.frame(["source", "source_id", "path", "lat"])
    assert len(df) == 8 and set(df["source"]) == {"wds"}
    assert {"osv0", "osv4", "t0", "t2"} <= set(df["source_id"])
    assert all(archives.is_member(p) and open_image(p).size == (40, 32) for p in df["path"])
    s = import_wds(ws, [str(shards)])
    assert s.duplicates == 8 and s.added == 0
    assert s.skipped[NO_METADATA] == 2 and s.skipped["missing file"] == 1
    assert s.skipped["invalid coordinates (out of range)"] == 1
    assert any(r.startswith("json not readable") for r in s.skipped)
    assert s.skipped.get(COMPRESSED_TAR, 0) == 0  # .tar.gz is not picked up from a folder of .tar shards
    s = import_wds(ws, [str(shards / "002.tar.gz")])
    assert s.skipped[COMPRESSED_TAR] == 1


def test_import_wds_copy_and_bad_arguments(ws, tmp_path, capsys):
    shard = wds_shard(tmp_path / "a.tar", [("k", _image(3), {"lat": 1.5, "lon": 2.5})])
    s = import_wds(ws, [str(shard)], copy=True)
    assert s.added == 1
    with ws.manifest() as m:
        (path,) = m.frame(["path"])["path"]
    assert not archives.is_member(path) and ws.resolve(path).read_bytes() == _image(3)
    assert cli.main(["import-wds", str(tmp_path / "none")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["import-wds", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no such file or directory" in err and "no .tar shards" in err and "Traceback" not in err


# --------------------------------------------------------------------------- the loop, no extraction


@pytest.mark.slow
def test_zips_import_train_evaluate_and_predict_to_score_with_no_extraction(ws, tmp_path, capsys):
    data_root = tmp_path / "osv5m"
    train_csv, train_root, _ = osv5m_layout(data_root, n=60, zips=3, split="train")
    test_csv, test_root, test_ids = osv5m_layout(data_root, n=12, zips=2, split="test")
    assert cli.main(["import-csv", str(train_csv), "--images-root", str(train_root)]) == 0
    assert cli.main(["labels", "--levels", "1,3", "--min-images", "1"]) == 0
    rc = cli.main(["train", "--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--epochs", "1",
                   "--batch-size", "8", "--workers", "2", "--device", "cpu", "--run-name", "z", "--max-steps", "3"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    metrics = [json.loads(line) for line in (ws.models_dir / "z" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["train_loss"]) for m in metrics)  # nan when no image was read
    from geohier.dataset import ManifestDataset, Skipped
    from geohier.hierarchy import Hierarchy

    ds = ManifestDataset(ws, Hierarchy.load(ws.hierarchy_path), "train", transform=lambda im: np.asarray(im))
    assert ds.stats["missing"] == 0 and len(ds) > 30
    assert all(not isinstance(ds[i], Skipped) and ds[i][0].shape[2] == 3 for i in range(len(ds)))
    # the embedding cache, two loader workers reading the zips
    from geohier.embeddings import cache_root, list_caches

    rc = cli.main(["embed", "--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--device", "cpu",
                   "--workers", "2", "--threads", "1", "--batch-size", "8"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    (info,) = list_caches(cache_root(ws))
    with ws.manifest() as m:
        n_split = len(m.frame(["id"], where="split IS NOT NULL"))
    assert info["n"] == n_split == 60 and not info["bad_shards"]
    # evaluate on the published test split, read from its zips
    rc = cli.main(["evaluate", "z", "--csv", str(test_csv), "--images-root", str(test_root), "--no-calibrate"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    ev = json.loads((ws.models_dir / "z" / "eval.json").read_text())
    assert (ev["images"], ev["skipped"]) == (12, 0)
    import hashlib

    with ws.manifest() as m:
        train_sha = set(m.frame(["sha256"], where="split = 'train'")["sha256"])
    expected = sum(hashlib.sha256(_image(i)).hexdigest() in train_sha for i in range(12))
    assert 0 < expected < 12  # the first 12 train images' bytes, some of them drawn into val/test
    assert ev["source"]["in_training"] == expected  # hashed from the test zips' members
    # predict -> --csv -> score
    out = tmp_path / "preds.csv"
    rc = cli.main(["predict", str(test_csv), "--images-root", str(test_root), "--csv", str(out), "--run", "z"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image"] for r in rows) == sorted(test_ids)
    rc = cli.main(["score", str(out), "--truth", str(test_csv), "--json", "--no-save"])
    text = capsys.readouterr().out.replace(" ", "")
    assert rc == 0 and '"matched":12' in text and '"missing":0' in text
    assert not ws.images_dir.exists() or not any(ws.images_dir.rglob("*.jpg"))  # never extracted


def test_the_compact_reader_checks_names_crcs_and_long_names(tmp_path, monkeypatch):
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dir/été 1.jpg", _image(1))
        zf.writestr("dir/2.jpg", _image(2))
    long = "x" * 120 + "/k.jpg"
    t = wds_shard(tmp_path / "b.tar", [("k/a", _image(3), None), (long[:-4], _image(4), None)])
    cache = archives.ArchiveCache()
    assert cache.read(archives.member_ref(z, "dir/été 1.jpg")) == _image(1)  # a UTF-8 name, deflated
    assert cache.read(archives.member_ref(t, long)) == _image(4)  # a GNU long name
    # every name hashing alike: the archive's own names still pick the member
    monkeypatch.setattr(archives, "name_hash", lambda name: 7)
    cache = archives.ArchiveCache()
    assert cache.read(archives.member_ref(z, "dir/2.jpg")) == _image(2)
    assert cache.read(archives.member_ref(t, "k/a.jpg")) == _image(3)
    with pytest.raises(ImageReadError, match="no member"):  # listed by its hash alone, refused when read
        cache.read(archives.member_ref(z, "dir/3.jpg"))
    monkeypatch.undo()
    # a flipped byte in a member's data fails its CRC: unreadable, never wrong bytes
    data = bytearray(z.read_bytes())
    with zipfile.ZipFile(z) as zf:
        info = zf.getinfo("dir/2.jpg")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 5] ^= 0xFF
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(ImageReadError) as e:
        archives.ArchiveCache().read(archives.member_ref(bad, "dir/2.jpg"))
    assert e.value.reason == "unreadable file"


def test_the_file_index_finds_ids_in_numbered_folders(tmp_path, monkeypatch):
    """OSV-5M unpacked: ids in numbered sub-folders, found by id, by file name, by another
    case of the extension; the first in walk order wins; a hash collision costs a failed
    stat, never a wrong file."""
    from geohier import tables

    for folder, name in (("00", "111.jpg"), ("00", "notes.txt"), ("01", "222.JPG"), ("02", "111.jpg"),
                         ("02", "333.png"), ("03", "444")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes(b"x")
    idx = tables.FileIndex(tmp_path)
    rel = lambda ps: [p.relative_to(tmp_path).as_posix() for p in ps]  # noqa: E731
    assert len(idx) == 6
    assert rel(idx.find("111")) == ["00/111.jpg", "02/111.jpg"]  # walk order: the first wins
    assert rel(idx.find("111.jpg")) == ["00/111.jpg", "02/111.jpg"]
    assert rel(idx.find("222")) == ["01/222.JPG"] and rel(idx.find("222.JPG")) == ["01/222.JPG"]
    assert idx.find("222.jpg") == [] and idx.find("333.jpg") == []  # another file
    assert rel(idx.find("notes.txt")) == ["00/notes.txt"] and rel(idx.find("444")) == ["03/444"]
    loc = tables.Locator(tmp_path)
    assert loc.locate("333")[0] == (tmp_path / "02" / "333.png").resolve()
    monkeypatch.setattr(archives, "name_hash", lambda name: 5)  # every name collides
    loc = tables.Locator(tmp_path)
    assert loc.locate("333")[0] == (tmp_path / "02" / "333.png").resolve()
    assert loc.locate("555") == (None, None)


def test_the_open_archives_are_bounded_and_reopen_when_needed(tmp_path):
    zips = []
    for z in range(3):
        zips.append(tmp_path / f"{z}.zip")
        with zipfile.ZipFile(zips[-1], "w") as zf:
            zf.writestr("a.jpg", _image(z))
    cache = archives.ArchiveCache(max_open=2)
    for z in [0, 1, 2, 0, 2, 1, 0]:
        assert cache.read(archives.member_ref(zips[z], "a.jpg")) == _image(z)
        assert len(cache._open) <= 2
    assert archives.MAX_OPEN >= 103  # OSV-5M's 98 train + 5 test zips stay open together
    cache.close()
    assert not cache._open
