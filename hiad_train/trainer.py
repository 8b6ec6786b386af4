"""HRTrainer (HiAD's training stage): decode each training image once, embed all its tiles in
batches, form tasks, fit one detector per task (and the optional thumbnail detector), validate.

The two naturally parallel stages, the feature pass over batches of images and the per-task fits,
are `extract_features` and `fit_task`, run by an executor (hiad_train/executors.py): in this
process, or on a Ray cluster. Each task's detector is seeded from the config seed alone and hands
back its state as safetensors bytes, so where a task ran never changes the checkpoint.

Memory: every image's features are held once (images x tiles x one tile's features: 537 MB per
training image at 8192^2 with configs/demo.yaml), each image is embedded `STREAM_TILES` tiles at a
time, and each task's own copy of its training features is gathered only when the executor reaches
that task (`TaskInputsList`). Before, the features were held three times at once (per image, stacked,
and every task's copy), docs/benchmarks.md ("Training at 8192^2").
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from tqdm import tqdm

from hiad_runtime.geometry import Tiling, as_size, split
from hiad_runtime.image import resize_image
from hiad_runtime.postprocess import PostprocessSpec
from hiad_runtime.streaming import chunks
from hiad_train.config import TrainConfig
from hiad_train.data.samples import HRSample
from hiad_train.detectors import DetectorConfig, TaskData, get_detector
from hiad_train.detectors.base import Synthesizer
from hiad_train.device import CPU, placed, resolve_devices
from hiad_train.evaluation import Evaluator, default_evaluators, evaluate
from hiad_train.executors import LocalExecutor, Stage, local_executor
from hiad_train.model import STREAM_TILES, HRModel, Thumbnail, embed
from hiad_train.synthesis import SynthesizerConfig
from hiad_train.validation import TaskValidation, TaskValidator, split_validation, validate


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


@dataclass
class FeaturePass:
    """What every feature-extraction task shares: the model so far (tiling, embedder, fusion) and what
    else each image must yield."""

    model: HRModel
    keep_tiles: bool  # the detector trains on the tiles themselves
    thumbnail_size: tuple[int, int] | None  # the image at this size, for the thumbnail detector
    device: torch.device = CPU  # where the embedder runs (the executor sets its worker's)


@dataclass
class ImageFeatures:
    features: list[np.ndarray]  # per embedder output: (tiles, C, h, w), context-fused
    tiles: np.ndarray | None  # (tiles, H, W, 3) uint8
    thumbnail: np.ndarray | None  # the image at thumbnail size


def image_features(model: HRModel, image: np.ndarray) -> list[np.ndarray]:
    """Per embedder output, the fused features (tiles, C, h, w) of every tile, embedded `STREAM_TILES`
    tiles at a time into one array (all tiles in one call held them twice, and a full batch's activations)."""
    out: list[np.ndarray] = []
    for ids in chunks(len(model.tiling.tiles), STREAM_TILES):
        for scale, f in enumerate(model.tile_embeddings(image, ids)):
            if scale == len(out):
                out.append(np.empty((len(model.tiling.tiles), *f.shape[1:]), np.float32))
            out[scale][ids[0] : ids[-1] + 1] = f.numpy()
    return out


def extract_features(shared: FeaturePass, samples: list[HRSample]) -> list[ImageFeatures]:
    """Decode each image once (from its path) and embed all its tiles on the pass's device (features on the CPU)."""
    out = []
    with placed(shared.model.embedder, shared.device):
        for sample in samples:
            image = sample.image(shared.model.tiling.image_size)
            out.append(
                ImageFeatures(
                    image_features(shared.model, image),
                    split(image, shared.model.tiling.tiles) if shared.keep_tiles else None,
                    resize_image(image, shared.thumbnail_size) if shared.thumbnail_size is not None else None,
                )
            )
    return out


@dataclass
class FitShared:
    """What every task fit shares."""

    detector: str  # registry name
    config: DetectorConfig
    embedder: torch.nn.Module
    synthesizer: Synthesizer
    seed: int
    progress: bool  # the detector's own (epoch) progress bars
    device: torch.device = CPU  # where the fit runs (the executor sets its worker's)


@dataclass
class TaskInputs:
    """One task's own training data."""

    features: list[torch.Tensor]
    tiles: np.ndarray | None
    validate: TaskValidator | None


class TaskInputsList(Sequence[TaskInputs]):
    """Every task's TaskInputs, each gathered from the shared features when it is read: the executor
    holds one task's copy at a time instead of all tasks' (a second copy of every feature in O2O)."""

    def __init__(
        self, tasks: list, pairs: dict, features: list[torch.Tensor], tiles: np.ndarray | None, validation, spec
    ):
        self.tasks, self.pairs, self.features, self.tiles = tasks, pairs, features, tiles
        self.validation, self.spec = validation, spec

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, k: int) -> TaskInputs:
        name = self.tasks[k].name
        rows = np.asarray(self.pairs[name])
        return TaskInputs(
            features=[f[rows[:, 0], rows[:, 1]] for f in self.features],
            tiles=np.stack([self.tiles[i][j] for i, j in rows]) if self.tiles is not None else None,
            validate=None if self.validation is None else self.validation.validator(name, self.spec),
        )


