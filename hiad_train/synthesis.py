"""Anomaly synthesizers for the validation set: patch -> (patch with a defect, exact mask).

Each synthesizer applies its defect with probability `p` (else returns the patch and an empty mask),
as HiAD's RandomBox, CutPaste, ColorShift and ImageBlending synthesizers do. They are registered by
name; the config section `val_config.anomaly_syn_fn` (SynthesizerConfig) names one, is validated
against the registry and the keys that synthesizer reads, and builds it. Adding a synthesizer is one
class here with `@register_synthesizer`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
from pydantic import Field, field_validator, model_validator

from hiad_runtime.image import load_image
from hiad_runtime.results import find_inputs
from hiad_train.schema import Strict

Synthesized = tuple[np.ndarray, np.ndarray]


SYNTHESIZERS: dict[str, type["Synthesizer"]] = {}


def register_synthesizer(cls: type["Synthesizer"]) -> type["Synthesizer"]:
    """Class decorator: add a Synthesizer under its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Synthesizer) and isinstance(cls.__dict__.get("name"), str)):
        raise TypeError(f"{cls!r} is not a Synthesizer with a `name`")
    if cls.name in SYNTHESIZERS and SYNTHESIZERS[cls.name] is not cls:
        first = SYNTHESIZERS[cls.name].__name__
        raise ValueError(f"synthesizer {cls.name!r} is registered twice ({first}, {cls.__name__})")
    SYNTHESIZERS[cls.name] = cls
    return cls


def _box(h: int, w: int, rng: np.random.Generator, min_frac=0.05, max_frac=0.3) -> tuple[int, int, int, int]:
    bh = int(rng.uniform(min_frac, max_frac) * h) + 1
    bw = int(rng.uniform(min_frac, max_frac) * w) + 1
    return int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw


