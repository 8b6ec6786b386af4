"""Image and pixel thresholds, each recorded with the rule that set it and the data it saw.

Two rules. `false_alarm_rate` (the default) needs normal images only: a line states how many good
parts it can afford to reject, and the threshold is set so that a normal image is flagged at that
rate. A few held-out images give far too few image scores for a 1% quantile, so the estimate works
on tiles: each tile's statistic (the image-score rule on its region of the final map, or its map
maximum for the pixel threshold) is a maximum over many positions, so its upper tail is fitted with
a Gumbel law; an image is flagged when its largest tile is, so an image with T tiles exceeds t with
probability 1 - G(t)^T (tiles treated as independent draws of one law). Tiles of one image are not
independent, though: a brighter part or a shifted camera moves all of them, so the uncertainty is a
bootstrap over *images* (each resample refits the tail), and the threshold is the upper 90th
percentile of the resampled fits' levels: its rate is at most the target in 9 of 10 resamples, as far
as the held-out images show. With few images that is little evidence (two images cannot show how
much normal images vary); the record says so, and `hiad-train calibrate` with a line's own normal
images is the remedy. `f1` keeps HiAD's choice: the best F1 on the validation tiles with synthetic
anomalies.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy import stats
from sklearn.metrics import precision_recall_curve

from hiad_runtime.geometry import Tiling
from hiad_runtime.postprocess import PostprocessSpec, image_score

BOOTSTRAP = 200  # refits over resampled images: the threshold's level and its achieved-rate interval
CONFIDENCE = 90  # the threshold is this percentile of the resampled levels
FEW_IMAGES = 10  # below this many normal images the record warns that between-image variation is barely seen
MIN_SCALE = 1e-9


def f1_threshold(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """The threshold with the best F1 (predict anomalous when score >= threshold)."""
    truth = np.asarray(truth, bool)
    if not truth.any() or truth.all():
        return None
    precision, recall, thresholds = precision_recall_curve(truth, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return float(thresholds[int(np.argmax(f1))])


@dataclass(frozen=True)
class GumbelTail:
    """A Gumbel law fitted (maximum likelihood) to per-tile maxima, and the image rate it implies."""

    loc: float
    scale: float

    @classmethod
    def fit(cls, values: np.ndarray) -> "GumbelTail":
        values = np.asarray(values, np.float64)
        if values.size < 2 or np.ptp(values) == 0:
            return cls(float(values.mean()), MIN_SCALE)
        loc, scale = stats.gumbel_r.fit(values)
        return cls(float(loc), max(float(scale), MIN_SCALE))

    def image_rate(self, threshold: float, tiles: int) -> float:
        """P(the largest of `tiles` tile statistics >= threshold)."""
        return float(-np.expm1(-tiles * np.exp(-(threshold - self.loc) / self.scale)))

    def level(self, rate: float, tiles: int) -> float:
        """The threshold an image with `tiles` tiles exceeds with probability `rate`."""
        return float(self.loc - self.scale * np.log(-np.log1p(-rate) / tiles))


def tile_statistics(anomaly_map: np.ndarray, tiling: Tiling, statistic) -> np.ndarray:
    """`statistic` of each tile's region of a final (image-size) map."""
    return np.array([statistic(anomaly_map[t.main.slices()]) for t in tiling.tiles], np.float64)


def false_alarm_threshold(
    per_image: list[np.ndarray], rate: float, statistic: str, seed: int = 0
) -> tuple[float, dict]:
    """The threshold flagging a normal image with probability at most `rate` (90 % of image
    resamples), from per-image tile statistics (each (T,)), and its record: rule, data, fit,
    achieved-rate interval, flags on these images."""
    if not per_image:
        raise ValueError("a false-alarm-rate threshold needs at least one normal image")
    values = np.concatenate(per_image)
    tiles = len(per_image[0])
    tail = GumbelTail.fit(values)
    rng = np.random.default_rng(seed)
    resampled = [
        GumbelTail.fit(np.concatenate([per_image[i] for i in rng.integers(len(per_image), size=len(per_image))]))
        for _ in range(BOOTSTRAP)
    ]
    threshold = max(
        tail.level(rate, tiles), float(np.percentile([f.level(rate, tiles) for f in resampled], CONFIDENCE))
    )
    low, high = np.percentile([f.image_rate(threshold, tiles) for f in resampled], [5, 95])
    record = {
        "rule": "false_alarm_rate",
        "rate": rate,
        "statistic": statistic,
        "estimate": f"Gumbel fit of per-tile statistics, an image flagged when its largest tile is; level at the "
        f"{CONFIDENCE}th percentile of {BOOTSTRAP} refits over resampled images",
        "images": len(per_image),
        "tiles": int(values.size),
        "fit": {"loc": tail.loc, "scale": tail.scale},
        "rate_interval_90": [float(low), float(high)],
        "flagged": int(sum(v.max() >= threshold for v in per_image)),
    }
    if len(per_image) < FEW_IMAGES:
        record["warning"] = (
            f"{len(per_image)} normal image(s): how much normal images vary is barely seen, the rate on "
            f"new images may be higher; calibrate with >= {FEW_IMAGES * 2} of the line's normal images"
        )
    return threshold, record


def false_alarm_thresholds(
    maps: list[np.ndarray], tiling: Tiling, spec: PostprocessSpec, rate: float, seed: int = 0
) -> dict:
    """Image and pixel thresholds by false-alarm rate from the final maps of normal images:
    {"image", "pixel", "rules": {"image": record, "pixel": record}}."""
    by_score = [tile_statistics(m, tiling, partial(image_score, spec=spec)) for m in maps]
    by_max = [tile_statistics(m, tiling, np.max) for m in maps]
    image, image_rule = false_alarm_threshold(by_score, rate, "image score of each tile's region", seed)
    pixel, pixel_rule = false_alarm_threshold(by_max, rate, "map maximum of each tile (any mask pixel)", seed)
    return {"image": image, "pixel": pixel, "rules": {"image": image_rule, "pixel": pixel_rule}}
