"""geohier.images: every image a user can hand us comes out upright RGB, or is refused by name."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from PIL.TiffImagePlugin import IFDRational

from geohier import images
from geohier.errors import InputError
from geohier.exif import GPS_BROKEN, GPS_INVALID, GPS_MISSING, GPS_VOID
from geohier.images import (
    ImageReadError,
    brightness,
    image_info,
    inspect_gps,
    open_image,
    read_exif_time,
    read_gps,
)
from tests.conftest import jpeg_bytes


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise_jpeg(size=(96, 96)) -> bytes:
    rng = np.random.default_rng(0)
    return _encode(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)), "JPEG")


# ------------------------------------------------------------------ GPS and EXIF


@pytest.mark.parametrize("lat, lon", [
    (48.8584, 2.2945),      # Paris: N, E
    (-33.9249, 18.4241),    # Cape Town: S, E
    (40.7128, -74.0060),    # New York: N, W
    (-22.9068, -43.1729),   # Rio: S, W
])
def test_read_gps_signs_follow_hemisphere_refs(tmp_path, make_jpeg, lat, lon):
    path = make_jpeg(tmp_path / "a.jpg", gps=(lat, lon))
    got = read_gps(path)
    assert got == pytest.approx((lat, lon), abs=1e-4)
    assert read_gps(path.read_bytes()) == pytest.approx((lat, lon), abs=1e-4)
    assert read_gps(Image.open(path)) == pytest.approx((lat, lon), abs=1e-4)
    assert inspect_gps(path) == (got, None)


def test_read_gps_absent(tmp_path, make_jpeg):
    path = make_jpeg(tmp_path / "a.jpg")
    assert read_gps(path) is None
    assert inspect_gps(path) == (None, GPS_MISSING)


def _exif_jpeg(gps: dict | None = None, exif_ifd: dict | None = None, ifd0: dict | None = None) -> bytes:
    exif = Image.Exif()
    for k, v in (ifd0 or {}).items():
        exif[k] = v
    if gps is not None:
        exif[0x8825] = gps
    if exif_ifd is not None:
        exif[0x8769] = exif_ifd
    return _encode(Image.new("RGB", (16, 16)), "JPEG", exif=exif.tobytes())


def test_gps_broken_and_invalid_are_told_apart():
    good = (Fraction(10), Fraction(30), Fraction(0))
    bad_ref = _exif_jpeg({1: "X", 2: good, 3: "E", 4: good})
    assert inspect_gps(bad_ref) == (None, GPS_BROKEN)
    too_many_minutes = _exif_jpeg({1: "N", 2: (Fraction(10), Fraction(75), Fraction(0)), 3: "E", 4: good})
    assert inspect_gps(too_many_minutes) == (None, GPS_BROKEN)
    out_of_range = _exif_jpeg({1: "N", 2: (Fraction(95), Fraction(0), Fraction(0)), 3: "E", 4: good})
    assert inspect_gps(out_of_range) == (None, GPS_INVALID)
    null_island = _exif_jpeg({1: "N", 2: (Fraction(0), Fraction(0), Fraction(0)),
                              3: "E", 4: (Fraction(0), Fraction(0), Fraction(0))})
    assert inspect_gps(null_island) == (None, GPS_INVALID)
    no_lon_ref = _exif_jpeg({1: "N", 2: good, 4: good})  # west or east? unknown
    assert inspect_gps(no_lon_ref) == (None, GPS_BROKEN)
    zero_denominator = _exif_jpeg({1: "N", 2: (Fraction(10), IFDRational(30, 0), Fraction(0)), 3: "E", 4: good})
    assert inspect_gps(zero_denominator) == (None, GPS_BROKEN)
    void_fix = _exif_jpeg({1: "N", 2: good, 3: "E", 4: good, 9: "V"})
    assert inspect_gps(void_fix) == (None, GPS_VOID)
    for data in (bad_ref, too_many_minutes, out_of_range, null_island):
        assert read_gps(data) is None


def test_read_gps_of_non_image_is_none_but_inspect_refuses(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert read_gps(text) is None
    with pytest.raises(InputError, match="notes.txt"):
        inspect_gps(text)


def test_read_exif_time_with_offset_is_utc_and_without_is_local():
    with_offset = _exif_jpeg(exif_ifd={0x9003: "2021:06:01 14:30:00", 0x9011: "+02:00"})
    assert read_exif_time(with_offset) == "2021-06-01T12:30:00+00:00"
    local = _exif_jpeg(exif_ifd={0x9003: "2021:06:01 14:30:00"})
    assert read_exif_time(local) == "2021-06-01T14:30:00"
    ifd0_only = _exif_jpeg(ifd0={0x0132: "2020:01:02 03:04:05"})
    assert read_exif_time(ifd0_only) == "2020-01-02T03:04:05"
    gps_stamp = _exif_jpeg({29: "2019:12:31", 7: (Fraction(23), Fraction(59), Fraction(58))})
    assert read_exif_time(gps_stamp) == "2019-12-31T23:59:58+00:00"
    assert read_exif_time(_exif_jpeg(exif_ifd={0x9003: "garbage"})) is None
    assert read_exif_time(_exif_jpeg()) is None


# ------------------------------------------------------------------ orientation and size


def test_orientation_6_swaps_width_and_height_and_rotates(tmp_path, make_jpeg):
    # The fixture's left half is the inverted colour; orientation 6 means "rotate 90 deg
    # clockwise to display", so the left half ends on top.
    path = make_jpeg(tmp_path / "o.jpg", size=(64, 48), color=(20, 20, 20), orientation=6)
    img = open_image(path)
    assert img.size == (48, 64)
    top, bottom = img.getpixel((24, 8)), img.getpixel((24, 56))
    assert top[0] > 200 and bottom[0] < 60
    info = image_info(path)
    assert (info.width, info.height, info.orientation) == (48, 64, 6)


@pytest.mark.parametrize("fmt", ["TIFF", "WEBP", "PNG"])
def test_orientation_6_is_applied_once_in_every_format(tmp_path, make_jpeg, fmt):
    # Pillow's TIFF decoder turns the picture upright itself (and drops the tag): it must
    # not be turned a second time, and its displayed size must not be swapped twice.
    path = make_jpeg(tmp_path / f"o.{fmt.lower()}", size=(64, 48), color=(20, 20, 20), orientation=6, fmt=fmt)
    img = open_image(path)
    assert img.size == (48, 64)
    assert img.getpixel((24, 8))[0] > 200 and img.getpixel((24, 56))[0] < 60
    info = image_info(path)
    assert (info.width, info.height, info.orientation) == (48, 64, 6)


@pytest.mark.parametrize("orientation, size", [(1, (64, 48)), (3, (64, 48)), (8, (48, 64)), (5, (48, 64))])
def test_other_orientations(tmp_path, make_jpeg, orientation, size):
    path = make_jpeg(tmp_path / "o.jpg", size=(64, 48), orientation=orientation)
    assert open_image(path).size == size


def test_max_side_shrinks_while_decoding_and_keeps_aspect(tmp_path, make_jpeg, monkeypatch):
    from PIL import JpegImagePlugin

    decoded = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def spy_load(self):
        decoded.append(self.size)  # the size the decoder is about to produce
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy_load)
    path = make_jpeg(tmp_path / "big.jpg", size=(1600, 1200), orientation=6)
    img = open_image(path, max_side=200)
    assert img.size == (150, 200) and img.mode == "RGB"
    # JPEG draft: the decoder itself works at 1/8 scale (the smallest whose long side still
    # reaches 200, whatever the aspect); the 1600x1200 picture never exists.
    assert decoded and max(decoded) == (200, 150)
    assert open_image(path, max_side=5000).size == (1200, 1600)  # never enlarged


# ------------------------------------------------------------------ modes and formats


def test_modes_become_rgb():
    # CMYK: pure cyan ink is (0, 255, 255) in RGB.
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    for fmt in ("JPEG", "TIFF"):
        px = open_image(_encode(cmyk, fmt)).getpixel((4, 4))
        assert px[0] < 30 and px[1] > 225 and px[2] > 225, (fmt, px)
    # LA fully transparent -> white; half transparent black -> mid grey.
    assert open_image(_encode(Image.new("LA", (8, 8), (0, 0)), "PNG")).getpixel((1, 1)) == (255, 255, 255)
    half = open_image(_encode(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), "PNG")).getpixel((1, 1))
    assert all(120 <= c <= 135 for c in half)
    # Opaque RGBA keeps its colour.
    assert open_image(_encode(Image.new("RGBA", (8, 8), (10, 200, 30, 255)), "PNG")).getpixel((0, 0)) == (10, 200, 30)
    # P with a transparent palette index -> white there, colour elsewhere.
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, 4, 8))
    for fmt in ("PNG", "GIF"):
        img = open_image(_encode(pal, fmt, transparency=0))
        assert img.getpixel((1, 1)) == (255, 255, 255) and img.getpixel((6, 6)) == (200, 0, 0), fmt
    # P without transparency -> its palette colours.
    assert open_image(_encode(pal, "PNG")).getpixel((6, 6)) == (200, 0, 0)
    # 16-bit grey: full range scaled to 8 bits.
    arr16 = np.array([[0, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    img16 = Image.fromarray(arr16)
    assert img16.mode.startswith("I;16")
    out = open_image(_encode(img16, "PNG"))
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    # 32-bit int and float greys, bilevel, plain grey.
    i32 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert open_image(i32).getpixel((1, 0)) == (255, 255, 255)
    f32 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [open_image(f32).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    assert open_image(_encode(Image.new("1", (8, 8), 1), "PNG")).getpixel((0, 0)) == (255, 255, 255)
    assert open_image(_encode(Image.new("L", (8, 8), 77), "PNG")).getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_formats(fmt):
    data = _encode(Image.new("RGB", (40, 30), (200, 10, 10)), fmt)
    img = open_image(data)
    assert img.mode == "RGB" and img.size == (40, 30)
    r, g, b = img.getpixel((20, 15))
    assert r > 180 and g < 40 and b < 40
    assert image_info(data).ext == images.FORMAT_EXTENSIONS[fmt]


def test_sources_path_bytes_and_file_objects(tmp_path, make_jpeg):
    path = make_jpeg(tmp_path / "a.jpg")
    data = path.read_bytes()
    upload = io.BytesIO(data)
    upload.name = "upload.jpg"
    upload.read()  # Streamlit may hand us the object with its cursor at the end
    with open(path, "rb") as f:
        sizes = {open_image(s).size for s in (path, str(path), data, bytearray(data), upload, f)}
    assert sizes == {(64, 48)}
    with pytest.raises(InputError, match="upload.jpg"):
        bad = io.BytesIO(b"nope")
        bad.name = "upload.jpg"
        open_image(bad)


def test_a_pil_image_is_converted_not_mutated():
    src = Image.new("RGB", (400, 100), (1, 2, 3))
    out = open_image(src, max_side=100)
    assert out.size == (100, 25) and src.size == (400, 100) and out is not src


# ------------------------------------------------------------------ refusals


def _refused(src, reason, name):
    with pytest.raises(ImageReadError) as info:
        open_image(src)
    assert info.value.reason == reason
    assert name in str(info.value)
    assert isinstance(info.value, InputError)
    return str(info.value)


def test_zero_byte_file_refused(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "0 bytes" in _refused(path, images.READ_EMPTY, "empty.jpg")


def test_truncated_files_refused(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = _noise_jpeg()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) * 2 // 3])
    assert "truncated" in _refused(path, images.READ_TRUNCATED, "cut.jpg")
    with pytest.raises(ImageReadError, match="truncated"):
        open_image(Image.open(path))  # a caller's lazily opened image is decoded in full too
    png = _encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
    cut_png = tmp_path / "cut.png"
    cut_png.write_bytes(png[: len(png) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        open_image(cut_png)
    with pytest.raises(ImageReadError, match="cut.png"):
        image_info(cut_png)  # a decoding import sees it too


def test_not_an_image_refused(tmp_path):
    path = tmp_path / "readme.jpg"
    path.write_text("this is text, not a JPEG\n" * 10)
    assert "not an image" in _refused(path, images.READ_NOT_IMAGE, "readme.jpg")
    _refused(tmp_path, images.READ_NOT_IMAGE, str(tmp_path))  # a directory


def test_missing_file_refused(tmp_path):
    assert "no such file" in _refused(tmp_path / "gone.jpg", images.READ_MISSING, "gone.jpg")


def test_decompression_bomb_refused(tmp_path, make_jpeg, monkeypatch):
    path = make_jpeg(tmp_path / "bomb.jpg", size=(64, 48))  # 3,072 pixels
    with pytest.raises(ImageReadError) as info:
        open_image(path, max_pixels=1000)
    assert info.value.reason == images.READ_TOO_LARGE
    assert "bomb.jpg" in str(info.value) and "64x48" in str(info.value)
    # The module-wide limit applies by default; so does Pillow's own guard.
    monkeypatch.setattr(images, "MAX_PIXELS", 2000)
    with pytest.raises(ImageReadError, match="limit"):
        open_image(path)
    with pytest.raises(ImageReadError, match="bomb.jpg"):
        image_info(path, decode=False)
    monkeypatch.setattr(images, "MAX_PIXELS", 0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageReadError, match="bomb.jpg") as info:
        open_image(path)
    assert info.value.reason == images.READ_TOO_LARGE


def test_heic_without_pillow_heif_gets_a_hint(monkeypatch):
    monkeypatch.setattr(images, "_heif_state", False)
    fake = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    with pytest.raises(ImageReadError, match="pillow-heif"):
        open_image(fake)


def test_heic_photo_is_read(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    img = Image.new("RGB", (64, 48), (200, 30, 30))
    img.paste(Image.new("RGB", (32, 48), (30, 30, 200)), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the reader must turn it upright
    path = tmp_path / "iphone.heic"
    img.save(path, "HEIF", exif=exif.tobytes(), quality=95)
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (48, 64)
    assert image_info(path).ext == "heic"


# ------------------------------------------------------------------ brightness and info


def test_brightness():
    assert brightness(Image.new("RGB", (10, 10), (0, 0, 0))) == 0.0
    assert brightness(Image.new("L", (2000, 10), 200)) == pytest.approx(200.0)
    img = Image.new("L", (600, 600), 0)
    img.paste(255, (0, 0, 300, 600))
    assert brightness(img) == pytest.approx(127.5, abs=1.0)


def test_image_info_reads_everything_once(tmp_path):
    data = jpeg_bytes(size=(64, 48), color=(250, 250, 250), gps=(-33.9, 18.4), orientation=8)
    info = image_info(data)
    assert (info.format, info.ext, info.width, info.height) == ("JPEG", "jpg", 48, 64)
    assert info.gps == pytest.approx((-33.9, 18.4), abs=1e-4) and info.gps_problem is None
    assert 100 < info.brightness < 200  # half near-white, half near-black
    assert image_info(data, decode=False).brightness is None


# ------------------------------------------------------------------ odd files real tools make


def invalid_apng() -> bytes:
    """A 4x4 PNG with an animation chunk (acTL) that claims 0 frames, inserted after its
    IHDR: Pillow warns "Invalid APNG" and reads the default image."""
    return (Path(__file__).parent / "data" / "invalid_apng.png").read_bytes()


def test_exif_without_image_data_has_its_own_reason():
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (Fraction(40), Fraction(46), Fraction(13)), 3: "W",
                    4: (Fraction(111), Fraction(53), Fraction(28))}
    data = _encode(Image.new("RGB", (16, 16)), "JPEG", exif=exif.tobytes())
    app1 = data.index(b"Exif\x00\x00") - 4
    head = data[: app1 + 2 + int.from_bytes(data[app1 + 2:app1 + 4], "big")]  # SOI + APP1 only
    assert "no image data" in _refused(images.NamedBytes(head, "head.jpg"), images.READ_NO_IMAGE_DATA, "head.jpg")
    with pytest.raises(ImageReadError) as info:
        image_info(head, decode=False)
    assert info.value.reason == images.READ_NO_IMAGE_DATA
    plain = _encode(Image.new("RGB", (16, 16)), "JPEG")
    assert "JPEG header" in _refused(images.NamedBytes(plain[:40], "cut.jpg"), images.READ_TRUNCATED, "cut.jpg")


def test_camera_raw_files_are_named_as_such(tmp_path):
    rw2 = tmp_path / "P1000001.RW2"
    rw2.write_bytes(b"IIU\x00\x08\x00\x00\x00" + bytes(200))
    message = _refused(rw2, images.READ_RAW, "P1000001.RW2")
    assert "Panasonic RW2" in message and "export it as JPEG" in message
    nef = tmp_path / "DSC_0001.NEF"
    nef.write_bytes(b"\x00\x01garbage" * 20)
    assert "(NEF)" in _refused(nef, images.READ_RAW, "DSC_0001.NEF")
    jpeg_named_nef = tmp_path / "preview.nef"  # content decides: a JPEG is a JPEG
    jpeg_named_nef.write_bytes(_noise_jpeg((8, 8)))
    assert open_image(jpeg_named_nef).size == (8, 8)
    assert images.raw_format(b"\xff\xd8\xff\xe0", "a.jpg") is None


def test_library_warnings_are_collected_not_printed(recwarn):
    with images.collect_warnings() as seen:
        img = open_image(images.NamedBytes(invalid_apng(), "anim.png"))
    assert img.size == (4, 4)
    assert seen == ["UserWarning: Invalid APNG, will use default PNG image if possible"]
    assert len(recwarn) == 0  # nothing escaped to the warnings machinery
    with images.collect_warnings() as again:
        open_image(invalid_apng())
        open_image(invalid_apng())
    assert len(again) == 2  # every file counts, not only the first in the process


@pytest.mark.slow
def test_doctests():
    import doctest

    result = doctest.testmod(images)
    assert result.failed == 0 and result.attempted >= 10


# ------------------------------------------------------------------ memory: bombs, budget, slots


def _png_bomb(path: Path, mode: str, size: tuple[int, int], pixel: bytes) -> Path:
    """A one-colour PNG of ``size`` (mode I;16, RGB or RGBA), streamed row by row through
    zlib: a few hundred KB on disk for a 9999x9999 picture, never held whole here."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    color_type, depth = {"I;16": (0, 16), "RGB": (2, 8), "RGBA": (6, 8)}[mode]
    w, h = size
    row, comp = b"\x00" + pixel * w, zlib.compressobj(9)
    idat = b"".join([comp.compress(row) for _ in range(h)] + [comp.flush()])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _jpeg_bomb(claim=(9000, 9000)) -> bytes:
    """A 16x16 grey JPEG whose frame header claims ``claim``: libjpeg pads the rows it
    lacks with grey, so a full decode is the whole claimed size."""
    import struct

    data = bytearray(_encode(Image.new("RGB", (16, 16), (128, 128, 128)), "JPEG", quality=75))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", claim[1], claim[0])
    return bytes(data)


