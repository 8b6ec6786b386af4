"""Inspector: bundle -> predict(image) -> Result. The edge box's whole pipeline, torch-free.

decode -> resize (recorded policy) -> tile (shared geometry) -> per chunk of `stream_tiles` tiles:
embed in batched calls (context windows once per chunk, fused per feature scale) -> route
(retrieval) -> score per task (each head by its kind's path) -> normalize -> add each tile's map into
the image map in place -> thumbnail max -> blur -> image score -> thresholds. Chunks bound memory for
images of any size (hiad_runtime/streaming.py), and the task heads are held within `head_memory`
(hiad_runtime/heads.py: HeadCache; by default a quarter of the memory available, hiad_runtime/memory.py).
Engine "pipeline" runs the bundle's whole-image graph instead, one call per image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from hiad_runtime.bundle import Bundle, BundleError, EmbedderSpec
from hiad_runtime.geometry import Box, Tile, context_crop, crop, split
from hiad_runtime.heads import HeadCache, head_files, load_head
from hiad_runtime.image import (ImageError, decode, default_max_pixels, load_image, resize_image, resize_map,
                                size_warnings)
from hiad_runtime.memory import default_head_memory_mb
from hiad_runtime.pipeline import PipelineGraph
from hiad_runtime.postprocess import finish, fuse_thumbnail, tile_maps_to_image
from hiad_runtime.sessions import SessionFactory
from hiad_runtime.streaming import MapAssembler, chunks, coverage
from hiad_runtime.tasks import route

STAGES = ("decode", "tile", "backbone", "scoring", "post")
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
        self.session = sessions.create(root / spec.graph.file, arena=True)
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
    """A bundle ready to score images (HiAD inference, https://github.com/cnulab/HiAD), torch-free."""

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str] | None = None,
        threads: int = 0,
        batch_size: int = 1,
        head_path: str = "native",
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        max_pixels: int | None = None,
        engine: str = "tiles",
        backend: str = "auto",
        stream_tiles: int = 16,
        head_memory: float | None = None,
    ):
        m = bundle.manifest
        self.bundle = bundle
        self.manifest = m
        self.tiling = m.geometry
        self.max_pixels = max_pixels or default_max_pixels(self.tiling.image_size)  # inputs above it are refused
        self.stream_tiles = stream_tiles
        self.coverage = coverage(self.tiling.tiles, self.tiling.image_size)
        self.sessions = SessionFactory(providers, threads, backend)
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
        if head_memory is not None and not head_memory > 0:
            raise ValueError(f"head_memory must be > 0 MB, got {head_memory}")
        self.head_memory = head_memory or default_head_memory_mb()  # MB of head files kept loaded
        specs = {t.name: t.head for t in m.tasks}
        sizes = {name: sum(m.files[f].bytes for f in head_files(spec, head_path)) for name, spec in specs.items()}
        load = lambda name: load_head(bundle.root, specs[name], self.sessions, head_path)  # noqa: E731
        self.heads = HeadCache(load, sizes, int(self.head_memory * 2**20))
        self.heads.preload()
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

    @property
    def precision(self) -> str:
        """The embedders' precision as the bundle records it (e.g. 'int8'; 'fp32+fp16' if they differ)."""
        return "+".join(sorted({e.precision for e in self.manifest.embedders.values()}))

    # -- stages ---------------------------------------------------------------------------------
    def tile_embeddings(self, image: np.ndarray, timings: dict, ids: Sequence[int] | None = None) -> list[np.ndarray]:
        """Per feature scale, fused features (N, C, h, w) of tiles `ids` (default all); each context window they use embedded once."""
        t0 = time.perf_counter()
        tiles = [self.tiling.tiles[i] for i in ids] if ids is not None else list(self.tiling.tiles)
        patches = split(image, tiles)
        levels = []
        for level in range(1, len(self.tiling.ds_factors)):
            windows = list(dict.fromkeys(t.context[level - 1] for t in tiles))
            levels.append((windows, np.stack([resize_image(crop(image, w), self.tiling.patch_size) for w in windows])))
        timings["tile"] = timings.get("tile", 0.0) + time.perf_counter() - t0

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
        timings["backbone"] = timings.get("backbone", 0.0) + time.perf_counter() - t0
        return fused

    @staticmethod
    def _context_part(window_emb: dict, tile: Tile, level: int, gw: int, gh: int) -> np.ndarray:
        window: Box = tile.context[level - 1]
        up_w, up_h, ox, oy = context_crop(window, tile.main, (gw, gh))
        return upsample_grid(window_emb[window], (up_w, up_h))[:, oy : oy + gh, ox : ox + gw]

    def assignments(self, features: list[np.ndarray], ids: Sequence[int] | None = None) -> dict[str, list[int]]:
        """Per task, the positions in `ids` (tile indices whose `features` these are; default all) that it scores."""
        if self.centres is None:
            position = {tile: p for p, tile in enumerate(ids if ids is not None else range(len(self.tiling.tiles)))}
            return {t.name: [position[i] for i in t.tiles if i in position] for t in self.tasks}
        keys = features[0].mean(axis=(2, 3))
        keys /= np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
        labels = route(keys, self.centres)
        return {t.name: [int(i) for i in np.flatnonzero(labels == k)] for k, t in enumerate(self.tasks)}

    def tile_scores(self, image: np.ndarray, timings: dict) -> Iterator[tuple[str, int, np.ndarray]]:
        """(task, tile index, raw score grid) for every tile, chunk by chunk (`stream_tiles` at a time)."""
        for ids in chunks(len(self.tiling.tiles), self.stream_tiles):
            features = self.tile_embeddings(image, timings, ids)
            t0 = time.perf_counter()
            for name, positions in self.assignments(features, ids).items():
                if positions:
                    scores = self.heads[name]([f[positions] for f in features])
                    yield from ((name, ids[p], s) for p, s in zip(positions, scores))
            timings["scoring"] = timings.get("scoring", 0.0) + time.perf_counter() - t0

    def thumbnail_scores(self, image: np.ndarray) -> np.ndarray | None:
        """The thumbnail head's raw grid (None without a thumbnail)."""
        if self.thumbnail_head is None:
            return None
        return self.thumbnail_head(self.embedders["thumbnail"](resize_image(image, tuple(self.manifest.thumbnail.size))[None]))[0]

    def raw_scores(self, image: np.ndarray) -> tuple[list[tuple[str, int, np.ndarray]], np.ndarray | None]:
        """Every head's output before normalization, for an RGB image at image_size: (task, tile index,
        score grid) per tile, and the thumbnail's grid. Calibration reads these."""
        return list(self.tile_scores(image, {})), self.thumbnail_scores(image)

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

        spec = self.manifest.postprocess
        assembler = MapAssembler(self.tiling.tiles, self.tiling.image_size, spec, self.coverage)
        for name, i, s in self.tile_scores(image, timings):
            norm = self.normalization.get(name)
            assembler.add(i, s if norm is None else norm(s))
        t0 = time.perf_counter()
        thumb = self.thumbnail_map(self.thumbnail_scores(image))
        timings["scoring"] = timings.get("scoring", 0.0) + time.perf_counter() - t0

        t0 = time.perf_counter()
        anomaly_map, score = finish(fuse_thumbnail(assembler.result(), thumb), spec, in_place=True)
        result = self._result(anomaly_map, score, input_size, timings)
        timings["post"] = time.perf_counter() - t0
        return result

    def _result(self, anomaly_map: np.ndarray, score: float, input_size, timings: dict) -> Result:
        decision = None if self.image_threshold is None else bool(score >= self.image_threshold)
        mask = None if self.pixel_threshold is None else anomaly_map >= self.pixel_threshold
        return Result(score, anomaly_map, input_size, decision, mask, timings, size_warnings(input_size, self.tiling.image_size))


__all__ = ["BundleError", "ImageError", "Inspector", "Result", "STAGES"]
