"""Real camera files (../shared/realfiles, copied from photo tools' test suites): the GPS
every geotagged phone and camera file carries, upright pictures for every EXIF orientation
the folder holds, and the right reason for each file an import cannot use.

The folder lives next to the repository, outside it (its licences are its sources'); every
test here is skipped, saying so, when it is absent. Faults the folder has no real example of
(a zero denominator, a missing reference, a void fix) are injected into a real file's EXIF
bytes in place, so that Pillow's parsing of real camera EXIF is what is tested.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.cli
from geohier import exif, images
from geohier.images import ImageReadError, image_info, inspect_gps, open_image
from pipeline.ingest import import_photos

REALFILES = Path(__file__).resolve().parents[1].parent / "shared" / "realfiles"
GPS_DIR, ODD_DIR = REALFILES / "gps", REALFILES / "odd"

pytestmark = pytest.mark.skipif(not GPS_DIR.is_dir() or not ODD_DIR.is_dir(),
                                reason=f"real camera files not present ({REALFILES})")

# Every file of gps/ and its position, read by Pillow and checked against an independent
# reading of the raw EXIF rationals (degrees + minutes / 60 + seconds / 3600, signed by the
# references); places agree with the file names (Rome, Paris, Milan, Lund, Rennes, ...).
KNOWN_GPS = {
    "LycheeOrg+Lychee__mongolia.jpeg": (46.898392, 102.768631),
    "drewnoakes+metadata-extractor-images__Apple iPhone 4.jpg": (41.853000, 12.488833),
    "drewnoakes+metadata-extractor-images__FujiFilm FinePixS1Pro (1).jpg": (54.989667, -1.914167),
    "drewnoakes+metadata-extractor-images__FujiFilm FinePixS1Pro (2).jpg": (51.846667, -3.337833),
    "drewnoakes+metadata-extractor-images__FujiFilm FinePixS1Pro (3).jpg": (55.104833, -1.884500),
    "drewnoakes+metadata-extractor-images__FujiFilm FinePixS1Pro (4).jpg": (54.913500, -1.588833),
    "drewnoakes+metadata-extractor-images__FujiFilm FinePixS1Pro (5).jpg": (50.723167, -1.962833),
    "drewnoakes+metadata-extractor-images__FujiFilm FinePixS2Pro.jpg": (48.857833, 2.297000),
    "drewnoakes+metadata-extractor-images__HTC Desire.jpg": (45.500667, 9.110333),
    "drewnoakes+metadata-extractor-images__HTC Desire.webp": (45.500667, 9.110333),
    "drewnoakes+metadata-extractor-images__Issue 173 (dotnet).jpg": (43.687394, -85.483519),
    "drewnoakes+metadata-extractor-images__Issue 508.jpg": (43.859469, 15.503283),
    "drewnoakes+metadata-extractor-images__Sony DSC-HX5V (2).jpg": (51.778615, 8.365638),
    "immich-app+test-assets__datetimeoriginal-gps.jpg": (39.000000, -108.000000),
    "immich-app+test-assets__gps-datetime.jpg": (37.774900, -122.419400),
    "immich-app+test-assets__thompson-springs.jpg": (39.115000, -108.400968),
    "mapillary+OpenSfM__04.jpg": (55.698278, 13.195119),
    "mapillary+OpenSfM__05.jpg": (55.698303, 13.195097),
    "mapillary+OpenSfM__06.jpg": (55.698342, 13.195144),
    "mapillary+OpenSfM__07.jpg": (55.698411, 13.195081),
    "mapillary+OpenSfM__08.jpg": (55.698475, 13.195044),
    "mapillary+OpenSfM__09.jpg": (55.698539, 13.195056),
    "mapillary+OpenSfM__10.jpg": (55.698575, 13.195050),
    "mapillary+OpenSfM__11.jpg": (55.698611, 13.195014),
    "mapillary+OpenSfM__12.jpg": (55.698625, 13.194953),
    "mapillary+OpenSfM__13.jpg": (55.698672, 13.194942),
    "mapillary+OpenSfM__14.jpg": (55.698733, 13.194919),
    "mapillary+OpenSfM__15.jpg": (55.698819, 13.194992),
    "mapillary+OpenSfM__16.jpg": (55.698958, 13.194931),
    "mapillary+OpenSfM__17.jpg": (55.699000, 13.194817),
    "mapillary+OpenSfM__18.jpg": (55.699039, 13.194731),
    "mapillary+OpenSfM__19.jpg": (55.699092, 13.194697),
    "mapillary+OpenSfM__20.jpg": (55.699161, 13.194700),
    "mapillary+OpenSfM__21.jpg": (55.699211, 13.194678),
    "mapillary+OpenSfM__22.jpg": (55.699239, 13.194619),
    "mapillary+OpenSfM__23.jpg": (55.699364, 13.194600),
    "mapillary+OpenSfM__24.jpg": (55.699458, 13.194550),
    "mapillary+OpenSfM__25.jpg": (55.699561, 13.194525),
    "mapillary+OpenSfM__26.jpg": (55.699661, 13.194497),
    "mapillary+OpenSfM__27.jpg": (55.699708, 13.194522),
    "mapillary+OpenSfM__28.jpg": (55.699708, 13.194522),
    "mapillary+OpenSfM__29.jpg": (55.699708, 13.194522),
    "mapillary+mapillary_tools__corrupt_exif.jpg": (48.081045, -1.667841),
    "mapillary+mapillary_tools__corrupt_exif_2.jpg": (48.081045, -1.667841),
    "mapillary+mapillary_tools__fixed_exif.jpg": (48.081045, -1.667841),
    "mapillary+mapillary_tools__fixed_exif_2.jpg": (48.081045, -1.667841),
    "photoprism+photoprism__DisplayP3.jpg": (65.055578, -16.625703),
    "photoprism+photoprism__IMG_4120 copy.JPG": (50.047744, 8.572356),
    "photoprism+photoprism__IMG_4120.JPG": (50.047744, 8.572356),
    "photoprism+photoprism__image.jpg": (-34.021358, 23.899375),
    "photoprism+photoprism__this-is-a-jpeg.png": (-34.021358, 23.899375),
    "photoview+photoview__bird.jpg": (65.016814, 25.466864),
    "photoview+photoview__no_timezone.jpg": (65.016814, 25.466864),
    "python-pillow+Pillow__ifd_tag_type.tiff": (35.599999, -111.661827),
}


def _name(path: Path) -> str:
    return path.name.split("__", 1)[1]


def _odd(name: str) -> Path:
    matches = [p for p in ODD_DIR.iterdir() if _name(p) == name]
    assert len(matches) == 1, f"{name} not in {ODD_DIR}"
    return matches[0]


# ------------------------------------------------------------------ GPS of real photos


def test_every_geotagged_file_is_pinned():
    assert sorted(p.name for p in GPS_DIR.iterdir()) == sorted(KNOWN_GPS)


@pytest.mark.parametrize("name", sorted(KNOWN_GPS))
def test_geotagged_file_gives_its_known_position(name):
    info = image_info(GPS_DIR / name, decode=False)
    assert info.gps_problem is None
    assert info.gps == pytest.approx(KNOWN_GPS[name], abs=1e-6)


def test_phone_camera_tiff_and_webp_files_decode(recwarn):
    for name in ("drewnoakes+metadata-extractor-images__Apple iPhone 4.jpg",
                 "drewnoakes+metadata-extractor-images__HTC Desire.webp",
                 "python-pillow+Pillow__ifd_tag_type.tiff",
                 "photoprism+photoprism__this-is-a-jpeg.png"):  # a JPEG named .png: content decides
        info = image_info(GPS_DIR / name)
        img = open_image(GPS_DIR / name, max_side=128)
        assert img.mode == "RGB" and max(img.size) == min(128, max(info.width, info.height))
        assert 0 < info.brightness < 255
    assert image_info(GPS_DIR / "python-pillow+Pillow__ifd_tag_type.tiff").format == "TIFF"
    assert image_info(GPS_DIR / "drewnoakes+metadata-extractor-images__HTC Desire.webp").ext == "webp"
    assert len(recwarn) == 0


# ------------------------------------------------------------------ orientation


def _similarity(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute grey difference (0 = identical) of two pictures scaled to 32x32."""
    grey = [np.asarray(x.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
            for x in (a, b)]
    return float(np.abs(grey[0] - grey[1]).mean())


@pytest.mark.parametrize("reference, rotated", [
    ("Landscape_0.jpg", "Landscape_6.jpg"),   # orientation 0 (invalid) reads as 1
    ("Portrait_0.jpg", "Portrait_6.jpg"),
    ("Portrait_0.jpg", "Portrait_8.jpg"),
])
def test_rotated_photo_comes_out_like_its_reference(reference, rotated):
    # recurser's set: the same picture stored turned and tagged 6 or 8, and stored upright.
    ref = open_image(_odd_recurser(reference), max_side=256)
    got = open_image(_odd_recurser(rotated), max_side=256)
    assert got.size == ref.size
    assert _similarity(got, ref) < 8
    for wrong in (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270):
        assert _similarity(got.transpose(wrong), ref) > 2 * _similarity(got, ref) + 8


def _odd_recurser(name: str) -> Path:
    return ODD_DIR / f"recurser+exif-orientation-examples__{name}"


@pytest.mark.parametrize("names, orientations", [
    (["python-pillow+Pillow__hopper_orientation_3.webp", "python-pillow+Pillow__hopper_orientation_6.webp",
      "python-pillow+Pillow__hopper_orientation_8.webp"], [3, 6, 8]),
    (["python-pillow+Pillow__rot0mir1.avif", "python-pillow+Pillow__rot2mir0.avif",
      "python-pillow+Pillow__rot2mir1.avif"], [2, 2, 4]),        # HEIF irot/imir boxes
    (["python-pillow+Pillow__xmp_tags_orientation.png", "python-pillow+Pillow__xmp_tags_orientation.avif"],
     [3, 3]),                                                     # orientation in XMP, not EXIF
    (["photoview+photoview__up_arrow_90cw_web.jpg", "photoview+photoview__up_arrow_90cw_nonweb.tiff"], [6, 6]),
])
def test_one_picture_stored_several_ways_comes_out_the_same(names, orientations):
    assert [image_info(ODD_DIR / n, decode=False).orientation for n in names] == orientations
    pictures = [open_image(ODD_DIR / n, max_side=256) for n in names]
    assert len({p.size for p in pictures}) == 1
    for other in pictures[1:]:
        assert _similarity(other, pictures[0]) < 10


@pytest.mark.parametrize("name", ["photoview+photoview__up_arrow_90cw_web.jpg",
                                  "photoview+photoview__up_arrow_90cw_nonweb.tiff"])
def test_arrow_points_up(name):
    # An up arrow stored turned 90 degrees (orientation 6): upright, its wide head is on
    # top and its thin shaft below. Pillow's TIFF decoder turns it itself: once, not twice.
    img = np.asarray(open_image(ODD_DIR / name).convert("L")) < 128  # (H, W) dark pixels
    assert img.shape == (400, 280)
    cols = np.arange(img.shape[1])
    span = np.where(img.any(axis=1), np.where(img, cols, -1).max(axis=1) - np.where(img, cols, 10**6).min(axis=1), 0)
    half = img.shape[0] // 2
    assert span[:half].max() > 1.5 * span[half:].max()  # the widest rows (the head) are on top
    info = image_info(ODD_DIR / name, decode=False)
    assert (info.width, info.height) == (280, 400)


def test_displayed_size_matches_the_decoded_picture():
    checked = 0
    for path in sorted(ODD_DIR.iterdir()):
        try:
            info = image_info(path, decode=False)
        except ImageReadError:
            continue
        if info.orientation == 1 or info.width * info.height > 4_000_000:
            continue
        assert open_image(path).size == (info.width, info.height), path.name
        checked += 1
    assert checked >= 20
    assert open_image(_odd("orientation_rectangle.jpg")).size == (1, 2)  # stored 2x1, tagged 8


# ------------------------------------------------------------------ files an import cannot use


def _refusal(path_or_bytes, name: str = "file") -> ImageReadError:
    src = path_or_bytes if isinstance(path_or_bytes, Path) else images.NamedBytes(path_or_bytes, name)
    with pytest.raises(ImageReadError) as info:
        open_image(src)
    return info.value


def test_exif_without_image_data():
    heads = sorted(p for p in ODD_DIR.iterdir() if p.name.startswith("rwcarlsen+goexif__"))
    assert len(heads) >= 40
    for path in heads:
        err = _refusal(path)
        assert err.reason == images.READ_NO_IMAGE_DATA, path.name
        assert path.name in str(err) and "no image data" in str(err)


def test_raw_empty_and_non_image_files_get_their_reasons():
    rw2 = _refusal(_odd("Issue 419.rw2"))
    assert rw2.reason == images.READ_RAW and "Panasonic RW2" in str(rw2)
    assert _refusal(_odd("notjpeg.jpg")).reason == images.READ_EMPTY
    for name in ("sample.gpx", "sf_30km_h.gpx", "NegativeArraySizeException.HeifReader.processBoxes.heif",
                 "NegativeArraySizeException.ItemInfoBox.init.heif", "beach.jpg"):
        assert _refusal(_odd(name)).reason == images.READ_NOT_IMAGE, name
    for n in range(1, 5):  # metadata-extractor's "NEF" files hold JPEG data: content decides
        info = image_info(_odd(f"Issue 247-{n}.nef"), decode=False)
        assert (info.format, info.gps_problem) == ("JPEG", exif.GPS_MISSING)


def test_truncated_real_photos():
    data = (GPS_DIR / "drewnoakes+metadata-extractor-images__Sony DSC-HX5V (2).jpg").read_bytes()
    cut = _refusal(data[: len(data) * 2 // 3], "sony.jpg")
    assert cut.reason == images.READ_TRUNCATED and "sony.jpg" in str(cut)
    start, end = _exif_segment(data)
    assert _refusal(data[:end], "head.jpg").reason == images.READ_NO_IMAGE_DATA
    assert _refusal(data[:start + 6], "stub.jpg").reason == images.READ_TRUNCATED  # cut inside a segment


# ------------------------------------------------------------------ GPS faults in real EXIF bytes


def _exif_segment(jpeg: bytes) -> tuple[int, int]:
    """(start, end) of a JPEG's EXIF APP1 segment, marker included."""
    i = 2
    while i + 4 <= len(jpeg):
        length = struct.unpack(">H", jpeg[i + 2:i + 4])[0]
        if jpeg[i + 1] == 0xE1 and jpeg[i + 4:i + 10] == b"Exif\x00\x00":
            return i, i + 2 + length
        i += 2 + length
    raise AssertionError("no EXIF segment")


def _graft(base: bytes, donor: bytes) -> bytes:
    """``base``'s picture with ``donor``'s EXIF segment in place of its own."""
    b0, b1 = _exif_segment(base)
    d0, d1 = _exif_segment(donor)
    return base[:b0] + donor[d0:d1] + base[b1:]


def _gps_entries(jpeg: bytes) -> tuple[dict[int, tuple[int, int]], int, str]:
    """GPS IFD entries of a JPEG: tag -> (absolute offset of the 12-byte entry, absolute
    offset of its value or value field), plus the TIFF start and byte order."""
    tiff = _exif_segment(jpeg)[0] + 10
    e = "<" if jpeg[tiff:tiff + 2] == b"II" else ">"

    def entries(ifd: int) -> dict[int, tuple[int, int]]:
        count = struct.unpack(e + "H", jpeg[tiff + ifd:tiff + ifd + 2])[0]
        out = {}
        for k in range(count):
            pos = tiff + ifd + 2 + 12 * k
            tag, typ, n, value = struct.unpack(e + "HHII", jpeg[pos:pos + 12])
            inline = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 7: 1}.get(typ, 8) * n <= 4
            out[tag] = (pos, pos + 8 if inline else tiff + value)
        return out

    ifd0 = struct.unpack(e + "I", jpeg[tiff + 4:tiff + 8])[0]
    gps_ifd = struct.unpack(e + "I", jpeg[entries(ifd0)[0x8825][0] + 8:][:4])[0]
    return entries(gps_ifd), tiff, e


def _patched(jpeg: bytes, offset: int, new: bytes) -> bytes:
    return jpeg[:offset] + new + jpeg[offset + len(new):]


IPHONE = "drewnoakes+metadata-extractor-images__Apple iPhone 4.jpg"
SONY = "drewnoakes+metadata-extractor-images__Sony DSC-HX5V (2).jpg"  # has GPSStatus 'A'


def test_injected_faults_in_real_gps_blocks():
    data = (GPS_DIR / IPHONE).read_bytes()
    assert inspect_gps(data) == (pytest.approx(KNOWN_GPS[IPHONE], abs=1e-6), None)
    gps, _, e = _gps_entries(data)
    minutes_den = gps[2][1] + 12  # latitude = 3 rationals of (num, den); den of the minutes
    zero = _patched(data, minutes_den, struct.pack(e + "I", 0))
    assert inspect_gps(zero) == (None, exif.GPS_BROKEN)
    no_ref = _patched(data, gps[3][0], struct.pack(e + "H", 0x7FFF))  # GPSLongitudeRef renamed away
    assert inspect_gps(no_ref) == (None, exif.GPS_BROKEN)

    sony = (GPS_DIR / SONY).read_bytes()
    sgps, _, _ = _gps_entries(sony)
    assert sony[sgps[9][1]:sgps[9][1] + 1] == b"A"
    void = _patched(sony, sgps[9][1], b"V")
    assert inspect_gps(void) == (None, exif.GPS_VOID)
    assert open_image(void).size == open_image(sony).size  # the picture itself is fine


def test_gps_of_exif_only_files_read_from_their_real_bytes():
    base = (GPS_DIR / IPHONE).read_bytes()
    goexif = "rwcarlsen+goexif__"
    null_island = _graft(base, (ODD_DIR / f"{goexif}2011-05-07-13-02-49-sep-2011-05-07-13-02-49a.jpg").read_bytes())
    assert inspect_gps(null_island) == (None, exif.GPS_INVALID)  # 0 N 0 E: a receiver without a fix
    temple = _graft(base, (ODD_DIR / f"{goexif}2012-12-19-21-38-40-sep-temple_square1.jpg").read_bytes())
    assert inspect_gps(temple) == (pytest.approx((40.770339, -111.891222), abs=1e-6), None)  # Salt Lake City
    assert open_image(temple).size == (1296, 968)


# ------------------------------------------------------------------ the whole folder through the CLI


def test_import_of_the_whole_folder(ws, tmp_path, monkeypatch, capsys, recwarn):
    monkeypatch.setattr(pipeline.cli, "COMMAND_MODULES", ("pipeline.ingest",))
    assert pipeline.cli.main(["import-photos", str(REALFILES), "--link"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Warning" not in err and len(recwarn) == 0

    def count(label: str) -> int:
        match = re.search(rf"^ +{re.escape(label)} +(\d+)", out, re.MULTILINE)
        return int(match.group(1)) if match else 0

    total = sum(1 for p in REALFILES.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert f"{total} files looked at" in out
    assert count(images.READ_NO_IMAGE_DATA) == 44 and count(images.READ_RAW) == 1
    assert count(images.READ_EMPTY) == 1 and count(images.READ_NOT_IMAGE) == 7  # README, gpx, heif, beach
    positions = {tuple(round(v, 6) for v in latlon) for latlon in KNOWN_GPS.values()}
    with ws.manifest() as m:
        frame = m.frame()
    assert len(frame) == count("added") > 0
    assert {(round(a, 6), round(b, 6)) for a, b in zip(frame.lat, frame.lon)} == positions
    again = import_photos(ws, REALFILES, link=True)
    assert again.added == 0 and again.duplicates == count("added") + count("duplicates")


def test_the_whole_folder_through_import_workers_gives_the_same_import(tmp_path, recwarn):
    # every real outcome (raw, truncated, EXIF without image, broken GPS, library warnings)
    # crosses from a worker process and lands as it does checked in this process
    from geohier.workspace import IMAGE_COLUMNS, Workspace

    one, many = (Workspace(tmp_path / n / "data", tmp_path / n / "models") for n in ("one", "many"))
    a = import_photos(one, REALFILES, link=True, workers=0)
    b = import_photos(many, REALFILES, link=True, workers=2)
    assert (a.total, a.added, a.duplicates) == (b.total, b.added, b.duplicates) and a.added > 0
    assert a.skipped == b.skipped and a.warnings == b.warnings and a.examples == b.examples
    columns = [c for c in IMAGE_COLUMNS if c not in ("id", "added_at")]
    with one.manifest() as m1, many.manifest() as m2:
        assert m1.frame(columns).equals(m2.frame(columns))
    assert len(recwarn) == 0  # nothing printed raw, from either side