@pytest.mark.slow
def test_16bit_grey_png_bomb_decodes_reduced_with_its_aspect(tmp_path):
    path = _png_bomb(tmp_path / "grey16.png", "I;16", (9999, 9999), b"\x80\x80")  # 32896 = 128 * 257
    assert path.stat().st_size < 1_000_000
    img = open_image(path, max_side=256)
    assert img.mode == "RGB" and img.size == (256, 256)
    assert img.getpixel((0, 0)) == img.getpixel((255, 255)) == (128, 128, 128)
    wide = open_image(_png_bomb(tmp_path / "wide16.png", "I;16", (9999, 3000), b"\x80\x80"), max_side=300)
    assert wide.size[0] == 300 and abs(wide.size[1] - 300 * 3000 / 9999) <= 1


@pytest.mark.parametrize("mode, pixel, rgb", [("RGBA", b"\x20\x80\xc0\xff", (32, 128, 192)),
                                              ("RGBA", b"\x00\x00\x00\x00", (255, 255, 255)),
                                              ("RGB", b"\x20\x80\xc0", (32, 128, 192))])
def test_big_colour_pngs_decode_reduced_with_the_right_colour(tmp_path, mode, pixel, rgb):
    img = open_image(_png_bomb(tmp_path / "big.png", mode, (3000, 1500), pixel), max_side=200)
    assert img.size == (200, 100) and img.getpixel((7, 7)) == rgb