class Synthesizer:
    """Applies `defect` with probability `p`; otherwise the patch is returned with an empty mask.
    A registered subclass names itself (`name`) and the SynthesizerConfig keys it is built from (`keys`)."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]] = ("p",)
    p: float

    def __call__(self, patch: np.ndarray, rng: np.random.Generator) -> Synthesized:
        if rng.random() >= self.p:
            return patch, np.zeros(patch.shape[:2], bool)
        return self.defect(patch, rng)

    def defect(self, patch: np.ndarray, rng: np.random.Generator) -> Synthesized:
        raise NotImplementedError


@register_synthesizer
@dataclass(frozen=True)
class RandomBox(Synthesizer):
    """A rectangle of one random colour."""

    name = "random_box"

    p: float = 0.5

    def defect(self, patch: np.ndarray, rng: np.random.Generator) -> Synthesized:
        mask = np.zeros(patch.shape[:2], bool)
        y, x, bh, bw = _box(*patch.shape[:2], rng)
        out = patch.copy()
        out[y : y + bh, x : x + bw] = rng.integers(0, 256, 3, dtype=np.uint8)
        mask[y : y + bh, x : x + bw] = True
        return out, mask


@register_synthesizer
@dataclass(frozen=True)
class CutPaste(Synthesizer):
    """A rectangle of the patch itself, brightness-jittered, pasted elsewhere."""

    name = "cut_paste"

    p: float = 0.5

    def defect(self, patch: np.ndarray, rng: np.random.Generator) -> Synthesized:
        mask = np.zeros(patch.shape[:2], bool)
        h, w = patch.shape[:2]
        sy, sx, bh, bw = _box(h, w, rng)
        piece = np.clip(patch[sy : sy + bh, sx : sx + bw].astype(np.float32) * rng.uniform(0.6, 1.4), 0, 255).astype(
            np.uint8
        )
        ty, tx = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        out = patch.copy()
        region = out[ty : ty + bh, tx : tx + bw]
        changed = (region != piece).any(axis=2)
        region[:] = piece
        mask[ty : ty + bh, tx : tx + bw] = changed  # only pixels that really differ are anomalous
        return out, mask


@register_synthesizer
@dataclass(frozen=True)
class ColorShift(Synthesizer):
    """A region whose colour and brightness are shifted (a stain, a discolouration)."""

    name = "color_shift"

    p: float = 0.5
    strength: float = 60.0

    def defect(self, patch: np.ndarray, rng: np.random.Generator) -> Synthesized:
        mask = np.zeros(patch.shape[:2], bool)
        y, x, bh, bw = _box(*patch.shape[:2], rng)
        shift = rng.uniform(-1, 1, 3) * self.strength
        shift += np.sign(shift.sum() or 1) * self.strength * 0.5  # never a no-op
        out = patch.copy()
        region = np.clip(out[y : y + bh, x : x + bw].astype(np.float32) + shift, 0, 255).astype(np.uint8)
        changed = (region != out[y : y + bh, x : x + bw]).any(axis=2)
        out[y : y + bh, x : x + bw] = region
        mask[y : y + bh, x : x + bw] = changed
        return out, mask


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise on a res grid of lattice cells, sampled at `shape` pixels (~[-1, 1])."""
    h, w = shape
    ry, rx = res
    angles = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], -1)
    ys, xs = np.linspace(0, ry, h, endpoint=False), np.linspace(0, rx, w, endpoint=False)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]

    def dot(iy, ix, dy, dx):
        g = grad[(y0 + iy)[:, None], (x0 + ix)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3  # noqa: E731
    u, v = fade(fx), fade(fy)
    top = dot(0, 0, 0, 0) * (1 - u) + dot(0, 1, 0, 1) * u
    bottom = dot(1, 0, 1, 0) * (1 - u) + dot(1, 1, 1, 1) * u
    return np.sqrt(2) * (top * (1 - v) + bottom * v)


def bundled_textures() -> list[Path]:
    """Texture photographs that scikit-image ships (no download)."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    return [
        p
        for name in ("brick.png", "grass.png", "gravel.png", "rough-wall.png", "coffee.png")
        if (p := data / name).is_file()
    ]


@register_synthesizer
class ImageBlending(Synthesizer):
    """Blend a Perlin-noise-shaped region of an anomaly-source image into the patch (DRAEM-style)."""

    name = "image_blending"
    keys = ("p", "source_dir")

    def __init__(self, p: float = 0.5, source_dir: str | Path | None = None, blend: tuple[float, float] = (0.5, 1.0)):
        self.p = p
        self.blend = blend
        if source_dir is None:
            self.sources = bundled_textures()
        else:
            self.sources = find_inputs([Path(source_dir)])
        if not self.sources:
            raise ValueError(f"ImageBlending: no anomaly-source images in {source_dir or 'scikit-image data'}")
        self._cache: dict[Path, np.ndarray] = {}

    def _source(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        path = self.sources[int(rng.integers(len(self.sources)))]
        if path not in self._cache:
            self._cache[path] = load_image(path)
        return cv2.resize(self._cache[path], size, interpolation=cv2.INTER_AREA)

    def defect(self, patch: np.ndarray, rng: np.random.Generator) -> Synthesized:
        h, w = patch.shape[:2]
        for _ in range(10):  # a threshold that leaves an empty region is retried
            scale = int(rng.integers(1, 4))
            noise = perlin_noise((h, w), (2**scale, 2**scale), rng)
            mask = noise > 0.5
            if mask.sum() > 0.002 * h * w:
                break
        beta = rng.uniform(*self.blend)
        source = self._source(rng, (w, h)).astype(np.float32)
        out = patch.astype(np.float32)
        out[mask] = beta * source[mask] + (1 - beta) * out[mask]
        out = np.clip(np.round(out), 0, 255).astype(np.uint8)
        mask &= (out != patch).any(axis=2)
        return out, mask


class SynthesizerConfig(Strict):
    """`val_config.anomaly_syn_fn`: a registered synthesizer by name and the keys it reads."""

    name: str = "random_box"
    p: float = Field(0.5, ge=0, le=1)  # probability that a validation patch gets a synthetic anomaly
    source_dir: str | None = None  # image_blending: anomaly-source images (default: scikit-image textures)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in SYNTHESIZERS:
            close = difflib.get_close_matches(name, list(SYNTHESIZERS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown synthesizer {name!r}{hint}; registered: {', '.join(sorted(SYNTHESIZERS))}")
        return name

    @model_validator(mode="after")
    def _keys_read(self) -> "SynthesizerConfig":
        unread = [
            k
            for k in self.model_fields_set - {"name"}
            if k not in SYNTHESIZERS[self.name].keys and getattr(self, k) != type(self).model_fields[k].default
        ]
        if unread:
            raise ValueError(f"{', '.join(sorted(unread))}: not read by synthesizer {self.name!r}")
        return self

    def build(self) -> Synthesizer:
        """The synthesizer this section names, built from the keys it reads."""
        cls = SYNTHESIZERS[self.name]
        return cls(**{k: getattr(self, k) for k in cls.keys})
