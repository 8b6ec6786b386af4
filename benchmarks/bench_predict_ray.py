"""Throughput of `hiad-runtime predict` over a folder of images: in one process, and on Ray actors.

Writes `--images` ELPV demo modules at 2048x2048 (the demo bundle's size; 4x4 cells of 512 px, PNG),
then runs the command once per configuration as its own process, the way a user runs it, and reads
the images/s it prints (scoring only: from the first input to the last record) and its whole wall
time (Ray's start and the actors' bundle loads included). Then Ray's own cost per image: a 1-CPU
actor that returns a float32 map of the bundle's size for each input path it is sent, timed over the
same number of calls (what an actor call and the map's trip back add to each image).
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_predict_ray.py models/demo/bundle  (figures, not a test).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {  # name: extra predict arguments
    "local, 1 thread": ["--threads", "1"],
    "local, 2 threads": ["--threads", "2"],
    "ray, 1 actor x 1 thread": ["--ray", "local", "--actors", "1", "--threads", "1"],
    "ray, 2 actors x 1 thread": ["--ray", "local", "--actors", "2", "--threads", "1"],
    "ray, 1 actor x 2 threads": ["--ray", "local", "--actors", "1", "--threads", "2"],
}


def predict(bundle: Path, images: Path, out: Path, extra: list[str]) -> tuple[float, float]:
    """(images/s while scoring, wall seconds of the whole command)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "hiad_runtime.cli", "predict", str(bundle), str(images), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"predict {' '.join(extra)} failed:\n{done.stderr[-2000:]}")
    return float(re.search(r"([\d.]+) images/s", done.stdout).group(1)), wall


def ray_cost_per_image(count: int, size: tuple[int, int]) -> float:
    """Seconds per call of a 1-CPU actor returning a float32 map of `size`, calls kept 2 deep as predict does."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)

    @ray.remote(num_cpus=1)
    class Echo:
        def score(self, path: str) -> np.ndarray:
            return np.full(size[::-1], len(path), np.float32)

    actor = Echo.remote()
    ray.get(actor.score.remote("warm-up"))
    start = time.perf_counter()
    calls = [actor.score.remote(f"image_{i}.png") for i in range(2)]
    for i in range(2, count + 2):
        ray.get(calls.pop(0))
        if i < count:
            calls.append(actor.score.remote(f"image_{i}.png"))
    seconds = (time.perf_counter() - start) / count
    ray.shutdown()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="these configurations only")
    args = parser.parse_args()
    from hiad_train.data.elpv import build_elpv_demo

    with tempfile.TemporaryDirectory(prefix="bench-predict-ray-") as tmp:
        images = build_elpv_demo(Path(tmp) / "data", n_train=0, n_test=args.images, seed=1) / "test"
        print(f"{args.images} images of 2048x2048 under {images}; load average {os.getloadavg()[0]:.1f} at start")
        print(f"{'configuration':<26} {'images/s':>9} {'s/image':>8} {'wall s':>7} {'load':>5}")
        for name in args.only or CONFIGS:
            rate, wall = predict(args.bundle, images, Path(tmp) / re.sub(r"\W+", "_", name), CONFIGS[name])
            print(f"{name:<26} {rate:>9.3f} {1 / rate:>8.2f} {wall:>7.1f} {os.getloadavg()[0]:>5.1f}", flush=True)
        per_call = ray_cost_per_image(args.images, (2048, 2048))
        print(f"Ray's cost per image (a call and a 2048x2048 float32 map back, 16 MB): {per_call * 1000:.1f} ms")


if __name__ == "__main__":
    main()
