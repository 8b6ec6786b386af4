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
