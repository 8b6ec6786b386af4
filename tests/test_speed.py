"""Edge speed: reduced-precision embedders, streamed tiles on large images, OpenVINO, prefetching."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hiad_export.writer import write_bundle
from hiad_runtime.bundle import Bundle
from hiad_runtime.heads import head_files
from hiad_runtime.inspector import Inspector
from hiad_runtime.prefetch import prefetched
from tests.conftest import tiny_config

TOLERANCE = 1e-4  # of the map's range, as the export's parity check


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (b.max() - b.min()))


def test_int8_export_calibrates_on_training_images_and_runtime_reports_it(trained, elpv_root, tmp_path):
    from hiad_export.cli import app as export_app
    from hiad_runtime.cli import app as runtime_app
    from hiad_train.checkpoint import save_checkpoint

    ckpt = save_checkpoint(trained, tmp_path / "ckpt", data=elpv_root)
    out = tmp_path / "int8"
    result = CliRunner().invoke(
        export_app, [str(ckpt), "--out", str(out), "--precision", "int8", "--calibration-images", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "parity [onnx]" in result.output and "parity [int8:onnx]" in result.output

    manifest = Bundle.load(out).manifest
    assert manifest.embedders["patch"].precision == "int8"
    assert manifest.embedders["patch"].graph.file == "embedder_patch.int8.onnx"
    assert not (out / "embedder_patch.onnx").exists()  # only the graph the runtime runs ships
    assert manifest.parity["onnx"]["enforced"] and manifest.parity["onnx"]["passed"]  # the fp32 path, exact
    reduced = manifest.parity["int8:native"]
    assert not reduced["enforced"] and reduced["max_rel_map_diff"] > 0  # recorded: what int8 costs

    inspector = Inspector(Bundle.load(out))
    assert inspector.precision == "int8"
    image = next((elpv_root / "test" / "good").iterdir())
    r = inspector.predict(str(image))
    assert r.anomaly_map.shape == (256, 256) and np.isfinite(r.anomaly_map).all()

    bench = CliRunner().invoke(runtime_app, ["bench", str(out), "--repeat", "1", "--json", str(tmp_path / "b.json")])
    assert bench.exit_code == 0, bench.output
    assert "embedder precision int8" in bench.output
    assert json.loads((tmp_path / "b.json").read_text())["precision"] == "int8"


def test_fp16_embedder_keeps_its_io_types_and_stays_close(bundle_dir, train_samples, tmp_path):
    import onnxruntime as ort

    from hiad_export.quantize import reduce_precision
    from hiad_runtime.geometry import split

    source = tmp_path / "embedder_patch.onnx"
    source.write_bytes((bundle_dir / "embedder_patch.onnx").read_bytes())
    target = reduce_precision(source, "fp16", None)
    assert target.name == "embedder_patch.fp16.onnx"
    tiles = split(train_samples[0].image((256, 256)), Bundle.load(bundle_dir).manifest.geometry.tiles)
    fp32 = ort.InferenceSession(str(source)).run(None, {"image": tiles})[0]
    fp16 = ort.InferenceSession(str(target)).run(None, {"image": tiles})[0]
    assert fp16.dtype == np.float32 and fp16.shape == fp32.shape
    assert 0 < _rel_diff(fp16, fp32) < 0.01


def test_int8_embedder_stays_close_to_fp32_on_real_tiles(bundle_dir, train_samples, test_samples, tmp_path):
    """Bias correction and a float high-resolution head keep the embedding close (plain QDQ: ~20 %)."""
    import onnxruntime as ort

    from hiad_export.quantize import reduce_precision
    from hiad_runtime.geometry import split

    source = tmp_path / "embedder_patch.onnx"
    source.write_bytes((bundle_dir / "embedder_patch.onnx").read_bytes())
    tiles = Bundle.load(bundle_dir).manifest.geometry.tiles
    calibration = np.concatenate([split(s.image((256, 256)), tiles) for s in train_samples])
    target = reduce_precision(source, "int8", calibration)
    held_out = np.concatenate([split(s.image((256, 256)), tiles) for s in test_samples])
    fp32 = ort.InferenceSession(str(source)).run(None, {"image": held_out})[0]
    int8 = ort.InferenceSession(str(target)).run(None, {"image": held_out})[0]
    assert np.linalg.norm(int8 - fp32) / np.linalg.norm(fp32) < 0.05


@pytest.fixture(scope="module")
def many_tiles_bundle(train_samples, test_samples, tmp_path_factory):
    """9 overlapping tiles of 64 px with context windows: the large-image case, small enough to be fast."""
    from hiad_train.trainer import HRTrainer

    model = HRTrainer(tiny_config(image_size=160, patch_size=64, stride=48, ds_factors=[0, 1]), progress=False).fit(
        train_samples[:2]
    )
    out = tmp_path_factory.mktemp("bundles") / "many"
    write_bundle(model, out, [test_samples[-1].image((160, 160))])
    return out


def test_streamed_tiles_give_the_all_at_once_map(many_tiles_bundle, test_samples):
    bundle = Bundle.load(many_tiles_bundle)
    assert len(bundle.manifest.geometry.tiles) == 9
    image = test_samples[-1].image((160, 160))
    whole = Inspector(bundle, stream_tiles=9).predict(image)
    for chunk in (1, 4):
        streamed = Inspector(bundle, stream_tiles=chunk).predict(image)
        np.testing.assert_allclose(
            streamed.anomaly_map, whole.anomaly_map, rtol=1e-5, atol=1e-6 * whole.anomaly_map.max()
        )
        assert streamed.score == pytest.approx(whole.score, rel=1e-5)


def test_heads_held_per_chunk_within_a_tiny_budget_give_the_all_resident_map(many_tiles_bundle, test_samples):
    bundle = Bundle.load(many_tiles_bundle)
    image = test_samples[-1].image((160, 160))
    resident = Inspector(bundle, stream_tiles=4)
    heads = resident.engine.heads
    assert len(heads.heads) == 9 and heads.loads == 9  # the default budget holds every head
    expected = resident.predict(image)
    assert resident.engine.heads.loads == 9  # nothing read again

    for head_path in ("native", "onnx"):
        largest = max(
            sum(bundle.manifest.files[f].bytes for f in head_files(t.head, head_path)) for t in bundle.manifest.tasks
        )
        paged = Inspector(
            bundle, stream_tiles=4, head_memory=(largest + 1) / 2**20, head_path=head_path
        )  # room for one head
        assert len(paged.engine.heads.heads) == 1 and paged.engine.heads.resident_bytes <= paged.engine.heads.budget
        for _ in range(2):  # twice: evicted heads are read again
            r = paged.predict(image)
            np.testing.assert_allclose(
                r.anomaly_map, expected.anomaly_map, rtol=1e-5, atol=1e-6 * expected.anomaly_map.max()
            )
            assert r.score == pytest.approx(expected.score, rel=1e-5)
            assert len(paged.engine.heads.heads) == 1
        # the preloaded first head is reused once, then every task per image
        assert paged.engine.heads.loads == 1 + 2 * 9 - 1


@pytest.mark.parametrize("budget", [0, -5])
def test_head_memory_must_be_positive(many_tiles_bundle, budget):
    from hiad_runtime.cli import app

    with pytest.raises(ValueError, match=f"head_memory must be > 0 MB, got {budget}"):
        Inspector(Bundle.load(many_tiles_bundle), head_memory=budget)
    result = CliRunner().invoke(app, ["bench", str(many_tiles_bundle), "--repeat", "1", "--head-memory", str(budget)])
    assert result.exit_code == 2 and f"head_memory must be > 0 MB, got {float(budget)}" in result.output


def test_in_place_blur_in_strips_equals_the_whole_map_blur(monkeypatch):
    from hiad_runtime import postprocess
    from hiad_runtime.postprocess import gaussian_blur

    rows = 64
    monkeypatch.setattr(postprocess, "BLUR_STRIP_BYTES", rows * 37 * 4)  # strips of 64 rows of 37 floats
    rng = np.random.default_rng(0)
    for height, sigma in (
        (3 * rows + 7, 4.0),
        (rows // 3, 4.0),
        (2 * rows, 80.0),
    ):  # several strips; one; radius (320) > strip
        m = rng.random((height, 37), dtype=np.float32)
        expected = gaussian_blur(m, sigma, 4.0)
        out = gaussian_blur(m, sigma, 4.0, in_place=True)
        assert out is m
        np.testing.assert_array_equal(out, expected)


def test_load_image_decodes_into_one_buffer_with_the_bytes_path_pixels(tmp_path):
    import cv2

    from hiad_runtime.image import decode, load_image

    rng = np.random.default_rng(0)
    images = {
        "rgb.png": rng.integers(0, 256, (70, 90, 3), dtype=np.uint8),
        "rgba.png": rng.integers(0, 256, (70, 90, 4), dtype=np.uint8),
        "gray16.png": rng.integers(0, 65536, (70, 90), dtype=np.uint16),
        "rgb.bmp": rng.integers(0, 256, (70, 90, 3), dtype=np.uint8),
    }
    for name, pixels in images.items():
        cv2.imwrite(str(tmp_path / name), pixels)
        loaded = load_image(tmp_path / name)
        assert loaded.shape == (70, 90, 3) and loaded.dtype == np.uint8 and loaded.flags.c_contiguous
        np.testing.assert_array_equal(loaded, decode((tmp_path / name).read_bytes()))
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png"), images["rgb.png"][:, :, ::-1])  # BGR on disk -> RGB


def test_openvino_backend_matches_onnxruntime(bundle_dir, test_samples):
    pytest.importorskip("openvino")
    image = test_samples[-1].image((256, 256))
    for head_path in ("onnx", "native"):
        ort_result = Inspector.load(bundle_dir, head_path=head_path).predict(image)
        ov = Inspector.load(bundle_dir, head_path=head_path, backend="openvino")
        assert ov.providers_in_use == ["OpenVINO:CPU"]
        ov_result = ov.predict(image)
        assert _rel_diff(ov_result.anomaly_map, ort_result.anomaly_map) <= TOLERANCE
        assert abs(ov_result.score - ort_result.score) <= TOLERANCE * np.ptp(ort_result.anomaly_map)


def test_openvino_embedder_writes_into_its_arrays_and_later_runs_leave_them_alone(bundle_dir, test_samples):
    """OpenVINO writes an embedder's outputs straight into the chunk's arrays; a later run of the same
    session (any thread) must not write there again (it once wrote into freed memory: a segfault)."""
    pytest.importorskip("openvino")
    ov = Inspector.load(bundle_dir, backend="openvino").engine
    ort = Inspector.load(bundle_dir).engine
    first, second = (ov.plan.fusion(None).patches(s.image(ov.plan.tiling.image_size)) for s in test_samples[:2])
    (features,) = ov.embedders["patch"](first).numpy()
    kept = features.copy()
    embedder = ov.embedders["patch"]
    for _ in range(3):
        embedder.session.run(None, {embedder.input: second[:1]})
        embedder(second)
    np.testing.assert_array_equal(features, kept)
    (expected,) = ort.embedders["patch"](first).numpy()
    assert _rel_diff(features, expected) <= TOLERANCE


def test_unknown_backend_is_named(bundle_dir):
    with pytest.raises(ValueError, match="backend 'tensorflow'"):
        Inspector.load(bundle_dir, backend="tensorflow")


def test_prefetch_keeps_order_and_hands_errors_to_their_item():
    def load(i):
        if i == 3:
            raise OSError("unreadable 3")
        return i * 10

    for depth in (0, 1, 3):
        seen = []
        for item, future in prefetched(range(6), load, depth):
            if item == 3:
                with pytest.raises(OSError, match="unreadable 3"):
                    future.result()
            else:
                seen.append(future.result())
        assert seen == [0, 10, 20, 40, 50]


def test_predict_and_bench_with_prefetch_report_images_per_second(bundle_dir, elpv_root, tmp_path):
    from hiad_runtime.cli import app

    result = CliRunner().invoke(
        app, ["predict", str(bundle_dir), str(elpv_root / "test"), "--out", str(tmp_path / "p"), "--prefetch", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "images/s" in result.output
    lines = [json.loads(x) for x in (tmp_path / "p" / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all("score" in x for x in lines)

    bench = CliRunner().invoke(
        app,
        [
            "bench",
            str(bundle_dir),
            str(elpv_root / "test"),
            "--repeat",
            "3",
            "--prefetch",
            "1",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert bench.exit_code == 0, bench.output
    figures = json.loads((tmp_path / "b.json").read_text())
    assert figures["prefetch"] == 1 and figures["images_per_s"] > 0 and len(figures["stages_ms"]) == 6


# -- issue #18: head memory follows the machine -----------------------------------------------------
def test_default_head_memory_is_a_quarter_of_the_memory_available(many_tiles_bundle, monkeypatch):
    """A fixed 256 MB made the CPU PaDiM at 2048^2 (16 heads of 165 MB) read 2.6 GB of heads per image."""
    from hiad_runtime import memory

    meminfo = dict(line.split(":") for line in open("/proc/meminfo").read().splitlines())
    assert 0 < memory.available_bytes() <= int(meminfo["MemTotal"].split()[0]) * 1024
    bundle = Bundle.load(many_tiles_bundle)
    monkeypatch.setattr(memory, "available_bytes", lambda: 8 << 30)
    assert Inspector(bundle).engine.head_memory == 2048
    monkeypatch.setattr(memory, "available_bytes", lambda: 100 << 20)  # a small box: never under 256 MB
    assert Inspector(bundle).engine.head_memory == memory.MIN_HEAD_MEMORY_MB == 256
    assert Inspector(bundle, head_memory=32).engine.head_memory == 32  # given: used as it is


def test_heads_read_again_are_reported_once_with_the_figure_to_set(many_tiles_bundle, test_samples, caplog, tmp_path):
    import math

    from hiad_runtime.cli import app

    bundle = Bundle.load(many_tiles_bundle)
    sizes = [sum(bundle.manifest.files[f].bytes for f in head_files(t.head)) for t in bundle.manifest.tasks]
    one_head = (max(sizes) + 1) / 2**20
    image = test_samples[-1].image((160, 160))
    paged = Inspector(bundle, stream_tiles=4, head_memory=one_head)
    with caplog.at_level("WARNING", logger="hiad_runtime"):
        for _ in range(3):
            paged.predict(image)
    warned = [r.getMessage() for r in caplog.records if r.name == "hiad_runtime"]
    assert len(warned) == 1 and f"give --head-memory {math.ceil(sum(sizes) / 2**20)}" in warned[0]

    for head_memory, per_image in ((one_head, 9), (None, 0)):  # every head read per image, or none
        figures = tmp_path / "bench.json"
        args = ["bench", str(many_tiles_bundle), "--repeat", "2", "--stream-tiles", "4", "--json", str(figures)]
        result = CliRunner().invoke(app, args + (["--head-memory", str(head_memory)] if head_memory else []))
        assert result.exit_code == 0, result.output
        assert json.loads(figures.read_text())["head_loads_per_image"] == per_image
        assert f"head loads per image {per_image:.1f} (9 heads" in result.output
