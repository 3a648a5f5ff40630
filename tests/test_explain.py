"""geohier.explain: occlusion sensitivity with known answers (a constructed model that only
looks at the top-left quadrant of its input), the overlay PNG, and `predict --explain`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CITIES
from PIL import Image

from geohier import explain
from geohier.errors import InputError
from geohier.hierarchy import build_hierarchy
from geohier.predictor import Predictor
from geohier.presets import EvalPreset


class TopLeft(torch.nn.Module):
    """Logits of every level from the mean of the top-left quadrant of the input alone:
    class c of C gets ``scale * m * (c - C/2) / C``; a brighter top-left favours the last
    classes. Nothing else in the photo matters."""

    def __init__(self, num_classes: dict[int, int], scale: float = 8.0):
        super().__init__()
        self.num_classes = dict(num_classes)
        self.scale = scale

    def forward(self, x):
        s = x.shape[-1] // 2
        m = x[:, :, :s, :s].mean(dim=(1, 2, 3))  # (B,)
        return {lv: self.scale * m[:, None] * (torch.arange(c, dtype=torch.float32) - c / 2) / c
                for lv, c in self.num_classes.items()}


def top_left_predictor(image_size=32):
    lat = [c[0] + 0.01 * j for c in CITIES for j in range(3)]
    lon = [c[1] + 0.01 * j for c in CITIES for j in range(3)]
    h = build_hierarchy(lat, lon, (1, 3, 5), min_images=1)
    model = TopLeft({lv: h.num_classes[lv] for lv in h.levels}).eval()
    meta = {"hierarchy": h.to_dict(), "hierarchy_hash": h.hash, "input": EvalPreset(image_size).to_dict(),
            "arch": {"levels": list(h.levels)}, "temperatures": {}}
    return Predictor([(model, meta, Path("top-left"))], "cpu")


def photo(size=64):
    """White top-left quadrant (the model's favourite), a noisy rest."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    a[:size // 2, :size // 2] = 255
    return Image.fromarray(a)


def test_occlusion_lights_up_the_region_the_model_reads():
    pred = top_left_predictor()
    e = explain.occlusion(pred, photo(), grid=4, batch_size=5)
    assert e.drop.shape == e.moved_km.shape == (4, 4)
    assert e.forwards == 17
    assert e.box == (0.0, 0.0, 1.0, 1.0)  # a square photo: the model sees all of it
    # the top-left 2 x 2 patches are the top-left quadrant of the model's input
    inside = np.zeros((4, 4), bool)
    inside[:2, :2] = True
    assert (e.drop[inside] > 0.01).all()
    assert np.abs(e.drop[~inside]).max() < 1e-6  # masking elsewhere changes nothing
    assert (e.moved_km[~inside] == 0).all()
    assert e.base["prob"] > 0 and e.base["cell"] == pred.cells[pred.finest][-1]
    # the values are what a direct forward of the masked photo says
    small, box = explain.model_view(photo(), pred.presets[0])
    im = small.copy()
    im.paste(tuple(int(round(255 * v)) for v in pred.presets[0].mean), explain.patches(box, 4)[0])
    p = pred.log_joint(pred.logits([im]))[0, -1].exp().item()
    assert e.drop[0, 0] == pytest.approx(e.base["prob"] - p, abs=1e-6)


def test_occlusion_on_a_wide_photo_masks_only_what_the_model_sees():
    pred = top_left_predictor()
    wide = Image.new("RGB", (128, 64), (0, 0, 0))
    wide.paste((255, 255, 255), (32, 0, 64, 32))  # the top-left quadrant of the centre crop
    e = explain.occlusion(pred, wide, grid=2)
    assert e.box == pytest.approx((0.25, 0.0, 0.75, 1.0))
    assert e.drop[0, 0] > 0.01 and np.abs(e.drop.ravel()[1:]).max() < 1e-6


def test_overlay_heats_the_patch_and_keeps_the_size():
    pred = top_left_predictor()
    img = photo(96)
    e = explain.occlusion(pred, img, grid=4)
    out = explain.overlay(img, e)
    assert out.size == img.size and out.mode == "RGB"
    a = np.asarray(out).astype(int)
    src = np.asarray(img).astype(int)
    assert np.abs(a[:48, :48] - src[:48, :48]).mean() > 20  # heat over the top-left
    assert np.abs(a[60:, 60:] - src[60:, 60:]).max() <= 1  # an ignored patch shows the photo as is
    png = explain.png_bytes(out)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_grid_and_measure_are_one_line():
    pred = top_left_predictor()
    with pytest.raises(InputError, match="grid must be 1 to 16"):
        explain.occlusion(pred, photo(), grid=0)
    e = explain.occlusion(pred, photo(), grid=1)
    with pytest.raises(InputError, match="unknown measure"):
        e.values("nope")


def test_write_explanations_writes_a_png_and_json_per_image(tmp_path, make_jpeg):
    pred = top_left_predictor()
    a = tmp_path / "a.png"
    photo().save(a)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a picture")
    recs = explain.write_explanations(pred, [a, bad], tmp_path / "out", grid=4)
    assert recs[0]["png"].endswith("a.explain.png") and "error" in recs[1]
    assert Image.open(recs[0]["png"]).size == (64, 64)
    data = json.loads(Path(recs[0]["json"]).read_text())
    assert data["grid"] == 4 and len(data["drop"]) == 4 and data["drop"][3][3] == pytest.approx(0, abs=1e-6)
    assert data["drop"][0][0] > 0.01


def _cli(argv):
    from pipeline import cli

    saved = cli.COMMAND_MODULES
    cli.COMMAND_MODULES = ("pipeline.predict",)
    try:
        return cli.main(argv)
    finally:
        cli.COMMAND_MODULES = saved


@pytest.mark.slow
@pytest.mark.slow  # the CLI end to end on a tiny resnet18 run (~4 s)
def test_predict_explain_writes_overlays(ws, tmp_path, make_jpeg, capsys):
    from test_predictor import make_tiny_run, tiny_hierarchy

    make_tiny_run(ws.models_dir / "tiny", tiny_hierarchy())
    good = make_jpeg(tmp_path / "paris.jpg", size=(80, 60), color=(200, 60, 60))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    out = tmp_path / "why"
    rc = _cli(["predict", str(good), str(bad), "--json", "--explain", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert f"explanations: 1 overlay(s) in {out}" in err and "s per photo" in err
    assert Image.open(out / "paris.explain.png").size == (80, 60)
    data = json.loads((out / "paris.explain.json").read_text())
    assert data["grid"] == explain.DEFAULT_GRID and data["forwards"] == explain.DEFAULT_GRID ** 2 + 1
    assert np.asarray(data["moved_km"]).shape == (7, 7) and data["image"] == str(good)
    # a file where the directory should be: one line, exit 2, before any forward
    (tmp_path / "afile").write_text("x")
    assert _cli(["predict", str(good), "--explain", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert "--explain" in err and "not a directory" in err and "Traceback" not in err
    # Grad-CAM on the resnet18 run: at 32 px layer4's map is 1 x 1, so layer3's 2 x 2 it is
    out2 = tmp_path / "cam"
    assert _cli(["predict", str(good), "--explain", str(out2), "--explain-method", "gradcam"]) == 0
    data = json.loads((out2 / "paris.explain.json").read_text())
    assert data["method"] == "gradcam" and data["layer"].endswith("layer3") and data["shape"] == [2, 2]
    assert np.asarray(data["cam"]).ndim == 2 and Image.open(out2 / "paris.explain.png").size == (80, 60)


# ----------------------------------------------------------------------------- Grad-CAM


class TopLeftCNN(torch.nn.Module):
    """A conv layer (the mean of a 3 x 3 x 3 window) whose map is positive on bright pixels
    and negative on dark ones, then logits from the mean of the map's top-left quadrant,
    as ``TopLeft``: the evidence sits in the top-left features and nowhere else."""

    def __init__(self, num_classes: dict[int, int], scale: float = 8.0):
        super().__init__()
        self.num_classes = dict(num_classes)
        self.scale = scale
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1, bias=True)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 27)
            self.conv.bias.fill_(-0.5)
        for p in self.parameters():
            p.requires_grad_(False)  # frozen weights: Grad-CAM still gets its gradient

    def forward(self, x):
        a = torch.relu(self.conv(x))
        s = a.shape[-1] // 2
        m = a[:, :, :s, :s].mean(dim=(1, 2, 3))
        return {lv: self.scale * m[:, None] * (torch.arange(c, dtype=torch.float32) - c / 2) / c
                for lv, c in self.num_classes.items()}


def test_gradcam_lights_up_the_features_the_guess_reads():
    p = top_left_predictor()
    p.models[0] = TopLeftCNN(p.models[0].num_classes).eval()
    a = np.zeros((64, 64, 3), dtype=np.uint8)
    a[:32, :32] = 255  # white top-left, black elsewhere
    cam = explain.gradcam(p, Image.fromarray(a))
    assert cam.layer == "conv" and cam.cam.shape == (32, 32) and cam.forwards == 1
    assert (cam.cam[:12, :12] > 0).all()  # the bright features the logits read
    assert (cam.cam[20:, :] == 0).all() and (cam.cam[:, 20:] == 0).all()  # dark: nothing
    assert cam.base["cell"] == explain.occlusion(p, Image.fromarray(a), grid=2).base["cell"]
    over = explain.overlay(Image.fromarray(a), cam)
    assert over.size == (64, 64)
    assert json.loads(json.dumps(cam.to_dict()))["method"] == "gradcam"


class TinyViT(torch.nn.Module):
    """A ViT's shape with a known answer: 8 x 8 patches embedded in 4 channels (+ and - the
    patch's mean brightness, then 0, 0), a class token in front, a LayerNorm over the
    tokens, then the class token (a learnt constant) takes in the top-left quadrant's
    patches (a hand-wired attention), a final LayerNorm runs over every token, and the
    class token alone goes on (so the final norm's patch outputs reach nothing, as in a
    class-token-pooled ViT)."""

    def __init__(self, num_classes: dict[int, int], scale: float = 8.0):
        super().__init__()
        self.num_classes, self.scale = dict(num_classes), scale
        self.patch_embed = torch.nn.Conv2d(3, 4, 8, stride=8, bias=False)
        with torch.no_grad():
            self.patch_embed.weight.zero_()
            self.patch_embed.weight[0].fill_(1 / 192)
            self.patch_embed.weight[1].fill_(-1 / 192)
        self.cls_token = torch.nn.Parameter(torch.tensor([[[0.0, 0.0, 1.0, 0.0]]]))
        self.norm1 = torch.nn.LayerNorm(4, elementwise_affine=False)
        self.norm = torch.nn.LayerNorm(4, elementwise_affine=False)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, g*g, 4)
        g = int(round(t.shape[1] ** 0.5))
        a = self.norm1(torch.cat([self.cls_token.expand(t.shape[0], 1, 4), t], dim=1))
        top_left = [1 + r * g + c for r in range(g // 2) for c in range(g // 2)]
        cls = self.cls_token[:, 0] + a[:, top_left].mean(1)
        m = self.norm(torch.cat([cls[:, None], a[:, 1:]], dim=1))[:, 0, 0]  # class-token pooling
        return {lv: self.scale * m[:, None] * (torch.arange(c, dtype=torch.float32) - c / 2) / c
                for lv, c in self.num_classes.items()}


def test_gradcam_of_a_vit_lights_up_the_patches_the_class_token_reads():
    p = top_left_predictor()  # 32 px: a 4 x 4 patch grid
    p.models[0] = TinyViT(p.models[0].num_classes).eval()
    a = np.zeros((64, 64, 3), dtype=np.uint8)
    a[:32, :32] = 255  # white top-left, black elsewhere
    cam = explain.gradcam(p, Image.fromarray(a))
    # the last token norm (norm) is passed over: its patch outputs reach nothing
    assert cam.layer == "norm1" and cam.cam.shape == (4, 4)
    assert (cam.cam[:2, :2] > 0).all()  # the bright patches the class token reads
    rest = np.ones((4, 4), bool)
    rest[:2, :2] = False
    assert (cam.cam[rest] == 0).all()
    assert cam.base["cell"] == explain.occlusion(p, Image.fromarray(a), grid=2).base["cell"]


class IgnoredTokens(TopLeft):
    """TopLeft, plus a LayerNorm over patch tokens whose output the logits never read."""

    def __init__(self, num_classes: dict[int, int]):
        super().__init__(num_classes)
        self.norm = torch.nn.LayerNorm(3)

    def forward(self, x):
        self.norm(x.flatten(2).transpose(1, 2))  # (B, H*W, 3) tokens, thrown away
        return super().forward(x)


def test_gradcam_refuses_a_backbone_whose_guess_reads_none_of_its_maps():
    p = top_left_predictor()
    p.models[0] = IgnoredTokens(p.models[0].num_classes).eval()
    with pytest.raises(InputError, match="no feature map the guess depends on"):
        explain.gradcam(p, photo())


def test_patch_grids_of_vits():
    assert explain._patch_grid(197, 224, 224) == (1, 14, 14)  # ViT-B/16: a class token
    assert explain._patch_grid(261, 224, 224) == (5, 16, 16)  # DINOv2 with registers, 14 px patches
    assert explain._patch_grid(196, 224, 224) == (0, 14, 14)  # SigLIP: no class token
    assert explain._patch_grid(1 + 14 * 18, 224, 300) == (1, 14, 18)  # 300 // 16 = 18: the floored aspect
    assert explain._patch_grid(3, 224, 224) is None and explain._patch_grid(2, 32, 32) is None


def test_gradcam_refuses_what_it_cannot_explain():
    p = top_left_predictor()  # TopLeft has no spatial feature map and no token norm
    with pytest.raises(InputError, match="this one has neither: use occlusion"):
        explain.gradcam(p, photo())
    two = Predictor([(p.models[0], {**p.metas[0], "arch": {"levels": [1, 3]}}, Path("a")),
                     (TopLeft({5: p.tree.num_classes[5]}).eval(), {**p.metas[0], "arch": {"levels": [5]}}, Path("b"))],
                    "cpu")
    with pytest.raises(InputError, match="single-model run"):
        explain.gradcam(two, photo())
    with pytest.raises(InputError, match="unknown explanation method"):
        explain.explain(p, photo(), method="saliency")


@pytest.fixture(scope="module")
def foundation_specs(tmp_path_factory):
    import tiny_backbones as tb

    return tb.specs(tmp_path_factory.mktemp("tiny-backbones"))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "layer", "grid"), [
    ("timm", "blocks.5.norm1", 2),  # the last block's input norm (the class token is pooled); 16 px patches
    ("hf-clip", "encoder.layers.1.layer_norm1", 4),
    ("hf-siglip", "post_layernorm", 4),  # an attention-pooling head reads every token after the last norm
    ("hf-dinov2", "encoder.layer.1.norm1", 4),
    ("open_clip", "transformer.resblocks.1.ln_1", 4),
])
def test_gradcam_finds_the_token_norm_of_every_vit_library(foundation_specs, name, layer, grid):
    from geohier.model import build_model

    p = top_left_predictor()
    p.models[0] = build_model(foundation_specs[name], p.models[0].num_classes, weights="none", image_size=32).eval()
    cam = explain.gradcam(p, photo())
    assert cam.layer.endswith(layer) and cam.cam.shape == (grid, grid)  # 32 px in 8 or 16 px patches
    assert np.isfinite(cam.cam).all() and (cam.cam >= 0).all()
