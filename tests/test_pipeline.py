"""The whole-image pipeline graph (pipeline.onnx): exact building blocks, export, parity, metadata,
the Inspector's pipeline engine, and the named refusal of what the graph cannot express."""

import json

import cv2
import numpy as np
import onnx
import pytest
import torch
from conftest import rng, tiny_config

from hiad_export.pipeline import (
    AreaShrink,
    GaussianBlur,
    Pipeline,
    PipelineUnsupported,
    bundle_identity,
    export_pipeline,
)
from hiad_export.pipeline_memory import MB, LiveTensorBytes, pipeline_cost
from hiad_export.writer import write_bundle
from hiad_runtime.bundle import SCHEMA_VERSION, BundleError
from hiad_runtime.inspector import Inspector
from hiad_runtime.postprocess import PostprocessSpec, gaussian_blur
from hiad_train.trainer import HRTrainer

TOLERANCE = 1e-4


@pytest.mark.parametrize("factors", [(2, 2), (3, 3), (4, 4), (2, 4)])
def test_area_shrink_is_opencv_inter_area_bit_for_bit(factors):
    fx, fy = factors
    image = rng(fx * 10 + fy).integers(0, 256, (2, 24 * fy, 24 * fx, 3), dtype=np.uint8)
    got = AreaShrink((24 * fx, 24 * fy), (24, 24), "test")(torch.from_numpy(image)).numpy()
    for g, im in zip(got, image):
        np.testing.assert_array_equal(g, cv2.resize(im, (24, 24), interpolation=cv2.INTER_AREA))
    with pytest.raises(PipelineUnsupported, match=r"test: resizing 100x100 to 30x30 is not a whole-factor shrink"):
        AreaShrink((100, 100), (30, 30), "test")


def test_gaussian_blur_equals_runtime_blur():
    m = rng(1).random((2, 64, 80)).astype(np.float32)
    spec = PostprocessSpec()
    got = GaussianBlur(spec.gaussian_sigma, spec.gaussian_truncate, (80, 64))(torch.from_numpy(m)).numpy()
    for g, x in zip(got, m):
        np.testing.assert_allclose(g, gaussian_blur(x, spec.gaussian_sigma, spec.gaussian_truncate), atol=1e-6)


