"""The demo image renderer: one street scene, drawn with numpy from its place's parameters.

``render_scene(params, style, size, seed, index)`` takes a row of ``sample_world`` (as
``scene_params`` gives it) and its country's ``CountryStyle``: sky and light from the sun,
backdrop, ground and vegetation from the biome and season, road markings, signs, poles and
the camera car from the country's style, then weather, camera roll and sensor noise. The
pixels depend only on ``(seed, index)`` and the parameters, never on the process.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image

from pipeline.demo.world import SIGN_SHAPES, WORLD_SEED, CountryStyle

# Per biome (in BIOMES order): ground colours, ground texture and roadside trees.
_GROUND = np.array([(205, 172, 122), (122, 140, 66), (62, 92, 44), (122, 112, 84),
                    (232, 236, 244), (58, 120, 46)], dtype=np.float64)
_GROUND2 = np.array([(172, 134, 88), (150, 150, 86), (46, 70, 34), (96, 94, 74),
                     (205, 212, 226), (92, 104, 48)], dtype=np.float64)
_TEX_AMP = np.array([0.25, 0.45, 0.6, 0.5, 0.15, 0.55])
_TREES = np.array([0.3, 2.5, 9.0, 1.2, 1.5, 9.0])          # trees per 100 m of roadside


@lru_cache(maxsize=1)
def _noise() -> np.ndarray:
    """A tileable 256x256 value-noise texture in [0, 1] (fixed: part of the planet)."""
    rng = np.random.default_rng(WORLD_SEED + 1)
    t = 256
    out = np.zeros((t, t))
    x = np.arange(t) / t
    for k, amp in ((8, 0.45), (16, 0.25), (32, 0.17), (64, 0.13)):
        g = rng.random((k, k))
        p = x * k
        i0 = np.floor(p).astype(int)
        fr = p - i0
        fr = fr * fr * (3 - 2 * fr)
        i1 = (i0 + 1) % k
        rows = g[i0] * (1 - fr)[:, None] + g[i1] * fr[:, None]         # (t, k)
        out += amp * (rows[:, i0] * (1 - fr) + rows[:, i1] * fr)
    out = (out - out.min()) / (out.max() - out.min())
    return out.astype(np.float32)


def _tex(a, b) -> np.ndarray:
    return _noise()[a.astype(np.int32) & 255, b.astype(np.int32) & 255]


@lru_cache(maxsize=4)
def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs + 0.5, ys + 0.5


@lru_cache(maxsize=1)
def _sensor_noise() -> np.ndarray:
    """Unit sensor noise, mostly luminance, 512x512x3; images take a random window of it
    (cheaper than drawing fresh noise, and just as deterministic)."""
    rng = np.random.default_rng(WORLD_SEED + 2)
    lum = rng.standard_normal((512, 512, 1), dtype=np.float32)
    return lum + 0.4 * rng.standard_normal((512, 512, 3), dtype=np.float32)


@lru_cache(maxsize=4)
def _radius2(size: int) -> np.ndarray:
    """Squared distance from the image centre, 1 at the middle of an edge (for vignetting)."""
    xs, ys = _pixel_grid(size, size)
    return ((xs - size / 2) ** 2 + (ys - size / 2) ** 2) / (size / 2) ** 2


def _c(*rgb) -> np.ndarray:
    return np.array(rgb, np.float32)


def _lerp(a, b, t):
    return a + (b - a) * t


class _Canvas:
    """The image being drawn, with the camera that projects road coordinates onto it.

    Road frame: X metres to the right of the camera, Z metres ahead, Y metres up from the
    road; the road's centre line is at X = xc + curv * Z^2.
    """

    def __init__(self, size, cam_h, focal, horizon, roll, yaw, rng):
        self.h = self.w = size
        self.rng = rng
        self.cam_h = cam_h
        self.f = focal * size
        self.v0 = horizon * size
        self.vx = size / 2 + self.f * math.tan(yaw)
        xs, ys = _pixel_grid(size, size)
        cr, sr = math.cos(roll), math.sin(roll)
        cx = cy = size / 2
        self.U = (xs - cx) * cr + (ys - cy) * sr + cx       # (H, W) camera-levelled coords
        self.V = -(xs - cx) * sr + (ys - cy) * cr + cy
        self.slope = math.tan(roll)
        self.img = np.zeros((size, size, 3), np.float32)
        self.xc = 0.0
        self.curv = 0.0
        self.haze_color = np.zeros(3, np.float32)
        self.visibility = 1000.0

    def project(self, x, y, z):
        """Pixel (u, v) in levelled coordinates of road point (x, y, z)."""
        u = self.vx + self.f * (x + self.curv * z * z) / z
        v = self.v0 + self.f * (self.cam_h - y) / z
        return u, v

    def box(self, u0, u1, v0, v1):
        """Row and column slices (of the rolled image) that cover a levelled box, with margin."""
        s = abs(self.slope)
        du = s * (abs(v0 - self.h / 2) + abs(v1 - self.h / 2)) + 2
        dv = s * (abs(u0 - self.w / 2) + abs(u1 - self.w / 2)) + 2
        c0, c1 = int(max(0, math.floor(u0 - du))), int(min(self.w, math.ceil(u1 + du)))
        r0, r1 = int(max(0, math.floor(v0 - dv))), int(min(self.h, math.ceil(v1 + dv)))
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def rows(self, v_top, v_bottom):
        """The slice of image rows that covers levelled rows v_top..v_bottom (with the roll)."""
        m = abs(self.slope) * self.w / 2 + 2
        r0, r1 = int(max(0, math.floor(v_top - m))), int(min(self.h, math.ceil(v_bottom + m)))
        return slice(r0, r1) if r0 < r1 else None

    def fog(self, color, z):
        return _lerp(np.asarray(color, np.float32), self.haze_color, 1 - math.exp(-z / self.visibility))

    def paint(self, sl, cover, color):
        if cover is None:
            return
        region = self.img[sl]
        region += (np.asarray(color, np.float32) - region) * cover[..., None]

    # -- primitives in road coordinates ------------------------------------------------

    def post(self, x, z, width, y0, y1, color):
        """A vertical box (pole, post, trunk) at (x, z) from height y0 to y1 (m)."""
        if z < 1.0:
            return
        u, vb = self.project(x, y0, z)
        _, vt = self.project(x, y1, z)
        half = self.f * width / 2 / z
        if half < 0.1:                              # thinner than a fifth of a pixel: invisible
            return
        sl = self.box(u - half, u + half, vt, vb)
        if sl is None:
            return
        U, V = self.U[sl], self.V[sl]
        cover = (np.clip(half + 0.5 - np.abs(U - u), 0, 1) * np.clip(V - vt + 0.5, 0, 1)
                 * np.clip(vb - V + 0.5, 0, 1))
        self.paint(sl, cover, self.fog(color, z))

    def shape(self, x, y, z, radius, kind, fill, border=None, border_frac=0.22, stretch=1.0):
        """A flat shape facing the camera, centred at (x, y, z), circumradius ``radius`` m."""
        if z < 1.0:
            return
        u, v = self.project(x, y, z)
        r = self.f * radius / z
        if r < 0.3:
            return
        sl = self.box(u - r, u + r, v - r * stretch, v + r * stretch)
        if sl is None:
            return
        xq = (self.U[sl] - u) / r
        yq = (self.V[sl] - v) / (r * stretch)       # down is positive
        ax, ay = np.abs(xq), np.abs(yq)
        if kind == "circle":
            d = np.sqrt(xq * xq + yq * yq) - 1
        elif kind == "triangle":                    # apex up
            d = np.maximum(yq - 0.5, (-1 + 1.732 * ax - yq) / 2)
        elif kind == "yield":                       # apex down
            d = np.maximum(-yq - 0.5, (-1 + 1.732 * ax + yq) / 2)
        elif kind == "diamond":
            d = (ax + ay - 1) / 1.414
        elif kind == "rect":
            d = np.maximum(ax - 1, ay - 0.7)
        elif kind == "octagon":
            d = np.maximum(np.maximum(ax, ay), (ax + ay) / 1.414) - 0.92
        else:
            raise ValueError(kind)
        px = d * r                                  # signed distance in pixels
        cover = np.clip(0.5 - px, 0, 1)
        if border is None:
            self.paint(sl, cover, self.fog(fill, z))
            return
        inner = np.clip(-border_frac * r + 0.5 - px, 0, 1)
        self.paint(sl, cover, self.fog(border, z))
        self.paint(sl, inner, self.fog(fill, z))


def _sky(cv: _Canvas, p, rng):
    lat = abs(p["lat"])
    el = p["sun_el"]
    cloud = p["cloud"]
    warm = math.exp(-max(el, 0.0) / 9.0) * (1 - 0.7 * cloud)
    desert = p["biome_w"][0]
    zen = _lerp(_c(38, 92, 192.0), _c(95, 140, 200.0), min(lat / 90 * 0.8, 0.8))
    zen = _lerp(zen, _c(70, 80, 150.0), warm * 0.6)
    zen = _lerp(zen, _c(150, 155, 165.0), cloud)
    hor = _lerp(_c(185, 210, 236.0), _c(226, 206, 172.0), desert * 0.7)
    hor = _lerp(hor, _c(250, 168, 105.0), warm)
    hor = _lerp(hor, _c(182, 184, 190.0), cloud)
    cv.haze_color = hor.astype(np.float32)
    rows = cv.rows(-1.0, cv.v0 + 1)
    if rows is None:
        return
    V, U = cv.V[rows], cv.U[rows]
    t = np.clip((cv.v0 - V) / max(cv.v0, 1.0), 0, 1) ** 0.6
    sky = hor + (zen - hor) * t[..., None]
    # Clouds: noise thresholded by cover, flattened towards the horizon.
    s = 128.0 / cv.w
    ox, oy = rng.integers(0, 256, 2)
    scale = rng.uniform(0.7, 1.6)
    depth = np.maximum(cv.v0 - V, 1.0) * (1.0 / cv.h)
    n = _tex((V * (s * 2.2 * scale)) / np.sqrt(depth + 0.1) + oy, U * (s * scale) + ox)
    cover = float(np.clip(0.35 + 0.6 * cloud + 0.1 * rng.standard_normal(), 0, 1))
    cm = np.clip((n - (1 - cover)) * 6, 0, 1) * np.clip(t * 4, 0, 1) * 0.9
    cloud_col = _lerp(_c(246, 246, 248.0), _c(150, 152, 160.0), cloud)
    cloud_col = _lerp(cloud_col, _c(250, 200, 160.0), warm * 0.5)
    sky += (cloud_col - sky) * cm[..., None]
    # Sun glow where the sun is in view.
    rel = (p["sun_az"] - p["heading"] + 540) % 360 - 180
    if abs(rel) < 70 and el > -2:
        su = cv.vx + cv.f * math.tan(math.radians(rel))
        sv = cv.v0 - cv.f * math.tan(math.radians(max(el, 0.0)))
        r2 = ((U - su) ** 2 + (V - sv) ** 2) * (1.0 / (0.18 * cv.w) ** 2)
        glow = np.exp(-r2) * ((1 - cloud) * 0.7)
        sky += (_c(255, 240, 215.0) - sky) * glow[..., None]
    cv.img[rows] = sky


def _backdrop(cv: _Canvas, p, rng, ground_col, foliage):
    """Distant mountains, nearer hills and a tree line along the horizon (levelled U)."""
    s = 128.0 / cv.w
    relief = p["relief"] * rng.uniform(0.5, 1.3)
    w = p["biome_w"]
    dens = (w[2] + w[5] + 0.35 * w[1] + 0.2 * w[3]) * (1 - 0.6 * p["urban"])
    tallest = cv.h * max(0.04 + 0.28 * relief * 1.2 if relief > 0.12 else 0.0, 0.07, 0.07 * dens * 1.5)
    rows = cv.rows(cv.v0 - tallest - 1, cv.v0 + 1)
    if rows is None:
        return
    U, V = cv.U[rows], cv.V[rows]
    img = cv.img[rows]
    if relief > 0.12:
        a1, a2 = rng.uniform(0.02, 0.06, 2)
        ph = rng.uniform(0, 6.3, 3)
        u = U[0]                                          # ridge height per column (levelled)
        ridge = (0.55 + 0.25 * np.sin(u * (s * a1) + ph[0]) + 0.15 * np.sin(u * (s * a2 * 2.3) + ph[1])
                 + 0.2 * (_tex(u * (s * 1.5) + ph[2] * 40, u * 0 + 17) - 0.5))
        height = cv.h * (0.04 + 0.28 * relief) * ridge
        top = cv.v0 - height
        cover = np.clip(V - top + 0.5, 0, 1) * (V < cv.v0 + 1)
        col = _lerp(_c(92, 104, 128.0), ground_col, 0.25)
        col = _lerp(col, cv.haze_color, 0.5)
        img += (col - img) * cover[..., None]
        if p["temp_now"] < 14 and relief > 0.35:
            snowline = cv.v0 - height * 0.55 - p["temp_now"] * 0.01 * cv.h
            snow = np.clip(snowline - V, 0, 1) * cover * 0.85
            img += (_c(236, 240, 248.0) - img) * snow[..., None]
    # Nearer rolling hills in the ground's colour.
    b1 = rng.uniform(0.03, 0.09)
    ph = rng.uniform(0, 6.3)
    hills = cv.h * (0.01 + 0.05 * rng.random()) * (0.6 + 0.4 * np.sin(U * (s * b1) + ph))
    cover = np.clip(V - (cv.v0 - hills) + 0.5, 0, 1) * (V < cv.v0 + 1)
    img += (_lerp(ground_col * 0.85, cv.haze_color, 0.35) - img) * cover[..., None]
    # Tree line, as dense as the vegetation.
    if dens > 0.15:
        n = _tex(U * (s * 6) + rng.integers(256), U * 0 + rng.integers(256))
        band = cv.h * 0.07 * dens * (0.3 + 1.2 * n)
        cover = np.clip(V - (cv.v0 - band) + 0.5, 0, 1) * (V < cv.v0 + 1)
        img += (_lerp(foliage * 0.8, cv.haze_color, 0.3) - img) * cover[..., None]


def _ground(cv: _Canvas, p, style: CountryStyle, rng, ground_col, ground_col2, tex_amp, road):
    """Ground, road surface and markings, per pixel below the horizon."""
    r0 = int(max(0, math.floor(cv.v0 - abs(cv.slope) * cv.w / 2 - 2)))
    U, V = cv.U[r0:], cv.V[r0:]
    dv = np.maximum(V - cv.v0, 0.35)
    Z = (cv.f * cv.cam_h) / dv                                      # (h, W) metres ahead
    X = (U - cv.vx) * cv.cam_h / dv                                 # metres right
    foot = Z / cv.f                                                 # metres per pixel across
    zfoot = Z * Z / (cv.f * cv.cam_h)                               # metres per pixel along
    ox, oy = rng.integers(0, 256, 2)
    t1 = _tex(Z * 1.3 + oy, X * 1.3 + ox)
    t2 = _tex(Z * 4.0 + ox, X * 4.0 + oy)
    fade = np.exp(-Z / 45.0)
    tex = 0.5 + (0.65 * t1 + 0.35 * t2 - 0.5) * (0.35 + 0.65 * fade)
    g = _lerp(ground_col, ground_col2, (tex * tex_amp * 2)[..., None])
    snow = p["snow"]
    if snow > 0.02:
        g = _lerp(g, _c(236, 239, 246.0), (snow * np.clip(0.6 + 0.8 * (t1 - 0.3), 0, 1))[..., None])
    Xr = X - (cv.xc + cv.curv * Z * Z)                              # metres from the centre line
    aX = np.abs(Xr)
    half = road["half"]

    def band(center, width):
        return np.clip((width / 2 + foot / 2 - np.abs(Xr - center)) / foot, 0, np.minimum(1, width / foot))

    def dashes(period, frac, phase):
        length = period * frac
        ph = (Z + phase) % period
        hard = np.clip((length / 2 + zfoot / 2 - np.abs(ph - length / 2)) / zfoot, 0,
                       np.minimum(1, length / zfoot))
        blur = np.clip(zfoot / period * 2 - 0.5, 0, 1)
        return _lerp(hard, frac, blur)

    # Shoulder (or pavement) and kerb, then the road surface on top.
    sh = road["shoulder_w"]
    sh_cov = np.clip((half + sh - aX) / foot + 0.5, 0, 1)
    g = _lerp(g, np.asarray(road["shoulder"], np.float32) * (0.85 + 0.3 * t2[..., None]), sh_cov[..., None])
    if road["kerb"] is not None:
        kc = np.clip((half + 0.25 - aX) / foot + 0.5, 0, 1) - np.clip((half - aX) / foot + 0.5, 0, 1)
        stripe = dashes(2.0, 0.5, 0.0)
        kcol = _lerp(np.asarray(road["kerb"][1], np.float32), np.asarray(road["kerb"][0], np.float32),
                     stripe[..., None])
        g = _lerp(g, kcol, np.clip(kc, 0, 1)[..., None])
    rc = np.clip((half - aX) / foot + 0.5, 0, 1)
    if road["dirt"]:
        surface = _lerp(_lerp(ground_col, _c(150, 118, 84.0), 0.6), ground_col2, 0.3)
        surface = surface * (0.8 + 0.4 * t2[..., None])
        if snow > 0.02:
            surface = _lerp(surface, _c(225, 228, 236.0), snow * 0.6)
    else:
        wear = (0.88 + 0.24 * t2)[..., None]
        surface = np.asarray(style.asphalt, np.float32) * wear
        if snow > 0.3:
            surface = _lerp(surface, _c(210, 212, 220.0), (snow - 0.3) * np.clip(aX / half, 0, 1)[..., None])
    g = _lerp(g, surface, rc[..., None])
    if not road["dirt"]:
        # Markings as coverage per paint colour, then one blend per colour.
        paints: dict[tuple, np.ndarray] = {}

        def add(color, cover):
            prev = paints.get(color)
            paints[color] = cover if prev is None else np.maximum(prev, cover)

        ph = road["phase"]
        if style.centre_pattern == "double":
            add(style.centre_color, band(-0.12, 0.1) + band(0.12, 0.1))
        elif style.centre_pattern == "solid":
            add(style.centre_color, band(0.0, 0.12))
        elif style.centre_pattern == "dashed":
            add(style.centre_color, band(0.0, 0.12) * dashes(style.dash_period, style.dash_fraction, ph))
        if road["lanes"] == 2:      # lane lines, white dashed, both directions
            lw = style.lane_width
            dl = dashes(12.0, 0.3, ph + 3)
            add((236, 236, 230), np.maximum(band(-lw, 0.12), band(lw, 0.12)) * dl)
        if style.edge_pattern != "none":
            e = band(half - 0.25, 0.15) + band(-half + 0.25, 0.15)
            if style.edge_pattern == "dashed":
                e = e * dashes(6.0, 0.5, ph)
            add(style.edge_color, e)
        for color, cover in paints.items():
            g += (np.asarray(color, np.float32) - g) * (np.minimum(cover, 1) * 0.92)[..., None]
    fog = 1 - np.exp(-Z / cv.visibility)
    g = _lerp(g, cv.haze_color, fog[..., None])
    cover = np.clip(V - cv.v0 + 0.5, 0, 1)[..., None]
    cv.img[r0:] += (g - cv.img[r0:]) * cover


def _facade(cv: _Canvas, x, z0, z1, height, color, rng):
    """A building front parallel to the road at lateral x (m), from z0 to z1 ahead."""
    if z1 <= z0 or z0 < 2:
        return
    ua = cv.vx + cv.f * x / z1
    ub = cv.vx + cv.f * x / z0
    u0, u1 = min(ua, ub), max(ua, ub)
    _, vt = cv.project(x, height, z0)
    _, vb = cv.project(x, 0.0, z0)
    sl = cv.box(u0, u1, min(vt, cv.v0 - 1), max(vb, cv.v0 + 1))
    if sl is None:
        return
    U, V = cv.U[sl], cv.V[sl]
    du = U - cv.vx
    du = np.where(np.abs(du) < 1e-3, 1e-3, du)
    Z = np.clip(cv.f * x / du, 0.1, 1e4)                        # depth of each column
    inside = (Z > z0) & (Z < z1)
    y = cv.cam_h - (V - cv.v0) * Z / cv.f                       # height of each pixel (m)
    cover = inside * np.clip((height - y) * cv.f / np.maximum(Z, 1) + 0.5, 0, 1) * (y > -0.5)
    base = np.asarray(color, np.float32)
    win = ((((Z + rng.uniform(0, 3)) % 3.2) > 1.0) & ((y % 3.0) > 1.0) & ((y % 3.0) < 2.3) & (y > 0.8)
           & (y < height - 0.6))
    contrast = np.exp(-Z / 70.0)
    col = base * (1 - (0.55 * win * contrast)[..., None]) + _c(30, 45, 70.0) * (0.35 * win * contrast)[..., None]
    col = _lerp(col, cv.haze_color, (1 - np.exp(-Z / cv.visibility))[..., None])
    cv.img[sl] += (col - cv.img[sl]) * np.clip(cover, 0, 1)[..., None]


def _car(cv: _Canvas, x, z, color, front: bool):
    w = 1.8
    cv.post(x, z, w, 0.25, 1.05, color)                       # body
    cv.post(x, z, w * 0.8, 1.05, 1.5, np.asarray(color) * 0.9)   # cabin
    cv.post(x, z, w * 0.7, 1.08, 1.42, (35, 40, 48))           # glass
    for side in (-0.7, 0.7):
        cv.post(x + side, z, 0.3, 0.0, 0.35, (18, 18, 18))       # wheels
        lamp = (250, 245, 210) if front else (200, 20, 20)
        cv.post(x + side * 1.05, z, 0.25, 0.65, 0.8, lamp)


def render_scene(p: dict, style: CountryStyle, size: int, seed: int, index: int) -> tuple[np.ndarray, dict]:
    """Draw one image from its scene parameters ``p`` (a row of sample_world) and style.

    Returns (uint8 array (size, size, 3), layout) where layout records the geometry that was
    drawn (road centre column at the bottom row, driving side, objects) for tests and
    debugging. Pixels depend only on (p, style, size, seed, index).
    """
    rng = np.random.default_rng([seed, index, 0xD3])
    roll = rng.normal(0, 0.02)
    yaw = rng.normal(0, 0.05)
    if rng.random() < 0.15:                 # now and then the camera looks off the road's axis
        yaw += rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.4)
    cv = _Canvas(size, p["cam_h"], p["focal"], p["horizon"] + rng.normal(0, 0.015), roll, yaw, rng)
    w = p["biome_w"]
    warmth = np.clip((p["temperature"] - 15) / 15, 0, 1) * np.clip((0.5 - p["moisture"]) / 0.3, 0, 1)
    ground_col = w @ _GROUND
    ground_col2 = w @ _GROUND2
    ground_col = _lerp(ground_col, _c(176, 160, 96.0), warmth * w[1])   # savanna
    brown = 1 - p["green"]
    ground_col = _lerp(ground_col, _c(128, 116, 84.0), brown * 0.6 * (w[1] + w[2] + w[5]))
    ground_col, ground_col2 = ground_col.astype(np.float32), ground_col2.astype(np.float32)
    tex_amp = float(w @ _TEX_AMP)
    foliage = _lerp(_c(60, 110, 45.0), _c(34, 66, 34.0), w[2] + 0.5 * w[3])
    foliage = _lerp(foliage, _c(40, 120, 45.0), w[5])
    foliage = _lerp(foliage, _c(120, 100, 60.0), brown * 0.7).astype(np.float32)
    cv.visibility = float(np.clip(600 * (1.3 - p["moisture"]) * (1.2 - 0.6 * p["cloud"])
                                  * math.exp(0.3 * rng.standard_normal()), 120, 1500))
    _sky(cv, p, rng)
    _backdrop(cv, p, rng, ground_col, foliage)

    # The road: the camera drives in its lane, on the right or the left of the centre line.
    side = -1.0 if style.left_driving else 1.0          # +1: keep right
    lanes = int(p["lanes"])
    dirt = p["road_u"] < style.dirt_share * (1 - p["urban"]) ** 2
    if dirt:
        lanes = 1
    lane_w = style.lane_width
    urban = p["urban"] > 0.35
    road = {
        "half": lanes * lane_w, "lanes": lanes, "dirt": dirt,
        "phase": rng.uniform(0, 20), "shoulder_w": 2.2 if urban else rng.uniform(0.3, 1.5),
        "shoulder": (168, 166, 160) if urban else style.shoulder,
        "kerb": style.kerb if (urban and not dirt) else None,
    }
    cv.xc = -side * lane_w * (lanes - 0.5) + rng.normal(0, 0.25)   # centre line relative to us
    cv.curv = rng.normal(0, 0.0006) * (0.3 if urban else 1.0)
    _ground(cv, p, style, rng, ground_col, ground_col2, tex_amp, road)

    # Roadside objects, far to near.
    objects = []
    edge = road["half"] + road["shoulder_w"]
    if urban:
        for s in (-1.0, 1.0):
            if rng.random() < 0.85:
                z, x = rng.uniform(4, 10), cv.xc + s * (edge + rng.uniform(0.5, 4))
                while z < 160:
                    length = rng.uniform(8, 30)
                    height = rng.uniform(4, 8 + 40 * p["urban"] ** 2)
                    col = np.asarray(style.walls[rng.integers(3)], float) * rng.uniform(0.85, 1.1)
                    objects.append((z, "facade", (x, z, z + length, height, col)))
                    z += length + rng.uniform(0, 6)
    n_trees = int(rng.poisson(float(w @ _TREES) * (1 - 0.7 * p["urban"]) * 1.2))
    conifer = w[3] + w[4] + (w[2] if p["temperature"] < 8 else 0) > 0.4
    palm = w[5] > 0.4 or (w[0] > 0.5 and rng.random() < 0.3)
    for _ in range(min(n_trees, 14)):
        s = rng.choice([-1.0, 1.0])
        z = rng.uniform(6, 110)
        objects.append((z, "tree", (cv.xc + s * (edge + rng.uniform(1.5, 18)), z, rng.uniform(4, 14))))
    pole_side = side * (1 if rng.random() < 0.7 else -1)
    spacing, z = rng.uniform(25, 45), rng.uniform(5, 25)
    if rng.random() < 0.8:
        while z < 160:
            objects.append((z, "pole", (cv.xc + pole_side * (edge + 0.6), z)))
            z += spacing
    if not urban and rng.random() < style.post_share:
        for s in (-1.0, 1.0):
            z = rng.uniform(3, 15)
            while z < 120:
                objects.append((z, "post", (cv.xc + s * (road["half"] + 0.5), z)))
                z += 50.0
    for _ in range(rng.choice([0, 1, 1, 2])):
        z = rng.uniform(7, 35)
        kind = SIGN_SHAPES[rng.choice(len(SIGN_SHAPES), p=np.asarray(style.sign_weights) / sum(style.sign_weights))]
        objects.append((z, "sign", (cv.xc + side * (edge + 0.4), z, kind)))
    if rng.random() < 0.3:
        z = rng.uniform(12, 70)
        objects.append((z, "car", (cv.xc - side * lane_w / 2, z, True)))
    if rng.random() < 0.25:
        z = rng.uniform(12, 50)
        objects.append((z, "car", (cv.xc + side * lane_w / 2, z, False)))
    objects.sort(key=lambda o: -o[0])
    snow = p["snow"]
    for _, kind, a in objects:
        if kind == "facade":
            _facade(cv, a[0], a[1], a[2], a[3], a[4], rng)
        elif kind == "tree":
            x, z, h = a
            trunk = (88, 66, 46)
            leaf = foliage * rng.uniform(0.8, 1.15)
            if palm:
                cv.post(x, z, 0.35, 0, h, (120, 100, 70))
                cv.shape(x, h, z, 2.6, "rect", _lerp(leaf, _c(70, 120, 50.0), 0.4), stretch=0.25)
            elif conifer:
                cv.post(x, z, 0.35, 0, h * 0.3, trunk)
                leaf = _lerp(_c(30, 58, 38.0) * rng.uniform(0.8, 1.2), _c(225, 230, 238.0), snow * 0.6)
                cv.shape(x, h * 0.62, z, h * 0.42, "triangle", leaf, stretch=1.3)
            else:
                cv.post(x, z, 0.4, 0, h * 0.6, trunk)
                leaf = _lerp(leaf, _c(110, 95, 80.0), snow * 0.8)
                cv.shape(x, h * 0.7, z, h * 0.3, "circle", leaf, stretch=0.9)
        elif kind == "pole":
            x, z = a
            cv.post(x, z, 0.28, 0, 8.5, style.pole_color)
            if style.pole_band is not None:
                cv.post(x, z, 0.3, 0.3, 1.0, style.pole_band)
                cv.post(x, z, 0.3, 1.6, 2.2, style.pole_band)
            if style.pole_arm:
                xa = x - np.sign(x - cv.xc) * 1.0
                cv.post(xa, z, 2.0, 8.2, 8.45, style.pole_color)
        elif kind == "post":
            x, z = a
            cv.post(x, z, 0.14, 0, 1.0, style.post_body)
            cv.post(x, z, 0.15, 0.75, 0.9, style.post_band)
        elif kind == "sign":
            x, z, shape = a
            cv.post(x, z, 0.08, 0, 2.3, style.sign_pole)
            fill, border = style.sign_fill, style.sign_border
            if shape == "rect":
                fill, border = ((30, 80, 160), (240, 240, 240)) if rng.random() < 0.5 else ((30, 120, 70), (240, 240, 240))
            elif shape == "octagon":
                fill, border = (200, 30, 35), (240, 240, 240)
            cv.shape(x, 2.55, z, 0.42, shape, fill, border, border_frac=0.2)
        elif kind == "car":
            x, z, front = a
            col = [(200, 200, 205), (25, 25, 30), (150, 30, 30), (40, 70, 140), (120, 120, 125),
                   (235, 235, 235)][rng.integers(6)]
            _car(cv, x, z, col, front)

    # The camera car's bonnet, for the countries whose imagery shows it.
    if p["hood_u"] < style.hood_share:
        xs = (cv.U - cv.w / 2) / (cv.w / 2)
        top = cv.h * (1 - 0.1 * (1 - 0.45 * xs * xs))
        cover = np.clip(cv.V - top + 0.5, 0, 1)
        shade = 0.75 + 0.25 * np.clip((cv.h - cv.V) / (0.1 * cv.h), 0, 1)
        cv.img += (np.asarray(style.hood_color, np.float32) * shade[..., None] - cv.img) * cover[..., None]

    # Light: sun elevation, overcast, warm low sun; then the camera's exposure and noise.
    el = p["sun_el"]
    if el > 0:
        light = 0.3 + 0.7 * math.sin(math.radians(el)) ** 0.45
    else:
        light = max(0.12, 0.3 + 0.03 * el)
    light *= 1 - 0.3 * p["cloud"]
    warm = math.exp(-max(el, 0.0) / 10.0) * (1 - 0.7 * p["cloud"])
    gain = light ** 0.7 * math.exp(0.12 * rng.standard_normal())
    tint = np.array([1 + 0.12 * warm, 1 + 0.02 * warm, 1 - 0.15 * warm], np.float32)
    tint *= np.exp(0.04 * rng.standard_normal(3)).astype(np.float32)   # white balance
    img = cv.img * (gain * tint)
    img *= (1 - rng.uniform(0.025, 0.15) * _radius2(size))[..., None]
    oy, ox = rng.integers(0, 512 - size, 2) if size < 512 else (0, 0)
    img += _sensor_noise()[oy:oy + size, ox:ox + size] * np.float32(rng.uniform(1.5, 6.0))
    out = np.clip(img, 0, 255, out=img).astype(np.uint8)
    z_bottom = cv.f * cv.cam_h / max(cv.h - 0.5 - cv.v0, 1.0)     # depth seen at the bottom row
    layout = {
        "left_driving": style.left_driving,
        "road_centre_x": float(cv.project(cv.xc, 0.0, z_bottom)[0]),
        "vanishing_x": float(cv.vx), "horizon_y": float(cv.v0), "dirt": bool(dirt), "lanes": lanes,
        "objects": [k for _, k, _ in objects],
    }
    return out, layout


def encode_jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


_SCENE_KEYS = ("lat", "lon", "country", "heading", "cam_h", "focal", "horizon", "road_u", "lanes",
               "hood_u", "urban", "temperature", "moisture", "relief", "sun_el", "sun_az",
               "temp_now", "snow", "green", "cloud")


def scene_params(world: dict[str, np.ndarray], i: int) -> dict:
    """Row ``i`` of sample_world as the plain dict that render_scene takes."""
    p = {k: (str(world[k][i]) if k == "country" else float(world[k][i])) for k in _SCENE_KEYS}
    p["lanes"] = int(p["lanes"])
    p["biome_w"] = np.asarray(world["biome_w"][i], dtype=np.float64)
    return p
