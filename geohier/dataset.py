"""The images of one manifest split as a PyTorch dataset with one label per level.

``ManifestDataset(ws, hierarchy, split, transform)[i]`` is ``(image (3, S, S), labels
LongTensor (n_levels,), i)``: labels are class indices in the hierarchy's lists, ``-100``
(PyTorch's ``ignore_index``) where the image's cell was dropped at that level.

Bad files never crash a run: rows whose file is missing are left out when the dataset is
built (``stats["missing"]``), and an image that fails to decode comes out as a
``Skipped(i)`` marker which ``collate`` drops, counting it in the batch, so the training
loop can add it to its stats (workers cannot update the parent's counters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from geohier.errors import GeohierError, InputError
from geohier.workspace import SPLITS, Workspace

IGNORE_INDEX = -100


def _open_image(path, transform=None):
    """geohier.images.open_image (EXIF orientation, any mode -> RGB, InputError on bad files),
    decoded no bigger than ``transform`` needs (``geohier.images.decode_side_for``)."""
    from geohier.images import decode_side_for, open_image

    return open_image(path, max_side=decode_side_for(transform))


class Skipped(NamedTuple):
    """Placeholder for an image that could not be decoded."""

    index: int
    path: str
    reason: str


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, S, S)
    labels: torch.Tensor  # (B, n_levels) int64, -100 = ignored
    index: torch.Tensor  # (B,) dataset indices
    skipped: list  # [Skipped, ...] dropped from this batch


def collate(items: Sequence) -> Batch:
    """Stack the good items of a batch; report the Skipped ones."""
    good = [it for it in items if not isinstance(it, Skipped)]
    bad = [it for it in items if isinstance(it, Skipped)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), bad)
    imgs = torch.stack([it[0] for it in good])
    labels = torch.stack([it[1] for it in good])
    index = torch.tensor([it[2] for it in good], dtype=torch.long)
    return Batch(imgs, labels, index, bad)


class ManifestDataset(Dataset):
    """Rows (id, path, lat, lon) of one split of the manifest, labelled by a hierarchy.

    ``levels``: a subset of the hierarchy's levels (default: all of them). ``ids``: the
    split's image ids as a run recorded them (``geohier.splits``), instead of the
    manifest's current ``split`` column: a run reads its own split even after a relabel.
    Attributes: ``levels``, ``ids``, ``sha256``, ``paths`` (absolute), ``lat``, ``lon`` (float64
    arrays), ``labels`` (N, n_levels) int64 with -100 where dropped, ``stats``
    ({"rows", "missing", "unlabelled", "images"}).
    """

    def __init__(self, ws: Workspace, hierarchy, split: str, transform: Callable | None = None,
                 limit: int | None = None, seed: int = 0, check_files: bool = True,
                 levels: Sequence[int] | None = None, ids: np.ndarray | None = None):
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if not ws.has_manifest():
            raise GeohierError(f"no manifest in {ws.data_dir}: import or generate images first "
                               "(python -m pipeline demo)")
        columns = ["id", "path", "lat", "lon", "sha256", "source"]
        with ws.manifest() as m:
            if ids is None:
                frame = m.frame(columns, where="split = ?", params=(split,))
            else:
                frame = m.frame(columns)
        if ids is not None:
            wanted = np.asarray(ids, dtype=np.int64)
            frame = frame[np.isin(frame["id"].to_numpy(np.int64), wanted)].reset_index(drop=True)
            self.gone = int(np.unique(wanted).size - len(frame))  # recorded images no longer in the manifest
        else:
            self.gone = 0
        self.split = split
        self.transform = transform
        self.levels = [int(v) for v in (levels or hierarchy.levels)]
        stats = {"rows": int(len(frame)), "missing": 0, "unlabelled": 0}
        lat = frame["lat"].to_numpy(np.float64)
        lon = frame["lon"].to_numpy(np.float64)
        if len(frame):
            per_level = hierarchy.labels(lat, lon)  # {level: (N,) int64, -1 = dropped}
            labels = np.stack([np.asarray(per_level[lv], dtype=np.int64) for lv in self.levels], 1)
        else:
            labels = np.zeros((0, len(self.levels)), dtype=np.int64)
        labels[labels < 0] = IGNORE_INDEX
        keep = (labels != IGNORE_INDEX).any(1)  # an image with no class at any level teaches nothing
        stats["unlabelled"] = int((~keep).sum())
        paths = np.array([str(ws.resolve(p)) for p in frame["path"]], dtype=object)
        if check_files and len(paths):
            exists = np.array([_exists(p) for p in paths], dtype=bool)
            stats["missing"] = int((keep & ~exists).sum())
            self.missing_examples = [str(p) for p in paths[keep & ~exists][:5]]
            keep &= exists
        else:
            self.missing_examples = []
        idx = np.flatnonzero(keep)
        if limit is not None and 0 < limit < idx.size:
            rng = np.random.default_rng(seed)
            idx = np.sort(rng.choice(idx, size=int(limit), replace=False))
        self.ids = frame["id"].to_numpy(np.int64)[idx]
        self.sha256 = frame["sha256"].to_numpy(object)[idx]  # the image bytes' hash: an embedding cache key
        self.sources = frame["source"].to_numpy(object)[idx]  # demo | photos | csv | mapillary
        self.keys = self.ids.astype(str).astype(object)  # how a truth set names its images
        self.paths = paths[idx]
        self.lat, self.lon = lat[idx], lon[idx]
        self.labels = labels[idx]
        stats["images"] = int(idx.size)
        self.stats = stats

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            img = _open_image(path, self.transform)
            x = self.transform(img) if self.transform is not None else img
        except (GeohierError, OSError, ValueError) as exc:  # corrupt / truncated / vanished
            return Skipped(int(i), str(path), str(exc).splitlines()[0][:200])
        return x, torch.from_numpy(self.labels[i]), int(i)

    def class_counts(self, level: int, num_classes: int) -> np.ndarray:
        """Images per class at ``level`` in this dataset, (num_classes,)."""
        col = self.labels[:, self.levels.index(level)]
        return np.bincount(col[col >= 0], minlength=num_classes)

    def sample_weights(self, level: int | None = None) -> np.ndarray:
        """Per-image weights for class-balanced sampling: 1 / (images of its class) at
        ``level`` (default: the finest), falling back to the finest level where the image
        has a class (an image dropped at L8 is balanced by its L5 class)."""
        levels = self.levels if level is None else [lv for lv in self.levels if lv <= level]
        w = np.zeros(len(self), dtype=np.float64)
        done = np.zeros(len(self), dtype=bool)
        for lv in reversed(levels):
            col = self.labels[:, self.levels.index(lv)]
            ok = (col >= 0) & ~done
            if ok.any():
                counts = np.bincount(col[col >= 0])
                w[ok] = 1.0 / counts[col[ok]]
                done |= ok
        w[~done] = w[done].mean() if done.any() else 1.0
        return w


def _exists(path: str) -> bool:
    """A file, or a member present in its zip or tar (``geohier.archives``)."""
    from geohier.archives import exists

    return exists(path)
