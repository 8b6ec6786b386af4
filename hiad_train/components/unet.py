"""A feature-reconstruction U-Net: GroupNorm residual blocks, self-attention at chosen depths, skips.

RealNet (Zhang et al. 2024, https://arxiv.org/abs/2403.05897) reconstructs a backbone stage's selected
channels with a diffusion-style U-Net (without the timestep input): the encoder halves the grid
between levels, the decoder climbs back concatenating every encoder output, and the last convolution
starts at zero so the untrained net reconstructs nothing. Widths come from the input's channel count
(`width` times each level's multiplier), and the GroupNorm group and attention-head counts are derived
from the widths, so narrow backbones (EfficientNet-Lite0's 40-channel stage) work as well as wide ones.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (32 for the usual multiples of 32, fewer for narrow widths)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def attention_heads(channels: int, head_channels: int = 64) -> int:
    """About `channels / head_channels` heads, at least one, dividing `channels`."""
    return next(h for h in range(max(1, channels // head_channels), 0, -1) if channels % h == 0)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 projection shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            group_norm(in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.body(x)


class Attention(nn.Module):
    """Multi-head self-attention over the grid positions, added to the input (output projection starts at 0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.heads = attention_heads(channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b * self.heads, 3 * c // self.heads, h * w).chunk(3, dim=1)
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c // self.heads), dim=-1)  # (b*heads, hw, hw)
        mixed = (v @ weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.out(mixed)


def level_block(in_channels: int, out_channels: int, attend: bool) -> nn.Sequential:
    layers = [ResBlock(in_channels, out_channels)]
    if attend:
        layers.append(Attention(out_channels))
    return nn.Sequential(*layers)


class ReconstructionUNet(nn.Module):
    """(B, C, h, w) -> (B, C, h, w); h and w must be divisible by 2 ** (len(channel_mult) - 1).

    `width` is the first level's base width; level i has `width * channel_mult[i]` channels and runs
    `num_res_blocks` blocks, with attention where its downsampling factor is in `attention_mult`.
    """

    def __init__(
        self, channels: int, width: int, num_res_blocks: int, channel_mult: Sequence[int], attention_mult: Sequence[int]
    ):
        super().__init__()
        self.levels = len(channel_mult)
        widths = [width * m for m in channel_mult]
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.encoder = nn.ModuleList()
        skips, current, factor = [widths[0]], widths[0], 1
        for level, w in enumerate(widths):
            for _ in range(num_res_blocks):
                self.encoder.append(level_block(current, w, factor in attention_mult))
                current = w
                skips.append(current)
            if level < self.levels - 1:
                self.encoder.append(nn.AvgPool2d(2))
                skips.append(current)
                factor *= 2
        self.middle = nn.Sequential(ResBlock(current, current), Attention(current), ResBlock(current, current))
        self.decoder = nn.ModuleList()
        for level in reversed(range(self.levels)):
            for i in range(num_res_blocks + 1):
                layers = [level_block(current + skips.pop(), widths[level], factor in attention_mult)]
                current = widths[level]
                if level > 0 and i == num_res_blocks:
                    layers.append(nn.ConvTranspose2d(current, current, 4, stride=2, padding=1))
                    factor //= 2
                self.decoder.append(nn.Sequential(*layers))
        self.out = nn.Sequential(group_norm(current), nn.SiLU(), nn.Conv2d(current, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        skips = [h]
        for block in self.encoder:
            h = block(h)
            skips.append(h)
        h = self.middle(h)
        for block in self.decoder:
            h = block(torch.cat([h, skips.pop()], dim=1))
        return self.out(h)
