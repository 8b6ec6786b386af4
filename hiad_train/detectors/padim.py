"""PaDiM (Defard et al. 2021, https://arxiv.org/abs/2011.08785) as one HiAD task's detector.

Each feature-grid position of a tile gets its own multivariate Gaussian, fitted on that position's
features over the task's normal training tiles; a position's anomaly score is the Mahalanobis
distance of its feature to its Gaussian. Features are the chosen backbone layers, coarser layers
repeated (nearest) onto the first layer's grid and concatenated, then a fixed random subset of
`embed_dimension` channels (the paper's random dimensionality reduction). No epochs: fitting is
one pass over the cached features.

Size per task: the head holds the mean (P, C) and the inverse covariance (P, C, C) in float32,
P = positions of the first layer's grid, C = embed_dimension, so P * C^2 * 4 + P * C * 4 bytes.
The checkpoint also keeps the covariance itself (P * C^2 * 4 more, not exported): with the count of
training tiles it is the running sums that `hiad-train update` adds new normal images to.
Defaults (tf_efficientnet_lite0 layers [2, 3], 512-px tiles: a 64x64 grid; C = 100): 165 MB.
HiAD's wide_resnet50_2 setting (C = 550 on the same grid) needs 4.96 GB per task.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from hiad_train.components.gaussian import (
    covariance_from_inverse,
    gaussian_statistics,
    mahalanobis,
    merged_statistics,
    regularized_inverse,
)
from hiad_train.detectors.base import Detector, DetectorConfig, TaskData
from hiad_train.detectors.registry import register_detector
from hiad_train.embedders import BackboneFeatures

# The channel subset is drawn once per configuration with this seed (build_embedder gets no run
# seed); it is a buffer of the embedder, so the checkpoint and the exported graph store it.
CHANNEL_SEED = 0
# Positions whose statistics are computed at once (bounds fit's float64 working memory).
POSITIONS_PER_CHUNK = 256


class PaDiMConfig(DetectorConfig):
    """HiAD's PaDiM keys: backbone_name, layers_to_extract_from, embed_dimension.

    Head bytes per task: P * C^2 * 4 + P * C * 4 (C = embed_dimension, P = positions of the first
    layer's grid); the default (C = 100, lite0 [2, 3], 512-px tiles: P = 64 * 64) is 165 MB."""

    embed_dimension: int = Field(100, ge=1)  # random channels kept out of the concatenated layers


def channel_subset(total: int, keep: int, seed: int = CHANNEL_SEED) -> torch.Tensor:
    """`keep` distinct channel indices out of `total`, drawn with `seed`, in increasing order."""
    if keep > total:
        raise ValueError(f"embed_dimension {keep} exceeds the {total} channels of the chosen layers")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:keep].sort().values


class PaDiMEmbedder(nn.Module):
    """uint8 NHWC tiles -> one map (B, embed_dimension, h, w) on the first chosen layer's grid."""

    def __init__(self, features: nn.Module, channels: Sequence[int], embed_dimension: int):
        super().__init__()
        self.features = features
        self.register_buffer("channel_indices", channel_subset(sum(channels), embed_dimension))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        maps = self.features(image)
        grid = maps[0].shape[-2:]
        stacked = torch.cat([maps[0], *(F.interpolate(m, size=grid, mode="nearest") for m in maps[1:])], dim=1)
        return (stacked.index_select(1, self.channel_indices),)


