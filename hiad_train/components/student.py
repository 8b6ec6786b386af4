"""DeSTSeg's denoising student: a small encoder-decoder from pixels to the teacher's feature maps.

DeSTSeg (Zhang et al. 2023, https://arxiv.org/abs/2211.11317) trains a randomly initialised student
on images with synthetic anomalies to reproduce the frozen teacher's features of the clean image, so
student and teacher disagree exactly where the image is anomalous. The paper's student is a
ResNet-18 encoder with a decoder back to the teacher's stages; here the widths and depths are derived
from the teacher's own stages (`feature_info.channels()` and `.reduction()`), so any backbone works:
the encoder halves the resolution stage by stage down to one stage below the deepest teacher stage,
and the decoder climbs back, emitting one map per teacher stage with that stage's channel count.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def residual_stage(in_channels: int, out_channels: int, blocks: int = 2) -> nn.Sequential:
    """`blocks` residual blocks, the first changing the width."""
    return nn.Sequential(*(ResidualBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(blocks)))


def kaiming_init(module: nn.Module) -> None:
    """He initialisation for convolutions, unit BatchNorm (the usual ResNet start)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def encoder_widths(channels: Sequence[int], reductions: Sequence[int]) -> list[int]:
    """Width of each stride-2 encoder stage (reductions 2, 4, ..., 2 * deepest teacher reduction).

    A stage at a teacher reduction takes that stage's channels; each shallower stage halves the width
    of the next (at least 16); a stage between teacher reductions keeps the previous width; the
    extra bottom stage doubles the deepest width.
    """
    by_reduction = dict(zip(reductions, channels))
    deepest = max(reductions)
    if any(r & (r - 1) or r < 2 for r in reductions):
        raise ValueError(f"teacher reductions must be powers of two >= 2, got {list(reductions)}")
    widths, r, width = [], 2, None
    while r <= deepest:
        if r in by_reduction:
            width = by_reduction[r]
        elif r < min(reductions):
            width = max(16, channels[0] * r // min(reductions))
        widths.append(width)
        r *= 2
    widths.append(2 * by_reduction[deepest])
    return widths


class Student(nn.Module):
    """Normalized image (B, 3, H, W) -> one map per teacher stage, resized to that stage's grid."""

    def __init__(self, channels: Sequence[int], reductions: Sequence[int]):
        super().__init__()
        if len(channels) != len(reductions):
            raise ValueError(f"{len(channels)} teacher channels but {len(reductions)} reductions")
        widths = encoder_widths(channels, reductions)
        stages, previous = [], 3
        for width in widths:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    ResidualBlock(width, width),
                )
            )
            previous = width
        self.encoder = nn.Sequential(*stages)
        # Decoder from the deepest teacher stage up; outputs are returned in the teacher's order.
        self.order = sorted(range(len(channels)), key=lambda i: -reductions[i])
        decoder = []
        for i in self.order:
            decoder.append(residual_stage(previous, channels[i]))
            previous = channels[i]
        self.decoder = nn.ModuleList(decoder)
        kaiming_init(self)

    def forward(self, image: torch.Tensor, grids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Student maps shaped like `grids` (the teacher's maps; only their sizes are used)."""
        x = self.encoder(image)
        out = {}
        for i, stage in zip(self.order, self.decoder):
            x = stage(F.interpolate(x, size=grids[i].shape[-2:], mode="bilinear", align_corners=False))
            out[i] = x
        return [out[i] for i in range(len(grids))]


def student_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over stages of the mean cosine distance (1 - cos) between student and teacher features."""
    return sum((1 - F.cosine_similarity(s, t, dim=1)).mean() for s, t in zip(student, teacher))
