"""Re-publishing a bundle with new normalization and thresholds (`hiad-train calibrate` on a bundle).

The calibrated manifest is a new `Manifest` built from the bundle's own (dataclasses.replace): each
task's and the thumbnail's normalization, the thresholds, a parity note saying what was recomputed
after the check. The whole-image graph holds the export-time normalization and thresholds, so it is
left out and the manifest says why (re-export a calibrated checkpoint to rebuild it). Every other
file is copied byte for byte, and the copy is verified before it is published atomically.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from hiad_runtime.bundle import MANIFEST, Bundle, Manifest, PipelineSpec
from hiad_runtime.files import atomic_directory
from hiad_train.calibration import Calibration, copy_except

GRAPH_LEFT_OUT = (
    "left out by hiad-train calibrate: the graph holds the export-time normalization and thresholds; "
    "export a calibrated checkpoint to rebuild it"
)


def calibrated_manifest(manifest: Manifest, cal: Calibration) -> Manifest:
    """`manifest` with `cal`'s normalization and thresholds, without the whole-image graph."""
    pipeline, files = manifest.pipeline, manifest.files
    if pipeline is not None and pipeline.graph is not None:
        files = {k: v for k, v in files.items() if k != pipeline.graph.file}
        pipeline = PipelineSpec(unsupported=GRAPH_LEFT_OUT)
    parity = manifest.parity
    if parity is not None:
        note = (
            f"calibrated {cal.thresholds['rules']['image']['calibrated']}: normalization and thresholds "
            "recomputed after the parity check (the heads it checked are unchanged)"
        )
        parity = {**parity, "notes": [*parity.get("notes", []), note]}
    thumbnail = manifest.thumbnail
    if thumbnail is not None:
        thumbnail = replace(thumbnail, normalization=cal.thumbnail_normalization)
    return replace(
        manifest,
        tasks=[replace(t, normalization=cal.task_normalization[t.name]) for t in manifest.tasks],
        thumbnail=thumbnail,
        thresholds=cal.thresholds,
        pipeline=pipeline,
        parity=parity,
        files=files,
    )


def publish_calibrated(source: Path, out: Path, cal: Calibration) -> Manifest:
    """Publish the bundle at `source` with `cal` as the new version behind `out`; returns its manifest."""
    bundle = Bundle.load(source)
    manifest = calibrated_manifest(bundle.manifest, cal)
    with atomic_directory(out) as tmp:
        copy_except(bundle.root, tmp, set(bundle.manifest.files) - set(manifest.files) | {MANIFEST})
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=1))
        Bundle.load(tmp)  # every checksum and path before it is published
    return manifest
