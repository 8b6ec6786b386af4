"""PaDiM: its Gaussian maths against numpy/scipy, its embedding against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from hiad_train.components.gaussian import gaussian_statistics, mahalanobis, regularized_inverse
from hiad_train.detectors import padim
from hiad_train.detectors.base import TaskData
from hiad_train.detectors.padim import PaDiM, PaDiMConfig, PaDiMEmbedder, channel_subset


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


class _FixedMaps(torch.nn.Module):
    """Stands in for the backbone: returns the given maps whatever the image."""

    def __init__(self, maps):
        super().__init__()
        self.maps = maps

    def forward(self, image):
        return self.maps


def test_embedder_repeats_coarse_layers_and_keeps_a_seeded_channel_subset():
    rng = np.random.default_rng(2)
    fine, coarse = rng.normal(size=(2, 3, 4, 6)), rng.normal(size=(2, 5, 2, 3))
    maps = (torch.tensor(fine, dtype=torch.float32), torch.tensor(coarse, dtype=torch.float32))
    embedder = PaDiMEmbedder(_FixedMaps(maps), channels=[3, 5], embed_dimension=4)
    (out,) = embedder(torch.zeros(2, 32, 48, 3, dtype=torch.uint8))

    idx = embedder.channel_indices.numpy()
    assert len(set(idx)) == 4 and idx.min() >= 0 and idx.max() < 8
    np.testing.assert_array_equal(idx, channel_subset(8, 4).numpy())  # same draw every time: tasks and export agree
    stacked = np.concatenate([fine, coarse.repeat(2, axis=2).repeat(2, axis=3)], axis=1)  # PaDiM's embedding_concat
    np.testing.assert_allclose(out.numpy(), stacked[:, idx], rtol=1e-6)
    with pytest.raises(ValueError, match="embed_dimension 9 exceeds the 8 channels"):
        channel_subset(8, 9)


def test_fit_and_head_equal_a_per_position_numpy_reference(monkeypatch):
    monkeypatch.setattr(padim, "POSITIONS_PER_CHUNK", 4)  # 15 positions: several chunks, a short last one

    rng = np.random.default_rng(3)
    train = rng.normal(size=(9, 6, 3, 5)).astype(np.float32)
    query = rng.normal(size=(2, 6, 3, 5)).astype(np.float32) * 1.5
    detector = PaDiM(PaDiMConfig(embed_dimension=6))
    data = TaskData(features=[torch.from_numpy(train)], tiles=None, embedder=None, synthesizer=None, validate=None)
    detector.fit(data)
    restored = PaDiM.from_state(detector.config, detector.state())
    got = restored.score([torch.from_numpy(query)]).numpy()
    assert got.shape == (2, 3, 5)
    for i, j in np.ndindex(3, 5):
        samples = train[:, :, i, j].astype(np.float64)
        vi = np.linalg.inv(np.cov(samples, rowvar=False) + 0.01 * np.eye(6))
        for b in range(2):
            expected = scipy_mahalanobis(query[b, :, i, j], samples.mean(axis=0), vi)
            assert got[b, i, j] == pytest.approx(expected, rel=1e-4)
    assert restored.head_params() == {"positions": 15, "channels": 6, "bytes": 15 * 6 * 6 * 4 + 15 * 6 * 4}
