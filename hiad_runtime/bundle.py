"""The deployment bundle: a directory with `manifest.json` and the files it lists (with sha256).

The manifest is the contract for every consumer (this runtime, a C program on ONNX Runtime's C API,
an HTTP service): geometry, preprocessing, graphs with their tensor names and shapes, per-task heads
with their files by role, post-processing, normalization, thresholds, parity figures. The typed
classes below are the schema: the writer builds them and the loader validates the whole JSON
against them, so a malformed manifest is refused with the field named. Every file's sha256 is
checked before anything is used; nothing is ever unpickled.
Every path in the manifest must stay inside the bundle folder, and an archive is measured before
anything is extracted from it (see docs/reliability.md).
"""

from __future__ import annotations

import atexit
import bz2
import gzip
import hashlib
import json
import lzma
import shutil
import tarfile
import tempfile
from dataclasses import asdict, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import IO, Annotated, Literal, Union

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from hiad_runtime.files import owned_tempdir, remove_stale, sha256_file
from hiad_runtime.geometry import Tiling
from hiad_runtime.postprocess import Normalization, PostprocessSpec
from hiad_runtime.tasks import Task

SCHEMA = "hiad-bundle"
SCHEMA_VERSION = 3  # 3: normalized outputs are no longer clipped to [0, 1] (#11)
MANIFEST = "manifest.json"
STRICT = ConfigDict(extra="forbid")

Dim = Union[Annotated[int, Field(ge=1)], Literal["batch"]]
RelPath = Annotated[str, Field(min_length=1)]
MAX_EXTRACT_BYTES = 8 << 30  # default cap on what one bundle archive may extract
EXTRACT_PREFIX = "hiad-bundle-"  # extraction folders in the temp folder: hiad-bundle-<pid>-<random>


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


class Precision(StrEnum):
    """An embedder graph's weights and activations (its inputs and outputs stay uint8 and float32)."""

    fp32 = "fp32"
    fp16 = "fp16"  # for GPU providers
    int8 = "int8"  # static QDQ, calibrated on training images: fastest on CPU


@dataclass(frozen=True, config=STRICT)
class EmbedderSpec:
    """uint8 RGB tiles (NHWC, tile_size) -> one or more float32 feature maps; mean/std inside."""

    graph: GraphSpec
    tile_size: list[Annotated[int, Field(ge=1)]]  # [width, height]
    precision: Precision = Precision.fp32  # of the graph's weights/activations; I/O types never change


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
    """One task: the tiles it scores, its head and the normalization of its scores."""

    name: str
    tiles: list[Annotated[int, Field(ge=0)]]  # tile indices; empty for retrieval tasks (routed at inference)
    head: HeadSpec
    normalization: Normalization | None = None  # from the validation set
    training: dict | None = None  # how the detector was trained and which epoch was selected

    @property
    def task(self) -> Task:
        """The task as the plan knows it: its name and its tiles."""
        return Task(self.name, tuple(self.tiles))


@dataclass(frozen=True, config=STRICT)
class ThumbnailSpec:
    """The whole-image thumbnail task: the size the image is shrunk to, its head and normalization."""

    size: list[Annotated[int, Field(ge=1)]]  # [width, height]; embedder "thumbnail"
    head: HeadSpec
    normalization: Normalization | None = None


@dataclass(frozen=True, config=STRICT)
class RoutingSpec:
    """Retrieval routing: the centres file and how a tile's key is computed."""

    centres: RelPath  # float32 .npy (k, D)
    key: str  # how a tile's key is computed


@dataclass(frozen=True, config=STRICT)
class PipelineSpec:
    """The whole-image graph: `image` uint8 (batch, H, W, 3) at image_size -> `anomaly_map`, `score`
    (+ `decision`, `mask` with thresholds). `metadata` is also in the graph (a C caller reads it
    there); `unsupported` says, instead of a graph, which step the graph cannot express."""

    graph: GraphSpec | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    unsupported: str | None = None


@dataclass(frozen=True, config=STRICT)
class FileInfo:
    """One listed file's sha256 and size, checked before the file is used."""

    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bytes: Annotated[int, Field(ge=0)]


@dataclass(frozen=True, config=STRICT)
class CheckpointRef:
    """The training checkpoint a bundle was exported from: its folder and checkpoint.json's sha256 then
    (`hiad-train update` on the bundle finds it here, and refuses it if it changed since)."""

    path: str
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


@dataclass(frozen=True, config=STRICT)
class LineageStep:
    """One `hiad-train update`: the bundle it updated (`parent`, its id as the service names it; None when
    there was none yet), how many normal images joined the model, where they came from, and when."""

    parent: str | None
    images_added: Annotated[int, Field(ge=0)]
    images: str
    date: str


