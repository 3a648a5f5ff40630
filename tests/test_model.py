"""geohier.model (backbones, heads, checkpoints) and geohier.presets."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from geohier import model as gm
from geohier.backbones import BACKBONES, imagenet_weights
from geohier.errors import GeohierError
from geohier.hierarchy import build_hierarchy
from geohier.model import GeoModel, ModelConfig, build_model, load_run, save_checkpoint
from geohier.presets import EvalPreset, TrainPreset


@pytest.fixture(scope="module")
def hier():
    rng = np.random.default_rng(0)
    return build_hierarchy(rng.uniform(-60, 60, 300), rng.uniform(-170, 170, 300), [1, 3], min_images=1)


@pytest.fixture(scope="module")
def r18(hier):
    """One resnet18 for the tests that only read it (building one costs ~0.5 s)."""
    return build_model("resnet18", hier.num_classes).eval()


def _meta(h, **kw):
    return {"hierarchy": h.to_dict(), "hierarchy_hash": h.hash,
            "input": EvalPreset(32).to_dict(), "temperatures": {"1": 1.0, "3": 1.0}, **kw}


@pytest.mark.slow
def test_forward_shapes_and_features(hier, r18):
    m = r18
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert set(out) == {1, 3}
    assert out[1].shape == (2, 4) and out[3].shape == (2, hier.num_classes[3])
    assert m.features(x).shape == (2, 512)
    assert m.levels == [1, 3]


@pytest.mark.slow
@pytest.mark.parametrize("name,dim", [("mobilenet_v3_large", 1280), ("efficientnet_b0", 1280)])
def test_other_backbones_drop_their_classifier(name, dim):
    m = build_model(name, {2: 3}).eval()
    assert m.feature_dim == dim
    assert m(torch.zeros(1, 3, 32, 32))[2].shape == (1, 3)


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(GeohierError) as exc:
        build_model("vgg16", {1: 4})
    for name in BACKBONES:
        assert name in str(exc.value)
    assert BACKBONES[0] == "resnet50" == gm.DEFAULT_BACKBONE


def test_unknown_weights_value():
    with pytest.raises(GeohierError, match="unknown weights 'imagnet'"):
        build_model("resnet18", {1: 4}, weights="imagnet")


def test_config_round_trip():
    c = ModelConfig("resnet18", [1, 3], {1: 4, 3: 20})
    d = json.loads(json.dumps(c.to_dict()))
    assert d["num_classes"] == {"1": 4, "3": 20}
    assert ModelConfig.from_dict(d) == c


@pytest.mark.slow
def test_checkpoint_round_trip_same_logits(tmp_path, hier, r18):
    m = r18
    save_checkpoint(tmp_path, m, _meta(hier))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["format"] == "geohier-run/1" and meta["arch"]["backbone"] == "resnet18"
    assert meta["arch"]["levels"] == [1, 3]
    m2, meta2 = load_run(tmp_path)
    assert isinstance(m2, GeoModel) and not m2.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = m(x), m2(x)
    for lv in (1, 3):
        assert torch.equal(a[lv], b[lv])
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_load_refuses_an_edited_class_list(tmp_path, hier, r18):
    save_checkpoint(tmp_path, r18, _meta(hier))
    meta = json.loads((tmp_path / "meta.json").read_text())
    cls = meta["hierarchy"]["classes"]["3"]
    cls["cells"], cls["counts"], cls["parent"] = cls["cells"][:-1], cls["counts"][:-1], cls["parent"][:-1]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(GeohierError, match="hash"):
        load_run(tmp_path)


def test_load_refuses_heads_that_do_not_match_the_hierarchy(tmp_path, hier, r18):
    other = build_hierarchy([10, 20, -30], [10, 100, -60], [1, 3], min_images=1)  # a valid, smaller one
    save_checkpoint(tmp_path, r18, _meta(hier))
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["hierarchy"], meta["hierarchy_hash"] = other.to_dict(), other.hash
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(GeohierError, match=r"level 1 head has 4 classes but the hierarchy lists 2"):
        load_run(tmp_path)


def test_load_refuses_weights_of_another_shape(tmp_path, hier):
    save_checkpoint(tmp_path, build_model("resnet18", {1: 4, 3: 7}), _meta(hier))
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["arch"]["num_classes"]["3"] = hier.num_classes[3]  # meta now agrees, weights do not
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(GeohierError, match="weights have 7 level-3 classes"):
        load_run(tmp_path)


@pytest.mark.slow
def test_load_refuses_another_workspace_hierarchy(tmp_path, hier, r18):
    save_checkpoint(tmp_path, r18, _meta(hier))
    with pytest.raises(GeohierError, match="trained on hierarchy"):
        load_run(tmp_path, expect_hash="0" * 64)
    load_run(tmp_path, expect_hash=hier.hash)


def test_load_without_meta_is_a_clear_error(tmp_path):
    with pytest.raises(GeohierError, match="no meta.json"):
        load_run(tmp_path)


def test_no_pickle_in_checkpoint_code():
    import inspect

    src = inspect.getsource(gm)
    assert "torch.load(" not in src and "import pickle" not in src


@pytest.mark.slow
def test_backbone_weights_from_a_safetensors_file(tmp_path, hier):
    from safetensors.torch import save_file

    src = build_model("resnet18", {1: 4})
    path = tmp_path / "backbone.safetensors"
    # a torchvision-style state dict (with its fc): fc is ignored
    tv = {k: v.clone() for k, v in src.backbone.state_dict().items()}
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    save_file(tv, str(path))
    m = build_model("resnet18", {1: 4, 3: 9}, weights=str(path))
    assert torch.equal(m.backbone.conv1.weight, src.backbone.conv1.weight)
    # a geohier checkpoint works too (backbone.* keys, heads ignored)
    save_checkpoint(tmp_path / "run", src, _meta(hier))
    m = build_model("resnet18", {1: 2}, weights=str(tmp_path / "run" / "model.safetensors"))
    assert torch.equal(m.backbone.layer1[0].conv1.weight, src.backbone.layer1[0].conv1.weight)


def test_backbone_weights_that_do_not_fit_name_the_keys(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7), "bogus.weight": torch.zeros(2)}, str(path))
    with pytest.raises(GeohierError, match=r"\d+ missing \(bn1.*; 1 unexpected \(bogus.weight\)"):
        build_model("resnet18", {1: 4}, weights=str(path))
    with pytest.raises(GeohierError, match="does not exist"):
        build_model("resnet18", {1: 4}, weights=str(tmp_path / "nope.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(GeohierError, match="cannot read"):
        build_model("resnet18", {1: 4}, weights=str(tmp_path / "bad.safetensors"))


def test_imagenet_offline_and_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(GeohierError, match="not in the torch cache"):
        build_model("resnet18", {1: 4}, weights="imagenet", download=False)

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(imagenet_weights("resnet18").__class__, "get_state_dict", offline)
    with pytest.raises(GeohierError, match=r"not cached .*offline\?.*--weights none"):
        build_model("resnet18", {1: 4}, weights="imagenet")


@pytest.mark.slow
def test_imagenet_weights_load_when_cached(monkeypatch):
    ref = build_model("resnet18", {1: 4})
    state = {k: v.clone() for k, v in ref.backbone.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    monkeypatch.setattr(imagenet_weights("resnet18").__class__, "get_state_dict",
                        lambda self, **kw: state)
    m = build_model("resnet18", {1: 4}, weights="imagenet")
    assert torch.equal(m.backbone.conv1.weight, ref.backbone.conv1.weight)


def test_eval_preset_is_deterministic_and_round_trips_through_meta():
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    p = EvalPreset(32)
    x = p(img)
    assert x.shape == (3, 32, 32) and torch.equal(x, p(img))
    assert x[0].mean().item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-4)
    q = EvalPreset.from_meta({"input": p.to_dict()})
    assert torch.equal(q(img), x)


def test_train_preset_shapes_and_flip_default_off():
    img = Image.new("RGB", (64, 48), (10, 200, 30))
    t = TrainPreset(32, randaugment=True)
    assert t(img).shape == (3, 32, 32)
    assert "HorizontalFlip" not in repr(TrainPreset(32))
    assert "HorizontalFlip" in repr(TrainPreset(32, hflip_prob=0.5))
