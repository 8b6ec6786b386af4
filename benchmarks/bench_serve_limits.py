"""What abusive clients cost `hiad-runtime serve`: server peak RSS, seconds, status codes, log and disk.

    .venv/bin/python benchmarks/bench_serve_limits.py BUNDLE [--only pixels,bodies,slow,tar,png]

- pixels: one 10000 x 10000 16-bit RGBA PNG of zeros (~780 kB) to a server with default options.
- bodies: 48 clients at once, 60 MiB each, to a server with default options.
- slow: 1,100 clients that never finish their headers, against a server whose open-file limit is
  1024; /healthz probed once a second meanwhile (2 s timeout); the log's growth.
- tar: 30 reloads of a .tar bundle, then SIGTERM: extraction folders left, and their bytes.
- png: bytes of one answer with the map, as JSON (base64) and as `Accept: image/png`.

Everything runs on 127.0.0.1 with bounded counts and stops by itself; a server passing
--kill-above-mb is killed (the figure then says so). Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import resource
import shutil
import signal
import socket
import struct
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from pathlib import Path

import cv2
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hiad_runtime.serve.launch import serving  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def rss_peak_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Watchdog(threading.Thread):
    """Kills the server (SIGKILL) if its resident memory passes `limit_mb`: the machine is shared."""

    def __init__(self, pid: int, limit_mb: float):
        super().__init__(daemon=True)
        self.pid, self.limit_mb, self.fired, self.stop = pid, limit_mb, False, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                rss = int(Path(f"/proc/{self.pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
            except (OSError, IndexError):
                return
            if rss > self.limit_mb:
                self.fired = True
                os.kill(self.pid, signal.SIGKILL)
                return


def settle(url: str, proc, limit_s: float = 600) -> float:
    """Seconds until no inference runs any more (one answered 504 goes on), then the server's peak RSS."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s and proc.poll() is None:
        try:
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
        except httpx.HTTPError:
            break
        if "hiad_inflight 0.0" in metrics:
            break
        time.sleep(0.5)
    return rss_peak_mb(proc.pid) if proc.poll() is None else float("nan")


