"""The inference plan's functions, each on its own numbers (the end-to-end parity tests check the consumers)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiad_runtime.geometry import Box, Tiling, context_crop
from hiad_runtime.heads import exact_knn_distance
from hiad_runtime.plan import InferencePlan, route, routing_key, upsample_grid
from hiad_runtime.postprocess import Normalization, PostprocessSpec, image_score
from hiad_runtime.tasks import Task

NO_BLUR = PostprocessSpec(gaussian_sigma=0.0)


def plan_for(tiling: Tiling, **fields) -> InferencePlan:
    weights = tuple([1.0 / len(tiling.ds_factors)] * len(tiling.ds_factors))
    return InferencePlan(tiling, fields.pop("tasks", ()), weights, fields.pop("postprocess", NO_BLUR), **fields)


# -- image score -------------------------------------------------------------------------------------
def test_block_mean_max_takes_the_hottest_block_not_the_hottest_pixel():
    m = np.zeros((32, 32), np.float32)
    m[0, 0] = 16.0  # one hot pixel: its 16x16 block averages 16 / 256
    m[16:32, 16:32] = 0.5  # a warm block
    assert image_score(m, PostprocessSpec(score_pool=16)) == 0.5
    assert image_score(m, PostprocessSpec(score_pool=1)) == 16.0


def test_block_mean_max_drops_the_ragged_border_and_falls_back_to_the_mean_on_small_maps():
    m = np.zeros((20, 20), np.float32)
    m[16:, :] = 9.0  # outside the only whole 16x16 block
    assert image_score(m, PostprocessSpec(score_pool=16)) == 0.0
    small = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert image_score(small, PostprocessSpec(score_pool=16)) == pytest.approx(small.mean())


def test_top_k_mean_is_the_mean_of_the_k_largest_values():
    m = np.array([[1, 7, 3], [9, 2, 8]], np.float32)
    assert image_score(m, PostprocessSpec(score_rule="top_k_mean", score_top_k=3)) == pytest.approx(8.0)
    assert image_score(m, PostprocessSpec(score_rule="top_k_mean", score_top_k=100)) == pytest.approx(m.mean())


# -- upsampling and k-NN -----------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [3, 300])  # 300: cv2 resizes at most 256 channels at a time
def test_upsample_grid_equals_torch_bilinear(channels):
    grid = np.random.default_rng(0).standard_normal((channels, 5, 7)).astype(np.float32)
    up = upsample_grid(grid, (14, 10))
    expected = F.interpolate(torch.from_numpy(grid)[None], size=(10, 14), mode="bilinear", align_corners=False)[0]
    assert up.shape == (channels, 10, 14)
    np.testing.assert_allclose(up, expected.numpy(), atol=1e-5)
    np.testing.assert_array_equal(upsample_grid(grid, (7, 5)), grid)


def test_exact_knn_distance_is_the_mean_euclidean_distance_to_the_given_neighbours():
    rng = np.random.default_rng(1)
    queries, bank = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((10, 6)).astype(np.float32)
    indices = np.array([[0, 3], [1, 1], [9, 2], [5, 7]])
    expected = [np.mean([np.linalg.norm(q - bank[j]) for j in row]) for q, row in zip(queries, indices)]
    np.testing.assert_allclose(exact_knn_distance(queries, bank, indices), expected, rtol=1e-6)


# -- routing -----------------------------------------------------------------------------------------
def test_routing_key_is_the_l2_normalized_grid_mean_over_any_leading_axes():
    features = np.zeros((2, 3, 2, 2), np.float32)
    features[0, 0], features[0, 1] = 3.0, 4.0
    keys = routing_key(features)
    np.testing.assert_allclose(keys, [[0.6, 0.8, 0.0], [0.0, 0.0, 0.0]])  # all-zero features stay zero
    assert routing_key(np.stack([features, features])).shape == (2, 2, 3)


def test_route_picks_the_nearest_centre_and_assign_gives_tasks_their_tiles():
    centres = np.array([[1, 0], [0, 1]], np.float32)
    assert route(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32), centres).tolist() == [0, 1, 0]
    tiling = Tiling.create((8, 4), (4, 4))
    tasks = (Task("a", ()), Task("b", ()))
    features = np.zeros((2, 2, 1, 1), np.float32)
    features[0, 1], features[1, 0] = 1.0, 1.0  # tile 0 looks like centre 1, tile 1 like centre 0
    assert plan_for(tiling, tasks=tasks, centres=centres).assign(features, [0, 1]) == {"a": [1], "b": [0]}
    static = plan_for(tiling, tasks=(Task("left", (0,)), Task("right", (1,))))
    assert static.assign(None, [1]) == {"left": [], "right": [0]}  # positions within the chunk
    assert static.assign(None) == {"left": [0], "right": [1]}


# -- fusion ------------------------------------------------------------------------------------------
def test_fusion_reads_each_window_once_in_first_use_order_with_each_tiles_offsets():
    tiling = Tiling.create(2048, 512, ds_factors=[0, 1])  # HiAD's tutorial: 16 tiles, 4 windows of 1024
    fusion = plan_for(tiling).fusion([2, 0, 1, 4])
    (level,) = fusion.levels
    assert level.windows == (Box(1024, 0, 1024, 1024), Box(0, 0, 1024, 1024))
    assert level.owner == (0, 1, 1, 1)
    assert level.crops((8, 8)) == [(16, 16, 0, 0), (16, 16, 0, 0), (16, 16, 8, 0), (16, 16, 0, 8)]
    assert [context_crop(level.windows[o], t, (8, 8)) for o, t in zip(level.owner, level.tiles)] == level.crops((8, 8))
    assert plan_for(tiling).fusion().levels[0].windows == tuple(tiling.context_windows(1))


def test_fuse_adds_each_tiles_weighted_context_part_the_same_in_numpy_and_torch():
    tiling = Tiling.create((64, 32), (16, 16), ds_factors=[0, 1])
    plan = InferencePlan(tiling, (), (0.75, 0.25), NO_BLUR)
    fusion = plan.fusion([1, 2])
    rng = np.random.default_rng(2)
    main = [rng.standard_normal((2, 3, 4, 4)).astype(np.float32)]
    windows = [[rng.standard_normal((len(fusion.levels[0].windows), 3, 4, 4)).astype(np.float32)]]
    fused = fusion.fuse([m.copy() for m in main], windows, upsample_grid)[0]
    level = fusion.levels[0]
    for i, (up_w, up_h, ox, oy) in enumerate(level.crops((4, 4))):  # written out: weight x own + weight x context part
        part = upsample_grid(windows[0][0][level.owner[i]], (up_w, up_h))[:, oy : oy + 4, ox : ox + 4]
        np.testing.assert_array_equal(fused[i], main[0][i] * np.float32(0.75) + np.float32(0.25) * part)

    def torch_upsample(x, size):
        return F.interpolate(x[None], size=(size[1], size[0]), mode="bilinear", align_corners=False)[0]

    in_torch = fusion.fuse([torch.from_numpy(m) for m in main], [[torch.from_numpy(windows[0][0])]], torch_upsample)
    np.testing.assert_allclose(in_torch[0].numpy(), fused, atol=1e-5)


# -- maps --------------------------------------------------------------------------------------------
def test_overlap_counts_and_merge_average_where_tiles_overlap():
    overlapping = plan_for(Tiling.create((6, 2), (4, 2), (2, 2)))
    assert overlapping.overlap_counts.tolist() == [[1, 1, 2, 2, 1, 1]] * 2
    merged = overlapping.merge([np.zeros((2, 4), np.float32), np.ones((2, 4), np.float32)])
    np.testing.assert_allclose(merged[0], [0, 0, 0.5, 0.5, 1, 1])
    assert plan_for(Tiling.create((8, 4), (4, 4))).coverage is None  # covered once: nothing to divide


def test_merge_upsamples_each_grid_to_its_tile_and_the_assembler_streams_the_same():
    plan = plan_for(Tiling.create((8, 4), (4, 4)))
    grids = [np.full((2, 2), 1.0, np.float32), np.array([[0, 1], [0, 1]], np.float32)]
    merged = plan.merge(grids)
    assert merged.shape == (4, 8) and (merged[:, :4] == 1).all()
    assembler = plan.assembler()
    for i in (1, 0):  # any order
        assembler.add(i, grids[i])
    np.testing.assert_array_equal(assembler.result(), merged)


def test_thumbnail_map_is_normalized_at_thumbnail_size():
    norm = Normalization(1.0, 3.0)
    plan = plan_for(Tiling.create((8, 8), (4, 4)), thumbnail_size=(4, 2), thumbnail_normalization=norm)
    thumb = plan.thumbnail_map(np.full((1, 2), 2.0, np.float32))
    assert thumb.shape == (2, 4) and np.allclose(thumb, 0.5)
    assert plan.thumbnail_map(None) is None


def test_finish_takes_the_max_with_the_thumbnail_blurs_and_scores_and_decide_applies_thresholds():
    plan = plan_for(Tiling.create((32, 32), (16, 16)), postprocess=PostprocessSpec(gaussian_sigma=0.0, score_pool=16))
    merged = np.zeros((32, 32), np.float32)
    merged[:16, :16] = 0.2
    anomaly_map, score = plan.finish(merged.copy(), np.full((2, 2), 0.1, np.float32))
    assert anomaly_map[0, 0] == pytest.approx(0.2) and anomaly_map[31, 31] == pytest.approx(0.1)
    assert score == pytest.approx(0.2)
    blurred, _ = plan_for(plan.tiling, postprocess=PostprocessSpec(gaussian_sigma=2.0)).finish(merged.copy())
    assert blurred[15, 15] < 0.2 and blurred[16, 16] > 0  # blurred across the block's edge
    assert plan.decide(anomaly_map, score) == (None, None)
    decision, mask = plan.with_thresholds(image=0.15, pixel=0.15).decide(anomaly_map, score)
    assert decision is True and mask.sum() == 16 * 16
    assert plan.with_thresholds(image=0.25).decide(anomaly_map, score)[0] is False
