"""Thresholds a line can trust: the false-alarm-rate rule holds its rate on normal images it never saw."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_config
from scipy import stats

from hiad_train.data import read_mvtec
from hiad_train.data.elpv import build_elpv_demo
from hiad_train.thresholds import GumbelTail, false_alarm_threshold
from hiad_train.trainer import HRTrainer


def test_gumbel_level_and_rate_are_inverse():
    tail = GumbelTail(0.3, 0.05)
    for rate in (0.001, 0.01, 0.2):
        assert tail.image_rate(tail.level(rate, 16), 16) == pytest.approx(rate, rel=1e-9)
    assert tail.level(0.01, 16) > tail.level(0.01, 1)  # more tiles per image: a higher threshold


def test_interval_covers_the_true_rate_of_gumbel_tiles():
    """Tile statistics drawn from a known law: the stated interval holds the rate actually achieved."""
    truth = GumbelTail(0.4, 0.03)
    covered = 0
    for seed in range(20):
        per_image = list(np.random.default_rng(seed).gumbel(truth.loc, truth.scale, (5, 16)))
        threshold, rule = false_alarm_threshold(per_image, 0.01, "test", seed)
        low, high = rule["rate_interval_90"]
        covered += low <= truth.image_rate(threshold, 16) <= high
        assert rule["images"] == 5 and rule["tiles"] == 80
    assert covered >= 15  # a 90% interval: 18 of 20 expected


@pytest.fixture(scope="module")
def normal_modules(tmp_path_factory):
    """44 normal EL modules (2x2 real cells, 256 px): 12 to train on (4 held out), 32 never seen."""
    root = build_elpv_demo(tmp_path_factory.mktemp("far"), rows=2, cols=2, cell_size=128, n_train=44, n_test=2, seed=3)
    samples = read_mvtec(root, "train")
    return samples[:12], samples[12:]


def test_false_alarm_rate_threshold_holds_on_unseen_normal_images(normal_modules):
    train, unseen = normal_modules
    rate = 0.1  # 32 unseen images measure a 10% rate; 1% would need hundreds
    cfg = tiny_config(
        tasks={"generator": "a2o"},
        val_config={"val_sample_ratio": 0.34, "threshold": {"mode": "false_alarm_rate", "rate": rate}},
    )
    model = HRTrainer(cfg, progress=False).fit(train)
    t = model.thresholds
    rule = t["rules"]["image"]
    assert rule["rule"] == "false_alarm_rate" and rule["rate"] == rate and rule["images"] == 4 and rule["tiles"] == 16
    low, high = rule["rate_interval_90"]
    assert low <= rate <= high
    scores, maps = zip(*(model.predict(s.image((256, 256)))[::-1] for s in unseen))
    flagged = int(sum(s >= t["image"] for s in scores))
    masked = int(sum((m >= t["pixel"]).any() for m in maps))
    n = len(unseen)
    for k in (flagged, masked):  # within the binomial spread of the stated interval
        assert stats.binom.ppf(0.005, n, low) <= k <= stats.binom.ppf(0.995, n, high), (k, n, low, high)
    assert flagged < n  # not every good image flagged (what the F1-on-synthetic rule did on gravel)