@dataclass(frozen=True, config=STRICT)
class Manifest:
    """The whole `manifest.json`, validated field by field on load (see the module docstring)."""

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
    thresholds: dict | None = (
        None  # {"image": float|None, "pixel": float|None, "rules": {how each was set}} on the output scale
    )
    validation: dict | None = None  # metrics on the synthetic-anomaly validation set
    parity: dict | None = None
    pipeline: PipelineSpec | None = None  # the whole-image graph, or why there is none
    files: dict[str, FileInfo] = field(default_factory=dict)  # relative path -> sha256 and size
    checkpoint: CheckpointRef | None = None  # what it was exported from (absent before #23)
    lineage: list[LineageStep] = field(default_factory=list)  # `hiad-train update`s since the export, oldest first

    def to_dict(self) -> dict:
        """The manifest as plain JSON-ready data, what the writer dumps."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        """The manifest from parsed JSON; a malformed one raises ValidationError with the field named."""
        return _MANIFEST.validate_python(d)

    def heads(self) -> list[HeadSpec]:
        """Every scoring head: the tasks' in order, then the thumbnail's if there is one."""
        return [t.head for t in self.tasks] + ([self.thumbnail.head] if self.thumbnail else [])

    def referenced_files(self) -> list[str]:
        """Every file the manifest points to (each must be listed, with its sha256, in `files`)."""
        refs = [e.graph.file for e in self.embedders.values()]
        refs += [f for h in self.heads() for f in (h.graph.file, *h.files.values())]
        refs += [self.routing.centres] if self.routing else []
        refs += [self.pipeline.graph.file] if self.pipeline and self.pipeline.graph else []
        return [r for r in refs if r]

    @property
    def normalized(self) -> bool:
        """Scores min-max normalized by validation: 0..1 spans what validation saw (not clipped)."""
        return any(t.normalization is not None for t in self.tasks)

    @property
    def geometry(self) -> Tiling:
        """The tile geometry the manifest records."""
        return Tiling.from_dict(self.tiling)


_MANIFEST = TypeAdapter(Manifest)


def bundle_id(manifest: bytes) -> str:
    """What the service and a lineage call a bundle: the first 12 hex digits of its manifest.json's sha256
    (the bytes given) @ its `created`."""
    return f"{hashlib.sha256(manifest).hexdigest()[:12]}@{json.loads(manifest).get('created')}"


def _field_errors(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors()[:5])


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its folder and validated manifest; file paths are resolved inside the folder only."""

    root: Path
    manifest: Manifest

    def path(self, relative: str) -> Path:
        """The file `relative` to the bundle folder, refused if it would leave the folder."""
        return confined(self.root, relative)

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, max_extract_bytes: int = MAX_EXTRACT_BYTES) -> "Bundle":
        """Open a bundle directory (or a .tar/.tar.gz of one); check paths, validate the manifest, check every
        file's sha256.

        A published bundle (a symlink to its current version) is resolved once, so every file is read
        from the same version even if a new one is published meanwhile.
        """
        path = Path(path)
        if path.is_file() and tarfile.is_tarfile(path):
            folder = _extract(path, max_extract_bytes)
            try:
                return cls.load(folder, verify)
            except BaseException:
                remove_extraction(folder)
                raise
        path = path.resolve()
        manifest_file = confined(path, MANIFEST)
        if not manifest_file.is_file():
            raise BundleError(f"{path}: not a bundle (no {MANIFEST})")
        try:
            raw = json.loads(manifest_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{manifest_file}: unreadable manifest ({e})") from e
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            raise BundleError(f"{manifest_file}: not a {SCHEMA!r} manifest")
        if raw.get("schema_version") != SCHEMA_VERSION:
            hint = (
                " (written by an earlier hiad-export: re-export it from its checkpoint)"
                if raw.get("schema_version") in (1, 2)
                else ""
            )
            raise BundleError(
                f"{manifest_file}: schema_version {raw.get('schema_version')} is not supported "
                f"(this runtime reads {SCHEMA_VERSION}){hint}"
            )
        try:
            manifest = Manifest.from_dict(_without_engine_entries(raw, manifest_file))
            manifest.geometry  # the stored tiles must equal their recomputation
        except ValidationError as e:
            raise BundleError(f"{manifest_file}: malformed manifest: {_field_errors(e)}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{manifest_file}: malformed manifest: tiling: {e}") from None
        unlisted = [f for f in manifest.referenced_files() if f not in manifest.files]
        if unlisted:
            raise BundleError(f"{manifest_file}: refers to files without a checksum: {', '.join(unlisted)}")
        for name in manifest.files:
            confined(path, name)
        if verify:
            verify_files(path, manifest.files)
        return cls(path, manifest)


def _without_engine_entries(raw: dict, manifest_file: Path) -> dict:
    """The manifest without the `"engine": null` entries earlier exports wrote into every graph (TensorRT
    engine files, which no runtime path ever loaded or checked, are no longer part of a bundle); a graph
    that names an engine file is refused."""

    def graphs(node):
        if isinstance(node, dict):
            if "file" in node and "opset" in node:
                yield node
            for value in node.values():
                yield from graphs(value)
        elif isinstance(node, list):
            for value in node:
                yield from graphs(value)

    for graph in graphs(raw):
        if graph.get("engine") is not None:
            raise BundleError(
                f"{manifest_file}: graph {graph.get('file')!r} names a TensorRT engine file "
                f"({graph['engine']!r}), which this runtime does not load; re-export the bundle from its checkpoint"
            )
        graph.pop("engine", None)
    return raw


def confined(root: Path, name: str) -> Path:
    """`root / name`, refused unless `name` is relative, has no `..` and stays in `root` with symlinks followed.

    Runs before the file is opened or measured: a manifest must not make the runtime read (or
    reveal the size of) anything outside its bundle.
    """
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts:
        raise BundleError(
            f"{root}: manifest path {name!r} is absolute or contains '..'; refused (files must be inside the bundle)"
        )
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"{root}: manifest path {name!r} leads outside the bundle (through a symlink); refused")
    return path


