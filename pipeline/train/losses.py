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


class GeoLoss(nn.Module):
    """Weighted sum over levels of ``level_loss``; MixUp/CutMix-aware."""

    def __init__(self, levels, weights=None, label_smoothing=0.0, tau_km=0.0, centroids=None):
        super().__init__()
        self.levels = [int(v) for v in levels]
        self.weights = {lv: float((weights or {}).get(lv, 1.0)) for lv in self.levels}
        self.label_smoothing, self.tau_km = float(label_smoothing), float(tau_km)
        self.centroids = centroids or {}  # {lv: (lat (C,), lon (C,))} tensors on the device

    def forward(self, out: dict[int, torch.Tensor], labels: torch.Tensor, mix=None):
        """``labels`` (B, n_levels); ``mix`` = (lam, perm) or None. Returns (total, {lv: loss})."""
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
        return total, parts

    def plain(self, out: dict[int, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The validation loss: weighted plain cross-entropy (no smoothing, no mixing)."""
        return sum(self.weights[lv] * level_loss(out[lv], labels[:, j]) for j, lv in enumerate(self.levels))
