"""Bounded-memory inference of images of any size: tiles flow through in chunks, the map is built in place.

An 8192x8192 image has 256 tiles of 512; their features at once would take gigabytes. The Inspector
embeds and scores `stream_tiles` tiles at a time and adds each tile's map into one image-sized
buffer, so peak memory is the image, its map and one chunk's features, whatever the tile count;
the task heads are kept within a memory budget (`heads.HeadCache`; default: `memory.default_head_memory_mb`),
loaded per chunk beyond it.
The overlaps are averaged by the plan's overlap counts (`InferencePlan.coverage`, hiad_runtime/plan.py).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from hiad_runtime.geometry import Size, Tile
from hiad_runtime.postprocess import PostprocessSpec, tile_map


def chunks(count: int, size: int) -> Iterator[list[int]]:
    """Tile indices 0..count-1 in consecutive runs of at most `size`."""
    if size < 1:
        raise ValueError(f"stream_tiles must be >= 1, got {size}")
    for start in range(0, count, size):
        yield list(range(start, min(start + size, count)))


class MapAssembler:
    """Adds tile maps into one float32 image map as they come; `result()` averages the overlaps by
    `counts` (None: every pixel is covered once)."""

    def __init__(self, tiles: Sequence[Tile], image_size: Size, spec: PostprocessSpec, counts: np.ndarray | None):
        self.tiles, self.spec, self.counts = tiles, spec, counts
        self.total = np.zeros((image_size[1], image_size[0]), np.float32)

    def add(self, index: int, scores: np.ndarray) -> None:
        """Add tile `index`'s score grid, upsampled (and blurred) to the tile, into its part of the map."""
        t = self.tiles[index]
        self.total[t.main.slices()] += tile_map(scores, (t.main.width, t.main.height), self.spec)

    def result(self) -> np.ndarray:
        """The image map (H, W), overlaps averaged; in place, so call it once, after the last `add`."""
        if self.counts is not None:
            np.divide(self.total, self.counts, out=self.total)
        return self.total
