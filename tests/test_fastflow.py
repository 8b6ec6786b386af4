"""FastFlow: the flow's invertibility and log-det, its training on real features, the score map."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from conftest import tiny_config
from torch.autograd.functional import jacobian

from hiad_train.components.flow import AffineCoupling, Flow2d
from hiad_train.config import ConfigError, load_config
from hiad_train.data import read_mvtec
from hiad_train.data.textures import build_texture_set
from hiad_train.detectors.fastflow import FastFlow, FastFlowConfig, FastFlowModel
from hiad_train.trainer import HRTrainer


def _randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The module in float64 with random parameters (a fresh flow is the identity, too easy a case)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return module.double()


def _channels(flow: torch.nn.Module) -> int:
    coupling = flow if isinstance(flow, AffineCoupling) else flow.steps[0].coupling
    return coupling.kept + coupling.changed


@pytest.mark.parametrize(
    "flow",
    [
        AffineCoupling(5, kernel_size=3, hidden_ratio=1.0),
        Flow2d(5, steps=3, hidden_ratio=0.5, conv3x3_only=False, seed=1),
        Flow2d(4, steps=2, hidden_ratio=1.0, conv3x3_only=True, seed=2),
    ],
    ids=["coupling", "flow", "flow-3x3-only"],
)
def test_flow_inverts_and_log_det_is_the_jacobians(flow):
    flow = _randomized(flow)
    x = torch.randn(2, _channels(flow), 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z, log_det = flow(x)
        assert not torch.allclose(z, x)
        torch.testing.assert_close(flow.inverse(z), x, rtol=0, atol=1e-10)
    for i in range(x.shape[0]):
        jac = jacobian(lambda v: flow(v[None])[0][0], x[i]).reshape(x[i].numel(), x[i].numel())
        sign, log_abs_det = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(log_det[i], log_abs_det, rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def real_features(train_samples):
    """Backbone features of the ELPV fixture's 128 px tiles (2x2 per 256 px module)."""
    config = FastFlowConfig(total_epochs=1)
    images = np.stack([s.image((256, 256)) for s in train_samples])
    tiles = images.reshape(-1, 2, 128, 2, 128, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 128, 128, 3)
    with torch.no_grad():
        return list(FastFlow.build_embedder(config)(torch.from_numpy(np.ascontiguousarray(tiles))))


def test_loss_decreases_on_real_features(real_features):
    config = FastFlowConfig(total_epochs=1, flow_step=2, hidden_ratio=0.5)
    torch.manual_seed(0)
    features = [f[:8] for f in real_features]
    model = FastFlowModel([tuple(f.shape[1:]) for f in features], config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    losses = []
    for _ in range(5):
        loss = model.nll(features)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05 * abs(losses[0]), losses


def test_map_is_minus_the_mean_likelihood_over_scales(real_features):
    """Against numpy + OpenCV: exp(-0.5 * mean_c z^2) per scale, bilinear to the first grid, averaged, negated."""
    config = FastFlowConfig(total_epochs=1, flow_step=2)
    model = _randomized(FastFlowModel([tuple(f.shape[1:]) for f in real_features], config), seed=1).float()
    features = [f[:2] for f in real_features]
    with torch.no_grad():
        scores = model(*features).numpy()
        latents = [z.numpy() for z, _ in model.latents(features)]
    h, w = features[0].shape[-2:]
    for b in range(2):
        probs = [np.exp(-0.5 * (z[b] ** 2).mean(0)) for z in latents]
        expected = -np.mean([cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) for p in probs], axis=0)
        np.testing.assert_allclose(scores[b], expected, rtol=0, atol=1e-5)
    assert scores.shape == (2, h, w) and scores.std() > 0


def test_state_round_trip_gives_the_same_head(real_features):
    config = FastFlowConfig(total_epochs=1, flow_step=2)
    model = _randomized(FastFlowModel([tuple(f.shape[1:]) for f in real_features], config), seed=2).float()
    detector = FastFlow(config)
    detector.net = model.eval()
    restored = FastFlow.from_state(config, detector.state())
    features = [f[:2] for f in real_features]
    torch.testing.assert_close(restored.score(features), detector.score(features), rtol=0, atol=0)


def test_config_reads_hiads_keys():
    config = tiny_config(detector="fastflow", patch={"num_epochs": 7, "flow_step": 4, "conv3x3_only": True}).patch
    assert isinstance(config, FastFlowConfig)
    assert config.total_epochs == 7 and config.flow_step == 4 and config.conv3x3_only
    with pytest.raises(ConfigError, match="patch.flow_steps: unknown key \\(did you mean 'flow_step'\\?\\)"):
        tiny_config(detector="fastflow", patch={"flow_steps": 4})


def test_cpu_setting_does_not_score_tile_borders_above_the_interior(tmp_path):
    """Issue #20: with one flow per tile position, the CPU setting's few steps per flow leave each flow near
    its identity start; its score is then the layer-normalized feature energy, highest on every tile's
    border cells, and the image score (a maximum over the map) reads tile borders instead of defects.
    The setting trains one flow on all tiles (same work, 16x the steps per flow), which learns them."""
    data = build_texture_set(tmp_path, "gravel", 256, n_train=8, n_test=4, seed=1)  # 4 tiles of 128 px per image
    config = load_config("configs/fastflow_cpu.yaml", {"image_size": 256, "patch_size": 128, "val_config": None})
    model = HRTrainer(config, progress=False).fit(read_mvtec(data, "train"))
    normal = [s.image((256, 256)) for s in read_mvtec(data, "test") if s.label == 0]
    grids = np.stack([grid for image in normal for _, _, grid in model.raw_tile_scores(image)])
    border = np.zeros(grids.shape[1:], bool)
    border[[0, -1]] = border[:, [0, -1]] = True
    assert grids[:, border].mean() <= grids[:, ~border].mean(), (grids[:, border].mean(), grids[:, ~border].mean())
