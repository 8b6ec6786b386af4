"""`hiad-train update`: the line's normal images join a memory-based model without retraining, published as a
new bundle version (parity checked, lineage in the manifest) that the service swaps in; `calibrate --review`
reads a review store's labels. Real training, export, runtime and service on the tiny ELPV set."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import tiny_config
from typer.testing import CliRunner

from hiad_export.cli import app as export_app
from hiad_runtime.bundle import Bundle, bundle_id
from hiad_runtime.cli import app as runtime_app
from hiad_runtime.results import find_inputs
from hiad_train.checkpoint import checkpoint_ref, load_checkpoint, save_checkpoint
from hiad_train.cli import app as train_app
from hiad_train.components.gaussian import gaussian_statistics
from hiad_train.detectors import DETECTORS
from hiad_train.detectors.padim import PaDiM, PaDiMConfig
from hiad_train.trainer import image_features
from hiad_train.update import NeedsRetraining, check_updatable, update_model


def _invoke(app, args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def published(trained, elpv_root, tmp_path_factory):
    """The tiny model saved as a checkpoint and exported from it by `hiad-export` (the bundle records it)."""
    root = tmp_path_factory.mktemp("update")
    checkpoint = save_checkpoint(trained, root / "checkpoint", elpv_root)
    code, output = _invoke(export_app, [checkpoint, "--out", root / "bundle"])
    assert code == 0, output
    return root / "checkpoint", root / "bundle"


@pytest.fixture(scope="module")
def updated(published, elpv_root):
    """`hiad-train update BUNDLE --normal test/good`: the two good test modules join the model."""
    checkpoint, bundle = published
    before = load_checkpoint(checkpoint)  # the version the bundle was exported from
    parent = bundle_id((bundle.resolve() / "manifest.json").read_bytes())
    code, output = _invoke(train_app, ["update", bundle, "--normal", elpv_root / "test" / "good"])
    assert code == 0, output
    return before, load_checkpoint(checkpoint), parent, output


def _task_features(model, images):
    """Per task, the features (N, D) of the tiles of `images` it scores, as training extracts them."""
    out = {t.name: [] for t in model.tasks}
    for image in images:
        features = [torch.from_numpy(f) for f in image_features(model, image)]
        for name, positions in model.assignments(features).items():
            grid = features[0][positions]
            out[name].append(grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1]))
    return {name: torch.cat(f) for name, f in out.items()}


def test_new_images_join_the_bank_by_the_coreset_rule(updated, test_samples):
    before, after, _, _ = updated
    new = [s.image((256, 256)) for s in test_samples if s.label == 0]
    assert len(new) == 2
    for name, features in _task_features(before, new).items():
        old_bank, bank = before.detectors[name].memory_bank, after.detectors[name].memory_bank
        record, now = before.training[name], after.training[name]
        assert now["training_patches"] == record["training_patches"] + len(features)
        assert len(bank) == int(now["training_patches"] * 0.1) > len(old_bank)  # training's size rule
        rows_from_new = (torch.cdist(bank, features).min(1).values == 0).sum()
        assert rows_from_new > 0  # the bank holds patches of the new images themselves
        assert (
            torch.cdist(features, bank).min(1).values.mean()
            < 0.8 * torch.cdist(features, old_bank).min(1).values.mean()
        )
    for image in new:  # the images added now look normal to the model: their scores drop
        assert after.predict(image)[1] < before.predict(image)[1]


def test_update_publishes_a_parity_checked_version_with_its_lineage(published, updated, elpv_root):
    checkpoint, bundle = published
    _, _, parent, output = updated
    assert os.readlink(bundle) == "bundle.v2"
    manifest = Bundle.load(bundle).manifest
    (step,) = manifest.lineage
    assert step.parent == parent and step.images_added == 2 and step.date
    assert step.images == str((elpv_root / "test" / "good").absolute())
    assert manifest.checkpoint == checkpoint_ref(checkpoint)  # the updated checkpoint, its new version
    checked = {path: r for path, r in manifest.parity.items() if isinstance(r, dict)}
    # held back: the defective test image (both good ones were added)
    assert {"onnx", "native"} <= set(checked) and all(r["passed"] and r["images"] == 1 for r in checked.values())
    assert [t.training for t in manifest.tasks] == [
        load_checkpoint(checkpoint).training[t.name] for t in manifest.tasks
    ]
    code, shown = _invoke(runtime_app, ["verify", bundle])
    assert code == 0 and f"+2 normal image(s) from {step.images} (parent {parent})" in shown


def test_update_keeps_the_parents_decision_rule(published, updated):
    before, after, _, _ = updated
    assert after.thresholds == before.thresholds
    assert after.task_normalization == before.task_normalization


def test_zero_images_leave_every_detector_bit_identical(published):
    checkpoint, _ = published
    model, reference = load_checkpoint(checkpoint), load_checkpoint(checkpoint)
    update_model(model, [], progress=False)
    assert model.training == reference.training
    for name, detector in model.detectors.items():
        before, after = reference.detectors[name].state(), detector.state()
        assert all(torch.equal(before[k], after[k]) for k in before)
        bank = detector.memory_bank  # and the coreset rule itself adds nothing for nothing
        record = detector.add_normal([torch.empty(0, bank.shape[1], 16, 16)], model.training[name], seed=0)
        assert torch.equal(detector.memory_bank, bank) and record == model.training[name]


def test_a_second_update_chains_the_lineage(published, updated, elpv_root, tmp_path):
    _, bundle = published
    parent = bundle_id((bundle.resolve() / "manifest.json").read_bytes())
    image = find_inputs([elpv_root / "train"])[0]
    (tmp_path / "new").mkdir()
    shutil.copy(image, tmp_path / "new" / image.name)
    code, output = _invoke(train_app, ["update", bundle, "--normal", tmp_path / "new"])
    assert code == 0, output
    first, second = Bundle.load(bundle).manifest.lineage
    assert first.images_added == 2 and second.parent == parent and second.images_added == 1


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_only_memory_based_detectors_are_updated(name):
    if name in ("patchcore", "padim"):
        check_updatable(name)
    else:
        with pytest.raises(NeedsRetraining, match=f"detector '{name}' learns by training"):
            check_updatable(name)


def test_a_detector_that_needs_retraining_is_refused_by_name_before_any_work(published, elpv_root, tmp_path):
    checkpoint, _ = published
    copy = tmp_path / "rdpp_checkpoint"
    shutil.copytree(checkpoint.resolve(), copy)
    meta = json.loads((copy / "checkpoint.json").read_text())
    (copy / "checkpoint.json").write_text(json.dumps({**meta, "detector": "rdpp"}))
    listing = sorted(p.name for p in tmp_path.iterdir())
    code, output = _invoke(
        train_app, ["update", copy, "--normal", elpv_root / "test" / "good", "--out", tmp_path / "b"]
    )
    assert code != 0 and "detector 'rdpp' learns by training" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no bundle, no new checkpoint version


def test_a_bundle_without_a_checkpoint_asks_for_one(default_bundle, elpv_root, tmp_path):
    _, bundle = default_bundle  # exported from the model in memory: no checkpoint recorded
    code, output = _invoke(train_app, ["update", bundle, "--normal", elpv_root / "test" / "good"])
    assert code != 0 and "records no checkpoint" in output and "--checkpoint" in output


def test_a_bundle_whose_checkpoint_changed_since_is_refused(published, elpv_root, tmp_path):
    _, bundle = published
    copy = tmp_path / "bundle"
    shutil.copytree(bundle.resolve(), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["checkpoint"]["sha256"] = "0" * 64  # as if the checkpoint were re-published after this export
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, output = _invoke(train_app, ["update", copy, "--normal", elpv_root / "test" / "good"])
    assert code != 0 and "has changed since" in output and "--checkpoint" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def _padim_features(samples):
    """Real PaDiM features (N, C, h, w) of every 128-px tile of `samples` (8 channels: a well-posed Gaussian)."""
    config = PaDiMConfig(embed_dimension=8)
    embedder = PaDiM.build_embedder(config)
    images = [s.image((256, 256)) for s in samples]
    tiles = np.stack([im[y : y + 128, x : x + 128] for im in images for y in (0, 128) for x in (0, 128)])
    with torch.no_grad():
        (features,) = embedder(torch.from_numpy(tiles))
    return config, features


def test_padim_running_statistics_equal_statistics_of_all_images_at_once(train_samples, test_samples):
    config, features = _padim_features(train_samples + test_samples)  # 32 tiles
    first, new = features[:20], features[20:]
    n, c, h, w = features.shape
    mean, covariance = gaussian_statistics(features.reshape(n, c, h * w))
    detector = PaDiM(config)
    record = detector.fit(_task_data(first))
    assert detector.add_normal([new], record, seed=0) == {"training_tiles": n}
    torch.testing.assert_close(detector.mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(detector.covariance, covariance, rtol=1e-5, atol=1e-5)
    all_at_once = PaDiM(config)
    all_at_once.fit(_task_data(features))
    scores, reference = detector.score([features]), all_at_once.score([features])
    torch.testing.assert_close(scores, reference, rtol=0, atol=1e-4 * float(reference.max() - reference.min()))

    older = PaDiM.from_state(config, _fitted_without_covariance(config, first))
    older.add_normal([new], record, seed=0)  # a checkpoint without the covariance: recovered from the inverse
    torch.testing.assert_close(older.covariance, covariance, rtol=1e-3, atol=1e-3)


def test_padim_update_from_a_checkpoint_publishes_a_parity_checked_bundle(train_samples, elpv_root, tmp_path):
    """PaDiM end to end, thumbnail included, from a checkpoint into a bundle that does not exist yet."""
    from hiad_train.trainer import HRTrainer

    config = tiny_config(
        detector="padim",
        patch={"embed_dimension": 16},
        thumbnail={"thumbnail_size": 128, "embed_dimension": 16},
        tasks={"generator": "neighborhood", "num_groups_width": 2, "num_groups_height": 1},
    )
    model = HRTrainer(config, progress=False).fit(train_samples)
    checkpoint = save_checkpoint(model, tmp_path / "checkpoint", elpv_root)
    good = elpv_root / "test" / "good"
    code, output = _invoke(train_app, ["update", checkpoint, "--normal", good, "--out", tmp_path / "bundle"])
    assert code == 0, output
    manifest = Bundle.load(tmp_path / "bundle").manifest
    assert [(s.parent, s.images_added) for s in manifest.lineage] == [(None, 2)]
    checked = [r for r in manifest.parity.values() if isinstance(r, dict)]
    assert checked and all(r["passed"] for r in checked)
    after = load_checkpoint(checkpoint)
    for task in model.tasks:  # each of a task's tiles of each new image
        assert after.training[task.name]["training_tiles"] == model.training[task.name]["training_tiles"] + 2 * len(
            task.tiles
        )
    assert after.thumbnail.training["training_tiles"] == model.thumbnail.training["training_tiles"] + 2


def _task_data(features):
    from hiad_train.detectors import TaskData

    return TaskData([features], None, None, None, None)


def _fitted_without_covariance(config, features):
    detector = PaDiM(config)
    detector.fit(_task_data(features))
    return {k: v for k, v in detector.state().items() if k != "covariance"}


def _store(root: Path, images: dict[str, Path], labels: list[tuple[str, str]]) -> Path:
    """A review store by hand, in its layout: items/<id>/image.png + record.json (written last), labels.jsonl."""
    for item_id, image in images.items():
        folder = root / "items" / item_id
        folder.mkdir(parents=True)
        shutil.copy(image, folder / "image.png")
        pixels = cv2.imread(str(image))
        record = {
            "id": item_id, "time": "2026-12-03T10:00:00+00:00", "file": image.name, "score": 0.5, "decision": None,
            "threshold": None, "bundle": "tiny", "latency_ms": 1.0, "width": pixels.shape[1],
            "height": pixels.shape[0], "image": "image.png",
        }  # fmt: skip
        (folder / "record.json").write_text(json.dumps(record))
    lines = [json.dumps({"id": i, "label": lab, "who": "op", "when": "2026-12-03T11:00:00+00:00"}) for i, lab in labels]
    (root / "labels.jsonl").write_text("\n".join(lines) + '\n{"id": "torn')
    return root


def _item(k: int) -> str:
    return f"20261203T1000000000{k:02d}Z-abc{k:03d}"


def test_calibrate_review_uses_the_stores_labeled_images(published, elpv_root, tmp_path):
    checkpoint, _ = published
    good, bad = find_inputs([elpv_root / "train"]), find_inputs([elpv_root / "test" / "defect"])
    images = {_item(k): f for k, f in enumerate(good + bad)}
    ids = list(images)
    labels = [(i, "good") for i in ids[: len(good)]] + [(i, "defect") for i in ids[len(good) :]]
    labels += [(ids[0], "defect"), (ids[0], "good")]  # relabeled: the last label wins
    incomplete = tmp_path / "store" / "items" / _item(99)
    incomplete.mkdir(parents=True)  # no record.json: ignored
    store = _store(tmp_path / "store", images, labels + [(_item(99), "good")])
    code, output = _invoke(train_app, ["calibrate", checkpoint, "--review", store, "--out", tmp_path / "cal"])
    assert code == 0, output
    assert f"image operating curve ({len(good)} normal, {len(bad)} defective image(s)" in output
    rules = load_checkpoint(tmp_path / "cal").thresholds["rules"]
    assert rules["image"]["images"] == len(good) and rules["image"]["defective_images"] == len(bad)


def test_update_takes_a_review_stores_good_images(published, elpv_root, tmp_path):
    _, bundle = published
    good, bad = find_inputs([elpv_root / "test" / "good"]), find_inputs([elpv_root / "test" / "defect"])
    images = {_item(k): f for k, f in enumerate(good + bad)}
    ids = list(images)
    store = _store(tmp_path / "store", images, [(ids[0], "good"), (ids[-1], "defect")])
    code, output = _invoke(train_app, ["update", bundle, "--normal", store])
    assert code == 0, output
    step = Bundle.load(bundle).manifest.lineage[-1]
    assert step.images_added == 1 and step.images == f"{store.absolute()} (review store: labeled good)"


def test_the_service_swaps_an_update_in_on_reload(published, elpv_root, tmp_path):
    """`POST /v1/reload` serves the version `update` published; /v1/model shows its lineage."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from hiad_runtime.serve.launch import serving

    _, bundle = published
    (tmp_path / "new").mkdir()
    image = find_inputs([elpv_root / "train"])[-1]
    shutil.copy(image, tmp_path / "new" / image.name)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    with serving(bundle, tmp_path / "server.log", env=env) as (url, _):
        served = httpx.get(f"{url}/readyz").json()["bundle_id"]
        code, output = _invoke(train_app, ["update", bundle, "--normal", tmp_path / "new"])
        assert code == 0, output
        reloaded = httpx.post(f"{url}/v1/reload", timeout=120).json()
        assert reloaded["previous"] == served and reloaded["bundle_id"] == bundle_id(
            (bundle.resolve() / "manifest.json").read_bytes()
        )
        lineage = httpx.get(f"{url}/v1/model").json()["lineage"]
        assert lineage[-1]["parent"] == served and lineage[-1]["images_added"] == 1


def test_every_command_main_knows_is_registered():
    """`hiad-train update` sits among the commands; none of them lost its registration."""
    assert [c.name for c in train_app.registered_commands] == [
        "train", "eval", "eval-runtime", "calibrate", "update", "demo-data",
    ]  # fmt: skip
