"""The tile engine: the bundle's embedders and heads, stage by stage, by the plan, in bounded memory.

tile (cut the chunk's tiles and the context windows they read) -> backbone (embed in batched calls,
fuse per feature scale; features stay on the sessions' device unless fusion needs them on the host:
hiad_runtime/features.py) -> scoring (route, score per task with each head by its kind's path, the
chunk's heads sharing the cores: hiad_runtime/cores.py; the thumbnail head) -> post (normalize, add
each tile's map into the image map in place, thumbnail max, blur, image score). Tiles go through
`stream_tiles` at a time, so memory is one chunk's features at any image size
(hiad_runtime/streaming.py), and the task heads stay loaded within `head_memory` MB
(hiad_runtime/heads.py: HeadCache; by default a quarter of the memory available, hiad_runtime/memory.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from hiad_runtime.backends import SessionFactory
from hiad_runtime.backends.onnxruntime import device_of
from hiad_runtime.bundle import Bundle, EmbedderSpec
from hiad_runtime.cores import CORES, map_on_cores
from hiad_runtime.features import Features
from hiad_runtime.heads import HeadCache, head_files, load_head, score
from hiad_runtime.image import resize_image
from hiad_runtime.memory import default_head_memory_mb
from hiad_runtime.plan import InferencePlan, upsample_grid
from hiad_runtime.streaming import chunks

TileScores = Iterator[tuple[str, int, np.ndarray]]  # (task, tile index, raw score grid)


class Embedder:
    """One embedder graph: uint8 NHWC tiles -> its float32 feature maps [(N, C_s, h_s, w_s)], in batches,
    written where its session runs (ONNX Runtime: I/O binding) or into host arrays (OpenVINO)."""

    def __init__(self, root: Path, spec: EmbedderSpec, sessions: SessionFactory, batch_size: int):
        self.spec = spec
        self.session = sessions.create(root / spec.graph.file, arena=True)
        self.device = device_of(self.session)
        self.input = spec.graph.inputs[0].name
        self.batch_size = batch_size

    def batches(self, tiles: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(first index, contiguous batch) of `batch_size` tiles at a time."""
        for i in range(0, len(tiles), self.batch_size):
            yield i, np.ascontiguousarray(tiles[i : i + self.batch_size])

    def __call__(self, tiles: np.ndarray) -> Features:
        """The embedder's feature maps for uint8 tiles (N, h, w, 3), run `batch_size` tiles at a time; on a
        GPU session they are written in place on the device (I/O binding), else returned on the host."""
        outputs = self.spec.graph.outputs
        if self.device is None:  # OpenVINO: each batch written into its rows of host arrays
            arrays = [np.empty([len(tiles), *o.shape[1:]], np.float32) for o in outputs]
            for i, batch in self.batches(tiles):
                self.session.run_into({self.input: batch}, [a[i : i + len(batch)] for a in arrays])
            return Features.host(arrays)
        features = Features.allocate([[len(tiles), *o.shape[1:]] for o in outputs], self.device)
        for i, batch in self.batches(tiles):
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input, batch)
            for scale, o in enumerate(outputs):
                binding.bind_output(o.name, *self.device, np.float32, *features.block(scale, i, len(batch)))
            self.session.run_with_iobinding(binding)
        return features