def test_manifest_records_the_pipeline_graph(bundle_dir):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    p = m["pipeline"]
    assert p["graph"]["file"] == "pipeline.onnx" and p["unsupported"] is None
    assert [o["name"] for o in p["graph"]["outputs"]] == ["anomaly_map", "score"]
    assert p["graph"]["inputs"] == [{"name": "image", "dtype": "uint8", "shape": ["batch", 256, 256, 3]}]
    assert m["files"]["pipeline.onnx"]["bytes"] == (bundle_dir / "pipeline.onnx").stat().st_size
    assert m["parity"]["pipeline"]["passed"] and m["parity"]["pipeline"]["max_rel_map_diff"] <= TOLERANCE
    graph = onnx.load(str(bundle_dir / "pipeline.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in graph.metadata_props}
    others = {k: v for k, v in m["files"].items() if k != "pipeline.onnx"}
    assert meta == p["metadata"] and meta["hiad.bundle_id"] == bundle_identity(others)
    assert meta["hiad.schema_version"] == str(SCHEMA_VERSION) and meta["hiad.image_threshold"] == ""
    assert [i.name for i in graph.graph.input] == ["image"]


@pytest.mark.parametrize("which", ["tiny", "clustered"])
def test_pipeline_engine_matches_pytorch_and_the_tile_engine(which, request, test_samples):
    model = request.getfixturevalue("trained" if which == "tiny" else "clustered_model")
    bundle = request.getfixturevalue("bundle_dir" if which == "tiny" else "clustered_bundle")
    pipeline, tiles = Inspector.load(bundle, engine="pipeline"), Inspector.load(bundle)
    for s in test_samples:
        image = s.image((256, 256))
        ref_map, ref_score = model.predict(image)
        r, t = pipeline.predict(image), tiles.predict(image)
        span = max(ref_map.max() - ref_map.min(), 1e-6)
        assert np.abs(r.anomaly_map - ref_map).max() <= TOLERANCE * span
        assert abs(r.score - ref_score) <= TOLERANCE * span
        assert r.decision == t.decision and set(r.timings) == {"decode", "pipeline"}


def test_graph_thresholds_give_decision_and_mask(clustered_model, clustered_bundle, test_samples):
    import onnxruntime as ort

    m = json.loads((clustered_bundle / "manifest.json").read_text())
    assert [o["name"] for o in m["pipeline"]["graph"]["outputs"]] == ["anomaly_map", "score", "decision", "mask"]
    assert float(m["pipeline"]["metadata"]["hiad.image_threshold"]) == clustered_model.thresholds["image"]
    session = ort.InferenceSession(str(clustered_bundle / "pipeline.onnx"), providers=["CPUExecutionProvider"])
    images = np.stack([s.image((256, 256)) for s in test_samples[:2]])
    amap, score, decision, mask = session.run(None, {"image": images})  # a batch of two
    t = clustered_model.thresholds
    np.testing.assert_array_equal(decision, score >= np.float32(t["image"]))
    np.testing.assert_array_equal(mask, amap >= np.float32(t["pixel"]))
    assert amap.shape == (2, 256, 256)


@pytest.fixture(scope="module")
def unsupported_bundle(train_samples, tmp_path_factory):
    """Context windows of 320 px shrunk to 128 px tiles: not a whole factor, so no pipeline graph."""
    model = HRTrainer(tiny_config(image_size=320, ds_factors=[0, 2], fusion_weights=[0.5, 0.5]), progress=False).fit(
        train_samples[:2]
    )
    out = tmp_path_factory.mktemp("unsupported") / "bundle"
    images = [s.image((320, 320)) for s in train_samples[2:3]]
    return write_bundle(model, out, images), out


def test_what_the_graph_cannot_express_is_named(unsupported_bundle):
    manifest, out = unsupported_bundle
    why = "context windows of level 1: resizing 320x320 to 128x128 is not a whole-factor shrink"
    assert (
        why in manifest.pipeline.unsupported
        and manifest.pipeline.graph is None
        and not (out / "pipeline.onnx").exists()
    )
    assert any(why in n for n in manifest.parity["notes"]) and "pipeline" not in manifest.parity
    with pytest.raises(BundleError, match="no pipeline graph: " + why):
        Inspector.load(out, engine="pipeline")
    assert Inspector.load(out).predict(np.zeros((320, 320, 3), np.uint8)).anomaly_map.shape == (320, 320)


def test_predict_cli_runs_the_pipeline_engine(bundle_dir, elpv_root, tmp_path):
    from typer.testing import CliRunner

    from hiad_runtime.cli import app

    runner = CliRunner()
    for engine in ("tiles", "pipeline"):
        done = runner.invoke(
            app,
            ["predict", str(bundle_dir), str(elpv_root / "test"), "--out", str(tmp_path / engine), "--engine", engine],
        )
        assert done.exit_code == 0, done.output
    tiles = [json.loads(x) for x in (tmp_path / "tiles" / "results.jsonl").read_text().splitlines()]
    pipe = [json.loads(x) for x in (tmp_path / "pipeline" / "results.jsonl").read_text().splitlines()]
    assert len(pipe) == len(tiles) == 4
    for a, b in zip(tiles, pipe):
        ma, mb = np.load(tmp_path / "tiles" / a["map"]), np.load(tmp_path / "pipeline" / b["map"])
        assert np.abs(ma - mb).max() <= TOLERANCE * (ma.max() - ma.min())
    bench = runner.invoke(app, ["bench", str(bundle_dir), "--engine", "pipeline", "--repeat", "2"])
    assert bench.exit_code == 0 and "pipeline" in bench.output


def test_the_graph_is_built_only_when_asked_for(default_bundle, bundle_dir):
    manifest, out = default_bundle
    why = manifest.pipeline.unsupported
    assert manifest.pipeline.graph is None and why.startswith(
        "not built: hiad-export --pipeline builds the whole-image graph"
    )
    assert "MB to build and run" in why and "MB of weights: pipeline.onnx" in why  # its cost, stated
    assert not list(out.glob("pipeline.onnx*")) and "pipeline" not in manifest.parity
    assert "pipeline.onnx" not in manifest.files and any(why in n for n in manifest.parity["notes"])
    with pytest.raises(BundleError, match="no pipeline graph: not built: hiad-export --pipeline"):
        Inspector.load(out, engine="pipeline")
    # asked for (the fixture's --pipeline): built, and its note states the size on disk and the memory it needs
    notes = json.loads((bundle_dir / "manifest.json").read_text())["parity"]["notes"]
    assert any(n.startswith("pipeline graph built: ") and "MB on disk" in n for n in notes)


def test_memory_estimate_is_the_real_forward_pass_and_holds_every_tile(trained):
    """The meta-device pass counts the same tensors as a real forward pass (so building and running the
    graph need what it says), and the graph holds every tile's features at once: its peak grows with
    the tile count (8192^2: 256 tiles, 16 GB with the demo's PatchCore), which is why it has a budget."""
    pipeline = Pipeline(trained).eval()
    cost = pipeline_cost(pipeline, (256, 256))
    with torch.no_grad(), LiveTensorBytes() as real:
        pipeline(torch.zeros(1, 256, 256, 3, dtype=torch.uint8))
    assert cost.activations == real.peak
    tiles = len(trained.tiling.tiles)
    features = trained.tile_embeddings(np.zeros((256, 256, 3), np.uint8), [0])
    assert tiles == 4 and cost.activations > tiles * sum(f.numel() * f.element_size() for f in features)
    assert cost.constants == sum(t.numel() * t.element_size() for t in [*pipeline.parameters(), *pipeline.buffers()])


def test_a_graph_over_the_memory_budget_is_left_out_with_what_it_needs(trained, tmp_path):
    need = pipeline_cost(Pipeline(trained).eval(), (256, 256)).total_mb
    spec, note = export_pipeline(trained, tmp_path, "id", requested=True, memory_mb=need - 1)
    assert spec.graph is None and not list(tmp_path.iterdir())  # nothing traced, nothing written
    assert f"runs all 4 tiles at once, about {need} MB to build and run" in spec.unsupported
    assert f"over the budget of {need - 1} MB" in spec.unsupported and f"--pipeline-memory {need})" in spec.unsupported
    assert note == f"pipeline graph {spec.unsupported}"
    spec, note = export_pipeline(trained, tmp_path, "id", requested=True, memory_mb=need)
    assert spec.graph is not None and (tmp_path / "pipeline.onnx").stat().st_size < need * MB
