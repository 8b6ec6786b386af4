"""What each difference between our PatchCore and HiAD's costs: our pipeline with HiAD's choice at
one step at a time (and all together), on one set, scored by our evaluators.

Features (per input normalization) and tile scores (per coreset and distance choice) are cached
in OUT/runs/SET/; post-processing variants reuse the tile scores. Variants:
  ours                 our pipeline as it is
  imagenet-input       HiAD's input normalization (ImageNet mean/std for every backbone)
  no-projection        coreset picked on the full embedding (HiAD: no projection at 128-d)
  squared              squared L2 distances (HiAD's faiss IndexFlatL2 values)
  tile-blur            HiAD's per-tile Gaussian blur (sigma 4) before stitching
  sliding-score        HiAD's image score (max of a 16x16 mean sliding by 1 pixel)
  drop-last            HiAD's training loader drops the last incomplete batch (8 of 12 tiles per task)
  hiad                 all of the above

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reference/patchcore_ablation.py --set elpv-poly-2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import faiss
import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import EVAL_SIZE, ROOT, SETS, dataset, our_config  # noqa: E402

from hiad_runtime.geometry import Tiling, split  # noqa: E402
from hiad_runtime.postprocess import PostprocessSpec, finish, tile_maps_to_image  # noqa: E402
from hiad_train.components.coreset import greedy_coreset  # noqa: E402
from hiad_train.data import read_mvtec  # noqa: E402
from hiad_train.detectors.patchcore import PatchCore  # noqa: E402
from hiad_train.evaluation import default_evaluators, evaluate  # noqa: E402
from hiad_train.model import embed  # noqa: E402

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CHANGES = ("imagenet-input", "no-projection", "squared", "tile-blur", "sliding-score", "drop-last")


def features(cfg, samples, tiling, imagenet: bool, cache: Path) -> np.ndarray:
    """(images, tiles, D, h, w) embeddings of every tile, cached."""
    if cache.is_file():
        return np.load(cache, mmap_mode="r")
    embedder = PatchCore.build_embedder(cfg.patch)
    if imagenet:
        norm = embedder.features.normalize
        norm.mean.copy_(torch.tensor(IMAGENET[0]).view(1, 3, 1, 1) * 255)
        norm.std.copy_(torch.tensor(IMAGENET[1]).view(1, 3, 1, 1) * 255)
    out = np.stack(
        [
            embed(embedder, split(s.image(tiling.image_size), tiling.tiles), cfg.batch_size)[0].numpy()
            for s in tqdm(samples, desc=f"features {cache.stem}", leave=False)
        ]
    )
    np.save(cache, out)
    return out


def sliding_score(anomaly_map: np.ndarray, pool: int = 16) -> float:
    """HiAD's image score: max over every pool x pool window (stride 1) of its mean."""
    return float(torch.nn.functional.avg_pool2d(torch.from_numpy(anomaly_map)[None, None], pool, stride=1).max())


def tile_scores(variant: set[str], cfg, train_f, test_f, cache: Path) -> np.ndarray:
    """(test images, tiles, h, w) k-NN scores of every test tile against its task's coreset, cached."""
    if cache.is_file():
        return np.load(cache)
    p = cfg.patch
    n_train = 8 if "drop-last" in variant else train_f.shape[0]
    out = np.zeros((test_f.shape[0], test_f.shape[1], *test_f.shape[-2:]), np.float32)
    for t in tqdm(range(train_f.shape[1]), desc=cache.stem, leave=False):
        x = np.ascontiguousarray(train_f[:n_train, t].transpose(0, 2, 3, 1).reshape(-1, train_f.shape[2]))
        proj = x.shape[1] if "no-projection" in variant else p.coreset_projection_dim
        bank = x[greedy_coreset(torch.from_numpy(x), p.percentage, proj, seed=cfg.seed).numpy()]
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(bank)
        q = np.ascontiguousarray(test_f[:, t].transpose(0, 2, 3, 1).reshape(-1, test_f.shape[2]))
        d2, _ = index.search(q, p.anomaly_scorer_num_nn)
        d = d2.mean(1) if "squared" in variant else np.sqrt(np.maximum(d2, 0)).mean(1)
        out[:, t] = d.reshape(test_f.shape[0], *test_f.shape[-2:])
    np.save(cache, out)
    return out


def run(variant: set[str], scores: np.ndarray, tiling, test) -> dict:
    """Our post-processing (or HiAD's choices in `variant`) on the tile scores, scored by our evaluators."""
    spec = PostprocessSpec(**{**PatchCore.postprocess, **({"tile_blur_sigma": 4.0} if "tile-blur" in variant else {})})
    maps, image_scores = [], []
    for s in scores:
        m, score = finish(tile_maps_to_image(list(s), tiling.tiles, tiling.image_size, spec), spec)
        maps.append(cv2.resize(m, (EVAL_SIZE, EVAL_SIZE), interpolation=cv2.INTER_LINEAR))
        image_scores.append(sliding_score(m) if "sliding-score" in variant else score)
    masks = [s.mask(tiling.image_size) for s in test]
    labels = np.array([s.label for s in test])
    metrics = evaluate(np.array(image_scores), labels, maps, masks, default_evaluators(EVAL_SIZE))
    return {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="elpv-poly-2048")
    parser.add_argument("--variants", default=",".join(("ours", *CHANGES, "hiad")))
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "reference")
    parser.add_argument("--config", default="patchcore", choices=["patchcore", "patchcore-1024d"])
    args = parser.parse_args()
    root = dataset(args.set, args.out)
    train, test = read_mvtec(root, "train"), read_mvtec(root, "test")
    image_size, patch_size = SETS[args.set][1:]
    cfg = our_config(args.config, image_size, patch_size)
    tiling = Tiling.create(cfg.image_size, cfg.patch_size, cfg.stride, cfg.ds_factors)
    work = args.out / "runs" / args.set
    work.mkdir(parents=True, exist_ok=True)
    d = cfg.patch.target_embed_dimension
    print("| variant | image AUROC | pixel AUROC | pixel AP | AUPRO |\n|---|---|---|---|---|", flush=True)
    for name in args.variants.split(","):
        variant = set(CHANGES) if name == "hiad" else {name} - {"ours"}
        norm = "imagenet" if "imagenet-input" in variant else "ours"
        train_f = features(cfg, train, tiling, norm == "imagenet", work / f"features_train_{d}_{norm}.npy")
        test_f = features(cfg, test, tiling, norm == "imagenet", work / f"features_test_{d}_{norm}.npy")
        fit = sorted(variant & {"no-projection", "drop-last", "squared"})
        scores = tile_scores(variant, cfg, train_f, test_f, work / f"scores_{d}_{norm}_{'_'.join(fit) or 'ours'}.npy")
        r = run(variant, scores, tiling, test)
        figures = " | ".join(f"{r[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro"))
        print(f"| {name} | {figures} |", flush=True)


if __name__ == "__main__":
    main()
