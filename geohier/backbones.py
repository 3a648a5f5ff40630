"""Feature extractors: torchvision classifiers and foundation models behind one spec string.

A backbone maps normalised images (B, 3, S, S) to pooled features (B, D). Which one is
named by a *spec*:

=====================================  ==============================================
``resnet50``, ``convnext_tiny`` ...    torchvision (``BACKBONES``); weights: imagenet,
                                       none or a .safetensors file
``hf:ORG/NAME[@REVISION]``             Hugging Face transformers: CLIPVisionModel,
``hf:/path/to/dir``                    SiglipVisionModel, Dinov2Model, else AutoModel
``open_clip:ARCH/PRETRAINED``          OpenCLIP's image tower (``open_clip:ViT-B-32/
``open_clip:hf-hub:ORG/NAME``          laion2b_s34b_b79k``); PRETRAINED may be a tag or
``open_clip:/path/to/dir``             a local file; a dir holds open_clip_config.json
``timm:NAME``  ``timm:/path/to/dir``   timm (``timm:vit_small_patch14_dinov2.lvd142m``);
                                       a dir holds config.json + model.safetensors
=====================================  ==============================================

The libraries are imported only when a spec names them (each costs seconds). A hub model
is downloaded only when the user names one and ``download`` is on; without a network the
error is one line that says what was fetched and how to give a local directory instead.

Every backbone carries what rebuilding it needs without the library's hub or registry:
``arch()`` (the library's own config, JSON) and ``describe()`` (spec, source, revision,
a content hash of the weights, the feature size and the preprocessing), which a run's
meta.json stores, so predict and evaluate rebuild the exact model and preprocessing from
the run alone (``from_arch`` + the run's weights).

>>> parse_spec("hf:openai/clip-vit-base-patch32@main")
Spec(library='hf', name='openai/clip-vit-base-patch32', revision='main', local=False)
>>> parse_spec("resnet18").library
'torchvision'
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from geohier.errors import InputError, ModelError

# torchvision factory names, in the order the UI lists them (default first).
BACKBONES = ("resnet50", "resnet18", "resnet34", "mobilenet_v3_large", "efficientnet_b0",
             "convnext_tiny")
LIBRARIES = ("torchvision", "hf", "open_clip", "timm")
#: Specs the Train page suggests (none is downloaded until a user trains or embeds with it).
SUGGESTED = ("hf:openai/clip-vit-base-patch16", "hf:google/siglip-base-patch16-224",
             "hf:facebook/dinov2-small", "open_clip:ViT-B-32/laion2b_s34b_b79k",
             "timm:vit_small_patch14_dinov2.lvd142m")
SPEC_HELP = (f"a torchvision name ({', '.join(BACKBONES)}), hf:ORG/NAME, open_clip:ARCH/PRETRAINED, "
             "timm:NAME, or any of the last three with a local directory")
#: torchvision's ImageNet normalisation: the default preprocessing (``preprocess_dict``,
#: ``geohier.presets``) of every backbone that does not bring its own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED = ("imagenet", "pretrained")
WEIGHTS_HELP = "imagenet (or pretrained: a foundation spec's own weights) | none | a local .safetensors file"  # for a foundation spec both mean "the spec's own weights"
_HF_MODELS = {"clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel",
              "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel",
              "siglip2": "Siglip2VisionModel", "siglip2_vision_model": "Siglip2VisionModel",
              "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
_INTERP = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class Spec:
    """A parsed backbone spec. ``name``: torchvision name, hub id, ARCH/PRETRAINED, or a
    local directory (``local``)."""

    library: str
    name: str
    revision: str | None = None
    local: bool = False

    def __str__(self) -> str:
        if self.library == "torchvision":
            return self.name
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.library}:{self.name}{rev}"


def parse_spec(text: str) -> Spec:
    """The Spec of a ``--backbone`` value; an InputError naming the accepted forms."""
    s = str(text or "").strip()
    if not s:
        raise InputError(f"empty backbone; use {SPEC_HELP}")
    if ":" not in s:
        if s not in BACKBONES:
            raise InputError(f"unknown backbone {s!r}; use {SPEC_HELP}")
        return Spec("torchvision", s)
    lib, _, rest = s.partition(":")
    if lib not in LIBRARIES[1:]:
        raise InputError(f"unknown backbone library {lib!r} in {s!r}; use {SPEC_HELP}")
    rest = rest.strip()
    if not rest:
        raise InputError(f"backbone {s!r} names no model; e.g. {lib}:{_example(lib)}")
    if _looks_local(rest):
        path = Path(rest).expanduser()
        if not path.exists():
            raise InputError(f"backbone {s!r}: {path} does not exist")
        return Spec(lib, str(path.resolve()), None, True)
    revision = None
    if lib == "hf" and "@" in rest:
        rest, _, revision = rest.partition("@")
    if lib == "hf" and rest.count("/") != 1:
        raise InputError(f"backbone {s!r}: a hub model is ORG/NAME (e.g. hf:{_example('hf')}) or a local directory")
    if lib == "open_clip" and not rest.startswith("hf-hub:") and "/" not in rest:
        # an architecture alone: random init (weights none) or weights given by --weights
        return Spec(lib, rest, None, False)
    return Spec(lib, rest, revision or None, False)


def _example(lib: str) -> str:
    return {"hf": "openai/clip-vit-base-patch16", "open_clip": "ViT-B-32/laion2b_s34b_b79k",
            "timm": "vit_small_patch14_dinov2.lvd142m"}[lib]


def _looks_local(rest: str) -> bool:
    return rest.startswith(("/", "./", "../", "~")) or Path(rest).expanduser().is_dir()


def short_name(text: str) -> str:
    """A folder-safe short name of a spec, for run names: ``hf:openai/clip-vit-base-patch16``
    -> ``clip-vit-base-patch16``, ``open_clip:ViT-B-32/laion2b_s34b_b79k`` ->
    ``ViT-B-32-laion2b_s34b_b79k``, a local folder -> its name.

    >>> short_name("timm:vit_small_patch14_dinov2.lvd142m"), short_name("resnet50")
    ('vit_small_patch14_dinov2.lvd142m', 'resnet50')
    """
    import re

    s = str(text).strip()
    lib, _, rest = s.partition(":") if ":" in s else ("", "", s)
    rest = rest.split("@", 1)[0].rstrip("/\\")
    if lib == "open_clip" and not rest.startswith("hf-hub:") and not _looks_local(rest):
        name = rest.replace("/", "-")
    else:
        name = re.split(r"[/\\:]", rest)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "backbone"
    return name[:48]


def check_backbone(text: str) -> str:
    """``text`` if it is a spec this installation can build (its library imports), else a
    ModelError/InputError that says what to use. Nothing is downloaded."""
    spec = parse_spec(text)
    if spec.library != "torchvision":
        _import(spec.library)
    return str(text).strip()


def is_foundation(text: str) -> bool:
    """True for hf:/open_clip:/timm: specs (frozen features are their natural use)."""
    return parse_spec(text).library != "torchvision"


def _import(library: str):
    mod = {"hf": "transformers", "open_clip": "open_clip", "timm": "timm"}[library]
    try:
        return __import__(mod)
    except ImportError as exc:
        raise ModelError(f"{library}: backbones need the {mod} package ({exc}); `make setup` installs it") from None


# ----------------------------------------------------------------------------- preprocessing


def preprocess_dict(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str = "bilinear",
                    crop_pct: float = 1.0) -> dict:
    """meta.json's ``input`` block: resize the shorter side to ``resize_size``, centre-crop
    ``image_size``, normalise with ``mean``/``std``."""
    size = int(image_size)
    return {"image_size": size, "resize_size": int(round(size / crop_pct)) if crop_pct else size,
            "mean": [float(v) for v in mean], "std": [float(v) for v in std], "interpolation": interpolation}


# ----------------------------------------------------------------------------- the module


class Backbone(nn.Module):
    """A feature extractor: ``forward(x (B,3,S,S)) -> (B, D)`` float features.

    ``net``: the library's module; ``kind``: how to pool its output. ``arch()`` and
    ``describe()`` say how to rebuild it."""

    def __init__(self, spec: str, library: str, net: nn.Module, feature_dim: int, preprocess: dict,
                 arch: dict | None = None, source: str | None = None, revision: str | None = None,
                 weights: str = "none", kind: str = "tensor"):
        super().__init__()
        self.net = net
        self.spec, self.library, self.feature_dim = spec, library, int(feature_dim)
        self.preprocess, self._arch, self.kind = dict(preprocess), dict(arch or {}), kind
        self.source, self.revision, self.weights = source, revision, weights
        self._sha: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "hf":
            kw = {"interpolate_pos_encoding": True} if self._arch.get("interpolate") else {}
            out = self.net(pixel_values=x, **kw)
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                h = out.last_hidden_state
                pooled = h.mean(dim=(2, 3)) if h.ndim == 4 else h.mean(1)
            return pooled.flatten(1)  # (B, D)
        return self.net(x).flatten(1)  # (B, D)

    def arch(self) -> dict:
        """JSON that ``from_arch`` rebuilds this architecture from (random weights), offline."""
        return {"spec": self.spec, "library": self.library, "feature_dim": self.feature_dim,
                "preprocess": self.preprocess, **self._arch}

    def weights_sha256(self) -> str:
        """A content hash of the weights (names, dtypes, shapes, bytes): what an embedding
        cache is keyed by, whatever the weights came from."""
        if self._sha is None:
            self._sha = state_sha256(self.net.state_dict())
        return self._sha

    def describe(self) -> dict:
        """What produced the features: spec, library, source, revision, weights hash,
        feature size and preprocessing (meta.json's ``backbone``; an embedding cache key)."""
        return {"spec": self.spec, "library": self.library, "source": self.source, "revision": self.revision,
                "weights": self.weights, "weights_sha256": self.weights_sha256(), "feature_dim": self.feature_dim,
                "preprocess": self.preprocess}


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


# ----------------------------------------------------------------------------- building


def build_backbone(spec: str, weights: str = "pretrained", image_size: int | None = None,
                   download: bool = True) -> Backbone:
    """The backbone a spec names, with ``weights``: ``pretrained``/``imagenet`` (the spec's
    own; ImageNet for torchvision), ``none`` (random init of the architecture) or a local
    ``.safetensors`` file of backbone weights. ``image_size``: input size (default: the
    model's own; ViTs interpolate their position embeddings where the library can).
    ``download``: may fetch a hub model the spec names (else local files only). A random
    init (``none``) is seeded, so it is the same every time."""
    parsed = parse_spec(spec)
    w = str(weights or "none").strip()
    builders = {"torchvision": _torchvision, "hf": _hf, "open_clip": _open_clip, "timm": _timm}
    file = None
    if w not in PRETRAINED and w not in ("none", "", "None"):
        file = Path(w).expanduser()
        if not w.endswith(".safetensors") and not file.exists():
            raise InputError(f"unknown weights {weights!r}; use {WEIGHTS_HELP}")
        if not file.is_file():
            raise InputError(f"weights file {file} does not exist (use imagenet, none or a .safetensors file)")
    pretrained = w in PRETRAINED and file is None
    with torch.random.fork_rng(devices=[]):
        # a random init is seeded: the same architecture gets the same weights (and the
        # same embedding cache) every time, whatever the caller's random state
        torch.manual_seed(0)
        bb = builders[parsed.library](parsed, pretrained=pretrained, image_size=image_size, download=download)
    bb.weights = w if file is None else str(file.resolve())
    if file is not None:
        load_backbone_file(bb, file)
    return bb


def from_arch(arch: Mapping) -> Backbone:
    """A backbone with random weights, rebuilt from ``Backbone.arch()`` with no network
    (load the run's weights into it next)."""
    arch = dict(arch)
    lib = arch.get("library")
    if lib == "torchvision":
        return _torchvision(parse_spec(arch["spec"]), pretrained=False, image_size=arch["preprocess"]["image_size"], download=False)
    if lib == "hf":
        transformers = _import("hf")
        cfg_dict = dict(arch["config"])
        config = transformers.CONFIG_MAPPING[cfg_dict["model_type"]].from_dict(cfg_dict)
        net = getattr(transformers, arch["model_class"])(config)
    elif lib == "open_clip":
        net = _open_clip_from_cfg(arch["model_cfg"], arch.get("preprocess_cfg") or {}).visual
    elif lib == "timm":
        timm = _import("timm")
        net = timm.create_model(arch["name"], pretrained=False, num_classes=0, **arch.get("kwargs", {}))
    else:
        raise ModelError(f"unknown backbone library {lib!r} in a run's arch")
    return Backbone(arch["spec"], lib, net, arch["feature_dim"], arch["preprocess"],
                    arch={k: v for k, v in arch.items() if k not in ("spec", "library", "feature_dim", "preprocess")},
                    kind="hf" if lib == "hf" else "tensor")


# --- torchvision


def _strip_classifier(net: nn.Module) -> tuple[nn.Module, int]:
    """Replace the last ``nn.Linear`` of a torchvision classifier by Identity.

    What remains returns the pooled pre-logit features: 2048/512 for ResNets, 1280 for
    MobileNetV3 (its 960->1280 pre-logit layer is kept: it is part of the pretrained net),
    1280 for EfficientNet-B0, 768 for ConvNeXt-T (after its LayerNorm + flatten).
    """
    if isinstance(getattr(net, "fc", None), nn.Linear):  # ResNet
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    cls = getattr(net, "classifier", None)
    if isinstance(cls, nn.Sequential) and isinstance(cls[-1], nn.Linear):
        dim = cls[-1].in_features
        cls[-1] = nn.Identity()
        return net, dim
    raise ModelError(f"do not know how to remove the classifier of {type(net).__name__}")


def classifier_prefixes(name: str) -> tuple[str, ...]:
    """State-dict key prefixes of the final classifier layer that _strip_classifier drops."""
    if name.startswith("resnet"):
        return ("fc.",)
    if name == "mobilenet_v3_large":
        return ("classifier.3.",)
    if name == "efficientnet_b0":
        return ("classifier.1.",)
    return ("classifier.2.",)  # convnext_tiny


def _torchvision(spec: Spec, pretrained: bool, image_size: int | None, download: bool) -> Backbone:
    import torchvision

    net, dim = _strip_classifier(torchvision.models.get_model(spec.name, weights=None))
    source = None
    if pretrained:
        drop = classifier_prefixes(spec.name)
        net.load_state_dict({k: v for k, v in imagenet_state(spec.name, download).items() if not k.startswith(drop)})
        source = torchvision.models.get_model_weights(spec.name).DEFAULT.url
    prep = preprocess_dict(image_size or 224)
    return Backbone(spec.name, "torchvision", net, dim, prep, source=source,
                    weights="imagenet" if pretrained else "none")


def imagenet_weights(backbone: str):
    """torchvision's default ImageNet weights enum entry of a backbone."""
    import torchvision

    return torchvision.models.get_model_weights(check_backbone(backbone)).DEFAULT


def imagenet_cache_path(backbone: str) -> Path:
    """Where torch's hub cache keeps (or would keep) a backbone's ImageNet weights."""
    url = imagenet_weights(backbone).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def imagenet_state(backbone: str, download: bool = True) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights of a backbone, from the torch cache (downloaded
    into it first when ``download``); ModelError naming the file and the way out."""
    import urllib.error

    weights = imagenet_weights(backbone)
    cached = imagenet_cache_path(backbone)
    if not cached.exists() and not download:
        raise ModelError(f"ImageNet weights for {backbone} are not in the torch cache ({cached}); "
                         "allow a download or use --weights none")
    try:
        # weights_only=True: torch's restricted loader, which reads tensors and executes no
        # code (torchvision ships .pth files; this is the one non-safetensors read).
        state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        if cached.exists():
            raise ModelError(f"cannot read the cached ImageNet weights {cached}: {exc}; "
                             "delete the file to download it again") from None
        raise ModelError(f"ImageNet weights for {backbone} are not cached ({cached}) and cannot "
                         f"be downloaded from {weights.url} (offline?): {exc}. Download that "
                         "file to the path above, or use --weights none") from None
    return state


# --- transformers


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connection: checked
    before a download so that, offline, the error comes at once (the hub client retries
    for minutes) and names what was fetched."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _endpoint() -> str:
    import huggingface_hub.constants as hc

    return hc.ENDPOINT or "https://huggingface.co"


def _cache_first(load, spec: Spec, download: bool, what: str, hint: str):
    """``load()`` from the local caches only (HF_HUB_OFFLINE=1); then, when that fails and
    ``download`` is allowed and the hub answers, ``load()`` again with the network."""
    try:
        with _offline():
            return load()
    except (OSError, RuntimeError, ValueError) as exc:
        if spec.local:
            raise
        first = exc
    if not download:
        raise _hub_error(what, spec, first, hint, tried=False)
    if not hub_reachable():
        raise ModelError(f"cannot fetch {what}: it is not in the local cache and {_endpoint()} cannot be reached "
                         f"(offline?). Download it where there is a network and pass the folder instead: {hint}")
    return load()


def _hub_error(what: str, spec: Spec, exc: BaseException, local_hint: str, tried: bool = True) -> ModelError:
    reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    why = "(offline, or not on the hub?)" if tried else "(not in the local cache, and downloads are off)"
    return ModelError(f"cannot fetch {what} {why}: {reason}. Download it where there is "
                      f"a network and pass the folder instead: {local_hint}")


def _hf(spec: Spec, pretrained: bool, image_size: int | None, download: bool) -> Backbone:
    transformers = _import("hf")
    src = spec.name
    kw = {"revision": spec.revision} if spec.revision else {}
    hint = f"`hf download {spec.name} --local-dir DIR`, then --backbone hf:DIR"

    def load_config():
        with _quiet_transformers(transformers):
            return transformers.AutoConfig.from_pretrained(src, **kw)

    try:
        config = _cache_first(load_config, spec, download, f"hf:{src} from the Hugging Face hub", hint)
    except (OSError, ValueError) as exc:
        if spec.local:
            raise ModelError(f"{src} is not a transformers model folder (no usable config.json): "
                             f"{str(exc).splitlines()[0][:200]}") from None
        raise _hub_error(f"hf:{src} from the Hugging Face hub", spec, exc, hint) from None
    model_type = config.model_type
    cls_name = _HF_MODELS.get(model_type, "AutoModel")
    if model_type in ("clip", "siglip", "siglip2"):  # a full two-tower model: its vision tower
        config = config.vision_config
    def load_net():
        with _quiet_transformers(transformers):
            return _hf_net(transformers, cls_name, src, config, pretrained, kw)

    try:
        net = _cache_first(load_net, spec, download, f"the weights of hf:{src}", hint)
    except (OSError, ValueError) as exc:
        raise _hub_error(f"the weights of hf:{src}", spec, exc, hint) from None
    cfg = net.config
    native = int(getattr(cfg, "image_size", 224) or 224)
    with _offline():  # the config and weights are cached by now
        prep = _hf_preprocess(transformers, src, kw, native)
    size = int(image_size or prep["image_size"])
    if size != prep["image_size"]:
        prep = preprocess_dict(size, prep["mean"], prep["std"], prep["interpolation"],
                               prep["image_size"] / prep["resize_size"])
    dim = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "hidden_sizes", [0])[-1])
    can_interpolate = "interpolate_pos_encoding" in inspect.signature(net.forward).parameters
    arch = {"model_class": type(net).__name__, "config": cfg.to_dict(),
            "interpolate": bool(can_interpolate and size != native)}
    revision = getattr(cfg, "_commit_hash", None) or spec.revision
    return Backbone(str(spec), "hf", net, dim, prep, arch=arch, source=src, revision=revision,
                    weights="pretrained" if pretrained else "none", kind="hf")


def _hf_net(transformers, cls_name: str, src: str, config, pretrained: bool, kw: dict) -> nn.Module:
    cls = getattr(transformers, cls_name)
    if pretrained:
        return cls.from_pretrained(src, **kw)
    return transformers.AutoModel.from_config(config) if cls_name == "AutoModel" else cls(config)


def _hf_preprocess(transformers, src: str, kw: dict, native: int) -> dict:
    """The model's own image processor settings (CLIP: bicubic, its mean/std; DINOv2:
    resize 256, crop 224), or ImageNet's at the config's size when it has none."""
    try:
        with _quiet_transformers(transformers):
            proc = transformers.AutoImageProcessor.from_pretrained(src, **kw)
    except (OSError, ValueError, KeyError, TypeError):
        return preprocess_dict(native)
    crop = getattr(proc, "crop_size", None) or getattr(proc, "size", None)
    size = getattr(proc, "size", None)
    image = int(_field(crop, "height") or _field(crop, "shortest_edge") or native)
    resize = int(_field(size, "shortest_edge") or _field(size, "height") or image)
    if not getattr(proc, "do_center_crop", False):
        resize = image  # a plain resize to the model size (SigLIP): crop nothing away
    mean = getattr(proc, "image_mean", None) or IMAGENET_MEAN
    std = getattr(proc, "image_std", None) or IMAGENET_STD
    resample = getattr(proc, "resample", 2)
    interp = _INTERP.get(int(resample), "bilinear") if isinstance(resample, int) else "bilinear"
    return preprocess_dict(image, mean, std, interp, image / int(resize))


def _field(d, key):
    """A key of a dict or a field of transformers' SizeDict; None when absent."""
    if d is None:
        return None
    return d.get(key) if isinstance(d, dict) else getattr(d, key, None)


