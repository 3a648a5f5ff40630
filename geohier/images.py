"""Reading user photos robustly: one RGB image out of any file a user can hand us.

Every path into geohier (imports, training data, the predict CLI, the Predict page's
upload box) opens images through ``open_image``, so that they all agree on:

- orientation: the EXIF orientation tag is applied (the mapping of
  ``PIL.ImageOps.exif_transpose``), so a portrait phone photo is upright;
- colour: any mode (1, L, LA, P, PA, RGBA, CMYK, I;16, I, F, ...) becomes 8-bit RGB, alpha
  composited on white and 16-bit greys scaled to 8 bits;
- formats: whatever Pillow reads (JPEG, PNG, WebP, GIF, BMP, TIFF, ...), plus HEIC/HEIF
  through pillow-heif (in requirements.txt; registered on first use, optional for the library);
- refusals: a missing, empty, truncated or non-image file, EXIF metadata without the
  picture (the head of a JPEG cut after its header), a camera raw file, or one with more
  than ``MAX_PIXELS`` pixels (a decompression bomb), raises ``ImageReadError`` (an
  ``InputError``) whose message names the file and whose ``reason`` says which case it was.
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` stays False: a truncated file is an error;
- warnings: Pillow and its plugins warn about odd but readable files ("Invalid APNG",
  "Corrupt EXIF data"); ``collect_warnings`` records them as one-line messages so that
  a caller can count them in its summary instead of letting them print;
- size: ``max_side`` shrinks a big photo while it is decoded (JPEG's DCT scaling through
  ``Image.draft``), so a 50 MP photo is never held at full size when 512 px are wanted;
  other formats (PNG, TIFF, WebP, ...) are reduced in their own mode, band by band, right
  after decoding, and only the reduced picture is converted to RGB. Every consumer passes
  the largest side it needs (``decode_side_for`` of its transform; the predictor's and the
  importers' own sides);
- memory: before anything is decoded, the declared size (after JPEG scaling) times the
  bytes Pillow stores per pixel of the mode is checked against ``MAX_DECODE_BYTES``, so
  any image within the 100 MP guard decodes with at most a few hundred MB extra, and a
  server bounds how many uploads decode at once with ``decode_slot``.

EXIF metadata: ``read_gps`` (decimal degrees, signed by the N/S/E/W references),
``inspect_gps`` (the same, with why it is missing), ``read_exif_time`` and ``image_info``
(everything an import needs in one pass); the parsing itself is ``geohier.exif``'s. A path
may name a member of a zip or tar (``archive!/member``, ``geohier.archives``): it is read
in place.

Examples
--------
>>> import io
>>> from PIL import Image
>>> buf = io.BytesIO(); Image.new("LA", (4, 2), (0, 0)).save(buf, "PNG")
>>> img = open_image(buf.getvalue())
>>> img.mode, img.size, img.getpixel((0, 0))      # transparent black on white is white
('RGB', (4, 2), (255, 255, 255))
"""

from __future__ import annotations

import io
import math
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from geohier import archives
from geohier.errors import DecodeBusyError, ImageReadError, InputError
from geohier.exif import GPS_BROKEN, exif_time, gps_from_exif

# Default refusal limit for one image, in pixels (width x height). A 100 MP limit passes
# every phone and most camera photos (a 61 MP full-frame sensor) and refuses the classic
# decompression bombs (a few KB of PNG that decode to gigapixels).
MAX_PIXELS = 100_000_000

# Default byte budget for one decode: the picture as Pillow will hold it (declared size,
# after JPEG draft scaling, times the bytes per pixel of its mode; see ``decode_bytes``).
# Every image within MAX_PIXELS fits (100 MP x 4 bytes); a caller may pass a smaller one.
MAX_DECODE_BYTES = 400_000_000

# Bytes Pillow stores per pixel: 1 for 1/L/P, 2 for the 16-bit greys, 4 for the rest
# (RGB is stored as 4 bytes, LA and PA too).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}

# The side a consumer gets when its transform does not say its input size.
DEFAULT_DECODE_SIDE = 2048