@dataclass
class FittedTask:
    state: bytes  # safetensors of Detector.state()
    record: dict  # the detector's training record


def fit_task(shared: FitShared, task: TaskInputs) -> FittedTask:
    """Fit one task's detector from the config seed alone, whatever ran before in this process, on the
    fit's device; its state comes back to the CPU (the checkpoint's format whatever the device)."""
    seed_everything(shared.seed)
    detector = get_detector(shared.detector)(shared.config, seed=shared.seed)
    with placed(shared.embedder, shared.device) as embedder:
        features = [f.to(shared.device) for f in task.features]
        data = TaskData(features, task.tiles, embedder, shared.synthesizer, task.validate, shared.seed, shared.device)
        record = detector.fit(data, progress=shared.progress)
    return FittedTask(save_tensors({k: v.detach().cpu().contiguous() for k, v in detector.state().items()}), record)


def stack_features(images: list[ImageFeatures]) -> list[torch.Tensor]:
    """Per embedder output, (images, tiles, C, h, w); each image's array is released as it is copied,
    so the features are held once, plus one image's."""
    stacked = []
    for scale in range(len(images[0].features)):
        out = np.empty((len(images), *images[0].features[scale].shape), np.float32)
        for i, im in enumerate(images):
            out[i] = im.features[scale]
            im.features[scale] = None
        stacked.append(torch.from_numpy(out))
    return stacked


