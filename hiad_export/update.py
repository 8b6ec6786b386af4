"""Publishing a model updated with new normal images (`hiad-train update`) as a new bundle version.

The export is the usual one (`write_bundle`: graphs, native files, parity against PyTorch, atomic
publish as `OUT.v<N>`), with the options the parent bundle was exported with: the k-NN heads' faiss
index and search parameters, the embedders' precision, the whole-image graph. The manifest records
the checkpoint the model was saved to and the lineage: the parent's steps plus this one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hiad_export.calibrate import GRAPH_LEFT_OUT
from hiad_export.writer import ExportOptions, write_bundle
from hiad_runtime.bundle import CheckpointRef, LineageStep, Manifest
from hiad_runtime.heads import has_native_path
from hiad_train.model import HRModel


def options_like(parent: Manifest | None) -> ExportOptions:
    """The export options `parent` was written with (the defaults without a parent). A whole-image graph
    that `hiad-train calibrate` left out is built again: the updated model's graph holds its own values."""
    if parent is None:
        return ExportOptions()
    native = next((h.params for h in parent.heads() if has_native_path(h)), {})
    pipeline = parent.pipeline is not None and (
        parent.pipeline.graph is not None or parent.pipeline.unsupported == GRAPH_LEFT_OUT
    )
    return ExportOptions(
        {"index": native.get("index_factory", "Flat"), "search_params": native.get("search_params", "")},
        precision=parent.embedders["patch"].precision,
        pipeline=pipeline,
    )


def publish_update(
    model: HRModel,
    out,
    parity_images: Sequence[np.ndarray],
    checkpoint: CheckpointRef,
    step: LineageStep,
    parent: Manifest | None,
    data: str | None = None,
) -> tuple[Manifest, ExportOptions]:
    """Export `model` as the new version of the bundle `out` (parity checked; ParityError past the
    tolerance leaves `out` as it was), exported like `parent`, its lineage `parent`'s and `step`;
    `data`: the training data folder the checkpoint records (an int8 parent's embedders are calibrated
    on its images, as `hiad-export --precision int8` does). Returns the manifest and the options used."""
    opts = options_like(parent)
    if opts.precision == "int8":
        from hiad_export.cli import training_images

        opts.calibration = training_images(data, model.tiling.image_size, 4)
    opts.checkpoint = checkpoint
    opts.lineage = [*(parent.lineage if parent is not None else []), step]
    return write_bundle(model, out, parity_images, opts), opts
