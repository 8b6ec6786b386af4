"""Write a bundle from a trained model: graphs, indexes, banks, manifest; parity proven; atomic.

Everything is written into a temporary sibling directory, loaded back with the runtime, and compared
with PyTorch inference. Only a bundle that passes replaces the target directory (one rename), so an
interrupted or failed export leaves any previous bundle intact.
"""

from __future__ import annotations

import datetime as dt
import json
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from hiad_export import __version__
from hiad_export.graphs import build_engine, export_embedder, export_head, tensorrt_status
from hiad_export.indexes import build_index, write_index
from hiad_export.parity import DEFAULT_TOLERANCE, ParityError, measure
from hiad_export.pipeline import bundle_identity, export_pipeline
from hiad_runtime.bundle import MANIFEST, SCHEMA, SCHEMA_VERSION, Bundle, EmbedderSpec, HeadSpec, Manifest, TaskSpec
from hiad_runtime.files import atomic_directory, sha256_file
from hiad_runtime.image import RESIZE_POLICY
from hiad_runtime.inspector import Inspector
from hiad_train.model import HRModel


@dataclass
class ExportOptions:
    index: str = "Flat"
    search_params: str = ""
    formats: Sequence[str] = ("onnx",)
    tolerance: float = DEFAULT_TOLERANCE
    archive: bool = False
    notes: list[str] = field(default_factory=list)  # what was skipped and why


def _preprocessing(model: HRModel) -> dict:
    emb = model.embedder
    return {
        "input": "RGB uint8, decoded as is (gray replicated to 3 channels, alpha dropped, 16-bit scaled by 1/257)",
        "color_order": "RGB",
        "layout": "NHWC",
        "resize": RESIZE_POLICY,
        "mean": [float(v) for v in (emb.mean.flatten() / 255).tolist()],
        "std": [float(v) for v in (emb.std.flatten() / 255).tolist()],
        "normalization_in_graph": True,
    }


def _knn_head(model_det, name: str, root: Path, embedder: str, grid_shape, opts: ExportOptions, seed: int) -> HeadSpec:
    bank = model_det.memory_bank.numpy().astype(np.float32)
    graph = export_head(model_det.head(), grid_shape, root / f"{name}_head.onnx")
    np.save(root / f"{name}_bank.npy", bank, allow_pickle=False)
    write_index(build_index(bank, opts.index, seed), root / f"{name}.faiss")
    return HeadSpec(
        kind="knn",
        embedder=embedder,
        graph=graph,
        params=model_det.head_spec(),
        index=f"{name}.faiss",
        index_factory=opts.index,
        search_params=opts.search_params,
        bank=f"{name}_bank.npy",
    )


def _prefixed(head: HeadSpec, prefix: str) -> HeadSpec:
    return replace(
        head,
        graph=replace(head.graph, file=prefix + head.graph.file),
        index=prefix + head.index if head.index else None,
        bank=prefix + head.bank if head.bank else None,
    )


def _write_graphs(model: HRModel, tmp: Path, opts: ExportOptions) -> dict:
    """Every artifact but the manifest; returns the manifest's fields."""
    seed = model.config.seed
    embedders = {}
    spec = export_embedder(model.embedder, model.tiling.patch_size, tmp / "embedder_patch.onnx")
    dim, gh, gw = spec.output_shape[1:]
    embedders["patch"] = EmbedderSpec(spec, list(model.tiling.patch_size), [gw, gh], dim)
    (tmp / "tasks").mkdir()
    tasks = []
    for task in tqdm(model.tasks, desc="export tasks", leave=False):
        head = _knn_head(model.detectors[task.name], task.name, tmp / "tasks", "patch", (dim, gh, gw), opts, seed)
        norm = None if model.task_normalization is None else model.task_normalization[task.name].to_dict()
        tasks.append(TaskSpec(task.name, list(task.tiles), _prefixed(head, "tasks/"), norm))
    thumbnail = None
    if model.thumbnail is not None:
        t = model.thumbnail
        (tmp / "thumbnail").mkdir()
        tspec = export_embedder(t.embedder, t.size, tmp / "thumbnail" / "embedder.onnx")
        tspec = replace(tspec, file="thumbnail/embedder.onnx")
        tdim, tgh, tgw = tspec.output_shape[1:]
        embedders["thumbnail"] = EmbedderSpec(tspec, list(t.size), [tgw, tgh], tdim)
        head = _knn_head(t.detector, "detector", tmp / "thumbnail", "thumbnail", (tdim, tgh, tgw), opts, seed)
        thumbnail = {
            "size": list(t.size),
            "head": _prefixed(head, "thumbnail/"),
            "normalization": None if t.normalization is None else t.normalization.to_dict(),
        }
    routing = None
    if model.routing is not None:
        np.save(tmp / "routing_centres.npy", model.routing.astype(np.float32), allow_pickle=False)
        routing = {
            "centres": "routing_centres.npy",
            "key": "embedder 'patch' output averaged over the feature grid, then L2-normalized; nearest centre (L2) = task index",
        }
    return {"embedders": embedders, "tasks": tasks, "thumbnail": thumbnail, "routing": routing}


