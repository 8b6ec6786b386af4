"""Our PatchCore against HiAD 0.2.1's, step by step, on the same tiles.

hiad_steps.py (reference venv) records what HiAD's PatchCore computes at each step for one task of a
set; here each of our components gets HiAD's input to that step, and its output is compared with
HiAD's: so a difference is charged to the step that makes it, not to one before it. Steps: tile
pixels, input normalization, backbone stages, locally aware embedding, coreset, per-patch k-NN
distances, per-tile map (upsampling and blur), stitching, final blur, image score.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reference/patchcore_steps.py --set elpv-poly-2048 [--task 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import HERE, ROOT, SETS, VENV, dataset, hiad_job, our_config  # noqa: E402

from hiad_runtime.geometry import Tiling, gather, split  # noqa: E402
from hiad_runtime.postprocess import PostprocessSpec, finish, image_score, tile_map  # noqa: E402
from hiad_train.components.coreset import greedy_coreset  # noqa: E402
from hiad_train.components.knn import KnnHead  # noqa: E402
from hiad_train.data import read_mvtec  # noqa: E402
from hiad_train.detectors.patchcore import PatchCore  # noqa: E402
from hiad_train.embedders import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def relative(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs|."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


def coverage(features: np.ndarray, bank: np.ndarray) -> float:
    """The coreset's objective: the largest distance from a training feature to its nearest bank entry."""
    return float(KnnHead(torch.from_numpy(bank), 1)(rows_of(features)).max())


def record_hiad(job: dict, work: Path, task: int, images: str) -> Path:
    """HiAD's recorded steps for `task` (hiad_steps.py in the reference venv), made once per set."""
    out = work / f"patchcore_steps_task{task}.npz"
    if not out.is_file():
        job_path = work / "patchcore_steps.json"
        job_path.write_text(json.dumps(job))
        command = [
            str(VENV / "bin" / "python"),
            str(HERE / "hiad_steps.py"),
            str(job_path),
            str(out),
            "--task",
            str(task),
            "--images",
            images,
        ]
        with open(work / "patchcore_steps.log", "w") as log:
            subprocess.run(
                command, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, stdout=subprocess.DEVNULL, stderr=log
            )
    return out


def rows_of(queries: np.ndarray) -> torch.Tensor:
    """(N, D) embedding rows as a (1, D, 1, N) map, the k-NN head's input."""
    q = torch.from_numpy(queries)
    return q.T.reshape(1, q.shape[1], 1, -1)


