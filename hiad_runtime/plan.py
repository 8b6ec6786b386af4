"""The inference plan: how tile features become one anomaly map, one score and a decision, written once.

From the tiling, the tasks, the fusion weights, the post-processing spec, the normalizations, the
thumbnail and the routing centres (a bundle's manifest, or a trained model's fields) it gives,
numbers in, numbers out (numpy only):

- `fusion(ids)`: the context windows the tiles `ids` read (each once, in first-use order), which
  window each tile owns per level, where the tile's part of it lies (`geometry.context_crop`) and
  the weights; `Fusion.fuse` adds them up for any array type (numpy here, torch in training);
- `routing_key` and `route`: a tile's retrieval key and its nearest centre; `assign` gives each task
  the positions it scores (static tasks by their tiles, retrieval tasks by route);
- `normalize` (per task), `thumbnail_map` (the low-resolution branch at thumbnail size), the overlap
  counts, `assembler`/`merge` (tile maps into the image map), `finish` (blur, image score) and
  `decide` (thresholds).

Its consumers: the runtime's tile engine (hiad_runtime/engines/tiles.py), the PyTorch model
(hiad_train/model.py: torch embedder and detectors, the context parts cut with F.interpolate at the
plan's indices), the whole-image graph's builder (hiad_export/pipeline.py: torch ops at the plan's
windows, owners, offsets, counts and score rule) and calibration (hiad_train/calibration.py). A change
to fusion, routing or the finish is one edit here, and export's parity check proves every consumer
still agrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, TypeVar

import cv2
import numpy as np

from hiad_runtime import postprocess as post
from hiad_runtime.geometry import Box, Size, Tile, Tiling, context_crop, crop, split
from hiad_runtime.image import resize_image
from hiad_runtime.postprocess import Normalization, PostprocessSpec, tile_map
from hiad_runtime.streaming import MapAssembler
from hiad_runtime.tasks import Task

if TYPE_CHECKING:
    from hiad_runtime.bundle import Bundle

A = TypeVar("A")  # a feature array: numpy (the runtime) or torch (training, the whole-image graph)
Crop = tuple[int, int, int, int]  # (up_w, up_h, ox, oy): see geometry.context_crop


CV_CHANNELS = 128  # channels OpenCV resizes in one call (CV_CN_MAX: 512 before OpenCV 5, 128 since)


def upsample_grid(embedding: np.ndarray, size: Size) -> np.ndarray:
    """(D, h, w) -> (D, size_h, size_w), bilinear with half-pixel centres (torch align_corners=False);
    channels are independent, so they are resized `CV_CHANNELS` at a time."""
    hwc = np.ascontiguousarray(embedding.transpose(1, 2, 0))
    parts = [
        cv2.resize(hwc[:, :, i : i + CV_CHANNELS], size, interpolation=cv2.INTER_LINEAR)
        for i in range(0, hwc.shape[2], CV_CHANNELS)
    ]
    out = np.concatenate([c.reshape(size[1], size[0], -1) for c in parts], axis=2)
    return out.transpose(2, 0, 1)


def routing_key(features: np.ndarray) -> np.ndarray:
    """A tile's retrieval key: its features (..., D, h, w) averaged over the grid, L2-normalized (..., D)."""
    flat = np.asarray(features, np.float32).mean(axis=(-2, -1))
    return flat / np.maximum(np.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)


