import json

import numpy as np
import pytest
from conftest import tiny_config

from hiad_train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hiad_train.trainer import HRTrainer


def test_one_detector_per_tile_with_a_coreset_bank(trained, train_samples):
    assert [t.tiles for t in trained.tasks] == [(0,), (1,), (2,), (3,)]
    for det in trained.detectors.values():
        # 4 images x one 16x16 feature grid per tile, 10% kept
        assert det.memory_bank.shape == (int(4 * 16 * 16 * 0.1), 64)


def test_defective_cells_score_higher_than_good_ones(trained, test_samples):
    metrics, preds = HRTrainer(trained.config, progress=False).evaluate(trained, test_samples)
    assert set(metrics) >= {"image_auroc", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("pixel_auroc", "pixel_ap", "aupro"))
    assert preds.maps[0].shape == (256, 256) and preds.maps[0].dtype == np.float32
    # Real EL defects (cracks, dark areas) are far from every good cell in the bank.
    assert preds.scores[preds.labels == 1].mean() > preds.scores[preds.labels == 0].mean()


def test_each_task_gathers_its_training_features_when_its_fit_starts(train_samples, monkeypatch):
    """The memory rule of training at 8192^2 (O2O, 256 tasks): every task's copy of its features made
    up front is a second copy of all images' features (537 MB per training image); gathered as each
    fit starts, one task's copy is held at a time."""
    import hiad_train.trainer as trainer

    gathered, at_fit = [], []
    inputs, fit = trainer.TaskInputs, trainer.fit_task
    monkeypatch.setattr(trainer, "TaskInputs", lambda **kw: gathered.append(kw) or inputs(**kw))
    monkeypatch.setattr(trainer, "fit_task", lambda shared, task: at_fit.append(len(gathered)) or fit(shared, task))
    model = HRTrainer(tiny_config(), progress=False).fit(train_samples[:2])
    assert len(model.tasks) == 4 and at_fit == [1, 2, 3, 4]  # all tasks' copies before the first fit: [4, 4, 4, 4]


def test_pytorch_reference_embeds_and_scores_a_chunk_of_tiles_at_a_time(trained, test_samples, monkeypatch):
    """The parity check's reference holds one chunk's features at any image size, as the runtime does."""
    import hiad_train.model as model_module

    image = test_samples[0].image((256, 256))
    whole_map, whole_score = trained.predict(image)
    calls, embed = [], trained.tile_embeddings
    monkeypatch.setattr(model_module, "STREAM_TILES", 1, raising=False)
    monkeypatch.setattr(trained, "tile_embeddings", lambda im, ids=None: calls.append(ids) or embed(im, ids))
    streamed_map, streamed_score = trained.predict(image)
    assert calls == [[0], [1], [2], [3]]
    span = float(whole_map.max() - whole_map.min())
    assert np.abs(streamed_map - whole_map).max() <= 1e-5 * span and abs(streamed_score - whole_score) <= 1e-5 * span


def test_checkpoint_roundtrip_is_exact_and_safe(trained, test_samples, tmp_path):
    out = save_checkpoint(trained, tmp_path / "ckpt")
    assert not list(out.rglob("*.pt*")) and not list(out.rglob("*.pkl"))  # safetensors + JSON only
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["tiling"]["patch_size"] == [128, 128] and len(meta["tasks"]) == 4
    loaded = load_checkpoint(out)
    image = test_samples[0].image((256, 256))
    a, sa = trained.predict(image)
    b, sb = loaded.predict(image)
    np.testing.assert_array_equal(a, b)
    assert sa == sb


def test_checkpoint_write_is_atomic(trained, tmp_path, monkeypatch):
    out = save_checkpoint(trained, tmp_path / "ckpt")
    before = (out / "checkpoint.json").read_text()
    import hiad_train.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full mid-write")

    with monkeypatch.context() as m:
        m.setattr(ck, "sha256_file", boom)
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(trained, tmp_path / "ckpt")
    assert (out / "checkpoint.json").read_text() == before
    assert load_checkpoint(out).tiling == trained.tiling
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt",
        "ckpt.v1",
    ]  # the published version; no half-written sibling


def test_tampered_checkpoint_is_rejected(trained, tmp_path):
    out = save_checkpoint(trained, tmp_path / "ckpt")
    with open(out / "tasks" / "task_1.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(CheckpointError, match="task_1.safetensors"):
        load_checkpoint(out)


def test_cli_trains_evaluates_and_draws(elpv_root, tmp_path):
    import yaml
    from conftest import TINY
    from typer.testing import CliRunner

    from hiad_train.cli import app

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                **TINY,
                "tasks": {"generator": "neighborhood", "num_groups_width": 2, "num_groups_height": 1},
                "evaluation": {"resize": 128, "overlays": True},
            }
        )
    )
    result = CliRunner().invoke(
        app, ["train", str(cfg), "--data", str(elpv_root), "--out", str(tmp_path / "run"), "--eval"]
    )
    assert result.exit_code == 0, result.output
    assert "| task_0 | task_1 |" in result.output.replace("  ", " ").replace("  ", " ")
    assert "image_auroc" in result.output and "aupro" in result.output
    metrics = json.loads((tmp_path / "run" / "eval_torch" / "metrics.json").read_text())
    assert 0 <= metrics["aupro"] <= 1
    assert len(list((tmp_path / "run" / "eval_torch" / "overlays").glob("*.png"))) == 4
    assert (tmp_path / "run" / "task_map.png").stat().st_size > 0

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "patch": {"percentge": 0.1}}))
    result = CliRunner().invoke(app, ["train", str(bad), "--data", str(elpv_root), "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "patch.percentge" in result.output
