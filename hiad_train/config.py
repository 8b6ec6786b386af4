"""Training configuration: YAML data with HiAD's key names, validated on load.

Every section forbids unknown keys, and the error names the bad key with its path and the closest
valid spelling, e.g. `patch.percentge: unknown key (did you mean 'percentage'?)`. Sizes and ranges
are checked on load, before any data is read: a key repeated in the YAML, a non-positive size, a
geometry that cannot be tiled, or one whose memory need per image is unreasonable is refused by name.
"""

from __future__ import annotations

import difflib
import functools
import typing
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, create_model, model_validator

from hiad_runtime.geometry import Tiling, as_size, tiles_along
from hiad_train.detectors import DETECTORS, get_detector
from hiad_train.device import check_device_spec
from hiad_train.schema import SizeSpec, Strict
from hiad_train.synthesis import SynthesizerConfig
from hiad_train.tasks import A2O, GENERATORS

# Bytes per pixel of one image in the pipeline: decoded RGB uint8 (3) + the float32 map and its
# blurred copy (8); the stacked tile crops (3 per tile pixel) come on top.
PIPELINE_BYTES_PER_PIXEL = 11
MAX_IMAGE_BYTES = 8 << 30  # refuse a geometry needing more than this per image


class ConfigError(ValueError):
    """A configuration that does not validate; the message names every bad key."""


# `tasks:` is one of the registered task generators' sections, told apart by its `generator` key.
TaskConfig = Annotated[Union[tuple(GENERATORS.values())], Field(discriminator="generator")]


class NormalizationMode(StrEnum):
    """How validation (and calibration) min-max normalize the raw scores of the tasks."""

    GLOBAL = "global"  # one min-max over every task's scores: tasks keep their relative scale
    PER_TASK = "per_task"  # HiAD's: each task's own min-max


class ThresholdConfig(Strict):
    """How the image and pixel thresholds are set from the validation set."""

    mode: Literal["false_alarm_rate", "f1"] = "false_alarm_rate"  # f1: best F1 on the synthetic anomalies
    rate: float = Field(0.01, gt=0, lt=1)  # false_alarm_rate: share of normal images flagged (decision, any mask pixel)


class ValConfig(Strict):
    """HiAD's val_config: a validation set of held-out training images with synthetic anomalies."""

    anomaly_syn_fn: SynthesizerConfig = SynthesizerConfig()
    val_sample_ratio: float = Field(0.2, gt=0, lt=1)
    max_patch_number: int | None = Field(200, ge=1)
    evaluators: list[Literal["image_auroc", "pixel_metrics", "aupro"]] = ["image_auroc", "pixel_metrics"]
    threshold: ThresholdConfig = ThresholdConfig()
    # global: one min-max over every task's validation scores, so tasks keep their relative scale (the
    # default: per-task min-max from a few held-out tiles cost 0.08-0.42 image AUROC on 6 of the 7 sets
    # of docs/quality.md); per_task: HiAD's, each task's own min-max (detectors whose scales differ by task)
    normalization: NormalizationMode = NormalizationMode.GLOBAL


class EvaluationConfig(Strict):
    resize: int | None = Field(512, ge=1)  # pixel metrics at this resolution (None = full)
    overlays: bool = True


class TaskResources(Strict):
    """What one feature batch or task fit uses: PyTorch threads (int(num_cpus), here and on Ray, so that
    results match bit for bit), and what its Ray task reserves on a node (with `hiad-train --ray`)."""

    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    memory_mb: int | None = Field(None, ge=1)  # None = no memory reservation


class DistributedConfig(Strict):
    """How the work is cut into Ray tasks; results never depend on it (docs/distributed.md)."""

    images_per_task: int = Field(4, ge=1)  # images per feature-extraction task
    features: TaskResources = TaskResources()
    fit: TaskResources = TaskResources()
    max_retries: int = Field(2, ge=0)  # further attempts after a task's worker dies or it raises


