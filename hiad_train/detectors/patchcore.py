"""PatchCore (Roth et al. 2022) as one HiAD task's detector: a coreset memory bank + k-NN distance."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hiad_train.config import PatchCoreConfig
from hiad_train.detectors.base import Detector
from hiad_train.detectors.coreset import greedy_coreset
from hiad_train.detectors.knn import KnnHead


class PatchCore(Detector):
    name = "patchcore"

    def __init__(self, config: PatchCoreConfig, seed: int = 0, memory_bank: torch.Tensor | None = None):
        self.config = config
        self.seed = seed
        self.memory_bank = memory_bank

    def fit(self, embeddings: torch.Tensor, progress: bool = False) -> None:
        features = embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])
        picked = greedy_coreset(
            features, self.config.percentage, self.config.coreset_projection_dim, seed=self.seed, progress=progress
        )
        self.memory_bank = features[picked].contiguous()

    def head(self) -> nn.Module:
        if self.memory_bank is None:
            raise RuntimeError("PatchCore is not fitted")
        return KnnHead(self.memory_bank, self.config.anomaly_scorer_num_nn).eval()

    @torch.no_grad()
    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.head()(embeddings)

    def head_spec(self) -> dict[str, Any]:
        return {
            "kind": "knn",
            "k": min(self.config.anomaly_scorer_num_nn, int(self.memory_bank.shape[0])),
            "metric": "l2",
            "reduce": "mean of the k exact L2 distances",
            "bank_size": int(self.memory_bank.shape[0]),
            "dim": int(self.memory_bank.shape[1]),
        }

    def state(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank}

    @classmethod
    def from_state(cls, config: PatchCoreConfig, state: dict[str, torch.Tensor]) -> "PatchCore":
        return cls(config, memory_bank=state["memory_bank"].float())
