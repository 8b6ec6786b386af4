"""`hiad-train calibrate`: new thresholds and normalization from a line's images; nothing else changes."""

from __future__ import annotations

import filecmp
import json

import pytest
from typer.testing import CliRunner

from hiad_runtime.bundle import Bundle
from hiad_runtime.cli import app as runtime_app
from hiad_runtime.inspector import Inspector
from hiad_runtime.review.drift import GumbelReference
from hiad_train.checkpoint import load_checkpoint, save_checkpoint
from hiad_train.cli import app as train_app

RECALIBRATED = {"thresholds", "postprocess", "pipeline", "files", "parity", "tasks", "thumbnail"}


def _files(root):
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def calibrated(clustered_bundle, elpv_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated") / "bundle"
    args = [
        "calibrate",
        str(clustered_bundle),
        "--normal",
        str(elpv_root / "train"),
        "--defective",
        str(elpv_root / "test" / "defect"),
        "--out",
        str(out),
        "--rate",
        "0.05",
    ]
    result = CliRunner().invoke(train_app, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_calibrate_changes_only_thresholds_and_normalization(clustered_bundle, calibrated):
    out, output = calibrated
    old_root, new_root = clustered_bundle.resolve(), out.resolve()
    old, new = (json.loads((r / "manifest.json").read_text()) for r in (old_root, new_root))
    graph = old["pipeline"]["graph"]["file"]
    assert _files(new_root) == _files(old_root) - {graph}  # the whole-image graph holds the old values: left out
    for name in _files(new_root) - {"manifest.json"}:
        assert filecmp.cmp(old_root / name, new_root / name, shallow=False), name
    assert {k: v for k, v in old.items() if k not in RECALIBRATED} == {
        k: v for k, v in new.items() if k not in RECALIBRATED
    }
    strip = lambda d: {k: v for k, v in d.items() if k != "normalization"}  # noqa: E731
    assert [strip(t) for t in old["tasks"]] == [strip(t) for t in new["tasks"]]
    assert strip(old["thumbnail"]) == strip(new["thumbnail"])
    assert [t["normalization"] for t in old["tasks"]] != [t["normalization"] for t in new["tasks"]]
    assert {k: v for k, v in new["files"].items()} == {k: v for k, v in old["files"].items() if k != graph}
    assert new["parity"]["notes"][:-1] == old["parity"]["notes"] and "calibrated" in new["parity"]["notes"][-1]
    assert new["pipeline"]["graph"] is None and "calibrate" in new["pipeline"]["unsupported"]
    assert {k: v for k, v in old["postprocess"].items()} == new["postprocess"]  # already clipped (validated model)

    rules = new["thresholds"]["rules"]
    assert rules["image"]["rule"] == "false_alarm_rate" and rules["image"]["rate"] == 0.05
    assert rules["image"]["images"] == 4 and rules["image"]["defective_images"] == 2 and "calibrated" in rules["image"]
    assert "image threshold" in output and "calibrated:" in output


def test_calibrated_bundle_decides_with_its_new_thresholds(calibrated, test_samples, tmp_path):
    out, _ = calibrated
    inspector = Inspector(Bundle.load(out))
    t = inspector.manifest.thresholds
    for s in test_samples:
        r = inspector.predict(str(s.image_path))
        assert r.decision == (r.score >= t["image"])
    result = CliRunner().invoke(
        runtime_app, ["predict", str(out), str(test_samples[0].image_path), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert (
        sum(
            "image threshold" in x and "false-alarm rate 5.00% on 4 normal image(s)" in x and "calibrated" in x
            for x in lines
        )
        == 1
    )


def test_checkpoint_and_bundle_calibrate_alike(clustered_model, calibrated, elpv_root, tmp_path):
    """The same images give the same normalization and thresholds through PyTorch and through the bundle's heads."""
    save_checkpoint(clustered_model, tmp_path / "checkpoint")
    args = [
        "calibrate",
        str(tmp_path / "checkpoint"),
        "--normal",
        str(elpv_root / "train"),
        "--defective",
        str(elpv_root / "test" / "defect"),
        "--rate",
        "0.05",
    ]
    result = CliRunner().invoke(train_app, args)
    assert result.exit_code == 0, result.output
    model = load_checkpoint(tmp_path / "checkpoint")  # republished in place as its next version
    bundle = json.loads((calibrated[0] / "manifest.json").read_text())
    for task in bundle["tasks"]:
        n = model.task_normalization[task["name"]]
        assert n.minimum == pytest.approx(task["normalization"]["minimum"], abs=1e-3)
        assert n.maximum == pytest.approx(task["normalization"]["maximum"], abs=1e-3)
    assert model.thresholds["image"] == pytest.approx(bundle["thresholds"]["image"], abs=1e-3)
    assert (tmp_path / "checkpoint").is_symlink() and len(list(tmp_path.glob("checkpoint.v*"))) == 2


def test_calibrate_names_what_is_wrong(tmp_path, elpv_root):
    result = CliRunner().invoke(train_app, ["calibrate", str(tmp_path), "--normal", str(elpv_root / "train")])
    assert result.exit_code == 2 and "neither a checkpoint" in result.output


def test_calibrate_prints_the_operating_curve_of_the_images_given(calibrated):
    """With defective images, each threshold kind gets its curve: from flagging everything to nothing."""
    _, output = calibrated
    for kind in ("image", "pixel"):
        head = next(i for i, x in enumerate(output.splitlines()) if x.startswith(f"{kind} operating curve"))
        rows = output.splitlines()[head + 2 :]
        assert "(4 normal, " in output.splitlines()[head]
        assert "100.0% (4/4;" in rows[0] and "  0.0% (0/" in rows[0]  # lowest threshold: every image flagged
    assert "takes 299 normal images" in output


def test_max_miss_sets_thresholds_from_the_defective_images(clustered_bundle, elpv_root, tmp_path):
    """--max-miss 0 flags every defective image given; the rule, its false alarms and misses are recorded."""
    defect = elpv_root / "test" / "defect"
    args = [
        "calibrate",
        str(clustered_bundle),
        "--normal",
        str(elpv_root / "train"),
        "--defective",
        str(defect),
        "--out",
        str(tmp_path / "b"),
        "--max-miss",
        "0",
    ]
    result = CliRunner().invoke(train_app, args)
    assert result.exit_code == 0, result.output
    inspector = Inspector(Bundle.load(tmp_path / "b"))
    rules = inspector.manifest.thresholds["rules"]
    assert rules["image"]["rule"] == "max_miss" and rules["image"]["missed"] == 0
    assert GumbelReference.from_thresholds(inspector.manifest.thresholds) is not None  # drift keeps its reference
    scores = [inspector.predict(str(p)).score for p in sorted(defect.glob("*.png"))]
    assert min(scores) == pytest.approx(inspector.manifest.thresholds["image"], abs=1e-5)  # the lowest defect, flagged
    assert "image threshold" in result.output and "misses at most 0% of" in result.output
    no_defects = CliRunner().invoke(train_app, args[:4] + ["--out", str(tmp_path / "c"), "--max-miss", "0.1"])
    assert no_defects.exit_code == 2 and "--max-miss sets thresholds from defective images" in no_defects.output
