"""Write a bundle from a trained model: graphs, indexes, banks, manifest; parity proven; atomic.

Everything is written into a temporary sibling directory, loaded back with the runtime, and compared
with PyTorch inference. Only a bundle that passes is published, as a new version `OUT.v<N>` that the
symlink `OUT` is switched to in one rename (`atomic_directory`), so an interrupted or failed export
leaves the previous bundle intact and `OUT` always names a complete one.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from hiad_export import __version__
from hiad_export.artifacts import write_native
from hiad_export.graphs import export_embedder, export_head
from hiad_export.parity import DEFAULT_TOLERANCE, ParityError, ParityReport, measure
from hiad_export.pipeline import bundle_identity, export_pipeline
from hiad_export.pipeline_memory import PIPELINE_MEMORY_MB
from hiad_export.quantize import calibration_tiles, reduce_precision
from hiad_runtime.backends import Backend, resolve_backend
from hiad_runtime.bundle import (
    MANIFEST,
    SCHEMA,
    SCHEMA_VERSION,
    Bundle,
    CheckpointRef,
    EmbedderSpec,
    FileInfo,
    GraphSpec,
    HeadSpec,
    LineageStep,
    Manifest,
    Precision,
    RoutingSpec,
    TaskSpec,
    ThumbnailSpec,
)
from hiad_runtime.files import atomic_directory, remove_stale, sha256_file
from hiad_runtime.geometry import split
from hiad_runtime.heads import has_native_path
from hiad_runtime.image import RESIZE_POLICY, resize_image
from hiad_runtime.inspector import Inspector
from hiad_train.detectors import Detector
from hiad_train.model import HRModel

PARITY_HEAD_MEMORY_MB = 256  # task heads each parity path keeps loaded (more are loaded per chunk): the export's memory
#                              does not grow with the task count, nor with the machine's free memory


@dataclass
class ExportOptions:
    native: dict = field(
        default_factory=dict
    )  # options of native head paths, e.g. {"index": "IVF64,Flat", "search_params": "nprobe=8"}
    tolerance: float = DEFAULT_TOLERANCE
    archive: bool = False
    precision: Precision = Precision.fp32  # embedder graphs (heads stay fp32)
    calibration: Sequence[np.ndarray] = ()  # int8: training images at the model's image size
    pipeline: bool = False  # also build the whole-image graph (pipeline.onnx: what the C library runs)
    pipeline_memory_mb: float = PIPELINE_MEMORY_MB  # ... when it can be built and checked within this much memory
    notes: list[str] = field(default_factory=list)  # what was skipped and why
    checkpoint: CheckpointRef | None = None  # what the model was loaded from (the manifest records it)
    lineage: Sequence[LineageStep] = ()  # `hiad-train update`s since the export (the manifest records them)


def _preprocessing() -> dict:
    return {
        "input": "RGB uint8, decoded as is (gray replicated to 3 channels, alpha dropped, 16-bit scaled by 1/257)",
        "color_order": "RGB",
        "layout": "NHWC",
        "resize": RESIZE_POLICY,
        "normalization_in_graph": True,
    }


def _export_head(
    detector: Detector, folder: Path, stem: str, embedder: str, shapes, opts: ExportOptions, prefix: str
) -> HeadSpec:
    """The detector's head graph plus whatever native artifacts it offers, with paths relative to the bundle."""
    graph = export_head(detector.head(), shapes, folder / f"{stem}_head.onnx")
    files, native_params = write_native(detector.head_kind, detector.state(), folder, stem, opts.native, detector.seed)
    return HeadSpec(
        kind=detector.head_kind,
        embedder=embedder,
        graph=replace(graph, file=prefix + graph.file),
        files={role: prefix + f for role, f in files.items()},
        params={**detector.head_params(), **native_params},
    )


def _feature_shapes(graph: GraphSpec) -> list[tuple[int, ...]]:
    return [tuple(t.shape[1:]) for t in graph.outputs]


