"""The synthetic demo world: deterministic, realistic in where it puts images, and usable."""

from __future__ import annotations

import hashlib
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from geohier import geodesy, grid, places
from geohier.errors import InputError
from geohier.workspace import Workspace
from pipeline import cli, demo

SIZE = 48


def _shas(ws) -> list[tuple[str, str]]:
    with ws.manifest() as m:
        df = m.frame(["source_id", "sha256"])
    return sorted(zip(df.source_id, df.sha256, strict=True))


@pytest.fixture(scope="module")
def world():
    return demo.sample_world(300, seed=7)


# ------------------------------------------------------------------- building


@pytest.mark.slow
def test_build_writes_rows_and_files(ws):
    calls = []
    summary = demo.build_demo(ws, images=40, seed=3, size=SIZE, workers=1, show_bar=False,
                              progress=lambda done, total: calls.append((done, total)))
    assert summary["added"] == 40 and summary["skipped"] == 0 and summary["requested"] == 40
    assert calls[-1] == (40, 40) and len(calls) == 40
    with ws.manifest() as m:
        df = m.frame()
    assert len(df) == 40
    assert set(df.source) == {"demo"}
    assert sorted(df.source_id) == sorted(f"demo-3-{i}" for i in range(40))
    assert df.sequence_id.notna().all() and df.sequence_id.str.startswith("demo-3-s").all()
    # Bursts: several images share a drive, and a drive's images are consecutive.
    assert 1 < df.sequence_id.nunique() < 40
    assert ((df.width == SIZE) & (df.height == SIZE)).all()
    assert df.brightness.between(0, 255).all()
    for when in df.captured_at:
        assert datetime.fromisoformat(when).year in range(2014, 2026)
    assert grid.valid_points(df.lat, df.lon).all()
    for path, sha in zip(df.path, df.sha256, strict=True):
        data = ws.resolve(path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha
        with Image.open(ws.resolve(path)) as img:
            assert img.format == "JPEG" and img.size == (SIZE, SIZE)
            img.load()


@pytest.mark.slow
def test_same_seed_same_bytes_and_rerun_adds_nothing(tmp_path):
    a = Workspace(tmp_path / "a", tmp_path / "am")
    b = Workspace(tmp_path / "b", tmp_path / "bm")
    demo.build_demo(a, images=25, seed=11, size=32, workers=1, show_bar=False)
    demo.build_demo(b, images=25, seed=11, size=32, workers=1, show_bar=False)
    assert _shas(a) == _shas(b)
    again = demo.build_demo(a, images=25, seed=11, size=32, workers=1, show_bar=False)
    assert again["added"] == 0 and again["skipped"] == 25
    # A larger build of the same seed keeps the first images and adds only the rest.
    more = demo.build_demo(a, images=30, seed=11, size=32, workers=1, show_bar=False)
    assert more["added"] == 5 and more["workspace_images"] == 30
    # Another seed is another set of images.
    other = demo.build_demo(a, images=10, seed=12, size=32, workers=1, show_bar=False)
    assert other["added"] == 10 and other["workspace_images"] == 40
    new = {sha for sid, sha in _shas(a) if sid.startswith("demo-12-")}
    assert len(new) == 10 and not new & {sha for _, sha in _shas(b)}


@pytest.mark.slow
def test_worker_processes_give_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(demo.build, "POOL_MIN_IMAGES", 1)  # the builder reads its own global
    one = Workspace(tmp_path / "one", tmp_path / "m1")
    two = Workspace(tmp_path / "two", tmp_path / "m2")
    demo.build_demo(one, images=12, seed=5, size=32, workers=1, show_bar=False)
    demo.build_demo(two, images=12, seed=5, size=32, workers=2, show_bar=False)
    assert _shas(one) == _shas(two)


@pytest.mark.parametrize("kwargs, match", [
    ({"images": 0}, "images must be between 1"),
    ({"images": -3}, "got -3"),
    ({"images": "5"}, "images must be an integer"),
    ({"size": 8}, "size must be between"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"workers": 0}, "workers must be >= 1"),
])
def test_bad_arguments_are_refused(ws, kwargs, match):
    with pytest.raises(InputError, match=match):
        demo.build_demo(ws, **{"images": 3, "size": 32, "show_bar": False, **kwargs})


