"""Inspector: bundle -> predict(image) -> Result. The edge box's whole pipeline, torch-free.

decode (within `max_pixels`) -> resize to image_size (recorded policy) -> engine -> Result. The
engine turns the image into (map, score, timings): by default the tile engine (the bundle's embedders
and heads, stage by stage, in bounded memory: hiad_runtime/engines/tiles.py), or the bundle's
whole-image graph (hiad_runtime/engines/pipeline.py). Both follow the bundle's inference plan
(hiad_runtime/plan.py), which also decides (thresholds). How it runs is one `RuntimeOptions`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from hiad_runtime.backends import SessionFactory
from hiad_runtime.bundle import Bundle, BundleError
from hiad_runtime.engines import ENGINES
from hiad_runtime.image import (
    ImageError,
    decode,
    default_max_pixels,
    load_image,
    resize_image,
    resize_map,
    size_warnings,
)
from hiad_runtime.options import RuntimeOptions
from hiad_runtime.plan import InferencePlan


@dataclass
class Result:
    """What `Inspector.predict` returns for one image: score, anomaly map, decision, mask, timings and warnings."""

    score: float  # in [0, 1] when the bundle's tasks carry validation normalization, raw otherwise
    anomaly_map: np.ndarray  # float32 (H, W) at the bundle's image_size, same scale as `score`
    input_size: tuple[int, int]  # (width, height) of the image as given
    decision: bool | None = None  # score >= image threshold, when there is one
    mask: np.ndarray | None = None  # anomaly_map >= pixel threshold, when there is one
    timings: dict = field(default_factory=dict)  # seconds per stage
    warnings: list[str] = field(default_factory=list)  # why the score may be unreliable (aspect, size)

    def map_at_input_size(self) -> np.ndarray:
        """The anomaly map (float32) resized to the input image's own (width, height)."""
        return resize_map(self.anomaly_map, self.input_size)


class Inspector:
    """A bundle ready to score images (HiAD inference, https://github.com/cnulab/HiAD), torch-free.

    `Inspector(bundle, options)` or, field by field, `Inspector(bundle, head_path="onnx", ...)` (the
    fields of RuntimeOptions, on top of `options`)."""

    def __init__(self, bundle: Bundle, options: RuntimeOptions | None = None, **fields):
        options = replace(options or RuntimeOptions(), **fields)
        self.sessions = SessionFactory(options.providers, options.threads, options.backend)
        self.options = options = options.resolved(self.sessions.backend, self.sessions.on_gpu)  # as it runs
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.plan = InferencePlan.from_bundle(bundle).with_thresholds(options.image_threshold, options.pixel_threshold)
        self.tiling = self.plan.tiling
        self.max_pixels = options.max_pixels or default_max_pixels(self.tiling.image_size)  # larger inputs: refused
        self.engine = ENGINES[options.engine](bundle, self.plan, self.sessions, options)

    @classmethod
    def load(cls, path: str | Path, options: RuntimeOptions | None = None, **fields) -> "Inspector":
        """An Inspector for the bundle at `path`: a directory or a .tar/.tar.gz of one, verified as `Bundle.load` does.
        `options` and `fields` as for `Inspector(...)`. Raises BundleError for a bundle that cannot be used."""
        return cls(Bundle.load(path), options, **fields)

    @property
    def image_threshold(self) -> float | None:
        """The score at or above which an image is anomalous (the option's, else the bundle's; None: no decision)."""
        return self.plan.image_threshold

    @property
    def pixel_threshold(self) -> float | None:
        """The map value at or above which a pixel is in the mask (the option's, else the bundle's; None: no mask)."""
        return self.plan.pixel_threshold

    @property
    def stages(self) -> tuple[str, ...]:
        """The keys of a Result's timings: decoding, then the engine's stages."""
        return ("decode", *self.engine.stages)

    @property
    def providers_in_use(self) -> list[str]:
        """The execution providers the sessions made so far really use, sorted."""
        return sorted(self.sessions.in_use)

    @property
    def precision(self) -> str:
        """The embedders' precision as the bundle records it (e.g. 'int8'; 'fp32+fp16' if they differ)."""
        return "+".join(sorted({e.precision for e in self.manifest.embedders.values()}))

    def decode(self, image: np.ndarray | str | Path | bytes) -> np.ndarray:
        """A path or encoded bytes decoded within `max_pixels`, or an RGB uint8 array checked."""
        if isinstance(image, (str, Path)):
            return load_image(image, self.max_pixels)
        if isinstance(image, bytes):
            return decode(image, "image bytes", self.max_pixels)
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise ImageError("predict expects a path, encoded bytes, or an RGB uint8 array (H, W, 3)")
        if min(image.shape[:2]) == 0:
            raise ImageError(f"image array of shape {image.shape} is empty")
        return image

    def predict(self, image: np.ndarray | str | Path | bytes) -> Result:
        """Score one image: a path, encoded bytes or an RGB uint8 array (H, W, 3) of any size.

        It is decoded (within `max_pixels`) and resized to the bundle's image_size, run through the
        engine, and decided by the thresholds. The Result holds the score, the map at image_size
        (`map_at_input_size()` for the input's own), decision and mask (None without thresholds),
        seconds per stage (`stages`) and warnings (aspect ratio, size) that make the score less reliable.
        Raises ImageError (naming the input) for an image that cannot be read or is too large."""
        t0 = time.perf_counter()
        source = str(image) if isinstance(image, (str, Path)) else "image"
        image = self.decode(image)
        input_size = (image.shape[1], image.shape[0])
        try:
            image = resize_image(image, self.tiling.image_size)
        except ImageError as e:
            raise ImageError(f"{source}: {e}") from None
        decoded = time.perf_counter() - t0
        anomaly_map, score, timings = self.engine(image)
        decision, mask = self.plan.decide(anomaly_map, score)
        warnings = size_warnings(input_size, self.tiling.image_size)
        return Result(score, anomaly_map, input_size, decision, mask, {"decode": decoded, **timings}, warnings)


__all__ = ["BundleError", "ImageError", "Inspector", "Result", "RuntimeOptions"]
