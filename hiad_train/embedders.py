"""Exportable embedders: uint8 NHWC RGB tiles -> a tuple of float32 feature maps.

Mean/std normalization happens inside, so the exported graph takes decoded pixels as they are.
Detectors build theirs from these pieces (PatchCore folds its patch aggregation on top).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hiad_train.backbones import create_backbone


class PixelNormalize(nn.Module):
    """uint8 (B, H, W, 3) RGB -> float32 (B, 3, H, W) normalized with the backbone's mean and std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image.permute(0, 3, 1, 2).float() - self.mean) / self.std


# HiAD's datasets normalize every detector's input with these, whatever the backbone was trained with.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pixel_statistics(backbone: nn.Module, normalization: str) -> tuple[Sequence[float], Sequence[float]]:
    """(mean, std) of an `input_normalization`: "imagenet" (HiAD's), or "backbone" (its pretraining's)."""
    if normalization == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    return backbone.pretrained_cfg["mean"], backbone.pretrained_cfg["std"]


class BackboneFeatures(nn.Module):
    """The backbone's chosen stages as they are: uint8 tiles -> tuple of (B, C_s, h_s, w_s)."""

    def __init__(self, backbone: nn.Module, normalization: str = "backbone"):
        super().__init__()
        self.normalize = PixelNormalize(*pixel_statistics(backbone, normalization))
        self.backbone = backbone
        self.channels = list(backbone.feature_info.channels())
        self.reductions = list(backbone.feature_info.reduction())

    @classmethod
    def create(cls, config, pretrained: bool = True) -> "BackboneFeatures":
        """From a detector config's backbone_name, layers_to_extract_from, backbone_weights and input_normalization."""
        backbone = create_backbone(
            config.backbone_name, config.layers_to_extract_from, config.backbone_weights, pretrained
        )
        return cls(backbone, config.input_normalization).eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.backbone(self.normalize(image)))
