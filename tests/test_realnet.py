"""RealNet's parts: AFS's channel errors, RRS's top-residual selection, the reconstruction U-Net, sizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hiad_train.components.channel_selection import afs_channel_errors, select_channels, top_residual_channels
from hiad_train.components.unet import ReconstructionUNet, attention_heads, group_norm
from hiad_train.config import ConfigError, load_config, parse_config
from hiad_train.detectors import TaskData
from hiad_train.detectors.realnet import RealNet, RealNetConfig


def test_afs_errors_match_a_numpy_reference_and_find_the_anomalous_channels():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(3, 8, 6, 6)).astype(np.float32)
    mask = np.zeros((3, 1, 12, 12), np.float32)
    mask[0, 0, 2:8, 4:10] = 1
    mask[2, 0, 6:12, 0:6] = 1
    small = mask[:, :, ::2, ::2]  # nearest resize by 2
    anomalous = clean + 0.01 * rng.normal(size=clean.shape).astype(np.float32)
    anomalous[:, [1, 5]] += 3 * small  # channels 1 and 5 change where the anomaly is
    anomalous[:, 6] += rng.normal(size=(3, 6, 6)).astype(np.float32)  # channel 6 changes everywhere

    expected = []
    for c in range(8):
        d = ((anomalous[:, c] - clean[:, c]) ** 2).ravel()
        d = (d - d.min()) / (d.max() - d.min() + 1e-4)
        expected.append(((d - small[:, 0].ravel()) ** 2).mean())
    errors = afs_channel_errors(torch.from_numpy(anomalous), torch.from_numpy(clean), torch.from_numpy(mask))
    np.testing.assert_allclose(errors.numpy(), expected, rtol=1e-5)
    assert select_channels(errors, 2).tolist() == [1, 5]


def test_select_channels_keeps_the_smallest_in_index_order_and_ranks_nan_last():
    errors = torch.tensor([0.5, float("nan"), 0.1, 0.3, 0.2])
    assert select_channels(errors, 3).tolist() == [2, 3, 4]
    assert select_channels(errors, 5).tolist() == [0, 1, 2, 3, 4]


def test_top_residual_channels_match_a_numpy_reference():
    rng = np.random.default_rng(1)
    residual = rng.random((2, 10, 4, 5)).astype(np.float32)
    ranking = rng.normal(size=(2, 10, 4, 5)).astype(np.float32)
    chosen = top_residual_channels(
        torch.from_numpy(residual), torch.from_numpy(ranking), ["max", "mean"], [3, 2]
    ).numpy()
    assert chosen.shape == (2, 5, 4, 5)
    for b in range(2):
        by_max = np.argsort(-ranking[b].reshape(10, -1).max(axis=1))[:3]
        by_mean = np.argsort(-ranking[b].reshape(10, -1).mean(axis=1))[:2]
        np.testing.assert_array_equal(chosen[b], residual[b, np.concatenate([by_max, by_mean])])


def test_unet_keeps_the_shape_starts_at_zero_and_sizes_narrow_widths():
    assert [group_norm(c).num_groups for c in (10, 20, 64, 56)] == [2, 4, 32, 8]
    assert [attention_heads(c) for c in (40, 128, 112, 1024)] == [1, 2, 1, 16]
    torch.manual_seed(0)
    unet = ReconstructionUNet(20, 10, num_res_blocks=2, channel_mult=[1, 2, 4], attention_mult=[2, 4])
    with torch.no_grad():
        out = unet(torch.randn(2, 20, 16, 12))
    assert out.shape == (2, 20, 16, 12) and float(out.abs().max()) == 0.0  # zero-initialized output layer

    unet = ReconstructionUNet(20, 10, num_res_blocks=1, channel_mult=[1, 2], attention_mult=[2])
    x = torch.randn(2, 20, 8, 8)
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = (unet(x) - x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]  # it learns to reconstruct


def test_channel_counts_follow_the_backbone():
    config = RealNetConfig()
    detector = RealNet(config)  # EfficientNet-Lite0 stages 2, 3: 40 and 112 channels
    assert [len(getattr(detector.net, f"afs_{s}")) for s in range(2)] == [20, 56]
    assert detector.net.numbers == [25, 25]
    sized = RealNet(RealNetConfig(planes=[8, 30], mode_numbers=[10, 4])).net
    assert [len(sized.afs_0), len(sized.afs_1)] == [8, 30] and sized.numbers == [10, 4]
    with pytest.raises(ValueError, match="112"):
        RealNet(RealNetConfig(planes=[20, 200]))
    with pytest.raises(ValueError, match="mode_numbers"):
        RealNet(RealNetConfig(planes=[8, 8], mode_numbers=[10, 20]))


def test_state_round_trip_and_the_score_grid():
    config = RealNetConfig(num_res_blocks=1, channel_mult=[1, 2], attention_mult=[2])
    embedder = RealNet.build_embedder(config, pretrained=False)
    with torch.no_grad():
        features = embedder(torch.randint(0, 256, (2, 64, 96, 3), dtype=torch.uint8))
    assert [tuple(f.shape) for f in features] == [(2, 40, 8, 12), (2, 112, 4, 6)]
    detector = RealNet(config, seed=3)
    detector.net.afs_1.copy_(torch.arange(56) * 2)  # as AFS would: a chosen subset
    scores = detector.score(features)
    assert scores.shape == (2, 16, 24) and 0 <= float(scores.min()) and float(scores.max()) <= 1
    restored = RealNet.from_state(config, detector.state())
    assert torch.equal(restored.net.afs_1, detector.net.afs_1)
    torch.testing.assert_close(restored.score(features), scores)


def test_configs_load_with_hiad_keys_and_lists_are_checked():
    for name in ("realnet", "realnet_cpu"):
        config = load_config(f"configs/{name}.yaml")
        assert config.detector == "realnet" and config.patch.total_epochs == {"realnet": 150, "realnet_cpu": 12}[name]
    base = {"image_size": 256, "patch_size": 128, "detector": "realnet"}
    with pytest.raises(ConfigError, match="planes"):
        parse_config({**base, "patch": {"planes": [8]}})
    with pytest.raises(ConfigError, match="modes"):
        parse_config({**base, "patch": {"modes": ["max", "median"]}})


def test_fit_refuses_grids_the_unet_cannot_halve_and_lone_tiles():
    config = RealNetConfig(batch_size=2)
    features = [torch.zeros(2, 40, 6, 6), torch.zeros(2, 112, 3, 3)]
    data = TaskData(features, np.zeros((2, 48, 48, 3), np.uint8), nn.Identity(), lambda t, r: (t, t[..., 0] > 0), None)
    with pytest.raises(ValueError, match="divisible by 4"):
        RealNet(config).fit(data)
    data.tiles = data.tiles[:1]
    with pytest.raises(ValueError, match="at least 2 tiles"):
        RealNet(config).fit(data)


class ColourAndNoise(nn.Module):
    """A stand-in embedder with EfficientNet-Lite0's stage widths: per stage, the tile's pooled colour
    in channels 0-2 (they change where a tile is painted), fixed noise in the rest (they never do)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.noise = [torch.randn(1, c - 3, 1, 1, generator=generator) for c in (40, 112)]

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image = tiles.permute(0, 3, 1, 2).float() / 255
        outputs = []
        for pool, noise in zip((8, 16), self.noise):
            colour = nn.functional.avg_pool2d(image, pool)
            outputs.append(torch.cat([colour, noise.expand(len(tiles), -1, *colour.shape[-2:])], dim=1))
        return tuple(outputs)


def paint_square(tile: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y, x = rng.integers(0, 16, size=2)
    mask = np.zeros(tile.shape[:2], bool)
    mask[y : y + 16, x : x + 16] = True
    painted = tile.copy()
    painted[mask] = 255
    return painted, mask


def test_afs_keeps_the_channels_a_synthetic_anomaly_changes():
    tiles = np.random.default_rng(0).integers(0, 100, size=(6, 32, 32, 3), dtype=np.uint8)
    embedder = ColourAndNoise()
    with torch.no_grad():
        features = list(embedder(torch.from_numpy(tiles)))
    detector = RealNet(RealNetConfig(planes=[3, 3], mode_numbers=[2, 2], batch_size=2, init_bsn=4))
    detector._choose_channels(TaskData(features, tiles, embedder, paint_square, None), np.random.default_rng(0))
    assert detector.net.afs_0.tolist() == [0, 1, 2] and detector.net.afs_1.tolist() == [0, 1, 2]
