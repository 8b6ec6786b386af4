"""A de-convolutional decoder that mirrors an encoder's stages (reverse distillation's student).

It is sized from the encoder's channel and stride lists (timm's `feature_info.channels()` and
`.reduction()`), so any CNN backbone gets a matching decoder: from a compact embedding, each block
upsamples by the stride ratio between two encoder stages and maps to that stage's channel count.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class DeconvBlock(nn.Module):
    """Residual upsampling block: transposed conv (kernel = stride = scale), BN, ReLU, 3x3 conv, BN,
    plus a transposed-conv shortcut; ReLU after the sum (a ResNet basic block run backwards)."""

    def __init__(self, in_channels: int, out_channels: int, scale: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, scale, stride=scale, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, scale, stride=scale, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def stride_ratio(coarse: int, fine: int) -> int:
    """The integer upsampling factor from stride `coarse` to stride `fine`."""
    if coarse % fine or coarse < fine:
        raise ValueError(f"encoder strides must grow by integer factors, got {fine} then {coarse}")
    return coarse // fine


class Decoder(nn.Module):
    """Embedding (B, in_channels, H/in_stride, W/in_stride) -> one map per encoder stage, shaped like
    the encoder's (B, channels[i], H/strides[i], W/strides[i]), returned in encoder order."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], in_channels: int, in_stride: int):
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"need one stride per channel count, got {list(channels)} and {list(strides)}")
        sources = [(in_channels, in_stride)] + list(zip(channels, strides))[:0:-1]
        targets = list(zip(channels, strides))[::-1]
        self.blocks = nn.ModuleList(
            DeconvBlock(c_in, c_out, stride_ratio(s_in, s_out))
            for (c_in, s_in), (c_out, s_out) in zip(sources, targets)
        )

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        x = embedding
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs[::-1]