def shares(assigned: dict[str, list[int]], cores: int) -> list[tuple[str, list[int]]]:
    """A chunk's (task, positions) cut into runs of at most 1/`cores` of its tiles, so every core gets
    a share of the scoring whether the chunk's tiles go to many tasks (one each, O2O) or to one."""
    size = max(1, -(-sum(map(len, assigned.values())) // cores))
    return [(name, p[i : i + size]) for name, p in assigned.items() for i in range(0, len(p), size)]


def _add(timings: dict, stage: str, since: float) -> None:
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - since


class TileEngine:
    """A bundle's embedders and heads run by the plan: image at image_size -> (map, score, timings)."""

    stages = ("tile", "backbone", "scoring", "post")

    def __init__(
        self,
        bundle: Bundle,
        plan: InferencePlan,
        sessions: SessionFactory,
        batch_size: int = 1,
        head_path: str = "native",
        stream_tiles: int = 16,
        head_memory: float | None = None,
        cores: int = CORES,
    ):
        m = bundle.manifest
        self.plan, self.stream_tiles = plan, stream_tiles
        self.cores = cores  # the workers a chunk's heads are shared among (the runtime's --threads, else all)
        self.embedders = {name: Embedder(bundle.root, spec, sessions, batch_size) for name, spec in m.embedders.items()}
        self.head_memory = head_memory or default_head_memory_mb()  # MB of head files kept loaded
        specs = {t.name: t.head for t in m.tasks}
        sizes = {name: sum(m.files[f].bytes for f in head_files(spec, head_path)) for name, spec in specs.items()}
        load = lambda name: load_head(bundle.root, specs[name], sessions, head_path)  # noqa: E731
        self.heads = HeadCache(load, sizes, int(self.head_memory * 2**20))
        self.heads.preload()
        thumbnail = m.thumbnail
        self.thumbnail_head = None if thumbnail is None else load_head(bundle.root, thumbnail.head, sessions, head_path)
        plan.coverage  # the overlap counts: computed (and checked) once, before the first image

    def tile_features(self, image: np.ndarray, timings: dict, ids: Sequence[int] | None = None) -> Features:
        """Per feature scale, the fused features (N, C, h, w) of tiles `ids` (default: all)."""
        t0 = time.perf_counter()
        fusion = self.plan.fusion(ids)
        patches = fusion.patches(image)
        windows = [fusion.window_images(image, level) for level in fusion.levels]
        _add(timings, "tile", t0)
        t0 = time.perf_counter()
        embed = self.embedders["patch"]
        features = embed(patches)
        if not fusion.identity:  # fused on the host, then back where the heads' graphs read them
            fused = fusion.fuse(features.numpy(), [embed(w).numpy() for w in windows], upsample_grid)
            features = Features.upload(fused, features.device)
        _add(timings, "backbone", t0)
        return features

    def tile_scores(self, image: np.ndarray, timings: dict) -> TileScores:
        """(task, tile index, raw score grid) for every tile, chunk by chunk (`stream_tiles` at a time)."""
        for ids in chunks(len(self.plan.tiling.tiles), self.stream_tiles):
            features = self.tile_features(image, timings, ids)
            t0 = time.perf_counter()
            keys = features.numpy()[0] if self.plan.routed else None  # static tasks read no features to route
            work = shares(self.plan.assign(keys, ids), self.cores)
            scored = map_on_cores(lambda job: score(self.heads[job[0]], features, job[1]), work, self.cores)
            for (name, positions), scores in zip(work, scored):
                yield from ((name, ids[p], s) for p, s in zip(positions, scores))
            _add(timings, "scoring", t0)

    def thumbnail_scores(self, image: np.ndarray) -> np.ndarray | None:
        """The thumbnail head's raw grid (None without a thumbnail)."""
        if self.thumbnail_head is None:
            return None
        features = self.embedders["thumbnail"](resize_image(image, self.plan.thumbnail_size)[None])
        return score(self.thumbnail_head, features, [0])[0]

    def raw_scores(self, image: np.ndarray) -> tuple[list[tuple[str, int, np.ndarray]], np.ndarray | None]:
        """Every head's output before normalization, for an RGB image at image_size: (task, tile index,
        score grid) per tile, and the thumbnail's grid. Calibration reads these."""
        return list(self.tile_scores(image, {})), self.thumbnail_scores(image)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, float, dict[str, float]]:
        """(anomaly map (H, W), score, seconds per stage): tiles scored and normalized, then merged and finished."""
        timings: dict[str, float] = {}
        assembler = self.plan.assembler()
        for name, i, grid in self.tile_scores(image, timings):
            assembler.add(i, self.plan.normalize(name, grid))
        t0 = time.perf_counter()
        thumbnail = self.plan.thumbnail_map(self.thumbnail_scores(image))
        _add(timings, "scoring", t0)
        t0 = time.perf_counter()
        anomaly_map, score = self.plan.finish(assembler.result(), thumbnail, in_place=True)
        _add(timings, "post", t0)
        return anomaly_map, score, timings