def zeros_png(path: Path, width: int, height: int) -> Path:
    """A 16-bit RGBA PNG of zeros, written row by row (the pixels are never all in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + width * 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def pixels(bundle: Path, work: Path, kill_mb: float) -> None:
    png = zeros_png(work / "deep.png", 10000, 10000)
    with serving(bundle, work / "pixels.log", env=ENV) as (url, proc):
        before = rss_peak_mb(proc.pid)
        dog = Watchdog(proc.pid, kill_mb)
        dog.start()
        t0 = time.perf_counter()
        try:
            r = httpx.post(f"{url}/v1/inspect", content=png.read_bytes(), timeout=300)
            status = str(r.status_code)
        except httpx.HTTPError as e:
            status = type(e).__name__
        seconds = time.perf_counter() - t0
        peak = settle(url, proc)
        busy = time.perf_counter() - t0
        dog.stop.set()
    print(
        f"pixels: {png.stat().st_size / 1e3:.0f} kB 16-bit RGBA 10000x10000 -> {status} in {seconds:.2f} s "
        f"(server busy {busy:.1f} s); server peak RSS {before:.0f} -> {peak:.0f} MB"
        + (" (killed by the watchdog)" if dog.fired else "")
    )


def bodies(bundle: Path, work: Path, kill_mb: float, clients: int = 48, mib: int = 60) -> None:
    body = bytes(mib << 20)
    with serving(bundle, work / "bodies.log", env=ENV) as (url, proc):
        before = rss_peak_mb(proc.pid)
        dog = Watchdog(proc.pid, kill_mb)
        dog.start()
        barrier = threading.Barrier(clients)

        def client(_: int) -> str:
            barrier.wait()
            try:
                return str(httpx.post(f"{url}/v1/inspect", content=body, timeout=300).status_code)
            except httpx.HTTPError as e:
                return type(e).__name__

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(client, range(clients)))
        seconds = time.perf_counter() - t0
        peak = settle(url, proc)
        dog.stop.set()
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(
        f"bodies: {clients} x {mib} MiB at once -> {counts} in {seconds:.1f} s; server peak RSS {before:.0f} -> "
        f"{peak:.0f} MB" + (" (killed by the watchdog)" if dog.fired else "")
    )


def slow(bundle: Path, work: Path, kill_mb: float, clients: int = 1100, seconds: int = 20) -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    log = work / "slow.log"
    with serving(bundle, log, env=ENV, preexec_fn=limit) as (url, proc):
        host, port = url.removeprefix("http://").split(":")
        start_log = log.stat().st_size
        sockets = []
        for _ in range(clients):
            try:
                s = socket.create_connection((host, int(port)), timeout=5)
                s.sendall(b"POST /v1/inspect HTTP/1.1\r\nHost: x\r\n")
                sockets.append(s)
            except OSError:
                break
        probes: dict[str, int] = {}
        for _ in range(seconds):
            t0 = time.monotonic()
            try:
                key = str(httpx.get(f"{url}/healthz", timeout=2).status_code)
            except httpx.HTTPError as e:
                key = type(e).__name__
            probes[key] = probes.get(key, 0) + 1
            time.sleep(max(0.0, 1 - (time.monotonic() - t0)))
        held = 0
        for s in sockets:
            s.setblocking(False)
            try:
                s.recv(1 << 16)  # an answer (408/503) or the end: the server let go
            except BlockingIOError:
                held += 1  # nothing yet: the server still holds it open
            except OSError:
                pass
            s.close()
        text = log.read_text(errors="replace")[start_log:]
        accept_errors = text.count("out of system resource")
        grown = log.stat().st_size - start_log
    print(
        f"slow: {len(sockets)} slow clients, open-file limit 1024, {seconds} s: /healthz probes {probes}; "
        f"{held} still held open by the server at the end; log +{grown / 1e6:.2f} MB, {accept_errors} accept errors"
    )


def tar_reloads(bundle: Path, work: Path, kill_mb: float, reloads: int = 30) -> None:
    archive = work / "bundle.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundle.resolve(), arcname="bundle")
    temp = work / "tmp"
    temp.mkdir()

    def extracted() -> tuple[int, float]:
        folders = list(temp.glob("hiad-bundle-*"))
        return len(folders), sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file()) / 1e6

    with serving(archive, work / "tar.log", env={**ENV, "TMPDIR": str(temp)}) as (url, proc):
        for _ in range(reloads):
            httpx.post(f"{url}/v1/reload", timeout=300)
        during = extracted()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    after = extracted()
    print(
        f"tar: {reloads} reloads of a {archive.stat().st_size / 1e6:.1f} MB .tar: {during[0]} extraction folders "
        f"({during[1]:.0f} MB); after SIGTERM: {after[0]} ({after[1]:.0f} MB)"
    )


def png_answer(bundle: Path, work: Path, kill_mb: float) -> None:
    image = work / "gray.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8))
    with serving(bundle, work / "png.log", env=ENV) as (url, _):
        body = image.read_bytes()
        as_json = httpx.post(f"{url}/v1/inspect?map=png", content=body, timeout=120)
        as_png = httpx.post(f"{url}/v1/inspect?map=png", content=body, headers={"Accept": "image/png"}, timeout=120)
    print(
        f"png: map answer {len(as_json.content)} B as JSON ({as_json.headers['content-type']}), "
        f"{len(as_png.content)} B with Accept: image/png ({as_png.headers['content-type']})"
    )


CASES = {"pixels": pixels, "bodies": bodies, "slow": slow, "tar": tar_reloads, "png": png_answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--only", default=",".join(CASES), help=f"comma-separated: {','.join(CASES)}")
    parser.add_argument("--kill-above-mb", type=float, default=7500, help="kill the server above this RSS")
    args = parser.parse_args()
    print(f"load: {os.getloadavg()}")
    for name in args.only.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"hiad-bench-{name}-"))
        try:
            CASES[name](args.bundle, work, args.kill_above_mb)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
