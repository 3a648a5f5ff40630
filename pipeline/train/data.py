"""The train and val data of a run: datasets, samplers and loaders; class positions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from geohier.backbones import IMAGENET_MEAN, IMAGENET_STD
from geohier.dataset import ManifestDataset, collate
from geohier.errors import GeohierError
from geohier.geodesy import to_latlon, unit_vectors
from geohier.presets import EvalPreset, TrainPreset
from geohier.workspace import Workspace
from pipeline.train.distributed import DistEnv, worker_init
from pipeline.train.samplers import BalancedSampler, ShardSampler


class TrainError(GeohierError):
    """Training cannot start or go on (bad data, bad parameters, out of memory)."""


@dataclass
class RunData:
    """What ``load_data`` built. ``train_sampler`` gets ``set_epoch`` every epoch."""

    train_ds: ManifestDataset
    val_ds: torch.utils.data.Dataset
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    train_sampler: torch.utils.data.Sampler

    def __getitem__(self, key: str):  # data["train_loader"], as callers wrote before
        return getattr(self, key)


def split_datasets(ws: Workspace, hierarchy, cfg, levels, train_tf=None, eval_tf=None, splits=None):
    """The train and val ManifestDatasets of a run (``splits``: the run's own split version,
    ``geohier.splits.Splits``; the manifest's current split when None); a TrainError saying
    what to do when the train split has fewer than two usable images."""
    train_ds = ManifestDataset(ws, hierarchy, "train", train_tf, limit=cfg.limit_train, seed=cfg.seed,
                               levels=levels, ids=splits.ids["train"] if splits is not None else None)
    if len(train_ds) == 0:
        s = train_ds.stats
        raise TrainError(f"the train split has no usable image ({s['rows']} rows, {s['missing']} files missing, "
                         f"{s['unlabelled']} without a class): run `python -m pipeline labels` "
                         "(which assigns splits) or add images")
    if len(train_ds) < 2:
        raise TrainError("the train split has 1 usable image; training needs at least 2")
    val_ds = ManifestDataset(ws, hierarchy, "val", eval_tf, limit=cfg.limit_val or None, seed=cfg.seed,
                             levels=levels, ids=splits.ids["val"] if splits is not None else None)
    if cfg.limit_val == 0:
        val_ds = torch.utils.data.Subset(val_ds, [])
    return train_ds, val_ds


def load_data(ws: Workspace, hierarchy, cfg, levels, env: DistEnv, preprocess: dict | None = None,
              splits=None) -> RunData:
    """Datasets and loaders of the train and val splits for ``levels`` (``cfg``: the run's
    TrainConfig; ``preprocess``: the backbone's input block, size / mean / std /
    interpolation; ImageNet's at ``cfg.image_size`` by default)."""
    prep = preprocess or {"image_size": cfg.image_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    train_tf = TrainPreset(int(prep["image_size"]), prep["mean"], prep["std"], hflip_prob=cfg.hflip,
                           randaugment=cfg.randaugment, interpolation=prep.get("interpolation", "bilinear"))
    eval_tf = EvalPreset.from_meta({"input": prep})
    train_ds, val_ds = split_datasets(ws, hierarchy, cfg, levels, train_tf, eval_tf, splits)
    if cfg.balanced:
        sampler = BalancedSampler(train_ds.sample_weights(), env.rank, env.world, cfg.seed)
    else:
        sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=env.world, rank=env.rank,
                                                      shuffle=True, seed=cfg.seed)
    per_rank = len(sampler)
    bs = min(cfg.batch_size, per_rank)
    kw = dict(num_workers=cfg.workers, collate_fn=collate, pin_memory=env.device.type == "cuda",
              worker_init_fn=worker_init if cfg.workers > 0 else None, persistent_workers=False)
    if cfg.workers > 0:
        kw["prefetch_factor"] = 4
    # drop_last: a last batch of one image breaks BatchNorm in train mode
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=bs, sampler=sampler,
                                               drop_last=per_rank % bs == 1 or per_rank >= 2 * bs, **kw)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=max(cfg.batch_size, 1),
                                             sampler=ShardSampler(len(val_ds), env.rank, env.world), **kw)
    return RunData(train_ds, val_ds, train_loader, val_loader, sampler)


def cell_positions(ds: ManifestDataset, level: int, hierarchy) -> list[list[float]]:
    """Mean training-image position per class of ``level`` (the class centroid where a
    class has no training image): averaged as 3-D unit vectors, so it is right across the
    antimeridian."""
    j = ds.levels.index(level)
    y = ds.labels[:, j]
    ok = y >= 0
    xyz = unit_vectors(ds.lat[ok], ds.lon[ok])  # (N, 3)
    acc = np.zeros((hierarchy.num_classes[level], 3))
    np.add.at(acc, y[ok], xyz)
    clat, clon = hierarchy.centroids(level)
    out_lat, out_lon = np.array(clat, dtype=float), np.array(clon, dtype=float)
    has = np.linalg.norm(acc, axis=1) > 1e-9
    out_lat[has], out_lon[has] = to_latlon(acc[has])
    return [[round(float(a), 5), round(float(b), 5)] for a, b in zip(out_lat, out_lon, strict=True)]
