"""INP-Former (Luo et al., "Exploring Intrinsic Normal Prototypes within a Single Image for Universal
Anomaly Detection", CVPR 2025, arXiv:2503.02424) as one HiAD task's detector.

Like Dinomaly, a frozen DINOv2 ViT's middle blocks are averaged in groups (targets) and all together.
From each image's own fused tokens, learned queries extract a few intrinsic normal prototypes (INPs,
one cross-attention block); a noisy bottleneck and decoder blocks whose attention reads only the INPs
(queries: tokens, keys/values: INPs) rebuild the targets, so what no prototype explains is not
rebuilt. Loss: soft-mining global cosine distance (gradients weighted by (d / mean d)^3) plus the INP
coherence loss (every token close to its nearest INP). Anomaly map: summed 1 - cosine per group;
HiAD blurs each tile's map (sigma 4) and scores an image by the mean of its top-k map values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from hiad_train.components.attention import Block, Mlp, SoftmaxAttention, to_grid, to_tokens
from hiad_train.components.cosine import cosine_distance, soft_mining_cosine_loss
from hiad_train.detectors.registry import register_detector
from hiad_train.detectors.vit_base import FusedLayersConfig, ViTReconstruction, decoder_groups, fused_input

TOP_K = 2000  # image score: mean of the k largest map values (as for Dinomaly)


class INPFormerConfig(FusedLayersConfig):
    """INP-Former's keys (ViT-B/14 with registers, blocks 2..9, 6 prototypes, 8 decoder blocks)."""

    total_epochs: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    num_prototypes: int = Field(6, ge=1)  # INP-Former's INP_num
    coherence_weight: float = Field(0.2, ge=0)  # weight of the INP coherence loss
    soft_mining_power: float = Field(3.0, ge=0)


class INPFormerModel(nn.Module):
    """Encoder group maps -> (B, h, w) summed 1 - cosine against their prototype-guided rebuilds."""

    def __init__(self, config: INPFormerConfig, width: int, heads: int):
        super().__init__()
        self.sizes = [len(g) for g in config.fuse_layer_encoder]
        self.groups = config.fuse_layer_decoder
        self.coherence_weight, self.power = config.coherence_weight, config.soft_mining_power
        self.queries = nn.Parameter(torch.randn(1, config.num_prototypes, width) * 0.02)
        self.context_norm = nn.LayerNorm(width, eps=1e-8)
        self.extractor = Block(width, SoftmaxAttention(width, heads), eps=1e-8)
        self.bottleneck = Mlp(width, 4 * width, config.bottleneck_dropout)
        self.blocks = nn.ModuleList(
            Block(width, SoftmaxAttention(width, heads), eps=1e-8) for _ in range(config.decoder_depth)
        )

    def reconstruct(self, features) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """-> fused tokens (B, N, C), the image's prototypes (B, M, C), rebuilt group maps."""
        size = tuple(features[0].shape[-2:])
        tokens = to_tokens(fused_input(features, self.sizes))
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        prototypes = self.extractor(queries, self.context_norm(tokens))
        x = self.bottleneck(tokens)
        outputs = []
        for block in self.blocks:
            x = block(x, prototypes)
            outputs.append(x)
        return tokens, prototypes, [to_grid(g, size) for g in decoder_groups(outputs, self.groups)]

    def loss(self, features) -> torch.Tensor:
        tokens, prototypes, rebuilt = self.reconstruct(features)
        similarity = F.normalize(tokens, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)  # (B, N, M)
        coherence = (1 - similarity.max(-1).values).mean()
        return soft_mining_cosine_loss(features, rebuilt, self.power) + self.coherence_weight * coherence

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return sum(cosine_distance(f, r) for f, r in zip(features, self.reconstruct(features)[2]))


@register_detector
class INPFormer(ViTReconstruction):
    """INP-Former: per-image intrinsic normal prototypes guide the decoder; head = cosine maps."""

    name = "inpformer"
    Config = INPFormerConfig
    postprocess = {"tile_blur_sigma": 4.0, "score_rule": "top_k_mean", "score_top_k": TOP_K}

    @classmethod
    def block_groups(cls, config: INPFormerConfig) -> list[list[int]]:
        return config.encoder_block_groups()

    @classmethod
    def build_model(cls, config: INPFormerConfig, geometry: dict) -> nn.Module:
        return INPFormerModel(config, geometry["width"], geometry["heads"])