# How many images a server (the Predict page) decodes at once; more uploads wait their turn
# for up to DECODE_WAIT_S seconds, then are told the server is busy.
DECODE_SLOTS = 2
DECODE_WAIT_S = 60.0

# EXIF tags used here.
TAG_ORIENTATION = 0x0112

# The transposition that undoes each EXIF orientation (as in PIL.ImageOps.exif_transpose).
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# ImageReadError.reason values.
READ_MISSING = "missing file"
READ_EMPTY = "empty file"
READ_NOT_IMAGE = "not an image"
READ_TRUNCATED = "truncated image"
READ_TOO_LARGE = "too large"
READ_UNREADABLE = "unreadable file"
READ_NO_IMAGE_DATA = "EXIF without image data"
READ_RAW = "camera raw file"
READ_BUSY = "busy"

# Camera raw formats Pillow cannot decode: by file extension, and by the signatures of
# those that are not plain TIFF (Pillow may open a TIFF-based raw's small preview).
RAW_EXTENSIONS = {".3fr", ".ari", ".arw", ".cr2", ".cr3", ".crw", ".dcr", ".dng", ".erf", ".iiq",
                  ".k25", ".kdc", ".mef", ".mos", ".mrw", ".nef", ".nrw", ".orf", ".pef", ".raf",
                  ".raw", ".rw2", ".rwl", ".sr2", ".srf", ".srw", ".x3f"}
_RAW_SIGNATURES = ((0, b"IIU\x00", "Panasonic RW2"), (0, b"IIRO", "Olympus ORF"),
                   (0, b"IIRS", "Olympus ORF"), (0, b"MMOR", "Olympus ORF"),
                   (0, b"FUJIFILMCCD-RAW", "Fujifilm RAF"), (8, b"CR\x02", "Canon CR2"),
                   (4, b"ftypcrx ", "Canon CR3"), (0, b"FOVb", "Sigma X3F"), (0, b"\x00MRM", "Minolta MRW"))

# Pillow format name -> file extension used when an image is copied into the workspace.
FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
                     "BMP": "bmp", "TIFF": "tif", "HEIF": "heic", "AVIF": "avif"}

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif"}
_heif_state: bool | None = None  # None: not tried yet; then whether pillow-heif registered


_slots = threading.BoundedSemaphore(DECODE_SLOTS)


@contextmanager
def decode_slot(timeout: float | None = None) -> Iterator[None]:
    """Hold one of the process's ``DECODE_SLOTS`` decode slots for the block: a server
    decoding uploads for many sessions wraps each decode in it, so N sessions cannot
    multiply the peak memory of one. Waits up to ``timeout`` seconds (default
    ``DECODE_WAIT_S``) for a slot, then raises DecodeBusyError ("busy ... try again").

    >>> with decode_slot():
    ...     pass
    """
    wait = DECODE_WAIT_S if timeout is None else timeout
    if not _slots.acquire(timeout=max(0.0, float(wait))):
        raise DecodeBusyError(f"the server is busy decoding {DECODE_SLOTS} other images "
                              f"(waited {wait:g} s); try again in a moment")
    try:
        yield
    finally:
        _slots.release()


def decode_side_for(transform: Any = None) -> int:
    """The largest side a consumer of ``transform`` needs decoded: four times its input
    size (``image_size`` / ``resize_size``, as on geohier.presets' presets), at least
    1024, so a 4:1 panorama's short side still covers the crop; DEFAULT_DECODE_SIDE when
    the transform does not say its size.

    >>> from geohier.presets import EvalPreset
    >>> decode_side_for(EvalPreset(224)), decode_side_for(EvalPreset(384)), decode_side_for(None)
    (1024, 1536, 2048)
    """
    sizes = [getattr(transform, a, None) for a in ("image_size", "resize_size")]
    sizes = [int(v) for v in sizes if isinstance(v, (int, float)) and v > 0]
    return max(1024, 4 * max(sizes)) if sizes else DEFAULT_DECODE_SIDE


def pixel_bytes(mode: str) -> int:
    """Bytes Pillow stores per pixel of ``mode`` (1, 2 or 4).

    >>> pixel_bytes("L"), pixel_bytes("I;16"), pixel_bytes("RGB"), pixel_bytes("RGBA")
    (1, 2, 4, 4)
    """
    return _PIXEL_BYTES.get(mode, 4)


