import json
import shutil
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from hiad_export.parity import ParityError
from hiad_export.writer import ExportOptions, write_bundle
from hiad_runtime.bundle import Bundle, BundleError
from hiad_runtime.inspector import Inspector

TOLERANCE = 1e-4  # max |runtime map - PyTorch map| relative to the PyTorch map's range


def test_manifest_describes_everything_a_c_caller_needs(bundle_dir):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert m["schema"] == "hiad-bundle" and m["schema_version"] == 3 and m["detector"] == "patchcore"
    emb = m["embedders"]["patch"]
    assert emb["graph"]["inputs"] == [{"name": "image", "dtype": "uint8", "shape": ["batch", 128, 128, 3]}]
    assert emb["graph"]["outputs"] == [{"name": "feature_0", "dtype": "float32", "shape": ["batch", 64, 16, 16]}]
    assert m["preprocessing"]["color_order"] == "RGB" and m["preprocessing"]["normalization_in_graph"]
    assert len(m["tasks"]) == 4 and m["tasks"][2]["tiles"] == [2]
    head = m["tasks"][0]["head"]
    assert head["kind"] == "knn" and head["graph"]["outputs"][0]["name"] == "scores"
    assert [t["name"] for t in head["graph"]["inputs"]] == ["feature_0"]
    assert head["files"] == {"index": "tasks/task_0.faiss", "bank": "tasks/task_0_bank.npy"}
    assert head["params"]["index_factory"] == "Flat" and head["params"]["k"] == 1
    assert m["tasks"][0]["training"] == {"bank_size": 102, "training_patches": 1024}
    assert m["postprocess"] == {
        "gaussian_sigma": 4.0,
        "gaussian_truncate": 4.0,
        "score_pool": 16,
        "tile_blur_sigma": 4.0,
        "score_rule": "block_mean_max",
        "score_top_k": 1,
    }
    for name, info in m["files"].items():
        assert len(info["sha256"]) == 64 and (bundle_dir / name).stat().st_size == info["bytes"]
    assert m["parity"]["onnx"]["passed"] and m["parity"]["native"]["passed"]


@pytest.mark.parametrize("head_path", ["native", "onnx"])
def test_runtime_matches_pytorch_on_real_demo_images(trained, bundle_dir, test_samples, head_path):
    inspector = Inspector.load(bundle_dir, head_path=head_path)
    for sample in test_samples:  # held-back EL modules, good and defective
        image = sample.image((256, 256))
        ref_map, ref_score = trained.predict(image)
        result = inspector.predict(image)
        span = ref_map.max() - ref_map.min()
        assert np.abs(result.anomaly_map - ref_map).max() <= TOLERANCE * span
        assert abs(result.score - ref_score) <= TOLERANCE * span
    assert inspector.providers_in_use == (
        ["OpenVINO:CPU"] if inspector.sessions.backend == "openvino" else ["CPUExecutionProvider"]
    )