def test_truncated_jpeg_claiming_9000x9000_decodes_in_draft_mode(monkeypatch):
    from PIL import JpegImagePlugin

    bomb = _jpeg_bomb()
    assert len(bomb) < 1000
    decoded = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def spy_load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy_load)
    img = open_image(images.NamedBytes(bomb, "bomb.jpg"), max_side=1024)
    assert img.size == (1024, 1024) and img.mode == "RGB"
    assert set(decoded) == {(1125, 1125)}  # 1/8 scale: 5 MB, not 324 MB of grey padding


@pytest.mark.slow
def test_byte_budget_and_pixel_guard_refuse_with_one_line(tmp_path):
    rgba = _png_bomb(tmp_path / "rgba.png", "RGBA", (2000, 1000), b"\x20\x80\xc0\xff")
    with pytest.raises(ImageReadError) as info:
        open_image(rgba, max_bytes=5_000_000)
    msg = str(info.value)
    assert info.value.reason == images.READ_TOO_LARGE and "\n" not in msg
    assert msg == f"{rgba} would take 8 MB to decode (2000x1000 RGBA), over the 5 MB budget for one image"
    # The budget counts bytes per pixel: the same size in 16-bit grey takes half.
    grey = _png_bomb(tmp_path / "grey.png", "I;16", (2000, 1000), b"\x00\x10")
    assert open_image(grey, max_bytes=5_000_000, max_side=100).size == (100, 50)
    # JPEG is budgeted at the scale it decodes at: 9000x9000 drafted to 1/8 fits 6 MB.
    bomb = images.NamedBytes(_jpeg_bomb(), "bomb.jpg")
    assert open_image(bomb, max_side=1024, max_bytes=6_000_000).size == (1024, 1024)
    with pytest.raises(ImageReadError, match=r"^bomb.jpg would take 324 MB to decode \(9000x9000 RGB\)"):
        open_image(bomb, max_bytes=6_000_000)
    # Above 100 MP the pixel guard refuses first, from the header alone (no IDAT needed).
    huge = _png_bomb(tmp_path / "huge.png", "I;16", (10001, 10000), b"\x00\x00")
    with pytest.raises(ImageReadError) as info:
        open_image(huge, max_side=256)
    assert info.value.reason == images.READ_TOO_LARGE and "\n" not in str(info.value)
    assert "10001x10000 = 100.0 MP, over the 100 MP limit" in str(info.value)