def _write_graphs(model: HRModel, tmp: Path, opts: ExportOptions) -> dict:
    """Every artifact but the manifest; returns the manifest's fields."""
    embedders = {}
    spec = export_embedder(model.embedder, model.tiling.patch_size, tmp / "embedder_patch.onnx")
    embedders["patch"] = EmbedderSpec(spec, list(model.tiling.patch_size))
    (tmp / "tasks").mkdir()
    tasks = []
    for task in tqdm(model.tasks, desc="export tasks", leave=False):
        head = _export_head(
            model.detectors[task.name], tmp / "tasks", task.name, "patch", _feature_shapes(spec), opts, "tasks/"
        )
        norm = None if model.task_normalization is None else model.task_normalization[task.name]
        tasks.append(TaskSpec(task.name, list(task.tiles), head, norm, model.training.get(task.name)))
    thumbnail = None
    if model.thumbnail is not None:
        t = model.thumbnail
        (tmp / "thumbnail").mkdir()
        tspec = export_embedder(t.embedder, t.size, tmp / "thumbnail" / "embedder.onnx")
        embedders["thumbnail"] = EmbedderSpec(replace(tspec, file="thumbnail/embedder.onnx"), list(t.size))
        head = _export_head(
            t.detector, tmp / "thumbnail", "detector", "thumbnail", _feature_shapes(tspec), opts, "thumbnail/"
        )
        thumbnail = ThumbnailSpec(list(t.size), head, t.normalization)
    routing = None
    if model.routing is not None:
        np.save(tmp / "routing_centres.npy", model.routing.astype(np.float32), allow_pickle=False)
        routing = RoutingSpec(
            "routing_centres.npy",
            "embedder 'patch' output feature_0 averaged over its grid, then L2-normalized; nearest centre (L2) = "
            "task index",
        )
    return {"embedders": embedders, "tasks": tasks, "thumbnail": thumbnail, "routing": routing}


def _reduce_precision(model: HRModel, tmp: Path, fields: dict, opts: ExportOptions) -> dict:
    """Replace every embedder graph by its reduced-precision version (the fp32 file is removed)."""
    tiles = (
        calibration_tiles(opts.calibration, lambda im: split(im, model.tiling.tiles))
        if opts.precision == "int8"
        else None
    )
    embedders = {}
    for name, e in fields["embedders"].items():
        source = tmp / e.graph.file
        reduced = reduce_precision(source, opts.precision, None if tiles is None else _resized(tiles, e.tile_size))
        source.unlink()
        embedders[name] = replace(
            e, graph=replace(e.graph, file=str(reduced.relative_to(tmp))), precision=opts.precision
        )
    return {**fields, "embedders": embedders}


def _resized(tiles: np.ndarray, size: list[int]) -> np.ndarray:
    """Calibration tiles at an embedder's input size (the thumbnail embedder's differs)."""
    if tiles.shape[1:3] == (size[1], size[0]):
        return tiles
    return np.stack([resize_image(t, tuple(size)) for t in tiles])