def test_onnx_head_agrees_with_faiss(bundle_dir, test_samples):
    onnx_inspector = Inspector.load(bundle_dir, head_path="onnx")
    faiss_inspector = Inspector.load(bundle_dir, head_path="native")
    features = onnx_inspector.engine.tile_features(test_samples[0].image((256, 256)), {}).numpy()
    for task in onnx_inspector.plan.tasks:
        a = onnx_inspector.engine.heads[task.name]([f[list(task.tiles)] for f in features])
        b = faiss_inspector.engine.heads[task.name]([f[list(task.tiles)] for f in features])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _copy(bundle_dir, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


def test_tampered_truncated_and_missing_files_are_named(bundle_dir, tmp_path):
    b = _copy(bundle_dir, tmp_path)
    onnx_file = b / "embedder_patch.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"embedder_patch\.onnx: altered"):
        Bundle.load(b)

    b = _copy(bundle_dir, tmp_path / "t")
    index = b / "tasks" / "task_3.faiss"
    index.write_bytes(index.read_bytes()[:100])
    with pytest.raises(BundleError, match=r"task_3\.faiss: truncated"):
        Bundle.load(b)

    b = _copy(bundle_dir, tmp_path / "m")
    (b / "tasks" / "task_0_bank.npy").unlink()
    with pytest.raises(BundleError, match=r"task_0_bank\.npy: missing"):
        Inspector.load(b)


def test_wrong_schema_version_and_corrupt_manifest(bundle_dir, tmp_path):
    b = _copy(bundle_dir, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        Bundle.load(b)
    for old in (1, 2):  # an earlier exporter's bundle: refused with what to do
        m["schema_version"] = old
        (b / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match="re-export it"):
            Bundle.load(b)
    m["schema_version"] = 3
    m["tasks"][0]["head"]["files"]["bank"] = "elsewhere.npy"  # a manifest pointing to an unverified file
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="elsewhere.npy"):
        Bundle.load(b)
    (b / "manifest.json").write_text("{ not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        Bundle.load(b)


def test_engine_entries_of_earlier_exports(bundle_dir, tmp_path):
    """Earlier exports wrote `"engine": null` into every graph: such bundles still load; one naming a
    TensorRT engine file (never loaded or checked by any runtime path) is refused by name."""
    b = _copy(bundle_dir, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    graphs = [e["graph"] for e in m["embedders"].values()] + [t["head"]["graph"] for t in m["tasks"]]
    for g in graphs:
        g["engine"] = None
    (b / "manifest.json").write_text(json.dumps(m))
    assert Bundle.load(b).manifest == Bundle.load(bundle_dir).manifest
    graphs[0]["engine"] = "embedder_patch.engine"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="embedder_patch.engine.*re-export"):
        Bundle.load(b)


def test_failed_export_leaves_previous_bundle_intact(trained, bundle_dir, parity_images, tmp_path):
    b = _copy(bundle_dir, tmp_path)
    before = {p.name: p.read_bytes() for p in b.rglob("*") if p.is_file()}
    with pytest.raises(ParityError, match="beyond tolerance"):
        write_bundle(trained, b, parity_images, ExportOptions(tolerance=0.0))  # nothing can pass a zero tolerance
    after = {p.name: p.read_bytes() for p in b.rglob("*") if p.is_file()}
    assert before == after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the temporary directory is gone
    Inspector.load(b)


def test_parity_check_holds_one_runtime_paths_sessions_at_a_time(trained, bundle_dir, parity_images, monkeypatch):
    """Each path's Inspector (head sessions, the embedder's arena) is freed before the next path's is made.
    An Inspector is a reference cycle (its head loader), so only the collector frees it: at 8192^2 the
    paths' leftovers added up to 0.7 GB before the next path's own peak."""
    import weakref

    import hiad_export.writer as writer

    made, alive_when_made = [], []

    def spy(bundle, **options):
        alive_when_made.append(sum(ref() is not None for ref in made))
        inspector = Inspector(bundle, **options)
        made.append(weakref.ref(inspector))
        return inspector

    monkeypatch.setattr(writer, "Inspector", spy)
    reports = writer.check_parity(trained, bundle_dir, parity_images[:1], ExportOptions())
    assert {"onnx", "native", "pipeline"} <= set(reports) and len(made) == len(reports)
    assert alive_when_made == [0] * len(made)


def test_approximate_index_reports_its_cost(trained, parity_images, tmp_path):
    manifest = write_bundle(
        trained, tmp_path / "ivf", parity_images, ExportOptions({"index": "IVF4,Flat", "search_params": "nprobe=1"})
    )
    head = manifest.tasks[0].head
    assert head.params["index_factory"] == "IVF4,Flat" and head.params["search_params"] == "nprobe=1"
    assert manifest.parity["onnx"]["enforced"] and manifest.parity["onnx"]["passed"]
    assert not manifest.parity["native"]["enforced"]  # recorded as the accuracy cost, not a failure
    Inspector.load(tmp_path / "ivf").predict(parity_images[0])


def test_runtime_is_torch_free(bundle_dir, test_samples):
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'timm', 'torchvision', 'hiad_train', 'hiad_export', 'sklearn'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        from hiad_runtime.inspector import Inspector
        r = Inspector.load({str(bundle_dir)!r}).predict({str(test_samples[0].image_path)!r})
        assert r.anomaly_map.shape == (256, 256)
        assert not any(m.split('.')[0] in ('torch', 'timm') for m in sys.modules)
        print('SCORE', r.score)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert np.isfinite(float(out.stdout.split("SCORE")[-1]))


def test_odd_inputs_are_converted_and_resized(bundle_dir, tmp_path, test_samples):
    inspector = Inspector.load(bundle_dir)
    gray = cv2.imread(str(test_samples[0].image_path), cv2.IMREAD_GRAYSCALE)
    ref = inspector.predict(str(test_samples[0].image_path))
    deep = tmp_path / "deep.png"
    cv2.imwrite(str(deep), gray.astype(np.uint16) * 257)
    rgba = tmp_path / "rgba.png"
    cv2.imwrite(str(rgba), np.dstack([gray, gray, gray, np.full_like(gray, 255)]))
    for path in (deep, rgba):
        r = inspector.predict(str(path))
        np.testing.assert_allclose(r.anomaly_map, ref.anomaly_map, rtol=1e-5, atol=1e-5)
    big = tmp_path / "big.png"
    cv2.imwrite(str(big), cv2.resize(gray, (512, 384)))
    r = inspector.predict(str(big))
    assert r.anomaly_map.shape == (256, 256) and r.input_size == (512, 384)
    assert r.map_at_input_size().shape == (384, 512)


def test_predict_cli_writes_results_maps_and_overlays(bundle_dir, elpv_root, tmp_path):
    from typer.testing import CliRunner

    from hiad_runtime.cli import app

    broken = tmp_path / "in" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG garbage")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["predict", str(bundle_dir), str(elpv_root / "test"), str(broken), "--out", str(out), "--overlays"]
    )
    assert result.exit_code == 1  # one bad input: reported, the others still scored
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    ok = [line for line in lines if "error" not in line]
    assert len(ok) == 4 and any("broken.png" in line["error"] for line in lines if "error" in line)
    for line in ok:
        amap = np.load(out / line["map"])
        assert amap.shape == (256, 256) and amap.dtype == np.float32
        assert line["latency_ms"] > 0
    assert {p.name for p in (out / "maps").rglob("*") if p.is_dir()} >= {
        "defect",
        "good",
    }  # the inputs' folders mirrored
    assert len(list((out / "overlays").rglob("*.png"))) == 4
    big = tmp_path / "big" / "wide.png"
    big.parent.mkdir()
    cv2.imwrite(str(big), np.zeros((300, 500), np.uint8))
    result = CliRunner().invoke(
        app, ["predict", str(bundle_dir), str(big), "--out", str(tmp_path / "o2"), "--input-size"]
    )
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "o2" / "maps" / "wide.png.npy").shape == (300, 500)


