"""Our PatchCore agrees with HiAD 0.2.1's own, step by step, on a fixed input recorded from HiAD
(tests/data/hiad_patchcore/, made by benchmarks/reference/record_fixture.py): the default config's
embedding, coreset picks and k-NN distances. HiAD need not be installed."""

from pathlib import Path

import cv2
import elpv_dataset
import numpy as np
import pytest
import torch

from hiad_train.components.coreset import greedy_coreset
from hiad_train.components.knn import KnnHead
from hiad_train.config import load_config
from hiad_train.detectors.patchcore import PatchCore

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "hiad_patchcore"
CELLS = ("cell0061.png", "cell0062.png", "cell0063.png", "cell0064.png")  # record_fixture.py's input
TILE = 64


@pytest.fixture(scope="module")
def hiad():
    return {f.stem: np.load(f) for f in DATA.glob("*.npy")}


@pytest.fixture(scope="module")
def tiles():
    """The recorded input, cut again from the installed ELPV cells as record_fixture.py cuts it: a
    TILE x TILE RGB crop from the middle of each cell (4, TILE, TILE, 3) uint8 (the cells are gray: PIL's
    RGB conversion there and OpenCV's here both repeat the channel)."""
    images = Path(elpv_dataset.__file__).parent / "data" / "images"
    out = []
    for name in CELLS:
        image = cv2.cvtColor(cv2.imread(str(images / name), cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2RGB)
        y, x = (image.shape[0] - TILE) // 2, (image.shape[1] - TILE) // 2
        out.append(image[y : y + TILE, x : x + TILE])
    return np.stack(out)


@pytest.fixture(scope="module")
def config():
    return load_config(ROOT / "configs" / "demo.yaml").patch  # the default PatchCore setting


def test_embedding_is_hiads(hiad, tiles, config):
    """Same pixels in, same locally aware embeddings out (HiAD normalizes inputs with ImageNet statistics)."""
    with torch.no_grad():
        (embedding,) = PatchCore.build_embedder(config)(torch.from_numpy(tiles))
    rows = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]).numpy()
    expected = np.concatenate([hiad["train_embedding"], hiad["test_embedding"]])
    np.testing.assert_allclose(rows, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_coreset_picks_are_hiads(hiad, config):
    """The same points in the same order: HiAD's anchors and no projection of 128-d embeddings."""
    features = torch.from_numpy(hiad["train_embedding"])
    picked = greedy_coreset(features, config.percentage, config.coreset_projection_dim, seed=0)
    assert picked.tolist() == hiad["coreset_indices"].tolist()


def test_knn_distances_are_hiads_square_roots(hiad, config):
    """Our k-NN head returns plain L2 distances; HiAD's faiss IndexFlatL2 returns their squares."""
    bank = torch.from_numpy(hiad["train_embedding"][hiad["coreset_indices"]])
    queries = torch.from_numpy(hiad["test_embedding"]).T.reshape(1, -1, 8, 8)
    distances = KnnHead(bank, config.anomaly_scorer_num_nn)(queries).flatten().numpy()
    np.testing.assert_allclose(distances**2, hiad["test_distances"].mean(1), rtol=1e-4)