def decode_bytes(img: Image.Image) -> int:
    """The bytes a full decode of an opened (not yet loaded) image allocates for its
    picture: its declared size (after any JPEG draft scaling) times ``pixel_bytes``."""
    w, h = img.size
    return w * h * pixel_bytes(img.mode)


class NamedBytes(io.BytesIO):
    """In-memory file bytes that keep their file name for error messages:
    ``open_image(NamedBytes(data, "photo.jpg"))``."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name


def heif_available() -> bool:
    """Register pillow-heif's HEIC/HEIF opener on first call; whether it is available."""
    global _heif_state
    if _heif_state is None:
        try:
            import pillow_heif  # optional dependency
        except ImportError:
            _heif_state = False
        else:
            try:
                pillow_heif.register_heif_opener()
                _heif_state = True
            except Exception:  # a broken install must not break plain JPEGs
                _heif_state = False
    return _heif_state


def source_name(src: Any) -> str:
    """A human name for an image source, for messages: the path, the upload's file name,
    or ``"image bytes"``."""
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    name = getattr(src, "name", None) or getattr(src, "filename", None)
    if isinstance(name, str) and name:
        return name
    return "image bytes"


def read_source(src: ImageSource, name: str | None = None) -> bytes:
    """The raw bytes of a path, a bytes-like object or a binary file object (e.g.
    Streamlit's UploadedFile, read from its start). Missing or unreadable paths raise
    ImageReadError."""
    name = name or source_name(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, (str, os.PathLike)):
        if archives.is_member(src):  # an image inside a zip or tar, read in place
            return archives.read_member(os.fspath(src))
        path = Path(src)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ImageReadError(f"{name}: no such file", READ_MISSING) from None
        except IsADirectoryError:
            raise ImageReadError(f"{name} is a directory, not an image file", READ_NOT_IMAGE) from None
        except OSError as exc:
            raise ImageReadError(f"{name}: cannot read the file ({exc.strerror or exc})",
                                 READ_UNREADABLE) from None
    getvalue = getattr(src, "getvalue", None)
    if callable(getvalue):  # BytesIO, UploadedFile: the whole buffer wherever the cursor is
        return bytes(getvalue())
    if hasattr(src, "read"):
        try:
            if getattr(src, "seekable", lambda: False)():
                src.seek(0)
            data = src.read()
        except OSError as exc:
            raise ImageReadError(f"{name}: cannot read the file ({exc})", READ_UNREADABLE) from None
        if not isinstance(data, (bytes, bytearray)):
            raise InputError(f"{name}: expected a binary file object, got text")
        return bytes(data)
    raise InputError(f"cannot read an image from a {type(src).__name__}; "
                     "give a path, bytes or a binary file object")


def _looks_like_heif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def raw_format(data: bytes, name: str = "") -> str | None:
    """The camera raw format of a file that Pillow could not read (``"Panasonic RW2"``,
    or the extension for TIFF-based raws such as NEF and DNG), or None.

    >>> raw_format(b"IIU\\x00" + bytes(12))
    'Panasonic RW2'
    >>> raw_format(b"II*\\x00" + bytes(12), "DSC_0001.NEF")
    'NEF'
    """
    for offset, magic, label in _RAW_SIGNATURES:
        if data[offset:offset + len(magic)] == magic:
            return label
    suffix = os.path.splitext(name)[1].lower()
    return suffix[1:].upper() if suffix in RAW_EXTENSIONS else None


