"""Training-speed benchmark: 8 training images at 2048x2048, 16 O2O PatchCore tasks, coreset 10%.

Prints wall time per phase. Run: .venv/bin/python benchmarks/bench_train.py  (builds the ELPV demo
data under data/ if it is not there). A benchmark that prints figures, not a test.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from hiad_train.config import load_config
from hiad_train.data import read_mvtec
from hiad_train.data.elpv import build_elpv_demo
from hiad_train.trainer import HRTrainer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    data = ROOT / "data" / "elpv"
    if not data.is_dir():
        build_elpv_demo(ROOT / "data")
    samples = read_mvtec(data, "train")[:8]
    config = load_config(ROOT / "configs" / "demo.yaml", {"tasks": {"generator": "o2o"}})
    trainer = HRTrainer(config, progress=False)

    import hiad_train.detectors.patchcore as pc

    coreset_seconds = []
    original = pc.greedy_coreset

    def timed(*a, **k):
        t = time.perf_counter()
        out = original(*a, **k)
        coreset_seconds.append(time.perf_counter() - t)
        return out

    pc.greedy_coreset = timed
    t0 = time.perf_counter()
    model = trainer.fit(samples)
    wall = time.perf_counter() - t0
    core = sum(coreset_seconds)
    print(
        f"images: {len(samples)} at {config.image_size}, tiles/image: {len(model.tiling.tiles)}, tasks: "
        f"{len(model.tasks)}"
    )
    print(
        f"bank per task: {model.detectors['task_0'].memory_bank.shape[0]} x "
        f"{model.detectors['task_0'].memory_bank.shape[1]}"
    )
    print(
        f"wall: {wall:.1f} s (decode + features {wall - core:.1f} s, coreset {core:.1f} s = "
        f"{core / len(model.tasks):.2f} s/task)"
    )
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