# ------------------------------------------------------------------- the world


def test_world_is_deterministic_and_prefix_stable(world):
    again = demo.sample_world(300, seed=7)
    small = demo.sample_world(120, seed=7)
    for key in ("lat", "lon", "country", "drive", "captured_at"):
        assert np.array_equal(world[key], again[key])
        assert np.array_equal(world[key][:120], small[key])
    assert not np.array_equal(demo.sample_world(50, seed=8)["lat"], world["lat"][:50])


def test_locations_lie_near_real_places(world):
    lat, lon = world["lat"], world["lon"]
    assert grid.valid_points(lat, lon).all()
    p = places.places()
    city = world["city"]
    assert (p.population[city] >= demo.MIN_POPULATION).all()
    # Every image is within the jitter (2.5 sigma <= 30 km) plus a short drive of its city.
    d_city = geodesy.haversine_km(lat, lon, p.lat[city], p.lon[city])
    assert d_city.max() < 35
    assert np.array_equal(world["country"], p.country_code[city])
    # ... and on land: close to some GeoNames place.
    _, d_any = places.nearest(lat, lon)
    assert (d_any < 50).mean() > 0.9 and np.median(d_any) < demo.LAND_KM


def test_sequences_are_short_bursts(world):
    drives, counts = np.unique(world["drive"], return_counts=True)
    assert counts.max() <= 8 and 1 < counts.mean() < 8
    # One drive stays in a small area around one city.
    for d in drives[counts > 1][:10]:
        sel = world["drive"] == d
        assert len(set(world["city"][sel])) == 1
        span = geodesy.haversine_km(world["lat"][sel].min(), world["lon"][sel].min(),
                                 world["lat"][sel].max(), world["lon"][sel].max())
        assert span < 2.0


def test_world_is_imbalanced_like_street_level_data(world):
    imb = demo.imbalance(world["lat"], world["lon"], 5)
    assert imb["gini"] > 0.35
    assert imb["max_median"] >= 4
    # The northern hemisphere holds most images, as it does in real collections.
    l1 = np.bincount(grid.encode(world["lat"], world["lon"], 1), minlength=4)
    assert l1[:2].sum() > 0.6 * l1.sum()


def test_gini_known_values():
    # The world's statistics use the one gini, the Data page's (geohier.charts).
    from geohier.charts import gini

    assert gini([3, 3, 3]) == 0.0
    assert gini([0, 0, 0, 8]) == pytest.approx(0.75)
    assert gini([]) == 0.0


def test_climate_and_biomes_follow_geography():
    # Sahara, Amazon, Paris, Murmansk, Svalbard, Alice Springs
    names = demo.biome([23.0, -3.0, 48.8, 68.97, 78.2, -23.7], [10.0, -60.0, 2.3, 33.1, 15.6, 133.9])
    assert names.tolist() == ["desert", "tropical", "forest", "tundra", "snow", "desert"]
    w = demo.biome_weights([20.0, -10.0], [0.5, 0.3])
    assert np.allclose(w.sum(axis=1), 1.0)


# ------------------------------------------------------------------- styles and pixels


def test_country_styles_are_seeded_and_follow_driving_side():
    gb, fr, us = demo.country_style("GB"), demo.country_style("FR"), demo.country_style("US")
    assert gb == demo.country_style("gb")        # same code, same style
    assert gb.left_driving and not fr.left_driving and not us.left_driving
    assert demo.country_style("JP").left_driving and demo.country_style("AU").left_driving
    assert us.centre_color != fr.centre_color     # yellow vs white centre lines
    assert us.centre_pattern == "double"
    assert max(range(5), key=lambda i: us.sign_weights[i]) == demo.world.SIGN_SHAPES.index("diamond")
    assert gb.to_dict() != fr.to_dict()