class TrainConfig(Strict):
    """A training run. `patch` (and `thumbnail`) are the chosen detector's section: `config_model`
    types them from the detector registry, so each detector's keys are validated by name."""

    seed: int = Field(0, ge=0)
    # where training runs (hiad_train/device.py): auto, cpu, cuda, cuda:N or a list of GPU ids; not saved in
    # checkpoints (where a model was trained is no part of it: a GPU-trained checkpoint loads anywhere)
    device: Annotated[Union[str, list[int]], BeforeValidator(check_device_spec)] = Field("auto", exclude=True)
    image_size: SizeSpec
    patch_size: SizeSpec
    stride: SizeSpec | None = None
    ds_factors: list[int] = [0]
    fusion_weights: list[Annotated[float, Field(ge=0)]] | None = None
    batch_size: int = Field(8, ge=1)
    detector: str = "patchcore"
    tasks: TaskConfig = A2O(generator="a2o")
    patch: Any = None
    thumbnail: Any = None
    val_config: ValConfig | None = None
    evaluation: EvaluationConfig = EvaluationConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.fusion_weights is not None and len(self.fusion_weights) != len(self.ds_factors):
            raise ValueError(
                f"fusion_weights has {len(self.fusion_weights)} entries but ds_factors has {len(self.ds_factors)}"
            )
        if self.fusion_weights is not None and sum(self.fusion_weights) <= 0:
            raise ValueError(f"fusion_weights: must have a positive sum, got {self.fusion_weights}")
        if self.patch is not None and self.patch.patch_size is not None and self.patch.patch_size != self.patch_size:
            raise ValueError(f"patch.patch_size {self.patch.patch_size} differs from patch_size {self.patch_size}")
        self._check_memory()
        if self.patch is not None:
            try:
                self.patch.check_tile_size(as_size(self.patch_size))
            except ValueError as e:
                raise ValueError(f"patch_size: {e}") from None
        if self.thumbnail is not None:
            try:
                self.thumbnail.check_tile_size(as_size(self.thumbnail.thumbnail_size))
            except ValueError as e:
                raise ValueError(f"thumbnail.thumbnail_size: {e}") from None
        try:  # the geometry itself: patch within the image, stride within the patch, ds_factors
            Tiling.create(self.image_size, self.patch_size, self.stride, self.ds_factors)
        except ValueError as e:
            raise ValueError(f"image_size/patch_size/stride/ds_factors: {e}") from None
        return self

    def _check_memory(self) -> None:
        """Refuse a geometry whose one image needs more than MAX_IMAGE_BYTES, before anything is allocated."""
        (w, h), (pw, ph) = as_size(self.image_size), as_size(self.patch_size)
        sw, sh = as_size(self.stride) if self.stride is not None else (pw, ph)
        tiles = tiles_along(w, pw, sw) * tiles_along(h, ph, sh) if pw <= w and ph <= h else 0
        need = w * h * PIPELINE_BYTES_PER_PIXEL + tiles * pw * ph * 3
        if need > MAX_IMAGE_BYTES:
            raise ValueError(
                f"image_size/patch_size/stride: one {w}x{h} image cut into {tiles} tiles of {pw}x{ph} needs {need:,} "
                "bytes "
                f"(decoded RGB, float32 maps, stacked tiles), more than the limit of {MAX_IMAGE_BYTES:,}"
            )
        if self.thumbnail is not None:
            tw, th = as_size(self.thumbnail.thumbnail_size)
            if tw * th * PIPELINE_BYTES_PER_PIXEL > MAX_IMAGE_BYTES:
                raise ValueError(
                    f"thumbnail.thumbnail_size: {tw}x{th} needs {tw * th * PIPELINE_BYTES_PER_PIXEL:,} bytes, more "
                    f"than the limit of {MAX_IMAGE_BYTES:,}"
                )

    def __reduce__(self):
        """Pickled as its data (a worker process of hiad_train/executors.py's DeviceExecutor): the class is made
        per detector by `config_model`, so pickle cannot find it by name."""
        return _rebuilt_config, (self.model_dump(mode="json"), self.device)

    @property
    def normalized_fusion_weights(self) -> list[float]:
        """Fusion weights summing to 1 (equal weights when not given)."""
        w = self.fusion_weights or [1.0] * len(self.ds_factors)
        return [x / sum(w) for x in w]


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


