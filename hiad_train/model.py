"""The trained high-resolution model in PyTorch: tiling + tasks + embedder + one detector per task.

`predict` is the PyTorch reference that export's parity check holds the runtime to. It follows the
runtime's inference plan (hiad_runtime/plan.py: fusion windows and offsets, routing, merge, thumbnail,
finish) with torch embedders and detectors, so the only differences the check sees are the graphs' maths.
Like the runtime, it embeds and scores `STREAM_TILES` tiles at a time and adds each tile's map into
one image-sized map in place, so its memory is one chunk's features at any image size (8192^2: 256
tiles, 537 MB of features at once before).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hiad_runtime.geometry import Tiling
from hiad_runtime.image import resize_image
from hiad_runtime.plan import InferencePlan
from hiad_runtime.postprocess import Normalization, PostprocessSpec
from hiad_runtime.streaming import chunks
from hiad_runtime.tasks import Task
from hiad_train.config import TrainConfig
from hiad_train.detectors import Detector
from hiad_train.device import CPU, module_device

STREAM_TILES = 16  # tiles embedded and scored at a time by `predict` (the runtime's default `--stream-tiles`)


def batches(items: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def embed(embedder: nn.Module, tiles: np.ndarray, batch_size: int) -> list[torch.Tensor]:
    """Per embedder output, the features (N, C, h, w) of uint8 tiles (N, H, W, 3), in batches, computed where
    the embedder is and returned on the CPU."""
    device = module_device(embedder)
    runs = [embedder(torch.from_numpy(np.ascontiguousarray(b)).to(device)) for b in batches(tiles, batch_size)]
    return [torch.cat(outs).cpu() for outs in zip(*runs)]


def upsample(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) -> (C, size_h, size_w), bilinear with half-pixel centres: the plan's upsampling in torch."""
    return F.interpolate(features[None], size=(size[1], size[0]), mode="bilinear", align_corners=False)[0]


@dataclass
class Thumbnail:
    """The low-resolution branch: one detector on the whole image downsampled to `size`."""

    size: tuple[int, int]
    embedder: nn.Module
    detector: Detector
    normalization: Normalization | None = None
    training: dict | None = None

    @torch.no_grad()
    def raw_scores(self, image: np.ndarray) -> np.ndarray:
        """The raw score grid of the whole image at thumbnail size."""
        return self.detector.score(embed(self.embedder, resize_image(image, self.size)[None], 1))[0].numpy()


@dataclass
class HRModel:
    """HiAD's trained model (https://github.com/cnulab/HiAD): tiles -> tasks -> one detector each -> one map."""

    config: TrainConfig
    tiling: Tiling
    tasks: list[Task]
    embedder: nn.Module
    detectors: dict[str, Detector]
    postprocess: PostprocessSpec = field(default_factory=PostprocessSpec)
    thumbnail: Thumbnail | None = None
    routing: np.ndarray | None = None  # retrieval centres (k, D); None = static tasks
    task_normalization: dict[str, Normalization] | None = None  # per task, from the validation set
    thresholds: dict | None = None  # {"image", "pixel", "rules"}: see hiad_train/thresholds.py
    validation: dict | None = None  # validation-set metrics
    training: dict[str, dict] = field(default_factory=dict)  # per task, the detector's training record

    @property
    def fusion_weights(self) -> list[float]:
        return self.config.normalized_fusion_weights

    @property
    def plan(self) -> InferencePlan:
        """The inference plan of the model as it stands (validation sets its normalization after fitting)."""
        thumb, thresholds = self.thumbnail, self.thresholds or {}
        return InferencePlan(
            tiling=self.tiling,
            tasks=tuple(self.tasks),
            fusion_weights=tuple(self.fusion_weights),
            postprocess=self.postprocess,
            normalization=dict(self.task_normalization or {}),
            thumbnail_size=None if thumb is None else (int(thumb.size[0]), int(thumb.size[1])),
            thumbnail_normalization=None if thumb is None else thumb.normalization,
            centres=self.routing,
            image_threshold=thresholds.get("image"),
            pixel_threshold=thresholds.get("pixel"),
        )

    @contextlib.contextmanager
    def placed(self, device: torch.device) -> Iterator["HRModel"]:
        """Embedders and detectors on `device` inside the block (the trainer's validation runs there), back on
        the CPU, where a model lives (checkpoints, export), on exit."""
        parts = [self.embedder, *self.detectors.values()]
        if self.thumbnail is not None:
            parts += [self.thumbnail.embedder, self.thumbnail.detector]
        for part in parts:
            part.to(device)
        try:
            yield self
        finally:
            for part in parts:
                part.to(CPU)

    @torch.no_grad()
    def tile_embeddings(self, image: np.ndarray, tile_ids: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Per embedder output, the features (N, C, h, w) of the chosen tiles fused with their context windows'."""
        fusion = self.plan.fusion(tile_ids)
        main = embed(self.embedder, fusion.patches(image), self.config.batch_size)
        windows = [
            embed(self.embedder, fusion.window_images(image, level), self.config.batch_size) for level in fusion.levels
        ]
        return fusion.fuse(main, windows, upsample)

    def assignments(self, features: list[torch.Tensor], tile_ids: Sequence[int] | None = None) -> dict[str, list[int]]:
        """Per task, the positions in `tile_ids` (the tiles whose `features` these are; default all) that it scores:
        fixed for static tasks, by nearest centre for retrieval tasks."""
        return self.plan.assign(features[0].numpy(), tile_ids)

    @torch.no_grad()
    def raw_tile_scores(self, image: np.ndarray) -> list[tuple[str, int, np.ndarray]]:
        """(task, tile index, raw score grid) for every tile, each scored by its task's detector,
        `STREAM_TILES` tiles at a time."""
        out = []
        for ids in chunks(len(self.tiling.tiles), STREAM_TILES):
            features = self.tile_embeddings(image, ids)
            for name, positions in self.assignments(features, ids).items():
                if positions:
                    scores = self.detectors[name].score([f[positions] for f in features])
                    out += [(name, ids[p], s.numpy()) for p, s in zip(positions, scores)]
        return out

    def predict(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Anomaly map at image_size and image score, for an RGB uint8 image at image_size."""
        if image.shape[:2] != (self.tiling.image_size[1], self.tiling.image_size[0]):
            raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, the model expects {self.tiling.image_size}")
        plan = self.plan
        grids: list[np.ndarray | None] = [None] * len(self.tiling.tiles)
        for name, i, grid in self.raw_tile_scores(image):
            grids[i] = plan.normalize(name, grid)
        thumbnail = None if self.thumbnail is None else plan.thumbnail_map(self.thumbnail.raw_scores(image))
        return plan.finish(plan.merge(grids), thumbnail, in_place=True)