def test_orientation_is_kept_when_reducing(tmp_path, make_jpeg):
    for fmt in ("PNG", "JPEG", "WEBP"):
        path = make_jpeg(tmp_path / f"turned.{fmt.lower()}", size=(800, 400), color=(200, 60, 60),
                         orientation=6, fmt=fmt)
        img = open_image(path, max_side=100)
        assert img.size == (50, 100), fmt
        # jpeg_bytes paints the left half inverted; orientation 6 puts it at the top.
        top, bottom = img.getpixel((25, 10)), img.getpixel((25, 90))
        assert top[0] < 100 and bottom[0] > 150, (fmt, top, bottom)


def test_modes_become_the_right_rgb_after_reducing():
    size, side = (64, 32), 16
    cmyk = Image.new("CMYK", size, (255, 0, 0, 0))
    for fmt in ("JPEG", "TIFF"):
        img = open_image(_encode(cmyk, fmt), max_side=side)
        px = img.getpixel((4, 4))
        assert img.size == (16, 8) and px[0] < 30 and px[1] > 225 and px[2] > 225, (fmt, px)
    i16 = Image.fromarray(np.full((32, 64), 32896, dtype=np.uint16))
    assert open_image(_encode(i16, "PNG"), max_side=side).getpixel((3, 3)) == (128, 128, 128)
    small16 = Image.fromarray(np.full((32, 64), 77, dtype=np.uint16))  # values within 0-255 stay
    assert open_image(_encode(small16, "PNG"), max_side=side).getpixel((3, 3)) == (77, 77, 77)
    half = open_image(_encode(Image.new("RGBA", size, (0, 0, 0, 128)), "PNG"), max_side=side).getpixel((1, 1))
    assert all(120 <= c <= 135 for c in half)
    assert open_image(_encode(Image.new("RGBA", size, (10, 200, 30, 255)), "PNG"),
                      max_side=side).getpixel((0, 0)) == (10, 200, 30)
    assert open_image(_encode(Image.new("LA", size, (0, 0)), "PNG"), max_side=side).getpixel((1, 1)) == (255, 255, 255)
    assert open_image(_encode(Image.new("LA", size, (60, 255)), "PNG"), max_side=side).getpixel((1, 1)) == (60, 60, 60)
    # P: indexes are never averaged; a transparent index is white, the others their colour.
    pal = Image.new("P", size, 1)
    pal.putpalette([0, 0, 0, 200, 0, 0, 0, 0, 250] + [0] * 759)
    pal.paste(0, (0, 0, 32, 32))
    pal.paste(2, (48, 0, 64, 32))
    for fmt in ("PNG", "GIF"):
        img = open_image(_encode(pal, fmt, transparency=0), max_side=side)
        assert [img.getpixel((x, 4)) for x in (2, 10, 14)] == [(255, 255, 255), (200, 0, 0), (0, 0, 250)], fmt
    img = open_image(_encode(pal, "PNG"), max_side=side)
    assert [img.getpixel((x, 4)) for x in (2, 10, 14)] == [(0, 0, 0), (200, 0, 0), (0, 0, 250)]
    # Colour-keyed L and RGB: the key stays transparent (white), the rest keeps its value.
    grey = Image.new("L", size, 90)
    grey.paste(0, (0, 0, 32, 32))
    img = open_image(_encode(grey, "PNG", transparency=0), max_side=side)
    assert img.getpixel((2, 4)) == (255, 255, 255) and img.getpixel((12, 4)) == (90, 90, 90)
    assert open_image(_encode(Image.new("1", size, 1), "PNG"), max_side=side).getpixel((3, 3)) == (255, 255, 255)