@functools.cache
def config_model(detector: str) -> type[TrainConfig]:
    """TrainConfig with `patch` typed as the detector's Config and `thumbnail` as it plus thumbnail_size."""
    section = get_detector(detector).Config
    thumbnail = create_model(f"{section.__name__}Thumbnail", __base__=section, thumbnail_size=(SizeSpec, ...))
    try:
        default = section()
    except ValidationError:
        default = ...
    return create_model(
        f"TrainConfig[{detector}]",
        __base__=TrainConfig,
        patch=(section, default),
        thumbnail=(Union[thumbnail, None], None),
    )


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section that `loc` (ending in a bad key) points into."""
    candidates: list[type[BaseModel]] = [model]
    for part in loc[:-1]:
        inner = [
            m
            for c in candidates
            if str(part) in c.model_fields
            for m in _models_in(c.model_fields[str(part)].annotation)
        ]
        if not inner:  # a discriminated union's tag, e.g. tasks.neighborhood.<key>
            inner = [
                c
                for c in candidates
                if "generator" in c.model_fields and part in typing.get_args(c.model_fields["generator"].annotation)
            ]
        candidates = inner
    return list(candidates[0].model_fields) if candidates else []


def _describe(model: type[BaseModel], error: dict) -> str:
    path = ".".join(str(p) for p in error["loc"])
    if error["type"] == "value_error":  # our own checks: the message alone, without pydantic's prefix
        message = str(error["ctx"]["error"])
        return f"{path}: {message}" if path else message
    if error["type"] != "extra_forbidden":
        return f"{path or '<root>'}: {error['msg']}"
    names = _valid_keys(model, error["loc"])
    close = difflib.get_close_matches(str(error["loc"][-1]), names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})" if names else ""
    return f"{path}: unknown key{hint}"


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a mapping that repeats a key (plain YAML silently keeps the last) and
    any alias (`*name`): a config is plain data, and a few nested aliases in 500 bytes expand to
    billions of nodes (walking them took 41 s where the refusal takes none)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"line {event.start_mark.line + 1}: alias *{event.anchor} refused: "
                "configs are plain data, write the value out (aliases can expand exponentially)"
            )
        return super().compose_node(parent, index)

    def construct_document(self, node):
        self._paths = dict(_mapping_paths(node, ()))
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, typing.Hashable) and key in first:
                    path = ".".join([*self._paths.get(id(node), ()), str(key)])
                    raise ConfigError(
                        f"{path}: duplicate key (lines {first[key] + 1} and {key_node.start_mark.line + 1}); keep one"
                    )
                first.setdefault(key, key_node.start_mark.line)
        return super().construct_mapping(node, deep)


def _mapping_paths(node, path: tuple):
    """(id(mapping node), its key path) for every mapping in a YAML node tree."""
    if isinstance(node, yaml.MappingNode):
        yield id(node), path
        for key_node, value in node.value:
            yield from _mapping_paths(value, (*path, str(getattr(key_node, "value", "?"))))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            yield from _mapping_paths(value, (*path, str(i)))


def parse_config(data: dict, source: str = "config") -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    detector = data.get("detector", "patchcore")
    try:
        get_detector(detector)
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(detector), list(DETECTORS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"{source}: detector: unknown detector {detector!r}{hint}; registered: {', '.join(sorted(DETECTORS))}"
        ) from None
    model = config_model(detector)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [_describe(model, err) for err in e.errors()]
        raise ConfigError(f"{source}: invalid configuration\n  " + "\n  ".join(lines)) from None


def _rebuilt_config(data: dict, device) -> TrainConfig:
    return parse_config({**data, "device": device}, "pickled config")


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read and validate a training YAML; `overrides` are merged on top (one level deep per section)."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"{path}: invalid configuration\n  {e}") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read configuration ({e})") from e
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data, str(path))