class MahalanobisHead(nn.Module):
    """(B, C, h, w) features -> (B, h, w) Mahalanobis distances to per-position Gaussians."""

    def __init__(self, mean: torch.Tensor, inverse_covariance: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("inverse_covariance", inverse_covariance)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        # (P, B, C), made contiguous: the batched matmul on the strided view is 10x slower in PyTorch
        per_position = features.reshape(b, c, h * w).permute(2, 0, 1).contiguous()
        return mahalanobis(per_position, self.mean, self.inverse_covariance).transpose(0, 1).reshape(b, h, w)


@register_detector
class PaDiM(Detector):
    """Per-position Gaussian + Mahalanobis distance; head: mean and inverse covariance per position."""

    name: ClassVar[str] = "padim"
    Config: ClassVar[type[DetectorConfig]] = PaDiMConfig
    memory_based: ClassVar[bool] = True

    def __init__(self, config: PaDiMConfig, seed: int = 0):
        super().__init__(config, seed)
        self.mean: torch.Tensor | None = None
        self.covariance: torch.Tensor | None = None  # kept (checkpoint only) for `add_normal`'s running sums
        self.inverse_covariance: torch.Tensor | None = None

    @classmethod
    def build_embedder(cls, config: PaDiMConfig, pretrained: bool = True) -> nn.Module:
        features = BackboneFeatures.create(config, pretrained)
        return PaDiMEmbedder(features, features.channels, config.embed_dimension).eval()

    def fit(self, data: TaskData, progress: bool = False) -> dict:
        (features,) = data.features
        n = features.shape[0]
        self._set_statistics(features, lambda start, x: gaussian_statistics(x), progress)
        return {"training_tiles": n}

    def add_normal(self, features: Sequence[torch.Tensor], record: dict, seed: int) -> dict:
        """Each position's Gaussian updated from its running sums (count, mean, covariance) with the new
        tiles, as if fitted on all tiles at once. A checkpoint written before the covariance was kept
        has it recovered from the inverse (float64)."""
        (embeddings,) = features
        count = int(record["training_tiles"])
        mean = self.mean
        covariance = (
            self.covariance if self.covariance is not None else covariance_from_inverse(self.inverse_covariance)
        )
        self._set_statistics(
            embeddings,
            lambda start, x: merged_statistics(
                count,
                mean[start : start + POSITIONS_PER_CHUNK],
                covariance[start : start + POSITIONS_PER_CHUNK],
                x,
            ),
        )
        return {**record, "training_tiles": count + embeddings.shape[0]}

    def _set_statistics(self, features: torch.Tensor, statistics, progress: bool = False) -> None:
        """Mean, covariance and regularized inverse per position, `POSITIONS_PER_CHUNK` positions at a time
        (bounds the float64 working memory): `statistics(start, features (N, C, chunk))` gives a chunk's."""
        n, c, h, w = features.shape
        flat = features.reshape(n, c, h * w)
        means, covariances, inverses = [], [], []
        starts = range(0, h * w, POSITIONS_PER_CHUNK)
        for start in tqdm(starts, desc="PaDiM Gaussians", unit="chunk", disable=not progress, leave=False):
            mean, covariance = statistics(start, flat[:, :, start : start + POSITIONS_PER_CHUNK])
            means.append(mean)
            covariances.append(covariance)
            inverses.append(regularized_inverse(covariance))
        self.mean = torch.cat(means).contiguous()
        self.covariance = torch.cat(covariances).contiguous()
        self.inverse_covariance = torch.cat(inverses).contiguous()

    def head(self) -> nn.Module:
        if self.mean is None:
            raise RuntimeError("PaDiM is not fitted")
        return MahalanobisHead(self.mean, self.inverse_covariance).eval()

    def head_params(self) -> dict:
        return {
            "positions": int(self.mean.shape[0]),
            "channels": int(self.mean.shape[1]),
            "bytes": int(self.mean.nbytes + self.inverse_covariance.nbytes),
        }

    def state(self) -> dict[str, torch.Tensor]:
        state = {"mean": self.mean, "covariance": self.covariance, "inverse_covariance": self.inverse_covariance}
        return {k: v for k, v in state.items() if v is not None}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.mean = state["mean"].float().contiguous()
        covariance = state.get("covariance")  # absent from checkpoints written before `add_normal`
        self.covariance = None if covariance is None else covariance.float().contiguous()
        self.inverse_covariance = state["inverse_covariance"].float().contiguous()
