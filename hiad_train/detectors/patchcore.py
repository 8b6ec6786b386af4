"""PatchCore (Roth et al. 2022, https://arxiv.org/abs/2106.08265) as one HiAD task's detector:
a coreset memory bank of locally aware patch embeddings, scored by k-NN distance."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import Field, field_validator
from torch import nn

from hiad_train.components.coreset import coreset_size, greedy_coreset, greedy_picks
from hiad_train.components.knn import KnnHead
from hiad_train.components.patch_embedding import PatchEmbedder
from hiad_train.detectors.base import Detector, DetectorConfig, TaskData
from hiad_train.detectors.registry import register_detector
from hiad_train.embedders import BackboneFeatures


class PatchCoreConfig(DetectorConfig):
    """HiAD's PatchCore keys, plus the coreset's projection.

    Input normalization is HiAD's (ImageNet statistics) by default, not tf_efficientnet_lite0's own
    (0.5/0.5): on the held-out poly modules it is what put HiAD's PatchCore ahead of ours
    (docs/quality.md, "Against HiAD")."""

    input_normalization: Literal["backbone", "imagenet"] = "imagenet"
    merge_size: int = Field(3, ge=1)
    percentage: float = Field(0.1, gt=0, le=1)
    pretrain_embed_dimension: int = Field(1024, ge=1)
    target_embed_dimension: int = Field(128, ge=1)
    anomaly_scorer_num_nn: int = Field(1, ge=1)
    coreset_projection_dim: int = Field(128, ge=1)  # HiAD's: no projection for 128-d embeddings

    @field_validator("merge_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 != 1:
            raise ValueError("merge_size must be odd (a centred neighbourhood)")
        return v


@register_detector
class PatchCore(Detector):
    name = "patchcore"
    Config = PatchCoreConfig
    head_kind = "knn"
    memory_based = True
    # HiAD's RescaleSegmentor blurs each tile's map (sigma 4) before stitching: AUPRO +0.003 to +0.021
    # on each of 8 sets, image AUROC unchanged on average (docs/quality.md, "Against HiAD").
    postprocess = {"tile_blur_sigma": 4.0}

    def __init__(self, config: PatchCoreConfig, seed: int = 0):
        super().__init__(config, seed)
        self.memory_bank: torch.Tensor | None = None

    @classmethod
    def build_embedder(cls, config: PatchCoreConfig, pretrained: bool = True) -> nn.Module:
        features = BackboneFeatures.create(config, pretrained)
        return PatchEmbedder(
            features, config.merge_size, config.pretrain_embed_dimension, config.target_embed_dimension
        ).eval()

    def fit(self, data: TaskData, progress: bool = False) -> dict:
        (embeddings,) = data.features
        features = embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])
        picked = greedy_coreset(
            features, self.config.percentage, self.config.coreset_projection_dim, seed=self.seed, progress=progress
        )
        self.memory_bank = features[picked].contiguous()
        return {"bank_size": int(self.memory_bank.shape[0]), "training_patches": int(features.shape[0])}

    def add_normal(self, features: Sequence[torch.Tensor], record: dict, seed: int) -> dict:
        """The bank and the new patches re-subsampled by the greedy coreset to the size training's rule
        gives for every patch seen so far (`percentage` of them): with no new patches, the bank as it was."""
        (embeddings,) = features
        new = embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])
        seen = int(record["training_patches"]) + new.shape[0]
        union = torch.cat([self.memory_bank, new.to(self.memory_bank.dtype)])
        picked = greedy_picks(
            union, coreset_size(seen, self.config.percentage), self.config.coreset_projection_dim, seed=seed
        )
        self.memory_bank = union[picked].contiguous()
        return {**record, "bank_size": int(self.memory_bank.shape[0]), "training_patches": seen}

    def head(self) -> nn.Module:
        if self.memory_bank is None:
            raise RuntimeError("PatchCore is not fitted")
        return KnnHead(self.memory_bank, self.config.anomaly_scorer_num_nn).eval()

    @property
    def k(self) -> int:
        return min(self.config.anomaly_scorer_num_nn, int(self.memory_bank.shape[0]))

    def head_params(self) -> dict[str, Any]:
        n, d = self.memory_bank.shape
        return {
            "k": self.k,
            "metric": "l2",
            "reduce": "mean of the k exact L2 distances",
            "bank_size": int(n),
            "dim": int(d),
            "bytes": int(n * d * 4),
        }

    def state(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.memory_bank = state["memory_bank"].float()
