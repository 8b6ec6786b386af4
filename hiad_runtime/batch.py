"""`hiad-runtime predict`'s work, apart from where it runs: score each input, write each outcome.

`score_input` turns one input into a `Scored` (the record's fields, the map, the overlay), in this
process or in a Ray actor (hiad_runtime/ray_scoring.py); `write_all` is the one writer of a results
folder, for both: it saves each map and appends each record, in input order, with a progress bar.
Scoring writes nothing, so an input scored twice (a retried actor call) is still recorded once.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from hiad_runtime.image import ImageError, resize_image
from hiad_runtime.overlay import overlay, save_rgb
from hiad_runtime.prefetch import prefetched
from hiad_runtime.results import ResultsFolder

if TYPE_CHECKING:
    from hiad_runtime.inspector import Inspector


@dataclass(frozen=True)
class Input:
    """One input of a run: the path as listed and the key its outputs are written under."""

    path: str  # as listed (the record's "input"); read from here, relative to the driver's folder
    key: str  # where its map and overlay go, relative to maps/ and overlays/ (results.output_keys)


@dataclass(frozen=True)
class OutputSettings:
    """What a run writes beside each record."""

    input_size: bool = False  # maps at each input's own size, not the bundle's image_size
    overlays: bool = False  # also an overlay PNG per input


@dataclass
class Scored:
    """One input's outcome, what crosses from a scorer to the writer: an error, or a score and its map."""

    input: Input
    error: str | None = None
    score: float | None = None
    decision: bool | None = None
    latency_ms: float = 0.0
    warnings: list[str] = field(default_factory=list)
    anomaly_map: np.ndarray | None = None  # float32, as saved
    overlay: np.ndarray | None = None  # RGB, when the settings ask for overlays


def describe(inspector: Inspector) -> dict:
    """What `predict` prints about the run: thresholds and their rules, precision, backend, providers."""
    return {
        "image_threshold": inspector.image_threshold,
        "pixel_threshold": inspector.pixel_threshold,
        "rules": (inspector.manifest.thresholds or {}).get("rules", {}),
        "precision": inspector.precision,
        "backend": inspector.sessions.backend,
        "providers": inspector.providers_in_use,
    }


def score_input(inspector: Inspector, item: Input, image: Callable[[], np.ndarray], settings: OutputSettings) -> Scored:
    """Score one input; `image()` gives it decoded (or raises ImageError/OSError, recorded as its error).
    Latency counts decoding (or, with prefetch, the wait for it) and inference."""
    t0 = time.perf_counter()
    try:
        decoded = image()
        r = inspector.predict(decoded)
        latency = (time.perf_counter() - t0) * 1000
        anomaly_map = r.map_at_input_size() if settings.input_size else r.anomaly_map  # float32: no copy
        shown = None
        if settings.overlays:
            unit = inspector.manifest.normalized  # normalized maps share one colour scale; above 1 saturates
            shown = overlay(
                resize_image(decoded, inspector.tiling.image_size),
                r.anomaly_map,
                r.mask,
                *((0.0, 1.0) if unit else (None, None)),
            )
    except (ImageError, OSError) as e:
        return Scored(item, error=_named(item, e))
    return Scored(
        item,
        score=r.score,
        decision=r.decision,
        latency_ms=round(latency, 2),
        warnings=r.warnings,
        anomaly_map=anomaly_map,
        overlay=shown,
    )


def score_locally(
    inspector: Inspector, items: list[Input], settings: OutputSettings, prefetch: int = 0
) -> Iterator[Scored]:
    """Every input scored in this process, in order; `prefetch` images decoded ahead on a thread."""
    for item, decoded in prefetched(items, lambda i: inspector.decode(i.path), prefetch):
        yield score_input(inspector, item, decoded.result, settings)


def write_all(folder: ResultsFolder, scored: Iterable[Scored], total: int) -> int:
    """Save each map (and overlay), then append its record, as each input comes; returns the failures."""
    failures = 0
    with tqdm(total=total, desc="predict", unit="image", dynamic_ncols=True) as bar:
        for s in scored:
            failures += _write(folder, s, bar)
            bar.update()
    return failures


def _write(folder: ResultsFolder, s: Scored, bar: tqdm) -> int:
    path = s.input.path
    if s.error is None:
        try:
            map_file = folder.map_path(s.input.key)
            np.save(map_file, s.anomaly_map, allow_pickle=False)
            if s.overlay is not None:
                save_rgb(folder.overlay_path(s.input.key), s.overlay)
        except OSError as e:
            s = Scored(s.input, error=_named(s.input, e))
    if s.error is not None:
        folder.record({"input": path, "error": s.error})
        bar.write(f"error: {s.error}", file=sys.stderr)
        return 1
    folder.record(
        {
            "input": path,
            "score": s.score,
            "decision": s.decision,
            "latency_ms": s.latency_ms,
            "map": map_file.relative_to(folder.out).as_posix(),
            "warnings": s.warnings,
        }
    )
    decision = "" if s.decision is None else f" -> {'ANOMALOUS' if s.decision else 'ok'}"
    bar.write(f"{path}: score {s.score:.4f}{decision} ({s.latency_ms:.0f} ms)")
    for w in s.warnings:
        bar.write(f"warning: {path}: {w}", file=sys.stderr)
    return 0


def _named(item: Input, error: Exception) -> str:
    return str(error) if item.path in str(error) else f"{item.path}: {error}"
