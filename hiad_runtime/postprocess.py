"""From per-tile score maps to one image map and one image score, as HiAD post-processes.

upsample each tile's map to the tile -> [per-tile blur] -> gather (overlaps averaged) -> [max with the
thumbnail map] -> Gaussian blur -> image score (block-mean max, or top-k mean) -> [threshold].
A detector declares which of the optional steps HiAD applies for it; this module knows no detector.
It holds the maths; hiad_runtime/plan.py says in which order they run, for training's PyTorch
inference, the runtime and calibration alike, so this step is identical on every side.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Literal

import cv2
import numpy as np
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from hiad_runtime.image import resize_map


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class PostprocessSpec:
    """Recorded in the manifest: what a non-Python caller must do after the ONNX graphs."""

    gaussian_sigma: Annotated[float, Field(ge=0)] = 4.0
    gaussian_truncate: Annotated[float, Field(gt=0)] = (
        4.0  # radius = int(truncate * sigma + 0.5), border 'reflect' (scipy)
    )
    score_pool: Annotated[int, Field(ge=1)] = 16  # block_mean_max: max over non-overlapping pool x pool block means
    tile_blur_sigma: Annotated[float, Field(ge=0)] = (
        0.0  # > 0: Gaussian blur of each tile's map (at tile size) before merging
    )
    score_rule: Literal["block_mean_max", "top_k_mean"] = "block_mean_max"
    score_top_k: Annotated[int, Field(ge=1)] = 1  # top_k_mean: image score = mean of the k largest map values

    def to_dict(self) -> dict:
        """The spec as the manifest stores it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PostprocessSpec":
        """The spec from the manifest's `postprocess` entry; an unknown key is refused."""
        return cls(**d)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Normalization:
    """A task's min-max statistics from the validation set: (x - minimum) / (maximum - minimum).

    Applied to the task's raw score grids before gathering. Not clipped: validation scores span
    [0, 1], and a new image may score above 1 (more anomalous than anything validation saw) or
    below 0; a threshold by false-alarm rate can lie above 1 and must stay reachable."""

    minimum: float
    maximum: float

    def __call__(self, values):
        """`values` normalized to the validation scale, as float32 (not clipped)."""
        span = max(self.maximum - self.minimum, 1e-12)
        return ((np.asarray(values, np.float32) - np.float32(self.minimum)) / np.float32(span)).astype(np.float32)

    def to_dict(self) -> dict:
        """The statistics as the manifest stores them."""
        return {"minimum": float(self.minimum), "maximum": float(self.maximum)}


def tile_map(scores: np.ndarray, size: tuple[int, int], spec: PostprocessSpec) -> np.ndarray:
    """One tile's score grid upsampled to the tile (bilinear), then the optional per-tile blur."""
    full = resize_map(np.asarray(scores, np.float32), size)
    return gaussian_blur(full, spec.tile_blur_sigma, spec.gaussian_truncate)


def fuse_thumbnail(high: np.ndarray, thumbnail_map: np.ndarray | None) -> np.ndarray:
    """Element-wise max with the low-resolution branch's map upsampled to the image."""
    if thumbnail_map is None:
        return high
    return np.maximum(high, resize_map(np.asarray(thumbnail_map, np.float32), (high.shape[1], high.shape[0])))


BLUR_STRIP_BYTES = 16 * 2**20  # an in-place blur's strips: at most this many bytes of rows (2048^2: one strip)


def gaussian_blur(anomaly_map: np.ndarray, sigma: float, truncate: float, in_place: bool = False) -> np.ndarray:
    """Equal to scipy.ndimage.gaussian_filter(map, sigma, truncate=truncate, mode='reflect').

    `in_place` blurs strips of `BLUR_STRIP_BYTES`, each with its kernel radius of rows above and below,
    into the map itself: OpenCV's own in-place call takes a full-size temporary (268 MB at 8192^2). The
    strips are large, since OpenCV shares each call out over its threads: small ones leave cores idle."""
    if sigma <= 0:
        return anomaly_map
    radius = int(truncate * sigma + 0.5)

    def blur(a: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(a, (2 * radius + 1,) * 2, sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)

    if not in_place:
        return blur(anomaly_map)
    height = anomaly_map.shape[0]
    rows = max(radius, BLUR_STRIP_BYTES // (anomaly_map.strides[0] or 1))
    if rows >= height:  # one strip: the map itself (no copy of its rows), blurred into a temporary
        anomaly_map[:] = blur(anomaly_map)
        return anomaly_map
    above = anomaly_map[:0]  # the unblurred rows (at most `radius`) just above the current strip
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        strip = np.concatenate([above, anomaly_map[top : bottom + radius]])  # a copy: the unblurred rows
        end = len(above) + bottom - top
        anomaly_map[top:bottom] = blur(strip)[len(above) : end]
        above = strip[max(end - radius, 0) : end]
    return anomaly_map


def finish(anomaly_map: np.ndarray, spec: PostprocessSpec, in_place: bool = False) -> tuple[np.ndarray, float]:
    """Blur and image score. `in_place` reuses the map's memory (large images: no second
    image-sized buffer)."""
    anomaly_map = gaussian_blur(anomaly_map, spec.gaussian_sigma, spec.gaussian_truncate, in_place)
    return anomaly_map, image_score(anomaly_map, spec)


def image_score(anomaly_map: np.ndarray, spec: PostprocessSpec) -> float:
    """Max of the block-mean-pooled map (robust to single hot pixels), or the mean of the top k values."""
    if spec.score_rule == "top_k_mean":
        k = min(spec.score_top_k, anomaly_map.size)
        return float(np.partition(anomaly_map.ravel(), anomaly_map.size - k)[-k:].mean(dtype=np.float64))
    p = spec.score_pool
    h, w = (anomaly_map.shape[0] // p) * p, (anomaly_map.shape[1] // p) * p
    if h == 0 or w == 0:
        return float(anomaly_map.mean())
    blocks = cv2.resize(anomaly_map[:h, :w], (w // p, h // p), interpolation=cv2.INTER_AREA)  # block means
    return float(blocks.max())
