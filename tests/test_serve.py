"""`hiad-runtime serve`: a real server in a subprocess on 127.0.0.1, real HTTP, real bundle and images."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from hiad_runtime.serve.launch import free_port, serving  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}  # the server runs this checkout's code
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _wait_until(condition, seconds: float = 60) -> None:
    for _ in range(int(seconds * 10)):
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {seconds} s")


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def _metric(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def _copy_with_thresholds(bundle: Path, target: Path, thresholds: dict | None) -> Path:
    shutil.copytree(bundle, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["thresholds"] = thresholds
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def _tampered(bundle: Path, target: Path) -> Path:
    shutil.copytree(bundle, target)
    graph = target / "embedder_patch.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    return target


@pytest.fixture(scope="module")
def images(test_samples, tmp_path_factory) -> list[Path]:
    """The demo's test modules as given, plus gray 16-bit, RGBA, JPEG and TIFF variants of one."""
    folder = tmp_path_factory.mktemp("serve_images")
    gray = cv2.imread(str(test_samples[0].image_path), cv2.IMREAD_GRAYSCALE)
    variants = {"deep.png": gray.astype(np.uint16) * 257, "rgba.png": np.dstack([gray] * 3 + [np.full_like(gray, 255)])}
    variants |= {"module.jpg": gray, "module.tiff": gray}
    for name, array in variants.items():
        assert cv2.imwrite(str(folder / name), array)
    return [s.image_path for s in test_samples] + sorted(folder.iterdir())


@pytest.fixture(scope="module")
def cli_scores(bundle_dir, images, tmp_path_factory) -> dict[str, float]:
    """What `hiad-runtime predict` says for each image: the service must say the same."""
    out = tmp_path_factory.mktemp("cli")
    files = [str(f) for f in images]
    subprocess.run([sys.executable, "-m", "hiad_runtime.cli", "predict", str(bundle_dir), *files, "--out", str(out), "--threads", "1"], check=True, capture_output=True)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {line["input"]: line["score"] for line in lines}


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    """Small on purpose: 2 workers and 2 queue places (8 clients meet backpressure), 1 MB bodies, 1 MP images."""
    folder = tmp_path_factory.mktemp("server")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    options = ["--workers", "2", "--max-queue", "2", "--max-body-mb", "1", "--max-megapixels", "1", "--token-file", str(token_file)]
    with serving(bundle_dir, folder / "server.log", *options, env=ENV) as (url, _):
        yield url


def test_concurrent_clients_get_the_cli_scores_and_backpressure(server, images, cli_scores):
    bodies = {str(f): f.read_bytes() for f in images}
    names = sorted(bodies)
    answers: list[tuple[str, float]] = []
    refusals: list[httpx.Response] = []
    other: list[httpx.Response] = []
    start = threading.Barrier(8)

    def client(k: int) -> None:
        with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
            start.wait()
            for i in range(25):
                name = names[(k + i) % len(names)]
                for _ in range(500):  # bounded retries on 503
                    if i % 5 == 4:  # some requests as multipart uploads
                        r = c.post("/v1/inspect", files={"image": (Path(name).name, bodies[name])})
                    else:
                        r = c.post("/v1/inspect", content=bodies[name])
                    if r.status_code != 503:
                        break
                    refusals.append(r)
                    time.sleep(0.02)
                if r.status_code == 200:
                    answers.append((name, r.json()["score"]))
                else:
                    other.append(r)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not other, [(r.status_code, r.text) for r in other]
    assert len(answers) == 8 * 25
    for name, score in answers:
        assert score == pytest.approx(cli_scores[name], rel=1e-6), name
    assert refusals, "8 clients against 2 workers + 2 queue places must meet backpressure"
    for r in refusals:
        assert int(r.headers["Retry-After"]) >= 1 and "queue full" in r.json()["error"]
    metrics = httpx.get(f"{server}/metrics").text
    assert _metric(metrics, 'hiad_requests_total{path="/v1/inspect",status="503"}') >= len(refusals)
    assert _metric(metrics, "hiad_images_total") >= 200
    assert _metric(metrics, "hiad_queue_depth") == 0 and _metric(metrics, "hiad_inflight") == 0


