"""`hiad-runtime serve --ray-replicas 2`: the service as 2 Ray Serve replicas on a local Ray instance, real HTTP
through Ray's proxy, a real bundle and images: the CLI's scores, the same limits, 503 + Retry-After when
saturated, and a reload under load rolled over both replicas without a failed request."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (extra `ray`: ray[serve])")

from hiad_runtime.serve.launch import serving  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLIENTS = 8


@pytest.fixture(scope="module")
def images(test_samples) -> list[Path]:
    return [s.image_path for s in test_samples]


@pytest.fixture(scope="module")
def cli_scores(bundle_dir, images, tmp_path_factory) -> dict[str, float]:
    """What `hiad-runtime predict` says for each image: every replica must say the same."""
    out = tmp_path_factory.mktemp("cli")
    command = [sys.executable, "-m", "hiad_runtime.cli", "predict", str(bundle_dir), *map(str, images)]
    subprocess.run([*command, "--out", str(out), "--threads", "1"], check=True, capture_output=True, env=ENV)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {line["input"]: line["score"] for line in lines}


@pytest.fixture(scope="module")
def served(bundle_dir, tmp_path_factory):
    """2 replicas of 1 worker and 1 queue place each (8 clients saturate them), 1 MB bodies, 1 MP images, a
    token; the served bundle is a copy, so that a test can publish another one in its place."""
    folder = tmp_path_factory.mktemp("serve_ray")
    (folder / "token").write_text(TOKEN + "\n")
    bundle = shutil.copytree(bundle_dir, folder / "bundle")
    options = ["--ray-replicas", "2", "--workers", "1", "--max-queue", "1", "--max-body-mb", "1"]
    options += ["--max-megapixels", "1", "--token-file", str(folder / "token")]
    with serving(bundle, folder / "server.log", *options, env=ENV, wait_s=600) as (url, proc):
        yield url, proc, folder


def _replica_processes(root: int) -> list[int]:
    """The Serve replica processes under `root` (Ray names them `ray::ServeReplica:APP:DEPLOYMENT`)."""
    parent, title = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                title[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except (OSError, IndexError, ValueError):
                continue

    def under(pid: int) -> bool:
        while pid in parent:
            pid = parent[pid]
            if pid == root:
                return True
        return False

    return [p for p, t in title.items() if t.startswith(b"ray::ServeReplica:hiad:inspect") and under(p)]


def _post_until_answered(client, body: bytes, refusals: list, route: str = "/v1/inspect", **post) -> httpx.Response:
    """POST `route` (the image `body`, or `post`'s), retrying each 503 after its Retry-After (bounded): what a
    well-behaved client does."""
    for _ in range(200):
        r = client.post(route, **(post or {"content": body}))
        if r.status_code != 503:
            return r
        refusals.append(r)
        time.sleep(min(float(r.headers.get("Retry-After", "1")), 1.0) / 10)
    return r


def test_replicas_answer_the_cli_scores_under_the_same_limits(served, images, cli_scores):
    url, proc, _ = served
    assert len(_replica_processes(proc.pid)) == 2
    bodies = {str(f): f.read_bytes() for f in images}
    names = sorted(bodies)
    answers, refusals, other = [], [], []
    start = threading.Barrier(CLIENTS)

    def client(k: int) -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
            start.wait()
            for i in range(4):
                name = names[(k + i) % len(names)]
                r = _post_until_answered(c, bodies[name], refusals)
                (answers if r.status_code == 200 else other).append((name, r))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not other, [(r.status_code, r.text) for _, r in other]
    assert len(answers) == CLIENTS * 4
    for name, r in answers:
        assert r.json()["score"] == pytest.approx(cli_scores[name], rel=1e-6), name
    assert refusals, f"{CLIENTS} clients against 2 replicas x (1 worker + 1 queue place) must meet backpressure"
    for r in refusals:  # from a replica's pool ("queue full"), or from Ray's proxy once every replica is full
        assert int(r.headers["Retry-After"]) >= 1, r.headers
    pool = sum("queue full" in r.text for r in refusals)
    print(f"{len(answers)} answers, {len(refusals)} 503 + Retry-After ({pool} from a replica's pool)")

    good = bodies[names[0]]
    with httpx.Client(base_url=url, timeout=120) as c:
        assert c.post("/v1/inspect", content=good).status_code == 401  # the token, on every replica
        assert c.get("/healthz").json() == {"alive": True} and c.get("/readyz").json()["ready"] is True
        c.headers.update(AUTH)
        oversized = c.post("/v1/inspect", content=bytes(2 << 20))
        assert oversized.status_code == 413 and "exceeds the limit" in oversized.json()["error"]
        bomb = cv2.imencode(".png", np.zeros((2000, 2000), np.uint8))[1].tobytes()  # 4 MP: over the 1 MP budget
        r = c.post("/v1/inspect", content=bomb)
        assert r.status_code == 400 and "declares 2000x2000" in r.json()["error"]
        assert "hiad_requests_total" in c.get("/metrics").text


def test_reload_under_load_rolls_over_every_replica_and_loses_nothing(served, images, tmp_path):
    url, proc, folder = served
    good = images[0].read_bytes()
    first = httpx.get(f"{url}/readyz").json()["bundle_id"]
    following = shutil.copytree(folder / "bundle", tmp_path / "next")
    manifest = json.loads((following / "manifest.json").read_text())
    manifest["thresholds"] = {"image": 5.0, "pixel": 8.0}
    (following / "manifest.json").write_text(json.dumps(manifest))
    tampered = shutil.copytree(folder / "bundle", tmp_path / "tampered")
    with open(tampered / "embedder_patch.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 16)

    failures, refusals, seen, stop = [], [], [], threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
            while not stop.is_set():
                r = _post_until_answered(c, good, refusals)
                if r.status_code == 200:
                    seen.append(r.json()["bundle_id"])
                else:
                    failures.append((r.status_code, r.text))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        while first not in seen:
            time.sleep(0.1)
        with httpx.Client(base_url=url, headers=AUTH, timeout=600) as c:
            # a reload may find the proxy's queue full of the clients' requests: 503, retried as they are
            refused = _post_until_answered(c, b"", refusals, "/v1/reload", json={"bundle": str(tampered)})
            swapped = _post_until_answered(c, b"", refusals, "/v1/reload", json={"bundle": str(following)})
        served_before = len(seen)
        while len(seen) < served_before + 8:  # the clients kept going on the rolled-out bundle
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()

    print(f"reload under load: {len(seen)} answers, {len(refusals)} 503 retried, {len(failures)} failed")
    assert not failures, failures[:3]
    assert refused.status_code == 422 and "embedder_patch.onnx" in refused.json()["error"], refused.text
    assert swapped.status_code == 200 and swapped.json()["previous"] == first, swapped.text
    second = swapped.json()["bundle_id"]
    assert second != first and seen[-8:] == [second] * 8  # after the rollout no replica serves the old one
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
        ids = {c.get("/v1/model").json()["bundle_id"] for _ in range(16)}  # asked of both replicas
        assert ids == {second} and c.get("/v1/model").json()["thresholds"] == {"image": 5.0, "pixel": 8.0}

        # SIGHUP to the command re-reads the served path on every replica
        manifest["thresholds"] = {"image": 1.0, "pixel": 2.0}
        (following / "manifest.json").write_text(json.dumps(manifest))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 600
        while {c.get("/v1/model").json()["bundle_id"] for _ in range(16)} & {second}:
            assert time.monotonic() < deadline, "SIGHUP: a replica still serves the previous bundle"
            time.sleep(1)
        assert c.get("/v1/model").json()["thresholds"] == {"image": 1.0, "pixel": 2.0}
