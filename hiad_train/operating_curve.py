"""The operating curve a line reads its thresholds from.

For each candidate threshold (an image is flagged when its score reaches it): the false-alarm rate on
the normal images and the miss rate on the defective ones, each with an exact (Clopper-Pearson)
interval from the number of images behind it. A rate seen on 20 images is a wide interval, so the
curve says how sure each figure is, and `images_needed` how many images a stated precision takes.
`max_miss_threshold` is the alternative goal to a false-alarm rate: the highest threshold that misses
at most a given share of the defective images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.90  # two-sided, as the false-alarm rule's achieved-rate interval


@dataclass(frozen=True)
class Rate:
    """`count` of `total` images, and its exact interval."""

    count: int
    total: int

    @property
    def value(self) -> float:
        return self.count / self.total

    def interval(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        ci = stats.binomtest(self.count, self.total).proportion_ci(confidence, method="exact")
        return float(ci.low), float(ci.high)

    def __str__(self) -> str:
        low, high = self.interval()
        return f"{self.value:6.1%} ({self.count}/{self.total}; {low:.1%}-{high:.1%})"


@dataclass(frozen=True)
class OperatingPoint:
    """One threshold: the normal images it flags and the defective images it misses."""

    threshold: float
    false_alarms: Rate
    misses: Rate


def operating_curve(normal: np.ndarray, defective: np.ndarray, points: int = 12) -> list[OperatingPoint]:
    """At most `points` operating points, from flagging every image to flagging none, at thresholds
    where a rate changes (every distinct score), evenly spread over them."""
    normal, defective = np.sort(np.asarray(normal, np.float64)), np.sort(np.asarray(defective, np.float64))
    if not normal.size or not defective.size:
        raise ValueError("an operating curve needs normal and defective images")
    candidates = np.unique(np.concatenate([normal, defective]))
    keep = np.unique(np.linspace(0, candidates.size - 1, min(points, candidates.size)).round().astype(int))
    return [
        OperatingPoint(
            float(t),
            Rate(int(normal.size - np.searchsorted(normal, t, "left")), normal.size),
            Rate(int(np.searchsorted(defective, t, "left")), defective.size),
        )
        for t in candidates[keep]
    ]


def max_miss_threshold(defective: np.ndarray, rate: float) -> float:
    """The highest threshold that misses at most floor(rate * n) of the n defective images' scores."""
    if not 0 <= rate < 1:
        raise ValueError(f"max miss rate {rate}: use 0 <= rate < 1")
    scores = np.sort(np.asarray(defective, np.float64))
    if not scores.size:
        raise ValueError("a max-miss threshold needs defective images (--defective)")
    return float(scores[math.floor(rate * scores.size + 1e-9)])


def images_needed(rate: float, confidence: float = 0.95) -> int:
    """Images with no event it takes to show, at one-sided `confidence`, that the true rate is below
    `rate` (the exact bound; 3 / rate, the rule of three, at 95 %)."""
    return math.ceil(math.log(1 - confidence) / math.log1p(-rate))


def describe_curve(kind: str, curve: list[OperatingPoint]) -> str:
    """The curve as a table a line engineer reads: threshold, false alarms and misses with intervals."""
    normal, defective = curve[0].false_alarms.total, curve[0].misses.total
    lines = [
        f"{kind} operating curve ({normal} normal, {defective} defective image(s); rate (count; 90% interval)):",
        f"  {'threshold':>10}  {'false alarms':<28}  misses",
    ]
    lines += [f"  {p.threshold:>10.4g}  {str(p.false_alarms):<28}  {p.misses}" for p in curve]
    lines.append(
        f"  to show a false-alarm rate below 1% (95%) takes {images_needed(0.01)} normal images with none "
        f"flagged; a miss rate below 5%, {images_needed(0.05)} defective images with none missed"
    )
    return "\n".join(lines)
