"""Training configuration: YAML data with HiAD's key names, validated on load.

Every section forbids unknown keys, and the error names the bad key with its path and the closest
valid spelling, e.g. `patch.percentge: unknown key (did you mean 'percentage'?)`.
"""

from __future__ import annotations

import difflib
import functools
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

SizeSpec = Union[int, tuple[int, int]]


class ConfigError(ValueError):
    """A configuration that does not validate; the message names every bad key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class A2O(Strict):
    generator: Literal["a2o"]


class O2O(Strict):
    generator: Literal["o2o"]


class Neighborhood(Strict):
    generator: Literal["neighborhood"]
    num_groups_width: int = Field(ge=1)
    num_groups_height: int | None = Field(None, ge=1)


class SpatialClustering(Strict):
    generator: Literal["spatial_clustering"]
    cluster_number: int = Field(ge=1)
    feature_resolution: int = Field(1, ge=1)


class ThresholdClustering(Strict):
    generator: Literal["threshold_clustering"]
    cluster_threshold: float = Field(gt=0)
    feature_resolution: int = Field(1, ge=1)


class Retrieve(Strict):
    generator: Literal["retrieve"]
    cluster_number: int = Field(ge=1)


TaskConfig = Annotated[
    Union[A2O, O2O, Neighborhood, SpatialClustering, ThresholdClustering, Retrieve], Field(discriminator="generator")
]


class SynthesizerConfig(Strict):
    name: Literal["random_box", "cut_paste", "color_shift", "image_blending"] = "random_box"
    p: float = Field(0.5, ge=0, le=1)  # probability that a validation patch gets a synthetic anomaly
    source_dir: str | None = None  # image_blending: anomaly-source images (default: scikit-image textures)


class ValConfig(Strict):
    """HiAD's val_config: a validation set of held-out training images with synthetic anomalies."""

    anomaly_syn_fn: SynthesizerConfig = SynthesizerConfig()
    val_sample_ratio: float = Field(0.2, gt=0, lt=1)
    max_patch_number: int | None = Field(200, ge=1)
    evaluators: list[Literal["image_auroc", "pixel_metrics", "aupro"]] = ["image_auroc", "pixel_metrics"]


class EvaluationConfig(Strict):
    resize: int | None = 512  # pixel metrics at this resolution (None = full)
    overlays: bool = True


class TrainConfig(Strict):
    """A training run. `patch` (and `thumbnail`) are the chosen detector's section: `config_model`
    types them from the detector registry, so each detector's keys are validated by name."""

    seed: int = 0
    image_size: SizeSpec
    patch_size: SizeSpec
    stride: SizeSpec | None = None
    ds_factors: list[int] = [0]
    fusion_weights: list[float] | None = None
    batch_size: int = Field(8, ge=1)
    detector: str = "patchcore"
    tasks: TaskConfig = A2O(generator="a2o")
    patch: Any = None
    thumbnail: Any = None
    val_config: ValConfig | None = None
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.fusion_weights is not None and len(self.fusion_weights) != len(self.ds_factors):
            raise ValueError(
                f"fusion_weights has {len(self.fusion_weights)} entries but ds_factors has {len(self.ds_factors)}"
            )
        if self.patch is not None and self.patch.patch_size is not None and self.patch.patch_size != self.patch_size:
            raise ValueError(f"patch.patch_size {self.patch.patch_size} differs from patch_size {self.patch_size}")
        return self

    @property
    def normalized_fusion_weights(self) -> list[float]:
        """Fusion weights summing to 1 (equal weights when not given)."""
        w = self.fusion_weights or [1.0] * len(self.ds_factors)
        if min(w) < 0 or sum(w) <= 0:
            raise ConfigError(f"fusion_weights must be non-negative with a positive sum, got {w}")
        return [x / sum(w) for x in w]


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


@functools.cache
def config_model(detector: str) -> type[TrainConfig]:
    """TrainConfig with `patch` typed as the detector's Config and `thumbnail` as it plus thumbnail_size."""
    from hiad_train.detectors.registry import get_detector

    section = get_detector(detector).Config
    thumbnail = create_model(f"{section.__name__}Thumbnail", __base__=section, thumbnail_size=(SizeSpec, ...))
    try:
        default = section()
    except ValidationError:
        default = ...
    return create_model(
        f"TrainConfig[{detector}]", __base__=TrainConfig, patch=(section, default), thumbnail=(Union[thumbnail, None], None)
    )


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section that `loc` (ending in a bad key) points into."""
    candidates: list[type[BaseModel]] = [model]
    for part in loc[:-1]:
        inner = [m for c in candidates if str(part) in c.model_fields for m in _models_in(c.model_fields[str(part)].annotation)]
        if not inner:  # a discriminated union's tag, e.g. tasks.neighborhood.<key>
            inner = [c for c in candidates if "generator" in c.model_fields and part in typing.get_args(c.model_fields["generator"].annotation)]
        candidates = inner
    return list(candidates[0].model_fields) if candidates else []


def _describe(model: type[BaseModel], error: dict) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "<root>"
    if error["type"] != "extra_forbidden":
        return f"{path}: {error['msg']}"
    names = _valid_keys(model, error["loc"])
    close = difflib.get_close_matches(str(error["loc"][-1]), names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})" if names else ""
    return f"{path}: unknown key{hint}"


def parse_config(data: dict, source: str = "config") -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    from hiad_train.detectors.registry import DETECTORS, get_detector

    detector = data.get("detector", "patchcore")
    try:
        get_detector(detector)
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(detector), list(DETECTORS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{source}: detector: unknown detector {detector!r}{hint}; registered: {', '.join(sorted(DETECTORS))}") from None
    model = config_model(detector)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [_describe(model, err) for err in e.errors()]
        raise ConfigError(f"{source}: invalid configuration\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read and validate a training YAML; `overrides` are merged on top (one level deep per section)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read configuration ({e})") from e
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data, str(path))
