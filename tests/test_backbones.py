"""geohier.backbones: specs, each library's path on tiny local models (no download), the
offline errors, and the round trip through a run (arch + weights -> the same features)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_backbones as tb
import torch
from safetensors.torch import load_file

from geohier import backbones as B
from geohier.errors import GeohierError
from geohier.model import build_model, load_run, save_checkpoint

pytestmark = pytest.mark.slow  # builds foundation backbones from local folders, offline hubs in subprocesses: `make test-fast` skips this module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tb.specs(tmp_path_factory.mktemp("backbones"))


def test_specs_parse_and_bad_ones_say_what_to_use(tmp_path):
    assert B.parse_spec("resnet50") == B.Spec("torchvision", "resnet50")
    assert B.parse_spec("hf:facebook/dinov2-small@abc123") == B.Spec("hf", "facebook/dinov2-small", "abc123")
    assert B.parse_spec("open_clip:ViT-B-32/laion2b_s34b_b79k").name == "ViT-B-32/laion2b_s34b_b79k"
    assert B.parse_spec("timm:vit_small_patch14_dinov2.lvd142m").library == "timm"
    assert B.parse_spec(f"hf:{tmp_path}").local
    for bad, msg in [("vgg16", "unknown backbone 'vgg16'"), ("keras:resnet", "unknown backbone library 'keras'"),
                     ("hf:", "names no model"), ("hf:clip", "ORG/NAME"),
                     (f"hf:{tmp_path}/nope", "does not exist")]:
        with pytest.raises(GeohierError, match=msg):
            B.parse_spec(bad)
    with pytest.raises(GeohierError) as exc:
        B.parse_spec("vgg16")
    assert "hf:ORG/NAME" in str(exc.value) and "resnet50" in str(exc.value)


@pytest.mark.parametrize("name,dim,interp,resize", [("hf-clip", 32, "bicubic", 32), ("hf-siglip", 32, "bicubic", 32),
                                                     ("hf-dinov2", 32, "bicubic", 36), ("open_clip", 16, "bicubic", 32),
                                                     ("timm", 64, "bicubic", 168)])
def test_each_library_builds_from_a_local_folder(models, name, dim, interp, resize):
    bb = B.build_backbone(models[name], download=False)
    s = bb.preprocess["image_size"]
    assert bb.feature_dim == dim and bb.preprocess["interpolation"] == interp
    assert bb.preprocess["resize_size"] == resize
    x = torch.randn(2, 3, s, s)
    assert bb.eval()(x).shape == (2, dim)
    d = bb.describe()
    assert d["spec"] == models[name] and len(d["weights_sha256"]) == 64 and d["feature_dim"] == dim
    # the folder's weights are the ones loaded: a second build has the same hash, a random init another
    assert B.build_backbone(models[name]).weights_sha256() == d["weights_sha256"]
    assert B.build_backbone(models[name], weights="none").weights_sha256() != d["weights_sha256"]


@pytest.mark.parametrize("name", ["hf-clip", "hf-dinov2", "open_clip", "timm"])
def test_arch_rebuilds_the_same_model_offline(models, name):
    bb = B.build_backbone(models[name]).eval()
    again = B.from_arch(json.loads(json.dumps(bb.arch()))).eval()
    again.net.load_state_dict(bb.net.state_dict())
    s = bb.preprocess["image_size"]
    x = torch.randn(2, 3, s, s)
    assert torch.allclose(bb(x), again(x), atol=1e-6)


def test_the_folder_weights_equal_the_saved_ones(models):
    d = Path(models["timm"].split(":", 1)[1])
    saved = load_file(str(d / "model.safetensors"))
    net = B.build_backbone(models["timm"]).net
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())
    d = Path(models["open_clip"].split(":", 1)[1])
    saved = load_file(str(d / "open_clip_model.safetensors"))
    visual = B.build_backbone(models["open_clip"]).net
    assert torch.equal(visual.conv1.weight, saved["visual.conv1.weight"])


def test_another_image_size_interpolates_position_embeddings(models):
    bb = B.build_backbone(models["hf-clip"], image_size=48)
    assert bb.preprocess["image_size"] == 48 and bb.arch()["interpolate"]
    assert bb.eval()(torch.randn(1, 3, 48, 48)).shape == (1, 32)
    t = B.build_backbone("timm:test_vit", weights="none", image_size=64)
    assert t.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 64)
    with pytest.raises(GeohierError, match="takes 32 px images.*--image-size 32"):
        B.build_backbone(models["open_clip"], image_size=64)


def test_registry_models_build_without_weights():
    bb = B.build_backbone("timm:test_vit", weights="none")
    assert bb.feature_dim == 64 and bb.preprocess["image_size"] == 160
    with pytest.raises(GeohierError, match="timm has no model 'no_such_net'"):
        B.build_backbone("timm:no_such_net", weights="none")
    with pytest.raises(GeohierError, match="open_clip has no architecture 'ViT-Q-99'"):
        B.build_backbone("open_clip:ViT-Q-99/x", weights="none")
    with pytest.raises(GeohierError, match="names no pretrained weights.*laion2b_s34b_b79k"):
        B.build_backbone("open_clip:ViT-B-32")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_hub_names_end_in_one_line_quickly(tmp_path):
    """No network (a closed port as the hub): each library's hub spec ends with one line
    that names what it fetched and how to give a folder instead, without a traceback."""
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(tmp_path / "hf"),
           "PATH": "/usr/bin:/bin"}
    code = ("from geohier import backbones as B\nfrom geohier.errors import GeohierError\n"
            "for s in ['hf:openai/clip-vit-base-patch16', 'timm:vit_small_patch14_dinov2.lvd142m',"
            " 'open_clip:ViT-B-32/laion2b_s34b_b79k']:\n"
            "    try:\n        B.build_backbone(s)\n"
            "    except GeohierError as e:\n        print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ERR")]
    assert len(lines) == 3, out.stdout + out.stderr
    for line, what in zip(lines, ["hf:openai/clip-vit-base-patch16", "timm:vit_small_patch14_dinov2.lvd142m",
                                  "open_clip:ViT-B-32/laion2b_s34b_b79k"], strict=True):
        assert f"cannot fetch {what}" in line and "cannot be reached" in line and "folder" in line
    assert "Traceback" not in out.stderr
    # downloads off: the cache alone, and a line that says so
    with pytest.raises(GeohierError, match="downloads are off"):
        B.build_backbone("hf:openai/clip-vit-base-patch16", download=False)


def test_check_backbone_is_the_config_check(models):
    assert B.check_backbone(models["hf-clip"]) == models["hf-clip"]
    with pytest.raises(GeohierError, match="unknown backbone"):
        B.check_backbone("resnet51")


def _meta(h):
    return {"run": "x", "hierarchy": h.to_dict(), "hierarchy_hash": h.hash, "temperatures": {}}


@pytest.fixture(scope="module")
def hier():
    import numpy as np

    from geohier.hierarchy import build_hierarchy

    rng = np.random.default_rng(0)
    return build_hierarchy(rng.uniform(-60, 60, 200), rng.uniform(-170, 170, 200), [1, 3], min_images=1)


@pytest.mark.parametrize("name", ["hf-siglip", "open_clip"])
def test_a_foundation_run_round_trips(tmp_path, models, hier, name):
    """Fine-tuned: every tensor in model.safetensors. Frozen: the heads there, the backbone
    in backbone.safetensors. Both load back to the same logits, preprocessing in meta."""
    s = tb.SIZE
    x = torch.randn(2, 3, s, s)
    for frozen in (False, True):
        m = build_model(models[name], {lv: hier.num_classes[lv] for lv in (1, 3)}, weights="pretrained",
                        frozen=frozen).eval()
        run = tmp_path / f"{name}-{frozen}"
        save_checkpoint(run, m, _meta(hier))
        keys = set(load_file(str(run / "model.safetensors")))
        assert all(k.startswith("heads.") for k in keys) == frozen
        assert (run / "backbone.safetensors").exists() == frozen
        loaded, meta = load_run(run)
        assert meta["input"]["interpolation"] == "bicubic" and meta["backbone"]["spec"] == models[name]
        assert meta["arch"]["frozen"] == frozen
        a, b = m(x), loaded(x)
        assert all(torch.allclose(a[lv], b[lv], atol=1e-5) for lv in (1, 3))
        if frozen:
            assert not any(p.requires_grad for p in loaded.backbone.parameters())
            (run / "backbone.safetensors").unlink()
            with pytest.raises(GeohierError, match="backbone.safetensors"):
                load_run(run)