def _files(tmp: Path) -> dict:
    return {
        str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(tmp.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _add_pipeline(model: HRModel, tmp: Path, fields: dict, opts: ExportOptions) -> dict:
    """The whole-image graph when asked for and within budget, named after the files written so far;
    a note says what it costs, or why there is none."""
    pipeline, note = export_pipeline(model, tmp, bundle_identity(_files(tmp)), opts.pipeline, opts.pipeline_memory_mb)
    opts.notes.append(note)
    return {**fields, "pipeline": pipeline}


def _manifest(model: HRModel, tmp: Path, fields: dict, parity: dict | None) -> Manifest:
    files = _files(tmp)
    return Manifest(
        schema=SCHEMA,
        schema_version=SCHEMA_VERSION,
        producer=f"hiad-export {__version__}",
        detector=model.config.detector,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        tiling=model.tiling.to_dict(),
        fusion_weights=model.fusion_weights,
        preprocessing=_preprocessing(),
        postprocess=model.postprocess,
        thresholds=model.thresholds,
        validation=model.validation,
        parity=parity,
        files={k: FileInfo(**v) for k, v in files.items()},
        **fields,
    )


def _write_manifest(path: Path, manifest: Manifest) -> None:
    path.write_text(json.dumps(manifest.to_dict(), indent=1))


def check_parity(
    model: HRModel,
    root: Path,
    images: Sequence[np.ndarray],
    opts: ExportOptions,
    reference: list | None = None,
    label: str = "",
) -> dict:
    """Run PyTorch and every runtime path that applies (ONNX heads, native heads, the pipeline graph)
    on `images`; raise ParityError past the tolerance. A native path whose artifacts are approximate
    (params `exact: false`, e.g. an IVF index) is measured and recorded, not enforced: its deviation
    is the accuracy it trades; so is a reduced-precision embedder (`label` names it: its reports are
    keyed `int8:onnx`, ...). One path's sessions at a time, within `PARITY_HEAD_MEMORY_MB` of heads."""
    if not images:
        raise ParityError("parity needs at least one held-back image")
    reference = reference or [model.predict(im) for im in tqdm(images, desc="parity: pytorch", leave=False)]
    bundle = Bundle.load(root)
    reduced = any(e.precision != "fp32" for e in bundle.manifest.embedders.values())
    key = f"{label}:" if label else ""

    def measured(path: str, enforced: bool, **options) -> ParityReport:
        inspector = Inspector(bundle, head_memory=PARITY_HEAD_MEMORY_MB, **options)
        try:
            return measure(reference, inspector, images, path, opts.tolerance, enforced)
        finally:  # an Inspector is a reference cycle (its head loader): freed by the collector, before the next path
            del inspector
            gc.collect()

    reports = [measured(key + "onnx", not reduced, head_path="onnx", backend="onnxruntime")]
    native = [h for h in bundle.manifest.heads() if has_native_path(h)]
    exact = (
        all(h.params.get("exact", True) for h in native) and not reduced
    )  # approximate indexes: recorded, not enforced
    if native:
        reports.append(measured(key + "native", exact, head_path="native", backend="onnxruntime"))
    if resolve_backend(Backend.auto) is Backend.openvino:  # the runtime's default backend on this box: proven too
        reports.append(measured(key + "openvino", exact, backend="openvino"))
    if bundle.manifest.pipeline and bundle.manifest.pipeline.graph and not reduced:  # the graph holds the fp32 embedder
        reports.append(measured("pipeline", True, engine="pipeline", backend="onnxruntime"))
    failed = [r for r in reports if r.enforced and not r.passed]
    if failed:
        lines = [
            f"{r.path}: max relative map diff {r.max_rel_map_diff:.2e}, score diff {r.max_rel_score_diff:.2e}"
            for r in failed
        ]
        raise ParityError(f"runtime disagrees with PyTorch beyond tolerance {opts.tolerance:g}: " + "; ".join(lines))
    return {r.path: r.to_dict() for r in reports}


def write_bundle(
    model: HRModel, out: str | Path, parity_images: Sequence[np.ndarray], opts: ExportOptions | None = None
) -> Manifest:
    """Export `model` as a bundle at `out` and return its manifest.

    Writes the embedder and head graphs, each head kind's native files, the routing centres, the
    whole-image graph when `opts.pipeline` asks for it, and the manifest into a temporary sibling
    folder; checks that every runtime path reproduces `model.predict` on `parity_images` (ParityError
    past `opts.tolerance`); then publishes atomically as a new version `OUT.v<N>` behind the symlink
    `OUT`. A reduced `opts.precision` replaces the embedders after the fp32 check (its deviation is
    recorded, not enforced); `opts.archive` also writes `OUT.tar`."""
    opts = opts or ExportOptions()
    out = Path(out)
    with atomic_directory(out) as tmp:
        fields = _add_pipeline(model, tmp, _write_graphs(model, tmp, opts), opts)
        fields = {**fields, "checkpoint": opts.checkpoint, "lineage": list(opts.lineage)}
        _write_manifest(tmp / MANIFEST, _manifest(model, tmp, fields, None))
        reference = [model.predict(im) for im in tqdm(parity_images, desc="parity: pytorch", leave=False)]
        parity = check_parity(model, tmp, parity_images, opts, reference)  # fp32: enforced
        if opts.precision != "fp32":
            fields = _reduce_precision(model, tmp, fields, opts)
            _write_manifest(tmp / MANIFEST, _manifest(model, tmp, fields, None))
            parity.update(check_parity(model, tmp, parity_images, opts, reference, opts.precision))  # recorded
        parity["notes"] = list(opts.notes)
        manifest = _manifest(model, tmp, fields, parity)
        _write_manifest(tmp / MANIFEST, manifest)
    if opts.archive:
        write_archive(out)
    return manifest


def write_archive(out: Path) -> Path:
    """`OUT.tar` (the name in full plus `.tar`: `bundle.v2` -> `bundle.v2.tar`) of the published version,
    written under a pid-stamped temporary name and renamed into place."""
    archive = out.with_name(f"{out.name}.tar")
    prefix = f".{archive.name}.tmp-"
    remove_stale(out.parent, prefix)
    partial = out.with_name(f"{prefix}{os.getpid()}")
    try:
        with tarfile.open(partial, "w") as tar:
            tar.add(out.resolve(), arcname=out.name)
        partial.replace(archive)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return archive
