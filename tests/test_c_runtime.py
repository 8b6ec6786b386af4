"""The C library and hiad-infer (c/) on real bundles: equal to the Python runtime, refusals named,
the Python runtime's input and bundle guards, AddressSanitizer clean, no memory growth. The C code is
built here; a failed build fails loudly."""

import ctypes.util
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest
from PIL import Image

from hiad_runtime.image import MAX_PIXELS_FACTOR
from hiad_runtime.inspector import Inspector

C_DIR = Path(__file__).resolve().parents[1] / "c"
BUILD = C_DIR / "build"
NO_ORT = BUILD / "no-ort"  # built without a library baked in: only the sonames are tried
EXACT = 1e-5  # max |C - Python| relative to the Python map's range
BARE_ENV = {"PATH": "/usr/bin:/bin"}  # no HIAD_ORT_LIBRARY, no LD_LIBRARY_PATH


@pytest.fixture(scope="session")
def c_build():
    if shutil.which("cc") is None or shutil.which("make") is None:
        pytest.skip("no C compiler or make on this machine")
    python = f"PYTHON={sys.executable}"  # make bakes in the ONNX Runtime of this interpreter's onnxruntime
    for args in (["all", python], ["asan", python], [f"BUILD={NO_ORT}", "ORT_LIBRARY=", f"{NO_ORT}/hiad-infer"]):
        done = subprocess.run(["make", "-C", str(C_DIR), *args], capture_output=True, text=True)
        if done.returncode:
            pytest.fail(f"`make -C c {' '.join(args)}` failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return BUILD


@pytest.fixture(scope="session")
def ort_library():
    found = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so*"))
    assert found, "the onnxruntime wheel ships no libonnxruntime.so"
    return found[0]


def run(binary, bundle, images, *extra, env=None):
    command = [str(binary), str(bundle), *map(str, images), *map(str, extra)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()], done.stderr


def infer(c_build, ort_library, bundle, images, *extra):
    return run(c_build / "hiad-infer", bundle, images, "--ort", ort_library, *extra)


@pytest.mark.parametrize("which", ["bundle_dir", "clustered_bundle"])
def test_c_maps_and_scores_equal_the_python_runtime(which, request, c_build, ort_library, test_samples, tmp_path):
    bundle = request.getfixturevalue(which)
    paths = [s.image_path for s in test_samples]  # 256 px PNGs: the bundles' image_size
    rc, lines, err = infer(c_build, ort_library, bundle, paths, "--map-dir", tmp_path)
    assert rc == 0, err
    python = Inspector.load(bundle)
    for path, line in zip(paths, lines, strict=True):
        r = python.predict(path)
        c_map = np.load(tmp_path / line["map"], allow_pickle=False)
        span = max(float(r.anomaly_map.max() - r.anomaly_map.min()), 1e-6)
        assert line["input"] == str(path) and line["latency_ms"] > 0
        assert c_map.dtype == np.float32 and np.abs(c_map - r.anomaly_map).max() <= EXACT * span
        assert abs(line["score"] - r.score) <= EXACT * span
        assert line["decision"] == r.decision


def _copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def test_tampered_truncated_missing_graph_and_wrong_size_are_refused(
    bundle_dir, c_build, ort_library, test_samples, tmp_path
):
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
    assert "error" not in lines[1] and np.isfinite(lines[1]["score"])  # the next image is still scored


def test_c_refuses_a_bundle_without_a_graph_with_the_exports_reason(
    bundle_dir, c_build, ort_library, test_samples, tmp_path
):
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


def test_c_refuses_a_default_export_naming_the_option_that_builds_the_graph(
    default_bundle, c_build, ort_library, test_samples
):
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
    # over the second 100 predictions anonymous RSS may drift by allocator noise only.
    assert r["anon_kb_end"] <= r["anon_kb_half"] + 4 * 1024, r


def test_the_documented_example_compiles_as_written_and_runs(bundle_dir, c_build, ort_library, tmp_path):
    doc = (C_DIR.parent / "docs" / "bundle.md").read_text()
    source = doc.split("## Running a bundle from C", 1)[1].split("```c\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.c").write_text(source)
    cc = subprocess.run(
        [
            "cc",
            "-std=c11",
            "-Wall",
            "-Werror",
            str(tmp_path / "example.c"),
            f"-I{C_DIR / 'include'}",
            f"-I{BUILD / 'deps' / 'include'}",
            str(BUILD / "libhiad.a"),
            "-ljansson",
            "-lcrypto",
            "-ldl",
            "-lpthread",
            "-lm",
            "-o",
            str(tmp_path / "example"),
        ],
        capture_output=True,
        text=True,
    )
    assert cc.returncode == 0, cc.stderr
    done = subprocess.run(
        [str(tmp_path / "example"), str(bundle_dir)],
        capture_output=True,
        text=True,
        env={"HIAD_ORT_LIBRARY": str(ort_library)},
    )
    assert done.returncode == 0 and done.stdout.startswith("score "), done.stderr


# ---- the Python runtime's guards, in the C tool: a bad input is refused on its line, the batch goes on ----


def _declaring(fmt, width, height):
    """A real tiny image (Pillow) whose header is patched to declare width x height; a PNG's IHDR CRC stays valid."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 60, 30)).save(out, fmt)
    data = bytearray(out.getvalue())
    if fmt == "PNG":
        at = data.index(b"IHDR")
        data[at + 4 : at + 12] = struct.pack(">II", width, height)
        data[at + 17 : at + 21] = struct.pack(">I", zlib.crc32(data[at : at + 17]))
    else:
        at = data.index(b"\xff\xc0")  # SOF0: length, precision, height, width
        data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_declared_size_over_the_pixel_budget_is_refused_before_decoding(
    fmt, bundle_dir, c_build, ort_library, test_samples, tmp_path
):
    # 12000 x 9000 (108 Mpx) is far over the budget; before the budget a JPEG like it was decoded into 324 MB
    # (30000^2: 2.6 GB), so the test keeps it small enough not to hurt if the guard ever goes.
    huge = tmp_path / f"huge.{fmt.lower()}"
    huge.write_bytes(_declaring(fmt, 12000, 9000))
    good = test_samples[0].image_path
    budget = MAX_PIXELS_FACTOR * 256 * 256
    rc, lines, err = infer(c_build, ort_library, bundle_dir, [huge, good])
    assert rc == 1
    assert lines[0]["error"] == f"{huge}: declares 12000x9000 = 108000000 pixels, above the limit of {budget}"
    assert f"error: {huge}: declares" in err and "score" in lines[1]

    # --max-pixels moves the limit: 512 x 512 is 4x the bundle's area (decoded, then refused for its size),
    # 513 x 512 is over it, and allowed with a larger budget
    paths = [tmp_path / "512.png", tmp_path / "513.png"]
    cv2.imwrite(str(paths[0]), np.zeros((512, 512, 3), np.uint8))
    cv2.imwrite(str(paths[1]), np.zeros((512, 513, 3), np.uint8))
    _, lines, _ = infer(c_build, ort_library, bundle_dir, paths)
    assert "image is 512x512, the bundle expects 256x256" in lines[0]["error"]
    assert lines[1]["error"] == f"{paths[1]}: declares 513x512 = 262656 pixels, above the limit of {budget}"
    _, lines, _ = infer(c_build, ort_library, bundle_dir, [paths[1], good], "--max-pixels", 300_000)
    assert "image is 513x512, the bundle expects 256x256" in lines[0]["error"] and "score" in lines[1]
    _, lines, _ = infer(c_build, ort_library, bundle_dir, [good], "--max-pixels", 65535)
    assert lines[0]["error"] == f"{good}: declares 256x256 = 65536 pixels, above the limit of 65535"
    rc, _, err = infer(c_build, ort_library, bundle_dir, [good], "--max-pixels", 0)
    assert rc == 2 and "--max-pixels takes a whole number >= 1" in err


def test_truncated_pngs_and_jpegs_are_errors(bundle_dir, c_build, ort_library, test_samples, tmp_path):
    """libjpeg only warns at a premature end (and fills the rest with gray); libpng stops at a cut in the
    pixel data (8- and 16-bit alike) but not at one after it unless the file is read to IEND."""
    good = test_samples[0].image_path
    rgb = cv2.cvtColor(cv2.imread(str(good)), cv2.COLOR_BGR2RGB)
    encoded = {
        "jpg": cv2.imencode(".jpg", rgb)[1].tobytes(),
        "8.png": cv2.imencode(".png", rgb)[1].tobytes(),
        "16.png": cv2.imencode(".png", rgb.astype(np.uint16) * 257)[1].tobytes(),
    }
    cut = []
    for name, data in encoded.items():
        for keep in (len(data) // 2, len(data) - 2, len(data) - 6):  # mid-data; JPEG EOI / PNG IEND CRC; PNG IEND
            cut.append(tmp_path / f"{keep}.{name}")
            cut[-1].write_bytes(data[:keep])
    rc, lines, err = infer(c_build, ort_library, bundle_dir, [*cut, good])
    assert rc == 1 and len(lines) == len(cut) + 1 and "score" in lines[-1]
    for path, line in zip(cut, lines):
        why = (
            "corrupt JPEG: Premature end of JPEG file"
            if path.suffix == ".jpg"
            else "truncated PNG: the file ends before the image does"
        )
        assert line == {"input": str(path), "error": f"{path}: not a readable image ({why})"}
        assert f"error: {path}: not a readable image" in err
    # the error paths (longjmp out of libpng and libjpeg) free everything
    rc, _, err = run(c_build / "asan" / "hiad-infer", bundle_dir, [*cut, good], "--ort", ort_library)
    assert rc == 1 and "Sanitizer" not in err, err[-3000:]


def test_maps_of_inputs_sharing_a_name_are_kept_apart(bundle_dir, c_build, ort_library, test_samples, tmp_path):
    inputs = [tmp_path / "in" / "a" / "m.png", tmp_path / "in" / "b" / "m.png", tmp_path / "in" / "b" / "m.jpg"]
    for path, sample in zip(inputs, test_samples):  # three different images
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.imread(str(sample.image_path)))
    out = tmp_path / "maps"
    out.mkdir()
    rc, lines, err = infer(c_build, ort_library, bundle_dir, inputs, "--map-dir", out)
    assert rc == 0, err
    assert [line["map"] for line in lines] == ["a/m.png.npy", "b/m.png.npy", "b/m.jpg.npy"]  # the Python CLI's keys
    python = Inspector.load(bundle_dir)
    for path, line in zip(inputs, lines):
        assert np.abs(np.load(out / line["map"], allow_pickle=False) - python.predict(path).anomaly_map).max() < 1e-3

    rc, _, err = infer(c_build, ort_library, bundle_dir, inputs[:1], "--map-dir", inputs[0])  # a file, not a folder
    assert rc == 2 and f"error: {inputs[0]}: cannot write maps there" in err


def _escaping(bundle, tmp_path, how):
    """A copy of `bundle` whose manifest reaches outside it; returns (copy, what the refusal names)."""
    b = _copy(bundle, tmp_path)
    outside = tmp_path / "outside.onnx"
    shutil.copy(b / "pipeline.onnx", outside)  # the very graph: only its place is wrong
    manifest = json.loads((b / "manifest.json").read_text())
    if how == "symlinked graph":
        (b / "pipeline.onnx").unlink()
        (b / "pipeline.onnx").symlink_to(outside)
        return b, "manifest path 'pipeline.onnx' leads outside the bundle (through a symlink); refused"
    if how == "symlinked folder":  # a file the C library does not even read
        shutil.move(b / "tasks", tmp_path / "tasks")
        (b / "tasks").symlink_to(tmp_path / "tasks")
        name = next(n for n in manifest["files"] if n.startswith("tasks/"))
        return b, f"manifest path '{name}' leads outside the bundle (through a symlink); refused"
    name = "../outside.onnx" if how == "dot-dot graph" else str(outside)
    manifest["files"][name] = {**manifest["files"]["pipeline.onnx"], "bytes": 1}  # its size would be disclosed
    manifest["pipeline"]["graph"]["file"] = name
    (b / "manifest.json").write_text(json.dumps(manifest))
    return b, f"manifest path '{name}' is absolute or contains '..'; refused (files must be inside the bundle)"


@pytest.mark.parametrize("how", ["symlinked graph", "symlinked folder", "dot-dot graph", "absolute graph"])
def test_manifest_paths_outside_the_bundle_are_refused_before_they_are_opened(
    how, bundle_dir, c_build, ort_library, test_samples, tmp_path
):
    b, refusal = _escaping(bundle_dir, tmp_path, how)
    rc, lines, err = infer(c_build, ort_library, b, [test_samples[0].image_path])
    assert rc == 2 and lines == [] and f"error: {b.resolve()}: {refusal}" in err
    assert str((tmp_path / "outside.onnx").stat().st_size) not in err


# ---- finding ONNX Runtime without --ort or $HIAD_ORT_LIBRARY ----


def _loaded(stderr):
    """The ONNX Runtime file hiad-infer reports it loaded."""
    found = re.search(r"hiad-infer: onnxruntime \S+ \((.+)\), C API \d+", stderr)
    assert found, stderr
    return Path(found.group(1))


def test_hiad_infer_finds_the_onnx_runtime_make_found(bundle_dir, c_build, ort_library, test_samples):
    rc, lines, err = run(c_build / "hiad-infer", bundle_dir, [test_samples[0].image_path], env=BARE_ENV)
    assert rc == 0 and "score" in lines[0], err
    assert _loaded(err).resolve() == ort_library.resolve()


def test_hiad_infer_tries_the_sonames_first(bundle_dir, c_build, ort_library, test_samples, tmp_path):
    (tmp_path / "libonnxruntime.so.1").symlink_to(ort_library)
    env = {**BARE_ENV, "LD_LIBRARY_PATH": str(tmp_path)}
    for binary in (NO_ORT / "hiad-infer", c_build / "hiad-infer"):
        rc, lines, err = run(binary, bundle_dir, [test_samples[0].image_path], env=env)
        assert rc == 0 and "score" in lines[0], err
        assert _loaded(err) == tmp_path / "libonnxruntime.so.1"


def test_hiad_infer_names_every_attempt_when_nothing_loads(bundle_dir, c_build, test_samples, tmp_path):
    if ctypes.util.find_library("onnxruntime"):
        pytest.skip("this machine has a system ONNX Runtime: the sonames always load")
    rc, lines, err = run(NO_ORT / "hiad-infer", bundle_dir, [test_samples[0].image_path], env=BARE_ENV)
    assert rc == 2 and lines == []
    missing = "cannot open shared object file: No such file or directory"
    assert (
        f"error: cannot load ONNX Runtime; tried libonnxruntime.so.1 (versioned soname): {missing}; "
        f"libonnxruntime.so (unversioned soname): {missing}; make found none at build time; "
        "name the library with $HIAD_ORT_LIBRARY"
    ) in err

    # a library the caller names is the only one tried: another ONNX Runtime would hide the mistake
    nowhere = tmp_path / "libonnxruntime.so.1"
    env = {**BARE_ENV, "HIAD_ORT_LIBRARY": str(nowhere)}
    rc, _, err = run(c_build / "hiad-infer", bundle_dir, [test_samples[0].image_path], env=env)
    assert rc == 2 and f"tried {nowhere} ($HIAD_ORT_LIBRARY): {missing}" in err and "soname" not in err
