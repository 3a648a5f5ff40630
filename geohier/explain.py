"""Why this guess: occlusion sensitivity, for any backbone; Grad-CAM for CNNs and ViTs.

The photo is cut, over the square the model actually sees (the preset's resize and centre
crop), into a ``grid`` x ``grid`` of patches. Each patch in turn is painted with the
preset's mean colour (zero after normalisation: "no information"), and the masked photos
go through the Predictor's own forward in batches. For each patch two numbers are
recorded:

- ``drop``: how much the joint probability of the unmasked guess's best finest cell falls
  (temperatures applied; negative when masking the patch makes the model surer);
- ``moved_km``: how far the guess (the Predictor's default walk, the point ``predict``
  answers) moves.

A patch the guess depends on lights up; a patch it ignores stays dark. The cost is
``grid**2 + 1`` forwards per photo (50 at 7 x 7), batched: see the README for seconds per
photo. ``overlay`` blends the values, as a heat map, over the photo (outside the square
the model sees, the photo is dimmed).

``gradcam`` is the cheap alternative (one forward and one backward): a feature map
weighted by the gradient of the same best cell's log joint probability. For a CNN it is
the last spatial feature map (7 x 7 for resnet50 at 224 px); for a ViT (timm,
transformers, OpenCLIP) the patch tokens of its last LayerNorm that the guess depends on,
laid back on their grid (14 x 14 for ViT-B/16 at 224 px; the input norm of the last block
when the class token is pooled). It shows where the evidence sits in the features;
occlusion measures what the guess actually loses, patch by patch.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from geohier import geodesy
from geohier.errors import InputError

DEFAULT_GRID = 7
MAX_GRID = 16
MEASURES = ("drop", "moved_km")
#: The heat ramp: transparent-ish yellow to red.
HEAT = ((255, 255, 178), (254, 204, 92), (253, 141, 60), (240, 59, 32), (189, 0, 38))


@dataclass
class Explanation:
    """Occlusion sensitivity of one photo. ``drop`` and ``moved_km``: (grid, grid) arrays,
    row 0 at the top; ``box``: the square the model sees, as fractions (x0, y0, x1, y1) of
    the photo's width and height; ``base``: the unmasked guess."""

    grid: int
    drop: np.ndarray
    moved_km: np.ndarray
    box: tuple[float, float, float, float]
    base: dict
    seconds: float
    forwards: int
    extra: dict = field(default_factory=dict)

    def values(self, measure: str = "drop") -> np.ndarray:
        if measure not in MEASURES:
            raise InputError(f"unknown measure {measure!r}; use one of {', '.join(MEASURES)}")
        return self.drop if measure == "drop" else self.moved_km

    def to_dict(self) -> dict:
        return {"grid": self.grid, "box": [round(float(v), 6) for v in self.box], "base": self.base,
                "drop": np.round(self.drop, 6).tolist(), "moved_km": np.round(self.moved_km, 3).tolist(),
                "seconds": round(self.seconds, 3), "forwards": self.forwards,
                "measures": {"drop": "fall of the best cell's joint probability when the patch is masked",
                             "moved_km": "distance the guess moves when the patch is masked"}, **self.extra}


def _check_grid(grid) -> int:
    try:
        g = int(grid)
    except (TypeError, ValueError):
        raise InputError(f"the occlusion grid must be a whole number, got {grid!r}") from None
    if not 1 <= g <= MAX_GRID:
        raise InputError(f"the occlusion grid must be 1 to {MAX_GRID} patches a side, got {g}")
    return g


