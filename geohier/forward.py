"""Running models over data: the one device resolver and the one model-over-loader loop.

Evaluation, calibration, the threshold explorer's val logits, training's validation pass
and batch prediction all need the same thing: every batch of a loader through one or more
models in inference mode (autocast on a GPU), logits per level back on the CPU in float32,
with the indices of the images that decoded and the ones that did not. Retrieval
refinement (``geohier.refine``) also needs the pooled features the heads read:
``with_features=True`` returns them beside the logits (one model only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from geohier.errors import InputError

DEVICE_HELP = "auto, cpu, cuda or cuda:N"
#: The extra key of a hybrid model's outputs: (B, C_finest, 2) offsets inside each finest
#: cell (``geohier.model``); carried beside the level logits, ignored by whoever does not know it.
OFFSET = "offset"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): the first GPU when there is one, else the CPU. An unknown name
    or a GPU that is not there is an InputError that says what to use instead.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use {DEVICE_HELP}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda was asked for but no CUDA GPU is available; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


@dataclass
class Outputs:
    """What ``collect`` gathered: ``logits[level]`` (N, C) float32 on the CPU, in the order
    of ``index`` (the dataset indices of the images that decoded); ``skipped``: the
    dataset's records of those that did not; ``features`` (N, D) float32 on the CPU, the
    pooled features the heads read, when asked for (else None). A hybrid model's offsets
    ride along as ``logits["offset"]`` (N, C_finest, 2) (``OFFSET``)."""

    logits: dict[int, torch.Tensor]
    index: np.ndarray
    skipped: list = field(default_factory=list)
    features: torch.Tensor | None = None


def _feature_model(models) -> torch.nn.Module:
    """The one model whose features are asked for: it needs ``features(x)`` and
    ``forward_heads(feats)`` (``geohier.model.GeoModel``); a per-level set has no shared
    features."""
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    if len(models) != 1:
        raise InputError(f"features come from a single model, got {len(models)} (a per-level set of runs has "
                         "no shared features)")
    net = getattr(models[0], "module", models[0])  # DataParallel / DDP wrap the model
    if not (callable(getattr(net, "features", None)) and callable(getattr(net, "forward_heads", None))):
        raise InputError(f"{type(net).__name__} has no features(x) / forward_heads(feats) to take features from")
    return net


def forward_batches(models: torch.nn.Module | Sequence[torch.nn.Module], batches: Iterable,
                    device: torch.device, *, amp: bool | None = None,
                    with_features: bool = False) -> Iterator[tuple]:
    """Yield ``(batch, {level: (B, C) float32 CPU logits})`` for each batch with images.

    ``batches`` yields ``geohier.dataset.Batch``-like objects (``images``, ``index``,
    ``skipped``); a batch whose images all failed is yielded with an empty dict so that
    callers still count it. Several models (a per-level set) see the same images.
    ``amp``: autocast (default: on a GPU). ``with_features``: yield ``(batch, logits,
    (B, D) float32 CPU features)`` instead (None for a batch without images), from one
    model's ``features`` then ``forward_heads`` (the same logits as its forward)."""
    net = _feature_model(models) if with_features else None
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    amp = device.type == "cuda" if amp is None else amp
    with torch.inference_mode():
        for batch in batches:
            if not batch.images.numel():
                yield (batch, {}, None) if with_features else (batch, {})
                continue
            x = batch.images.to(device, non_blocking=True)
            out: dict[int, torch.Tensor] = {}
            feats = None
            with torch.autocast(device.type, enabled=amp):
                if net is not None:
                    f = net.features(x)  # (B, D)
                    out = {lv: z.float().cpu() for lv, z in net.forward_heads(f).items()}
                    feats = f.float().cpu()
                else:
                    for m in models:
                        for lv, z in m(x).items():
                            out[lv] = z.float().cpu()  # (B, C_lv)
            yield (batch, out, feats) if with_features else (batch, out)


def collect(models: torch.nn.Module | Sequence[torch.nn.Module], batches: Iterable, device: torch.device,
            num_classes: dict[int, int], *, amp: bool | None = None,
            progress: Callable[[int], None] | None = None, with_features: bool = False) -> Outputs:
    """Every batch through ``models``; the logits of each level concatenated.

    ``num_classes`` shapes the empty result when no image decoded; ``progress(n)`` is
    called with the number of dataset rows each batch covered. ``with_features``: also
    the features (``Outputs.features``; one model only, see ``forward_batches``)."""
    chunks: dict[int, list[torch.Tensor]] = {lv: [] for lv in num_classes}
    index, skipped, feats = [], [], []
    for batch, out, *f in forward_batches(models, batches, device, amp=amp, with_features=with_features):
        skipped.extend(batch.skipped)
        if out:
            for lv in num_classes:
                chunks[lv].append(out[lv])
            if OFFSET in out:
                chunks.setdefault(OFFSET, []).append(out[OFFSET])
            index.append(np.asarray(batch.index))
            if with_features:
                feats.append(f[0])
        if progress is not None:
            progress(len(batch.index) + len(batch.skipped))
    idx = np.concatenate(index).astype(np.int64) if index else np.zeros(0, np.int64)
    logits = {lv: torch.cat(parts) if parts else torch.zeros(0, num_classes[lv]) for lv, parts in chunks.items()
              if lv != OFFSET}
    if chunks.get(OFFSET):
        logits[OFFSET] = torch.cat(chunks[OFFSET])
    features = None
    if with_features:
        dim = getattr(_feature_model(models), "feature_dim", 0)
        features = torch.cat(feats) if feats else torch.zeros(0, int(dim or 0))
    return Outputs(logits, idx, skipped, features)
