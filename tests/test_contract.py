"""The detector contract, proven for every registered detector: a tiny real training on real EL
images, a real export (which itself refuses to publish past parity), and the torch-free runtime's
maps and scores against PyTorch's on every head path that applies.

Adding a detector = its module + one ROWS entry (tiny settings: 128 px tiles, a few steps)."""

import numpy as np
import pytest
from conftest import tiny_config

from hiad_export.writer import write_bundle
from hiad_runtime.heads import HeadPath
from hiad_runtime.inspector import Inspector
from hiad_train.checkpoint import load_checkpoint, save_checkpoint
from hiad_train.detectors import DETECTORS, EpochConfig
from hiad_train.trainer import HRTrainer
from hiad_train.validation import TaskValidation, split_validation

TOLERANCE = 1e-4  # of the PyTorch map's range

TINY_VIT = {"backbone_name": "vit_tiny_patch16_224", "allow_random_backbone": True}  # random, patch 16: 128 px tiles

ROWS = {  # detector -> its `patch:` section for the tiny run
    "patchcore": {"target_embed_dimension": 64, "percentage": 0.1},
    "rdpp": {"layers_to_extract_from": [2, 3], "total_epochs": 1, "batch_size": 4},
    "destseg": {"total_epochs": 2, "de_st_epochs": 1, "batch_size": 4},
    "fastflow": {"flow_step": 2, "hidden_ratio": 0.5, "num_epochs": 2, "batch_size": 4},
    "padim": {"embed_dimension": 32},
    "dinomaly": {
        **TINY_VIT,
        "layers_to_extract_from": [0, 1, 2, 3],
        "fuse_layer_encoder": [[0, 1], [2, 3]],
        "decoder_depth": 2,
        "fuse_layer_decoder": [[0], [1]],
        "total_epochs": 2,
        "batch_size": 4,
    },
    "inpformer": {
        **TINY_VIT,
        "layers_to_extract_from": [0, 1, 2, 3],
        "fuse_layer_encoder": [[0, 1], [2, 3]],
        "decoder_depth": 2,
        "fuse_layer_decoder": [[0], [1]],
        "num_prototypes": 3,
        "total_epochs": 2,
        "batch_size": 4,
    },
    "vitad": {**TINY_VIT, "layers_to_extract_from": [0, 1, 2], "neck_layers": [3], "total_epochs": 2, "batch_size": 4},
    "realnet": {
        "max_epoch": 1,
        "batch_size": 4,
        "init_bsn": 1,
        "num_res_blocks": 1,
        "channel_mult": [1],
        "attention_mult": [],
    },
}

VALIDATION = {"anomaly_syn_fn": {"name": "random_box", "p": 0.5}, "val_sample_ratio": 0.25, "max_patch_number": 200}


def test_every_registered_detector_has_a_contract_row():
    assert set(ROWS) == set(DETECTORS)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_train_export_runtime_parity(name, train_samples, test_samples, parity_images, tmp_path):
    config = tiny_config(
        detector=name,
        patch=ROWS[name],
        tasks={"generator": "neighborhood", "num_groups_width": 2, "num_groups_height": 1},
        val_config=VALIDATION,
    )
    model = HRTrainer(config, progress=False).fit(train_samples)
    assert len(model.tasks) == 2 and set(model.training) == {"task_0", "task_1"}
    if issubclass(DETECTORS[name].Config, EpochConfig):  # the validation set chose the epoch
        record = model.training["task_0"]
        assert 1 <= record["selected_epoch"] <= record["epochs_run"] <= config.patch.total_epochs
        chosen = record["selection_metrics"]  # the kept state's metrics: re-scoring it gives them again
        assert set(chosen) == {"image_auroc", "pixel_auroc", "pixel_ap", "pixel_f1_max"}
        assert all(v is None or 0 <= v <= 1 for v in chosen.values()) and chosen["image_auroc"] is not None
        _, held_out = split_validation(list(train_samples), config.val_config.val_sample_ratio, config.seed)
        validation = TaskValidation.build(model, held_out, config.val_config, config.seed)
        rescored = validation.validator("task_0", model.postprocess)(model.detectors["task_0"])
        # the same state on the same tiles; float noise of conv kernels (~1e-6) allowed, another epoch is not
        assert chosen == pytest.approx({k: v if np.isfinite(v) else None for k, v in rescored.items()}, abs=1e-4)

    checkpoint = save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(checkpoint)
    image = test_samples[0].image((256, 256))
    np.testing.assert_array_equal(loaded.predict(image)[0], model.predict(image)[0])

    manifest = write_bundle(loaded, tmp_path / "bundle", parity_images)
    assert manifest.detector == name and manifest.tasks[0].training == model.training["task_0"]
    paths = [p for p in HeadPath if p in manifest.parity]
    assert "onnx" in paths and all(manifest.parity[p]["passed"] for p in paths)
    for path in paths:
        inspector = Inspector.load(tmp_path / "bundle", head_path=path)
        for sample in test_samples:
            image = sample.image((256, 256))
            ref_map, ref_score = loaded.predict(image)
            result = inspector.predict(image)
            span = max(float(ref_map.max() - ref_map.min()), 1e-6)
            assert np.abs(result.anomaly_map - ref_map).max() <= TOLERANCE * span, path
            assert abs(result.score - ref_score) <= TOLERANCE * span, path
