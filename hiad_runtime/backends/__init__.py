"""What runs a bundle's ONNX graphs: a table of backends, one class each behind one protocol.

A backend makes a session per graph (`run(output_names, feeds) -> [outputs]`, `get_providers()`):
ONNX Runtime (tuned options, the best providers present) or OpenVINO on the same ONNX files. 'auto'
is resolved here and nowhere else (`resolve_backend`): ONNX Runtime on its CUDA provider when this
onnxruntime build offers it (`pip install 'hiad-deploy[gpu]'`); on a CPU-only box OpenVINO when it is
installed (on this project's 2-core CPU it runs the embedder 1.37x faster at the same parity, 1e-6 of the
map's range; docs/benchmarks.md "Edge speed"), else ONNX Runtime. Whether the graphs then run on a GPU
(`SessionFactory.on_gpu`) decides the device-dependent defaults (`RuntimeOptions.resolved`). Adding a
backend is one class (a module here) and one entry in `BACKENDS` (and `Backend`).
"""

from __future__ import annotations

import importlib.util
from enum import StrEnum
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from hiad_runtime.backends.onnxruntime import OnnxRuntimeBackend, offered_providers
from hiad_runtime.backends.openvino import OpenVinoBackend


class Backend(StrEnum):
    """What runs the ONNX graphs: ONNX Runtime (its best providers present) or OpenVINO (Intel/AMD CPUs)."""

    auto = "auto"
    onnxruntime = "onnxruntime"
    openvino = "openvino"


class Session(Protocol):
    """One graph, ready to run: ONNX Runtime's contract."""

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The named outputs in that order (all of them for None) for one batch of `feeds`."""

    def get_providers(self) -> list[str]:
        """The execution providers this session really runs on."""


class SessionMaker(Protocol):
    """A backend: made once with the providers asked for and the thread count, then one session per graph.
    `arena`: the few hot, large-activation graphs (embedders) keep their peak allocation for reuse."""

    on_gpu: bool  # whether its sessions run the graphs on a GPU

    def __init__(self, providers: Sequence[str] | None, threads: int): ...

    def create(self, path: Path, arena: bool) -> Session:
        """A session for the graph at `path`; `arena` keeps its peak allocation for reuse."""


BACKENDS: dict[Backend, type[SessionMaker]] = {
    Backend.onnxruntime: OnnxRuntimeBackend,
    Backend.openvino: OpenVinoBackend,
}


def resolve_backend(backend: str, providers: Sequence[str] | None = None) -> Backend:
    """'auto' -> onnxruntime where its CUDA provider is offered or providers were asked for, else openvino
    where it is installed, else onnxruntime; any other name as it is (checked)."""
    backend = as_backend(backend)
    if backend is not Backend.auto:
        return backend
    cpu_only = not providers and "CUDAExecutionProvider" not in offered_providers()
    return Backend.openvino if cpu_only and importlib.util.find_spec("openvino") else Backend.onnxruntime


def as_backend(name: str) -> Backend:
    """The `Backend` called `name`, or a ValueError listing the valid names."""
    try:
        return Backend(name)
    except ValueError:
        raise ValueError(f"backend {name!r} is not one of {[b.value for b in Backend]}") from None


class SessionFactory:
    """Creates sessions with one backend and one set of options; records which providers each really uses."""

    def __init__(self, providers: Sequence[str] | None = None, threads: int = 0, backend: str = "auto"):
        self.backend = resolve_backend(backend, providers)
        self.maker = BACKENDS[self.backend](providers, threads)
        self.in_use: set[str] = set()

    @property
    def on_gpu(self) -> bool:
        """Whether the sessions run the graphs on a GPU (CUDA, or TensorRT where named)."""
        return self.maker.on_gpu

    def create(self, path: Path, arena: bool = False) -> Session:
        """A session for one graph; `arena` for the few hot, large-activation graphs (embedders)."""
        session = self.maker.create(path, arena)
        self.in_use.update(session.get_providers())
        return session
