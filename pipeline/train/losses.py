"""Training losses: cross-entropy per level with label smoothing and PIGEON's haversine
smoothing, summed over levels with a weight per level (MixUp/CutMix-aware).

Haversine smoothing: the target of an image in class t is q_c ∝ exp(-(d(t, c) - d_min) / tau)
over the class centroids c, computed per batch, (B, C), so large levels cost no (C, C)
matrix. Distances use geohier.geodesy's one Earth radius.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geohier.dataset import IGNORE_INDEX
from geohier.geodesy import EARTH_RADIUS_KM


def haversine_targets(target: torch.Tensor, lat: torch.Tensor, lon: torch.Tensor,
                      tau_km: float) -> torch.Tensor:
    """PIGEON's haversine label smoothing: soft targets (B, C), rows summing to 1.

    ``target`` (B,) class indices; ``lat``/``lon`` (C,) class centroids in degrees. The
    target of class c is exp(-(d(t, c) - d_min) / tau) / Z, d the great-circle distance
    between centroids (d_min = 0: the true class itself), so it peaks at the true class
    and spreads onto its neighbours within a few tau km.
    """
    # torch, not geohier.geodesy.haversine_km (numpy): the centroids live on the device
    la, lo = torch.deg2rad(lat.double()), torch.deg2rad(lon.double())  # (C,)
    lt, lg = la[target][:, None], lo[target][:, None]  # (B, 1)
    a = torch.sin((la[None] - lt) / 2) ** 2 + torch.cos(lt) * torch.cos(la[None]) * torch.sin((lo[None] - lg) / 2) ** 2
    d = 2 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(a.clamp(0, 1)))  # (B, C) km
    d = d - d.min(1, keepdim=True).values
    q = torch.exp(-d / float(tau_km))
    return (q / q.sum(1, keepdim=True)).float()  # (B, C)


def level_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
               tau_km: float = 0.0, centroids: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean cross-entropy over the rows whose target is not -100 (0 when there is none).

    With ``tau_km > 0`` the hard target becomes ``haversine_targets`` over ``centroids``;
    label smoothing then mixes in the uniform distribution.
    """
    valid = target != IGNORE_INDEX  # (B,)
    if not bool(valid.any()):
        return logits.sum() * 0.0  # keeps the graph (DDP wants every head used)
    z, t = logits[valid].float(), target[valid]  # (N, C), (N,)
    if tau_km and tau_km > 0 and centroids is not None:
        q = haversine_targets(t, centroids[0], centroids[1], tau_km)  # (N, C)
        if label_smoothing > 0:
            q = q * (1 - label_smoothing) + label_smoothing / z.shape[1]
        return -(q * F.log_softmax(z, dim=1)).sum(1).mean()
    return F.cross_entropy(z, t, label_smoothing=label_smoothing)


class OffsetLoss(nn.Module):
    """The hybrid head's loss: L1 between the predicted offset of the TRUE finest class
    (``out["offset"][i, y_i]``) and the image's offset from that class's point, in the
    cell's frame (``geohier.model.encode_offsets``); rows without a finest class are
    ignored. ``positions`` (C, 2) the classes' points (meta's ``cell_positions``),
    ``bounds`` (C, 4) their cells; ``weight`` scales it into the total (``--offset-weight``).
    L1 (not L2): the median error is what geolocation is scored on, and a few images far
    from their cell's point should not pull every offset."""

    def __init__(self, positions, bounds, weight: float = 1.0):
        super().__init__()
        self.register_buffer("positions", torch.as_tensor(positions, dtype=torch.float64))
        self.register_buffer("bounds", torch.as_tensor(bounds, dtype=torch.float64))
        self.weight = float(weight)

    def forward(self, offsets: torch.Tensor, target: torch.Tensor, lat: torch.Tensor,
                lon: torch.Tensor) -> torch.Tensor:
        from geohier.model import encode_offsets

        valid = target >= 0  # IGNORE_INDEX rows have no finest class
        if not bool(valid.any()):
            return offsets.sum() * 0.0  # keeps the graph (DDP wants every head used)
        t = target[valid]
        pos, bounds = self.positions.to(offsets.device), self.bounds.to(offsets.device)
        lat, lon = lat.to(offsets.device)[valid].double(), lon.to(offsets.device)[valid].double()
        want = encode_offsets(lat, lon, pos[t], bounds[t]).float()
        got = offsets[valid].float().gather(1, t[:, None, None].expand(-1, 1, 2))[:, 0]  # (N, 2)
        return (got - want).abs().sum(1).mean()


