"""2-D normalizing-flow blocks on feature maps (FastFlow, Yu et al. 2021, https://arxiv.org/abs/2111.07677).

A flow maps features x (B, C, h, w) to latents z of the same shape with a tractable log|det dz/dx|,
so that the negative log-likelihood under a standard normal is 0.5 * |z|^2 - log|det|. Each step is
an affine coupling (half the channels, through a small conv net, scale and shift the other half), a
learned per-channel affine, and a fixed channel permutation so that every channel is transformed.
Every piece is invertible in closed form; `inverse` exists for tests and for sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_clamp(x: torch.Tensor, bound: float) -> torch.Tensor:
    """A smooth map of x into (-bound, bound), ~identity near 0 (keeps the log-scales bounded)."""
    return bound * torch.tanh(x / bound)


class AffineCoupling(nn.Module):
    """y_a = x_a, y_b = x_b * exp(s(x_a)) + t(x_a); log|det| = sum of s over the transformed half.

    s and t come from conv -> ReLU -> conv with `kernel_size` kernels and int(C_a * hidden_ratio)
    hidden channels. The last conv starts at zero, so a fresh block is the identity (Glow's init).
    """

    def __init__(self, channels: int, kernel_size: int, hidden_ratio: float, clamp: float = 2.0):
        super().__init__()
        if channels < 2:
            raise ValueError(f"an affine coupling needs at least 2 channels, got {channels}")
        self.kept = channels - channels // 2
        self.changed = channels // 2
        hidden = max(1, int(self.kept * hidden_ratio))
        pad = kernel_size // 2
        self.subnet = nn.Sequential(
            nn.Conv2d(self.kept, hidden, kernel_size, padding=pad),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * self.changed, kernel_size, padding=pad),
        )
        nn.init.zeros_(self.subnet[-1].weight)
        nn.init.zeros_(self.subnet[-1].bias)
        self.clamp = clamp

    def _scale_shift(self, x_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.subnet(x_a).split(self.changed, dim=1)
        return soft_clamp(s, self.clamp), t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x.split([self.kept, self.changed], dim=1)
        s, t = self._scale_shift(x_a)
        return torch.cat([x_a, x_b * torch.exp(s) + t], 1), s.sum(dim=(1, 2, 3))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y.split([self.kept, self.changed], dim=1)
        s, t = self._scale_shift(y_a)
        return torch.cat([y_a, (y_b - t) * torch.exp(-s)], 1)


class ChannelAffine(nn.Module):
    """y = x * softplus(p) + b per channel (starts as the identity); log|det| = h * w * sum log softplus(p)."""

    def __init__(self, channels: int):
        super().__init__()
        self.raw_scale = nn.Parameter(torch.full((1, channels, 1, 1), float(torch.log(torch.expm1(torch.tensor(1.0))))))
        self.offset = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = F.softplus(self.raw_scale)
        log_det = torch.log(scale).sum() * (x.shape[2] * x.shape[3])
        return x * scale + self.offset, log_det.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.offset) / F.softplus(self.raw_scale)


class ChannelPermutation(nn.Module):
    """A fixed random channel shuffle (log|det| = 0), stored as a buffer so it travels with the state."""

    def __init__(self, channels: int, generator: torch.Generator):
        super().__init__()
        self.register_buffer("order", torch.randperm(channels, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.order]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, torch.argsort(self.order)]


class FlowStep(nn.Module):
    """Coupling, then channel affine, then permutation: one invertible step with its log|det|."""

    def __init__(self, channels: int, kernel_size: int, hidden_ratio: float, generator: torch.Generator):
        super().__init__()
        self.coupling = AffineCoupling(channels, kernel_size, hidden_ratio)
        self.affine = ChannelAffine(channels)
        self.permutation = ChannelPermutation(channels, generator)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_det_coupling = self.coupling(x)
        x, log_det_affine = self.affine(x)
        return self.permutation(x), log_det_coupling + log_det_affine

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.coupling.inverse(self.affine.inverse(self.permutation.inverse(y)))


class Flow2d(nn.Module):
    """FastFlow's per-scale flow: `steps` flow steps whose subnets alternate 3x3 and 1x1 kernels
    (all 3x3 when `conv3x3_only`). forward(x) -> (z, log|det dz/dx| per sample)."""

    def __init__(self, channels: int, steps: int, hidden_ratio: float, conv3x3_only: bool, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.steps = nn.ModuleList(
            FlowStep(channels, 3 if conv3x3_only or i % 2 == 0 else 1, hidden_ratio, generator) for i in range(steps)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for step in self.steps:
            x, step_log_det = step(x)
            log_det = log_det + step_log_det
        return x, log_det

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        for step in reversed(self.steps):
            z = step.inverse(z)
        return z


def gaussian_nll(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log-likelihood of x, up to a constant: 0.5 * |z|^2 - log|det dz/dx|."""
    return 0.5 * (z * z).sum(dim=(1, 2, 3)) - log_det
