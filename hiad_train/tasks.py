"""HiAD's task generators: how the tiles of an image are shared out among detectors.

Each generator is a config section (`tasks:` in the training YAML) registered under its `generator`
name; its `generate` turns the tiling and the training features into tasks. The config's choices and
their keys come from the registry (config.py builds `tasks:` from it), so adding a generator is one
class here: its keys, `@register_generator`, and `share` (or `generate` for tasks without fixed tiles).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from hiad_runtime.geometry import Tiling
from hiad_runtime.plan import routing_key
from hiad_runtime.tasks import Task, task_of_tile
from hiad_train.schema import Strict


def _numbered(groups: Sequence[Sequence[int]]) -> list[Task]:
    return [Task(f"task_{i}", tuple(sorted(g))) for i, g in enumerate(g for g in groups if len(g))]


def all_to_one(tiling: Tiling) -> list[Task]:
    """A2O: one detector for every tile."""
    return _numbered([[t.index for t in tiling.tiles]])


def one_to_one(tiling: Tiling) -> list[Task]:
    """O2O: one detector per tile."""
    return _numbered([[t.index] for t in tiling.tiles])


def neighborhood(tiling: Tiling, num_groups_width: int, num_groups_height: int | None = None) -> list[Task]:
    """Neighbourhoods of adjacent tiles: columns and rows split as evenly as possible, leftmost first."""
    gh = num_groups_width if num_groups_height is None else num_groups_height
    col_group = np.zeros(tiling.cols, int)
    for g, cols in enumerate(np.array_split(np.arange(tiling.cols), num_groups_width)):
        col_group[cols] = g
    row_group = np.zeros(tiling.rows, int)
    for g, rows in enumerate(np.array_split(np.arange(tiling.rows), gh)):
        row_group[rows] = g
    groups: dict[int, list[int]] = {}
    for t in tiling.tiles:
        groups.setdefault(int(row_group[t.row]) * num_groups_width + int(col_group[t.col]), []).append(t.index)
    return _numbered([groups[k] for k in sorted(groups)])


def labels_to_tasks(labels: Sequence[int]) -> list[Task]:
    """Tasks from a cluster label per tile, numbered by first appearance in raster order."""
    order = list(dict.fromkeys(int(x) for x in labels))
    return _numbered([[i for i, x in enumerate(labels) if x == lab] for lab in order])


def print_tasks(tasks: Sequence[Task], tiling: Tiling) -> str:
    """The text grid of HiAD's tutorial (tiles shifted to the border keep their row/column)."""
    owner = task_of_tile(tasks, tiling)
    width = max(len(n or "routed") for n in owner) + 2
    lines = [f"Row: {tiling.rows}, Column: {tiling.cols}, Patch Number: {len(tiling.tiles)}, Task Number: {len(tasks)}"]
    grid = [["" for _ in range(tiling.cols)] for _ in range(tiling.rows)]
    for t, name in zip(tiling.tiles, owner):
        grid[t.row][t.col] = name or "routed"
    for row in grid:
        lines.append("| " + " | ".join(n.center(width) for n in row) + " | ")
    return "\n".join(lines)


def tile_descriptors(embeddings: np.ndarray, resolution: int) -> np.ndarray:
    """Per tile (N, n_tiles, D, h, w) -> L2-normalized (n_tiles, D * r * r): the embedding averaged over
    images, then pooled to a resolution x resolution grid (SpatialClustering's view of a position)."""
    import torch
    import torch.nn.functional as F

    mean = torch.as_tensor(embeddings).float().mean(0)
    pooled = F.adaptive_avg_pool2d(mean, resolution).flatten(1).numpy()
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def spatial_clustering(
    embeddings: np.ndarray, cluster_number: int, feature_resolution: int = 1, seed: int = 0
) -> list[Task]:
    """k-means over per-position descriptors: visually similar positions share a detector."""
    from sklearn.cluster import KMeans

    desc = tile_descriptors(embeddings, feature_resolution)
    k = min(cluster_number, len(desc))
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(desc)
    return labels_to_tasks(labels)


def threshold_clustering(embeddings: np.ndarray, cluster_threshold: float, feature_resolution: int = 1) -> list[Task]:
    """Positions whose descriptors have cosine similarity above the threshold are linked (DBSCAN with
    min_samples=2 over cosine distance 1 - threshold); noise positions get a task each."""
    from sklearn.cluster import DBSCAN

    desc = tile_descriptors(embeddings, feature_resolution)
    labels = DBSCAN(eps=max(1.0 - cluster_threshold, 1e-9), min_samples=2, metric="cosine").fit_predict(desc)
    next_label = labels.max() + 1
    for i in np.flatnonzero(labels == -1):
        labels[i] = next_label
        next_label += 1
    return labels_to_tasks(labels)