def test_bench_prints_stage_figures(bundle_dir, tmp_path):
    from typer.testing import CliRunner

    from hiad_runtime.cli import app

    result = CliRunner().invoke(app, ["bench", str(bundle_dir), "--repeat", "2", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "b.json").read_text())
    assert set(figures["stages_ms"]) == {"decode", "tile", "backbone", "scoring", "post", "total"}
    assert figures["peak_rss_mb"] > 0 and figures["images_per_s"] > 0


def test_export_cli_and_archive(bundle_dir, tmp_path, elpv_root, trained):
    from typer.testing import CliRunner

    from hiad_export.cli import app
    from hiad_train.checkpoint import save_checkpoint

    ckpt = save_checkpoint(trained, tmp_path / "ckpt", data=elpv_root)
    result = CliRunner().invoke(app, [str(ckpt), "--out", str(tmp_path / "b"), "--archive"])
    assert result.exit_code == 0, result.output
    assert "engine" not in json.dumps(json.loads((tmp_path / "b" / "manifest.json").read_text()))  # no TensorRT files
    assert "parity [onnx]" in result.output
    r = Inspector.load(tmp_path / "b.tar").predict(str(next((elpv_root / "test" / "good").iterdir())))
    assert r.anomaly_map.shape == (256, 256)
