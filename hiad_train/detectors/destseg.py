"""DeSTSeg (Zhang et al. 2023, https://arxiv.org/abs/2211.11317) as one HiAD task's detector.

A frozen teacher (the backbone's stages), a denoising student that learns to reproduce the teacher's
features of the *clean* tile from the tile with a synthetic anomaly, and a segmentation net that
learns the synthetic mask from the (teacher, student) cosine products of the anomalous tile. The
embedder returns the teacher's maps plus the normalized tile (the student reads pixels); the exported
head holds student and segmentation net and maps all of them to the anomaly probability grid.

Training follows HiAD's two stages, counted in epochs instead of steps: the first `de_st_epochs`
train the student alone (HiAD `de_st_steps`), the remaining `total_epochs - de_st_epochs` train the
segmentation net (HiAD `steps` counts both), and only those are validated and selected, since the
map comes from the segmentation net. HiAD's `DTD` anomaly source is the config's synthesizer
(`val_config.anomaly_syn_fn`, e.g. `image_blending` with `source_dir`); its `dest: false` variant
(student fed clean tiles) is not offered.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from hiad_train.backbones import backbone_geometry
from hiad_train.components.epochs import optimize, seeded, train_epochs
from hiad_train.components.segmentation import SegmentationNet, segmentation_loss
from hiad_train.components.student import Student, student_loss
from hiad_train.detectors.base import EpochConfig, NetworkDetector, TaskData
from hiad_train.detectors.registry import register_detector
from hiad_train.embedders import BackboneFeatures


class DeSTSegConfig(EpochConfig):
    """HiAD's DeSTSeg keys (steps counted as epochs; `lr` is HiAD's `lr_de_st`, the student's rate)."""

    total_epochs: int = Field(60, ge=2)
    de_st_epochs: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=2)  # BatchNorm needs two tiles
    lr: float = Field(0.4, gt=0)
    lr_res: float = Field(0.1, gt=0)
    lr_seghead: float = Field(0.01, gt=0)
    gamma: float = Field(4.0, ge=0)
    patience: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _stages(self) -> "DeSTSegConfig":
        if self.de_st_epochs >= self.total_epochs:
            raise ValueError(
                f"de_st_epochs ({self.de_st_epochs}) must be below total_epochs ({self.total_epochs}): "
                "the epochs after them train the segmentation net"
            )
        return self


class TeacherAndImage(nn.Module):
    """uint8 tiles (B, H, W, 3) -> the teacher's stages, then the normalized tile (B, 3, H, W)."""

    def __init__(self, teacher: BackboneFeatures):
        super().__init__()
        self.teacher = teacher

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image = self.teacher.normalize(tiles)
        return (*self.teacher.backbone(image), image)


def cosine_products(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-channel negated products of L2-normalized maps, stages resized to the first grid and stacked."""
    grid = teacher[0].shape[-2:]
    return torch.cat(
        [
            F.interpolate(
                -F.normalize(t, dim=1) * F.normalize(s, dim=1), size=grid, mode="bilinear", align_corners=False
            )
            for t, s in zip(teacher, student)
        ],
        dim=1,
    )


class DeSTSegHead(nn.Module):
    """(teacher stages..., normalized tile) -> anomaly probability (B, h, w) on the first stage's grid."""

    def __init__(self, channels: Sequence[int], reductions: Sequence[int]):
        super().__init__()
        self.student = Student(channels, reductions)
        self.segmentation = SegmentationNet(sum(channels))

    def products(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        teacher, image = features[:-1], features[-1]
        return cosine_products(teacher, self.student(image, teacher))

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.segmentation(self.products(features))[:, 0]


@register_detector
class DeSTSeg(NetworkDetector):
    name = "destseg"
    Config = DeSTSegConfig
    needs_tiles = True
    postprocess = {"score_rule": "top_k_mean", "score_top_k": 100}  # HiAD's HRDesTSeg.get_image_score, T=100

    def __init__(self, config: DeSTSegConfig, seed: int = 0):
        super().__init__(config, seed)
        channels, reductions = backbone_geometry(config)
        with seeded(seed):
            self.net = DeSTSegHead(channels, reductions)

    @classmethod
    def build_embedder(cls, config: DeSTSegConfig, pretrained: bool = True) -> nn.Module:
        return TeacherAndImage(BackboneFeatures.create(config, pretrained)).eval()

    def _batches(self, data: TaskData, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, tuple, torch.Tensor]]:
        """Shuffled batches: (tile indices, embedder outputs of the tiles with anomalies, their masks).

        The remainder is spread over the batches (batch_size to 2 * batch_size - 1 tiles each), so
        BatchNorm never sees a lone tile.
        """
        order = rng.permutation(len(data.tiles))
        for idx in np.array_split(order, max(1, len(order) // self.config.batch_size)):
            pairs = [data.synthesizer(data.tiles[i], rng) for i in idx]
            with torch.no_grad():
                outputs = data.embedder(torch.from_numpy(np.stack([tile for tile, _ in pairs])).to(data.device))
            masks = torch.from_numpy(np.stack([mask for _, mask in pairs])).to(data.device).float()[:, None]
            yield idx, outputs, masks

    def fit(self, data: TaskData, progress: bool = False) -> dict:
        if data.tiles is None or len(data.tiles) < 2:
            raise ValueError("DeSTSeg trains on batches of at least 2 tiles (BatchNorm): this task has fewer")
        cfg = self.config
        self.net.to(data.device)
        rng = np.random.default_rng(data.seed)
        clean_teacher = data.features[:-1]
        student_opt = torch.optim.SGD(self.net.student.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
        seg_opt = torch.optim.SGD(
            [
                {"params": self.net.segmentation.res.parameters(), "lr": cfg.lr_res},
                {"params": self.net.segmentation.head.parameters(), "lr": cfg.lr_seghead},
            ],
            momentum=0.9,
            weight_decay=1e-4,
        )

        def student_loss_of(batch: tuple) -> torch.Tensor:
            idx, outputs, _ = batch
            teacher = [f[idx] for f in clean_teacher]
            return student_loss(self.net.student(outputs[-1], teacher), teacher)

        def segmentation_loss_of(batch: tuple) -> torch.Tensor:
            _, outputs, masks = batch
            with torch.no_grad():
                products = self.net.products(outputs)
            probability = self.net.segmentation(products)
            target = F.interpolate(masks, size=probability.shape[-2:], mode="bilinear", align_corners=False)
            return segmentation_loss(probability, (target >= 0.5).float(), cfg.gamma)

        def student_epoch() -> float:
            batches = self._batches(data, rng)
            return optimize(self.net.student, batches, student_loss_of, [student_opt], precision=cfg.precision)

        def segmentation_epoch() -> float:
            self.net.student.eval()
            batches = self._batches(data, rng)
            return optimize(self.net.segmentation, batches, segmentation_loss_of, [seg_opt], precision=cfg.precision)

        stage1 = train_epochs(
            self,
            cfg.model_copy(update={"total_epochs": cfg.de_st_epochs}),
            dataclasses.replace(data, validate=None),
            student_epoch,
            progress,
        )
        stage2 = train_epochs(
            self,
            cfg.model_copy(update={"total_epochs": cfg.total_epochs - cfg.de_st_epochs}),
            data,
            segmentation_epoch,
            progress,
        )
        self.net.eval()
        return {**stage2, "student_epochs": stage1["epochs_run"], "student_final_loss": stage1["final_loss"]}
