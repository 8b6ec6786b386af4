"""Shared fixtures: a tiny but real ELPV demo set, a real training on it, a real export."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

import numpy as np
import pytest

from hiad_train.config import parse_config
from hiad_train.data import read_mvtec
from hiad_train.data.elpv import build_elpv_demo

TINY = {
    "seed": 0,
    "image_size": 256,
    "patch_size": 128,
    "batch_size": 4,
    "tasks": {"generator": "o2o"},
    "patch": {"percentage": 0.1, "target_embed_dimension": 64},
    "evaluation": {"resize": 128, "overlays": False},
}


def tiny_config(**overrides):
    data = {**TINY, **overrides}
    return parse_config(data, "test")


@pytest.fixture(scope="session")
def elpv_root(tmp_path_factory):
    """Real EL solar-cell images: 2x2-cell modules at 256 px, 4 train, 4 test (2 defective)."""
    return build_elpv_demo(tmp_path_factory.mktemp("data"), rows=2, cols=2, cell_size=128, n_train=4, n_test=4, seed=0)


@pytest.fixture(scope="session")
def train_samples(elpv_root):
    return read_mvtec(elpv_root, "train")


@pytest.fixture(scope="session")
def test_samples(elpv_root):
    return read_mvtec(elpv_root, "test")


@pytest.fixture(scope="session")
def trained(train_samples):
    from hiad_train.trainer import HRTrainer

    return HRTrainer(tiny_config(), progress=False).fit(train_samples)


@pytest.fixture(scope="session")
def parity_images(test_samples):
    return [s.image((256, 256)) for s in test_samples[:2]]


@pytest.fixture(scope="session")
def bundle_dir(trained, parity_images, tmp_path_factory):
    """The tiny model's bundle, with the whole-image graph (`--pipeline`): the C library runs it."""
    from hiad_export.writer import ExportOptions, write_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    write_bundle(trained, out, parity_images, ExportOptions(pipeline=True))
    return out


@pytest.fixture(scope="session")
def default_bundle(trained, parity_images, tmp_path_factory):
    """The tiny model exported with the default options: no whole-image graph."""
    from hiad_export.writer import write_bundle

    out = tmp_path_factory.mktemp("bundles") / "default"
    return write_bundle(trained, out, parity_images), out


def rng(seed=0):
    return np.random.default_rng(seed)


# Fusion + thumbnail + spatial-clustering tasks + validation normalization and thresholds: the
# configuration the pipeline graph and the C library are proven on besides the plain tiny bundle.
# Every HiAD branch at once: fusion, thumbnail, clustering tasks, validation (normalization, thresholds).
CLUSTERED = dict(
    ds_factors=[0, 1],
    fusion_weights=[0.5, 0.5],
    tasks={"generator": "spatial_clustering", "cluster_number": 2},
    thumbnail={"thumbnail_size": 128, "target_embed_dimension": 64, "percentage": 0.1},
    val_config={
        "anomaly_syn_fn": {"name": "random_box", "p": 0.5},
        "val_sample_ratio": 0.25,
        "max_patch_number": 200,
        "evaluators": ["image_auroc", "pixel_metrics", "aupro"],
    },
)


@pytest.fixture(scope="session")
def clustered_model(train_samples):
    from hiad_train.trainer import HRTrainer

    return HRTrainer(tiny_config(**CLUSTERED), progress=False).fit(train_samples)


@pytest.fixture(scope="session")
def clustered_bundle(clustered_model, parity_images, tmp_path_factory):
    from hiad_export.writer import ExportOptions, write_bundle

    out = tmp_path_factory.mktemp("bundles") / "clustered"
    write_bundle(clustered_model, out, parity_images, ExportOptions(pipeline=True))
    return out
