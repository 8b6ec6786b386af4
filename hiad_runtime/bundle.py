"""The deployment bundle: a directory with `manifest.json` and the files it lists (with sha256).

The manifest is the contract for every consumer (this runtime, a C program on ONNX Runtime's C API,
an HTTP service): geometry, preprocessing, graphs with their input/output names and shapes, per-task
heads and indexes, post-processing, normalization, thresholds, parity figures. Loading checks the
schema version and every file's sha256 before anything is used; nothing is ever unpickled.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hiad_runtime.files import sha256_file
from hiad_runtime.geometry import Tiling
from hiad_runtime.postprocess import PostprocessSpec
from hiad_runtime.tasks import Task

SCHEMA = "hiad-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """A bundle that cannot be used as it is; the message names the file and what is wrong."""


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph: file, tensor names, dtypes and shapes ('batch' marks the dynamic axis)."""

    file: str
    input_name: str
    input_dtype: str
    input_shape: list
    output_name: str
    output_dtype: str
    output_shape: list
    opset: int
    engine: str | None = None  # TensorRT engine built from this graph, when one was built


@dataclass(frozen=True)
class EmbedderSpec:
    """uint8 RGB tiles (NHWC, tile_size) -> embeddings (N, dim, grid_h, grid_w); mean/std inside."""

    graph: GraphSpec
    tile_size: list  # [width, height]
    grid: list  # [width, height] of the feature grid
    dim: int


@dataclass(frozen=True)
class HeadSpec:
    """A task's scoring head. kind 'knn': mean L2 distance to the k nearest memory-bank rows."""

    kind: str
    embedder: str
    graph: GraphSpec  # embedding -> score grid, self-contained (the bank is a constant inside)
    params: dict = field(default_factory=dict)  # e.g. k, bank_size, dim
    index: str | None = None  # faiss index file (fast path)
    index_factory: str | None = None  # faiss index_factory string it was built with
    search_params: str = ""  # faiss ParameterSpace string, e.g. "nprobe=8"
    bank: str | None = None  # float32 .npy of the bank, for exact re-ranking of faiss results


@dataclass(frozen=True)
class TaskSpec:
    name: str
    tiles: list  # tile indices; empty for retrieval tasks (routed at inference)
    head: HeadSpec
    normalization: dict | None = None  # {"minimum", "maximum"}: raw scores -> (x - min) / (max - min)

    @property
    def task(self) -> Task:
        return Task(self.name, tuple(self.tiles))


@dataclass(frozen=True)
class Manifest:
    schema: str
    schema_version: int
    producer: str
    created: str
    tiling: dict
    fusion_weights: list
    preprocessing: dict
    embedders: dict  # name -> EmbedderSpec
    tasks: list  # TaskSpec
    postprocess: PostprocessSpec
    routing: dict | None = None  # {"centres": file, "key": how a tile's key is computed}
    thumbnail: dict | None = None  # {"size": [w, h], "head": HeadSpec, "normalization"} (embedder "thumbnail")
    thresholds: dict | None = None  # {"image": float|None, "pixel": float|None} on the output scale
    validation: dict | None = None  # metrics on the synthetic-anomaly validation set
    parity: dict | None = None
    pipeline: dict | None = None  # {"graph": "pipeline.onnx", "input", "outputs", "metadata"} or {"unsupported": why}
    files: dict = field(default_factory=dict)  # relative path -> {"sha256": hex, "bytes": int}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        def head(h: dict) -> HeadSpec:
            return HeadSpec(**{**h, "graph": GraphSpec(**h["graph"])})

        thumbnail = d.get("thumbnail")
        if thumbnail is not None:
            thumbnail = {**thumbnail, "head": head(thumbnail["head"])}
        return cls(
            **{
                **d,
                "embedders": {k: EmbedderSpec(**{**e, "graph": GraphSpec(**e["graph"])}) for k, e in d["embedders"].items()},
                "tasks": [TaskSpec(t["name"], t["tiles"], head(t["head"]), t.get("normalization")) for t in d["tasks"]],
                "postprocess": PostprocessSpec.from_dict(d["postprocess"]),
                "thumbnail": thumbnail,
            }
        )

    def referenced_files(self) -> list[str]:
        """Every file the manifest points to (each must be listed, with its sha256, in `files`)."""
        heads = [t.head for t in self.tasks] + ([self.thumbnail["head"]] if self.thumbnail else [])
        refs = [e.graph.file for e in self.embedders.values()] + [e.graph.engine for e in self.embedders.values()]
        refs += [f for h in heads for f in (h.graph.file, h.index, h.bank)]
        refs += [self.routing["centres"]] if self.routing else []
        refs += [(self.pipeline or {}).get("graph")]
        return [r for r in refs if r]

    @property
    def geometry(self) -> Tiling:
        return Tiling.from_dict(self.tiling)



@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    def path(self, relative: str) -> Path:
        return self.root / relative

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        """Open a bundle directory (or a .tar of one); check schema and every file's sha256."""
        path = Path(path)
        if path.is_file() and tarfile.is_tarfile(path):
            path = _extract(path)
        manifest_file = path / MANIFEST
        if not manifest_file.is_file():
            raise BundleError(f"{path}: not a bundle (no {MANIFEST})")
        try:
            raw = json.loads(manifest_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{manifest_file}: unreadable manifest ({e})") from e
        if raw.get("schema") != SCHEMA:
            raise BundleError(f"{manifest_file}: schema {raw.get('schema')!r} is not {SCHEMA!r}")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise BundleError(
                f"{manifest_file}: schema_version {raw.get('schema_version')} is not supported (this runtime reads {SCHEMA_VERSION})"
            )
        try:
            manifest = Manifest.from_dict(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{manifest_file}: malformed manifest ({type(e).__name__}: {e})") from e
        unlisted = [f for f in manifest.referenced_files() if f not in manifest.files]
        if unlisted:
            raise BundleError(f"{manifest_file}: refers to files without a checksum: {', '.join(unlisted)}")
        if verify:
            verify_files(path, manifest.files)
        return cls(path, manifest)


def verify_files(root: Path, files: dict[str, Any]) -> None:
    for name, info in files.items():
        f = root / name
        if not f.is_file():
            raise BundleError(f"{f}: missing from the bundle")
        if f.stat().st_size != info["bytes"]:
            raise BundleError(f"{f}: truncated or altered ({f.stat().st_size} bytes, manifest says {info['bytes']})")
        if sha256_file(f) != info["sha256"]:
            raise BundleError(f"{f}: altered (sha256 does not match the manifest)")


def _extract(archive: Path) -> Path:
    target = Path(tempfile.mkdtemp(prefix="hiad-bundle-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")  # refuses absolute paths, links out, devices
    except (tarfile.TarError, OSError) as e:
        shutil.rmtree(target, ignore_errors=True)
        raise BundleError(f"{archive}: unreadable bundle archive ({e})") from e
    entries = [p for p in target.iterdir()]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else target
