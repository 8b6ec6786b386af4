"""HiAD 0.2.1's PatchCore step by step, recorded for patchcore_steps.py to compare ours against.

Runs HiAD's own training and inference functions for every task of a job (the same job compare.py
writes), in this process, with recorders on HiAD's PatchCore methods. Writes, for the recorded task:
each step's inputs and outputs (network input, backbone stages, locally aware embeddings, coreset
indices and bank, per-patch k-NN distances, per-tile maps), and for the recorded test images every
task's tile map, HiAD's stitched and post-processed map and its image score.

    benchmarks/reference/.venv/bin/python benchmarks/reference/hiad_steps.py JOB.json OUT.npz [--task 0] [--images 0,23]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import hiad_cpu  # noqa: F401  (first: HiAD's CUDA patched out)
import numpy as np
import torch
from easydict import EasyDict
from hiad.detectors import HRPatchCore
from hiad.detectors.patchcore import common, sampler
from hiad.task import O2OTaskGenerator
from hiad.utils.device import test_in_device, train_in_device
from hiad.utils.split_and_gather import HRSample, MultiResolutionHRImageSpliter, NPImageGather


class Recorder:
    """Wraps methods of HiAD's classes; keeps what each call saw and returned while `on` (and, for
    methods wrapped `within` another, only during a call of that one)."""

    def __init__(self):
        self.on = False
        self.calls: dict[str, list] = {}
        self.active: set[str] = set()

    def wrap(self, owner, name: str, keep, within: str | None = None):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            self.active.add(name)
            try:
                out = original(*args, **kwargs)
            finally:
                self.active.discard(name)
            if self.on and (within is None or within in self.active):
                self.calls.setdefault(name, []).append(keep(args, out))
            return out

        setattr(owner, name, wrapped)


def numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--task", type=int, default=0)
    parser.add_argument("--images", default="0,-1", help="test images whose maps are recorded (indices)")
    args = parser.parse_args()
    job = json.loads(args.job.read_text())
    image_size, patch_size, seed = job["image_size"], job["patch_size"], job["seed"]

    def make(rs):
        return [
            HRSample(
                image=r["image"],
                mask=r.get("mask"),
                image_size=image_size,
                clsname=r["clsname"],
                label=r["label"],
                label_name=r["label_name"],
            )
            for r in rs
        ]

    train = make(job["train"])
    picked = [int(i) % len(job["test"]) for i in args.images.split(",")]
    test = make([job["test"][i] for i in picked])
    indexes = MultiResolutionHRImageSpliter(image_size=image_size, patch_size=patch_size)
    tasks = O2OTaskGenerator().create_tasks(train, indexes)
    config = EasyDict({"patch": {**job["config"], "patch_size": patch_size}})

    rec = Recorder()
    # the backbone's stages as patchcore_emb asks for them (not HiAD's probe of the channel counts)
    rec.wrap(HRPatchCore, "embedding", lambda a, out: (numpy(a[1]), [numpy(o) for o in out]), within="patchcore_emb")
    rec.wrap(HRPatchCore, "patchcore_emb", lambda a, out: numpy(out[0] if isinstance(out, tuple) else out))
    rec.wrap(
        sampler.ApproximateGreedyCoresetSampler,
        "_compute_greedy_coreset_indices",
        lambda a, out: (numpy(a[1]), np.asarray(out)),
    )
    rec.wrap(common.NearestNeighbourScorer, "predict", lambda a, out: (np.asarray(out[1]), np.asarray(out[2])))
    rec.wrap(common.RescaleSegmentor, "convert_to_segmentation", lambda a, out: (numpy(a[1]), np.stack(out)))

    record: dict[str, np.ndarray] = {}
    tile_maps = {}
    with tempfile.TemporaryDirectory(prefix="hiad-steps-") as work:
        for i, task in enumerate(tasks):
            rec.on, rec.calls = i == args.task, {}
            train_in_device(0, HRPatchCore, config, train, [task], job["batch_size"], work, work, seed)
            if rec.on:
                inputs, stages = zip(*rec.calls["embedding"])
                record["train_input"] = np.concatenate(inputs)
                for s in range(len(stages[0])):
                    record[f"train_stage{s}"] = np.concatenate([st[s] for st in stages])
                record["train_embedding"] = np.concatenate(rec.calls["patchcore_emb"])
                ((record["coreset_input"], record["coreset_indices"]),) = rec.calls["_compute_greedy_coreset_indices"]
                checkpoint = torch.load(Path(work) / f"{task['name']}_weight.pkl", weights_only=True)
                record["bank"] = checkpoint["patch_features"]
            rec.calls = {}
            results = test_in_device(0, HRPatchCore, config, test, [task], job["batch_size"], work, work, seed)
            if rec.on:
                inputs, stages = zip(*rec.calls["embedding"])
                record["test_input"] = np.concatenate(inputs)
                for s in range(len(stages[0])):
                    record[f"test_stage{s}"] = np.concatenate([st[s] for st in stages])
                record["test_embedding"] = np.concatenate(rec.calls["patchcore_emb"])
                record["test_distances"] = np.concatenate([d for d, _ in rec.calls["predict"]])
                record["test_neighbours"] = np.concatenate([n for _, n in rec.calls["predict"]])
                record["test_tile_scores"] = np.concatenate([s for s, _ in rec.calls["convert_to_segmentation"]])
                record["test_tile_maps"] = np.concatenate([m for _, m in rec.calls["convert_to_segmentation"]])
            for path, r in results.items():
                tile_maps.setdefault(path, []).extend(zip(r["patch_list"], r["index_list"]))
    rec.on = False
    paths = [s.get_image_path() for s in test]
    record["tile_maps"] = np.stack([np.stack([m for m, _ in tile_maps[p]]) for p in paths])
    record["tile_boxes"] = np.array([[(ix.x, ix.y, ix.width, ix.height) for _, ix in tile_maps[p]] for p in paths])
    stitched = np.stack([NPImageGather([m for m, _ in tile_maps[p]], [ix for _, ix in tile_maps[p]]) for p in paths])
    record["stitched"] = stitched.astype(np.float32)
    final = HRPatchCore.post_processing(stitched, None, is_normalize=False, gaussian_filter=True)
    record["final"] = final.astype(np.float32)
    record["image_scores"] = HRPatchCore.get_image_score(final, batch_size=job["batch_size"])
    record["test_images"] = np.array(picked)
    record["task"] = np.array(args.task)
    np.savez(args.out, **record)


if __name__ == "__main__":
    main()
