"""HRTrainer (HiAD's training stage): decode each training image once, embed all its tiles in
batches, form tasks, fit one detector per task (and the optional thumbnail detector), validate."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from hiad_runtime.geometry import Tiling, as_size, split
from hiad_runtime.image import resize_image
from hiad_runtime.postprocess import PostprocessSpec
from hiad_train import tasks as generators
from hiad_train.config import SynthesizerConfig, TrainConfig
from hiad_train.data.samples import HRSample
from hiad_train.detectors import TaskData, get_detector
from hiad_train.evaluation import Evaluator, default_evaluators, evaluate
from hiad_train.model import HRModel, Thumbnail, embed
from hiad_train.validation import TaskValidation, make_synthesizer, split_validation, validate


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Predictions:
    scores: np.ndarray
    labels: np.ndarray
    maps: list[np.ndarray]
    masks: list[np.ndarray]


class HRTrainer:
    """Trains an HRModel from a TrainConfig (https://github.com/cnulab/HiAD's training stage)."""

    def __init__(self, config: TrainConfig, progress: bool = True):
        self.config = config
        self.progress = progress
        self.detector_cls = get_detector(config.detector)

    def _plan_tasks(self, tiling: Tiling, embeddings: np.ndarray):
        """Tasks, optional retrieval centres, and per task the (image, tile) pairs it trains on."""
        spec, n_img = self.config.tasks, embeddings.shape[0]
        if spec.generator == "retrieve":
            tasks, centres, labels = generators.retrieve(embeddings, spec.cluster_number, self.config.seed)
            pairs = {t.name: [tuple(p) for p in np.argwhere(labels == k)] for k, t in enumerate(tasks)}
            return tasks, centres, pairs
        if spec.generator == "a2o":
            tasks = generators.all_to_one(tiling)
        elif spec.generator == "o2o":
            tasks = generators.one_to_one(tiling)
        elif spec.generator == "neighborhood":
            tasks = generators.neighborhood(tiling, spec.num_groups_width, spec.num_groups_height)
        elif spec.generator == "spatial_clustering":
            tasks = generators.spatial_clustering(embeddings, spec.cluster_number, spec.feature_resolution, self.config.seed)
        else:
            tasks = generators.threshold_clustering(embeddings, spec.cluster_threshold, spec.feature_resolution)
        pairs = {t.name: [(i, j) for i in range(n_img) for j in t.tiles] for t in tasks}
        return tasks, None, pairs

    def _training_synthesizer(self):
        """Anomalies for detectors trained on tiles: the validation synthesizer's kind, always applied."""
        val = self.config.val_config
        cfg = val.anomaly_syn_fn if val is not None else SynthesizerConfig(name="image_blending")
        return make_synthesizer(cfg.model_copy(update={"p": 1.0}))

    def fit(self, samples: Sequence[HRSample]) -> HRModel:
        cfg = self.config
        if not samples:
            raise ValueError("no training samples")
        seed_everything(cfg.seed)
        val_samples = []
        if cfg.val_config is not None:
            samples, val_samples = split_validation(list(samples), cfg.val_config.val_sample_ratio, cfg.seed)
        tiling = Tiling.create(cfg.image_size, cfg.patch_size, cfg.stride, cfg.ds_factors)
        model = HRModel(
            cfg, tiling, [], self.detector_cls.build_embedder(cfg.patch), {}, PostprocessSpec(**self.detector_cls.postprocess)
        )
        needs_tiles = self.detector_cls.needs_tiles
        features: list[torch.Tensor] = []  # per embedder output: (images, tiles, C, h, w)
        tiles, images = [], []
        for n, sample in enumerate(tqdm(samples, desc="features", disable=not self.progress)):
            image = sample.image(tiling.image_size)  # decoded once, shared by every task
            for scale, f in enumerate(model.tile_embeddings(image)):
                if n == 0:
                    features.append(torch.empty((len(samples), *f.shape)))
                features[scale][n] = f
            if needs_tiles:
                tiles.append(split(image, tiling.tiles))
            if cfg.thumbnail is not None:
                images.append(image)
        model.tasks, model.routing, pairs = self._plan_tasks(tiling, features[0].numpy())
        synthesizer = self._training_synthesizer()
        validation = TaskValidation.build(model, val_samples, cfg.val_config, cfg.seed) if val_samples else None
        for task in tqdm(model.tasks, desc="tasks", disable=not self.progress):
            if not pairs[task.name]:
                raise ValueError(f"{task.name} has no training tiles")
            rows = np.asarray(pairs[task.name])
            data = TaskData(
                features=[f[rows[:, 0], rows[:, 1]] for f in features],
                tiles=np.stack([tiles[i][j] for i, j in rows]) if needs_tiles else None,
                embedder=model.embedder,
                synthesizer=synthesizer,
                validate=None if validation is None else validation.validator(task.name, model.postprocess),
                seed=cfg.seed,
            )
            det = self.detector_cls(cfg.patch, seed=cfg.seed)
            model.training[task.name] = det.fit(data, progress=self.progress)
            model.detectors[task.name] = det
        if cfg.thumbnail is not None:
            model.thumbnail = self._fit_thumbnail(images, synthesizer)
        if val_samples:
            validate(model, val_samples, cfg.val_config, cfg.seed)
        return model

    def _fit_thumbnail(self, images: list[np.ndarray], synthesizer) -> Thumbnail:
        cfg = self.config.thumbnail
        size = as_size(cfg.thumbnail_size, "thumbnail_size")
        embedder = self.detector_cls.build_embedder(cfg)
        small = np.stack([resize_image(im, size) for im in images])
        data = TaskData(embed(embedder, small, self.config.batch_size), small if self.detector_cls.needs_tiles else None,
                        embedder, synthesizer, None, self.config.seed)
        det = self.detector_cls(cfg, seed=self.config.seed)
        record = det.fit(data, progress=self.progress)
        return Thumbnail(size, embedder, det, training=record)

    def predict(self, model: HRModel, samples: Sequence[HRSample]) -> Predictions:
        scores, labels, maps, masks = [], [], [], []
        for sample in tqdm(samples, desc="inference", disable=not self.progress):
            amap, score = model.predict(sample.image(model.tiling.image_size))
            scores.append(score)
            labels.append(sample.label)
            maps.append(amap)
            masks.append(sample.mask(model.tiling.image_size))
        return Predictions(np.asarray(scores), np.asarray(labels), maps, masks)

    def evaluate(self, model: HRModel, samples: Sequence[HRSample], evaluators: Sequence[Evaluator] | None = None):
        preds = self.predict(model, samples)
        evaluators = evaluators or default_evaluators(self.config.evaluation.resize)
        return evaluate(preds.scores, preds.labels, preds.maps, preds.masks, evaluators), preds
