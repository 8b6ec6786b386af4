"""One HiAD 0.2.1 detector on one set, through HiAD's public API as its tutorial uses it: HRSample,
MultiResolutionHRImageSpliter, a task generator, HRTrainer(...).train(...) and HRTrainer.inference(...).

Runs in the reference venv (benchmarks/reference/setup.sh), driven by compare.py, which writes the
job (samples, sizes, HiAD's detector config) as JSON. Writes the image scores HiAD computed, its
anomaly maps resized to the evaluation size (bilinear, as our evaluators resize), and timings.

    benchmarks/reference/.venv/bin/python benchmarks/reference/hiad_side.py JOB.json OUT.npz
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import hiad_cpu  # noqa: F401  (first: HiAD's CUDA patched out in this process and in its workers)
import numpy as np
from hiad import detectors
from hiad.task import O2OTaskGenerator
from hiad.trainer import HRTrainer
from hiad.utils.split_and_gather import HRSample, MultiResolutionHRImageSpliter

# HiAD's detectors that run here (README.md: why FastFlow, RD++, DeSTSeg and RealNet cannot)
DETECTORS = {"patchcore": detectors.HRPatchCore, "padim": detectors.HRPaDiM}


def samples(records: list[dict], image_size: int) -> list[HRSample]:
    return [
        HRSample(
            image=r["image"],
            mask=r.get("mask"),
            image_size=image_size,
            clsname=r["clsname"],
            label=r["label"],
            label_name=r["label_name"],
        )
        for r in records
    ]


def run(job: dict, work: Path) -> dict:
    image_size, patch_size = job["image_size"], job["patch_size"]
    train, test = samples(job["train"], image_size), samples(job["test"], image_size)
    indexes = MultiResolutionHRImageSpliter(image_size=image_size, patch_size=patch_size)
    tasks = O2OTaskGenerator().create_tasks(train, indexes)
    for sub in ("checkpoints", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    trainer = HRTrainer(
        detector_class=DETECTORS[job["detector"]],
        config={"patch": {**job["config"], "patch_size": patch_size}},
        batch_size=job["batch_size"],
        checkpoint_root=str(work / "checkpoints"),
        log_root=str(work / "logs"),
        tasks=tasks,
        seed=job["seed"],
    )
    t0 = time.perf_counter()
    trainer.train(train_samples=train, gpu_ids=[0])
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, maps = trainer.inference(test_samples=test, gpu_ids=[0], return_results_only=True)
    infer_s = time.perf_counter() - t0
    size = (job["eval_size"], job["eval_size"])
    return {
        "scores": np.asarray(scores, np.float64),
        "maps": np.stack([cv2.resize(np.asarray(m, np.float32), size, interpolation=cv2.INTER_LINEAR) for m in maps]),
        "train_s": train_s,
        "s_per_image": infer_s / len(test),
    }


def main() -> None:
    job_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    job = json.loads(job_path.read_text())
    with tempfile.TemporaryDirectory(prefix="hiad-ref-") as work:
        result = run(job, Path(work))
    np.savez(out, **result)


if __name__ == "__main__":
    main()
