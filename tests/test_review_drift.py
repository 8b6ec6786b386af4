"""Drift: the KS distance to the bundle's normal-score law, its level, and its window."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from hiad_runtime.review.drift import DriftMonitor, GumbelReference, ks_distance, level

THRESHOLDS = {  # as false_alarm_thresholds records them: 8 images of 16 tiles
    "image": 0.9,
    "pixel": 1.0,
    "rules": {"image": {"rule": "false_alarm_rate", "images": 8, "tiles": 128, "fit": {"loc": 0.3, "scale": 0.05}}},
}


def _normal_scores(n: int, seed: int) -> np.ndarray:
    """Image scores as the reference law says normal images score: the largest of 16 Gumbel tile statistics."""
    return stats.gumbel_r.rvs(0.3, 0.05, size=(n, 16), random_state=seed).max(axis=1)


def test_reference_comes_from_the_rule_that_recorded_a_fit_of_normal_images():
    ref = GumbelReference.from_thresholds(THRESHOLDS)
    assert (ref.loc, ref.scale, ref.tiles) == (0.3, 0.05, 16)
    max_miss = {"image": 0.7, "rules": {"image": {**THRESHOLDS["rules"]["image"], "rule": "max_miss"}}}
    assert GumbelReference.from_thresholds(max_miss) == ref
    f1 = {"image": 0.5, "rules": {"image": {"rule": "f1", "images": 3, "tiles": 40}}}
    assert GumbelReference.from_thresholds(f1) is None and GumbelReference.from_thresholds(None) is None


def test_ks_distance_is_scipys_statistic():
    ref = GumbelReference.from_thresholds(THRESHOLDS)
    scores = _normal_scores(200, 0) + 0.02
    expected = stats.kstest(scores, lambda s: ref.cdf(s)).statistic
    assert ks_distance(scores, ref) == pytest.approx(expected, abs=1e-12)


def test_levels_normal_shifted_and_too_few():
    ref = GumbelReference.from_thresholds(THRESHOLDS)
    normal = _normal_scores(500, 1)
    assert level(ks_distance(normal, ref), 500) == "ok"
    assert level(ks_distance(normal + 0.03, ref), 500) == "warn"  # about half a tile scale
    assert level(ks_distance(normal + 0.2, ref), 500) == "alarm"
    assert level(ks_distance(normal[:20] + 0.2, ref), 20) == "unknown"  # too few to say
    # 40 scores: critical values 1.36 / sqrt(40) = 0.215 (5 %) and 1.63 / sqrt(40) = 0.258 (1 %)
    assert level(0.21, 40) == "ok"  # above WARN_D, yet within what 40 normal scores show by chance
    assert level(0.3, 40) == "warn" and level(0.36, 40) == "alarm"


def test_monitor_window_follows_the_bundle():
    monitor = DriftMonitor(window=50)
    monitor.use_bundle("a", THRESHOLDS, list(_normal_scores(10, 2)))
    for s in _normal_scores(60, 3) + 0.2:
        monitor.observe("a", s)
    monitor.observe("other", 5.0)  # scored by a bundle no longer in service: ignored
    report = monitor.report()
    assert report.scores == 50 and report.level == "alarm" and report.bundle_id == "a"
    monitor.use_bundle("a", THRESHOLDS)  # the same bundle again (a reload of the same version): window kept
    assert monitor.report().scores == 50
    monitor.use_bundle("b", None)
    assert monitor.report().scores == 0 and monitor.report().level == "unknown"
    assert monitor.report().distance is None