@contextlib.contextmanager
def _quiet_transformers(transformers):
    """No warnings about unused text-tower weights, no per-load progress bars."""
    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


# --- open_clip


def _open_clip_from_cfg(model_cfg: dict, preprocess_cfg: dict):
    open_clip = _import("open_clip")
    with tempfile.TemporaryDirectory() as d:
        Path(d, "open_clip_config.json").write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}), "utf-8")
        return _no_open_clip_warnings(lambda: open_clip.create_model(f"local-dir:{d}", load_weights=False))


def _no_open_clip_warnings(fn):
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # open_clip logs on the root logger (random init, failed downloads)
    try:
        return fn()
    finally:
        root.setLevel(level)


def _open_clip(spec: Spec, pretrained: bool, image_size: int | None, download: bool) -> Backbone:
    open_clip = _import("open_clip")
    name = spec.name
    hint = "download the model's folder (open_clip_config.json + weights) and use --backbone open_clip:DIR"
    if spec.local:
        cfg_path = Path(name) / "open_clip_config.json"
        try:
            doc = json.loads(cfg_path.read_text("utf-8"))
            model_cfg, pre_cfg = doc["model_cfg"], doc.get("preprocess_cfg", {})
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{name} is not an OpenCLIP model folder ({cfg_path}: {exc})") from None
        model_name, tag = f"local-dir:{name}", None
    elif name.startswith("hf-hub:"):
        model_name, tag, model_cfg, pre_cfg = name, None, None, {}
    else:
        arch, _, tag = name.partition("/")
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise InputError(f"open_clip has no architecture {arch!r}; see open_clip.list_models() "
                             f"(e.g. open_clip:{_example('open_clip')})")
        pre_cfg = {}
        if tag and not Path(tag).expanduser().is_file():
            p = open_clip.get_pretrained_cfg(arch, tag)
            if not p:
                tags = [t for a, t in open_clip.list_pretrained() if a == arch]
                raise InputError(f"open_clip {arch} has no pretrained tag {tag!r}; known: {', '.join(tags) or 'none'}")
            pre_cfg = {k: p[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in p}
        model_name = arch
        if pretrained and not tag:
            tags = [t for a, t in open_clip.list_pretrained() if a == arch]
            raise InputError(f"open_clip:{arch} names no pretrained weights: use open_clip:{arch}/TAG "
                             f"(known: {', '.join(tags) or 'none'}) or --weights none")
    def load():
        if tag:  # ARCH/PRETRAINED: a tag (downloaded into OpenCLIP's cache) or a local file
            return _no_open_clip_warnings(lambda: open_clip.create_model(
                model_name, pretrained=tag if pretrained else None))
        # a folder or hf-hub:ORG/NAME (config and weights together), or ARCH alone
        return _no_open_clip_warnings(lambda: open_clip.create_model(
            model_name, pretrained=None, load_weights=pretrained))

    needs_hub = name.startswith("hf-hub:") or (pretrained and tag and not Path(tag).expanduser().is_file())
    try:
        model = _cache_first(load, spec, download, f"open_clip:{name}", hint) if needs_hub else load()
    except (OSError, RuntimeError, ValueError) as exc:
        raise _hub_error(f"open_clip:{name}", spec, exc, hint) from None
    if model_cfg is None:  # hf-hub: the config came with the download
        model_cfg = open_clip.get_model_config(model_name) or {}
    visual = model.visual
    pc = dict(getattr(visual, "preprocess_cfg", {}) or {}) | pre_cfg
    size = pc.get("size", 224)
    native = int(size[0] if isinstance(size, (list, tuple)) else size)
    if image_size and int(image_size) != native:
        raise InputError(f"{spec} takes {native} px images (OpenCLIP cannot resize its position embeddings); "
                         f"use --image-size {native}")
    prep = preprocess_dict(native, pc.get("mean", IMAGENET_MEAN), pc.get("std", IMAGENET_STD),
                           str(pc.get("interpolation", "bicubic")))
    dim = int(getattr(visual, "output_dim", 0) or model_cfg.get("embed_dim", 0))
    arch = {"model_cfg": model_cfg, "preprocess_cfg": {k: v for k, v in pc.items() if k != "size"}}
    return Backbone(str(spec), "open_clip", visual, dim, prep, arch=arch, source=name, revision=tag or None,
                    weights="pretrained" if pretrained else "none")


# --- timm


def _timm(spec: Spec, pretrained: bool, image_size: int | None, download: bool) -> Backbone:
    timm = _import("timm")
    name, kwargs, overlay = spec.name, {}, None
    if spec.local:
        try:
            doc = json.loads((Path(name) / "config.json").read_text("utf-8"))
            name = doc["architecture"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{spec.name} is not a timm model folder (config.json with 'architecture': {exc})") from None
        files = [p for p in (Path(spec.name) / "model.safetensors", Path(spec.name) / "pytorch_model.bin") if p.is_file()]
        if pretrained and not files:
            raise ModelError(f"{spec.name} has no model.safetensors")
        overlay = {"file": str(files[0])} if files else None
    elif name not in timm.list_models(pretrained=False) and name.split(".")[0] not in timm.list_models():
        raise InputError(f"timm has no model {name!r}; see timm.list_models() (e.g. timm:{_example('timm')})")
    if image_size:
        kwargs = {"img_size": int(image_size), "dynamic_img_size": True} if _is_vit(timm, name) else {}
    create = dict(pretrained=pretrained, num_classes=0, **kwargs)
    if overlay:
        create["pretrained_cfg_overlay"] = overlay
    hint = "download the model folder (config.json + model.safetensors) and use --backbone timm:DIR"
    try:
        if pretrained and not spec.local:
            net = _cache_first(lambda: timm.create_model(name, **create), spec, download, f"timm:{name}", hint)
        else:
            net = timm.create_model(name, **create)
    except (OSError, RuntimeError, ValueError) as exc:
        raise _hub_error(f"the weights of timm:{name}", spec, exc, hint) from None
    except TypeError as exc:
        raise InputError(f"timm:{name} cannot take --image-size {image_size}: {exc}") from None
    data = timm.data.resolve_data_config({}, model=net)
    native = int(data["input_size"][-1])
    size = int(image_size or native)
    prep = preprocess_dict(size, data["mean"], data["std"], str(data.get("interpolation", "bicubic")),
                           float(data.get("crop_pct", 1.0)))
    arch = {"name": name, "kwargs": kwargs}
    tag = getattr(net, "pretrained_cfg", {}).get("tag") if pretrained else None
    return Backbone(str(spec), "timm", net, int(net.num_features), prep, arch=arch, source=spec.name,
                    revision=tag, weights="pretrained" if pretrained else "none")


def _is_vit(timm, name: str) -> bool:
    try:
        entry = timm.models.get_arch_name(name)
        fn = timm.models.model_entrypoint(entry)
        mod = inspect.getmodule(fn).__name__
    except (RuntimeError, AttributeError, TypeError):
        return False
    return any(s in mod for s in ("vision_transformer", "eva", "deit", "beit"))


@contextlib.contextmanager
def _offline():
    """The hub clients use their local caches only (huggingface_hub reads HF_HUB_OFFLINE
    once, at import: its constant is switched too)."""
    import huggingface_hub.constants as hc

    old = hc.HF_HUB_OFFLINE
    hc.HF_HUB_OFFLINE = True
    try:
        with _env({"HF_HUB_OFFLINE": "1"}):
            yield
    finally:
        hc.HF_HUB_OFFLINE = old


@contextlib.contextmanager
def _env(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- weight files


def load_backbone_file(bb: Backbone, path: Path) -> None:
    """Load backbone weights from a local safetensors file.

    Accepted key layouts: the library's own state dict (``conv1.weight`` ...), with or
    without a ``backbone.``/``backbone.net.`` prefix (a geohier checkpoint; its heads are
    ignored). A torchvision classifier's final layer is ignored; anything else that does
    not fit is an error naming the keys."""
    from geohier.fileio import read_safetensors

    state = read_safetensors(path, InputError, f"cannot read weights file {path} as safetensors")
    for prefix in ("backbone.net.", "backbone."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    if bb.library == "torchvision":
        drop = classifier_prefixes(bb.spec)
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
    own = bb.net.state_dict()
    wrong_shape = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
                   for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if wrong_shape or missing or unexpected:
        parts = []
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} with another shape ({', '.join(wrong_shape[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:5])})")
        raise InputError(f"weights file {path} does not fit a {bb.spec} backbone: " + "; ".join(parts))
    bb.net.load_state_dict(state)
    bb._sha = None
