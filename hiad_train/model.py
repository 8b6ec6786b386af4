"""The trained high-resolution model in PyTorch: tiling + tasks + embedder + one detector per task.

`predict` is the PyTorch reference that export's parity check holds the runtime to. It shares the
runtime's geometry and post-processing, so the only differences the check sees are the graphs' maths.
Like the runtime, it embeds and scores `STREAM_TILES` tiles at a time and adds each tile's map into
one image-sized map in place, so its memory is one chunk's features at any image size (8192^2: 256
tiles, 537 MB of features at once before).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hiad_runtime.geometry import Box, Tile, Tiling, context_crop, crop, split
from hiad_runtime.image import resize_image
from hiad_runtime.postprocess import Normalization, PostprocessSpec, finish, fuse_thumbnail, tile_maps_to_image
from hiad_runtime.streaming import MapAssembler, chunks, coverage
from hiad_runtime.tasks import Task, route
from hiad_train.config import TrainConfig
from hiad_train.detectors import Detector
from hiad_train.tasks import routing_descriptors

STREAM_TILES = 16  # tiles embedded and scored at a time by `predict` (the runtime's default `--stream-tiles`)


def batches(items: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def embed(embedder: nn.Module, tiles: np.ndarray, batch_size: int) -> list[torch.Tensor]:
    """Per embedder output, the features (N, C, h, w) of uint8 tiles (N, H, W, 3), in batches."""
    runs = [embedder(torch.from_numpy(np.ascontiguousarray(b))) for b in batches(tiles, batch_size)]
    return [torch.cat(outs) for outs in zip(*runs)]


def crop_context(window_features: torch.Tensor, window: Box, tile: Box) -> torch.Tensor:
    """The part of a context window's features (C, h, w) that covers `tile`, at the tile's grid size."""
    c, h, w = window_features.shape
    up_w, up_h, ox, oy = context_crop(window, tile, (w, h))
    up = F.interpolate(window_features[None], size=(up_h, up_w), mode="bilinear", align_corners=False)[0]
    return up[:, oy : oy + h, ox : ox + w]


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

    def score_map(self, image: np.ndarray, spec: PostprocessSpec) -> np.ndarray:
        """The (normalized) thumbnail map at thumbnail size."""
        scores = self.raw_scores(image)
        if self.normalization is not None:
            scores = self.normalization(scores)
        return tile_maps_to_image([scores], [Tile(0, 0, 0, Box(0, 0, *self.size))], self.size, spec)


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

    @torch.no_grad()
    def tile_embeddings(self, image: np.ndarray, tile_ids: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Per embedder output, the features (N, C, h, w) of the chosen tiles fused with their context windows'."""
        tiles = [self.tiling.tiles[i] for i in (tile_ids if tile_ids is not None else range(len(self.tiling.tiles)))]
        weights = self.fusion_weights
        out = [f * weights[0] for f in embed(self.embedder, split(image, tiles), self.config.batch_size)]
        for level in range(1, len(self.tiling.ds_factors)):
            windows = list(dict.fromkeys(t.context[level - 1] for t in tiles))
            small = np.stack([resize_image(crop(image, w), self.tiling.patch_size) for w in windows])
            for scale, window_features in enumerate(embed(self.embedder, small, self.config.batch_size)):
                by_window = dict(zip(windows, window_features))
                for i, t in enumerate(tiles):
                    w = t.context[level - 1]
                    out[scale][i] += weights[level] * crop_context(by_window[w], w, t.main)
        return out

    def assignments(self, features: list[torch.Tensor], tile_ids: Sequence[int] | None = None) -> dict[str, list[int]]:
        """Per task, the positions in `tile_ids` (the tiles whose `features` these are; default all) that it scores:
        fixed for static tasks, by nearest centre for retrieval tasks."""
        if self.routing is None:
            position = {tile: p for p, tile in enumerate(tile_ids if tile_ids is not None else range(len(self.tiling.tiles)))}
            return {t.name: [position[i] for i in t.tiles if i in position] for t in self.tasks}
        labels = route(routing_descriptors(features[0].numpy()), self.routing)
        return {t.name: [int(i) for i in np.flatnonzero(labels == k)] for k, t in enumerate(self.tasks)}

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

    def tile_maps(self, image: np.ndarray) -> list[np.ndarray]:
        """Per-tile score grids, normalized per task when the model has validation statistics."""
        maps: list[np.ndarray | None] = [None] * len(self.tiling.tiles)
        for name, i, s in self.raw_tile_scores(image):
            maps[i] = s if self.task_normalization is None else self.task_normalization[name](s)
        return maps

    def predict(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Anomaly map at image_size and image score, for an RGB uint8 image at image_size."""
        if image.shape[:2] != (self.tiling.image_size[1], self.tiling.image_size[0]):
            raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, the model expects {self.tiling.image_size}")
        tiles, size = self.tiling.tiles, self.tiling.image_size
        assembler = MapAssembler(tiles, size, self.postprocess, coverage(tiles, size))
        for i, grid in enumerate(self.tile_maps(image)):
            assembler.add(i, grid)
        anomaly_map = assembler.result()
        if self.thumbnail is not None:
            anomaly_map = fuse_thumbnail(anomaly_map, self.thumbnail.score_map(image, self.postprocess))
        return finish(anomaly_map, self.postprocess, in_place=True)
