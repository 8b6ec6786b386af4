"""What an engine is: an RGB uint8 image at the bundle's image_size -> (anomaly map, image score, timings).

The Inspector decodes and resizes, hands the image to its engine, and turns what comes back into a
Result by the plan's thresholds (hiad_runtime/inspector.py). Engines differ only in how they compute
the map: stage by stage with the bundle's embedders and heads (`tiles`), or by the bundle's
whole-image graph in one call (`pipeline`). ("Engine" names only this choice: TensorRT engine files
are no part of a bundle.)
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from hiad_runtime.heads import HeadCache


class EngineKind(StrEnum):
    """tiles: stage by stage (the head path applies); pipeline: the bundle's whole-image graph, one run per image."""

    tiles = "tiles"
    pipeline = "pipeline"


class Engine(Protocol):
    """How an image at image_size becomes (anomaly map, score, timings); see the module docstring."""

    stages: tuple[str, ...]  # the keys of the timings it reports (seconds per stage)
    heads: "HeadCache | None"  # the task heads it keeps loaded, where it loads them one by one

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, float, dict[str, float]]:
        """(float32 map (H, W), score, seconds per stage) for an RGB uint8 image (H, W, 3) at image_size."""
        ...