@torch.no_grad()
def compare(h: dict, cfg, test_images: list[np.ndarray]) -> list[tuple[str, str, str]]:
    """(step, what was compared, the figure) for every step, each of ours fed HiAD's input to it."""
    rows = []
    embedder = PatchCore.build_embedder(cfg.patch)
    tiling = Tiling.create(cfg.image_size, cfg.patch_size, cfg.stride, cfg.ds_factors)
    task = int(h["task"])
    tiles = np.stack([split(im, [tiling.tiles[task]])[0] for im in test_images])

    # 1. the tile's pixels (HiAD decodes, resizes and crops itself), then the network input
    hiad_pixels = (h["test_input"].transpose(0, 2, 3, 1) * IMAGENET_STD + IMAGENET_MEAN) * 255
    rows.append(
        (
            "tile pixels",
            "HiAD's input de-normalized vs our tile (0-255)",
            f"max |diff| {np.abs(hiad_pixels - tiles).max():.4f}",
        )
    )
    norm = embedder.features.normalize
    ours_input = norm(torch.from_numpy(tiles)).numpy()
    mean, std = ([round(float(v) / 255, 3) for v in b.flatten()] for b in (norm.mean, norm.std))
    rows.append(
        (
            "input normalization",
            f"ours mean {mean} std {std}; HiAD ImageNet's",
            f"max |diff| {np.abs(ours_input - h['test_input']).max():.3f} "
            f"(relative {relative(ours_input, h['test_input']):.3f})",
        )
    )

    # 2. backbone stages, 3. locally aware embedding
    stages = embedder.features.backbone(torch.from_numpy(h["test_input"]))
    for s, f in enumerate(stages):
        rows.append(
            (
                f"backbone stage {s}",
                f"{tuple(f.shape[1:])} on HiAD's input",
                f"relative {relative(f.numpy(), h[f'test_stage{s}']):.2e}",
            )
        )
    emb = embedder.aggregate([torch.from_numpy(h[f"test_stage{s}"]) for s in range(len(stages))])
    emb = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).numpy()
    rows.append(("embedding", f"{emb.shape} on HiAD's stages", f"relative {relative(emb, h['test_embedding']):.2e}"))

    # 4. coreset of HiAD's training embeddings
    features, theirs = h["coreset_input"], h["coreset_indices"]
    p = cfg.patch
    picked = greedy_coreset(torch.from_numpy(features), p.percentage, p.coreset_projection_dim, seed=cfg.seed).numpy()
    same = len(set(picked.tolist()) & set(theirs.tolist())) / len(theirs)
    rows.append(
        (
            "coreset",
            f"{len(picked)} of {len(features)} {features.shape[1]}-d HiAD embeddings (ours: projected "
            f"to {p.coreset_projection_dim} if wider; HiAD: to 128 unless 128-d)",
            f"same picks {same:.1%}; coverage radius ours {coverage(features, features[picked]):.3f}, "
            f"HiAD {coverage(features, features[theirs]):.3f}",
        )
    )

    # 5. per-patch k-NN distance against HiAD's bank (its faiss IndexFlatL2 returns squared L2)
    head = KnnHead(torch.from_numpy(h["bank"]), p.anomaly_scorer_num_nn)
    ours_d = head(rows_of(h["test_embedding"])).flatten().numpy()
    theirs_d = h["test_distances"].mean(1)
    rows.append(
        (
            "k-NN distance",
            "ours |q-b| vs HiAD's faiss value",
            f"relative {relative(ours_d, theirs_d):.3f}; ours squared: {relative(ours_d**2, theirs_d):.2e}",
        )
    )

    # 6. per-tile map from HiAD's patch scores
    spec = PostprocessSpec(**PatchCore.postprocess)
    size = (tiling.tiles[task].main.width, tiling.tiles[task].main.height)
    ours_tile = np.stack([tile_map(s, size, spec) for s in h["test_tile_scores"]])
    rows.append(
        (
            "tile map",
            f"bilinear to {size}, per-tile blur sigma {spec.tile_blur_sigma} (HiAD: 4)",
            f"relative {relative(ours_tile, h['test_tile_maps']):.2e}",
        )
    )

    # 7. stitching HiAD's tile maps, 8. final blur, 9. image score
    hiad_order = {tuple(int(v) for v in box[:2]): i for i, box in enumerate(h["tile_boxes"][0])}
    ours_order = [hiad_order[(t.main.x, t.main.y)] for t in tiling.tiles]
    stitched = np.stack([gather(list(m[ours_order]), tiling.tiles, tiling.image_size) for m in h["tile_maps"]])
    rows.append(("stitching", "gather of HiAD's tile maps", f"relative {relative(stitched, h['stitched']):.2e}"))
    final = np.stack([finish(m.astype(np.float32), spec)[0] for m in h["stitched"]])
    rows.append(("final blur", "sigma 4 on HiAD's stitched map", f"relative {relative(final, h['final']):.2e}"))
    scores = np.array([image_score(m, spec) for m in h["final"]])
    rows.append(
        (
            "image score",
            f"{spec.score_rule}, pool {spec.score_pool} (HiAD: 16x16 means sliding by 1 px)",
            f"relative {relative(scores, h['image_scores']):.2e}",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="elpv-poly-2048")
    parser.add_argument("--task", type=int, default=0)
    parser.add_argument("--images", default="0,-1", help="test images to record (indices into the test set)")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "reference")
    args = parser.parse_args()
    root = dataset(args.set, args.out)
    train, test = read_mvtec(root, "train"), read_mvtec(root, "test")
    image_size, patch_size = SETS[args.set][1:]
    cfg = our_config("patchcore", image_size, patch_size)
    job = hiad_job(cfg, train, test)
    work = args.out / "runs" / args.set
    work.mkdir(parents=True, exist_ok=True)
    h = dict(np.load(record_hiad(job, work, args.task, args.images)))
    images = [test[int(i)].image((image_size, image_size)) for i in h["test_images"]]
    print("| step | compared | ours vs HiAD |\n|---|---|---|")
    for step, what, figure in compare(h, cfg, images):
        print(f"| {step} | {what} | {figure} |", flush=True)


if __name__ == "__main__":
    main()
