"""The validation set: held-out training images with synthetic anomalies. It gives each task its
min-max normalization (validation scores span [0, 1]), the image and pixel thresholds (by false-alarm rate on
the held-out images as they are, or F1 on their synthetic anomalies; see thresholds.py), validation
metrics, and, for detectors trained over epochs, the held-out tiles of each task that their epoch loop
(components/epochs.py) selects the checkpoint on."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from hiad_runtime.geometry import Tiling
from hiad_runtime.postprocess import Normalization, PostprocessSpec, finish, tile_map
from hiad_train.config import ValConfig
from hiad_train.evaluation import aupro, evaluate, image_auroc, pixel_metrics
from hiad_train.thresholds import f1_threshold, false_alarm_thresholds


def split_validation(samples: list, ratio: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded `ratio` of the images held out, at least one on each side."""
    if len(samples) < 2:
        raise ValueError("val_config needs at least 2 training images (one is held out for validation)")
    n_val = min(max(1, round(len(samples) * ratio)), len(samples) - 1)
    order = np.random.default_rng(seed).permutation(len(samples))
    val = set(order[:n_val].tolist())
    return [s for i, s in enumerate(samples) if i not in val], [s for i, s in enumerate(samples) if i in val]


def synthesize_tiles(image: np.ndarray, tiling: Tiling, synthesizer, rng: np.random.Generator):
    """Each tile of the image gets its own synthetic anomaly (with the synthesizer's probability);
    returns the altered image and its exact anomaly mask."""
    out = image.copy()
    mask = np.zeros(image.shape[:2], bool)
    for t in tiling.tiles:
        patch, m = synthesizer(out[t.main.slices()], rng)
        out[t.main.slices()] = patch
        mask[t.main.slices()] |= m
    return out, mask


EVALUATORS = {"image_auroc": image_auroc, "pixel_metrics": pixel_metrics, "aupro": aupro}


def min_max_normalization(
    records: list, thumbs: list, tasks: list[str], mode: str = "global"
) -> tuple[dict[str, Normalization], Normalization | None]:
    """Per task, a min-max of raw scores in `records` ((task, tile, grid, ...)): of all records for
    every task ('global'), or of the task's own ('per_task'; a task no record reached gets the
    global one). The thumbnail's from its raw grids (None without any): another resolution, its own scale."""
    all_values = np.concatenate([r[2].ravel() for r in records])
    overall = Normalization(float(all_values.min()), float(all_values.max()))
    norms = {}
    for task in tasks:
        values = [r[2] for r in records if r[0] == task] if mode == "per_task" else []
        norms[task] = (
            Normalization(float(min(v.min() for v in values)), float(max(v.max() for v in values)))
            if values
            else overall
        )
    thumb = Normalization(float(min(t.min() for t in thumbs)), float(max(t.max() for t in thumbs))) if thumbs else None
    return norms, thumb


def validate(model, val_samples: list, cfg: ValConfig, seed: int = 0) -> None:
    """Fill model.task_normalization, the thumbnail's normalization,
    model.thresholds (with the rule that set them) and model.validation."""
    rng = np.random.default_rng(seed)
    synth = cfg.anomaly_syn_fn.build()
    tiling = model.tiling
    records, thumbs = [], []  # (task, tile, raw grid, mask crop); (raw thumbnail grid)
    for sample in val_samples:
        image, mask = synthesize_tiles(sample.image(tiling.image_size), tiling, synth, rng)
        for task, i, grid in model.raw_tile_scores(image):
            records.append((task, i, grid, mask[tiling.tiles[i].main.slices()]))
        if model.thumbnail is not None:
            thumbs.append(model.thumbnail.raw_scores(image))
    if cfg.max_patch_number is not None and len(records) > cfg.max_patch_number:
        keep = sorted(rng.choice(len(records), cfg.max_patch_number, replace=False))
        records = [records[k] for k in keep]

    norms, thumb_norm = min_max_normalization(records, thumbs, [t.name for t in model.tasks], cfg.normalization)
    model.task_normalization = norms
    if model.thumbnail is not None:
        model.thumbnail.normalization = thumb_norm

    spec = model.postprocess
    maps, scores, masks = [], [], []
    for name, i, grid, m in records:
        tile = tiling.tiles[i].main
        patch_map, score = finish(tile_map(norms[name](grid), (tile.width, tile.height), spec), spec)
        maps.append(patch_map)
        scores.append(score)
        masks.append(m)
    labels = np.array([m.any() for m in masks])
    if cfg.threshold.mode == "f1":
        rule = {
            "rule": "f1",
            "on": "validation tiles with synthetic anomalies",
            "images": len(val_samples),
            "tiles": len(records),
            "anomalous_tiles": int(labels.sum()),
        }
        model.thresholds = {
            "image": f1_threshold(np.array(scores), labels),
            "pixel": f1_threshold(
                np.concatenate([p.ravel() for p in maps]), np.concatenate([m.ravel() for m in masks])
            ),
            "rules": {"image": rule, "pixel": rule},
        }
    else:  # the held-out images as they are (normal), through the whole model
        normal_maps = [model.predict(s.image(tiling.image_size))[0] for s in val_samples]
        model.thresholds = false_alarm_thresholds(normal_maps, tiling, spec, cfg.threshold.rate, seed)
    evaluators = [partial(EVALUATORS[e], resize=None) if e != "image_auroc" else EVALUATORS[e] for e in cfg.evaluators]
    metrics = evaluate(np.array(scores), labels.astype(int), maps, masks, evaluators)
    model.validation = {"images": len(val_samples), "patches": len(records), "anomalous": int(labels.sum()), **metrics}


