"""HiAD's task generators: how the tiles of an image are shared out among detectors."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hiad_runtime.geometry import Tiling
from hiad_runtime.tasks import Task, task_of_tile


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


def spatial_clustering(embeddings: np.ndarray, cluster_number: int, feature_resolution: int = 1, seed: int = 0) -> list[Task]:
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


def routing_descriptors(embeddings) -> np.ndarray:
    """The retrieval key of each tile: its embedding averaged over the grid, L2-normalized (N, D).
    The runtime computes the same from the exported embedder's output."""
    flat = np.asarray(embeddings, np.float32).mean(axis=(-2, -1))
    return flat / np.maximum(np.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)


def retrieve(embeddings: np.ndarray, cluster_number: int, seed: int = 0) -> tuple[list[Task], np.ndarray, np.ndarray]:
    """k-means over every (image, tile) key, ignoring position. Returns the tasks (which own no fixed
    tiles), the centres (k, D) used for routing at inference, and each (image, tile)'s cluster."""
    from sklearn.cluster import KMeans

    n_img, n_tiles = embeddings.shape[:2]
    keys = routing_descriptors(embeddings).reshape(n_img * n_tiles, -1)
    k = min(cluster_number, len(keys))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(keys)
    centres = km.cluster_centers_.astype(np.float32)
    labels = km.labels_.reshape(n_img, n_tiles)
    return [Task(f"task_{i}", ()) for i in range(k)], centres, labels
