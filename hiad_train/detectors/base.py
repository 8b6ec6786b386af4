"""The detector contract that training, checkpoints and export rely on.

A task's detector sees its tiles through an *embedder* (an exportable module from uint8 tiles to a
feature grid, shared by every task that uses the same backbone resolution) and owns a *head*
(an exportable module from that feature grid to a per-position anomaly score). Checkpoints hold
`state()` as safetensors and `spec()` as JSON; export turns `head()` into ONNX and asks the detector
for any native artifact (a faiss index for k-NN heads) via `head_spec()`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn


class Detector(ABC):
    name: ClassVar[str]

    @abstractmethod
    def fit(self, embeddings: torch.Tensor, progress: bool = False) -> None:
        """Learn from this task's training embeddings (N, D, h, w)."""

    @abstractmethod
    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Per-position anomaly scores (B, h, w) for embeddings (B, D, h, w)."""

    @abstractmethod
    def head(self) -> nn.Module:
        """An exportable module computing `score` (embedding input, score-grid output)."""

    @abstractmethod
    def head_spec(self) -> dict[str, Any]:
        """JSON description of the head for the manifest (kind and its parameters)."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (safetensors)."""

    @classmethod
    @abstractmethod
    def from_state(cls, config: Any, state: dict[str, torch.Tensor]) -> "Detector":
        """Rebuild a fitted detector from its config and `state()`."""