def model_view(img: Image.Image, preset) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """``(photo resized as the preset resizes it, (left, top, right, bottom) of the centre
    crop the model sees in it)``. Feeding the resized photo to the preset again leaves it
    as is (Pillow returns a copy for a same-size resize), so masks painted on it land on
    exactly the pixels the model reads."""
    w, h = img.size
    s = int(preset.resize_size)
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = s, int(s * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    small = img if img.size == size else img.resize(size, resample=_resample(preset))
    c = int(preset.image_size)
    left = int(round((size[0] - c) / 2.0))
    top = int(round((size[1] - c) / 2.0))
    return small, (left, top, left + c, top + c)


def _resample(preset) -> int:
    name = str(getattr(preset, "interpolation", "bilinear")).lower()
    return {"nearest": Image.NEAREST, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}.get(name, Image.BILINEAR)


def patches(box: tuple[int, int, int, int], grid: int) -> list[tuple[int, int, int, int]]:
    """The grid's patches, row by row from the top left, as pixel boxes covering ``box``.

    >>> patches((0, 0, 8, 8), 2)
    [(0, 0, 4, 4), (4, 0, 8, 4), (0, 4, 4, 8), (4, 4, 8, 8)]
    """
    x0, y0, x1, y1 = box
    xs = np.linspace(x0, x1, grid + 1).round().astype(int)
    ys = np.linspace(y0, y1, grid + 1).round().astype(int)
    return [(int(xs[j]), int(ys[i]), int(xs[j + 1]), int(ys[i + 1])) for i in range(grid) for j in range(grid)]


def occlusion(predictor, img: Image.Image, grid: int = DEFAULT_GRID, batch_size: int = 16,
              temperature: bool = True, walk: str | None = None) -> Explanation:
    """Occlusion sensitivity of one RGB photo through ``predictor`` (a
    ``geohier.predictor.Predictor``): see the module docstring."""
    g = _check_grid(grid)
    if batch_size < 1:
        raise InputError(f"the batch size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    img = img.convert("RGB")
    preset = predictor.presets[0]
    small, box = model_view(img, preset)
    fill = tuple(int(round(255 * v)) for v in preset.mean)
    boxes = patches(box, g)
    walk = walk or predictor.default_walk

    def masked(b):
        im = small.copy()
        im.paste(fill, b)
        return im

    def run(images) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
        z = predictor.logits(images)
        pts = predictor.points(z, walk)
        return pts.lat, pts.lon, pts.cls, predictor.log_joint(z, temperature)

    blat, blon, bcls, blogp = run([small])
    best = int(bcls[0])
    p0 = float(blogp[0, best].exp())
    drop, moved = np.zeros(len(boxes)), np.zeros(len(boxes))
    for i in range(0, len(boxes), batch_size):
        part = boxes[i:i + batch_size]
        lat, lon, _, logp = run([masked(b) for b in part])
        drop[i:i + len(part)] = p0 - logp[:, best].exp().double().numpy()
        moved[i:i + len(part)] = geodesy.haversine_km(lat, lon, np.full(len(part), blat[0]),
                                                      np.full(len(part), blon[0]))
    w, h = small.size
    frac = (box[0] / w, box[1] / h, box[2] / w, box[3] / h)
    cell = predictor.cells[predictor.finest][best]
    base = {"cell": cell, "lat": float(blat[0]), "lon": float(blon[0]), "prob": p0, "walk": walk}
    return Explanation(g, drop.reshape(g, g), np.nan_to_num(moved).reshape(g, g), frac, base,
                       time.perf_counter() - t0, len(boxes) + 1)


@dataclass
class ActivationMap:
    """Grad-CAM of one photo: ``cam`` (h, w) on a CNN's last spatial feature map or a ViT's
    patch grid (row 0 at the top), ``layer`` its module name; ``box`` and ``base`` as
    ``Explanation``'s."""

    cam: np.ndarray
    layer: str
    box: tuple[float, float, float, float]
    base: dict
    seconds: float
    forwards: int = 1
    smooth: bool = True  # drawn interpolated: a feature map's cells are not patches

    def values(self, measure: str = "cam") -> np.ndarray:
        return self.cam

    def to_dict(self) -> dict:
        return {"method": "gradcam", "layer": self.layer, "shape": list(self.cam.shape),
                "box": [round(float(v), 6) for v in self.box], "base": self.base,
                "cam": np.round(self.cam, 6).tolist(), "seconds": round(self.seconds, 3),
                "measures": {"cam": "Grad-CAM: the feature map weighted by the gradient of the best cell's "
                                    "log joint probability, positive part"}}


METHODS = ("occlusion", "gradcam")


#: Most tokens a ViT puts before its patch tokens (a class token, registers: DINOv2 has 1 + 4).
MAX_PREFIX_TOKENS = 16


def _patch_grid(tokens: int, height: int, width: int) -> tuple[int, int, int] | None:
    """``(prefix, h, w)``: how ``tokens`` split into leading extra tokens and an h x w patch
    grid of the input's aspect, the fewest extra tokens first; None when no split fits.

    >>> _patch_grid(197, 224, 224), _patch_grid(261, 224, 224), _patch_grid(21, 32, 64)
    ((1, 14, 14), (5, 16, 16), (3, 3, 6))
    """
    for exact in (True, False):  # the input's exact aspect first, then one a patch size floors to
        for prefix in range(min(MAX_PREFIX_TOKENS, tokens - 4) + 1):  # a grid of at least 2 x 2
            n = tokens - prefix
            h = max(1, round(math.sqrt(n * height / width)))
            if n % h:
                continue
            w = n // h
            if h * width == w * height if exact else abs(h * width - w * height) < 0.15 * w * height:
                return prefix, h, w
    return None


def _token_layout(t: torch.Tensor) -> int | None:
    """The token axis of a LayerNorm's output for a batch of one: 1 for (1, T, D) (timm,
    transformers), 0 for (T, 1, D) (older open_clip); None for anything else."""
    if t.dim() != 3:
        return None
    if t.shape[0] == 1 and t.shape[1] > 1:
        return 1
    if t.shape[1] == 1 and t.shape[0] > 1:
        return 0
    return None


def _record(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict, list[tuple[str, torch.nn.Module, torch.Tensor]]]:
    """One forward of ``x`` that records, in order, the outputs Grad-CAM can work on:
    spatial feature maps (4-D, more than 1 x 1) and LayerNorm outputs over tokens; the graph
    kept from the input on (the weights held fixed, so nothing upstream of the input is
    recorded)."""
    names = {m: n for n, m in model.named_modules()}
    seen: list[tuple[str, torch.nn.Module, torch.Tensor]] = []

    def note(mod, _inp, out):
        if not isinstance(out, torch.Tensor):
            return
        if out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
            seen.append(("map", mod, out))
        elif isinstance(mod, torch.nn.LayerNorm) and _token_layout(out) is not None:
            seen.append(("tokens", mod, out))

    hooks = [m.register_forward_hook(note) for m in model.modules()]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            out = model(x.requires_grad_(True))
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    return out, [(kind, names.get(mod, "?"), t) for kind, mod, t in seen]


def _cam(kind: str, a: torch.Tensor, grad: torch.Tensor, size: tuple[int, int]) -> np.ndarray | None:
    """Grad-CAM of one recorded output: channels weighted by their mean gradient over the
    positions, summed, positive part. Tokens are laid back on their patch grid (the extra
    leading tokens dropped); None when the tokens make no grid or their gradient is 0 (the
    patch tokens of a ViT's last block, which a class-token pooling never reads)."""
    if kind == "map":
        a, grad = a.detach()[0].float(), grad[0].float()  # (C, h, w)
        weights = grad.mean(dim=(1, 2))
        return torch.relu((weights[:, None, None] * a).sum(0)).cpu().numpy().astype(np.float64)
    axis = _token_layout(a)
    a, grad = a.detach().float().movedim(axis, 0)[:, 0], grad.float().movedim(axis, 0)[:, 0]  # (T, D)
    grid = _patch_grid(a.shape[0], *size)
    if grid is None:
        return None
    prefix, h, w = grid
    a, grad = a[prefix:], grad[prefix:]
    if not bool(grad.abs().sum() > 0):
        return None
    weights = grad.mean(dim=0)  # (D,)
    return torch.relu(a @ weights).reshape(h, w).cpu().numpy().astype(np.float64)


def gradcam(predictor, img: Image.Image, temperature: bool = True, walk: str | None = None) -> ActivationMap:
    """Grad-CAM (Selvaraju et al. 2017) of one RGB photo: a feature map A of the backbone,
    weighted per channel by the mean gradient of the log joint probability of the guess's
    best finest cell (the cell ``predict`` answers), summed over channels, positive part.
    One forward with its graph and part of a backward, beside the plain forward that finds
    the guess.

    A CNN's A is its last spatial feature map. A ViT's is the last LayerNorm over tokens
    whose patch tokens the guess depends on (the input norm of the last block's attention,
    the usual ViT Grad-CAM target: the last block's own patch outputs reach nothing when the
    class token is pooled), its patch tokens laid back on their grid. Single-model runs;
    InputError otherwise, or when the backbone has neither."""
    if len(predictor.models) != 1:
        raise InputError("Grad-CAM needs a single-model run; this predictor combines "
                         f"{len(predictor.models)} runs (use occlusion)")
    t0 = time.perf_counter()
    img = img.convert("RGB")
    preset, model = predictor.presets[0], predictor.models[0]
    small, box = model_view(img, preset)
    walk = walk or predictor.default_walk
    pts = predictor.points(predictor.logits([small]), walk)
    best = int(pts.cls[0])
    x = preset(small)[None].to(predictor.device)
    out, seen = _record(model, x)
    # a ViT's token norms, the latest first (its 4-D tensors are attention's or the patch
    # embedding's); then, or for a CNN, the last spatial feature map
    maps = [item for item in seen if item[0] == "map"]
    candidates = [item for item in seen if item[0] == "tokens"][::-1] + maps[-1:]
    if not candidates:
        raise InputError("Grad-CAM needs a backbone with a spatial feature map (a CNN such as resnet50) or "
                         "LayerNorms over patch tokens (a ViT); this one has neither: use occlusion")
    with torch.enable_grad():
        logits = {lv: out[lv].float() for lv in predictor.levels}
        target = predictor.log_joint(logits, temperature)[0, best]
        grads = torch.autograd.grad(target, [t for _, _, t in candidates], allow_unused=True)
    cam = layer = None
    for (kind, name, a), grad in zip(candidates, grads, strict=True):  # the latest that works
        cam = None if grad is None else _cam(kind, a, grad, tuple(x.shape[-2:]))
        if cam is not None:
            layer = name
            break
    if cam is None:
        raise InputError("Grad-CAM found no feature map the guess depends on in this backbone: use occlusion")
    w, h = small.size
    frac = (box[0] / w, box[1] / h, box[2] / w, box[3] / h)
    base = {"cell": predictor.cells[predictor.finest][best], "lat": float(pts.lat[0]), "lon": float(pts.lon[0]),
            "prob": float(target.detach().exp()), "walk": walk}
    return ActivationMap(cam, layer, frac, base, time.perf_counter() - t0)


def explain(predictor, img: Image.Image, method: str = "occlusion", grid: int = DEFAULT_GRID, batch_size: int = 16,
            temperature: bool = True):
    """``occlusion`` or ``gradcam`` of one photo (any backbone)."""
    if method == "occlusion":
        return occlusion(predictor, img, grid, batch_size, temperature)
    if method == "gradcam":
        return gradcam(predictor, img, temperature)
    raise InputError(f"unknown explanation method {method!r}; use one of {', '.join(METHODS)}")


def _heat(t: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 colours of values in [0, 1] along HEAT."""
    stops = np.asarray(HEAT, dtype=float)
    pos = np.linspace(0, 1, len(stops))
    return np.stack([np.interp(t, pos, stops[:, c]) for c in range(3)], axis=-1).round().astype(np.uint8)


def normalised(values: np.ndarray) -> np.ndarray:
    """Values scaled to [0, 1] by their maximum (negatives: 0; all zero: zeros).

    >>> normalised(np.array([[-1.0, 0.5], [1.0, 2.0]])).tolist()
    [[0.0, 0.25], [0.5, 1.0]]
    """
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=float)), 0, None)
    top = float(v.max()) if v.size else 0.0
    return v / top if top > 0 else np.zeros_like(v)


def overlay(photo: Image.Image, expl: Explanation | ActivationMap, measure: str = "drop",
            alpha: float = 0.6) -> Image.Image:
    """The photo with the explanation's heat map blended over the square the model sees
    (opacity ``alpha`` times the value: an ignored patch shows the photo as is); the rest
    of the photo dimmed. Occlusion in nearest-neighbour blocks (a patch is a patch), a
    Grad-CAM map interpolated."""
    photo = photo.convert("RGB")
    w, h = photo.size
    t = normalised(expl.values(measure))
    x0, y0, x1, y1 = (int(round(f * s)) for f, s in zip(expl.box, (w, h, w, h), strict=True))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    how = Image.BILINEAR if getattr(expl, "smooth", False) else Image.NEAREST
    heat = Image.fromarray(_heat(t)).resize((x1 - x0, y1 - y0), how)
    mask = Image.fromarray((255 * alpha * t).round().astype(np.uint8)).resize((x1 - x0, y1 - y0), how)
    out = Image.blend(photo, Image.new("RGB", photo.size, (0, 0, 0)), 0.45)  # dim everything...
    inside = photo.crop((x0, y0, x1, y1))
    out.paste(Image.composite(heat, inside, mask), (x0, y0))  # ...but the model's square
    return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_explanations(predictor, sources: Sequence, out_dir, names: Sequence[str] | None = None,
                       grid: int = DEFAULT_GRID, batch_size: int = 16, temperature: bool = True,
                       measure: str = "drop", method: str = "occlusion") -> list[dict]:
    """``predict --explain DIR``: for each readable photo, ``<stem>.explain.png`` (the
    overlay) and ``<stem>.explain.json`` (the grid values) in ``out_dir``. Returns one
    record per source: ``{"image", "png", "json", "seconds"}`` or ``{"image", "error"}``."""
    from geohier.errors import GeohierError

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--explain {out_dir}: not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--explain {out_dir}: cannot create the directory ({exc.strerror or exc})") from None
    records, used = [], set()
    for i, src in enumerate(sources):
        name = names[i] if names is not None else str(src)
        try:
            img, _ = predictor.read_image(src, name)
        except GeohierError as exc:
            records.append({"image": name, "error": str(exc)})
            continue
        expl = explain(predictor, img, method, grid, batch_size, temperature)
        stem = Path(name).stem or f"image{i + 1}"
        while stem in used:
            stem += "_"
        used.add(stem)
        png, js = out / f"{stem}.explain.png", out / f"{stem}.explain.json"
        try:
            overlay(img, expl, measure).save(png, format="PNG")
            js.write_text(json.dumps({"image": name, **expl.to_dict()}, indent=1), encoding="utf-8")
        except OSError as exc:
            raise InputError(f"--explain {out_dir}: cannot write ({exc.strerror or exc})") from None
        record = {"image": name, "png": str(png), "json": str(js), "seconds": expl.seconds}
        if isinstance(expl, Explanation):
            record.update(drop_max=float(expl.drop.max()), moved_km_max=float(expl.moved_km.max()))
        records.append(record)
    return records
