"""Record HiAD 0.2.1's PatchCore on a small fixed input, for tests/test_hiad_reference.py.

Four 64 px crops of real ELPV poly cells rated good (three to train on, one to score) go through HiAD's own
HRPatchCore with configs/demo.yaml's settings (tf_efficientnet_lite0 stages blocks.2 and blocks.4,
merge 3, 1024 -> 128 dimensions, coreset 10 %, 1 neighbour, seed 0). Written as .npy: HiAD's
embeddings of the training tiles and of the scored tile, its coreset indices (in pick order), and its
per-patch k-NN distances (faiss IndexFlatL2: squared L2). The input tiles are not written: the test
cuts them again from the installed elpv-dataset, as `crops` does.

    PYTHONPATH=. benchmarks/reference/.venv/bin/python benchmarks/reference/record_fixture.py \
        tests/data/hiad_patchcore \
        "$(.venv/bin/python -c 'import elpv_dataset, os; print(os.path.dirname(elpv_dataset.__file__))')/data/images"
"""

from __future__ import annotations

import sys
from pathlib import Path

import hiad_cpu  # noqa: F401  (first: HiAD's CUDA patched out)
import numpy as np
import torch
from hiad.detectors import HRPatchCore
from hiad.detectors.patchcore import sampler
from hiad.utils.split_and_gather import LRPatch
from PIL import Image

TILE = 64
CELLS = ("cell0061.png", "cell0062.png", "cell0063.png", "cell0064.png")  # the first four good poly cells
CONFIG = {
    "backbone_name": "tf_efficientnet_lite0",
    "layers_to_extract_from": ["blocks.2", "blocks.4"],
    "merge_size": 3,
    "percentage": 0.1,
    "pretrain_embed_dimension": 1024,
    "target_embed_dimension": 128,
    "anomaly_scorer_num_nn": 1,
    "faiss_on_gpu": False,
    "faiss_num_workers": 1,
}


def crops(folder: Path) -> np.ndarray:
    """One TILE x TILE RGB crop from the middle of each cell image."""
    out = []
    for name in CELLS:
        image = np.array(Image.open(folder / name).convert("RGB"))
        y, x = (image.shape[0] - TILE) // 2, (image.shape[1] - TILE) // 2
        out.append(image[y : y + TILE, x : x + TILE])
    return np.stack(out)


def main() -> None:
    out, cells = Path(sys.argv[1]), Path(sys.argv[2])
    tiles = crops(cells)
    detector = HRPatchCore(patch_size=TILE, logger=None, device=torch.device("cpu"), seed=0, **CONFIG)

    def batch(ts: np.ndarray) -> dict:  # HiAD's dataset and loader: ImageNet normalization, CHW tensors
        dataset = detector.create_dataset([LRPatch(image=t) for t in ts], training=False, task_name="fixture")
        return next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(ts))))

    picked = []  # the coreset indices HiAD's sampler computes (it returns only the picked features)
    select = sampler.ApproximateGreedyCoresetSampler._compute_greedy_coreset_indices
    sampler_ = detector.featuresampler
    sampler_._compute_greedy_coreset_indices = lambda f: picked.append(select(sampler_, f)) or picked[-1]
    train = np.asarray(detector.patchcore_emb(batch(tiles[:-1])))  # (tiles * h * w, D), rows by tile, y, x
    bank = detector.featuresampler.run(train)
    detector.anomaly_scorer.fit(detection_features=[bank])
    test = np.asarray(detector.patchcore_emb(batch(tiles[-1:])))
    _, distances, _ = detector.anomaly_scorer.predict([test])
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train_embedding.npy", train.astype(np.float32))
    np.save(out / "test_embedding.npy", test.astype(np.float32))
    np.save(out / "coreset_indices.npy", picked[0].astype(np.int64))
    np.save(out / "test_distances.npy", distances.astype(np.float32))


if __name__ == "__main__":
    main()
