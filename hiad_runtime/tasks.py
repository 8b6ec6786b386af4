"""Tasks: which tiles each detector owns. Static tasks list their tiles; retrieval tasks own none
and receive tiles by nearest cluster centre at inference (hiad_runtime/plan.py: route)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from hiad_runtime.geometry import Tiling


@dataclass(frozen=True)
class Task:
    """One detector's task: its name and the tiles it owns (none for a retrieval task)."""

    name: str
    tiles: tuple[int, ...]

    def to_dict(self) -> dict:
        """The task as JSON."""
        return {"name": self.name, "tiles": list(self.tiles)}

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        """The task `to_dict` wrote."""
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