def test_reduce_native_keeps_the_mode_and_makes_no_palette_averages():
    assert images.reduce_native(Image.new("RGB", (100, 50)), 100).size == (100, 50)  # small: itself
    out = images.reduce_native(Image.new("I;16", (1000, 300), 1000), 100)
    assert out.mode == "I" and out.size == (100, 30) and out.getpixel((5, 5)) == 1000
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    assert images.reduce_native(pal, 10).getpixel((0, 0)) == (200, 0, 0)
    rgba = images.reduce_native(Image.new("RGBA", (3000, 30), (10, 20, 30, 255)), 100, band_bytes=1)
    assert rgba.mode == "RGBA" and rgba.size == (100, 1) and rgba.getpixel((99, 0)) == (10, 20, 30, 255)


def test_consumers_decode_no_bigger_than_they_need(tmp_path):
    from geohier.dataset import _open_image
    from geohier.presets import EvalPreset, TrainPreset

    assert images.decode_side_for(EvalPreset(224)) == 1024
    assert images.decode_side_for(EvalPreset(256, resize_size=300)) == 1200
    assert images.decode_side_for(TrainPreset(512)) == 2048
    assert images.decode_side_for(lambda img: img) == images.DEFAULT_DECODE_SIDE
    path = _png_bomb(tmp_path / "big.png", "RGB", (3000, 1000), b"\x20\x80\xc0")
    assert _open_image(path, EvalPreset(32)).size == (1024, 341)


