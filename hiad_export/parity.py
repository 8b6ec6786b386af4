"""Parity: the runtime must reproduce PyTorch inference of the same checkpoint on the same images.

Compared on the final anomaly map (after gather and blur) and the image score. The error is
measured relative to the PyTorch map's range (max - min) so the tolerance means the same thing for
any detector's score scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from hiad_runtime.inspector import Inspector

DEFAULT_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    pass


@dataclass(frozen=True)
class ParityReport:
    path: str  # which runtime head path: "onnx" (every head's graph) or "native" (e.g. faiss for k-NN)
    images: int
    max_abs_map_diff: float
    map_range: float
    max_rel_map_diff: float
    max_rel_score_diff: float
    tolerance: float
    enforced: bool  # False for approximate native paths (e.g. IVF indexes): their deviation is the accuracy cost

    @property
    def passed(self) -> bool:
        return self.max_rel_map_diff <= self.tolerance and self.max_rel_score_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def max_abs_diff(a: np.ndarray, b: np.ndarray, rows: int = 256) -> float:
    """max |a - b| over maps of the same shape, `rows` rows at a time (no image-sized temporary: 268 MB at 8192^2)."""
    return max(float(np.abs(a[r : r + rows] - b[r : r + rows]).max()) for r in range(0, len(a), rows))


def measure(
    reference: Sequence[tuple[np.ndarray, float]],
    inspector: Inspector,
    images: Sequence[np.ndarray],
    path: str,
    tolerance: float,
    enforced: bool,
) -> ParityReport:
    abs_diff, rel_diff, rel_score, ranges = [], [], [], []
    for (ref_map, ref_score), image in zip(reference, images, strict=True):
        result = inspector.predict(image)
        span = float(ref_map.max() - ref_map.min()) or 1.0
        d = max_abs_diff(result.anomaly_map, ref_map)
        abs_diff.append(d)
        ranges.append(span)
        rel_diff.append(d / span)
        rel_score.append(abs(result.score - ref_score) / span)
    return ParityReport(
        path, len(images), max(abs_diff), min(ranges), max(rel_diff), max(rel_score), tolerance, enforced
    )
