"""Dinomaly (Guo et al., "Dinomaly: The Less Is More Philosophy in Multi-Class Unsupervised Anomaly
Detection", CVPR 2025, arXiv:2405.14325) as one HiAD task's detector.

A frozen DINOv2 ViT's middle blocks are averaged in groups (the targets) and all together (the
decoder's input). A noisy bottleneck (an MLP with dropout) and a decoder of linear-attention blocks
rebuild the targets; linear attention cannot focus, so the decoder cannot learn to copy anomalies
through. Training uses the loose loss: global cosine distance with the gradient of the 90 %
best-rebuilt positions scaled down. Anomaly map: summed 1 - cosine per group; HiAD blurs each tile's
map (sigma 4) and scores an image by the mean of its top-k map values. Unlike Dinomaly, the decoder
sees patch tokens only (the embedder drops class and register tokens).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from hiad_train.components.attention import Block, LinearAttention, Mlp, to_grid, to_tokens
from hiad_train.components.cosine import cosine_distance, hard_mining_cosine_loss
from hiad_train.detectors.registry import register_detector
from hiad_train.detectors.vit_base import FusedLayersConfig, ViTReconstruction, decoder_groups, fused_input

TOP_K = 2000  # image score: mean of the k largest map values (Dinomaly: top 1 % of a 448^2 map)


class DinomalyConfig(FusedLayersConfig):
    """Dinomaly's keys (ViT-B/14 with registers, blocks 2..9, two groups, 8 decoder blocks)."""

    total_epochs: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0)
    hard_mining_percent: float = Field(0.9, ge=0, lt=1)  # share of positions whose gradient is scaled down
    hard_mining_factor: float = Field(0.1, ge=0, le=1)


class DinomalyModel(nn.Module):
    """Encoder group maps -> (B, h, w) summed 1 - cosine against their rebuilds."""

    def __init__(self, config: DinomalyConfig, width: int, heads: int):
        super().__init__()
        self.sizes = [len(g) for g in config.fuse_layer_encoder]
        self.groups = config.fuse_layer_decoder
        self.percent, self.factor = config.hard_mining_percent, config.hard_mining_factor
        self.bottleneck = Mlp(width, 4 * width, config.bottleneck_dropout)
        self.blocks = nn.ModuleList(
            Block(width, LinearAttention(width, heads), eps=1e-8) for _ in range(config.decoder_depth)
        )

    def reconstruct(self, features) -> list[torch.Tensor]:
        size = tuple(features[0].shape[-2:])
        x = self.bottleneck(to_tokens(fused_input(features, self.sizes)))
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return [to_grid(g, size) for g in decoder_groups(outputs, self.groups)]

    def loss(self, features) -> torch.Tensor:
        return hard_mining_cosine_loss(features, self.reconstruct(features), self.percent, self.factor)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return sum(cosine_distance(f, r) for f, r in zip(features, self.reconstruct(features)))


@register_detector
class Dinomaly(ViTReconstruction):
    """Dinomaly: fused DINOv2 blocks, noisy bottleneck, linear-attention decoder; head = cosine maps."""

    name = "dinomaly"
    Config = DinomalyConfig
    postprocess = {"tile_blur_sigma": 4.0, "score_rule": "top_k_mean", "score_top_k": TOP_K}

    @classmethod
    def block_groups(cls, config: DinomalyConfig) -> list[list[int]]:
        return config.encoder_block_groups()

    @classmethod
    def build_model(cls, config: DinomalyConfig, geometry: dict) -> nn.Module:
        return DinomalyModel(config, geometry["width"], geometry["heads"])
