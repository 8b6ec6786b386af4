"""RealNet (Zhang et al. 2024, https://arxiv.org/abs/2403.05897) as one HiAD task's detector.

Per backbone stage, AFS keeps the channels a synthetic anomaly changes most like its mask (chosen once,
before training, on tiles with anomalies), and a U-Net learns to reconstruct those channels of the
clean tile from the tile with an anomaly. The squared reconstruction residuals of all stages, resized
to the first stage's grid, are ranked per tile; RRS passes the top channels (by spatial max and by
spatial mean) to a small segmentation net trained with cross-entropy against the synthetic mask. The
anomaly map is its anomaly probability, on twice the first stage's grid.

As in HiAD, the anomalies come from the config's synthesizer (image blending with DTD-like textures,
HiAD's `ImageBlendingSynthesizer`), not from RealNet's diffusion-generated SDAS images, and each
HiAD block holds one backbone stage at its own stride. HiAD's nested keys are flattened: `planes`
(per stage, HiAD's `structure.layers.planes`) and `mode_numbers` default to the fractions of HiAD's
WideResNet-50 setting (half of each stage's channels; a third of the residual channels per mode), so
they follow the chosen backbone's `feature_info.channels()`.
"""

from __future__ import annotations

from typing import Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import AliasChoices, Field, model_validator
from torch import nn

from hiad_train.backbones import backbone_geometry
from hiad_train.components.channel_selection import afs_channel_errors, select_channels, top_residual_channels
from hiad_train.components.epochs import optimize, seeded, train_epochs
from hiad_train.components.unet import ReconstructionUNet
from hiad_train.detectors.base import EpochConfig, NetworkDetector, TaskData
from hiad_train.detectors.registry import register_detector
from hiad_train.embedders import BackboneFeatures


class RealNetConfig(EpochConfig):
    """HiAD's RealNet keys, flattened (`max_epoch` is read as `total_epochs`; `p` is the synthesizer's)."""

    planes: list[int] | None = None  # AFS: channels kept per stage (None: half of each)
    init_bsn: int = Field(64, ge=1)  # AFS: batches of tiles with anomalies that choose the channels
    num_res_blocks: int = Field(2, ge=1)
    hide_channels_ratio: float = Field(0.5, gt=0)  # U-Net base width / kept channels
    channel_mult: list[int] = Field([1, 2, 4], min_length=1)
    attention_mult: list[int] = [2, 4]  # downsampling factors with self-attention
    modes: list[Literal["max", "mean"]] = Field(["max", "mean"], min_length=1)
    mode_numbers: list[int] | None = None  # RRS: channels per mode (None: a third of all kept channels each)
    num_residual_layers: int = Field(2, ge=0)
    stop_grad: bool = False  # segmentation loss does not reach the U-Nets
    p: float = Field(0.5, ge=0, le=1)  # share of training tiles given a synthetic anomaly
    total_epochs: int = Field(150, ge=1, validation_alias=AliasChoices("total_epochs", "max_epoch"))
    batch_size: int = Field(16, ge=2)  # BatchNorm needs two tiles
    lr: float = Field(1e-4, gt=0)  # Adam
    betas: tuple[float, float] = (0.9, 0.999)
    patience: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _lists(self) -> "RealNetConfig":
        if self.planes is not None and len(self.planes) != len(self.layers_to_extract_from):
            raise ValueError(
                f"planes has {len(self.planes)} entries for {len(self.layers_to_extract_from)} layers_to_extract_from"
            )
        if self.mode_numbers is not None and len(self.mode_numbers) != len(self.modes):
            raise ValueError(f"mode_numbers has {len(self.mode_numbers)} entries for {len(self.modes)} modes")
        return self