def _jpeg_header_end(data: bytes) -> tuple[bool, bool] | None:
    """For a JPEG: (whether its segments reach the image data, i.e. a start-of-scan
    marker, and whether an EXIF segment came before). None when it is not a JPEG."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    i, exif = 2, False
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False, exif  # not a marker where one must be: broken header
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:
            return True, exif
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            exif = True
        i += 2 + length
    return False, exif


def _header_failure(data: bytes, name: str, exc: Exception) -> ImageReadError:
    """The right refusal for a file whose header Pillow could not parse."""
    jpeg = _jpeg_header_end(data)
    if jpeg is not None and not jpeg[0]:
        if jpeg[1]:
            return ImageReadError(f"{name} holds EXIF metadata but no image data (the file ends "
                                  "before the picture starts)", READ_NO_IMAGE_DATA)
        return ImageReadError(f"{name} is truncated: it ends inside its JPEG header", READ_TRUNCATED)
    return ImageReadError(f"{name} is not a readable image ({exc})", READ_NOT_IMAGE)


def _open_lazy(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    """Identify the image and read its header (nothing decoded yet); refuse empty,
    non-image and over-limit files."""
    if not data:
        raise ImageReadError(f"{name} is empty (0 bytes)", READ_EMPTY)
    if _looks_like_heif(data):
        heif_available()
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own MAX_IMAGE_PIXELS; our limit is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{name} is too large to open safely ({exc})", READ_TOO_LARGE) from None
    except UnidentifiedImageError as exc:
        raw = raw_format(data, name)
        if raw is not None:
            raise ImageReadError(f"{name} is a camera raw file ({raw}), which geohier cannot decode: "
                                 "export it as JPEG or TIFF first", READ_RAW) from None
        hint = ""
        if _looks_like_heif(data) and not heif_available():
            hint = " (it looks like HEIC/HEIF: `pip install pillow-heif` to read it)"
        elif (jpeg := _jpeg_header_end(data)) is not None and not jpeg[0]:
            raise _header_failure(data, name, exc) from None  # a JPEG cut inside its header
        raise ImageReadError(f"{name} is not an image file Pillow can read{hint}",
                             READ_NOT_IMAGE) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # broken headers
        raise _header_failure(data, name, exc) from None
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageReadError(f"{name} has an empty size {w}x{h}", READ_NOT_IMAGE)
    if limit and w * h > limit:
        raise ImageReadError(
            f"{name} is {w}x{h} = {w * h / 1e6:.1f} MP, over the {limit / 1e6:g} MP limit "
            "for one image (a possible decompression bomb)", READ_TOO_LARGE)
    return img


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 when absent or unreadable)."""
    try:
        value = img.getexif().get(TAG_ORIENTATION, 1)
        value = int(value[0] if isinstance(value, (tuple, list)) else value)
    except Exception:  # broken EXIF must not make a good picture unreadable
        return 1
    return value if value in _ORIENTATION_FIX else 1