def _build_engines(tmp: Path, fields: dict, opts: ExportOptions) -> dict:
    if "trt" not in opts.formats:
        return fields
    ok, why = tensorrt_status()
    if not ok:
        opts.notes.append(f"TensorRT engines skipped: {why}")
        return fields
    embedders = {}
    for name, e in fields["embedders"].items():
        engine = e.graph.file.replace(".onnx", ".engine")
        build_engine(tmp / e.graph.file, tmp / engine, e.graph.input_shape)
        embedders[name] = replace(e, graph=replace(e.graph, engine=engine))
    return {**fields, "embedders": embedders}


def _files(tmp: Path) -> dict:
    return {
        str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(tmp.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _add_pipeline(model: HRModel, tmp: Path, fields: dict, opts: ExportOptions) -> dict:
    """The whole-image graph, named after the files written so far; a note says why when it cannot be built."""
    pipeline = export_pipeline(model, tmp, bundle_identity(_files(tmp)))
    if "unsupported" in pipeline:
        opts.notes.append(f"pipeline graph skipped: {pipeline['unsupported']}")
    return {**fields, "pipeline": pipeline}


def _manifest(model: HRModel, tmp: Path, fields: dict, parity: dict | None) -> Manifest:
    files = _files(tmp)
    return Manifest(
        schema=SCHEMA,
        schema_version=SCHEMA_VERSION,
        producer=f"hiad-export {__version__}",
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        tiling=model.tiling.to_dict(),
        fusion_weights=model.fusion_weights,
        preprocessing=_preprocessing(model),
        postprocess=model.postprocess,
        thresholds=model.thresholds,
        validation=model.validation,
        parity=parity,
        files=files,
        **fields,
    )


def _write_manifest(path: Path, manifest: Manifest) -> None:
    path.write_text(json.dumps(manifest.to_dict(), indent=1))


def check_parity(model: HRModel, root: Path, images: Sequence[np.ndarray], opts: ExportOptions) -> dict:
    """Run PyTorch and every runtime path (faiss, ONNX heads, pipeline graph) on `images`; raise
    ParityError past the tolerance."""
    if not images:
        raise ParityError("parity needs at least one held-back image")
    reference = [model.predict(im) for im in tqdm(images, desc="parity: pytorch", leave=False)]
    bundle = Bundle.load(root)
    exact_index = opts.index.strip().lower() == "flat"
    reports = [
        measure(reference, Inspector(bundle, knn="onnx"), images, "onnx", opts.tolerance, True),
        measure(reference, Inspector(bundle, knn="faiss"), images, "faiss", opts.tolerance, exact_index),
    ]
    if "graph" in (bundle.manifest.pipeline or {}):
        reports.append(measure(reference, Inspector(bundle, engine="pipeline"), images, "pipeline", opts.tolerance, True))
    failed = [r for r in reports if r.enforced and not r.passed]
    if failed:
        lines = [f"{r.path}: max relative map diff {r.max_rel_map_diff:.2e}, score diff {r.max_rel_score_diff:.2e}" for r in failed]
        raise ParityError(f"runtime disagrees with PyTorch beyond tolerance {opts.tolerance:g}: " + "; ".join(lines))
    return {r.path: r.to_dict() for r in reports}


def write_bundle(model: HRModel, out: str | Path, parity_images: Sequence[np.ndarray], opts: ExportOptions | None = None) -> Manifest:
    opts = opts or ExportOptions()
    out = Path(out)
    with atomic_directory(out) as tmp:
        fields = _add_pipeline(model, tmp, _build_engines(tmp, _write_graphs(model, tmp, opts), opts), opts)
        _write_manifest(tmp / MANIFEST, _manifest(model, tmp, fields, None))
        parity = check_parity(model, tmp, parity_images, opts)
        parity["notes"] = list(opts.notes)
        manifest = _manifest(model, tmp, fields, parity)
        _write_manifest(tmp / MANIFEST, manifest)
    if opts.archive:
        archive = out.with_suffix(".tar")
        partial = archive.with_name(f".{archive.name}.partial")
        with tarfile.open(partial, "w") as tar:
            tar.add(out, arcname=out.name)
        partial.replace(archive)
    return manifest
