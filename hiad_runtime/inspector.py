"""Inspector: bundle -> predict(image) -> Result. The edge box's whole pipeline, torch-free.

decode -> resize (recorded policy) -> tile (shared geometry) -> embed all tiles in batched ONNX
Runtime calls (context windows once each, fused per feature scale) -> route (retrieval) -> score per
task (each head by its kind's path) -> gather -> thumbnail max -> blur -> image score -> thresholds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from hiad_runtime.bundle import Bundle, BundleError, EmbedderSpec
from hiad_runtime.geometry import Box, Tile, context_crop, crop, split
from hiad_runtime.heads import Head, load_head
from hiad_runtime.image import ImageError, decode, load_image, resize_image, resize_map, size_warnings
from hiad_runtime.pipeline import PipelineGraph
from hiad_runtime.postprocess import finish, fuse_thumbnail, tile_maps_to_image
from hiad_runtime.sessions import SessionFactory
from hiad_runtime.tasks import route

STAGES = ("decode", "tile", "backbone", "scoring", "post")
MAX_PIXELS_FACTOR = 4  # default pixel budget of an input: this many times the bundle's image area
ENGINES = ("tiles", "pipeline")  # stage by stage (faiss or ONNX heads), or the bundle's whole-image graph


@dataclass
class Result:
    score: float  # in [0, 1] when the bundle's tasks carry validation normalization, raw otherwise
    anomaly_map: np.ndarray  # float32 (H, W) at the bundle's image_size, same scale as `score`
    input_size: tuple[int, int]  # (width, height) of the image as given
    decision: bool | None = None  # score >= image threshold, when there is one
    mask: np.ndarray | None = None  # anomaly_map >= pixel threshold, when there is one
    timings: dict = field(default_factory=dict)  # seconds per stage
    warnings: list[str] = field(default_factory=list)  # why the score may be unreliable (aspect, size)

    def map_at_input_size(self) -> np.ndarray:
        return resize_map(self.anomaly_map, self.input_size)


class Embedder:
    """One embedder graph: uint8 NHWC tiles -> its float32 feature maps [(N, C_s, h_s, w_s)], in batches."""

    def __init__(self, root: Path, spec: EmbedderSpec, sessions: SessionFactory, batch_size: int):
        self.spec = spec
        self.session = sessions.create(root / spec.graph.file)
        self.batch_size = batch_size

    def __call__(self, tiles: np.ndarray) -> list[np.ndarray]:
        name = self.spec.graph.inputs[0].name
        runs = [
            self.session.run(None, {name: np.ascontiguousarray(tiles[i : i + self.batch_size])})
            for i in range(0, len(tiles), self.batch_size)
        ]
        return [outs[0] if len(runs) == 1 else np.concatenate(outs) for outs in zip(*runs)]


def upsample_grid(embedding: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(D, h, w) -> (D, size_h, size_w), bilinear with half-pixel centres (torch align_corners=False)."""
    hwc = np.ascontiguousarray(embedding.transpose(1, 2, 0))
    chunks = [cv2.resize(hwc[:, :, i : i + 256], size, interpolation=cv2.INTER_LINEAR) for i in range(0, hwc.shape[2], 256)]
    out = np.concatenate([c.reshape(size[1], size[0], -1) for c in chunks], axis=2)
    return out.transpose(2, 0, 1)


