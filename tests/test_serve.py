"""`hiad-runtime serve`: a real server in a subprocess on 127.0.0.1, real HTTP, real bundle and images."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
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
    subprocess.run(
        [
            sys.executable,
            "-m",
            "hiad_runtime.cli",
            "predict",
            str(bundle_dir),
            *files,
            "--out",
            str(out),
            "--threads",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {line["input"]: line["score"] for line in lines}


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    """Small on purpose: 2 workers and 2 queue places (8 clients meet backpressure), 1 MB bodies, 1 MP images."""
    folder = tmp_path_factory.mktemp("server")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    options = [
        "--workers",
        "2",
        "--max-queue",
        "2",
        "--max-body-mb",
        "1",
        "--max-megapixels",
        "1",
        "--token-file",
        str(token_file),
    ]
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

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    forged = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(3 * 12001)))
        + chunk(b"IEND", b"")
    )
    cases = {
        "corrupt": (
            np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
            400,
            "not a readable image",
        ),
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


def _metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text format."""
    values = [float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} not in /metrics"
    return values[0]


def test_model_summary_and_metrics(server, bundle_dir, images):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    summary = httpx.get(f"{server}/v1/model", headers=AUTH).json()
    assert summary["tiling"]["image_size"] == manifest["tiling"]["image_size"]
    assert summary["tiling"]["tiles"] == len(manifest["tiling"]["tiles"])
    assert [t["name"] for t in summary["tasks"]] == [t["name"] for t in manifest["tasks"]]
    assert summary["parity"] == manifest["parity"] and summary["thresholds"] == manifest["thresholds"]
    assert set(summary["providers_in_use"]) & {
        "CPUExecutionProvider",
        "OpenVINO:CPU",
    }  # backend auto: either on a CPU box
    assert summary["bundle_id"].endswith("@" + manifest["created"])
    metrics = httpx.get(f"{server}/metrics").text
    assert f'hiad_model_info{{bundle_id="{summary["bundle_id"]}"' in metrics
    count, inspected = _metric(metrics, "hiad_inspect_latency_seconds_count"), _metric(metrics, "hiad_images_total")
    assert (
        httpx.post(f"{server}/v1/inspect", content=images[0].read_bytes(), headers=AUTH, timeout=60).status_code == 200
    )
    metrics = httpx.get(f"{server}/metrics").text  # one more inspection, timed and counted
    assert _metric(metrics, "hiad_inspect_latency_seconds_count") == count + 1
    assert _metric(metrics, "hiad_images_total") == inspected + 1 and _metric(metrics, "hiad_images_per_second") > 0


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
        assert (
            refused.status_code == 422
            and "embedder_patch.onnx" in refused.json()["error"]
            and refused.json()["bundle_id"] == first
        )
        assert swapped.status_code == 200 and swapped.json()["previous"] == first
        second = swapped.json()["bundle_id"]
        assert second != first and {first, second} <= seen
        assert missing.status_code == 422 and httpx.get(f"{url}/readyz").json()["bundle_id"] == second

        # the new bundle's thresholds give decision and mask; the mask is the runtime's own
        answer = httpx.post(f"{url}/v1/inspect?map=png&mask=png", content=good).json()
        expected = Inspector.load(with_thresholds).predict(str(images[0]))
        assert answer["decision"] == expected.decision
        mask = cv2.imdecode(
            np.frombuffer(base64.b64decode(answer["mask"]["png_base64"]), np.uint8), cv2.IMREAD_UNCHANGED
        )
        np.testing.assert_array_equal(mask > 0, expected.mask)
        encoded = cv2.imdecode(
            np.frombuffer(base64.b64decode(answer["map"]["png_base64"]), np.uint8), cv2.IMREAD_UNCHANGED
        )
        low, high = answer["map"]["range"]
        assert encoded.dtype == np.uint16
        np.testing.assert_allclose(
            low + encoded / 65535 * (high - low), expected.anomaly_map, atol=(high - low) / 65535
        )

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
    out = subprocess.run(
        [sys.executable, "-m", "hiad_runtime.cli", "serve", str(tampered), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "embedder_patch.onnx" in out.stderr
    too_many = subprocess.run(  # a connection cap the open-file limit cannot hold
        [
            sys.executable,
            "-m",
            "hiad_runtime.cli",
            "serve",
            str(bundle_dir),
            "--port",
            str(free_port()),
            "--max-connections",
            "1000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        preexec_fn=_file_limit(256),
    )
    assert (
        too_many.returncode == 2
        and "--max-connections 1000 is more than the open-file limit (256) allows" in too_many.stderr
    )


def test_service_imports_nothing_of_training():
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'timm', 'torchvision', 'hiad_train', 'hiad_export', 'sklearn'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import hiad_runtime.serve.server, hiad_runtime.serve.replicas, hiad_runtime.cli\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_serve_takes_predicts_runtime_options_and_serves_with_them(bundle_dir, images, monkeypatch):
    """#19: serve had none of predict's runtime options; they are one RuntimeOptions for every bundle it loads."""
    from typer.testing import CliRunner

    import hiad_runtime.serve.server as server
    from hiad_runtime.cli import app
    from hiad_runtime.inspector import Inspector
    from hiad_runtime.options import RuntimeOptions
    from hiad_runtime.serve.model_slot import ModelSlot

    seen = []
    monkeypatch.setattr(server, "run", lambda settings, host, port: seen.append(settings) or 0)
    args = [
        "--backend",
        "onnxruntime",
        "--head-path",
        "onnx",
        "--engine",
        "tiles",
        "--batch",
        "2",
        "--stream-tiles",
        "3",
        "--head-memory",
        "64",
        "--threads",
        "1",
    ]
    result = CliRunner().invoke(app, ["serve", str(bundle_dir), *args])
    assert result.exit_code == 0, result.output
    runtime = seen[0].runtime
    expected = RuntimeOptions(
        backend="onnxruntime", head_path="onnx", batch_size=2, stream_tiles=3, head_memory=64, threads=1
    )
    assert runtime == expected
    served = ModelSlot(runtime).reload(bundle_dir)
    engine = served.inspector.engine
    assert (engine.stream_tiles, engine.head_memory, served.inspector.sessions.backend) == (3, 64, "onnxruntime")
    same = Inspector.load(bundle_dir, runtime).predict(str(images[0]))
    assert served.inspector.predict(str(images[0])).score == same.score
    bad = CliRunner().invoke(app, ["serve", str(bundle_dir), "--head-memory", "0"])
    assert bad.exit_code == 2 and "head_memory must be > 0 MB" in bad.output


# -- publishing, pixel rule, PNG answers -------------------------------------------------------------


def _bundle_id(folder: Path) -> str:
    """What the service calls a bundle: the first 12 hex digits of manifest.json's sha256 @ its `created`."""
    import hashlib

    raw = (folder / "manifest.json").read_bytes()
    return f"{hashlib.sha256(raw).hexdigest()[:12]}@{json.loads(raw)['created']}"


def _publish_copy(bundle: Path, out: Path, thresholds: dict | None, grace_s: float | None = None) -> Path:
    """Publish a copy of `bundle` with other thresholds as the next version behind `out` (our own publish)."""
    from hiad_runtime.files import GRACE_S, atomic_directory

    with atomic_directory(out, GRACE_S if grace_s is None else grace_s) as tmp:
        shutil.copytree(bundle, tmp, dirs_exist_ok=True)
        manifest = json.loads((tmp / "manifest.json").read_text())
        manifest["thresholds"] = thresholds
        (tmp / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_reload_serves_what_was_published_last(bundle_dir, elpv_root, images, tmp_path):
    """#18 item 3: SIGHUP and an empty POST /v1/reload resolve the published symlink anew."""
    out = _publish_copy(bundle_dir, tmp_path / "bundle", None)  # bundle -> bundle.v1
    good = images[0].read_bytes()
    with serving(out, tmp_path / "server.log", env=ENV) as (url, proc):
        first = httpx.get(f"{url}/readyz").json()["bundle_id"]
        assert first == _bundle_id(out)
        calibrated = subprocess.run(  # hiad-train calibrate publishes bundle.v2 and switches the symlink
            [sys.executable, "-m", "hiad_train.cli", "calibrate", str(out), "--normal", str(elpv_root / "train")],
            capture_output=True,
            text=True,
            timeout=600,
            env=ENV,
        )
        assert calibrated.returncode == 0, calibrated.stderr
        assert os.readlink(out) == "bundle.v2"
        second = _bundle_id(out)
        assert second != first
        reloaded = httpx.post(f"{url}/v1/reload", timeout=120)
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["bundle_id"] == second and reloaded.json()["previous"] == first
        assert reloaded.json()["path"] == str(out) and reloaded.json()["resolved"] == str(tmp_path / "bundle.v2")
        assert httpx.post(f"{url}/v1/inspect", content=good, timeout=60).json()["bundle_id"] == second

        # a third publish prunes the versions before it (grace 0), the served one included
        _publish_copy(bundle_dir, out, {"image": 1.0, "pixel": 2.0}, grace_s=0)
        assert not (tmp_path / "bundle.v2").exists()
        third = _bundle_id(out)
        proc.send_signal(signal.SIGHUP)
        _wait_until(lambda: httpx.get(f"{url}/readyz").json()["bundle_id"] == third, 120)
        answer = httpx.post(f"{url}/v1/inspect", content=good, timeout=60)
        assert answer.status_code == 200 and answer.json()["bundle_id"] == third
        assert httpx.get(f"{url}/v1/model").json()["thresholds"] == {"image": 1.0, "pixel": 2.0}


@pytest.fixture(scope="module")
def default_server(bundle_dir, tmp_path_factory):
    """Every serve option at its default, on a bundle with thresholds (for the mask)."""
    folder = tmp_path_factory.mktemp("default_server")
    bundle = _copy_with_thresholds(bundle_dir, folder / "bundle", {"image": 5.0, "pixel": 8.0})
    with serving(bundle, folder / "server.log", env=ENV) as (url, _):
        yield url, bundle


def test_service_and_cli_share_the_default_pixel_budget(default_server, tmp_path):
    """#18 item 4a: without --max-megapixels the service refuses what `predict` refuses (4x the bundle's area)."""
    from hiad_runtime.image import MAX_PIXELS_FACTOR

    url, bundle = default_server
    width, height = json.loads((bundle / "manifest.json").read_text())["tiling"]["image_size"]
    side = int((MAX_PIXELS_FACTOR * width * height) ** 0.5)
    sizes = {
        "at the budget": (side, MAX_PIXELS_FACTOR * width * height // side),
        "one row over": (side, MAX_PIXELS_FACTOR * width * height // side + 1),
    }
    for name, (w, h) in sizes.items():  # 16-bit RGBA: the costliest kind of pixel to decode
        assert cv2.imwrite(str(tmp_path / f"{name}.png"), np.full((h, w, 4), 30000, np.uint16))
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "hiad_runtime.cli",
            "predict",
            str(bundle),
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    by_cli = {
        Path(r["input"]).stem: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())
    }
    for name, (w, h) in sizes.items():
        r = httpx.post(f"{url}/v1/inspect", content=(tmp_path / f"{name}.png").read_bytes(), timeout=60)
        if name == "at the budget":
            assert r.status_code == 200 and "score" in by_cli[name], (r.text, by_cli[name], cli.stderr)
        else:
            assert r.status_code == 400 and f"declares {w}x{h}" in r.json()["error"], r.text
            assert f"declares {w}x{h}" in by_cli[name]["error"], by_cli[name]


def test_accept_image_png_answers_the_png_itself(default_server, images):
    """#18 item 12: `Accept: image/png` gives the PNG as the body and the answer in headers; JSON stays the default."""
    url, _ = default_server
    good = images[0].read_bytes()
    with httpx.Client(base_url=url, timeout=60) as c:
        as_json = c.post("/v1/inspect?map=png&mask=png", content=good)
        answer = as_json.json()
        map_png = c.post("/v1/inspect?map=png", content=good, headers={"Accept": "image/png"})
        default_png = c.post("/v1/inspect", content=good, headers={"Accept": "image/png"})
        mask_png = c.post("/v1/inspect?mask=png", content=good, headers={"Accept": "image/png"})
        both = c.post("/v1/inspect?map=png&mask=png", content=good, headers={"Accept": "image/png"})
        prefers_json = c.post(
            "/v1/inspect?map=png", content=good, headers={"Accept": "application/json, image/png;q=0.5"}
        )
    for r in (map_png, default_png, mask_png):
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text[:200]
        assert (
            float(r.headers["X-Hiad-Score"]) == pytest.approx(answer["score"], rel=1e-6)
            and json.loads(r.headers["X-Hiad-Decision"]) == answer["decision"]
        )
        assert r.headers["X-Hiad-Bundle-Id"] == answer["bundle_id"]
        assert r.headers["X-Hiad-Input-Size"] == "x".join(map(str, answer["input_size"]))
        assert set(json.loads(r.headers["X-Hiad-Latency-Ms"])) == set(answer["latency_ms"])
    decoded = lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).astype(np.int64)  # noqa: E731
    in_json = decoded(base64.b64decode(answer["map"]["png_base64"]))
    for r in (map_png, default_png):  # the same map as the JSON form's (another inference: equal to the last bit of 16)
        assert np.abs(decoded(r.content) - in_json).max() <= 1
        assert [float(v) for v in r.headers["X-Hiad-Map-Range"].split()] == pytest.approx(
            answer["map"]["range"], rel=1e-6
        )
    assert cv2.imdecode(np.frombuffer(map_png.content, np.uint8), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    np.testing.assert_array_equal(decoded(mask_png.content), decoded(base64.b64decode(answer["mask"]["png_base64"])))
    assert "X-Hiad-Map-Range" not in mask_png.headers
    assert len(map_png.content) < len(as_json.content)
    assert (
        as_json.headers["content-type"] == "application/json"
        and as_json.headers["vary"] == map_png.headers["vary"] == "Accept"
    )
    assert both.status_code == 400 and "one PNG" in both.json()["error"]
    assert prefers_json.headers["content-type"] == "application/json" and "map" in prefers_json.json()


# -- slow and greedy clients -------------------------------------------------------------------------


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=60)  # a recv that waits longer fails the test


def _answer(sock) -> tuple[int, dict, bytes]:
    """Everything the server sends until it closes: (status, headers, body); status 0 if it closed without a word."""
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return 0, {}, b""
    lines = head.decode("latin-1").split("\r\n")
    return (
        int(lines[0].split()[1]),
        {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])},
        body,
    )


def _file_limit(n: int):
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return limit


FILE_LIMIT = 256  # the guarded server's open-file limit
MAX_CONNECTIONS = 8


@pytest.fixture(scope="module")
def guarded_server(bundle_dir, tmp_path_factory):
    """Small limits: 256 open files, 8 connections, headers within 3 s, a body within 10 s, 1 MB bodies,
    2 MB of bodies at once."""
    folder = tmp_path_factory.mktemp("guarded_server")
    options = ["--max-connections", str(MAX_CONNECTIONS), "--header-timeout", "3", "--body-timeout", "10"]
    options += ["--max-body-mb", "1", "--max-inflight-mb", "2"]
    with serving(bundle_dir, folder / "server.log", *options, env=ENV, preexec_fn=_file_limit(FILE_LIMIT)) as (url, _):
        yield url, folder / "server.log"


PARTIAL = b"POST /v1/inspect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"  # headers never finished


def test_slow_clients_are_closed_and_others_served(guarded_server, images):
    """#18 item 4c: slow headers get 408 and a close; a slow body gets 408; meanwhile others are served."""
    url, _ = guarded_server
    good = images[0].read_bytes()
    slow = [_connect(url) for _ in range(3)]
    for s in slow:
        s.sendall(PARTIAL)
    slow_body = _connect(url)
    slow_body.sendall(b"POST /v1/inspect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n" + bytes(10))
    assert httpx.post(f"{url}/v1/inspect", content=good, timeout=60).status_code == 200  # while they hang on
    for s in slow:
        status, headers, body = _answer(s)
        assert status == 408 and headers["connection"] == "close" and b"headers not received" in body
    status, headers, body = _answer(slow_body)
    assert status == 408 and headers["connection"] == "close" and b"body not received" in body
    assert httpx.post(f"{url}/v1/inspect", content=good, timeout=60).status_code == 200


def test_connections_stay_below_the_file_limit(guarded_server, images):
    """#18 item 4c: more slow clients than the server has file descriptors: those over the cap get 503 at
    once, the rest 408 at the header deadline; the server never runs out of descriptors and serves again."""
    url, log = guarded_server
    slow = []
    for _ in range(FILE_LIMIT - 4):
        s = _connect(url)
        s.sendall(PARTIAL)
        slow.append(s)
    statuses = [_answer(s)[0] for s in slow]
    assert set(statuses) == {408, 503}, sorted(set(statuses))  # each one answered and closed: none left hanging
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    assert httpx.post(f"{url}/v1/inspect", content=images[0].read_bytes(), timeout=60).status_code == 200
    text = log.read_text()
    assert "out of system resource" not in text and "Too many open files" not in text
    # repeated warnings are rate-limited: one line per kind and minute, not one per connection
    assert text.count("connection refused:") == 1 and text.count("request headers not received") <= 2
    metrics = httpx.get(f"{url}/metrics").text
    assert _metric(metrics, 'hiad_connections_refused_total{reason="max_connections"}') == statuses.count(503)
    assert _metric(metrics, 'hiad_connections_refused_total{reason="header_timeout"}') >= statuses.count(408)


def test_request_bodies_in_memory_stay_within_the_budget(guarded_server, images):
    """#18 item 4b: bodies claim their Content-Length before they are read; past --max-inflight-mb the
    answer is 503 + Retry-After without reading the body (declared) or reading on (chunked)."""
    url, _ = guarded_server
    held = 1 << 20
    head = f"POST /v1/inspect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {held}\r\n".encode()
    uploading = [_connect(url) for _ in range(2)]
    for s in uploading:
        s.sendall(head + b"Connection: close\r\n\r\n" + bytes(1000))  # 2 x 1 MiB claimed, 2 kB sent
    _wait_until(lambda: _metric(httpx.get(f"{url}/metrics").text, "hiad_body_bytes_held") == 2 * held)
    declared = _connect(url)
    declared.sendall(head + b"\r\n")  # and not a byte of its body
    status, headers, body = _answer(declared)
    assert status == 503 and int(headers["retry-after"]) >= 1 and headers["connection"] == "close"
    assert b"request bodies in memory" in body
    chunked = _connect(url)
    chunked.sendall(
        b"POST /v1/inspect HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n"
        + bytes(4096)
        + b"\r\n"
    )
    status, headers, body = _answer(chunked)
    assert status == 503 and b"request bodies in memory" in body
    for s in uploading:
        s.sendall(bytes(held - 1000))
        assert _answer(s)[0] == 400  # zeros are no image; what matters is that they were read and answered
    assert _metric(httpx.get(f"{url}/metrics").text, "hiad_body_bytes_held") == 0
    assert httpx.post(f"{url}/v1/inspect", content=images[0].read_bytes(), timeout=60).status_code == 200


# -- .tar bundles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_tar_bundle_extractions_are_removed(bundle_dir, images, tmp_path, stop):
    """#18 item 5: each reload's extraction replaces the last one, a stop removes it, and a start
    removes those of dead servers."""
    import tarfile

    archive, tampered = tmp_path / "bundle.tar", tmp_path / "tampered.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundle_dir.resolve(), arcname="bundle")
    with tarfile.open(tampered, "w") as tar:
        tar.add(_tampered(bundle_dir, tmp_path / "tampered"), arcname="bundle")
    temp = tmp_path / "tmp"
    temp.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (temp / f"hiad-bundle-{dead.pid}-stale").mkdir()  # left by a server that was killed
    extractions = lambda: sorted(p.name for p in temp.glob("hiad-bundle-*"))  # noqa: E731
    good = images[0].read_bytes()
    with serving(archive, tmp_path / "server.log", env={**ENV, "TMPDIR": str(temp)}) as (url, proc):
        assert len(extractions()) == 1 and "stale" not in extractions()[0]
        refused = httpx.post(f"{url}/v1/reload", json={"bundle": str(tampered)}, timeout=120)
        assert refused.status_code == 422 and len(extractions()) == 1, extractions()  # a refused one goes at once
        for _ in range(4):
            assert httpx.post(f"{url}/v1/reload", timeout=120).status_code == 200
            assert httpx.post(f"{url}/v1/inspect", content=good, timeout=60).status_code == 200
            assert len(extractions()) == 1, extractions()
        proc.send_signal(stop)
        proc.wait(timeout=60)
    assert extractions() == []
