"""The deployment bundle: a directory with `manifest.json` and the files it lists (with sha256).

The manifest is the contract for every consumer (this runtime, a C program on ONNX Runtime's C API,
an HTTP service): geometry, preprocessing, graphs with their tensor names and shapes, per-task heads
with their files by role, post-processing, normalization, thresholds, parity figures. The typed
classes below are the schema: the writer builds them and the loader validates the whole JSON
against them, so a malformed manifest is refused with the field named. Every file's sha256 is
checked before anything is used; nothing is ever unpickled.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tarfile
import tempfile
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from hiad_runtime.files import sha256_file
from hiad_runtime.geometry import Tiling
from hiad_runtime.postprocess import Normalization, PostprocessSpec
from hiad_runtime.tasks import Task

SCHEMA = "hiad-bundle"
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
STRICT = ConfigDict(extra="forbid")

Dim = Union[Annotated[int, Field(ge=1)], Literal["batch"]]
RelPath = Annotated[str, Field(min_length=1)]


class BundleError(RuntimeError):
    """A bundle that cannot be used as it is; the message names the file and what is wrong."""


@dataclass(frozen=True, config=STRICT)
class TensorSpec:
    """One graph input or output: name, element type, shape ('batch' marks the dynamic axis)."""

    name: str
    dtype: Literal["uint8", "float32", "bool", "int64"]
    shape: list[Dim]


@dataclass(frozen=True, config=STRICT)
class GraphSpec:
    """One ONNX graph and its tensors, in call order."""

    file: RelPath
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    engine: RelPath | None = None  # TensorRT engine built from this graph, when one was built


@dataclass(frozen=True, config=STRICT)
class EmbedderSpec:
    """uint8 RGB tiles (NHWC, tile_size) -> one or more float32 feature maps; mean/std inside."""

    graph: GraphSpec
    tile_size: list[Annotated[int, Field(ge=1)]]  # [width, height]
    precision: Literal["fp32", "fp16", "int8"] = "fp32"  # of the graph's weights/activations; I/O types never change


@dataclass(frozen=True, config=STRICT)
class HeadSpec:
    """A task's scoring head: the embedder's outputs -> score grid (batch, h, w).

    `kind` picks how the runtime may run it: every kind runs `graph` (the portable path, what a C
    program runs); kind 'knn' also has a native path (faiss `files['index']`, exact re-ranking against
    `files['bank']`) with `params` k, index_factory, search_params.
    """

    kind: Literal["onnx", "knn"]
    embedder: str
    graph: GraphSpec
    files: dict[str, RelPath] = field(default_factory=dict)  # role -> file
    params: dict = field(default_factory=dict)  # the kind's parameters and facts (e.g. bytes)


@dataclass(frozen=True, config=STRICT)
class TaskSpec:
    name: str
    tiles: list[Annotated[int, Field(ge=0)]]  # tile indices; empty for retrieval tasks (routed at inference)
    head: HeadSpec
    normalization: Normalization | None = None  # from the validation set
    training: dict | None = None  # how the detector was trained and which epoch was selected

    @property
    def task(self) -> Task:
        return Task(self.name, tuple(self.tiles))


@dataclass(frozen=True, config=STRICT)
class ThumbnailSpec:
    size: list[Annotated[int, Field(ge=1)]]  # [width, height]; embedder "thumbnail"
    head: HeadSpec
    normalization: Normalization | None = None


@dataclass(frozen=True, config=STRICT)
class RoutingSpec:
    centres: RelPath  # float32 .npy (k, D)
    key: str  # how a tile's key is computed


@dataclass(frozen=True, config=STRICT)
class FileInfo:
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bytes: Annotated[int, Field(ge=0)]


@dataclass(frozen=True, config=STRICT)
class Manifest:
    schema: Literal["hiad-bundle"]
    schema_version: int
    producer: str
    created: str
    detector: str
    tiling: dict
    fusion_weights: list[float]
    preprocessing: dict
    embedders: dict[str, EmbedderSpec]
    tasks: list[TaskSpec]
    postprocess: PostprocessSpec
    routing: RoutingSpec | None = None
    thumbnail: ThumbnailSpec | None = None
    thresholds: dict | None = None  # {"image": float|None, "pixel": float|None} on the output scale
    validation: dict | None = None  # metrics on the synthetic-anomaly validation set
    parity: dict | None = None
    files: dict[str, FileInfo] = field(default_factory=dict)  # relative path -> sha256 and size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return _MANIFEST.validate_python(d)

    def heads(self) -> list[HeadSpec]:
        return [t.head for t in self.tasks] + ([self.thumbnail.head] if self.thumbnail else [])

    def referenced_files(self) -> list[str]:
        """Every file the manifest points to (each must be listed, with its sha256, in `files`)."""
        refs = [f for e in self.embedders.values() for f in (e.graph.file, e.graph.engine)]
        refs += [f for h in self.heads() for f in (h.graph.file, *h.files.values())]
        refs += [self.routing.centres] if self.routing else []
        return [r for r in refs if r]

    @property
    def geometry(self) -> Tiling:
        return Tiling.from_dict(self.tiling)


_MANIFEST = TypeAdapter(Manifest)


def _field_errors(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors()[:5])


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    def path(self, relative: str) -> Path:
        return self.root / relative

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        """Open a bundle directory (or a .tar of one); validate the manifest, check every file's sha256."""
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
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            raise BundleError(f"{manifest_file}: not a {SCHEMA!r} manifest")
        if raw.get("schema_version") != SCHEMA_VERSION:
            hint = " (written by an earlier hiad-export: re-export it from its checkpoint)" if raw.get("schema_version") == 1 else ""
            raise BundleError(
                f"{manifest_file}: schema_version {raw.get('schema_version')} is not supported "
                f"(this runtime reads {SCHEMA_VERSION}){hint}"
            )
        try:
            manifest = Manifest.from_dict(raw)
            manifest.geometry  # the stored tiles must equal their recomputation
        except ValidationError as e:
            raise BundleError(f"{manifest_file}: malformed manifest: {_field_errors(e)}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{manifest_file}: malformed manifest: tiling: {e}") from None
        unlisted = [f for f in manifest.referenced_files() if f not in manifest.files]
        if unlisted:
            raise BundleError(f"{manifest_file}: refers to files without a checksum: {', '.join(unlisted)}")
        if verify:
            verify_files(path, manifest.files)
        return cls(path, manifest)


def verify_files(root: Path, files: dict[str, FileInfo]) -> None:
    for name, info in files.items():
        f = root / name
        if not f.is_file():
            raise BundleError(f"{f}: missing from the bundle")
        if f.stat().st_size != info.bytes:
            raise BundleError(f"{f}: truncated or altered ({f.stat().st_size} bytes, manifest says {info.bytes})")
        if sha256_file(f) != info.sha256:
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
