"""Service benchmark: requests/s and p50/p95 latency of `hiad-runtime serve` at 1, 2 and 4 concurrent
clients, next to direct `Inspector.predict` calls on the same encoded images with the same number of
inferences at once, and the server's peak RSS. Traffic goes to 127.0.0.1 only, in bounded loops.

    .venv/bin/python benchmarks/bench_serve.py [BUNDLE IMAGE_OR_DIR] [--requests 40] [--workers 1]

Default: models/demo/bundle and data/elpv/test (after `make demo`). The clients run in this process,
on the same cores as the server: on a small machine their cost shows up as service latency.
A benchmark that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from hiad_runtime.results import find_inputs

ROOT = Path(__file__).resolve().parents[1]


def images_in(path: Path) -> list[bytes]:
    files = find_inputs([path])
    if not files:
        raise SystemExit(f"{path}: no images")
    return [f.read_bytes() for f in files]


def drive(call, bodies: list[bytes], clients: int, requests: int) -> tuple[list[tuple[float, float]], float]:
    """`clients` threads share `requests` calls: (latency, inner seconds the call reports) of each, and the
    wall time of all."""
    latencies: list[tuple[float, float]] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            inner = call(bodies[i % len(bodies)])
            with lock:
                latencies.append((time.perf_counter() - t0, inner))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - start


def compare(calls: dict, bodies: list[bytes], clients: int, requests: int, rounds: int) -> dict:
    """Alternate the callers in `rounds` blocks, so drifting load on a shared machine hits both alike."""
    figures = {}
    runs = {name: ([], 0.0) for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            latencies, wall = drive(call, bodies, clients, max(requests // rounds, clients))
            runs[name] = (runs[name][0] + latencies, runs[name][1] + wall)
    for name, (latencies, wall) in runs.items():
        ms = np.array([latency for latency, _ in latencies]) * 1000
        outside = np.array([latency - inner for latency, inner in latencies]) * 1000
        figures[name] = {
            "rps": len(latencies) / wall,
            "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95)),
            "outside_p50": float(np.percentile(outside, 50)),
        }
    return figures


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's resident-set high-water mark (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", nargs="?", type=Path, default=ROOT / "models" / "demo" / "bundle")
    parser.add_argument("images", nargs="?", type=Path, default=ROOT / "data" / "elpv" / "test")
    parser.add_argument("--requests", type=int, default=40, help="timed requests per concurrency level")
    parser.add_argument(
        "--workers", type=int, default=1, help="inferences at once, in the server and in the direct baseline"
    )
    parser.add_argument("--concurrency", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=5, help="alternating direct/service blocks per row")
    args = parser.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(f"{args.bundle}: no bundle (run `make demo`, or pass BUNDLE IMAGE_OR_DIR)")
    bodies = images_in(args.images)
    load_before = os.getloadavg()[0]
    threads = max(1, (os.cpu_count() or 1) // args.workers)  # as `serve` chooses for --threads 0

    from hiad_runtime.inspector import Inspector
    from hiad_runtime.serve.launch import serving

    inspector = Inspector.load(args.bundle, threads=threads)
    pool = ThreadPoolExecutor(args.workers)  # first come, first served, as the service's queue

    def direct(body: bytes) -> float:
        """Seconds inside predict (what is left is waiting for a free worker)."""
        return pool.submit(timed_predict, body).result()

    def timed_predict(body: bytes) -> float:
        t0 = time.perf_counter()
        inspector.predict(body)
        return time.perf_counter() - t0

    log = Path(tempfile.mkstemp(prefix="hiad-bench-serve-", suffix=".log")[1])
    options = ["--workers", str(args.workers), "--max-queue", "64", "--threads", str(threads)]
    with serving(args.bundle, log, *options) as (url, server):
        local = threading.local()

        def service(body: bytes) -> float:
            """Seconds of queue wait and inference as the server reports them."""
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=url, timeout=120)
            r = local.client.post("/v1/inspect", content=body)
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.text}")
            return sum(v for k, v in r.json()["latency_ms"].items() if k != "total") / 1000

        for call in (direct, service):  # warm-up, untimed
            drive(call, bodies, 1, 3)
        rows = []
        for clients in (int(c) for c in args.concurrency.split(",")):
            figures = compare({"direct": direct, "service": service}, bodies, clients, args.requests, args.rounds)
            rows.append((clients, figures["direct"], figures["service"]))
        rss = peak_rss_mb(server.pid)

    w, h = inspector.tiling.image_size
    print(
        f"bundle {args.bundle} ({w}x{h}, {len(inspector.tiling.tiles)} tiles), {len(bodies)} images, "
        f"{args.requests} requests per row, workers {args.workers}, {threads} ORT threads each, "
        f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(
        "| clients | direct req/s | direct p50 ms | direct p95 ms | service req/s | service p50 ms | service p95 ms "
        "| p50 overhead | HTTP p50 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for clients, d, s in rows:
        print(
            f"| {clients} | {d['rps']:.2f} | {d['p50']:.1f} | {d['p95']:.1f} | {s['rps']:.2f} | {s['p50']:.1f} | "
            f"{s['p95']:.1f} | "
            f"{(s['p50'] / d['p50'] - 1) * 100:+.1f} % | {s['outside_p50']:.1f} |"
        )
    print(
        "HTTP ms: a request's client-side latency minus the queue wait and inference stages the server reports "
        "(transfer, parsing, JSON, event loop)"
    )
    print(f"server peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
