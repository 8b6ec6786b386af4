"""HiAD's method breadth through train, export and the torch-free runtime: fusion, thumbnail,
validation (normalization, thresholds), clustering and retrieval tasks, synthesizers."""

import json
import shutil

import numpy as np
import pytest
from conftest import tiny_config

from hiad_export.writer import write_bundle
from hiad_runtime.inspector import Inspector
from hiad_runtime.postprocess import Normalization
from hiad_train import tasks as generators
from hiad_train.components.epochs import CheckpointSelector
from hiad_train.synthesis import ColorShift, CutPaste, ImageBlending, RandomBox
from hiad_train.trainer import HRTrainer
from hiad_train.validation import min_max_normalization

TOLERANCE = 1e-4


def _assert_parity(model, bundle, images, head_path):
    inspector = Inspector.load(bundle, head_path=head_path)
    for image in images:
        ref_map, ref_score = model.predict(image)
        r = inspector.predict(image)
        span = max(ref_map.max() - ref_map.min(), 1e-6)
        assert np.abs(r.anomaly_map - ref_map).max() <= TOLERANCE * span
        assert abs(r.score - ref_score) <= TOLERANCE * span
    return inspector


@pytest.mark.parametrize("head_path", ["native", "onnx"])
def test_fusion_thumbnail_and_normalization_parity(clustered_model, clustered_bundle, test_samples, head_path):
    images = [s.image((256, 256)) for s in test_samples]
    inspector = _assert_parity(clustered_model, clustered_bundle, images, head_path)
    m = inspector.manifest
    assert m.fusion_weights == [0.5, 0.5] and m.tiling["ds_factors"] == [0, 1]
    assert set(m.embedders) == {"patch", "thumbnail"} and m.thumbnail.size == [128, 128]


def test_fusion_changes_the_embedding(clustered_model, trained, test_samples):
    image = test_samples[0].image((256, 256))
    (fused,) = clustered_model.tile_embeddings(image)
    (plain,) = trained.tile_embeddings(image)
    assert fused.shape == plain.shape  # the context's crop is resized to the tile's own grid
    assert not np.allclose(fused.numpy(), plain.numpy())


def test_validation_normalizes_to_unit_range_and_thresholds_decide(
    clustered_model, clustered_bundle, test_samples, tmp_path
):
    v = clustered_model.validation
    assert v["patches"] == 4 and 0 < v["anomalous"] < 4  # 1 held-out image x 4 tiles, p = 0.5
    assert set(v) >= {"image_auroc", "pixel_auroc", "aupro"}
    assert len(clustered_model.task_normalization) == len(clustered_model.tasks) == 2
    assert len(set(clustered_model.task_normalization.values())) == 1  # global by default: one scale for all tasks
    t = clustered_model.thresholds
    assert t["image"] is not None and t["pixel"] is not None  # by false-alarm rate: may lie above 1
    assert t["rules"]["image"]["rule"] == "false_alarm_rate" and t["rules"]["image"]["images"] == 1
    inspector = Inspector.load(clustered_bundle)
    results = [inspector.predict(str(s.image_path)) for s in test_samples]
    for r in results:
        assert r.decision == (r.score >= t["image"])
        assert r.mask.dtype == bool and r.mask.shape == (256, 256)
        np.testing.assert_array_equal(r.mask, r.anomaly_map >= t["pixel"])
    top = max(r.score for r in results)
    strict = Inspector.load(clustered_bundle, image_threshold=top + 0.01)  # --threshold overrides the bundle's
    assert strict.predict(str(test_samples[0].image_path)).decision is False

    # Not clipped: scaling every normalization so that the top image scores 2, a threshold of 1.5 is reached.
    m = json.loads((clustered_bundle / "manifest.json").read_text())
    for norm in [task["normalization"] for task in m["tasks"]] + (
        [m["thumbnail"]["normalization"]] if m["thumbnail"] else []
    ):
        norm["maximum"] = norm["minimum"] + (norm["maximum"] - norm["minimum"]) * top / 2
    m["thresholds"]["image"] = 1.5
    shutil.copytree(clustered_bundle, tmp_path / "scaled")
    (tmp_path / "scaled" / "manifest.json").write_text(json.dumps(m))
    scaled = [Inspector.load(tmp_path / "scaled").predict(str(s.image_path)) for s in test_samples]
    assert max(r.score for r in scaled) == pytest.approx(2.0, rel=1e-4)
    assert all(r.decision == (r.score >= 1.5) for r in scaled) and any(r.decision for r in scaled)


