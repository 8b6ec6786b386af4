"""`hiad-train update`: normal images from the line join a memory-based model, without retraining.

A memory-based detector's learned state is a summary of the normal features it has seen, so new
normal images can be added to it by the rule training used (`Detector.add_normal`): PatchCore's bank
and the new patches re-subsampled by the same greedy coreset to the size its `percentage` gives for
every patch seen; PaDiM's per-position Gaussians updated from their running sums. The new images'
features are extracted as training extracts them (every tile, context fusion: `image_features`), and
each tile goes to the task that scores it at inference (a static task's own tiles, the nearest
centre for retrieval tasks); the thumbnail branch gets the images at its size. Detectors that learn by
training (networks) are refused by name before any work: new images need retraining there.

The decision rule (normalization, thresholds) is not recomputed: the updated model keeps its parent
bundle's (`adopt_decision_rule`), calibrated or not; `hiad-train calibrate` recomputes it on the line.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from hiad_runtime.bundle import Manifest
from hiad_runtime.image import resize_image
from hiad_train.detectors import get_detector
from hiad_train.detectors.registry import DETECTORS
from hiad_train.model import HRModel, embed
from hiad_train.trainer import image_features


class NeedsRetraining(ValueError):
    """The model's detector learns by training: new normal images cannot join it."""


def check_updatable(detector: str) -> None:
    """Refuse (NeedsRetraining, naming it) a detector that is not memory-based."""
    if not get_detector(detector).memory_based:
        memory = ", ".join(name for name, cls in DETECTORS.items() if cls.memory_based)
        raise NeedsRetraining(
            f"detector {detector!r} learns by training: new normal images need retraining "
            f"(hiad-train CONFIG --data DIR); update adds images to memory-based detectors only ({memory})"
        )


def update_model(model: HRModel, images: Sequence[np.ndarray], progress: bool = True) -> HRModel:
    """`model` with the normal `images` (RGB uint8 at its image size) added to every task's detector and
    the thumbnail's, in place; each training record says how much it has now seen. With no images (or a
    task that none of their tiles reach) a detector stays exactly as it was."""
    check_updatable(model.config.detector)
    per_task: dict[str, list[list[torch.Tensor]]] = {t.name: [] for t in model.tasks}
    for image in tqdm(images, desc="update: features", disable=not progress):
        features = [torch.from_numpy(f) for f in image_features(model, image)]
        for name, positions in model.assignments(features).items():
            if positions:
                per_task[name].append([f[positions] for f in features])
    seed = model.config.seed  # training's: every task's detector was fitted with it
    for task in tqdm(model.tasks, desc="update: tasks", disable=not progress):
        if per_task[task.name]:
            features = [torch.cat(scale) for scale in zip(*per_task.pop(task.name))]
            record = model.training[task.name]
            model.training[task.name] = model.detectors[task.name].add_normal(features, record, seed)
    thumb = model.thumbnail
    if thumb is not None and len(images):
        small = np.stack([resize_image(image, thumb.size) for image in images])
        features = embed(thumb.embedder, small, model.config.batch_size)
        thumb.training = thumb.detector.add_normal(features, thumb.training, seed)
    return model


def adopt_decision_rule(model: HRModel, parent: Manifest) -> None:
    """Give `model` its parent bundle's normalization and thresholds (what the line runs by, calibrated or
    not); refuse (ValueError) a parent whose tasks are not the model's: it was not exported from it."""
    names, theirs = [t.name for t in model.tasks], [t.name for t in parent.tasks]
    if names != theirs or (model.thumbnail is None) != (parent.thumbnail is None):
        raise ValueError(
            f"the bundle's tasks ({len(theirs)}, thumbnail: {parent.thumbnail is not None}) are not the "
            f"checkpoint's ({len(names)}, thumbnail: {model.thumbnail is not None}): not exported from it"
        )
    norms = {t.name: t.normalization for t in parent.tasks}
    model.task_normalization = None if all(n is None for n in norms.values()) else norms
    if model.thumbnail is not None:
        model.thumbnail.normalization = parent.thumbnail.normalization
    model.thresholds = parent.thresholds
