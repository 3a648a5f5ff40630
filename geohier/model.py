"""Backbones with one linear head per grid level; checkpoints as safetensors + JSON.

A ``GeoModel`` is a backbone (``geohier.backbones``: a torchvision classifier without its
final layer, or a foundation model's image tower) that returns pooled features, followed
by one ``nn.Linear`` per level: one forward pass serves every level. The seed's "one model per level" shape is simply a run whose
model has a single level.

Two designs change the heads (``ModelConfig.head`` / ``.loss``, recorded in meta.json's
``arch`` so ``load_run`` rebuilds them):

- ``head="hybrid"`` (OSV-5M's hybrid head): besides the classes, one more ``nn.Linear(D,
  2 * C_finest)`` regresses the image's offset from its finest class's representative point,
  per class, in the cell's own frame (``(dlat / cell height, dlon / cell width)``,
  ``encode_offsets``). One output pair per class rather than 2 outputs conditioned on the
  class: the head needs no class at forward time (the walk picks the class afterwards, and
  every kept candidate gets its own offset), each cell learns its own within-cell map, and it
  costs twice the finest head's parameters. ``forward`` adds the offsets as ``out["offset"]``
  (B, C_finest, 2) (``geohier.forward.OFFSET``); consumers that do not know the key ignore it.
- ``loss="hierarchical"`` (OSV-5M's hierarchical loss): one softmax over the *leaves* of the
  class tree, summed into every level through the parent maps; each level's logits are
  *derived* as the log of those sums (``derive_level_logits``: a logsumexp over each class's
  leaves). Cross-entropy on a level's derived logits is the NLL of its summed probability, so
  the ordinary per-level loss is exactly OSV-5M's form, and inference, calibration and the
  threshold explorer work on the derived level probabilities unchanged. The leaves are the
  finest classes (the finest head's logits) and, with fixed levels, the coarser classes that
  have no class below them (their cells' images were too few at the next level): a coarser
  head is built only for those (``ModelConfig.leaves``), one output per such class, so their
  images keep a class with a probability at their own level. When every class has children
  (adaptive cells label every image at every level), the finest head is the only head.

Like nanoGPT's ``GPTConfig``, a small dataclass (``ModelConfig``) describes the model and is
stored in the run's meta (``arch``), so ``load_run`` rebuilds the model from the run
directory alone. Tensors are stored with safetensors and everything else as JSON: loading a
checkpoint never unpickles anything.

>>> m = build_model("resnet18", {1: 4, 3: 20})
>>> {lv: tuple(t.shape) for lv, t in m(torch.zeros(2, 3, 32, 32)).items()}
{1: (2, 4), 3: (2, 20)}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from geohier.backbones import Backbone, build_backbone, check_backbone, from_arch, is_foundation
from geohier.errors import GeohierError, ModelError, WorkspaceError
from geohier.fileio import (  # the one safetensors I/O; re-exported for model's callers
    atomic_link_or_copy,
    read_safetensors,
    save_tensors_atomic,
)
from geohier.forward import OFFSET
from geohier.runs import BACKBONE_FILE, META_FILE, WEIGHTS_FILE
from geohier.workspace import atomic_write_text

RUN_FORMAT = "geohier-run/1"
DEFAULT_BACKBONE = "resnet50"
#: ``head``: ``cell`` (classes only) or ``hybrid`` (classes + the offset inside the finest cell).
HEADS = ("cell", "hybrid")
#: ``loss``: ``independent`` (one softmax per level) or ``hierarchical`` (the finest softmax
#: summed into every ancestor level).
LOSSES = ("independent", "hierarchical")
#: A derived level's logit for a class without leaves (cannot happen for a tree built from
#: parent maps; a guard): far below any other (probability ~0) but finite.
EMPTY_LOGIT = -1e4


@dataclass
class ModelConfig:
    """What ``GeoModel`` needs to rebuild itself (stored as the run meta's ``arch``).

    ``backbone``: a spec (geohier.backbones); ``backbone_arch``: what rebuilds a
    foundation backbone offline (its library's config; None for torchvision names);
    ``frozen``: the backbone is not trained (its features are cached; the run's
    checkpoint holds the heads, its backbone.safetensors the backbone). ``head`` /
    ``loss``: the design (``HEADS`` / ``LOSSES``, module docstring); ``parents``: with the
    hierarchical loss, for every level but the first, each class's parent class index at
    the previous level (``geohier.hierarchy.Hierarchy.ancestors``)."""

    backbone: str = DEFAULT_BACKBONE
    levels: list[int] = field(default_factory=list)
    num_classes: dict[int, int] = field(default_factory=dict)
    head_dropout: float = 0.0
    backbone_arch: dict | None = None
    frozen: bool = False
    head: str = "cell"
    loss: str = "independent"
    parents: dict[int, list[int]] | None = None

    def __post_init__(self):
        check_backbone(self.backbone)
        self.num_classes = {int(k): int(v) for k, v in self.num_classes.items()}
        if not self.levels:
            self.levels = sorted(self.num_classes)
        self.levels = [int(v) for v in self.levels]
        if sorted(self.levels) != sorted(self.num_classes) or len(set(self.levels)) != len(self.levels):
            raise ModelError(f"levels {self.levels} do not match the class counts of levels "
                             f"{sorted(self.num_classes)}")
        for lv, n in self.num_classes.items():
            if n < 1:
                raise ModelError(f"level {lv} has {n} classes; a head needs at least 1")
        if is_foundation(self.backbone) and not self.backbone_arch:
            raise ModelError(f"backbone {self.backbone} has no stored architecture (arch.backbone_arch)")
        if self.head not in HEADS:
            raise ModelError(f"unknown head {self.head!r}; use one of {', '.join(HEADS)}")
        if self.loss not in LOSSES:
            raise ModelError(f"unknown loss {self.loss!r}; use one of {', '.join(LOSSES)}")
        self.parents = {int(k): [int(i) for i in v] for k, v in (self.parents or {}).items()} or None
        if self.loss == "hierarchical":
            self._check_parents()

    @property
    def finest(self) -> int:
        return max(self.levels)

    def _check_parents(self) -> None:
        need = self.levels[1:]
        have = self.parents or {}
        missing = [lv for lv in need if lv not in have]
        if missing:
            raise ModelError(f"the hierarchical loss needs the parent maps of levels {missing}")
        for prev, lv in zip(self.levels, need, strict=False):
            p = have[lv]
            if len(p) != self.num_classes[lv] or any(not 0 <= i < self.num_classes[prev] for i in p):
                raise ModelError(f"the parents of level {lv} must be {self.num_classes[lv]} class indices in "
                                 f"[0, {self.num_classes[prev]})")

    def leaves(self) -> dict[int, np.ndarray]:
        """With the hierarchical loss: per level, the classes that are leaves of the class
        tree (every class of the finest level; a coarser class without a class below it)."""
        out = {}
        for lv, nxt in zip(self.levels, [*self.levels[1:], None], strict=True):
            has_child = np.zeros(self.num_classes[lv], bool)
            if nxt is not None:
                has_child[np.asarray(self.parents[nxt], dtype=np.int64)] = True
            out[lv] = np.flatnonzero(~has_child)
        return out

    def leaf_ancestors(self) -> dict[int, np.ndarray]:
        """Per level, the class there of each leaf (finest leaves first, then each coarser
        level's in level order; -1 where the leaf is coarser than the level): the maps
        ``derive_level_logits`` sums the leaves' softmax through."""
        leaves = self.leaves()
        order = [self.finest, *[lv for lv in self.levels if lv != self.finest]]
        out = {lv: [] for lv in self.levels}
        for j in order:  # the leaves of level j
            cls = leaves[j]
            for lv in self.levels:
                if lv > j:
                    out[lv].append(np.full(cls.size, -1, np.int64))
            cur, idx = j, cls.astype(np.int64)
            out[j].append(idx)
            for lv in reversed([v for v in self.levels if v < j]):
                idx = np.asarray(self.parents[cur], dtype=np.int64)[idx]
                cur = lv
                out[lv].append(idx)
        return {lv: np.concatenate(parts) for lv, parts in out.items()}

    def to_dict(self) -> dict:
        """JSON form: level keys as strings (JSON object keys)."""
        d = asdict(self)
        d["num_classes"] = {str(k): v for k, v in self.num_classes.items()}
        if self.parents is not None:
            d["parents"] = {str(k): list(v) for k, v in self.parents.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelConfig:
        known = {k: d[k] for k in ("backbone", "levels", "num_classes", "head_dropout", "backbone_arch",
                                             "frozen", "head", "loss", "parents")
                 if k in d}
        return cls(**known)


class GeoModel(nn.Module):
    """A backbone and one linear head per level.

    ``forward(x)`` maps images (B, 3, H, W) to ``{level: logits (B, C_level)}`` (and, for
    a hybrid head, ``"offset"``: (B, C_finest, 2), see the module docstring);
    ``features(x)`` returns the shared pooled features (B, D); ``forward_heads(f)`` the
    logits of features (what a frozen run trains on cached embeddings). A torchvision
    backbone is the torchvision module itself (state keys ``backbone.conv1.weight``); a
    foundation one is a ``geohier.backbones.Backbone`` (``backbone.net.*``).
    """

    def __init__(self, config: ModelConfig, backbone: Backbone | None = None):
        super().__init__()
        self.config = config
        if backbone is None:
            backbone = from_arch(config.backbone_arch) if config.backbone_arch else \
                build_backbone(config.backbone, weights="none")
        self.feature_dim = backbone.feature_dim
        self.preprocess = dict(backbone.preprocess)
        self.backbone = backbone.net if backbone.library == "torchvision" else backbone
        self.dropout = nn.Dropout(config.head_dropout) if config.head_dropout > 0 else nn.Identity()
        # ModuleDict keys must be strings: "1", "3", ... (so state-dict keys are "heads.3.weight").
        # The hierarchical loss builds one output per leaf of the class tree (all the finest
        # classes; a coarser head only for its classes without children), the level logits are
        # derived from them; the hybrid head's regressor is heads.offset (a frozen run's heads
        # include it).
        if config.loss == "hierarchical":
            built = {lv: int(c.size) for lv, c in config.leaves().items() if c.size}
        else:
            built = dict(config.num_classes)
        heads = {str(lv): nn.Linear(self.feature_dim, n) for lv, n in built.items()}
        if config.head == "hybrid":
            heads[OFFSET] = nn.Linear(self.feature_dim, 2 * config.num_classes[config.finest])
        self.heads = nn.ModuleDict(heads)
        if config.loss == "hierarchical":  # not saved: rebuilt from the arch
            self.leaf_levels = [lv for lv in [config.finest, *config.levels[:-1]] if str(lv) in self.heads]
            for lv, a in config.leaf_ancestors().items():
                self.register_buffer(f"leaf_ancestors_{lv}", torch.as_tensor(a, dtype=torch.long), persistent=False)
        if config.frozen:
            self.backbone.requires_grad_(False)

    @property
    def levels(self) -> list[int]:
        return list(self.config.levels)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.frozen:
            self.backbone.eval()  # a frozen backbone's norms and dropouts stay in inference mode
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).flatten(1)  # (B, D)

    def forward_heads(self, feats: torch.Tensor) -> dict:
        """``{level: (B, C_level) logits}``, plus ``"offset"`` (B, C_finest, 2) for a hybrid head."""
        cfg = self.config
        f = self.dropout(feats)
        if cfg.loss == "hierarchical":
            z = torch.cat([self.heads[str(lv)](f) for lv in self.leaf_levels], 1)  # (B, leaves)
            anc = {lv: getattr(self, f"leaf_ancestors_{lv}") for lv in cfg.levels}
            out = derive_level_logits(z, anc, cfg.num_classes)  # {lv: (B, C_lv)}
        else:
            out = {lv: self.heads[str(lv)](f) for lv in cfg.levels}  # {lv: (B, C_lv)}
        if cfg.head == "hybrid":
            out[OFFSET] = self.heads[OFFSET](f).view(f.shape[0], cfg.num_classes[cfg.finest], 2)
        return out

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.forward_heads(self.features(x))  # {lv: (B, C_lv)}

    def head_state(self) -> dict[str, torch.Tensor]:
        """The heads' tensors (``heads.*``): a frozen run's model.safetensors."""
        return {f"heads.{k}": v for k, v in state_dict_tensors(self.heads).items()}  # the heads alone: cheap

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The backbone's tensors under their GeoModel names (``backbone.*``)."""
        return {f"backbone.{k}": v for k, v in state_dict_tensors(self.backbone).items()}


def derive_level_logits(z: torch.Tensor, ancestors: Mapping[int, torch.Tensor],
                        num_classes: Mapping[int, int]) -> dict[int, torch.Tensor]:
    """Levels' logits from leaf logits ``z`` (B, L): for each level in ``ancestors``
    ({level: (L,) the class there of each leaf, -1 = none}), the logsumexp of the logits of
    each class's leaves, so that ``softmax(derived)`` is the leaves' softmax summed into that
    level (renormalised over the leaves under some class of it). Computed in float32 with a
    per-group maximum (stable); a class without leaves gets ``max - 1e4`` (probability ~0,
    but finite).

    >>> z = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    >>> d = derive_level_logits(z, {1: torch.tensor([0, 0, 1, 1])}, {1: 2})
    >>> [round(v, 4) for v in d[1].softmax(1)[0].tolist()]
    [0.3, 0.7]
    """
    z = z.float()
    out = {}
    for lv, anc in ancestors.items():
        anc = anc.to(z.device)
        n = int(num_classes[lv])
        ok = anc >= 0
        zz, a = (z, anc) if bool(ok.all()) else (z[:, ok], anc[ok])
        idx = a[None].expand(zz.shape[0], -1)
        gmax = torch.full((zz.shape[0], n), float("-inf"), device=z.device).scatter_reduce(
            1, idx, zz, reduce="amax", include_self=True)  # (B, C_lv)
        empty = torch.isinf(gmax)
        gsafe = gmax.masked_fill(empty, 0.0)
        s = torch.zeros_like(gsafe).index_add_(1, a, torch.exp(zz - gsafe[:, a]))
        d = torch.log(s.clamp_min(1e-30)) + gsafe
        if bool(empty.any()):
            d = torch.where(empty, zz.max(1, keepdim=True).values + EMPTY_LOGIT, d)
        out[int(lv)] = d
    return out


def class_bounds(hierarchy, level: int) -> np.ndarray:
    """(C, 4) west, south, east, north of each class's cell at ``level``: the frame the
    hybrid head's offsets are measured in (the Predictor's ``bounds``)."""
    return np.stack(hierarchy.bounds(level), axis=1).astype(np.float64)  # cells of any depth (adaptive)


def encode_offsets(lat, lon, pos, bounds):
    """The hybrid head's regression target: ``(dlat / cell height, dlon / cell width)``
    of points ``lat``/``lon`` (N,) from their class's point ``pos`` (N, 2) in its cell
    ``bounds`` (N, 4); dlon wrapped to [-180, 180). numpy or torch alike: (N, 2)."""
    h = bounds[:, 3] - bounds[:, 1]
    w = bounds[:, 2] - bounds[:, 0]
    dlat = (lat - pos[:, 0]) / h
    dlon = ((lon - pos[:, 1] + 180.0) % 360.0 - 180.0) / w
    return (torch.stack if isinstance(dlat, torch.Tensor) else np.stack)([dlat, dlon], 1)


def decode_offsets(offsets, pos, bounds) -> np.ndarray:
    """The hybrid guess (N, 2) lat/lon: the class's point ``pos`` (N, 2) plus the predicted
    ``offsets`` (N, 2) scaled by its cell ``bounds`` (N, 4), clamped to the cell.

    Clamped, because every training image of a class lies in its cell: when the class is
    right the true point is inside the box, and pulling a guess into the box moves each
    coordinate towards it (never away), so the clamp can only help; when the class is wrong
    the guess stays in the cell the walk chose, where its candidate, bounding box, region
    and place name say it is (an unclamped offset could wander into a cell the model gave
    no probability)."""
    off = np.asarray(offsets, dtype=np.float64).reshape(-1, 2)
    pos = np.asarray(pos, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(bounds, dtype=np.float64).reshape(-1, 4)
    lat = np.clip(pos[:, 0] + off[:, 0] * (b[:, 3] - b[:, 1]), b[:, 1], b[:, 3])
    lon = np.clip(pos[:, 1] + off[:, 1] * (b[:, 2] - b[:, 0]), b[:, 0], b[:, 2])
    return np.stack([lat, lon], 1)


def build_model(backbone: str = DEFAULT_BACKBONE, num_classes: Mapping[int, int] | None = None,
                weights: str = "none", head_dropout: float = 0.0, download: bool = True,
                image_size: int | None = None, frozen: bool = False, head: str = "cell",
                loss: str = "independent", parents: Mapping[int, list[int]] | None = None) -> GeoModel:
    """A ``GeoModel`` with heads for ``num_classes`` ({level: classes}).

    ``backbone``: a spec (``geohier.backbones``: a torchvision name, hf:, open_clip:,
    timm:). ``weights``: ``"none"`` (random init), ``"imagenet"`` / ``"pretrained"``
    (torchvision's ImageNet weights, downloaded into the torch cache on first use when
    ``download``; a foundation spec's own weights), or the path of a ``.safetensors``
    file with backbone weights. ``image_size``: the input size (a foundation model's own
    by default). ``frozen``: the backbone is not trained. ``head`` / ``loss`` /
    ``parents``: the design (``ModelConfig``).
    """
    if not num_classes:
        raise ModelError("build_model needs the number of classes of at least one level")
    bb = build_backbone(backbone, weights=weights, image_size=image_size, download=download)
    config = ModelConfig(backbone=bb.spec, levels=sorted(int(k) for k in num_classes),
                         num_classes=dict(num_classes), head_dropout=head_dropout,
                         backbone_arch=None if bb.library == "torchvision" else bb.arch(), frozen=frozen,
                         head=head, loss=loss, parents=dict(parents) if parents else None)
    model = GeoModel(config, bb)
    model.backbone_info = bb.describe()
    return model


# ----------------------------------------------------------------- checkpoints


def unwrap(model: nn.Module) -> nn.Module:
    """The GeoModel inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def state_dict_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies of a module's state, none sharing storage (safetensors refuses
    shared tensors)."""
    out, seen = {}, set()
    for k, v in unwrap(model).state_dict().items():
        t = v.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()))
        out[k] = t
    return out


def save_checkpoint(run_dir: str | os.PathLike, model: nn.Module, meta: dict) -> None:
    """Write the weights (safetensors) then the meta (JSON) into ``run_dir``, each atomically.

    ``meta`` is completed with ``format`` and ``arch`` (from the model) when missing.
    """
    run_dir = Path(run_dir)
    net = unwrap(model)
    meta = dict(meta)
    meta.setdefault("format", RUN_FORMAT)
    meta["arch"] = net.config.to_dict()
    meta.setdefault("input", dict(net.preprocess))
    if getattr(net, "backbone_info", None):
        meta.setdefault("backbone", net.backbone_info)
    tensors = net.head_state() if net.config.frozen else state_dict_tensors(net)
    if net.config.frozen and not (run_dir / BACKBONE_FILE).exists():
        save_backbone(run_dir, net)
    save_tensors_atomic(run_dir / WEIGHTS_FILE, tensors,
                        metadata={"format": RUN_FORMAT, "backbone": net.config.backbone})
    atomic_write_text(run_dir / META_FILE, json.dumps(meta, indent=1) + "\n")


def save_backbone(run_dir: str | os.PathLike, model: nn.Module, source: str | os.PathLike | None = None) -> Path:
    """A frozen run's ``backbone.safetensors``: a hard link to ``source`` (the embedding
    cache's copy of the same weights, so re-training heads costs no disk) where the file
    system allows, else a copy; written from the model when there is no ``source``."""
    dest = Path(run_dir) / BACKBONE_FILE
    if source is not None and Path(source).is_file():
        return atomic_link_or_copy(source, dest)
    save_tensors_atomic(dest, unwrap(model).backbone_state(), metadata={"format": RUN_FORMAT})
    return dest


def read_meta(run_dir: str | os.PathLike) -> dict:
    """A run's meta, checked for its format."""
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise WorkspaceError(f"{Path(run_dir)} is not a finished run: no {META_FILE}")
    try:
        meta = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkspaceError(f"cannot read {path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != RUN_FORMAT or "arch" not in meta:
        raise WorkspaceError(f"{path} is not a geohier run description (format {RUN_FORMAT})")
    return meta


def check_meta(meta: dict, where: str = "") -> ModelConfig:
    """The model config of a run's meta, after checking it against its own hierarchy:
    the hierarchy's hash, and every head's class count against that level's class list."""
    try:
        config = ModelConfig.from_dict(meta["arch"])
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelError(f"{where}{META_FILE} has an unusable arch: {exc}") from None
    hier = meta.get("hierarchy")
    if not isinstance(hier, dict) or "classes" not in hier:
        raise ModelError(f"{where}{META_FILE} has no hierarchy: cannot tell which class is which")
    stored = meta.get("hierarchy_hash")
    actual = _hierarchy_hash(hier, where)
    if stored is None or actual != stored:
        raise ModelError(f"{where}{META_FILE}'s hierarchy does not match its hash ({actual} != {stored}); "
                         "the class lists were changed after training")
    for lv in config.levels:
        cells = hier["classes"].get(str(lv), {}).get("cells")
        if cells is None:
            raise ModelError(f"{where}the model has a head for level {lv} but the hierarchy has no such level")
        if len(cells) != config.num_classes[lv]:
            raise ModelError(f"{where}the level {lv} head has {config.num_classes[lv]} classes but the "
                             f"hierarchy lists {len(cells)} cells at level {lv}")
    return config


def _hierarchy_hash(hier: dict, where: str = "") -> str | None:
    """The hash of a hierarchy dict, recomputed by geohier.hierarchy when it can."""
    from geohier.hierarchy import Hierarchy

    try:
        return Hierarchy.from_dict(hier).hash
    except GeohierError as exc:
        raise ModelError(f"{where}{META_FILE}'s hierarchy is unusable: {exc}") from None


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
             expect_hash: str | None = None) -> tuple[GeoModel, dict]:
    """Rebuild a run's model from its directory alone: ``(model in eval mode, meta)``.

    Refuses (ModelError) a meta whose hierarchy does not match its hash or its heads,
    weights whose shapes differ from the heads, and, when ``expect_hash`` is given (the
    current workspace's hierarchy), a run trained on another hierarchy.
    """

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    where = f"run {run_dir.name}: "
    config = check_meta(meta, where)
    if expect_hash is not None and meta.get("hierarchy_hash") != expect_hash:
        raise ModelError(f"{where}trained on hierarchy {str(meta.get('hierarchy_hash'))[:12]}, but the "
                         f"workspace's hierarchy is {expect_hash[:12]}; retrain or use the matching data")
    path = run_dir / WEIGHTS_FILE
    if not path.is_file():
        raise WorkspaceError(f"{where}no {WEIGHTS_FILE}")
    state = read_safetensors(path, WorkspaceError, f"{where}cannot read {path}")
    if config.frozen:
        bpath = run_dir / BACKBONE_FILE
        if not bpath.is_file():
            raise WorkspaceError(f"{where}a frozen-backbone run needs its {BACKBONE_FILE} (the backbone's "
                                 "weights), which is missing")
        state.update(read_safetensors(bpath, WorkspaceError, f"{where}cannot read {bpath}"))
    model = GeoModel(config)
    own = model.state_dict()
    for lv in () if config.loss == "hierarchical" else config.levels:  # (leaf heads: the shape check below)
        w = state.get(f"heads.{lv}.weight")
        if w is not None and w.shape[0] != config.num_classes[lv]:
            raise ModelError(f"{where}weights have {w.shape[0]} level-{lv} classes, {META_FILE} says "
                             f"{config.num_classes[lv]}")
    bad = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if bad or missing or unexpected:
        raise ModelError(f"{where}{WEIGHTS_FILE} does not fit the {config.backbone} described in {META_FILE} "
                         f"(shape mismatches: {bad[:3]}, missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    corrupt = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if corrupt is not None:
        file = run_dir / BACKBONE_FILE if config.frozen and corrupt.startswith("backbone.") else path
        raise ModelError(f"{where}{file} holds NaN or infinite values ({corrupt}): the weights are corrupt; "
                         "retrain the run or restore its weights")
    model.load_state_dict(state)
    return model.to(device).eval(), meta
