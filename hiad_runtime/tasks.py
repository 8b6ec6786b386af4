"""Tasks: which tiles each detector owns. Static tasks list their tiles; retrieval tasks own none
and receive tiles by nearest cluster centre at inference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hiad_runtime.geometry import Tiling


@dataclass(frozen=True)
class Task:
    name: str
    tiles: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "tiles": list(self.tiles)}

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        return cls(str(d["name"]), tuple(int(i) for i in d["tiles"]))


def task_of_tile(tasks: Sequence[Task], tiling: Tiling) -> list[str | None]:
    """For every tile, the name of the static task that owns it (None if routed at inference)."""
    owner: list[str | None] = [None] * len(tiling.tiles)
    for task in tasks:
        for i in task.tiles:
            if owner[i] is not None:
                raise ValueError(f"tile {i} belongs to both {owner[i]} and {task.name}")
            owner[i] = task.name
    return owner


def route(embeddings: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Retrieval routing: index of the nearest centre (L2) for each row of `embeddings` (N, D)."""
    d2 = (embeddings**2).sum(1, keepdims=True) - 2 * embeddings @ centres.T + (centres**2).sum(1)[None]
    return np.argmin(d2, axis=1)
