"""RD++ (Tien et al., "Revisiting Reverse Distillation for Anomaly Detection", CVPR 2023) as one HiAD
task's detector.

A frozen encoder (the embedder's stages) is the teacher. Its features pass a multi-projection layer
(one small conv stack per stage), a one-class bottleneck (OCBE: every stage brought to the deepest
stage's stride, concatenated, and squeezed by a strided residual block) and a de-convolutional
decoder that mirrors the encoder. The anomaly map is the sum over stages of 1 - cosine between the
encoder's and the decoder's features. The projection layer learns to map synthetic-anomaly features
back to normal ones (reconstruction), away from the raw anomalous features (contrast), and to keep
normal projections compact (an entropic optimal-transport cost across the batch).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from hiad_train.backbones import backbone_geometry
from hiad_train.components.cosine import cosine_distance, multiscale_cosine_distance
from hiad_train.components.decoder import Decoder, stride_ratio
from hiad_train.components.epochs import optimize, seeded, train_epochs
from hiad_train.detectors.base import EpochConfig, NetworkDetector, TaskData
from hiad_train.detectors.registry import register_detector
from hiad_train.embedders import BackboneFeatures


class RDPPConfig(EpochConfig):
    """HiAD's RD++ keys (`epoch` is `total_epochs`, `distill_lr` is `lr`), on the contract's epoch loop."""

    layers_to_extract_from: list[int | str] = [1, 2, 3]
    total_epochs: int = Field(50, ge=1)
    lr: float = Field(0.005, gt=0)  # bottleneck + decoder (HiAD's distill_lr)
    proj_lr: float = Field(0.001, gt=0)  # multi-projection layer
    weight_proj: float = Field(0.2, ge=0)  # weight of the projection losses


class ProjectionLayer(nn.Module):
    """One stage's projection: 3x3 convs C -> C/2 -> C/4 -> C/2 -> C, each with InstanceNorm and LeakyReLU."""

    def __init__(self, channels: int):
        super().__init__()
        widths = [channels, max(1, channels // 2), max(1, channels // 4), max(1, channels // 2), channels]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.InstanceNorm2d(c_out), nn.LeakyReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Bottleneck(nn.Module):
    """OCBE: each stage strided (3x3 convs, stride 2) down to the deepest stage's stride and width,
    concatenated, then one strided residual block to a (2 x deepest width) embedding at twice that stride."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int]):
        super().__init__()
        deep_c, deep_s = channels[-1], strides[-1]
        self.align = nn.ModuleList()
        for c, s in zip(channels, strides):
            steps = math.log2(stride_ratio(deep_s, s))
            if steps != int(steps):
                raise ValueError(f"RD++ needs encoder strides that differ by powers of 2, got {list(strides)}")
            widths = [c] + [deep_c] * int(steps)
            self.align.append(nn.Sequential(*(conv_bn_relu(a, b, 2) for a, b in zip(widths[:-1], widths[1:]))))
        c_cat, c_out = deep_c * len(channels), 2 * deep_c
        self.body = nn.Sequential(
            nn.Conv2d(c_cat, c_out, 3, 2, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(c_cat, c_out, 1, 2, bias=False), nn.BatchNorm2d(c_out))
        self.act = nn.ReLU()
        self.out_channels, self.out_stride = c_out, 2 * deep_s

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([align(f) for f, align in zip(features, self.align)], 1)
        return self.act(self.body(x) + self.shortcut(x))


class RDPPHead(nn.Module):
    """Encoder features (one input per stage) -> (B, h, w) summed 1 - cosine against the reconstruction,
    on the first stage's grid. Holds everything RD++ learns: projections, bottleneck, decoder."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int]):
        super().__init__()
        self.projections = nn.ModuleList(ProjectionLayer(c) for c in channels)
        self.bottleneck = Bottleneck(channels, strides)
        self.decoder = Decoder(channels, strides, self.bottleneck.out_channels, self.bottleneck.out_stride)

    def project(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [p(f) for p, f in zip(self.projections, features)]

    def reconstruct(self, projected: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.decoder(self.bottleneck(projected))

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return multiscale_cosine_distance(features, self.reconstruct(self.project(features)))


def distillation_loss(encoder: Sequence[torch.Tensor], decoder: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over stages of the batch mean of 1 - cosine between whole flattened feature maps (RD's loss)."""
    return sum((1 - F.cosine_similarity(e.flatten(1), d.flatten(1))).mean() for e, d in zip(encoder, decoder))


@torch.no_grad()
def sinkhorn_plan(cost: torch.Tensor, eps: float, iterations: int = 100) -> torch.Tensor:
    """Entropic optimal-transport plan (n, m) between uniform weights for a cost matrix (log-domain Sinkhorn)."""
    n, m = cost.shape
    log_a, log_b = -math.log(n), -math.log(m)
    f, g = cost.new_zeros(n), cost.new_zeros(m)
    for _ in range(iterations):
        f = -eps * torch.logsumexp((g[None, :] - cost) / eps + log_b, dim=1)
        g = -eps * torch.logsumexp((f[:, None] - cost) / eps + log_a, dim=0)
    return torch.exp((f[:, None] + g[None, :] - cost) / eps + log_a + log_b)


def transport_cost(x: torch.Tensor, y: torch.Tensor, blur: float = 0.05) -> torch.Tensor:
    """<P, C> for C = |x_i - y_j|^2 / 2 and P the entropic plan at eps = blur^2 (gradient through C only)."""
    cost = 0.5 * torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").square()
    return (sinkhorn_plan(cost.detach(), blur**2) * cost).sum()


def compactness_loss(projected: Sequence[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """RD++'s self-supervised OT loss: per stage, the transport cost between the batch's softmax-normalized
    projections and the same batch shuffled. Not debiased: a debiased Sinkhorn divergence between a set
    and a permutation of itself is exactly zero, so only the plain entropic cost can compact the batch."""
    order = torch.randperm(projected[0].shape[0], generator=generator)
    total = projected[0].new_zeros(())
    for p in projected:
        x = torch.softmax(p.flatten(1), -1)
        total = total + transport_cost(x, x[order])
    return total


def projection_loss(
    noisy: Sequence[torch.Tensor],
    projected_noisy: Sequence[torch.Tensor],
    projected_normal: Sequence[torch.Tensor],
    generator: torch.Generator,
) -> torch.Tensor:
    """RD++'s multi-projection loss: (compactness + 0.01 reconstruction + 0.1 contrast) / 1.11, where
    reconstruction pulls projected anomalous features to the projected normal ones (per-position cosine)
    and contrast pushes projected normal features away from the raw anomalous ones (cosine margin 0.5)."""
    ssot = compactness_loss(projected_normal, generator)
    reconstruction = sum(cosine_distance(a, b).mean() for a, b in zip(projected_noisy, projected_normal))
    contrast = sum(
        F.cosine_embedding_loss(n.flatten(1), p.flatten(1), -torch.ones(n.shape[0], device=n.device), margin=0.5)
        for n, p in zip(noisy, projected_normal)
    )
    return (ssot + 0.01 * reconstruction + 0.1 * contrast) / 1.11


@register_detector
class RDPP(NetworkDetector):
    """RD++: reverse distillation with a multi-projection layer; head = encoder vs decoder cosine maps."""

    name = "rdpp"
    Config = RDPPConfig
    needs_tiles = True
    postprocess = {"tile_blur_sigma": 4.0}

    def __init__(self, config: RDPPConfig, seed: int = 0):
        super().__init__(config, seed)
        self.channels, self.strides = backbone_geometry(config)
        with seeded(seed):
            self.net = RDPPHead(self.channels, self.strides)
        self.net.eval()

    @classmethod
    def build_embedder(cls, config: RDPPConfig, pretrained: bool = True) -> nn.Module:
        return BackboneFeatures.create(config, pretrained)

    def _check(self, features: Sequence[torch.Tensor]) -> None:
        got = [int(f.shape[1]) for f in features]
        if got != self.channels:
            raise ValueError(f"RD++ expects encoder features with channels {self.channels}, got {got}")
        sides = {(int(f.shape[-2]) * s, int(f.shape[-1]) * s) for f, s in zip(features, self.strides)}
        deepest = features[-1].shape[-2:]
        if len(sides) > 1 or deepest[0] % 2 or deepest[1] % 2:
            raise ValueError(
                f"RD++ needs tile sides that are multiples of {self.net.bottleneck.out_stride} px "
                f"(the bottleneck's stride); feature grids {[tuple(f.shape[-2:]) for f in features]}"
            )

    def fit(self, data: TaskData, progress: bool = False) -> dict:
        cfg = self.config
        self._check(data.features)
        if data.tiles is None:
            raise ValueError("RD++ trains on tiles with synthetic anomalies: TaskData.tiles is missing")
        model, n = self.net.to(data.device), data.features[0].shape[0]
        rng = np.random.default_rng(data.seed)
        generator = torch.Generator().manual_seed(data.seed)
        distill_params = list(model.bottleneck.parameters()) + list(model.decoder.parameters())
        opt_proj = torch.optim.Adam(model.projections.parameters(), lr=cfg.proj_lr, betas=(0.5, 0.999))
        opt_distill = torch.optim.Adam(distill_params, lr=cfg.lr, betas=(0.5, 0.999))

        def loss(batch: torch.Tensor) -> torch.Tensor:
            normal = [f[batch] for f in data.features]
            noisy_tiles = np.stack([data.synthesizer(data.tiles[i], rng)[0] for i in batch.tolist()])
            with torch.no_grad():
                noisy = list(data.embedder(torch.from_numpy(noisy_tiles).to(data.device)))
            projected_normal, projected_noisy = model.project(normal), model.project(noisy)
            distill = distillation_loss(normal, model.reconstruct(projected_normal))
            return distill + cfg.weight_proj * projection_loss(noisy, projected_noisy, projected_normal, generator)

        def step() -> float:
            batches = torch.randperm(n, generator=generator).split(cfg.batch_size)
            return optimize(model, batches, loss, [opt_proj, opt_distill], precision=cfg.precision)

        return train_epochs(self, cfg, data, step, progress)
