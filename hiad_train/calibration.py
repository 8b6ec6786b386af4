"""`hiad-train calibrate`: new thresholds and normalization from images collected after deployment,
without retraining.

The detectors stay as they are; only what turns their raw scores into decisions is recomputed, from
the line's own images: each task's min-max normalization (normal images with synthetic anomalies,
as the validation set does, plus any real defective images), then the image and pixel thresholds
by false-alarm rate on the normal images as they are (thresholds.py). Works on a checkpoint (PyTorch)
or on a bundle (its own heads, torch-free scoring); either is re-published atomically as a new
version, every other file copied byte for byte: a checkpoint here (`write_checkpoint`), a bundle by
hiad_export/calibrate.py (training never imports export; `hiad-train calibrate` composes the two).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from hiad_runtime.geometry import Tiling
from hiad_runtime.plan import InferencePlan
from hiad_runtime.postprocess import Normalization, PostprocessSpec
from hiad_train.operating_curve import OperatingPoint, Rate, max_miss_threshold, operating_curve
from hiad_train.thresholds import false_alarm_thresholds
from hiad_train.validation import min_max_normalization, synthesize_tiles

Raw = tuple[list[tuple[str, int, np.ndarray]], np.ndarray | None]  # (task, tile, raw grid) per tile; raw thumbnail grid


@dataclass
class RawScorer:
    """What calibration needs of a checkpoint's model or of a bundle: raw scores and the inference plan."""

    raw: Callable[[np.ndarray], Raw]  # RGB image at image_size -> raw scores
    plan: InferencePlan

    @property
    def tiling(self) -> Tiling:
        return self.plan.tiling

    @property
    def tasks(self) -> list[str]:
        return [t.name for t in self.plan.tasks]

    @property
    def postprocess(self) -> PostprocessSpec:
        return self.plan.postprocess


@dataclass
class Calibration:
    task_normalization: dict[str, Normalization]
    thumbnail_normalization: Normalization | None
    thresholds: dict  # {"image", "pixel", "rules"}
    curves: dict[str, list[OperatingPoint]] = field(default_factory=dict)  # "image", "pixel": with defective images


def final_map(raw: Raw, plan: InferencePlan) -> tuple[np.ndarray, float]:
    """(map, score) from raw scores by a plan (with the normalization being calibrated): the runtime's
    merge, thumbnail, blur and image score."""
    tiles, thumb = raw
    grids: list = [None] * len(plan.tiling.tiles)
    for name, i, grid in tiles:
        grids[i] = plan.normalize(name, grid)
    return plan.finish(plan.merge(grids), plan.thumbnail_map(thumb), in_place=False)


def calibrate(
    scorer: RawScorer,
    normal: list[np.ndarray],
    defective: list[np.ndarray],
    synthesizer,
    rate: float,
    seed: int = 0,
    normalization: str = "global",
    max_miss: float | None = None,
) -> Calibration:
    """Normalization from normal images (as they are and with synthetic anomalies) and defective ones;
    thresholds by false-alarm rate on the normal images, or with `max_miss` the highest ones missing at
    most that share of the defective images; with defective images, the operating curves and misses."""
    if max_miss is not None and not defective:
        raise ValueError("--max-miss sets thresholds from defective images: give them with --defective")
    if len(normal) < 1:
        raise ValueError("calibration needs at least one normal image")
    rng = np.random.default_rng(seed)
    clean = [scorer.raw(image) for image in normal]
    seen = clean + [scorer.raw(synthesize_tiles(image, scorer.tiling, synthesizer, rng)[0]) for image in normal]
    bad = [scorer.raw(image) for image in defective]
    records = [r for tiles, _ in seen + bad for r in tiles]
    thumbs = [t for _, t in seen + bad if t is not None]
    norms, thumb_norm = min_max_normalization(records, thumbs, scorer.tasks, normalization)
    plan = scorer.plan.renormalized(norms, thumb_norm)
    normal_finals = [final_map(raw, plan) for raw in clean]
    thresholds = false_alarm_thresholds([m for m, _ in normal_finals], scorer.tiling, scorer.postprocess, rate, seed)
    rules = thresholds["rules"]
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    for rule in rules.values():
        rule["calibrated"] = when
    if not defective:
        return Calibration(norms, thumb_norm, thresholds)
    # Image decisions by the image score, pixel ones by the map maximum (an image with any mask pixel).
    finals = [final_map(raw, plan) for raw in bad]
    statistics = {
        "image": (np.array([s for _, s in normal_finals]), np.array([s for _, s in finals])),
        "pixel": (np.array([m.max() for m, _ in normal_finals]), np.array([m.max() for m, _ in finals])),
    }
    curves = {kind: operating_curve(good, bad_) for kind, (good, bad_) in statistics.items()}
    for kind, (good, bad_) in statistics.items():
        if max_miss is not None:
            thresholds[kind] = max_miss_threshold(bad_, max_miss)
            alarms = Rate(int((good >= thresholds[kind]).sum()), good.size)
            normal_law = {key: rules[kind][key] for key in ("tiles", "fit") if key in rules[kind]}
            rules[kind] = {
                "rule": "max_miss",
                "max_miss": max_miss,
                "images": int(good.size),
                **normal_law,  # the normal images' score law, whatever sets the threshold: drift's reference
                "calibrated": when,
                "flagged": alarms.count,
                "false_alarm_interval_90": list(alarms.interval()),
            }
        rules[kind].update(defective_images=len(bad), missed=int((bad_ < thresholds[kind]).sum()))
    return Calibration(norms, thumb_norm, thresholds, curves)


def model_scorer(model) -> RawScorer:
    thumb = model.thumbnail
    raw = lambda image: (model.raw_tile_scores(image), None if thumb is None else thumb.raw_scores(image))  # noqa: E731
    return RawScorer(raw, model.plan)


def bundle_scorer(inspector) -> RawScorer:
    """A bundle's raw scores by its tile engine (the heads' outputs before normalization)."""
    return RawScorer(inspector.engine.raw_scores, inspector.plan)


def copy_except(source: Path, target: Path, skip: set[str]) -> None:
    """Every file under `source` but those in `skip` (relative paths), bytes and times as they are."""
    for f in sorted(source.rglob("*")):
        rel = f.relative_to(source).as_posix()
        if f.is_file() and rel not in skip:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target / rel)


def write_checkpoint(source: Path, out: Path, cal: Calibration) -> None:
    """The checkpoint with new normalization and thresholds in checkpoint.json; tensors copied."""
    from hiad_runtime.files import atomic_directory

    meta = json.loads((source / "checkpoint.json").read_text())
    meta["task_normalization"] = {k: v.to_dict() for k, v in cal.task_normalization.items()}
    if meta.get("thumbnail") is not None:
        meta["thumbnail"]["normalization"] = cal.thumbnail_normalization.to_dict()
    meta["thresholds"] = cal.thresholds
    with atomic_directory(out) as tmp:
        copy_except(source, tmp, {"checkpoint.json"})
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=1))