def test_driving_side_moves_the_road_in_the_picture(world):
    gb, fr = demo.country_style("GB"), demo.country_style("FR")
    left, right = [], []
    for i in range(12):
        p = demo.scene_params(world, i)
        img_gb, lay_gb = demo.render_scene(p, gb, 32, 7, i)
        img_fr, lay_fr = demo.render_scene(p, fr, 32, 7, i)
        left.append(lay_gb["road_centre_x"])
        right.append(lay_fr["road_centre_x"])
        assert not np.array_equal(img_gb, img_fr)
    # Keeping left puts the centre line right of the camera, keeping right puts it left.
    assert min(left) > 16 > max(right)


def test_render_is_deterministic_and_varied(world):
    p = demo.scene_params(world, 0)
    style = demo.country_style(p["country"])
    a, _ = demo.render_scene(p, style, 40, 7, 0)
    b, _ = demo.render_scene(p, style, 40, 7, 0)
    c, _ = demo.render_scene(p, style, 40, 7, 1)
    assert a.shape == (40, 40, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Sky above (brighter, bluer), ground below.
    assert a[:8].mean() > 60 and a[:8, :, 2].mean() >= a[-8:, :, 2].mean() - 40


def _place_scene(p: dict, lat: float, lon: float) -> dict:
    """Scene ``p`` moved to another climate (same camera, light and style)."""
    c = demo.climate([lat], [lon])
    q = dict(p, lat=lat, lon=lon, temperature=float(c["temperature"][0]),
             moisture=float(c["moisture"][0]), relief=float(c["relief"][0]),
             temp_now=float(c["temperature"][0]), snow=0.0, green=1.0)
    q["biome_w"] = demo.biome_weights(c["temperature"], c["moisture"])[0]
    return q


def test_climate_shows_in_the_pixels(world):
    """The same rural shot has more sand-coloured ground in the Sahara than in the Amazon."""
    fr = demo.country_style("FR")
    wins = 0
    for i in range(20):
        p = dict(demo.scene_params(world, i), urban=0.0)
        sandy = []
        for lat, lon in ((23.0, 10.0), (-3.0, -60.0)):
            img, _ = demo.render_scene(_place_scene(p, lat, lon), fr, 32, 7, i)
            below = img[16:].astype(np.float32)          # the lower half: road and ground
            sandy.append(float(((below[..., 0] - below[..., 2]) > 40).mean()))
        wins += sandy[0] > sandy[1]
    assert wins >= 18


# ------------------------------------------------------------------- CLI


@pytest.fixture
def demo_only(monkeypatch):
    # The CLI with only this command, so the test does not depend on the others.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("pipeline.demo",))


def test_cli_builds_and_reports(ws, demo_only, capsys):
    rc = cli.main(["--data", str(ws.data_dir), "--models", str(ws.models_dir), "demo",
                   "--images", "6", "--seed", "2", "--size", "32", "--workers", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "added 6 images" in out and "Gini" in out
    with ws.manifest() as m:
        assert m.count("source = 'demo'") == 6
    rc = cli.main(["--data", str(ws.data_dir), "demo", "--images", "6", "--seed", "2", "--size", "32"])
    assert rc == 0 and "added 0 images, skipped 6" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--images", "0"], "argument --images: must be a positive integer, got '0'"),
    (["--images", "many"], "argument --images: must be a positive integer, got 'many'"),
    (["--size", "9"], "size must be between 32 and 512 px, got 9"),
    (["--seed", "-4"], "seed must be >= 0, got -4"),
])
def test_cli_rejects_bad_values(ws, demo_only, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        rc = cli.main(["--data", str(ws.data_dir), "demo", *argv])
        raise SystemExit(rc)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    with ws.manifest() as m:
        assert m.count() == 0