def test_decode_slots_bound_concurrent_decodes(monkeypatch):
    import threading

    monkeypatch.setattr(images, "_slots", threading.BoundedSemaphore(1))
    with images.decode_slot():
        with pytest.raises(images.DecodeBusyError, match="busy") as info:
            with images.decode_slot(timeout=0.01):
                pass
        assert info.value.reason == images.READ_BUSY and isinstance(info.value, InputError)
    with images.decode_slot(timeout=0):  # released: free again
        pass
    # A waiting decode gets the slot as soon as the holder is done.
    got = []

    def wait_for_a_slot():
        with images.decode_slot(timeout=30):
            got.append("decoded")

    with images.decode_slot():
        t = threading.Thread(target=wait_for_a_slot)
        t.start()
        t.join(0.05)
        assert not got
    t.join(30)
    assert got == ["decoded"]


def test_full_size_conversion_goes_by_bands_with_one_grey_scale(monkeypatch):
    monkeypatch.setattr(images, "_BAND_BYTES", 4 * 64 * 4)  # 4 rows of 64 px per band
    arr = np.full((32, 64), 200, dtype=np.uint16)
    arr[16:] = 65535  # the lower bands alone would say "16-bit", the upper ones "8-bit"
    out = open_image(_encode(Image.fromarray(arr), "PNG"))
    assert out.size == (64, 32) and out.getpixel((0, 0)) == (1, 1, 1) and out.getpixel((0, 31)) == (255, 255, 255)
    rgba = Image.new("RGBA", (64, 32), (0, 0, 0, 0))
    rgba.paste((10, 200, 30, 255), (0, 16, 64, 32))
    out = open_image(_encode(rgba, "PNG"))
    assert out.getpixel((5, 3)) == (255, 255, 255) and out.getpixel((5, 30)) == (10, 200, 30)
    pal = Image.new("P", (64, 32), 1)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, 64, 8))
    out = open_image(_encode(pal, "PNG", transparency=0))
    assert out.getpixel((5, 3)) == (255, 255, 255) and out.getpixel((5, 30)) == (200, 0, 0)


