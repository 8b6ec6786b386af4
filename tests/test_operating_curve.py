"""The operating curve and the max-miss rule: counts, exact intervals, and the images a precision takes."""

import numpy as np
import pytest

from hiad_train.operating_curve import Rate, images_needed, max_miss_threshold, operating_curve


def test_curve_counts_flags_and_misses_at_each_threshold():
    normal = np.array([0.1, 0.2, 0.3, 0.4])
    defective = np.array([0.35, 0.5, 0.6])
    curve = operating_curve(normal, defective, points=100)
    assert [p.threshold for p in curve] == [0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6]
    at = {p.threshold: p for p in curve}
    assert (at[0.1].false_alarms.count, at[0.1].misses.count) == (4, 0)  # flags everything
    assert (at[0.35].false_alarms.count, at[0.35].misses.count) == (1, 0)  # only 0.4 of the normal ones
    assert (at[0.5].false_alarms.count, at[0.5].misses.count) == (0, 1)
    rates = [p.false_alarms.value for p in curve]
    assert rates == sorted(rates, reverse=True)
    assert len(operating_curve(normal, defective, points=3)) == 3


def test_intervals_are_exact_and_narrow_with_more_images():
    low, high = Rate(0, 20).interval(0.90)
    assert low == 0 and high == pytest.approx(1 - 0.05 ** (1 / 20))  # Clopper-Pearson with no event
    assert Rate(0, 200).interval()[1] < high
    low, high = Rate(5, 10).interval()
    assert low < 0.5 < high


def test_max_miss_threshold_misses_at_most_the_share_given():
    defective = np.random.default_rng(0).random(40)
    for rate in (0.0, 0.05, 0.1, 0.5):
        t = max_miss_threshold(defective, rate)
        assert (defective < t).sum() <= int(rate * 40)
        assert (defective < np.nextafter(t, np.inf)).sum() > int(rate * 40)  # and it is the highest such
    with pytest.raises(ValueError, match="use 0 <= rate < 1"):
        max_miss_threshold(defective, 1.0)


def test_images_needed_follows_the_rule_of_three():
    assert images_needed(0.01) == 299  # 3 / 0.01, exactly: ceil(log 0.05 / log 0.99)
    assert images_needed(0.05) == 59
    assert Rate(0, images_needed(0.01)).interval(0.90)[1] <= 0.01  # one-sided 95 % = two-sided 90 % upper bound