def kept_channels(config: RealNetConfig, channels: Sequence[int]) -> list[int]:
    """AFS's channel count per stage, checked against the backbone's."""
    planes = config.planes or [max(1, c // 2) for c in channels]
    for p, c, layer in zip(planes, channels, config.layers_to_extract_from):
        if not 1 <= p <= c:
            raise ValueError(f"planes: {p} channels asked of stage {layer!r}, which has {c}")
    return planes


def residual_numbers(config: RealNetConfig, total: int) -> list[int]:
    """RRS's channel count per mode, checked against the residual's channel count."""
    numbers = config.mode_numbers or [max(1, total // 3)] * len(config.modes)
    for n in numbers:
        if not 1 <= n <= total:
            raise ValueError(f"mode_numbers: {n} channels asked of a residual with {total} (the kept planes)")
    return numbers


class ResidualStack(nn.Module):
    """Residual units ReLU-conv3x3-ReLU-conv1x1 (no bias), then ReLU."""

    def __init__(self, channels: int, layers: int):
        super().__init__()
        self.units = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 1, bias=False),
            )
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = x + unit(x)
        return F.relu(x)


class Segmenter(nn.Module):
    """Selected residual channels (B, K, h, w) -> two-class logits (B, 2, 2h, 2w)."""

    def __init__(self, channels: int, residual_layers: int):
        super().__init__()
        self.body = nn.Sequential(
            ResidualStack(channels, residual_layers),
            nn.Conv2d(channels, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.tail = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        return self.tail(F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=True))


class RealNetHead(nn.Module):
    """Backbone stages -> anomaly probability (B, 2h, 2w) on twice the first stage's grid."""

    def __init__(self, channels: Sequence[int], config: RealNetConfig):
        super().__init__()
        planes = kept_channels(config, channels)
        for s, p in enumerate(planes):  # AFS's choice; set by `fit`
            self.register_buffer(f"afs_{s}", torch.arange(p))
        self.unets = nn.ModuleList(
            ReconstructionUNet(
                p,
                max(1, round(config.hide_channels_ratio * p)),
                config.num_res_blocks,
                config.channel_mult,
                config.attention_mult,
            )
            for p in planes
        )
        self.modes = list(config.modes)
        self.numbers = residual_numbers(config, sum(planes))
        # Standardize each residual channel (batch statistics) only to rank channels against each other.
        self.rank_norms = nn.ModuleList(nn.BatchNorm2d(p, momentum=0.9, affine=False) for p in planes)
        self.segmenter = Segmenter(sum(self.numbers), config.num_residual_layers)
        self.stop_grad = config.stop_grad

    def kept(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each stage's AFS channels."""
        return [f.index_select(1, getattr(self, f"afs_{s}")) for s, f in enumerate(features)]

    def reconstruct(self, kept: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [unet(k) for unet, k in zip(self.unets, kept)]

    def logits(self, kept: Sequence[torch.Tensor], recon: Sequence[torch.Tensor]) -> torch.Tensor:
        """Squared residuals -> resized to the first grid -> RRS selection -> segmentation logits.

        Channels are standardized before resizing (the same per-channel affine map, as resizing is a
        convex combination), so the exported BatchNorm sees a known channel count."""
        grid = kept[0].shape[-2:]
        residuals = [(k - r).square() for k, r in zip(kept, recon)]
        if self.stop_grad:
            residuals = [r.detach() for r in residuals]
        rankings = [norm(r).detach() for norm, r in zip(self.rank_norms, residuals)]
        residual, ranking = (
            torch.cat([F.interpolate(x, size=grid, mode="bilinear", align_corners=True) for x in maps], dim=1)
            for maps in (residuals, rankings)
        )
        return self.segmenter(top_residual_channels(residual, ranking, self.modes, self.numbers))

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        kept = self.kept(features)
        return torch.softmax(self.logits(kept, self.reconstruct(kept)), dim=1)[:, 1]


@register_detector
class RealNet(NetworkDetector):
    """Reconstruct AFS-selected backbone channels; segment the top residual channels (RRS)."""

    name = "realnet"
    Config = RealNetConfig
    needs_tiles = True

    def __init__(self, config: RealNetConfig, seed: int = 0):
        super().__init__(config, seed)
        channels, _ = backbone_geometry(config)
        with seeded(seed):
            self.net = RealNetHead(channels, config)

    @classmethod
    def build_embedder(cls, config: RealNetConfig, pretrained: bool = True) -> nn.Module:
        return BackboneFeatures.create(config, pretrained=pretrained)

    def _batches(
        self, data: TaskData, rng: np.random.Generator, p: float
    ) -> Iterator[tuple[np.ndarray, list, list, torch.Tensor]]:
        """Shuffled batches (batch_size to 2 * batch_size - 1 tiles, so BatchNorm never sees a lone tile):
        (tile indices, features with anomalies in a share `p` of the tiles, clean features, masks (B, 1, H, W)).

        Tiles left clean keep their cached (context-fused) features; tiles with an anomaly are embedded
        again, without fusion (the contract offers no fused embedding of new tiles).
        """
        order = rng.permutation(len(data.tiles))
        for idx in np.array_split(order, max(1, len(order) // self.config.batch_size)):
            clean = [f[idx] for f in data.features]
            inputs = [c.clone() for c in clean]
            masks = torch.zeros(len(idx), 1, *data.tiles.shape[1:3], device=data.device)
            hit = torch.from_numpy(np.flatnonzero(rng.random(len(idx)) < p))
            if len(hit):
                pairs = [data.synthesizer(data.tiles[idx[i]], rng) for i in hit.tolist()]
                with torch.no_grad():
                    embedded = data.embedder(torch.from_numpy(np.stack([tile for tile, _ in pairs])).to(data.device))
                for x, e in zip(inputs, embedded):
                    x[hit] = e
                masks[hit] = torch.from_numpy(np.stack([mask for _, mask in pairs])).to(data.device).float()[:, None]
            yield idx, inputs, clean, masks

    @torch.no_grad()
    def _choose_channels(self, data: TaskData, rng: np.random.Generator) -> None:
        """AFS: sum each stage's channel errors over `init_bsn` batches of tiles that all have anomalies.

        The clean tiles are embedded again like the anomalous ones (without context fusion), so the
        difference is the anomaly's alone."""
        errors = [torch.zeros(f.shape[1], device=data.device) for f in data.features]
        batches = iter(())
        for _ in range(self.config.init_bsn):
            batch = next(batches, None)
            if batch is None:
                batches = self._batches(data, rng, p=1.0)
                batch = next(batches)
            idx, anomalous, _, masks = batch
            clean = data.embedder(torch.from_numpy(data.tiles[idx]).to(data.device))
            for total, a, c in zip(errors, anomalous, clean):
                total += afs_channel_errors(a, c, masks)
        for s, total in enumerate(errors):
            buffer = getattr(self.net, f"afs_{s}")
            buffer.copy_(select_channels(total, len(buffer)))

    def fit(self, data: TaskData, progress: bool = False) -> dict:
        if data.tiles is None or len(data.tiles) < 2:
            raise ValueError("RealNet trains on batches of at least 2 tiles (BatchNorm): this task has fewer")
        cfg = self.config
        divisor = 2 ** (len(cfg.channel_mult) - 1)
        for f, layer in zip(data.features, cfg.layers_to_extract_from):
            if f.shape[-1] % divisor or f.shape[-2] % divisor:
                raise ValueError(
                    f"RealNet's U-Net halves the grid {len(cfg.channel_mult) - 1} times: stage {layer!r}'s grid "
                    f"{tuple(f.shape[-2:])} must be divisible by {divisor} (choose another patch_size or channel_mult)"
                )
        rng = np.random.default_rng(data.seed)
        self.net.to(data.device)
        self._choose_channels(data, rng)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, betas=cfg.betas)  # U-Nets and segmenter

        def loss(batch: tuple) -> torch.Tensor:
            _, inputs, clean, masks = batch
            kept, target = self.net.kept(inputs), self.net.kept(clean)
            recon = self.net.reconstruct(kept)
            logits = self.net.logits(kept, recon)
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=True)
            return F.cross_entropy(logits, masks[:, 0].long()) + sum(F.mse_loss(r, t) for r, t in zip(recon, target))

        def epoch() -> float:
            return optimize(self.net, self._batches(data, rng, cfg.p), loss, [optimizer], precision=cfg.precision)

        record = train_epochs(self, cfg, data, epoch, progress)
        self.net.eval()
        return record
