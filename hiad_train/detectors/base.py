"""The detector contract that training, checkpoints, export and the runtime rely on (v2).

A detector sees its task's tiles through an *embedder* (an exportable module from uint8 tiles to a
tuple of feature maps, shared by every task) and owns a *head* (an exportable module from those
feature maps to a per-position anomaly score). It declares its config section, how it embeds, how
it trains (on cached features, or on tiles with synthetic anomalies, optionally over epochs with a
validation callback), its head and the head's kind (export writes a kind's native files, e.g. the
faiss index of a 'knn' head: hiad_export/artifacts.py), its learned state, and the post-processing
options HiAD applies for it. Export, parity and the runtime know no detector.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Sequence, Union

import numpy as np
import torch
from pydantic import Field
from torch import nn

from hiad_train.backbones import DEFAULT_BACKBONE
from hiad_train.device import CPU, Precision, module_device
from hiad_train.schema import SizeSpec, Strict


class DetectorConfig(Strict):
    """Keys every detector section has (HiAD's names)."""

    backbone_name: str = DEFAULT_BACKBONE
    backbone_weights: str | None = None  # local weights file; None = packaged or timm pretrained
    layers_to_extract_from: list[Union[int, str]] = Field([2, 3], min_length=1)
    # pixel mean/std: the backbone's pretraining statistics, or ImageNet's (HiAD's, for every backbone)
    input_normalization: Literal["backbone", "imagenet"] = "backbone"
    patch_size: SizeSpec | None = None  # HiAD repeats it here; must equal the top-level one if given

    def check_tile_size(self, size: tuple[int, int]) -> None:
        """Raise ValueError for a tile (width, height) this detector cannot embed (e.g. not whole ViT patches)."""


class EpochConfig(DetectorConfig):
    """Keys of detectors trained over epochs; checkpoint selection uses the validation set."""

    total_epochs: int = Field(10, ge=1)  # epochs at most
    batch_size: int = Field(8, ge=1)  # training batch (tiles)
    lr: float = Field(1e-3, gt=0)
    eval_interval: int = Field(1, ge=1)  # validate every N epochs (when val_config is set)
    patience: int = Field(5, ge=1)  # stop after N validations without improvement
    precision: Precision = "fp32"  # bf16: forward passes under bf16 autocast (weights and checkpoint stay fp32)


Synthesizer = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass
class TaskData:
    """What one task trains on; built by the trainer."""

    features: list[torch.Tensor]  # per embedder output: (N, C, h, w), this task's training tiles (context-fused)
    tiles: np.ndarray | None  # (N, H, W, 3) uint8 training tiles, when the detector sets needs_tiles
    embedder: nn.Module  # the frozen embedder (to embed tiles with synthetic anomalies)
    synthesizer: Synthesizer  # tile, rng -> (tile with an anomaly, its bool mask); always applies
    validate: (
        Callable[["Detector"], dict] | None
    )  # metrics of the current state on held-out tiles; None without val_config
    seed: int = 0
    device: torch.device = CPU  # where `features` are and the detector trains (its state comes back to the CPU)


class Detector(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[DetectorConfig]]
    needs_tiles: ClassVar[bool] = False  # fit reads TaskData.tiles
    head_kind: ClassVar[str] = "onnx"  # "knn": the runtime may search a faiss index instead of the graph
    postprocess: ClassVar[dict] = {}  # PostprocessSpec options HiAD applies for this detector
    # Memory-based: normal images join the learned state without retraining (`add_normal`, `hiad-train update`)
    memory_based: ClassVar[bool] = False

    def __init__(self, config: DetectorConfig, seed: int = 0):
        self.config = config
        self.seed = seed

    @classmethod
    @abstractmethod
    def build_embedder(cls, config: DetectorConfig, pretrained: bool = True) -> nn.Module:
        """Frozen, eval-mode module: uint8 (B, H, W, 3) RGB -> tuple of float32 (B, C, h, w)."""

    @abstractmethod
    def fit(self, data: TaskData, progress: bool = False) -> dict:
        """Learn this task; returns a JSON-able training record (epochs, selected epoch, metrics, ...)."""

    @abstractmethod
    def head(self) -> nn.Module:
        """Exportable eval-mode module: forward(*features) -> (B, h, w) scores, higher = more anomalous."""

    @torch.no_grad()
    def score(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The head's scores of `features` (wherever they are), computed where the head is, on the CPU."""
        head = self.head()
        device = module_device(head)
        return head(*[f.to(device) for f in features]).cpu()

    def to(self, device: torch.device) -> "Detector":
        """This detector's learned state moved to `device` (`state()` hands it back as it is: callers move it)."""
        self.load_state({k: v.to(device) for k, v in self.state().items()})
        return self

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Every learned tensor, for safetensors."""

    @abstractmethod
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take a `state()` (a checkpoint's, or an earlier epoch's) as this detector's learned state."""

    @classmethod
    def from_state(cls, config: DetectorConfig, state: dict[str, torch.Tensor]) -> "Detector":
        """Rebuild a fitted detector from its config and `state()`."""
        detector = cls(config)
        detector.load_state(state)
        return detector

    def head_params(self) -> dict[str, Any]:
        """JSON facts about the head for the manifest (sizes, parameters a runtime path needs)."""
        return {}

    def add_normal(self, features: Sequence[torch.Tensor], record: dict, seed: int) -> dict:
        """Memory-based detectors: take the features (per embedder output (N, C, h, w)) of new normal tiles
        into the state by the rule training used, given the training `record`; returns the updated record."""
        raise NotImplementedError(f"{self.name} is not memory-based: new normal images need retraining")


class NetworkDetector(Detector):
    """A detector whose learned state is one module, `self.net` (built in `__init__` from the config,
    or left None until fitted); its head is that module."""

    net: nn.Module | None = None

    def head(self) -> nn.Module:
        if self.net is None:
            raise RuntimeError(f"{self.name} is not fitted")
        return self.net.eval()

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in self.net.state_dict().items()}

    def to(self, device: torch.device) -> "NetworkDetector":
        self.net.to(device)
        return self

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(state)
        self.net.eval()
