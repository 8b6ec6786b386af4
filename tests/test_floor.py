"""The floor `hiad-runtime bench` reports latency against (hiad_runtime/floor.py), on the tiny real bundle."""

import json

from typer.testing import CliRunner

from hiad_runtime.cli import app
from hiad_runtime.floor import measure_floor
from hiad_runtime.inspector import Inspector


def test_floor_measures_backbone_and_exact_search(bundle_dir, test_samples):
    inspector = Inspector.load(bundle_dir, head_path="native")
    image = test_samples[0].image(inspector.tiling.image_size)
    floor = measure_floor(inspector.engine, image)
    assert floor.backbone > 0 and floor.exact_search > 0
    graphs = Inspector.load(bundle_dir, head_path="onnx")  # heads without a bank: no exact search to compare
    assert measure_floor(graphs.engine, image).exact_search is None


def test_bench_prints_the_floor_and_its_ratios(bundle_dir, test_samples, tmp_path):
    out = tmp_path / "b.json"
    result = CliRunner().invoke(
        app, ["bench", str(bundle_dir), str(test_samples[0].image_path), "--repeat", "2", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    floor = figures["floor_ms"]
    assert 0 < floor["backbone"] < floor["backbone_exact_search"]
    assert "floor: backbone alone" in result.output and "backbone + exact k-NN search" in result.output
    # the CPU bound on throughput: a whole run costs more CPU than its backbone alone
    assert 0 < floor["backbone_cpu"] < figures["cpu_ms_per_image"] and figures["cores"] >= 1
    assert f"{figures['cores']} cores give at most" in result.output
    piped = CliRunner().invoke(app, ["bench", str(bundle_dir), "--repeat", "1", "--engine", "pipeline"])
    assert piped.exit_code == 0, piped.output
    assert "floor" not in piped.output  # the whole-image graph has no backbone to time apart
