"""Image transforms: one preset for training, one for evaluation and inference.

As in torchvision's references/classification/presets.py, these are two small callables
(PIL image -> normalised float tensor (3, S, S)). ``EvalPreset`` is exactly what
inference uses: build it from a run's ``meta["input"]`` with ``EvalPreset.from_meta``.

Geolocation caveat on horizontal flips: a mirrored street photo shows traffic on the other
side of the road and mirrored lettering, both strong cues of *where* a photo was taken
(left- vs right-hand traffic splits the world). Flipping therefore teaches the model to
ignore real signal, so ``hflip_prob`` defaults to 0 (the seed flipped with p=0.5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from geohier.backbones import IMAGENET_MEAN, IMAGENET_STD


class TrainPreset:
    """Training augmentation: random resized crop, optional flip, colour jitter, a small
    rotation, optional RandAugment; then to a normalised tensor (3, S, S).

    CutMix/MixUp act on batches and live in the training loop, not here.
    """

    def __init__(self, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, *, min_scale: float = 0.5,
                 hflip_prob: float = 0.0, color_jitter: float = 0.2, rotation: float = 5.0,
                 randaugment: bool = False, ra_magnitude: int = 9, interpolation: str = "bilinear"):
        self.image_size = int(image_size)
        steps = [T.RandomResizedCrop(self.image_size, scale=(min_scale, 1.0),
                                     interpolation=interpolation_mode(interpolation), antialias=True)]
        if hflip_prob > 0:
            steps.append(T.RandomHorizontalFlip(hflip_prob))
        if color_jitter > 0:
            steps.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter,
                                       saturation=color_jitter, hue=min(0.05, color_jitter / 4)))
        if rotation > 0:
            steps.append(T.RandomRotation(rotation, interpolation=InterpolationMode.BILINEAR))
        if randaugment:
            steps.append(T.RandAugment(magnitude=ra_magnitude))
        steps += [T.PILToTensor(), T.ToDtype(torch.float32, scale=True),
                  T.Normalize(list(mean), list(std))]
        self.transforms = T.Compose(steps)

    def __call__(self, img) -> torch.Tensor:
        return self.transforms(img)  # (3, S, S)

    def __repr__(self) -> str:
        return f"TrainPreset({self.transforms})"


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision's InterpolationMode of a name (bilinear, bicubic, nearest, ...)."""
    try:
        return InterpolationMode(str(name).lower())
    except ValueError:
        raise ValueError(f"unknown interpolation {name!r}; use bilinear, bicubic or nearest") from None


class EvalPreset:
    """Resize the shorter side to ``resize_size`` (default ``image_size``), centre-crop
    ``image_size``, to tensor, normalise: a foundation backbone's own recipe (DINOv2:
    resize 256 bicubic, crop 224) or a torchvision one's (bilinear, no margin).

    >>> from PIL import Image
    >>> tuple(EvalPreset(32)(Image.new("RGB", (64, 48))).shape)
    (3, 32, 32)
    """

    def __init__(self, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, resize_size: int | None = None,
                 interpolation: str = "bilinear"):
        self.image_size = int(image_size)
        self.resize_size = int(resize_size or image_size)
        self.interpolation = str(interpolation)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        self.transforms = T.Compose([
            T.Resize(self.resize_size, interpolation=interpolation_mode(self.interpolation), antialias=True),
            T.CenterCrop(self.image_size),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(self.mean, self.std),
        ])

    def __call__(self, img) -> torch.Tensor:
        return self.transforms(img)  # (3, S, S)

    def to_dict(self) -> dict:
        """meta.json's ``input`` block."""
        return {"image_size": self.image_size, "resize_size": self.resize_size, "mean": self.mean,
                "std": self.std, "interpolation": self.interpolation}

    @classmethod
    def from_meta(cls, meta: Mapping) -> EvalPreset:
        """The preset a run was trained for, from its meta.json (or its ``input`` block)."""
        inp = meta.get("input", meta)
        return cls(int(inp["image_size"]), inp.get("mean", IMAGENET_MEAN), inp.get("std", IMAGENET_STD),
                   inp.get("resize_size"), inp.get("interpolation", "bilinear"))

    def __repr__(self) -> str:
        return (f"EvalPreset(image_size={self.image_size}, resize_size={self.resize_size}, "
                f"interpolation={self.interpolation}, mean={self.mean}, std={self.std})")
