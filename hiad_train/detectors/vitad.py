"""ViTAD (Zhang et al., "Exploring Plain ViT Reconstruction for Multi-class Unsupervised Anomaly
Detection", 2023, arXiv:2312.07495) as one HiAD task's detector.

A frozen plain ViT is the teacher: its tokens at a few blocks are the targets, and its last block (the
neck) is fused by a linear layer and fed to a decoder of plain ViT blocks. Decoder block j rebuilds the
teacher block mirrored around the neck (teacher block 9 of 12 <-> decoder block 3), so the decoder is
as deep as the distance from the shallowest target to the neck. Anomaly map: the sum over targets of
1 - cosine between teacher and decoder tokens; HiAD blurs each tile's map (sigma 4) before merging.
Unlike ViTAD's decoder, this one has no learned position embedding of its own (tiles come in any
size; the neck tokens already carry the teacher's positions).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from hiad_train.components.attention import Block, SoftmaxAttention, to_grid, to_tokens
from hiad_train.components.cosine import cosine_distance
from hiad_train.components.vit import vit_geometry
from hiad_train.detectors.registry import register_detector
from hiad_train.detectors.vit_base import ViTConfig, ViTReconstruction


class ViTADConfig(ViTConfig):
    """ViTAD's keys: teacher blocks (`layers_to_extract_from`), neck blocks, AdamW settings."""

    backbone_name: str = "vit_small_patch16_224.dino"
    layers_to_extract_from: list[int] = Field([2, 5, 8], min_length=1)  # ViTAD's teachers [3, 6, 9], 0-based
    neck_layers: list[int] = Field([11], min_length=1)  # ViTAD's neck [12], 0-based
    total_epochs: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)

    @model_validator(mode="after")
    def _neck_after_targets(self) -> "ViTADConfig":
        depth = vit_geometry(self.backbone_name)["depth"]
        if not all(max(self.layers_to_extract_from) < n < depth for n in self.neck_layers):
            raise ValueError(
                f"neck_layers: {self.neck_layers} must lie after the target blocks {self.layers_to_extract_from} "
                f"and within {self.backbone_name}'s {depth} blocks"
            )
        return self


class ViTADModel(nn.Module):
    """Features (targets..., necks...) -> (B, h, w) summed 1 - cosine between targets and their rebuilds."""

    def __init__(self, width: int, heads: int, targets: list[int], neck: int, n_neck: int):
        super().__init__()
        self.n_targets = len(targets)
        self.taps = [neck - t - 1 for t in targets]  # decoder block rebuilding each target (mirrored around the neck)
        self.fuse = nn.Linear(width * n_neck, width)
        self.blocks = nn.ModuleList(Block(width, SoftmaxAttention(width, heads)) for _ in range(max(self.taps) + 1))

    def reconstruct(self, features) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        targets, necks = list(features[: self.n_targets]), features[self.n_targets :]
        size = tuple(targets[0].shape[-2:])
        x = self.fuse(torch.cat([to_tokens(n) for n in necks], -1))
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return targets, [to_grid(outputs[tap], size) for tap in self.taps]

    def loss(self, features) -> torch.Tensor:
        targets, rebuilt = self.reconstruct(features)
        return sum(cosine_distance(t, r).mean() for t, r in zip(targets, rebuilt))

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        targets, rebuilt = self.reconstruct(features)
        return sum(cosine_distance(t, r) for t, r in zip(targets, rebuilt))


@register_detector
class ViTAD(ViTReconstruction):
    """ViTAD: plain-ViT teacher, plain-ViT decoder from the fused neck; head = teacher vs decoder cosine maps."""

    name = "vitad"
    Config = ViTADConfig
    postprocess = {"tile_blur_sigma": 4.0}

    @classmethod
    def block_groups(cls, config: ViTADConfig) -> list[list[int]]:
        return [[b] for b in config.layers_to_extract_from + config.neck_layers]

    @classmethod
    def build_model(cls, config: ViTADConfig, geometry: dict) -> nn.Module:
        return ViTADModel(
            geometry["width"],
            geometry["heads"],
            config.layers_to_extract_from,
            max(config.neck_layers),
            len(config.neck_layers),
        )
