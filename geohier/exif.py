"""EXIF metadata of a photo: its GPS position and when it was taken, from a Pillow
``Image.Exif`` (reading the file is ``geohier.images``' job: ``inspect_gps``, ``read_gps``,
``read_exif_time`` and ``image_info`` call these).

- ``gps_from_exif``: decimal degrees signed by the N/S/E/W references, or why there is no
  usable position (``GPS_MISSING``, ``GPS_VOID``, ``GPS_BROKEN``, ``GPS_INVALID``, the
  reasons an import summary counts);
- ``exif_time``: ISO 8601, in UTC when the EXIF gives an offset or a GPS time stamp.

>>> from PIL import Image
>>> gps_from_exif(Image.new("RGB", (2, 2)).getexif())
(None, 'no GPS')
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from PIL import Image

# EXIF tags used here.
TAG_DATETIME = 0x0132
IFD_EXIF = 0x8769
IFD_GPS = 0x8825
TAG_DATETIME_ORIGINAL = 0x9003
TAG_OFFSET_TIME_ORIGINAL = 0x9011
GPS_LAT_REF, GPS_LAT, GPS_LON_REF, GPS_LON = 1, 2, 3, 4
GPS_TIMESTAMP, GPS_STATUS, GPS_DATESTAMP = 7, 9, 29

# Why a file gave no usable GPS position (the import summary counts these).
GPS_MISSING = "no GPS"
GPS_VOID = "GPS void"  # a GPS block whose GPSStatus is 'V': the receiver had no fix
GPS_BROKEN = "broken EXIF"
GPS_INVALID = "invalid coordinates"


def _ref(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip("\x00 ").upper()[:1]


def _rational(value: Any) -> float:
    """An EXIF rational (IFDRational, (num, den) pair, number) as a float; raises
    ValueError/TypeError/ZeroDivisionError when malformed."""
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0] / value[1]
    out = float(value)
    if math.isnan(out):  # IFDRational with a zero denominator reads as NaN
        raise ValueError("rational with a zero denominator")
    return out


def _dms_to_degrees(value: Any) -> float:
    """(degrees, minutes, seconds) or a single decimal value -> decimal degrees."""
    if isinstance(value, (tuple, list)):
        parts = [_rational(v) for v in value]
        if not 1 <= len(parts) <= 3:
            raise ValueError(f"{len(parts)} components")
        parts += [0.0] * (3 - len(parts))
        d, m, s = parts
        if min(parts) < 0 or m > 60 or s > 60:  # 60 itself: writers that round 59.99995 up
            raise ValueError(f"minutes/seconds out of range: {d} {m} {s}")
        return d + m / 60.0 + s / 3600.0
    return _rational(value)


def gps_from_exif(exif: Image.Exif) -> tuple[tuple[float, float] | None, str | None]:
    """``((lat, lon), None)`` from an EXIF block, or ``(None, problem)`` with problem one of
    GPS_MISSING (no GPS tags), GPS_VOID (the receiver marked the fix void: GPSStatus 'V'),
    GPS_BROKEN (tags present but malformed, a zero denominator, or a missing N/S/E/W
    reference) and GPS_INVALID (a position outside the globe,
    or exactly 0, 0, which receivers without a fix write)."""
    try:
        gps = exif.get_ifd(IFD_GPS)
    except Exception:
        return None, GPS_BROKEN
    if not gps or (GPS_LAT not in gps and GPS_LON not in gps):
        return None, GPS_MISSING
    try:
        if _ref(gps.get(GPS_STATUS, "A")) == "V":  # "void": no fix when the photo was taken
            return None, GPS_VOID
        lat = _dms_to_degrees(gps[GPS_LAT])
        lon = _dms_to_degrees(gps[GPS_LON])
        # A missing or empty reference leaves the hemisphere unknown: guessing N/E would put
        # a southern or western photo on the wrong side of the globe, a silently wrong label.
        lat_ref, lon_ref = _ref(gps.get(GPS_LAT_REF, "")), _ref(gps.get(GPS_LON_REF, ""))
        if lat_ref not in ("N", "S") or lon_ref not in ("E", "W"):
            return None, GPS_BROKEN
    except (KeyError, ValueError, TypeError, ZeroDivisionError, OverflowError, IndexError):
        return None, GPS_BROKEN
    if lat_ref == "S":
        lat = -abs(lat)
    if lon_ref == "W":
        lon = -abs(lon)
    if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90 or abs(lon) > 180:
        return None, GPS_INVALID
    if lat == 0.0 and lon == 0.0:
        return None, GPS_INVALID
    return (lat, lon), None


def _parse_exif_datetime(text: Any) -> datetime | None:
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = str(text).strip("\x00 ")
    for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y:%m:%d %H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            return datetime.strptime(text[:19] if "S" in fmt else text[:16], fmt)
        except ValueError:
            continue
    return None


def exif_time(exif: Image.Exif) -> str | None:
    """When the photo was taken, ISO 8601: UTC (``...+00:00``) when the EXIF says the
    offset or has a GPS time stamp, otherwise the camera's local time without an offset."""
    try:
        gps = exif.get_ifd(IFD_GPS)
        if GPS_DATESTAMP in gps and GPS_TIMESTAMP in gps:
            day = datetime.strptime(str(gps[GPS_DATESTAMP]).strip("\x00 "), "%Y:%m:%d")
            h, m, s = (_rational(v) for v in gps[GPS_TIMESTAMP])
            when = day + timedelta(hours=h, minutes=m, seconds=int(s))
            return when.replace(tzinfo=UTC).isoformat(timespec="seconds")
    except Exception:
        pass  # fall back to the camera clock
    try:
        sub = exif.get_ifd(IFD_EXIF)
        when = _parse_exif_datetime(sub.get(TAG_DATETIME_ORIGINAL) or exif.get(TAG_DATETIME) or "")
        if when is None:
            return None
        offset = str(sub.get(TAG_OFFSET_TIME_ORIGINAL) or "").strip("\x00 ")
        if len(offset) == 6 and offset[0] in "+-" and offset[3] == ":":
            sign = 1 if offset[0] == "+" else -1
            delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
            aware = when.replace(tzinfo=timezone(sign * delta))
            return aware.astimezone(UTC).isoformat(timespec="seconds")
        return when.isoformat(timespec="seconds")
    except Exception:
        return None
