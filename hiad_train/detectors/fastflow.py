"""FastFlow (Yu et al. 2021, https://arxiv.org/abs/2111.07677) as one HiAD task's detector.

Per backbone scale, the features are layer-normalized (over channels and grid, with a learned
per-position affine, as in the paper's CNN variant) and mapped by a 2-D normalizing flow to a
standard normal; training minimizes the flows' negative log-likelihood on the task's cached
features. The score follows HiAD (and anomalib): per scale, prob = exp(-0.5 * mean over channels
of z^2), resized to the first scale's grid, and the anomaly map is minus the mean over scales.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import AliasChoices, Field
from torch import nn

from hiad_train.components.epochs import optimize, seeded, train_epochs
from hiad_train.components.flow import Flow2d, gaussian_nll
from hiad_train.detectors.base import EpochConfig, NetworkDetector, TaskData
from hiad_train.detectors.registry import register_detector
from hiad_train.embedders import BackboneFeatures


class FastFlowConfig(EpochConfig):
    """HiAD's FastFlow keys (`num_epochs` is read as `total_epochs`)."""

    flow_step: int = Field(8, ge=1)
    hidden_ratio: float = Field(1.0, gt=0)
    conv3x3_only: bool = False
    total_epochs: int = Field(300, ge=1, validation_alias=AliasChoices("total_epochs", "num_epochs"))
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)


class FastFlowModel(nn.Module):
    """Features of every scale -> latents (training) or the anomaly map (forward, exported)."""

    def __init__(self, shapes: Sequence[tuple[int, int, int]], config: FastFlowConfig, seed: int = 0):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(list(shape)) for shape in shapes)
        self.flows = nn.ModuleList(
            Flow2d(shape[0], config.flow_step, config.hidden_ratio, config.conv3x3_only, seed=seed + i)
            for i, shape in enumerate(shapes)
        )

    def latents(self, features: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(z, log|det|) per scale."""
        return [flow(norm(f)) for f, norm, flow in zip(features, self.norms, self.flows)]

    def nll(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Training loss: per-sample negative log-likelihood summed over scales, batch mean."""
        return sum(gaussian_nll(z, log_det).mean() for z, log_det in self.latents(features))

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        grid = features[0].shape[-2:]
        probs = []
        for z, _ in self.latents(features):
            prob = torch.exp(-0.5 * (z * z).mean(dim=1, keepdim=True))
            probs.append(F.interpolate(prob, size=grid, mode="bilinear", align_corners=False))
        return -torch.cat(probs, 1).mean(dim=1)


@register_detector
class FastFlow(NetworkDetector):
    """2-D normalizing flows on frozen backbone features; anomaly = low likelihood."""

    name = "fastflow"
    Config = FastFlowConfig

    def __init__(self, config: FastFlowConfig, seed: int = 0):
        super().__init__(config, seed)
        self.net: FastFlowModel | None = None  # built by `fit` (its shapes are the features') or `load_state`

    @classmethod
    def build_embedder(cls, config: FastFlowConfig, pretrained: bool = True) -> nn.Module:
        return BackboneFeatures.create(config, pretrained=pretrained)

    def fit(self, data: TaskData, progress: bool = False) -> dict:
        shapes = [tuple(f.shape[1:]) for f in data.features]
        with seeded(data.seed):
            self.net = FastFlowModel(shapes, self.config, seed=data.seed).to(data.device)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)
        generator = torch.Generator().manual_seed(data.seed)
        n = data.features[0].shape[0]

        def step() -> float:
            batches = torch.randperm(n, generator=generator).split(self.config.batch_size)
            nll = lambda b: self.net.nll([f[b] for f in data.features])  # noqa: E731
            return optimize(self.net, batches, nll, [optimizer], len, self.config.precision)

        return train_epochs(self, self.config, data, step, progress)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.net is None:  # a checkpoint's: the scales' shapes are the layer norms'
            scales = sum(1 for key in state if key.startswith("norms.") and key.endswith(".weight"))
            self.net = FastFlowModel([tuple(state[f"norms.{i}.weight"].shape) for i in range(scales)], self.config)
        super().load_state(state)
