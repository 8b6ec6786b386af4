"""The C library and hiad-infer (c/) on real bundles: equal to the Python runtime, refusals named,
AddressSanitizer clean, no memory growth. The C code is built here; a failed build fails loudly."""

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest

from hiad_runtime.inspector import Inspector

C_DIR = Path(__file__).resolve().parents[1] / "c"
BUILD = C_DIR / "build"
EXACT = 1e-5  # max |C - Python| relative to the Python map's range


@pytest.fixture(scope="session")
def c_build():
    if shutil.which("cc") is None or shutil.which("make") is None:
        pytest.skip("no C compiler or make on this machine")
    for target in ("all", "asan"):
        done = subprocess.run(["make", "-C", str(C_DIR), target], capture_output=True, text=True)
        if done.returncode:
            pytest.fail(f"`make -C c {target}` failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return BUILD


@pytest.fixture(scope="session")
def ort_library():
    found = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so*"))
    assert found, "the onnxruntime wheel ships no libonnxruntime.so"
    return found[0]


def infer(c_build, ort_library, bundle, images, *extra):
    done = subprocess.run(
        [str(c_build / "hiad-infer"), str(bundle), *map(str, images), "--ort", str(ort_library), *extra],
        capture_output=True, text=True,
    )
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()], done.stderr


@pytest.mark.parametrize("which", ["bundle_dir", "clustered_bundle"])
def test_c_maps_and_scores_equal_the_python_runtime(which, request, c_build, ort_library, test_samples, tmp_path):
    bundle = request.getfixturevalue(which)
    paths = [s.image_path for s in test_samples]  # 256 px PNGs: the bundles' image_size
    rc, lines, err = infer(c_build, ort_library, bundle, paths, "--map-dir", tmp_path)
    assert rc == 0, err
    python = Inspector.load(bundle)
    for path, line in zip(paths, lines, strict=True):
        r = python.predict(path)
        c_map = np.load(tmp_path / f"{Path(path).stem}.npy", allow_pickle=False)
        span = max(float(r.anomaly_map.max() - r.anomaly_map.min()), 1e-6)
        assert line["input"] == str(path) and line["latency_ms"] > 0
        assert c_map.dtype == np.float32 and np.abs(c_map - r.anomaly_map).max() <= EXACT * span
        assert abs(line["score"] - r.score) <= EXACT * span
        assert line["decision"] == r.decision


def _copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def test_tampered_truncated_missing_graph_and_wrong_size_are_refused(bundle_dir, c_build, ort_library, test_samples, tmp_path):
    image = [test_samples[0].image_path]
    b = _copy(bundle_dir, tmp_path / "tampered")
    data = bytearray((b / "pipeline.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "pipeline.onnx").write_bytes(bytes(data))
    rc, _, err = infer(c_build, ort_library, b, image)
    assert rc == 2 and "pipeline.onnx: altered (sha256 does not match the manifest)" in err

    b = _copy(bundle_dir, tmp_path / "truncated")
    (b / "pipeline.onnx").write_bytes(data[:1000])
    rc, _, err = infer(c_build, ort_library, b, image)
    assert rc == 2 and "pipeline.onnx: truncated or altered (1000 bytes, manifest says" in err

    b = _copy(bundle_dir, tmp_path / "missing")
    (b / "pipeline.onnx").unlink()
    rc, _, err = infer(c_build, ort_library, b, image)
    assert rc == 2 and "pipeline.onnx: missing from the bundle" in err

    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.zeros((128, 160, 3), np.uint8))
    rc, lines, _ = infer(c_build, ort_library, bundle_dir, [small, test_samples[0].image_path])
    assert rc == 1 and "image is 160x128, the bundle expects 256x256" in lines[0]["error"]
    assert "score" in lines[1]  # the next image is still scored


def test_c_refuses_a_bundle_without_a_graph_with_the_exports_reason(bundle_dir, c_build, ort_library, test_samples, tmp_path):
    b = _copy(bundle_dir, tmp_path)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["pipeline"] = {"unsupported": "thumbnail.size: resizing 2048x2048 to 300x300 is not a whole-factor shrink"}
    (b / "manifest.json").write_text(json.dumps(manifest))
    rc, _, err = infer(c_build, ort_library, b, [test_samples[0].image_path])
    assert rc == 2 and "no pipeline graph: thumbnail.size: resizing 2048x2048 to 300x300" in err
    manifest["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(manifest))
    rc, _, err = infer(c_build, ort_library, b, [test_samples[0].image_path])
    assert rc == 2 and "schema_version 99 is not supported" in err


def test_c_refuses_a_default_export_naming_the_option_that_builds_the_graph(default_bundle, c_build, ort_library, test_samples):
    _, bundle = default_bundle
    rc, _, err = infer(c_build, ort_library, bundle, [test_samples[0].image_path])
    assert rc == 2 and "no pipeline graph: not built: hiad-export --pipeline builds the whole-image graph" in err


def _stress(binary, bundle, image, n, ort_library):
    env = {"HIAD_ORT_LIBRARY": str(ort_library), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(binary), str(bundle), str(image), str(n)], capture_output=True, text=True, env=env)
    return done.returncode, done.stdout, done.stderr


def test_address_sanitizer_clean_over_50_predictions(bundle_dir, c_build, ort_library, test_samples):
    rc, out, err = _stress(c_build / "asan" / "hiad-stress", bundle_dir, test_samples[0].image_path, 50, ort_library)
    assert rc == 0 and "Sanitizer" not in err, err[-3000:]
    assert json.loads(out)["predictions"] == 50


def test_memory_does_not_grow_over_200_predictions(bundle_dir, c_build, ort_library, test_samples):
    rc, out, err = _stress(c_build / "hiad-stress", bundle_dir, test_samples[0].image_path, 200, ort_library)
    assert rc == 0, err
    r = json.loads(out)
    # A leak grows with every prediction (a leaked map alone is 256 kB here, 25 MB per 100 predictions):
    # over the second 100 predictions RSS may drift by allocator noise only.
    assert r["rss_kb_end"] <= r["rss_kb_half"] + 4 * 1024, r


def test_the_documented_example_compiles_as_written_and_runs(bundle_dir, c_build, ort_library, tmp_path):
    doc = (C_DIR.parent / "docs" / "bundle.md").read_text()
    source = doc.split("## Running a bundle from C", 1)[1].split("```c\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.c").write_text(source)
    cc = subprocess.run(
        ["cc", "-std=c11", "-Wall", "-Werror", str(tmp_path / "example.c"), f"-I{C_DIR / 'include'}", f"-I{BUILD / 'deps' / 'include'}",
         str(BUILD / "libhiad.a"), "-ljansson", "-lcrypto", "-ldl", "-lpthread", "-lm", "-o", str(tmp_path / "example")],
        capture_output=True, text=True,
    )
    assert cc.returncode == 0, cc.stderr
    done = subprocess.run([str(tmp_path / "example"), str(bundle_dir)], capture_output=True, text=True,
                          env={"HIAD_ORT_LIBRARY": str(ort_library)})
    assert done.returncode == 0 and done.stdout.startswith("score "), done.stderr
