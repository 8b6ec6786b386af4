"""What the ViT detectors (ViTAD, Dinomaly, INP-Former) share: the backbone keys with the tile-size
rule, and the reconstruction recipe: a frozen ViT encoder (the embedder, run once over the training
tiles), a decoder trained over epochs on those cached features, and a head that scores the
encoder-decoder cosine distance. Each detector supplies its block groups and its decoder module."""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar, Sequence

import torch
from pydantic import Field, model_validator
from torch import nn

from hiad_train.components.epochs import optimize, seeded, train_epochs
from hiad_train.components.vit import ViTFeatures, vit_geometry
from hiad_train.detectors.base import EpochConfig, NetworkDetector, TaskData


class ViTConfig(EpochConfig):
    """Backbone keys of the ViT detectors; `layers_to_extract_from` are 0-based block indices."""

    backbone_name: str = "vit_base_patch14_reg4_dinov2"
    layers_to_extract_from: list[int] = Field([2, 3, 4, 5, 6, 7, 8, 9], min_length=1)
    allow_random_backbone: bool = False  # tests only: a random ViT when backbone_weights is not given
    weight_decay: float = Field(1e-4, ge=0)

    @model_validator(mode="after")
    def _known_blocks(self) -> "ViTConfig":
        depth = vit_geometry(self.backbone_name)["depth"]
        bad = [i for i in self.layers_to_extract_from if not 0 <= i < depth]
        if bad:
            raise ValueError(f"layers_to_extract_from: {self.backbone_name} has blocks 0..{depth - 1}, got {bad}")
        return self

    def check_tile_size(self, size: tuple[int, int]) -> None:
        """Tiles must be a whole number of ViT patches; the message proposes the nearest valid sides."""
        patch = vit_geometry(self.backbone_name)["patch"]
        for side in size:
            if side % patch:
                lower = max(patch, side - side % patch)
                raise ValueError(
                    f"tile side {side} px is not a multiple of {self.backbone_name}'s patch size {patch}: "
                    f"use {lower} or {lower + patch if lower < side else lower}"
                )


class ViTReconstruction(NetworkDetector):
    """A decoder learns to rebuild the frozen ViT's features of normal tiles; head = cosine distance map.
    Subclasses set `name`, `Config`, `postprocess` and define `block_groups` and `build_model`."""

    Config: ClassVar[type[ViTConfig]] = ViTConfig

    def __init__(self, config: ViTConfig, seed: int = 0):
        super().__init__(config, seed)
        with seeded(seed):
            self.net = self.build_model(config, vit_geometry(config.backbone_name))
        self.net.eval()

    @classmethod
    @abstractmethod
    def block_groups(cls, config: ViTConfig) -> list[list[int]]:
        """The embedder's outputs: each the mean of these blocks' token maps."""

    @classmethod
    @abstractmethod
    def build_model(cls, config: ViTConfig, geometry: dict) -> nn.Module:
        """The learned part: forward(*features) -> (B, h, w) scores; loss(features) -> scalar for training."""

    @classmethod
    def build_embedder(cls, config: ViTConfig, pretrained: bool = True) -> nn.Module:
        return ViTFeatures.create(config, cls.block_groups(config), pretrained)

    def fit(self, data: TaskData, progress: bool = False) -> dict:
        cfg, model = self.config, self.net.to(data.device)
        n = data.features[0].shape[0]
        generator = torch.Generator().manual_seed(data.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)

        def step() -> float:
            batches = torch.randperm(n, generator=generator).split(cfg.batch_size)
            loss = lambda b: model.loss([f[b] for f in data.features])  # noqa: E731
            return optimize(model, batches, loss, [optimizer], precision=cfg.precision)

        return train_epochs(self, cfg, data, step, progress)


class FusedLayersConfig(ViTConfig):
    """Dinomaly's and INP-Former's keys: encoder blocks averaged in groups (the reconstruction targets;
    all of them averaged is the decoder's input), decoder blocks averaged in the same way, a noisy bottleneck."""

    fuse_layer_encoder: list[list[int]] = [[0, 1, 2, 3], [4, 5, 6, 7]]  # indices into layers_to_extract_from
    fuse_layer_decoder: list[list[int]] = [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]  # indices into the decoder's blocks, last block first
    decoder_depth: int = Field(8, ge=1)
    bottleneck_dropout: float = Field(0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _groups(self) -> "FusedLayersConfig":
        for key, groups, count in (
            ("fuse_layer_encoder", self.fuse_layer_encoder, len(self.layers_to_extract_from)),
            ("fuse_layer_decoder", self.fuse_layer_decoder, self.decoder_depth),
        ):
            if not groups or any(not g or not all(0 <= i < count for i in g) for g in groups):
                raise ValueError(f"{key}: {groups} needs non-empty groups of indices in 0..{count - 1}")
        if len(self.fuse_layer_encoder) != len(self.fuse_layer_decoder):
            raise ValueError(
                f"fuse_layer_encoder and fuse_layer_decoder need as many groups "
                f"({len(self.fuse_layer_encoder)} vs {len(self.fuse_layer_decoder)})"
            )
        return self

    def encoder_block_groups(self) -> list[list[int]]:
        return [[self.layers_to_extract_from[i] for i in g] for g in self.fuse_layer_encoder]


def fused_input(groups: Sequence[torch.Tensor], sizes: Sequence[int]) -> torch.Tensor:
    """The mean over every encoder block, from the group means and the groups' sizes."""
    return sum(g * n for g, n in zip(groups, sizes)) / sum(sizes)


def decoder_groups(outputs: Sequence[torch.Tensor], groups: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Decoder block outputs (first block first) -> per group, the mean of its blocks counted from the last."""
    last_first = list(outputs)[::-1]
    return [sum(last_first[i] for i in g) / len(g) for g in groups]