@pytest.mark.slow
def test_predict_page_says_busy_when_every_decode_slot_is_taken(ws, monkeypatch):
    """N sessions uploading at once wait for one of DECODE_SLOTS decodes; past the wait the
    upload says "busy" in one line (not cached: the next rerun decodes it)."""
    import threading

    from streamlit.testing.v1 import AppTest

    from tests.conftest import ROOT
    from tests.test_predictor import make_tiny_run, tiny_hierarchy

    make_tiny_run(ws.models_dir / "tiny", tiny_hierarchy())
    slots = threading.BoundedSemaphore(1)
    monkeypatch.setattr(images, "_slots", slots)
    monkeypatch.setattr(images, "DECODE_WAIT_S", 0.05)
    at = AppTest.from_file(str(ROOT / "views" / "predict.py"), default_timeout=120).run()
    photo = ("busy.jpg", jpeg_bytes(size=(72, 40), color=(11, 171, 91)), "image/jpeg")
    slots.acquire()  # another session is decoding
    try:
        at.file_uploader(key="predict_upload").set_value([photo]).run()
    finally:
        slots.release()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("busy.jpg: the server is busy") and "\n" not in errors[0]
    at.run()  # the slot is free again: the same upload is decoded now
    assert not at.exception and not at.error
    assert "Best guess" in {m.label for m in at.metric}