def verify_files(root: Path, files: dict[str, FileInfo]) -> None:
    """Every listed file is inside `root` (checked for all first), present, and has its size and sha256."""
    for name in files:
        confined(root, name)
    for name, info in files.items():
        f = root / name
        if not f.is_file():
            raise BundleError(f"{f}: missing from the bundle")
        if f.stat().st_size != info.bytes:
            raise BundleError(f"{f}: truncated or altered ({f.stat().st_size} bytes, manifest says {info.bytes})")
        if sha256_file(f) != info.sha256:
            raise BundleError(f"{f}: altered (sha256 does not match the manifest)")


class _CappedStream:
    """A (decompressed) archive stream that refuses to be read or skipped past `limit` bytes.

    Tar has no index: listing a compressed archive means decompressing it, and a few kB of gzip can
    expand to terabytes. The cap bounds that work before a single file is written.
    """

    def __init__(self, stream: IO[bytes], limit: int, name: Path):
        self.stream, self.limit, self.name = stream, limit, name

    def _refuse(self) -> BundleError:
        return BundleError(f"{self.name}: the archive expands to more than {self.limit} bytes; refused")

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.limit + 1 - self.stream.tell()
        data = self.stream.read(size)
        if self.stream.tell() > self.limit:
            raise self._refuse()
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0 and offset > self.limit:
            raise self._refuse()
        return self.stream.seek(offset, whence)

    def tell(self) -> int:
        return self.stream.tell()


def _decompressed(raw: IO[bytes]) -> IO[bytes]:
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw)
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


_EXTRACTED: set[Path] = set()  # this process's extraction folders, until removed


def remove_extraction(root: Path) -> None:
    """Delete the folder that a .tar bundle with this root was extracted into; nothing for any other folder."""
    root = Path(root).resolve()
    for folder in (root, root.parent):
        if folder in _EXTRACTED:
            _EXTRACTED.discard(folder)
            shutil.rmtree(folder, ignore_errors=True)


@atexit.register
def remove_extractions() -> None:
    """Delete every extraction of this process (at exit; a server that stops on a signal calls it itself)."""
    for folder in list(_EXTRACTED):
        remove_extraction(folder)


def _extract(archive: Path, max_bytes: int) -> Path:
    """Extract into `<tmp>/hiad-bundle-<pid>-...` after measuring it: the sum of member sizes must fit
    `max_bytes` and the free space. Removed at exit or by `remove_extraction`; a killed process's folder
    goes on the next start."""
    parent = Path(tempfile.gettempdir())
    remove_stale(parent, EXTRACT_PREFIX)
    try:
        with (
            open(archive, "rb") as raw,
            tarfile.open(
                fileobj=_CappedStream(_decompressed(raw), max_bytes + max_bytes // 16 + (1 << 20), archive), mode="r:"
            ) as tar,
        ):
            members = tar.getmembers()
            total = sum(m.size for m in members if m.isreg())
            if total > max_bytes:
                raise BundleError(
                    f"{archive}: would extract {total} bytes, more than the limit of {max_bytes}; refused"
                )
            free = shutil.disk_usage(parent).free
            if total > free:
                raise BundleError(f"{archive}: would extract {total} bytes but {parent} has {free} free; refused")
            target = owned_tempdir(parent, EXTRACT_PREFIX).resolve()
            _EXTRACTED.add(target)
            try:
                tar.extractall(target, members, filter="data")  # refuses absolute paths, links out, devices
            except BaseException:
                remove_extraction(target)
                raise
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError) as e:
        raise BundleError(f"{archive}: unreadable bundle archive ({e})") from e
    entries = [p for p in target.iterdir()]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else target
