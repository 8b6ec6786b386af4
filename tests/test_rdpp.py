"""RD++: cosine maps against numpy/OpenCV, decoder geometry for two backbones, the transport cost
against an exact assignment, and a real tiny training on ELPV tiles (loss falls, state round-trips)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment, minimize

from hiad_train.backbones import backbone_geometry
from hiad_train.components.cosine import cosine_distance, multiscale_cosine_distance
from hiad_train.components.decoder import Decoder
from hiad_train.detectors.rdpp import (
    RDPP,
    RDPPConfig,
    RDPPHead,
    distillation_loss,
    sinkhorn_plan,
    transport_cost,
)


def np_cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dot = (a * b).sum(1)
    return 1 - dot / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_cosine_distance_map_equals_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 7, 5, 6, generator=g), torch.randn(2, 7, 5, 6, generator=g)
    np.testing.assert_allclose(cosine_distance(a, b).numpy(), np_cosine_distance(a.numpy(), b.numpy()), atol=1e-6)
    assert float(cosine_distance(a, 3 * a).abs().max()) < 1e-6  # scale-invariant, zero for parallel features


def test_multiscale_map_sums_scales_resized_bilinearly_to_the_first_grid():
    g = torch.Generator().manual_seed(1)
    fine = [torch.randn(1, 4, 8, 10, generator=g) for _ in range(2)]
    coarse = [torch.randn(1, 6, 4, 5, generator=g) for _ in range(2)]
    got = multiscale_cosine_distance([fine[0], coarse[0]], [fine[1], coarse[1]]).numpy()[0]
    small = np_cosine_distance(coarse[0].numpy(), coarse[1].numpy())[0].astype(np.float32)
    upsampled = cv2.resize(small, (10, 8), interpolation=cv2.INTER_LINEAR)  # half-pixel centres, as PyTorch's
    expected = np_cosine_distance(fine[0].numpy(), fine[1].numpy())[0] + upsampled
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize(
    "backbone, layers",
    [
        ("tf_efficientnet_lite0", [1, 2, 3]),
        ("tf_efficientnet_lite0", [3]),
        ("resnet18", ["layer1", "layer2", "layer3"]),
    ],
)
def test_decoder_reproduces_the_encoder_shapes(backbone, layers):
    channels, strides = backbone_geometry(RDPPConfig(backbone_name=backbone, layers_to_extract_from=layers))
    assert channels == {"tf_efficientnet_lite0": [24, 40, 112], "resnet18": [64, 128, 256]}[backbone][-len(layers) :]
    head = RDPPHead(channels, strides).eval()
    encoder = [torch.randn(2, c, 128 // s, 96 // s) for c, s in zip(channels, strides)]
    decoded = head.reconstruct(head.project(encoder))
    assert [d.shape for d in decoded] == [e.shape for e in encoder]
    assert head(*encoder).shape == (2, 128 // strides[0], 96 // strides[0])


def test_decoder_rejects_strides_that_do_not_divide():
    with pytest.raises(ValueError, match="integer factors"):
        Decoder([16, 32], [4, 6], 64, 12)


def scipy_entropic_plan(cost: np.ndarray, eps: float) -> np.ndarray:
    """The entropic OT plan for uniform weights from the dual, maximized by L-BFGS (an independent solver)."""
    n, m = cost.shape

    def negative_dual(fg):
        f, g = fg[:n], fg[n:]
        p = np.exp((f[:, None] + g[None] - cost) / eps) / (n * m)
        return -(f.mean() + g.mean() - eps * p.sum()), -np.concatenate([1 / n - p.sum(1), 1 / m - p.sum(0)])

    fg = minimize(negative_dual, np.zeros(n + m), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15}).x
    return np.exp((fg[:n, None] + fg[None, n:] - cost) / eps) / (n * m)


def test_sinkhorn_plan_equals_an_independent_solver_and_tends_to_the_optimal_assignment():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    cost = 0.5 * ((x[:, None] - y[None]) ** 2).sum(-1)
    plan = sinkhorn_plan(torch.tensor(cost), eps=0.1, iterations=1000).numpy()
    np.testing.assert_allclose(plan, scipy_entropic_plan(cost, 0.1), atol=1e-6)
    rows, cols = linear_sum_assignment(cost)
    sharp = sinkhorn_plan(torch.tensor(cost), eps=0.01, iterations=3000).numpy()
    assert abs((sharp * cost).sum() - cost[rows, cols].mean()) < 1e-3  # uniform weights: a permutation / n
    # RD++'s regime: softmax vectors lie far closer together than blur, the plan is nearly uniform and
    # the cost is about the batch's mean pairwise half squared distance, so minimizing it compacts the batch.
    z = 1e-3 * x
    spread = 0.5 * ((z[:, None] - z[None]) ** 2).sum(-1).mean()
    got = float(transport_cost(torch.tensor(z), torch.tensor(z[::-1].copy())))
    assert abs(got - spread) < 0.01 * spread


@pytest.fixture(scope="module")
def tiny_task(train_samples):
    from hiad_train.detectors.base import TaskData
    from hiad_train.synthesis import SYNTHESIZERS

    config = RDPPConfig(layers_to_extract_from=[2, 3], total_epochs=4, batch_size=4)
    embedder = RDPP.build_embedder(config)
    tiles = np.stack([s.image((256, 256))[:128, :128] for s in train_samples] * 2)
    with torch.no_grad():
        features = [f.contiguous() for f in embedder(torch.from_numpy(tiles))]
    data = TaskData(features, tiles, embedder, SYNTHESIZERS["random_box"](p=1.0), None, seed=0)
    return config, data


def test_training_lowers_the_distillation_loss_and_state_round_trips(tiny_task):
    config, data = tiny_task
    detector = RDPP(config, seed=0)

    def loss() -> float:
        with torch.no_grad():
            head = detector.head()
            return float(distillation_loss(data.features, head.reconstruct(head.project(data.features))))

    before = loss()
    record = detector.fit(data)
    print(f"distillation loss {before:.4f} -> {loss():.4f}")
    assert record["epochs_run"] == 4
    assert loss() < 0.7 * before
    scores = detector.score(data.features)
    assert scores.shape == (8, 16, 16) and torch.isfinite(scores).all()
    state = detector.state()
    assert all(t.is_contiguous() for t in state.values())
    again = RDPP.from_state(config, state).score(data.features)
    torch.testing.assert_close(again, scores, rtol=0, atol=0)


def test_fit_names_mismatched_features(tiny_task):
    config, data = tiny_task
    detector = RDPP(config.model_copy(update={"layers_to_extract_from": [1, 2, 3]}))
    with pytest.raises(ValueError, match=r"channels \[24, 40, 112\], got \[40, 112\]"):
        detector.fit(data)
