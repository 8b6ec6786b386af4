"""DeSTSeg's segmentation network and its losses.

The network reads the per-stage products of L2-normalized teacher and student features (their
negated element-wise product: summed over channels it is minus the cosine similarity, kept per
channel so the network can weigh channels) and predicts the synthetic anomaly mask: residual blocks,
then atrous spatial pyramid pooling (ASPP, Chen et al. 2017) for context at several dilations, then a
1x1 convolution and a sigmoid. It is trained with focal loss plus L1 against the mask, as in the paper
(https://arxiv.org/abs/2211.11317).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hiad_train.components.student import kaiming_init, residual_stage


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Parallel 3x3 convolutions at several dilations plus a global-context branch, fused by a 3x3 conv."""

    def __init__(self, channels: int, rates: Sequence[int] = (6, 12, 18)):
        super().__init__()
        self.pooled = conv_bn_relu(channels, channels, kernel=1)
        self.branches = nn.ModuleList(conv_bn_relu(channels, channels, dilation=r) for r in rates)
        self.fuse = conv_bn_relu((1 + len(rates)) * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.pooled(x.mean(dim=(2, 3), keepdim=True)).expand_as(x)
        return self.fuse(torch.cat([context, *(branch(x) for branch in self.branches)], dim=1))


def segmentation_width(in_channels: int) -> int:
    """Hidden width: two thirds of the input, a multiple of 8 (256 for ResNet-18's 128 + 256 input)."""
    return max(8, round(2 * in_channels / 3 / 8) * 8)


class SegmentationNet(nn.Module):
    """Teacher-student products (B, C, h, w) -> anomaly probability (B, 1, h, w)."""

    def __init__(self, in_channels: int):
        super().__init__()
        width = segmentation_width(in_channels)
        self.res = residual_stage(in_channels, width)
        kaiming_init(self.res)  # the head keeps PyTorch's default init (as DeSTSeg): He init would saturate the sigmoid
        self.head = nn.Sequential(ASPP(width), conv_bn_relu(width, width), nn.Conv2d(width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.res(x)))


def focal_loss(probability: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean binary focal loss (Lin et al. 2017) on probabilities: BCE weighted by (1 - p_t)^gamma."""
    bce = F.binary_cross_entropy(probability, target, reduction="none")
    p_t = probability * target + (1 - probability) * (1 - target)
    return (bce * (1 - p_t) ** gamma).mean()


def segmentation_loss(probability: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """DeSTSeg's segmentation objective: focal loss + L1 against the binary mask (same shape)."""
    return focal_loss(probability, mask, gamma) + F.l1_loss(probability, mask)
