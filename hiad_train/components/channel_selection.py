"""RealNet's two channel selections (https://arxiv.org/abs/2403.05897).

AFS (anomaly-aware feature selection), once before training: a channel is worth reconstructing when
the squared change a synthetic anomaly makes to it, min-max normalized over all positions, looks like
the anomaly's mask; `afs_channel_errors` measures the mismatch per channel and the channels with the
smallest errors are kept.

RRS (reconstruction residual selection), at every forward: of all stages' squared reconstruction
residuals, only the channels with the largest residual (by spatial max, and by spatial mean) go on to
the segmentation net, so the net sees the channels that disagree most on *this* tile. The selection is
a TopK and a GatherElements in ONNX: no Python control flow.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def afs_channel_errors(
    anomalous: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
    """(B, C, h, w) features with and without anomalies, (B, 1, H, W) mask -> (C,) mean squared error
    between each channel's min-max normalized squared difference and the mask (nearest-resized to h, w)."""
    diff = (anomalous - clean).square().transpose(0, 1).flatten(1)  # (C, B*h*w)
    low, high = diff.min(dim=1, keepdim=True).values, diff.max(dim=1, keepdim=True).values
    diff = (diff - low) / (high - low + eps)
    label = F.interpolate(mask.float(), size=anomalous.shape[-2:], mode="nearest").transpose(0, 1).flatten(1)
    return (diff - label).square().mean(dim=1)


def select_channels(errors: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the k channels with the smallest errors; NaN errors count as the worst."""
    errors = torch.where(torch.isnan(errors), torch.full_like(errors, float("inf")), errors)
    return torch.sort(torch.topk(errors, k, largest=False).indices).values


def top_residual_channels(
    residual: torch.Tensor, ranking: torch.Tensor, modes: Sequence[str], numbers: Sequence[int]
) -> torch.Tensor:
    """(B, C, h, w) residual, (B, C, h, w) ranking statistic -> (B, sum(numbers), h, w): per mode
    ("max" or "mean" of the ranking over positions), the residual's `number` top-ranked channels,
    largest first."""
    flat = ranking.flatten(2)
    chosen = []
    for mode, k in zip(modes, numbers):
        statistic = flat.amax(dim=2) if mode == "max" else flat.mean(dim=2)
        index = torch.topk(statistic, k, dim=1).indices  # (B, k), sorted
        chosen.append(torch.gather(residual, 1, index[:, :, None, None].expand(-1, -1, *residual.shape[-2:])))
    return torch.cat(chosen, dim=1)
