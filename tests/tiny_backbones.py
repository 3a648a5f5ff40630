"""Tiny, randomly initialised foundation models saved as local folders, built from configs
(no download): what the tests point ``hf:DIR``, ``open_clip:DIR`` and ``timm:DIR`` at."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SIZE = 32  # px: the models' native input size


def _hf(root: Path, name: str, config_cls: str, model_cls: str, processor) -> Path:
    """A tiny two-layer vision tower of ``model_cls`` and its image processor in root/name."""
    import transformers

    d = Path(root) / name
    if not d.exists():
        torch.manual_seed(1)  # not 0: build_backbone seeds a random init with 0
        config = getattr(transformers, config_cls)(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=SIZE, patch_size=8)
        getattr(transformers, model_cls)(config).save_pretrained(d)
        processor().save_pretrained(d)
    return d


def hf_clip(root: Path) -> Path:
    from transformers import CLIPImageProcessor

    return _hf(root, "hf-clip", "CLIPVisionConfig", "CLIPVisionModel",
               lambda: CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}))


def hf_siglip(root: Path) -> Path:
    from transformers import SiglipImageProcessor

    return _hf(root, "hf-siglip", "SiglipVisionConfig", "SiglipVisionModel",
               lambda: SiglipImageProcessor(size={"height": SIZE, "width": SIZE}))


def hf_dinov2(root: Path) -> Path:
    from transformers import BitImageProcessor

    # DINOv2's own recipe: resize the shorter side a little larger, then centre-crop
    return _hf(root, "hf-dinov2", "Dinov2Config", "Dinov2Model",
               lambda: BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": SIZE, "width": SIZE},
                                         do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                         image_std=[0.229, 0.224, 0.225]))


OPEN_CLIP_CFG = {"embed_dim": 16,
                 "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                 "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}


def open_clip_dir(root: Path) -> Path:
    """An OpenCLIP hub-style folder: open_clip_config.json + open_clip_model.safetensors."""
    import open_clip
    from safetensors.torch import save_file

    d = Path(root) / "open-clip"
    if not d.exists():
        d.mkdir(parents=True)
        (d / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
        torch.manual_seed(1)  # not 0: build_backbone seeds a random init with 0
        model = open_clip.create_model(f"local-dir:{d}", load_weights=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return d


def timm_dir(root: Path) -> Path:
    """A timm hub-style folder: config.json (architecture, pretrained_cfg) + model.safetensors."""
    import timm
    from safetensors.torch import save_file

    d = Path(root) / "timm-vit"
    if not d.exists():
        d.mkdir(parents=True)
        torch.manual_seed(1)  # not 0: build_backbone seeds a random init with 0
        model = timm.create_model("test_vit", pretrained=False, num_classes=0)
        cfg = {"architecture": "test_vit", "num_classes": 0,
               "pretrained_cfg": {"input_size": [3, 160, 160], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                  "interpolation": "bicubic", "crop_pct": 0.95}}
        (d / "config.json").write_text(json.dumps(cfg))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    return d


def specs(root: Path) -> dict[str, str]:
    """The spec of each library's tiny model, built under ``root``: {"hf-clip": "hf:DIR", ...}."""
    return {"hf-clip": f"hf:{hf_clip(root)}", "hf-siglip": f"hf:{hf_siglip(root)}",
            "hf-dinov2": f"hf:{hf_dinov2(root)}", "open_clip": f"open_clip:{open_clip_dir(root)}",
            "timm": f"timm:{timm_dir(root)}"}
