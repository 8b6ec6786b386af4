"""Scaling of training over tasks: single process vs Ray, for 16, 64 and 256 O2O PatchCore tasks.

Tiles stay 128 px and the image grows (512, 1024, 2048 px), so every task has the same work (8
images x one tile). Measured here: the single-process fit stage (LocalExecutor), each task's fit
time, and the fit stage on a local Ray cluster of `--workers` CPUs. Computed for more workers: the
tasks' measured times scheduled longest-first on W workers, plus the per-task overhead Ray showed
here. Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_distributed.py [--fastflow]  (figures, not a test).
"""

from __future__ import annotations

import argparse
import heapq
import tempfile
import time
from pathlib import Path

import ray

from hiad_train.config import parse_config
from hiad_train.data import read_mvtec
from hiad_train.data.elpv import build_elpv_demo
from hiad_train.distributed import RayExecutor
from hiad_train.executors import LocalExecutor
from hiad_train.trainer import HRTrainer


def timed(executor):
    """The executor with the wall time of each stage it runs kept in `.wall`."""
    executor.wall = {}
    for stage_method in ("extract", "fit"):
        method = getattr(executor, stage_method)

        def run(stage, progress=False, _method=method):
            start = time.perf_counter()
            out = _method(stage, progress)
            executor.wall[stage.name] = time.perf_counter() - start
            return out

        setattr(executor, stage_method, run)
    return executor


def schedule(seconds: list[float], workers: int) -> float:
    """Makespan of the tasks placed longest-first on the least-loaded of `workers`."""
    loads = [0.0] * workers
    for s in sorted(seconds, reverse=True):
        heapq.heapreplace(loads, loads[0] + s)
    return max(loads)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument(
        "--fastflow", action="store_true", help="16 FastFlow tasks (3 epochs each) instead: a heavier fit"
    )
    args = parser.parse_args()
    root = build_elpv_demo(
        Path(tempfile.mkdtemp()), rows=4, cols=4, cell_size=128, n_train=args.images, n_test=2, seed=0
    )
    samples = read_mvtec(root, "train")
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    base = {
        "seed": 0,
        "patch_size": 128,
        "batch_size": 16,
        "tasks": {"generator": "o2o"},
        "patch": {"percentage": 0.1, "target_embed_dimension": 128},
    }
    sides = (512, 1024, 2048)
    if args.fastflow:
        base.update(detector="fastflow", patch={"flow_step": 4, "hidden_ratio": 1.0, "num_epochs": 3, "batch_size": 4})
        sides = (512,)
    HRTrainer(parse_config({**base, "image_size": 512}, "warm-up"), progress=False, executor=RayExecutor()).fit(samples)
    detector = "FastFlow (4 flow steps, 3 epochs)" if args.fastflow else "PatchCore (coreset 10%, 128-d)"
    print(f"{args.images} images, tiles of 128 px, {detector}, Ray on {args.workers} CPUs")
    print(
        "| tasks | 1 process: features, fit (s) | per task (s) | Ray x%d: features, fit (s) | overhead/task (s) | "
        "computed fit x8 | x32 | x128 |" % args.workers
    )
    print("|---|---|---|---|---|---|---|---|")
    for side in sides:
        config = parse_config({**base, "image_size": side}, "bench")
        local = timed(LocalExecutor())
        HRTrainer(config, progress=False, executor=local).fit(samples)
        remote = timed(RayExecutor())
        HRTrainer(config, progress=False, executor=remote).fit(samples)
        per_task = list(local.seconds["tasks"].values())
        n = len(per_task)
        overhead = max(
            0.0,
            (remote.wall["tasks"] - schedule(list(remote.seconds["tasks"].values()), args.workers)) * args.workers / n,
        )
        computed = [schedule([s + overhead for s in per_task], w) for w in (8, 32, 128)]
        print(
            f"| {n} | {local.wall['features']:.1f}, {local.wall['tasks']:.2f} | {sum(per_task) / n:.3f} | "
            f"{remote.wall['features']:.1f}, {remote.wall['tasks']:.2f} | {overhead:.3f} | "
            + " | ".join(f"{c:.2f}" for c in computed)
            + " |"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
