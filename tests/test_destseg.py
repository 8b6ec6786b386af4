"""DeSTSeg's parts: the student's shape contract and training signal, the segmentation net, its losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from hiad_train.components.segmentation import SegmentationNet, focal_loss, segmentation_loss, segmentation_width
from hiad_train.components.student import Student, encoder_widths, student_loss
from hiad_train.config import ConfigError, load_config
from hiad_train.detectors.destseg import DeSTSeg, DeSTSegConfig


def test_encoder_widths_follow_the_teacher():
    assert encoder_widths([128, 256], [8, 16]) == [32, 64, 128, 256, 512]  # ResNet-18 stages 2, 3
    assert encoder_widths([40, 112], [8, 16]) == [16, 20, 40, 112, 224]  # EfficientNet-Lite0 stages 2, 3
    with pytest.raises(ValueError, match="powers of two"):
        encoder_widths([40], [12])


def test_student_maps_take_each_teacher_grid():
    torch.manual_seed(0)
    student = Student([24, 40], [4, 8]).eval()
    teacher = [torch.zeros(2, 24, 25, 17), torch.zeros(2, 40, 13, 9)]  # odd sizes: a 100 x 68 image
    with torch.no_grad():
        maps = student(torch.randn(2, 3, 100, 68), teacher)
    assert [tuple(m.shape) for m in maps] == [tuple(t.shape) for t in teacher]


def test_student_loss_is_the_cosine_distance_and_training_lowers_it():
    a, b = torch.randn(3, 5, 4, 4), torch.randn(3, 5, 4, 4)
    an, bn = a.numpy(), b.numpy()
    cos = (an * bn).sum(1) / np.linalg.norm(an, axis=1) / np.linalg.norm(bn, axis=1)
    assert float(student_loss([a], [b])) == pytest.approx(float((1 - cos).mean()), rel=1e-5)
    assert float(student_loss([a, a], [a, 2 * a])) == pytest.approx(0.0, abs=1e-6)

    torch.manual_seed(0)
    student = Student([8, 16], [4, 8])
    images = torch.randn(4, 3, 16, 16)
    teacher = [torch.randn(4, 8, 4, 4), torch.randn(4, 16, 2, 2)]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = student_loss(student(images, teacher), teacher)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_segmentation_net_gives_probabilities_on_the_input_grid():
    torch.manual_seed(0)
    net = SegmentationNet(152).eval()
    assert segmentation_width(384) == 256 and segmentation_width(152) == 104
    with torch.no_grad():
        out = net(torch.randn(3, 152, 20, 12) * 5)
    assert out.shape == (3, 1, 20, 12)
    assert float(out.min()) >= 0 and float(out.max()) <= 1 and float(out.std()) > 0


def test_focal_and_l1_losses_on_a_hand_made_mask():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:7] = 1
    logits = torch.randn(1, 1, 8, 8)
    p = torch.sigmoid(logits)
    # Independent reference: torchvision's focal loss on logits (alpha < 0 disables class weighting).
    reference = sigmoid_focal_loss(logits, mask, alpha=-1, gamma=4, reduction="mean")
    assert float(focal_loss(p, mask, gamma=4)) == pytest.approx(float(reference), rel=1e-4)
    assert float(focal_loss(p, mask, gamma=0)) == pytest.approx(float(F.binary_cross_entropy(p, mask)), rel=1e-5)
    l1 = np.abs(p.numpy() - mask.numpy()).mean()
    assert float(segmentation_loss(p, mask, 4)) == pytest.approx(float(reference) + l1, rel=1e-4)

    right = mask * 0.98 + 0.01
    wrong = 1 - right
    assert float(segmentation_loss(right, mask, 4)) < 0.02
    assert float(segmentation_loss(wrong, mask, 4)) > 0.9
    # gamma down-weights pixels already classified well: the easy half loses more than the hard half.
    half = torch.where(torch.arange(8)[None, None, None, :] < 4, right, torch.full_like(mask, 0.5))
    assert float(focal_loss(half, mask, 4)) < float(focal_loss(half, mask, 0)) / 10


def test_state_round_trip_and_embedder_outputs():
    config = DeSTSegConfig(total_epochs=2, de_st_epochs=1)
    embedder = DeSTSeg.build_embedder(config, pretrained=False)
    with torch.no_grad():
        features = embedder(torch.randint(0, 256, (2, 64, 96, 3), dtype=torch.uint8))
    assert [tuple(f.shape) for f in features] == [(2, 40, 8, 12), (2, 112, 4, 6), (2, 3, 64, 96)]
    detector = DeSTSeg(config, seed=3)
    scores = detector.score(features)
    assert scores.shape == (2, 8, 12)
    restored = DeSTSeg.from_state(config, detector.state())
    torch.testing.assert_close(restored.score(features), scores)


def test_configs_load_and_stage_lengths_are_checked(tmp_path):
    for name in ("destseg", "destseg_cpu"):
        config = load_config(f"configs/{name}.yaml")
        assert config.detector == "destseg" and config.patch.de_st_epochs < config.patch.total_epochs
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_size: 256\npatch_size: 128\ndetector: destseg\npatch: {total_epochs: 3, de_st_epochs: 3}\n")
    with pytest.raises(ConfigError, match="de_st_epochs"):
        load_config(bad)


def test_a_single_training_tile_is_refused():
    from hiad_train.detectors import TaskData

    config = DeSTSegConfig(total_epochs=2, de_st_epochs=1, batch_size=2)
    data = TaskData(
        [], np.zeros((1, 32, 32, 3), np.uint8), nn.Identity(), lambda tile, rng: (tile, tile[..., 0] > 0), None
    )
    with pytest.raises(ValueError, match="at least 2 tiles"):
        DeSTSeg(config).fit(data)
