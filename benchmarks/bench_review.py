"""What keeping an inspection in the review store costs (`serve --review-dir`): the thumbnail made on the request's
path (from the pixels it decoded anyway), the writer thread's seconds per inspection (the 8-bit map, the files,
fsyncs) and the bytes it leaves on disk.

    .venv/bin/python benchmarks/bench_review.py IMAGE [--repeat 10] [--dir /tmp/review-bench]

IMAGE (e.g. a demo module, 2048^2) is kept as given and upscaled to 8192^2 (PNG); the map is the bundle's
image size (2048^2 float32), as the service hands it over. The request itself only queues the inspection:
the writer's seconds are spent off the request's path. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hiad_runtime.image import decode  # noqa: E402
from hiad_runtime.review.store import ReviewStore, thumbnail_pixels  # noqa: E402


def main() -> None:
    """Time ReviewStore.add as the writer thread calls it, for the image as given and upscaled to 8192^2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/review-bench"))
    args = parser.parse_args()
    original = cv2.imread(str(args.image), cv2.IMREAD_UNCHANGED)
    big = cv2.resize(original, (8192, 8192), interpolation=cv2.INTER_LINEAR)
    anomaly_map = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    print(f"{'image':>18} {'body MB':>8} {'thumb s':>8} {'writer s':>9} {'item MB':>8}")
    for name, pixels in (("as given", original), ("8192^2", big)):
        body = cv2.imencode(".png", pixels)[1].tobytes()
        shutil.rmtree(args.dir, ignore_errors=True)
        store = ReviewStore.open(args.dir)
        thumb_s, add_s = [], []
        for _ in range(args.repeat):
            rgb = decode(body, "bench")  # the service has decoded it for inference already
            t0 = time.perf_counter()
            thumb = thumbnail_pixels(rgb)
            t1 = time.perf_counter()
            fields = dict(score=0.5, decision=True, threshold=0.4, bundle="bench", latency_ms=1.0)
            record = store.add(body, anomaly_map, width=rgb.shape[1], height=rgb.shape[0], pixels=thumb, **fields)
            t2 = time.perf_counter()
            thumb_s.append(t1 - t0)
            add_s.append(t2 - t1)
        item_mb = sum(f.stat().st_size for f in record.folder.iterdir()) / 1e6
        label = f"{name} {rgb.shape[1]}x{rgb.shape[0]}"
        print(
            f"{label:>18} {len(body) / 1e6:8.2f} {statistics.median(thumb_s):8.4f} "
            f"{statistics.median(add_s):9.3f} {item_mb:8.2f}"
        )
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