class HRTrainer:
    """Trains an HRModel from a TrainConfig (https://github.com/cnulab/HiAD's training stage)."""

    def __init__(self, config: TrainConfig, progress: bool = True, executor: LocalExecutor | None = None):
        """Resolves `config.device` first: a GPU this machine lacks is refused (DeviceError) before any work.
        Without an `executor`, one process on one device, or one worker process per device."""
        self.config = config
        self.progress = progress
        self.devices = resolve_devices(config.device)
        self.detector_cls = get_detector(config.detector)
        self.executor = executor or local_executor(self.devices)

    def _training_synthesizer(self):
        """Anomalies for detectors trained on tiles: the validation synthesizer's kind, always applied."""
        val = self.config.val_config
        cfg = val.anomaly_syn_fn if val is not None else SynthesizerConfig(name="image_blending")
        return cfg.model_copy(update={"p": 1.0}).build()

    def fit(self, samples: Sequence[HRSample]) -> HRModel:
        """Train HiAD on `samples` (normal images) and return the model, normalized and thresholded.

        In order: hold out the validation images (val_config), embed every tile, share the tiles out
        among tasks (the `tasks:` generator), build the validation tiles with synthetic anomalies, fit
        one detector per task (through the executor: here or on Ray, the same numbers either way), fit
        the thumbnail detector, then calibrate normalization and thresholds on the held-out images.
        Every task's detector is seeded from `config.seed` alone, so the result is reproducible."""
        cfg = self.config
        if not samples:
            raise ValueError("no training samples")
        seed_everything(cfg.seed)
        val_samples = []
        if cfg.val_config is not None:
            samples, val_samples = split_validation(list(samples), cfg.val_config.val_sample_ratio, cfg.seed)
        tiling = Tiling.create(cfg.image_size, cfg.patch_size, cfg.stride, cfg.ds_factors)
        model = HRModel(
            cfg,
            tiling,
            [],
            self.detector_cls.build_embedder(cfg.patch),
            {},
            PostprocessSpec(**self.detector_cls.postprocess),
        )
        device = self.devices.main  # this process's own work: validation features, the thumbnail, validation
        features, tiles, thumbnails = self._feature_pass(model, samples)
        assignment = cfg.tasks.generate(tiling, features[0].numpy(), cfg.seed)
        model.tasks, model.routing, pairs = assignment.tasks, assignment.routing, assignment.pairs
        synthesizer = self._training_synthesizer()
        validation = None
        if val_samples:
            with placed(model.embedder, device):
                validation = TaskValidation.build(model, val_samples, cfg.val_config, cfg.seed)
        for task in model.tasks:
            if not pairs[task.name]:
                raise ValueError(f"{task.name} has no training tiles")
        inputs = TaskInputsList(model.tasks, pairs, features, tiles, validation, model.postprocess)
        shared = FitShared(
            cfg.detector,
            cfg.patch,
            model.embedder,
            synthesizer,
            cfg.seed,
            self.progress and self.executor.in_process,
            device,
        )
        stage = Stage(
            "tasks",
            fit_task,
            shared,
            inputs,
            [t.name for t in model.tasks],
            cfg.distributed.fit,
            cfg.distributed.max_retries,
        )
        for task, fitted in zip(model.tasks, self.executor.fit(stage, self.progress)):
            model.detectors[task.name] = self.detector_cls.from_state(cfg.patch, load_tensors(fitted.state))
            model.training[task.name] = fitted.record
        if cfg.thumbnail is not None:
            model.thumbnail = self._fit_thumbnail(np.stack(thumbnails), synthesizer, device)
        if val_samples:
            with model.placed(device):
                validate(model, val_samples, cfg.val_config, cfg.seed)
        return model

    def _feature_pass(self, model: HRModel, samples: Sequence[HRSample]):
        """Per embedder output (images, tiles, C, h, w); the tiles (images, tiles, H, W, 3) when the detector
        trains on them; the images at thumbnail size when there is a thumbnail branch."""
        cfg = self.config
        size = None if cfg.thumbnail is None else as_size(cfg.thumbnail.thumbnail_size, "thumbnail_size")
        per_task = cfg.distributed.images_per_task
        batches = [list(samples[i : i + per_task]) for i in range(0, len(samples), per_task)]
        labels = [f"images {i}-{i + len(b) - 1}" for i, b in zip(range(0, len(samples), per_task), batches)]
        stage = Stage(
            "features",
            extract_features,
            FeaturePass(model, self.detector_cls.needs_tiles, size, self.devices.main),
            batches,
            labels,
            cfg.distributed.features,
            cfg.distributed.max_retries,
        )
        images = [im for batch in self.executor.extract(stage, self.progress) for im in batch]
        tiles = np.stack([im.tiles for im in images]) if images[0].tiles is not None else None
        return stack_features(images), tiles, [im.thumbnail for im in images]

    def _fit_thumbnail(self, small: np.ndarray, synthesizer, device: torch.device) -> Thumbnail:
        """The thumbnail detector, fitted here on `device` (one detector: nothing to share out), kept on the CPU."""
        cfg = self.config.thumbnail
        size = as_size(cfg.thumbnail_size, "thumbnail_size")
        embedder = self.detector_cls.build_embedder(cfg)
        seed_everything(self.config.seed)  # as every task: independent of where the tasks ran
        det = self.detector_cls(cfg, seed=self.config.seed)
        with placed(embedder, device):
            data = TaskData(
                [f.to(device) for f in embed(embedder, small, self.config.batch_size)],
                small if self.detector_cls.needs_tiles else None,
                embedder,
                synthesizer,
                None,
                self.config.seed,
                device,
            )
            record = det.fit(data, progress=self.progress)
        return Thumbnail(size, embedder, det.to(CPU), training=record)

    def predict(self, model: HRModel, samples: Sequence[HRSample]) -> Predictions:
        """The model's maps and scores of `samples`, computed on this trainer's main device."""
        scores, labels, maps, masks = [], [], [], []
        with model.placed(self.devices.main):
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
