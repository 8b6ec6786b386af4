"""The trained high-resolution model in PyTorch: tiling + tasks + embedder + one detector per task.

`predict` is the PyTorch reference that export's parity check holds the runtime to. It shares the
runtime's geometry and post-processing, so the only differences the check sees are the graphs' maths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hiad_runtime.geometry import Box, Tile, Tiling, context_crop, crop, split
from hiad_runtime.image import resize_image
from hiad_runtime.postprocess import Normalization, PostprocessSpec, finish, fuse_thumbnail, tile_maps_to_image
from hiad_runtime.tasks import Task, route
from hiad_train.backbones import create_backbone
from hiad_train.config import PatchCoreConfig, TrainConfig
from hiad_train.detectors import Detector
from hiad_train.features import PatchEmbedder
from hiad_train.tasks import routing_descriptors


def build_embedder(config: PatchCoreConfig, pretrained: bool = True) -> PatchEmbedder:
    backbone = create_backbone(
        config.backbone_name, config.layers_to_extract_from, config.backbone_weights, pretrained=pretrained
    )
    return PatchEmbedder(
        backbone,
        backbone.pretrained_cfg["mean"],
        backbone.pretrained_cfg["std"],
        config.merge_size,
        config.pretrain_embed_dimension,
        config.target_embed_dimension,
    ).eval()


def batches(items: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def embed(embedder: PatchEmbedder, tiles: np.ndarray, batch_size: int) -> torch.Tensor:
    """Embeddings (N, D, h, w) of uint8 tiles (N, H, W, 3), in batches."""
    return torch.cat([embedder(torch.from_numpy(np.ascontiguousarray(b))) for b in batches(tiles, batch_size)])


def crop_context(window_embedding: torch.Tensor, window: Box, tile: Box) -> torch.Tensor:
    """The part of a context window's embedding (D, h, w) that covers `tile`, at the tile's grid size."""
    d, h, w = window_embedding.shape
    up_w, up_h, ox, oy = context_crop(window, tile, (w, h))
    up = F.interpolate(window_embedding[None], size=(up_h, up_w), mode="bilinear", align_corners=False)[0]
    return up[:, oy : oy + h, ox : ox + w]


@dataclass
class Thumbnail:
    """The low-resolution branch: one detector on the whole image downsampled to `size`."""

    size: tuple[int, int]
    embedder: PatchEmbedder
    detector: Detector
    normalization: Normalization | None = None

    @torch.no_grad()
    def raw_scores(self, image: np.ndarray) -> np.ndarray:
        """The raw score grid of the whole image at thumbnail size."""
        return self.detector.score(embed(self.embedder, resize_image(image, self.size)[None], 1))[0].numpy()

    def score_map(self, image: np.ndarray) -> np.ndarray:
        """The (normalized) thumbnail map at thumbnail size."""
        scores = self.raw_scores(image)
        if self.normalization is not None:
            scores = self.normalization(scores)
        return tile_maps_to_image([scores], [_whole(self.size)], self.size)


def _whole(size: tuple[int, int]) -> Tile:
    return Tile(0, 0, 0, Box(0, 0, size[0], size[1]))


@dataclass
class HRModel:
    config: TrainConfig
    tiling: Tiling
    tasks: list[Task]
    embedder: PatchEmbedder
    detectors: dict[str, Detector]
    postprocess: PostprocessSpec = field(default_factory=PostprocessSpec)
    thumbnail: Thumbnail | None = None
    routing: np.ndarray | None = None  # retrieval centres (k, D); None = static tasks
    task_normalization: dict[str, Normalization] | None = None  # per task, from the validation set
    thresholds: dict | None = None  # {'image': float, 'pixel': float}, F1-optimal on the validation set
    validation: dict | None = None  # validation-set metrics

    @property
    def fusion_weights(self) -> list[float]:
        return self.config.normalized_fusion_weights

    @torch.no_grad()
    def tile_embeddings(self, image: np.ndarray, tile_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Embeddings (N, D, h, w) of the chosen tiles, fused with their context windows' embeddings."""
        tiles = [self.tiling.tiles[i] for i in (tile_ids if tile_ids is not None else range(len(self.tiling.tiles)))]
        weights = self.fusion_weights
        out = embed(self.embedder, split(image, tiles), self.config.batch_size) * weights[0]
        for level in range(1, len(self.tiling.ds_factors)):
            windows = list(dict.fromkeys(t.context[level - 1] for t in tiles))
            small = np.stack([resize_image(crop(image, w), self.tiling.patch_size) for w in windows])
            window_emb = dict(zip(windows, embed(self.embedder, small, self.config.batch_size)))
            for i, t in enumerate(tiles):
                w = t.context[level - 1]
                out[i] += weights[level] * crop_context(window_emb[w], w, t.main)
        return out

    def assignments(self, embeddings: torch.Tensor) -> dict[str, list[int]]:
        """Tile indices per task: fixed for static tasks, by nearest centre for retrieval tasks."""
        if self.routing is None:
            return {t.name: list(t.tiles) for t in self.tasks}
        labels = route(routing_descriptors(embeddings.numpy()), self.routing)
        return {t.name: [int(i) for i in np.flatnonzero(labels == k)] for k, t in enumerate(self.tasks)}

    @torch.no_grad()
    def raw_tile_scores(self, image: np.ndarray) -> list[tuple[str, int, np.ndarray]]:
        """(task, tile index, raw score grid) for every tile, each scored by its task's detector."""
        embeddings = self.tile_embeddings(image)
        out = []
        for name, ids in self.assignments(embeddings).items():
            if ids:
                out += [(name, i, s.numpy()) for i, s in zip(ids, self.detectors[name].score(embeddings[ids]))]
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
        anomaly_map = tile_maps_to_image(self.tile_maps(image), self.tiling.tiles, self.tiling.image_size)
        if self.thumbnail is not None:
            anomaly_map = fuse_thumbnail(anomaly_map, self.thumbnail.score_map(image))
        return finish(anomaly_map, self.postprocess)