def retrieve(embeddings: np.ndarray, cluster_number: int, seed: int = 0) -> tuple[list[Task], np.ndarray, np.ndarray]:
    """k-means over every (image, tile) key, ignoring position. Returns the tasks (which own no fixed
    tiles), the centres (k, D) used for routing at inference, and each (image, tile)'s cluster."""
    from sklearn.cluster import KMeans

    n_img, n_tiles = embeddings.shape[:2]
    keys = routing_key(embeddings).reshape(n_img * n_tiles, -1)
    k = min(cluster_number, len(keys))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(keys)
    centres = km.cluster_centers_.astype(np.float32)
    labels = km.labels_.reshape(n_img, n_tiles)
    return [Task(f"task_{i}", ()) for i in range(k)], centres, labels


@dataclass
class TaskAssignment:
    """How the training tiles are shared out: the tasks, per task the (image, tile) pairs it trains on,
    and the routing centres (k, D) of tasks that own no fixed tiles (retrieval; None otherwise)."""

    tasks: list[Task]
    pairs: dict[str, list[tuple[int, int]]]
    routing: np.ndarray | None = None


class TaskGenerator(Strict):
    """A task generator's config section; subclasses declare `generator: Literal[<name>]` and their keys."""

    def generate(self, tiling: Tiling, embeddings: np.ndarray, seed: int) -> TaskAssignment:
        """Tasks from the tiling and the training features (images, tiles, C, h, w) of the first embedder
        output; tasks owning fixed tiles train on those tiles of every image."""
        tasks = self.share(tiling, embeddings, seed)
        n_img = embeddings.shape[0]
        return TaskAssignment(tasks, {t.name: [(i, j) for i in range(n_img) for j in t.tiles] for t in tasks})

    def share(self, tiling: Tiling, embeddings: np.ndarray, seed: int) -> list[Task]:
        """The tasks, each owning fixed tiles."""
        raise NotImplementedError(f"{type(self).__name__} defines neither share nor generate")


GENERATORS: dict[str, type[TaskGenerator]] = {}


def register_generator(cls: type[TaskGenerator]) -> type[TaskGenerator]:
    """Class decorator: add a TaskGenerator under the name its `generator: Literal[...]` field declares."""
    field = cls.model_fields.get("generator")
    names = typing.get_args(field.annotation) if field is not None else ()
    if not (issubclass(cls, TaskGenerator) and len(names) == 1 and isinstance(names[0], str)):
        raise TypeError(f"{cls.__name__}: a TaskGenerator declaring `generator: Literal[<name>]`")
    if names[0] in GENERATORS and GENERATORS[names[0]] is not cls:
        first = GENERATORS[names[0]].__name__
        raise ValueError(f"task generator {names[0]!r} is registered twice ({first}, {cls.__name__})")
    GENERATORS[names[0]] = cls
    return cls


@register_generator
class A2O(TaskGenerator):
    """One detector for every tile."""

    generator: Literal["a2o"]

    def share(self, tiling: Tiling, embeddings: np.ndarray, seed: int) -> list[Task]:
        return all_to_one(tiling)


@register_generator
class O2O(TaskGenerator):
    """One detector per tile."""

    generator: Literal["o2o"]

    def share(self, tiling: Tiling, embeddings: np.ndarray, seed: int) -> list[Task]:
        return one_to_one(tiling)


@register_generator
class Neighborhood(TaskGenerator):
    """Neighbourhoods of adjacent tiles."""

    generator: Literal["neighborhood"]
    num_groups_width: int = Field(ge=1)
    num_groups_height: int | None = Field(None, ge=1)

    def share(self, tiling: Tiling, embeddings: np.ndarray, seed: int) -> list[Task]:
        return neighborhood(tiling, self.num_groups_width, self.num_groups_height)


@register_generator
class SpatialClustering(TaskGenerator):
    """Positions clustered by their mean training features (k-means)."""

    generator: Literal["spatial_clustering"]
    cluster_number: int = Field(ge=1)
    feature_resolution: int = Field(1, ge=1)

    def share(self, tiling: Tiling, embeddings: np.ndarray, seed: int) -> list[Task]:
        return spatial_clustering(embeddings, self.cluster_number, self.feature_resolution, seed)


@register_generator
class ThresholdClustering(TaskGenerator):
    """Positions linked by the cosine similarity of their mean training features."""

    generator: Literal["threshold_clustering"]
    cluster_threshold: float = Field(gt=0)
    feature_resolution: int = Field(1, ge=1)

    def share(self, tiling: Tiling, embeddings: np.ndarray, seed: int) -> list[Task]:
        return threshold_clustering(embeddings, self.cluster_threshold, self.feature_resolution)


@register_generator
class Retrieve(TaskGenerator):
    """Every (image, tile) clustered by its routing key, ignoring position; tiles are routed at inference."""

    generator: Literal["retrieve"]
    cluster_number: int = Field(ge=1)

    def generate(self, tiling: Tiling, embeddings: np.ndarray, seed: int) -> TaskAssignment:
        tasks, centres, labels = retrieve(embeddings, self.cluster_number, seed)
        pairs = {t.name: [tuple(p) for p in np.argwhere(labels == k)] for k, t in enumerate(tasks)}
        return TaskAssignment(tasks, pairs, centres)