class GeoLoss(nn.Module):
    """Weighted sum over levels of ``level_loss``; MixUp/CutMix-aware. With ``offset``
    (an ``OffsetLoss``, for a hybrid head) its weighted term is added: ``forward`` then
    needs the images' ``latlon``.

    With the hierarchical loss the model's coarser logits are derived from its finest head
    (``geohier.model.derive_level_logits``): the cross-entropy of each level here is then
    the NLL of the finest softmax summed into that level, OSV-5M's form, with no change."""

    def __init__(self, levels, weights=None, label_smoothing=0.0, tau_km=0.0, centroids=None,
                 offset: OffsetLoss | None = None):
        super().__init__()
        self.levels = [int(v) for v in levels]
        self.weights = {lv: float((weights or {}).get(lv, 1.0)) for lv in self.levels}
        self.label_smoothing, self.tau_km = float(label_smoothing), float(tau_km)
        self.centroids = centroids or {}  # {lv: (lat (C,), lon (C,))} tensors on the device
        self.offset = offset

    def _offset(self, out, labels, latlon, mix=None) -> torch.Tensor:
        from geohier.forward import OFFSET

        if latlon is None:
            raise ValueError("a hybrid head's loss needs the images' latlon")
        y, (lat, lon) = labels[:, -1], latlon
        loss = self.offset(out[OFFSET], y, lat, lon)
        if mix is not None:
            p = mix[1]
            loss = mix[0] * loss + (1 - mix[0]) * self.offset(out[OFFSET], y[p], lat[p], lon[p])
        return loss

    def forward(self, out: dict[int, torch.Tensor], labels: torch.Tensor, mix=None, latlon=None):
        """``labels`` (B, n_levels); ``mix`` = (lam, perm) or None; ``latlon``: (lat (B,),
        lon (B,)) tensors, for a hybrid head. Returns (total, {lv: loss} (and "offset"))."""
        parts = {}
        for j, lv in enumerate(self.levels):
            y = labels[:, j]  # (B,)
            z, cen = out[lv], self.centroids.get(lv)
            loss = level_loss(z, y, self.label_smoothing, self.tau_km, cen)
            if mix is not None:  # MixUp/CutMix: the loss is linear in the target
                loss = mix[0] * loss + (1 - mix[0]) * level_loss(z, y[mix[1]], self.label_smoothing,
                                                                  self.tau_km, cen)
            parts[lv] = loss
        total = sum(self.weights[lv] * parts[lv] for lv in self.levels)
        if self.offset is not None:
            parts["offset"] = self._offset(out, labels, latlon, mix)
            total = total + self.offset.weight * parts["offset"]
        return total, parts

    def plain(self, out: dict[int, torch.Tensor], labels: torch.Tensor, latlon=None) -> torch.Tensor:
        """The validation loss: weighted plain cross-entropy (no smoothing, no mixing), plus
        the weighted offset loss of a hybrid head when ``latlon`` is given."""
        total = sum(self.weights[lv] * level_loss(out[lv], labels[:, j]) for j, lv in enumerate(self.levels))
        if self.offset is not None and latlon is not None:
            total = total + self.offset.weight * self._offset(out, labels, latlon)
        return total
