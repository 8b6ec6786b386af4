"""The floor a bundle's latency is measured against: what no scoring method can go below.

Its embedders alone on the same tiles, with the same sessions (backend, precision, batch size), and,
for k-NN heads, an exact search of the same banks for the same features (faiss's brute-force k-NN,
matrix products). `hiad-runtime bench` prints both next to its figures, measured after each timed run,
so a latency comes with its ratio to the floor at whatever load the machine has. It also prints the
CPU time of a whole run against the backbone's: where the backbone keeps every core busy, the cores
can run at most cores x (backbone floor) / (CPU per image) images per backbone floor, whatever overlaps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np

from hiad_runtime.engines.tiles import TileEngine
from hiad_runtime.heads import FaissKnnHead, position_rows
from hiad_runtime.image import resize_image
from hiad_runtime.streaming import chunks


@dataclass(frozen=True)
class Floor:
    """Seconds for one image: the embedders on every tile (and the thumbnail), and the exact k-NN search
    of their features in their tasks' banks (None where a head is no k-NN head with a bank); and the CPU
    seconds of the embedders (all threads: how many cores the backbone keeps busy)."""

    backbone: float
    exact_search: float | None
    backbone_cpu: float


def exact_search(head: object, features: np.ndarray) -> float | None:
    """Seconds of an exact search of `head`'s bank for features (B, D, h, w); None without a bank."""
    if not isinstance(head, FaissKnnHead):
        return None
    queries = position_rows(features)
    t0 = time.perf_counter()
    faiss.knn(queries, head.bank, head.k)
    return time.perf_counter() - t0


def measure_floor(engine: TileEngine, image: np.ndarray) -> Floor:
    """The floor for an RGB image at the bundle's image_size, chunk by chunk as the engine streams tiles."""
    backbone, cpu, searches = 0.0, 0.0, []
    plan = engine.plan
    for ids in chunks(len(plan.tiling.tiles), engine.stream_tiles):
        t0, c0 = time.perf_counter(), time.process_time()
        features = engine.tile_features(image, {}, ids)
        backbone += time.perf_counter() - t0
        cpu += time.process_time() - c0
        (queries, *_) = features.numpy()
        for name, positions in plan.assign(queries if plan.routed else None, ids).items():
            if positions:
                searches.append(exact_search(engine.heads[name], queries[positions]))
    if engine.thumbnail_head is not None:
        t0, c0 = time.perf_counter(), time.process_time()
        features = engine.embedders["thumbnail"](resize_image(image, plan.thumbnail_size)[None]).numpy()
        backbone += time.perf_counter() - t0
        cpu += time.process_time() - c0
        searches.append(exact_search(engine.thumbnail_head, features[0]))
    return Floor(backbone, None if None in searches else sum(searches), cpu)
