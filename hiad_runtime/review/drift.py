"""Drift: are the recent images' scores distributed as the bundle's normal images' were?

Reference: the normal images' law recorded with the bundle's image threshold (`thresholds.rules.image`,
rule `false_alarm_rate` written at export from the validation images, or either rule written by
`hiad-train calibrate` from the line's own normal images, `max_miss` included): each tile's score
statistic follows a Gumbel law (`fit.loc`, `fit.scale`) and an image scores its largest tile, so a
normal image's score has the CDF F(s) = exp(-T exp(-(s - loc) / scale))
with T = tiles per image. No manifest change is needed; a bundle
whose threshold was set otherwise (rule `f1`, or none) has no reference and its drift is `unknown`.

Statistic: the Kolmogorov-Smirnov distance D = sup_s |F_n(s) - F(s)| between the empirical CDF of the
last `window` scores and F. Level: `unknown` below MIN_SCORES scores; `alarm` when D passes both the
1 % critical value 1.63 / sqrt(n) and ALARM_D, `warn` when it passes the 5 % value 1.36 / sqrt(n) and
WARN_D, else `ok`. The fixed floors keep a long window from alarming at a shift too small to matter
(the Gumbel law is itself a fit of a few images: a D of a few hundredths is within its error).
"""

from __future__ import annotations

import collections
import math
import threading
from dataclasses import asdict, dataclass

import numpy as np

MIN_SCORES = 30  # below this many scores a KS distance says little: the level is `unknown`
WARN_D, ALARM_D = 0.2, 0.35  # the smallest distances worth a warning, an alarm
LEVELS = {"unknown": -1, "ok": 0, "warn": 1, "alarm": 2}  # as exposed in /metrics


@dataclass(frozen=True)
class GumbelReference:
    """The normal images' score law: the largest of `tiles` Gumbel(loc, scale) tile statistics."""

    loc: float
    scale: float
    tiles: int
    source: str  # which record of the manifest it came from

    @classmethod
    def from_thresholds(cls, thresholds: dict | None) -> "GumbelReference | None":
        """The reference recorded with the image threshold (its rule's Gumbel fit of normal images: a
        false-alarm-rate or max-miss rule), else None."""
        rule = ((thresholds or {}).get("rules") or {}).get("image") or {}
        fit = rule.get("fit")
        if not fit or not rule.get("images") or not rule.get("tiles"):
            return None
        tiles = max(1, round(rule["tiles"] / rule["images"]))
        source = f"thresholds.rules.image.fit ({rule['images']} normal images, {tiles} tiles each)"
        return cls(float(fit["loc"]), float(fit["scale"]), tiles, source)

    def cdf(self, scores: np.ndarray) -> np.ndarray:
        """P(a normal image scores <= s), for each s."""
        z = (np.asarray(scores, np.float64) - self.loc) / self.scale
        return np.exp(-self.tiles * np.exp(-np.clip(z, -50, None)))


def ks_distance(scores: np.ndarray, reference: GumbelReference) -> float:
    """sup |F_n - F| between the scores' empirical CDF and the reference's CDF."""
    x = np.sort(np.asarray(scores, np.float64))
    n = len(x)
    f = reference.cdf(x)
    i = np.arange(1, n + 1)
    return float(max((i / n - f).max(), (f - (i - 1) / n).max()))


def level(distance: float | None, n: int) -> str:
    """The warning level of a KS distance over n scores (see the module docstring)."""
    if distance is None or n < MIN_SCORES:
        return "unknown"
    if distance > max(ALARM_D, 1.63 / math.sqrt(n)):
        return "alarm"
    if distance > max(WARN_D, 1.36 / math.sqrt(n)):
        return "warn"
    return "ok"


@dataclass(frozen=True)
class DriftReport:
    """What /v1/model, /metrics and the review page show."""

    statistic: str
    window: int
    scores: int
    distance: float | None
    level: str
    bundle_id: str | None
    reference: dict | None
    thresholds: dict

    def as_json(self) -> dict:
        """The report as JSON-ready data."""
        return asdict(self)


class DriftMonitor:
    """The last `window` image scores of the bundle in service, and their distance to its reference.

    A new bundle starts a new window: scores of another model are on another scale."""

    def __init__(self, window: int = 500):
        if window < MIN_SCORES:
            raise ValueError(f"drift window {window}: at least {MIN_SCORES} scores")
        self.window = window
        self.scores: collections.deque[float] = collections.deque(maxlen=window)
        self.reference: GumbelReference | None = None
        self.bundle_id: str | None = None
        self._lock = threading.Lock()

    def use_bundle(self, bundle_id: str, thresholds: dict | None, scores: list[float] = ()) -> None:
        """Switch to a bundle (its reference), starting from `scores` (oldest first) when it changed."""
        with self._lock:
            if bundle_id != self.bundle_id:
                self.scores.clear()
                self.scores.extend(scores)
            self.bundle_id = bundle_id
            self.reference = GumbelReference.from_thresholds(thresholds)

    def observe(self, bundle_id: str, score: float) -> None:
        """One image's score (ignored if another bundle than the one in service scored it)."""
        with self._lock:
            if bundle_id == self.bundle_id and math.isfinite(score):
                self.scores.append(float(score))

    def report(self) -> DriftReport:
        """The statistic now."""
        with self._lock:
            scores, reference = np.array(self.scores), self.reference
        distance = ks_distance(scores, reference) if reference is not None and len(scores) else None
        return DriftReport(
            statistic="Kolmogorov-Smirnov distance to the normal images' Gumbel score law",
            window=self.window,
            scores=len(scores),
            distance=None if distance is None else round(distance, 4),
            level=level(distance, len(scores)) if reference is not None else "unknown",
            bundle_id=self.bundle_id,
            reference=None if reference is None else asdict(reference),
            thresholds={"warn": WARN_D, "alarm": ALARM_D, "min_scores": MIN_SCORES},
        )
