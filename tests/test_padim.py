"""PaDiM: its Gaussian maths against numpy/scipy, its embedding against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from hiad_train.components.gaussian import gaussian_statistics, mahalanobis, regularized_inverse


def test_statistics_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5, 7)).astype(np.float32) * rng.uniform(0.5, 3, size=(1, 5, 1)).astype(np.float32)
    mean, cov = gaussian_statistics(torch.from_numpy(x))
    assert mean.shape == (7, 5) and cov.shape == (7, 5, 5)
    for p in range(7):
        np.testing.assert_allclose(mean[p].numpy(), x[:, :, p].mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cov[p].numpy(), np.cov(x[:, :, p], rowvar=False), rtol=1e-5, atol=1e-6)


def test_statistics_need_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_statistics(torch.zeros(1, 3, 4))


def test_mahalanobis_equals_scipy():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(6, 4, 3))  # fewer samples than channels + 1 would make cov singular without the ridge
    queries = rng.normal(size=(3, 2, 4)).astype(np.float32) * 2  # (P, B, C)
    mean, cov = gaussian_statistics(torch.from_numpy(train))
    inverse = regularized_inverse(cov)
    got = mahalanobis(torch.from_numpy(queries), mean, inverse).numpy()
    assert got.shape == (3, 2)
    for p in range(3):
        vi = np.linalg.inv(np.cov(train[:, :, p], rowvar=False) + 0.01 * np.eye(4))
        for b in range(2):
            expected = scipy_mahalanobis(queries[p, b], train[:, :, p].mean(axis=0), vi)
            assert got[p, b] == pytest.approx(expected, rel=1e-4)