def _grey_range(img: Image.Image, rows: int) -> tuple[float, float]:
    """The finite (min, max) of a grey picture (I;16, I, F), a band of ``rows`` rows at a
    time; (0, 0) when it has no finite value."""
    w, h = img.size
    lo, hi = math.inf, -math.inf
    for y in range(0, h, rows):
        arr = np.asarray(img.crop((0, y, w, min(h, y + rows))) if rows < h else img)
        if arr.dtype.kind == "f":
            arr = arr[np.isfinite(arr)]
        if arr.size:
            lo, hi = min(lo, float(arr.min())), max(hi, float(arr.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def _to_8bit(arr: np.ndarray, rng: tuple[float, float] | None = None) -> np.ndarray:
    """Integer or float grey levels -> uint8: floats in [0, 1] times 255, values in
    [0, 255] as they are, 16-bit values divided by 257, anything else stretched from its
    min to its max. ``rng``: the (min, max) of the whole picture when ``arr`` is one band
    of it (default: the array's own)."""
    is_float = arr.dtype.kind == "f"
    if rng is None:
        finite = arr[np.isfinite(arr)] if is_float else arr
        rng = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    lo, hi = rng
    arr = arr.astype(np.float64)
    if is_float and lo >= 0 and hi <= 1.0:
        out = arr * 255.0
    elif lo >= 0 and hi <= 255:
        out = arr
    elif lo >= 0 and hi <= 65535 and not is_float:
        out = arr / 257.0
    else:
        out = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.clip(np.nan_to_num(out, nan=0.0), 0, 255).round().astype(np.uint8)


# Pictures are converted (and reduced) a band of rows of about this many bytes at a time.
_BAND_BYTES = 16 << 20


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: alpha composited on white, CMYK through its ICC
    profile when it has one, 16/32-bit and float greys scaled to 8 bits (by the range of
    the whole picture). A big picture is converted a band of rows at a time, so the only
    extra memory is the RGB result.

    >>> to_rgb(Image.new("LA", (3000, 3000), (0, 0))).getpixel((2999, 2999))
    (255, 255, 255)
    """
    mode = img.mode
    keyed = "transparency" in img.info and mode in ("P", "L", "RGB")  # palette / colour-key alpha
    if mode == "RGB" and not keyed:
        return img
    w, h = img.size
    rows = max(1, _BAND_BYTES // (4 * w))
    rng = _grey_range(img, rows) if mode.startswith("I;16") or mode in ("I", "F") else None
    if h <= rows:
        return _band_to_rgb(img, keyed, rng)
    out = Image.new("RGB", img.size)
    for y in range(0, h, rows):
        out.paste(_band_to_rgb(img.crop((0, y, w, min(h, y + rows))), keyed, rng), (0, y))
    return out


def _band_to_rgb(img: Image.Image, keyed: bool, rng: tuple[float, float] | None) -> Image.Image:
    mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or keyed:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if rng is not None:
        grey = Image.fromarray(_to_8bit(np.asarray(img), rng), mode="L")
        return grey.convert("RGB")
    if mode == "CMYK" and img.info.get("icc_profile"):
        try:
            from PIL import ImageCms

            src_profile = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
            return ImageCms.profileToProfile(img, src_profile, ImageCms.createProfile("sRGB"),
                                             outputMode="RGB")
        except Exception:  # a broken or unsupported profile: fall back to Pillow's formula
            pass
    return img.convert("RGB")


def _draft(img: Image.Image, max_side: int) -> None:
    """JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale, the smallest that keeps the long
    side at least ``max_side`` (whatever the aspect). Other formats ignore it."""
    w, h = img.size
    if max(w, h) <= max_side:
        return
    k = max_side / max(w, h)
    img.draft("RGB", (max(1, math.ceil(w * k)), max(1, math.ceil(h * k))))


def _band_mode(img: Image.Image) -> str:
    """The mode a picture is reduced in: its own, except where averaging its values would
    be wrong or Pillow cannot reduce it (palette indexes and colour-keyed transparency ->
    RGBA or RGB, 1-bit -> L, 16-bit grey -> 32-bit I)."""
    mode = img.mode
    keyed = "transparency" in img.info and mode in ("1", "L", "RGB", "P")
    if mode == "PA" or keyed:
        return "RGBA"
    if mode == "P":
        return "RGB"
    if mode == "1":
        return "L"
    if mode.startswith("I;16"):
        return "I"
    return mode


def reduce_native(img: Image.Image, max_side: int, band_bytes: int | None = None) -> Image.Image:
    """A decoded picture box-averaged by the largest integer factor that keeps its long
    side at least ``max_side``, in its own mode (see ``_band_mode``), a band of rows at a
    time: the only full-size copy is the one the decoder made (Pillow's own reduce would
    premultiply a whole RGBA picture first, and cannot reduce 16-bit greys or palettes).
    Returns ``img`` itself when it is small enough already.

    >>> reduce_native(Image.new("I;16", (1000, 400), 300), 256).size
    (334, 134)
    """
    w, h = img.size
    factor = max(w, h) // max_side if max_side else 1
    if factor < 2:
        return img
    work = _band_mode(img)
    if work == img.mode and work not in ("LA", "RGBA", "PA"):
        return img.reduce(factor)  # allocates the reduced picture only
    rows = factor * max(1, (band_bytes or _BAND_BYTES) // (w * 4 * factor))
    out = Image.new(work, (-(-w // factor), -(-h // factor)))
    for y in range(0, h, rows):
        band = img.crop((0, y, w, min(h, y + rows)))
        if band.mode != work:
            band = band.convert(work)
        out.paste(band.reduce(factor), (0, y // factor))
    out.info = {k: v for k, v in img.info.items() if k != "transparency"}
    return out


def open_image(src: ImageSource, *, max_side: int | None = None,
               max_pixels: int | None = None, max_bytes: int | None = None) -> Image.Image:
    """Open an image as upright 8-bit RGB, or raise ImageReadError naming the file.

    Parameters
    ----------
    src : path, bytes, binary file object (Streamlit's UploadedFile) or PIL Image
        A PIL Image is only oriented and converted (it is already decoded).
    max_side : int, optional
        Shrink so that neither side exceeds this many pixels (aspect kept). JPEGs are
        decoded directly at a reduced scale, so the full-size picture is never built.
    max_pixels : int, optional
        Refuse images with more pixels than this (default ``MAX_PIXELS``; 0 = no limit of
        ours, though Pillow's own bomb check still applies at twice
        ``PIL.Image.MAX_IMAGE_PIXELS``).
    max_bytes : int, optional
        Refuse, before decoding, images whose picture would take more bytes than this
        (``decode_bytes``: after JPEG scaling to ``max_side``; default
        ``MAX_DECODE_BYTES``; 0 = no budget).

    Examples
    --------
    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("CMYK", (640, 480)).save(buf, "JPEG")
    >>> open_image(buf.getvalue(), max_side=100).size
    (100, 75)
    """
    if isinstance(src, Image.Image):  # already opened by the caller: just finish decoding
        img, name = src, source_name(src)
    else:
        name = source_name(src)
        data = read_source(src, name)
        img = _open_lazy(data, name, max_pixels)
        del data  # the decoder keeps its own reference while it needs one
        if max_side:
            _draft(img, max_side)  # JPEG: decode at 1/2, 1/4 or 1/8 scale
        budget = MAX_DECODE_BYTES if max_bytes is None else max_bytes
        need = decode_bytes(img)
        if budget and need > budget:
            w, h = img.size
            raise ImageReadError(
                f"{name} would take {need / 1e6:.0f} MB to decode ({w}x{h} {img.mode}), over the "
                f"{budget / 1e6:g} MB budget for one image", READ_TOO_LARGE)
    try:
        img.load()  # forces the full decode: a truncated file fails here
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{name} is too large to open safely ({exc})", READ_TOO_LARGE) from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        text = str(exc)
        reason = READ_TRUNCATED if "truncated" in text or isinstance(exc, EOFError) else READ_NOT_IMAGE
        what = "is truncated or corrupt" if reason == READ_TRUNCATED else "cannot be decoded"
        raise ImageReadError(f"{name} {what} ({text or type(exc).__name__})", reason) from None
    # Read after decoding: some decoders (Pillow's TIFF) turn the picture upright themselves
    # and drop the tag; reading it before would rotate such a picture twice.
    orientation = _orientation(img)
    try:
        if max_side:
            img = reduce_native(img, max_side)  # in its own mode; the full-size one goes
        rgb = to_rgb(img)
    except (OSError, ValueError) as exc:
        raise ImageReadError(f"{name}: cannot convert its {img.mode} pixels to RGB ({exc})",
                             READ_NOT_IMAGE) from None
    del img
    if max_side and max(rgb.size) > max_side:
        rgb = rgb.copy() if rgb is src else rgb
        rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    fix = _ORIENTATION_FIX.get(orientation)
    if fix is not None:
        rgb = rgb.transpose(fix)
    if rgb is src:
        rgb = rgb.copy()  # never hand back (and let callers mutate) the caller's own image
    return rgb


# ---------------------------------------------------------------- EXIF metadata


def _exif_of(src: ImageSource) -> Image.Exif:
    """The EXIF of an image source (header only; nothing decoded)."""
    if isinstance(src, Image.Image):
        return src.getexif()
    name = source_name(src)
    img = _open_lazy(read_source(src, name), name, max_pixels=0)
    return img.getexif()


def inspect_gps(src: ImageSource) -> tuple[tuple[float, float] | None, str | None]:
    """``((lat, lon), None)`` or ``(None, why)``; see ``gps_from_exif``. Raises
    ImageReadError when the source is not an image at all."""
    try:
        exif = _exif_of(src)
    except ImageReadError:
        raise
    except Exception:
        return None, GPS_BROKEN
    return gps_from_exif(exif)


def read_gps(src: ImageSource) -> tuple[float, float] | None:
    """The photo's EXIF GPS position in signed decimal degrees (south and west negative),
    or None when it has none, it is malformed, or the source is not an image.

    Examples
    --------
    >>> read_gps(Image.new("RGB", (2, 2))) is None
    True
    """
    try:
        return inspect_gps(src)[0]
    except InputError:
        return None


def read_exif_time(src: ImageSource) -> str | None:
    """When the photo was taken (see ``exif_time``), or None."""
    try:
        return exif_time(_exif_of(src))
    except Exception:
        return None


def brightness(img: Image.Image) -> float:
    """Mean grey level (0 black - 255 white) of an image, measured on a copy of at most
    ~256 px a side (box-averaged, so the mean is kept).

    Examples
    --------
    >>> brightness(Image.new("RGB", (8, 8), (255, 255, 255)))
    255.0
    """
    grey = img if img.mode == "L" else to_rgb(img).convert("L")
    factor = max(1, max(grey.size) // 256)
    if factor > 1:
        grey = grey.reduce(factor)
    return float(np.asarray(grey, dtype=np.float64).mean())


def _stored_size(img: Image.Image) -> tuple[int, int]:
    """Width and height as stored in the file, before any EXIF orientation: a TIFF's
    ImageWidth/ImageLength tags (Pillow reports a TIFF's size already turned upright),
    else Pillow's size."""
    tags = getattr(img, "tag_v2", None)
    try:
        w, h = int(tags[256]), int(tags[257])  # ImageWidth, ImageLength
    except (TypeError, KeyError, ValueError, IndexError):
        return img.size
    return (w, h) if w > 0 and h > 0 else img.size


@dataclass(frozen=True)
class ImageInfo:
    """What an import needs to know about one image file."""

    format: str | None          # Pillow's format name: JPEG, PNG, ...
    ext: str                    # file extension to store it under (no dot)
    width: int                  # as displayed, i.e. after the EXIF orientation
    height: int
    orientation: int            # EXIF orientation tag, 1 when absent
    gps: tuple[float, float] | None
    gps_problem: str | None     # None, GPS_MISSING, GPS_VOID, GPS_BROKEN or GPS_INVALID
    captured_at: str | None
    brightness: float | None    # None unless decoded


def image_info(src: ImageSource, *, decode: bool = True, max_side: int = 256,
               max_pixels: int | None = None) -> ImageInfo:
    """Header facts (format, displayed size, GPS, time) of an image and, with ``decode``,
    a full decode at ``max_side`` to prove it is readable and measure its brightness.
    Raises ImageReadError for files that cannot be used."""
    name = source_name(src)
    data = src if isinstance(src, bytes) else read_source(src, name)
    img = _open_lazy(data, name, max_pixels)
    orientation = _orientation(img)
    w, h = _stored_size(img)
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    try:
        exif = img.getexif()
    except Exception:
        exif = None
    if exif is None:
        gps, problem, when = None, GPS_BROKEN, None
    else:
        gps, problem = gps_from_exif(exif)
        when = exif_time(exif)
    fmt = img.format
    ext = FORMAT_EXTENSIONS.get(fmt or "", (fmt or "img").lower())
    light = None
    if decode:
        light = brightness(open_image(NamedBytes(data, name), max_side=max_side, max_pixels=max_pixels))
    return ImageInfo(fmt, ext, w, h, orientation, gps, problem, when, light)


@contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Record, instead of printing, every warning raised inside the block (Pillow's
    "Invalid APNG", "Corrupt EXIF data", ...); yields the list that receives each one as
    ``"<Category>: <first line of its message>"``, in order, repeats included. The list
    is filled when the block ends (read it after the ``with``).

    >>> import warnings
    >>> with collect_warnings() as seen:
    ...     warnings.warn("Invalid APNG, will use default PNG image if possible")
    >>> seen
    ['UserWarning: Invalid APNG, will use default PNG image if possible']
    """
    seen: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # repeats count too: one per file, not one per process
        try:
            yield seen
        finally:
            for w in caught:
                text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
                seen.append(f"{w.category.__name__}: {text[:120]}")
