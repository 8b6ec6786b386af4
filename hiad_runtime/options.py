"""How an Inspector runs a bundle: one options object, shared by `predict`, `bench`, `serve` and the library.

Each concept's names are its library enum (Backend, HeadPath, EngineKind), which the CLIs import; the
values are checked here, once, with the valid names in the message. What depends on the device is left
'auto' (None for the batch) and settled by `resolved` once the backend has been chosen (the Inspector
does it): on a GPU every head's graph and a whole chunk of tiles per embedder call, on a CPU the native
heads and one tile per call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from hiad_runtime.backends import Backend
from hiad_runtime.engines.base import EngineKind
from hiad_runtime.heads import HeadPath, resolve_head_path


def _member(kind: type[StrEnum], value, what: str):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not one of {[m.value for m in kind]}") from None


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a bundle: backend, engine, head path, batching, memory, threads, limits and thresholds.
    Values are checked on construction: a ValueError names the bad field (and an enum's valid names)."""

    backend: Backend = Backend.auto  # what runs the graphs ('auto': hiad_runtime/backends resolves it)
    head_path: HeadPath = HeadPath.auto  # tiles engine: a head kind's fast path, or every head's graph
    engine: EngineKind = EngineKind.tiles  # stage by stage, or the bundle's whole-image graph
    batch_size: int | None = None  # tiles per embedder call (None: 1 on a CPU, stream_tiles on a GPU)
    stream_tiles: int = 16  # tiles embedded and scored per chunk (memory on large images)
    head_memory: float | None = None  # MB of task heads kept loaded (None: a quarter of the memory available)
    threads: int = 0  # intra-op threads per session (0: the backend's default, one per core)
    max_pixels: int | None = None  # larger declared inputs are refused (None: 4x the bundle's image area)
    image_threshold: float | None = None  # overrides the bundle's
    pixel_threshold: float | None = None  # overrides the bundle's
    providers: tuple[str, ...] | None = None  # ONNX Runtime execution providers, best first (None: the best present)

    def __post_init__(self):
        for name, kind, what in (
            ("backend", Backend, "backend"),
            ("head_path", HeadPath, "head path"),
            ("engine", EngineKind, "engine"),
        ):
            object.__setattr__(self, name, _member(kind, getattr(self, name), what))
        if self.head_memory is not None and not self.head_memory > 0:
            raise ValueError(f"head_memory must be > 0 MB, got {self.head_memory}")
        limits = {
            "batch_size": self.batch_size is None or self.batch_size >= 1,
            "stream_tiles": self.stream_tiles >= 1,
            "threads": self.threads >= 0,
            "max_pixels": self.max_pixels is None or self.max_pixels > 0,
        }
        wrong = [f"{name}={getattr(self, name)}" for name, ok in limits.items() if not ok]
        if wrong:
            raise ValueError(f"runtime options out of range: {', '.join(wrong)}")

    def resolved(self, backend: Backend, on_gpu: bool) -> "RuntimeOptions":
        """These options as they run with `backend` (resolved), on a GPU (`on_gpu`) or not: head path 'auto'
        -> onnx on a GPU (faiss is the CPU build here; the features stay on the device), else native; batch
        None -> a chunk's tiles per embedder call on a GPU (it wants large batches), else 1 (fastest on a CPU)."""
        batch = self.batch_size or (self.stream_tiles if on_gpu else 1)
        return replace(self, backend=backend, head_path=resolve_head_path(self.head_path, on_gpu), batch_size=batch)
