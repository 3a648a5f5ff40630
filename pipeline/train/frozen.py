"""Frozen-backbone training: embed each image once, train the level heads on the features.

``FrozenSteps`` are the three steps of ``pipeline.train.fit._Fit`` that a frozen run
changes; ``fit.FrozenFit`` is the two together (a mixin, so that this module needs no
import of fit). ``load_data`` embeds the train and val images that the workspace's
embedding cache (``geohier.embeddings``) lacks, with the backbone's own evaluation
preprocessing (no augmentation: a frozen backbone sees each
image one way), then holds the features in memory; ``build`` trains only the heads; the
loaders are ``FeatureLoader``s that hand the ordinary epoch loop (``loop.train_one_epoch``
/ ``loop.evaluate``) batches of features instead of images. A second run with the same
backbone, weights and preprocessing reuses the cache and says so in its log; images added
since are embedded incrementally.

The checkpoint is the heads (model.safetensors) and the backbone (backbone.safetensors,
a hard link to the cache's copy), so the run predicts, evaluates and calibrates from its
own folder like any other; with its training images' features (neighbours.safetensors)
it can also refine its guesses by retrieval (``geohier.refine``).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from geohier.dataset import Batch, ManifestDataset
from geohier.embeddings import EmbeddingCache, cache_root, embed
from geohier.model import save_backbone, save_tensors_atomic
from geohier.presets import EvalPreset
from pipeline.train.data import RunData, TrainError, split_datasets
from pipeline.train.samplers import BalancedSampler

#: The embedding cache's copy of the backbone, hard-linked into every frozen run.
CACHE_BACKBONE = "backbone.safetensors"


class FeatureSet:
    """The features of one split: ``feats`` (N, D) float32, ``labels`` (N, L), and the
    ``lat``/``lon`` the validation pass reads (``loop.evaluate``)."""

    def __init__(self, feats: torch.Tensor, labels: np.ndarray, lat: np.ndarray, lon: np.ndarray):
        self.feats, self.labels = feats, torch.as_tensor(labels, dtype=torch.long)
        self.lat, self.lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)

    def __len__(self) -> int:
        return int(self.feats.shape[0])


class FeatureLoader:
    """Batches of cached features shaped like the image loaders' (``Batch``).

    ``shuffle``: a new permutation each epoch (``set_epoch``, seeded), each rank taking
    every world-th row, as DistributedSampler does; else this rank's contiguous share
    (the validation pass gathers the shares)."""

    def __init__(self, data: FeatureSet, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world: int = 1, drop_last: bool = False, sampler=None):
        self.dataset, self.batch_size, self.shuffle = data, max(1, int(batch_size)), shuffle
        self.seed, self.rank, self.world, self.drop_last = seed, rank, world, drop_last
        self.sampler = sampler  # e.g. a BalancedSampler: its draws replace the permutation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _rows(self) -> torch.Tensor:
        n = len(self.dataset)
        if self.sampler is not None:
            return torch.as_tensor(list(self.sampler), dtype=torch.long)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=g)[self.rank::self.world]
        per = math.ceil(n / self.world)
        return torch.arange(min(n, self.rank * per), min(n, (self.rank + 1) * per))  # empty past the end

    def _count(self) -> int:
        """len(self._rows()), without drawing the permutation."""
        n = len(self.dataset)
        if self.sampler is not None:
            return len(self.sampler)
        if self.shuffle:
            return len(range(self.rank, n, self.world))
        per = math.ceil(n / self.world)
        return min(n, (self.rank + 1) * per) - min(n, self.rank * per)

    def _steps(self, n: int) -> int:
        return n // self.batch_size if self.drop_last and n >= self.batch_size else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return self._steps(self._count())

    def __iter__(self):
        rows = self._rows()
        for i in range(self._steps(len(rows))):
            idx = rows[i * self.batch_size:(i + 1) * self.batch_size]
            yield Batch(self.dataset.feats[idx], self.dataset.labels[idx], idx, [])


class HeadsOnly(nn.Module):
    """The heads of a GeoModel as a module of their own: ``forward(features) -> logits``.
    What DDP wraps and the loops call, so gradients sync and nothing runs the backbone."""

    def __init__(self, geo: nn.Module):
        super().__init__()
        self.geo = geo

    def forward(self, feats: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.geo.forward_heads(feats)


class FrozenSteps:
    """The steps of ``_Fit`` that differ on cached features (see the module docstring);
    ``pipeline.train.fit.FrozenFit`` puts them before ``_Fit``'s."""

    def __init__(self, ws, cfg, *args, **kwargs):
        unused = [name for name in ("mixup", "cutmix", "hflip") if getattr(cfg, name)] + \
            (["randaugment"] if cfg.randaugment else [])
        # image augmentations do not apply to cached features
        cfg = replace(cfg, mixup=0.0, cutmix=0.0, hflip=0.0, randaugment=False)
        super().__init__(ws, cfg, *args, **kwargs)
        if unused:
            self.report.log(f"frozen backbone: {', '.join(unused)} ignored (image augmentations; the features "
                            "are embedded once, without augmentation)")

    def load_data(self) -> None:
        cfg, env, h = self.cfg, self.env, self.hierarchy
        train_ds, val_ds = split_datasets(self.ws, h, cfg, self.levels, splits=self.splits)
        val_base = val_ds.dataset if isinstance(val_ds, torch.utils.data.Subset) else val_ds
        val_rows = np.asarray(val_ds.indices if isinstance(val_ds, torch.utils.data.Subset) else
                              np.arange(len(val_ds)), dtype=np.int64)
        describe = self.net.backbone_info
        self.cache = EmbeddingCache.open(cache_root(self.ws), describe)
        preprocess = EvalPreset.from_meta({"input": self.net.preprocess})
        ids = np.concatenate([train_ds.ids, val_base.ids[val_rows]])
        shas = list(train_ds.sha256) + list(val_base.sha256[val_rows])
        paths = list(train_ds.paths) + list(val_base.paths[val_rows])
        self.report.log(f"frozen backbone {describe['spec']} ({describe['feature_dim']}-d features, "
                        f"{self.net.preprocess['image_size']} px): embedding cache {self.cache.key}")
        backbone = self.net.backbone.to(self.env.device).eval()
        report = embed(backbone, preprocess, ids, shas, paths, self.cache, batch_size=cfg.batch_size,
                       device=env.device, workers=cfg.workers, amp=self.amp, progress=env.main,
                       log=self.report.log, env=env if env.distributed else None)
        self.embedding = report
        self.report.log(f"embeddings: {report['new']} new ({report['images_per_s']} img/s), {report['reused']} "
                        f"reused from the cache, {report['unreadable']} unreadable")
        if env.main:
            src = self.cache.path / CACHE_BACKBONE
            if not src.exists():
                save_tensors_atomic(src, self.net.backbone_state())
            save_backbone(self.run.path, self.net, source=src)
        n_train = len(train_ds)
        feats, ok = self.cache.get(ids, shas)
        tr_ok, va_ok = ok[:n_train], ok[n_train:]
        if tr_ok.sum() < 2:
            raise TrainError(f"only {int(tr_ok.sum())} of {n_train} train images could be embedded "
                             f"(unreadable: {', '.join(report['unreadable_examples'][:2]) or '-'})")
        self.train_keep = np.flatnonzero(tr_ok)
        tr = FeatureSet(feats[:n_train][tr_ok], train_ds.labels[tr_ok], train_ds.lat[tr_ok], train_ds.lon[tr_ok])
        va_idx = val_rows[va_ok]
        va = FeatureSet(feats[n_train:][va_ok], val_base.labels[va_idx], val_base.lat[va_idx], val_base.lon[va_idx])
        self.features = tr
        bs = min(cfg.batch_size, max(1, len(tr) // env.world))
        embedded = _Subset(train_ds, self.train_keep)
        sampler = None
        if cfg.balanced:  # class-balanced draws at the finest level, as for images
            sampler = BalancedSampler(embedded.sample_weights(), env.rank, env.world,
                                      cfg.seed)
        train_loader = FeatureLoader(tr, bs, shuffle=True, seed=cfg.seed, rank=env.rank, world=env.world,
                                     drop_last=len(tr) // env.world >= 2 * bs, sampler=sampler)
        val_loader = FeatureLoader(va, max(cfg.batch_size, 1), shuffle=False, rank=env.rank, world=env.world)
        # train_ds: the embedded images only, so _Fit.build's class positions are theirs
        self.data = RunData(embedded, va, train_loader, val_loader, train_loader)
        self.stats = {"missing": train_ds.stats["missing"], "unlabelled": train_ds.stats["unlabelled"],
                      "unreadable": int((~tr_ok).sum()), "train_images": len(tr), "val_images": len(va)}
        if not len(va):
            self.report.log("the val split is empty: no validation metrics (run `pipeline labels` to assign splits)")
        self.steps_per_epoch = min(len(train_loader), cfg.max_steps or len(train_loader))
        if self.steps_per_epoch == 0:
            raise TrainError("the train features yield no batch; lower --batch-size")
        self.total_steps = self.steps_per_epoch * cfg.epochs

    def build(self) -> None:
        super().build()
        self.meta_base["embeddings"] = {"key": self.cache.key, "new": self.embedding["new"],
                                        "reused": self.embedding["reused"]}
        self.model = HeadsOnly(self.net)
        self.optimizer = fused_adamw(self.optimizer)

    def done(self) -> None:
        if self.env.main:
            self.write_neighbours()
        super().done()

    def write_neighbours(self) -> None:
        """neighbours.safetensors: the training images' features, positions and finest
        classes, for retrieval refinement (``geohier.refine``)."""
        from geohier.refine import NeighbourIndex

        fs, finest = self.features, self.levels[-1]
        classes = fs.labels[:, self.levels.index(finest)].numpy()
        NeighbourIndex.from_features(fs.feats, fs.lat, fs.lon, classes, finest,
                                     hierarchy_hash=self.hierarchy.hash).save(self.run.neighbours_path)
        self.report.log(f"wrote {len(fs)} training embeddings for retrieval refinement ({self.run.neighbours_path.name})")


def fused_adamw(optimizer: torch.optim.AdamW) -> torch.optim.Optimizer:
    """The same AdamW (groups, rates, decay) with its fused step: one kernel per tensor
    instead of a dozen. On features the heads' optimizer step costs as much as their
    forward and backward, and the fused one is 3-5x faster on a CPU (bench/frozen.py);
    where this torch or device has no fused AdamW, the optimizer is kept as it is."""
    groups = [{k: v for k, v in g.items() if k not in ("foreach", "fused", "differentiable", "capturable")}
              for g in optimizer.param_groups]
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return optimizer


class _Subset:
    """The rows ``keep`` of a ManifestDataset (the images that were embedded), as
    ``cell_positions``, the run's meta and the balanced sampler read one."""

    def __init__(self, ds, keep: np.ndarray):
        self.levels = ds.levels
        self.labels, self.lat, self.lon = ds.labels[keep], ds.lat[keep], ds.lon[keep]
        self.sources = ds.sources[keep]  # the run's meta records where its training images came from

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    sample_weights = ManifestDataset.sample_weights