def route(keys: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Retrieval routing: index of the nearest centre (L2) for each row of `keys` (N, D)."""
    d2 = (keys**2).sum(1, keepdims=True) - 2 * keys @ centres.T + (centres**2).sum(1)[None]
    return np.argmin(d2, axis=1)


@dataclass(frozen=True)
class ContextLevel:
    """One ds_factor level of a fusion: its weight, its distinct windows and, per tile, the window it reads."""

    weight: float
    windows: tuple[Box, ...]  # distinct, in first-use order: each embedded once
    owner: tuple[int, ...]  # per tile, the index of its window in `windows`
    tiles: tuple[Box, ...]  # the tiles' main boxes

    def crops(self, grid: tuple[int, int]) -> list[Crop]:
        """Per tile, where its part of its window's embedding lies on a (w, h) feature grid."""
        return [context_crop(self.windows[o], tile, grid) for o, tile in zip(self.owner, self.tiles, strict=True)]


@dataclass(frozen=True)
class Fusion:
    """The fused features of some tiles: weight x the tile's own + per level, weight x its context part."""

    tiles: tuple[Tile, ...]
    weight: float  # of the tiles' own features
    levels: tuple[ContextLevel, ...]
    patch_size: Size

    @property
    def identity(self) -> bool:
        """Whether `fuse` gives the tiles' own features unchanged (no context level, weight 1): the runtime
        then keeps them where the embedder wrote them."""
        return not self.levels and self.weight == 1

    def patches(self, image: np.ndarray) -> np.ndarray:
        """The tiles' pixels (N, patch_h, patch_w, 3), what the embedder reads first."""
        return split(image, self.tiles)

    def window_images(self, image: np.ndarray, level: ContextLevel) -> np.ndarray:
        """The level's windows, each shrunk to the patch size (INTER_AREA), for the same embedder."""
        return np.stack([resize_image(crop(image, w), self.patch_size) for w in level.windows])

    def fuse(self, main: Sequence[A], windows: Sequence[Sequence[A]], upsample: Callable[[A, Size], A]) -> list[A]:
        """Per feature scale, the fused (N, C, h, w) features from the tiles' own (`main`, per scale) and each
        level's windows' (`windows[level][scale]`, (W, C, h', w')); `upsample(x (C, h', w'), (w, h))` is the
        consumer's bilinear resize (numpy: `upsample_grid`, torch: F.interpolate). Adds in place, in tile order."""
        fused = [f * self.weight for f in main]
        for level, per_scale in zip(self.levels, windows, strict=True):
            for scale, f in enumerate(fused):
                gh, gw = int(f.shape[-2]), int(f.shape[-1])
                for i, (up_w, up_h, ox, oy) in enumerate(level.crops((gw, gh))):
                    part = upsample(per_scale[scale][level.owner[i]], (up_w, up_h))
                    f[i] += level.weight * part[:, oy : oy + gh, ox : ox + gw]
        return fused


@dataclass(frozen=True, eq=False)
class InferencePlan:
    """Everything between the embedder's features and the result that is not a network."""

    tiling: Tiling
    tasks: tuple[Task, ...]
    fusion_weights: tuple[float, ...]
    postprocess: PostprocessSpec
    normalization: Mapping[str, Normalization] = field(default_factory=dict)  # per task that has one
    thumbnail_size: Size | None = None  # (width, height): a low-resolution branch
    thumbnail_normalization: Normalization | None = None
    centres: np.ndarray | None = None  # retrieval routing (k, D); None: static tasks
    image_threshold: float | None = None
    pixel_threshold: float | None = None

    @classmethod
    def from_bundle(cls, bundle: "Bundle") -> "InferencePlan":
        """The plan a bundle's manifest records (routing centres read from the bundle)."""
        m = bundle.manifest
        thumb, thresholds = m.thumbnail, m.thresholds or {}
        return cls(
            tiling=m.geometry,
            tasks=tuple(t.task for t in m.tasks),
            fusion_weights=tuple(m.fusion_weights),
            postprocess=m.postprocess,
            normalization={t.name: t.normalization for t in m.tasks if t.normalization is not None},
            thumbnail_size=None if thumb is None else (int(thumb.size[0]), int(thumb.size[1])),
            thumbnail_normalization=None if thumb is None else thumb.normalization,
            centres=None if m.routing is None else np.load(bundle.path(m.routing.centres), allow_pickle=False),
            image_threshold=thresholds.get("image"),
            pixel_threshold=thresholds.get("pixel"),
        )

    def with_thresholds(self, image: float | None = None, pixel: float | None = None) -> "InferencePlan":
        """The plan with the given thresholds in place of its own (None keeps its own)."""
        return replace(
            self,
            image_threshold=self.image_threshold if image is None else image,
            pixel_threshold=self.pixel_threshold if pixel is None else pixel,
        )

    def renormalized(self, tasks: Mapping[str, Normalization], thumbnail: Normalization | None) -> "InferencePlan":
        """The plan with new normalizations (calibration)."""
        return replace(self, normalization=dict(tasks), thumbnail_normalization=thumbnail)

    # -- features --------------------------------------------------------------------------------
    def _ids(self, ids: Sequence[int] | None) -> list[int]:
        return list(range(len(self.tiling.tiles))) if ids is None else list(ids)

    def fusion(self, ids: Sequence[int] | None = None) -> Fusion:
        """How the features of tiles `ids` (default: all) are fused with their context windows'."""
        tiles = tuple(self.tiling.tiles[i] for i in self._ids(ids))
        levels = []
        for level in range(1, len(self.tiling.ds_factors)):
            windows = tuple(self.tiling.context_windows(level, tiles))
            index = {w: k for k, w in enumerate(windows)}
            owner = tuple(index[t.context[level - 1]] for t in tiles)
            levels.append(ContextLevel(self.fusion_weights[level], windows, owner, tuple(t.main for t in tiles)))
        return Fusion(tiles, self.fusion_weights[0], tuple(levels), self.tiling.patch_size)

    # -- routing ---------------------------------------------------------------------------------
    @property
    def routed(self) -> bool:
        """Whether tiles reach their task by retrieval routing (centres) rather than by a fixed tile list."""
        return self.centres is not None

    def assign(self, features: np.ndarray | None, ids: Sequence[int] | None = None) -> dict[str, list[int]]:
        """Per task, the positions in `ids` (default: all tiles) it scores: a static task its own tiles, a
        retrieval task the tiles whose key (from `features`, the first scale (N, D, h, w)) is nearest its centre."""
        ids = self._ids(ids)
        if self.centres is None:
            position = {tile: p for p, tile in enumerate(ids)}
            return {t.name: [position[i] for i in t.tiles if i in position] for t in self.tasks}
        labels = route(routing_key(features), self.centres)
        return {t.name: [int(i) for i in np.flatnonzero(labels == k)] for k, t in enumerate(self.tasks)}

    # -- maps ------------------------------------------------------------------------------------
    def normalize(self, task: str, grid: np.ndarray) -> np.ndarray:
        """A task's raw score grid on the output scale (as it is without validation statistics)."""
        norm = self.normalization.get(task)
        return grid if norm is None else norm(grid)

    def thumbnail_map(self, scores: np.ndarray | None) -> np.ndarray | None:
        """The thumbnail head's raw grid normalized and brought to thumbnail size (None without a thumbnail)."""
        if scores is None:
            return None
        if self.thumbnail_normalization is not None:
            scores = self.thumbnail_normalization(scores)
        return tile_map(scores, self.thumbnail_size, self.postprocess)

    @cached_property
    def overlap_counts(self) -> np.ndarray:
        """How many tiles cover each pixel ((H, W), uint8 where at most 255 tiles can overlap, else uint16);
        every pixel must be covered."""
        (width, height), (pw, ph), (sw, sh) = self.tiling.image_size, self.tiling.patch_size, self.tiling.stride
        most = -(-pw // sw) * -(-ph // sh)  # tiles over one pixel at most
        counts = np.zeros((height, width), np.uint8 if most <= np.iinfo(np.uint8).max else np.uint16)
        for t in self.tiling.tiles:
            counts[t.main.slices()] += 1
        if counts.min() == 0:
            raise ValueError("tiles do not cover the whole image")
        return counts

    @cached_property
    def coverage(self) -> np.ndarray | None:
        """The overlap counts, or None when every pixel is covered exactly once (nothing to average)."""
        return None if self.overlap_counts.max() == 1 else self.overlap_counts

    def assembler(self) -> MapAssembler:
        """An empty image map that takes (normalized) tile grids as they come (streaming)."""
        return MapAssembler(self.tiling.tiles, self.tiling.image_size, self.postprocess, self.coverage)

    def merge(self, grids: Sequence[np.ndarray]) -> np.ndarray:
        """Every tile's (normalized) grid, in tile order, merged into the image map (overlaps averaged)."""
        assembler = self.assembler()
        for i, grid in enumerate(grids):
            assembler.add(i, grid)
        return assembler.result()

    def finish(
        self, merged: np.ndarray, thumbnail: np.ndarray | None = None, in_place: bool = True
    ) -> tuple[np.ndarray, float]:
        """The merged map's max with the thumbnail map (upsampled), blurred, and the image score.
        `in_place` reuses the merged map's memory (large images: no second image-sized buffer)."""
        return post.finish(post.fuse_thumbnail(merged, thumbnail), self.postprocess, in_place)

    def decide(self, anomaly_map: np.ndarray, score: float) -> tuple[bool | None, np.ndarray | None]:
        """(score >= image threshold, map >= pixel threshold), each None without its threshold."""
        decision = None if self.image_threshold is None else bool(score >= self.image_threshold)
        mask = None if self.pixel_threshold is None else anomaly_map >= self.pixel_threshold
        return decision, mask