def tile_metrics(grids, masks, tile_sizes, spec: PostprocessSpec) -> dict:
    """Image AUROC (a tile is anomalous when its mask has any pixel) and pixel metrics of raw score
    grids, each post-processed as a tile of its own."""
    maps, scores = [], []
    for grid, size in zip(grids, tile_sizes):
        m, s = finish(tile_map(grid, size, spec), spec)
        maps.append(m)
        scores.append(s)
    labels = np.array([m.any() for m in masks]).astype(int)
    return evaluate(np.array(scores), labels, maps, list(masks), [image_auroc, partial(pixel_metrics, resize=None)])


@dataclass
class TaskValidation:
    """Held-out tiles with synthetic anomalies, grouped by task, for per-epoch checkpoint selection.

    Built once before the tasks train: each validation image gets its synthetic anomalies (fixed seed),
    its tiles are embedded and assigned to tasks exactly as at inference."""

    features: dict[str, list]  # task -> per embedder output (M, C, h, w)
    masks: dict[str, list[np.ndarray]]  # task -> M masks at tile size
    sizes: dict[str, list[tuple[int, int]]]

    @classmethod
    def build(cls, model, val_samples: list, cfg: ValConfig, seed: int) -> "TaskValidation":
        import torch

        rng = np.random.default_rng(seed + 1)
        synth = cfg.anomaly_syn_fn.build()
        tiling = model.tiling
        feats: dict[str, list] = {t.name: [] for t in model.tasks}
        masks: dict[str, list] = {t.name: [] for t in model.tasks}
        for sample in val_samples:
            image, mask = synthesize_tiles(sample.image(tiling.image_size), tiling, synth, rng)
            features = model.tile_embeddings(image)
            for name, ids in model.assignments(features).items():
                for i in ids:
                    feats[name].append([f[i] for f in features])
                    masks[name].append(mask[tiling.tiles[i].main.slices()])
        stacked = {n: [torch.stack(col) for col in zip(*rows)] for n, rows in feats.items() if rows}
        sizes = {n: [(m.shape[1], m.shape[0]) for m in ms] for n, ms in masks.items()}
        return cls(stacked, masks, sizes)

    def validator(self, task: str, spec: PostprocessSpec) -> "TaskValidator | None":
        """The TaskData.validate callback of one task (None when no validation tile reached it)."""
        if task not in self.features:
            return None
        return TaskValidator(self.features[task], self.masks[task], self.sizes[task], spec)


@dataclass
class TaskValidator:
    """Validation metrics of a detector's current state on one task's held-out tiles; holds that task's
    data only, so it travels light to wherever the task trains."""

    features: list
    masks: list[np.ndarray]
    sizes: list[tuple[int, int]]
    spec: PostprocessSpec

    def __call__(self, detector) -> dict:
        grids = detector.score(self.features).numpy()
        return tile_metrics(grids, self.masks, self.sizes, self.spec)