def test_retrieval_routing_equals_training_assignment(train_samples, parity_images, tmp_path):
    cfg = tiny_config(tasks={"generator": "retrieve", "cluster_number": 3})
    model = HRTrainer(cfg, progress=False).fit(train_samples)
    assert model.routing.shape == (3, 64) and all(t.tiles == () for t in model.tasks)
    images = [s.image((256, 256)) for s in train_samples]
    embeddings = np.stack([model.tile_embeddings(im)[0].numpy() for im in images])
    _, centres, labels = generators.retrieve(embeddings, 3, seed=0)
    np.testing.assert_allclose(centres, model.routing, atol=1e-5)
    write_bundle(model, tmp_path / "b", parity_images)
    inspector = _assert_parity(model, tmp_path / "b", parity_images, "native")
    for image, expected in zip(images, labels):
        routed = inspector.plan.assign(inspector.engine.tile_features(image, {}).numpy()[0])
        got = np.empty(len(expected), int)
        for k, task in enumerate(inspector.plan.tasks):
            got[routed[task.name]] = k
        np.testing.assert_array_equal(got, expected)


def test_clustering_generators_on_real_embeddings(trained, train_samples):
    embeddings = np.stack([trained.tile_embeddings(s.image((256, 256)))[0].numpy() for s in train_samples])
    tiling = trained.tiling
    a = generators.spatial_clustering(embeddings, cluster_number=2, seed=0)
    b = generators.spatial_clustering(embeddings, cluster_number=2, seed=0)
    assert a == b and len(a) == 2
    assert sorted(i for t in a for i in t.tiles) == list(range(len(tiling.tiles)))
    assert len(generators.spatial_clustering(embeddings, cluster_number=2, feature_resolution=2, seed=0)) == 2
    assert len(generators.threshold_clustering(embeddings, cluster_threshold=0.999999)) == 4  # all noise: one task each
    assert len(generators.threshold_clustering(embeddings, cluster_threshold=1e-6)) == 1  # everything linked
    tasks, centres, labels = generators.retrieve(embeddings, 2, seed=0)
    assert len(tasks) == 2 and centres.shape == (2, 64) and labels.shape == (4, 4)


@pytest.mark.parametrize(
    "synth", [RandomBox(p=1), CutPaste(p=1), ColorShift(p=1), ImageBlending(p=1)], ids=lambda s: type(s).__name__
)
def test_synthetic_anomalies_land_inside_their_masks(synth, test_samples):
    rng = np.random.default_rng(0)
    patch = test_samples[2].image((256, 256))[:128, :128].copy()
    for _ in range(5):
        out, mask = synth(patch, rng)
        changed = (out != patch).any(axis=2)
        assert mask.any() and changed.any()
        assert not (changed & ~mask).any()  # nothing changes outside the mask
        assert (changed == mask).all()  # and every masked pixel really changed
    untouched, empty = type(synth)(p=0)(patch, rng)
    assert not empty.any() and (untouched == patch).all()


def test_checkpoint_selector_prefers_auroc_then_mean_and_stops_early():
    sel = CheckpointSelector(patience=2)
    assert sel.update(0, {"image_auroc": 0.8, "pixel_auroc": 0.5})
    assert sel.update(1, {"image_auroc": 0.8, "pixel_auroc": 0.7})  # tie on AUROC, better mean of the rest
    assert not sel.update(2, {"image_auroc": 0.8, "pixel_auroc": 0.6})
    assert not sel.should_stop
    assert not sel.update(3, {"image_auroc": 0.7, "pixel_auroc": 0.9})
    assert sel.should_stop and sel.best_epoch == 1


def test_normalization_global_keeps_the_tasks_relative_scale_per_task_does_not():
    records = [("a", 0, np.array([1.0, 3.0]), None), ("b", 1, np.array([10.0, 30.0]), None)]
    norms, _ = min_max_normalization(records, [], ["a", "b", "unreached"])
    assert norms["a"] == norms["b"] == norms["unreached"] == Normalization(1.0, 30.0)
    assert norms["a"](np.array([3.0])) < norms["b"](np.array([10.0]))  # a's worst stays below b's best, as raw
    per_task, _ = min_max_normalization(records, [], ["a", "b", "unreached"], "per_task")
    assert per_task["a"] == Normalization(1.0, 3.0) and per_task["b"] == Normalization(10.0, 30.0)
    assert per_task["unreached"] == Normalization(1.0, 30.0)
    assert per_task["a"](np.array([3.0])) > per_task["b"](np.array([10.0]))  # per task: the order flips
