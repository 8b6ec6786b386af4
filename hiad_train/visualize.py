"""Task maps: which detector owns which tile, drawn over a sample image. (Overlays: hiad_runtime.overlay.)"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from hiad_runtime.geometry import Tiling
from hiad_runtime.tasks import Task, task_of_tile


def task_map(tasks: Sequence[Task], tiling: Tiling, image: np.ndarray) -> np.ndarray:
    """The sample image with each tile tinted by its task's colour and labelled with the task name."""
    owner = task_of_tile(tasks, tiling)
    names = sorted(set(n or "routed" for n in owner), key=lambda n: (len(n), n))
    rng = np.random.default_rng(0)
    colours = {n: tuple(int(c) for c in rng.integers(40, 255, 3)) for n in names}
    out = image.copy()
    tint = np.zeros_like(image)
    for t, n in zip(tiling.tiles, owner):
        tint[t.main.slices()] = colours[n or "routed"]
    out = cv2.addWeighted(out, 0.6, tint, 0.4, 0)
    thick = max(1, image.shape[0] // 500)
    for t, n in zip(tiling.tiles, owner):
        b = t.main
        cv2.rectangle(out, (b.x, b.y), (b.x + b.width - 1, b.y + b.height - 1), (255, 255, 255), thick)
        cv2.putText(
            out,
            n or "routed",
            (b.x + 8, b.y + b.height // 2),
            cv2.FONT_HERSHEY_SIMPLEX,
            b.width / 250,
            (255, 255, 255),
            2 * thick,
        )
    return out
