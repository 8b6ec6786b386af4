"""Cosine-distance maps between feature grids: 1 - cos(a, b) over channels at every position.

Written with plain products and norms (not `F.cosine_similarity`) so the exported ONNX graph is a
handful of elementwise ops and reductions; the eps clamp matches PyTorch's definition.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def cosine_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, C, h, w) x2 -> (B, h, w): 1 - a.b / (max(|a|, eps) max(|b|, eps)) along channels."""
    dot = (a * b).sum(1)
    norms = (a * a).sum(1).sqrt().clamp_min(eps) * (b * b).sum(1).sqrt().clamp_min(eps)
    return 1 - dot / norms


def multiscale_cosine_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over scales of `cosine_distance`, each scale bilinearly resized to the first scale's grid."""
    grid = a[0].shape[-2:]
    total = cosine_distance(a[0], b[0])
    for x, y in zip(a[1:], b[1:]):
        d = cosine_distance(x, y)[:, None]
        total = total + F.interpolate(d, size=grid, mode="bilinear", align_corners=False)[:, 0]
    return total


def scale_gradient(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x unchanged in value, with its gradient multiplied by `weight` (broadcast)."""
    return x * weight + (x * (1 - weight)).detach()


def _flat_cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batch mean of 1 - cos between whole flattened maps (the reconstruction losses' global term)."""
    return (1 - F.cosine_similarity(a.flatten(1), b.flatten(1))).mean()


def hard_mining_cosine_loss(
    encoder: Sequence[torch.Tensor], decoder: Sequence[torch.Tensor], percent: float, factor: float
):
    """Dinomaly's loose reconstruction: global cosine distance per scale, with the gradient of the
    `percent` best-reconstructed positions (smallest per-position distance) scaled by `factor`."""
    total = 0.0
    for e, d in zip(encoder, decoder):
        e = e.detach()
        with torch.no_grad():
            dist = cosine_distance(e, d)
            k = max(1, int(dist.numel() * (1 - percent)))
            threshold = dist.flatten().topk(k).values[-1]
            weight = torch.where(dist < threshold, factor, 1.0)[:, None]
        total = total + _flat_cosine_distance(e, scale_gradient(d, weight))
    return total / len(encoder)


def soft_mining_cosine_loss(encoder: Sequence[torch.Tensor], decoder: Sequence[torch.Tensor], power: float):
    """INP-Former's soft mining: global cosine distance per scale, each position's gradient scaled by
    (its distance / the mean distance) ** power, so hard positions dominate."""
    total = 0.0
    for e, d in zip(encoder, decoder):
        e = e.detach()
        with torch.no_grad():
            dist = cosine_distance(e, d)
            weight = (dist / dist.mean().clamp_min(1e-12)).pow(power)[:, None]
        total = total + _flat_cosine_distance(e, scale_gradient(d, weight))
    return total / len(encoder)