def test_bad_images_get_4xx_and_the_server_keeps_serving(server, images, cli_scores):
    good = images[0].read_bytes()
    bomb = _png(np.zeros((2000, 2000), np.uint8))  # 4 MP of zeros in a few kB: over the 1 MP limit
    header = struct.pack(">IIBBBBB", 12000, 12000, 8, 0, 0, 0, 0)  # declares 12000 x 12000, holds 3 rows
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    forged = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(3 * 12001))) + chunk(b"IEND", b"")
    cases = {
        "corrupt": (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), 400, "not a readable image"),
        "empty": (b"", 400, "empty"),
        "truncated": (good[: len(good) // 2], 400, "request body: incomplete PNG"),
        "bomb": (bomb, 400, "declares 2000x2000"),
        "forged header": (forged, 400, "declares 12000x12000"),
        "oversized": (bytes(2 << 20), 413, "exceeds the limit"),
    }
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
        for name, (body, status, message) in cases.items():
            r = c.post("/v1/inspect", content=body)
            assert r.status_code == status and message in r.json()["error"], (name, r.status_code, r.text)
        streamed = c.post("/v1/inspect", content=iter([bytes(1 << 19)] * 4))  # chunked, no Content-Length
        assert streamed.status_code == 413 and "exceeds the limit" in streamed.json()["error"]
        assert c.post("/v1/inspect?map=jpg", content=good).status_code == 400
        assert c.post("/v1/inspect", files={"note": (None, "no file")}).status_code == 400
        assert c.get("/no/such/path").status_code == 404
        assert c.get("/healthz").json() == {"alive": True}
        assert c.get("/readyz").json()["ready"] is True
        r = c.post("/v1/inspect", content=good)
        assert r.status_code == 200 and r.json()["score"] == pytest.approx(cli_scores[str(images[0])], rel=1e-6)


def test_token_is_required_on_v1(server, images):
    good = images[0].read_bytes()
    assert httpx.post(f"{server}/v1/inspect", content=good).status_code == 401
    wrong = httpx.post(f"{server}/v1/inspect", content=good, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.post(f"{server}/v1/reload", headers={"Authorization": "Basic " + TOKEN}).status_code == 401
    assert httpx.get(f"{server}/v1/model").status_code == 401
    assert httpx.post(f"{server}/v1/inspect", content=good, headers=AUTH).status_code == 200
    assert httpx.get(f"{server}/healthz").status_code == 200  # probes and scrapers need no token


def test_model_summary_and_metrics(server, bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    summary = httpx.get(f"{server}/v1/model", headers=AUTH).json()
    assert summary["tiling"]["image_size"] == manifest["tiling"]["image_size"]
    assert summary["tiling"]["tiles"] == len(manifest["tiling"]["tiles"])
    assert [t["name"] for t in summary["tasks"]] == [t["name"] for t in manifest["tasks"]]
    assert summary["parity"] == manifest["parity"] and summary["thresholds"] == manifest["thresholds"]
    assert set(summary["providers_in_use"]) & {"CPUExecutionProvider", "OpenVINO:CPU"}  # backend auto: either on a CPU box
    assert summary["bundle_id"].endswith("@" + manifest["created"])
    metrics = httpx.get(f"{server}/metrics").text
    assert f'hiad_model_info{{bundle_id="{summary["bundle_id"]}"' in metrics
    assert "hiad_inspect_latency_seconds_bucket" in metrics and "hiad_images_per_second" in metrics


def test_reload_under_load_and_a_tampered_bundle_is_refused(bundle_dir, images, tmp_path):
    from hiad_runtime.inspector import Inspector

    served = _copy_with_thresholds(bundle_dir, tmp_path / "served", None)
    with_thresholds = _copy_with_thresholds(bundle_dir, tmp_path / "next", {"image": 5.0, "pixel": 8.0})
    tampered = _tampered(bundle_dir, tmp_path / "tampered")
    good = images[0].read_bytes()
    with serving(served, tmp_path / "server.log", "--workers", "1", "--max-queue", "32", env=ENV) as (url, proc):
        first = httpx.get(f"{url}/readyz").json()["bundle_id"]
        failures, seen, stop = [], set(), threading.Event()

        def client() -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    r = c.post("/v1/inspect", content=good)
                    if r.status_code != 200:
                        failures.append((r.status_code, r.text))
                    else:
                        seen.add(r.json()["bundle_id"])

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            _wait_until(lambda: first in seen)
            refused = httpx.post(f"{url}/v1/reload", json={"bundle": str(tampered)}, timeout=120)
            swapped = httpx.post(f"{url}/v1/reload", json={"bundle": str(with_thresholds)}, timeout=120)
            missing = httpx.post(f"{url}/v1/reload", json={"bundle": str(tmp_path / "nowhere")}, timeout=120)
            if swapped.status_code == 200:
                _wait_until(lambda: swapped.json()["bundle_id"] in seen)  # the clients ran on the new model too
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not failures, failures[:3]
        assert refused.status_code == 422 and "embedder_patch.onnx" in refused.json()["error"] and refused.json()["bundle_id"] == first
        assert swapped.status_code == 200 and swapped.json()["previous"] == first
        second = swapped.json()["bundle_id"]
        assert second != first and {first, second} <= seen
        assert missing.status_code == 422 and httpx.get(f"{url}/readyz").json()["bundle_id"] == second

        # the new bundle's thresholds give decision and mask; the mask is the runtime's own
        answer = httpx.post(f"{url}/v1/inspect?map=png&mask=png", content=good).json()
        expected = Inspector.load(with_thresholds).predict(str(images[0]))
        assert answer["decision"] == expected.decision
        mask = cv2.imdecode(np.frombuffer(base64.b64decode(answer["mask"]["png_base64"]), np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(mask > 0, expected.mask)
        encoded = cv2.imdecode(np.frombuffer(base64.b64decode(answer["map"]["png_base64"]), np.uint8), cv2.IMREAD_UNCHANGED)
        low, high = answer["map"]["range"]
        assert encoded.dtype == np.uint16
        np.testing.assert_allclose(low + encoded / 65535 * (high - low), expected.anomaly_map, atol=(high - low) / 65535)

        # SIGHUP re-reads the served path from disk
        _copy_with_thresholds(bundle_dir, tmp_path / "third", {"image": 1.0, "pixel": 2.0})
        shutil.rmtree(with_thresholds)
        (tmp_path / "third").rename(with_thresholds)
        proc.send_signal(signal.SIGHUP)
        _wait_until(lambda: httpx.get(f"{url}/readyz").json()["bundle_id"] not in (first, second))
        assert httpx.get(f"{url}/v1/model").json()["thresholds"] == {"image": 1.0, "pixel": 2.0}


def test_timeout_answers_504_and_a_bad_bundle_stops_the_start(bundle_dir, images, tmp_path):
    with serving(bundle_dir, tmp_path / "server.log", "--timeout", "0.000001", env=ENV) as (url, _):
        r = httpx.post(f"{url}/v1/inspect", content=images[0].read_bytes(), timeout=60)
        assert r.status_code == 504 and "timeout" in r.json()["error"]
        assert httpx.get(f"{url}/healthz").status_code == 200
    tampered = _tampered(bundle_dir, tmp_path / "tampered")
    out = subprocess.run([sys.executable, "-m", "hiad_runtime.cli", "serve", str(tampered), "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "embedder_patch.onnx" in out.stderr


def test_service_imports_nothing_of_training():
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'timm', 'torchvision', 'hiad_train', 'hiad_export', 'sklearn'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import hiad_runtime.serve.server, hiad_runtime.cli\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