class Inspector:
    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str] | None = None,
        threads: int = 0,
        batch_size: int = 4,
        head_path: str = "native",
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        max_pixels: int | None = None,
        engine: str = "tiles",
    ):
        m = bundle.manifest
        self.bundle = bundle
        self.manifest = m
        self.tiling = m.geometry
        width, height = self.tiling.image_size
        self.max_pixels = max_pixels or MAX_PIXELS_FACTOR * width * height  # paths and bytes above it are refused
        self.sessions = SessionFactory(providers, threads)
        thresholds = m.thresholds or {}
        self.image_threshold = image_threshold if image_threshold is not None else thresholds.get("image")
        self.pixel_threshold = pixel_threshold if pixel_threshold is not None else thresholds.get("pixel")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        # engine "pipeline": the whole-image graph does every stage below; nothing else is loaded.
        self.pipeline = PipelineGraph(bundle, self.sessions) if engine == "pipeline" else None
        if self.pipeline is not None:
            return
        self.embedders = {name: Embedder(bundle.root, spec, self.sessions, batch_size) for name, spec in m.embedders.items()}
        self.tasks = m.tasks
        self.heads: dict[str, Head] = {t.name: load_head(bundle.root, t.head, self.sessions, head_path) for t in m.tasks}
        self.centres = None
        if m.routing is not None:
            self.centres = np.load(bundle.path(m.routing.centres), allow_pickle=False)
        self.thumbnail_head = None
        if m.thumbnail is not None:
            self.thumbnail_head = load_head(bundle.root, m.thumbnail.head, self.sessions, head_path)
        self.normalization = {t.name: t.normalization for t in m.tasks if t.normalization is not None}

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "Inspector":
        return cls(Bundle.load(path), **kwargs)

    @property
    def providers_in_use(self) -> list[str]:
        return sorted(self.sessions.in_use)

    # -- stages ---------------------------------------------------------------------------------
    def tile_embeddings(self, image: np.ndarray, timings: dict) -> list[np.ndarray]:
        """Per feature scale, fused features (N_tiles, C, h, w) of every tile; each context window embedded once."""
        t0 = time.perf_counter()
        tiles = self.tiling.tiles
        patches = split(image, tiles)
        levels = []
        for level in range(1, len(self.tiling.ds_factors)):
            windows = self.tiling.context_windows(level)
            levels.append((windows, np.stack([resize_image(crop(image, w), self.tiling.patch_size) for w in windows])))
        timings["tile"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        embed = self.embedders["patch"]
        weights = self.manifest.fusion_weights
        fused = [f * np.float32(weights[0]) for f in embed(patches)]
        for level, (windows, crops) in enumerate(levels, start=1):
            per_window = embed(crops)
            for scale, f in enumerate(fused):
                window_emb = dict(zip(windows, per_window[scale]))
                for i, t in enumerate(tiles):
                    f[i] += np.float32(weights[level]) * self._context_part(window_emb, t, level, f.shape[-1], f.shape[-2])
        timings["backbone"] = time.perf_counter() - t0
        return fused

    @staticmethod
    def _context_part(window_emb: dict, tile: Tile, level: int, gw: int, gh: int) -> np.ndarray:
        window: Box = tile.context[level - 1]
        up_w, up_h, ox, oy = context_crop(window, tile.main, (gw, gh))
        return upsample_grid(window_emb[window], (up_w, up_h))[:, oy : oy + gh, ox : ox + gw]

    def assignments(self, features: list[np.ndarray]) -> dict[str, list[int]]:
        if self.centres is None:
            return {t.name: list(t.tiles) for t in self.tasks}
        keys = features[0].mean(axis=(2, 3))
        keys /= np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
        labels = route(keys, self.centres)
        return {t.name: [int(i) for i in np.flatnonzero(labels == k)] for k, t in enumerate(self.tasks)}

    def raw_scores(self, image: np.ndarray, timings: dict | None = None) -> tuple[list[tuple[str, int, np.ndarray]], np.ndarray | None]:
        """Every head's output before normalization, for an RGB image at image_size: (task, tile index,
        score grid) per tile, and the thumbnail's grid (None without a thumbnail). Calibration reads these."""
        timings = {} if timings is None else timings
        features = self.tile_embeddings(image, timings)
        t0 = time.perf_counter()
        raw = []
        for name, ids in self.assignments(features).items():
            if ids:
                raw += [(name, i, s) for i, s in zip(ids, self.heads[name]([f[ids] for f in features]))]
        thumb = None
        if self.thumbnail_head is not None:
            thumb = self.thumbnail_head(self.embedders["thumbnail"](resize_image(image, tuple(self.manifest.thumbnail.size))[None]))[0]
        timings["scoring"] = time.perf_counter() - t0
        return raw, thumb

    def thumbnail_map(self, scores: np.ndarray | None) -> np.ndarray | None:
        """The thumbnail's raw grid normalized and brought to thumbnail size."""
        if scores is None:
            return None
        spec = self.manifest.thumbnail
        size = tuple(spec.size)
        if spec.normalization is not None:
            scores = spec.normalization(scores)
        return tile_maps_to_image([scores], [Tile(0, 0, 0, Box(0, 0, *size))], size, self.manifest.postprocess)

    def decode(self, image: np.ndarray | str | Path | bytes) -> np.ndarray:
        """A path or encoded bytes decoded within `max_pixels`, or an RGB uint8 array checked."""
        if isinstance(image, (str, Path)):
            return load_image(image, self.max_pixels)
        if isinstance(image, bytes):
            return decode(image, "image bytes", self.max_pixels)
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise ImageError("predict expects a path, encoded bytes, or an RGB uint8 array (H, W, 3)")
        if min(image.shape[:2]) == 0:
            raise ImageError(f"image array of shape {image.shape} is empty")
        return image

    # -- the pipeline ---------------------------------------------------------------------------
    def predict(self, image: np.ndarray | str | Path | bytes) -> Result:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        source = str(image) if isinstance(image, (str, Path)) else "image"
        image = self.decode(image)
        input_size = (image.shape[1], image.shape[0])
        try:
            image = resize_image(image, self.tiling.image_size)
        except ImageError as e:
            raise ImageError(f"{source}: {e}") from None
        timings["decode"] = time.perf_counter() - t0

        if self.pipeline is not None:
            t0 = time.perf_counter()
            anomaly_map, score = self.pipeline(image)
            timings["pipeline"] = time.perf_counter() - t0
            return self._result(anomaly_map, score, input_size, timings)

        raw, thumb = self.raw_scores(image, timings)
        maps: list[np.ndarray | None] = [None] * len(self.tiling.tiles)
        for name, i, s in raw:
            norm = self.normalization.get(name)
            maps[i] = s if norm is None else norm(s)

        t0 = time.perf_counter()
        spec = self.manifest.postprocess
        merged = fuse_thumbnail(tile_maps_to_image(maps, self.tiling.tiles, self.tiling.image_size, spec), self.thumbnail_map(thumb))
        anomaly_map, score = finish(merged, spec)
        result = self._result(anomaly_map, score, input_size, timings)
        timings["post"] = time.perf_counter() - t0
        return result

    def _result(self, anomaly_map: np.ndarray, score: float, input_size, timings: dict) -> Result:
        decision = None if self.image_threshold is None else bool(score >= self.image_threshold)
        mask = None if self.pixel_threshold is None else anomaly_map >= self.pixel_threshold
        return Result(score, anomaly_map, input_size, decision, mask, timings, size_warnings(input_size, self.tiling.image_size))


__all__ = ["BundleError", "ImageError", "Inspector", "Result", "STAGES"]
