"""From per-tile score maps to one image map and one image score, as HiAD post-processes.

upsample each tile's map to the tile -> gather (overlaps averaged) -> [max with the thumbnail map]
-> Gaussian blur -> image score = max of the block-mean-pooled map -> [normalize] -> [threshold].
Training's PyTorch inference calls these same functions, so this step is identical on both sides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import cv2
import numpy as np

from hiad_runtime.geometry import Tile, gather
from hiad_runtime.image import resize_map


@dataclass(frozen=True)
class PostprocessSpec:
    """Recorded in the manifest: what a non-Python caller must do after the ONNX graphs."""

    gaussian_sigma: float = 4.0
    gaussian_truncate: float = 4.0  # kernel radius = int(truncate * sigma + 0.5), border 'reflect' (scipy)
    score_pool: int = 16  # image score = max over non-overlapping pool x pool block means
    clip_to_unit: bool = False  # tasks' scores are min-max normalized: clip map and score to [0, 1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PostprocessSpec":
        return cls(**d)


@dataclass(frozen=True)
class Normalization:
    """A task's min-max statistics from the validation set: (x - minimum) / (maximum - minimum).

    Applied to the task's raw score grids before gathering; the final map and score are clipped to
    [0, 1] (PostprocessSpec.clip_to_unit)."""

    minimum: float
    maximum: float

    def __call__(self, values):
        span = max(self.maximum - self.minimum, 1e-12)
        return ((np.asarray(values, np.float32) - np.float32(self.minimum)) / np.float32(span)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"minimum": float(self.minimum), "maximum": float(self.maximum)}


def tile_maps_to_image(
    tile_maps: Sequence[np.ndarray], tiles: Sequence[Tile], image_size: tuple[int, int]
) -> np.ndarray:
    """Upsample each tile's feature-grid map to its tile (bilinear) and gather into the image."""
    full = [resize_map(np.asarray(m, np.float32), (t.main.width, t.main.height)) for m, t in zip(tile_maps, tiles)]
    return gather(full, tiles, image_size)


def fuse_thumbnail(high: np.ndarray, thumbnail_map: np.ndarray | None) -> np.ndarray:
    """Element-wise max with the low-resolution branch's map upsampled to the image."""
    if thumbnail_map is None:
        return high
    return np.maximum(high, resize_map(np.asarray(thumbnail_map, np.float32), (high.shape[1], high.shape[0])))


def gaussian_blur(anomaly_map: np.ndarray, spec: PostprocessSpec) -> np.ndarray:
    """Equal to scipy.ndimage.gaussian_filter(map, sigma, truncate=truncate, mode='reflect')."""
    if spec.gaussian_sigma <= 0:
        return anomaly_map
    radius = int(spec.gaussian_truncate * spec.gaussian_sigma + 0.5)
    k = 2 * radius + 1
    return cv2.GaussianBlur(
        anomaly_map, (k, k), sigmaX=spec.gaussian_sigma, sigmaY=spec.gaussian_sigma, borderType=cv2.BORDER_REFLECT
    )


def finish(anomaly_map: np.ndarray, spec: PostprocessSpec) -> tuple[np.ndarray, float]:
    """Blur, image score, and the clip to [0, 1] of normalized outputs."""
    anomaly_map = gaussian_blur(anomaly_map, spec)
    score = image_score(anomaly_map, spec)
    if spec.clip_to_unit:
        return np.clip(anomaly_map, 0.0, 1.0), float(np.clip(score, 0.0, 1.0))
    return anomaly_map, score


def image_score(anomaly_map: np.ndarray, spec: PostprocessSpec) -> float:
    """Max of the block-mean-pooled map (robust to single hot pixels)."""
    p = spec.score_pool
    h, w = (anomaly_map.shape[0] // p) * p, (anomaly_map.shape[1] // p) * p
    if h == 0 or w == 0:
        return float(anomaly_map.mean())
    blocks = anomaly_map[:h, :w].reshape(h // p, p, w // p, p).mean(axis=(1, 3), dtype=np.float64)
    return float(blocks.max())
