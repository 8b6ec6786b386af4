"""Inference sessions, created once per graph: ONNX Runtime (tuned options, best providers present) or
OpenVINO on the same ONNX files. Backend 'auto' (the default) takes OpenVINO on a box whose ONNX
Runtime offers no GPU provider, when OpenVINO is installed: on this project's 2-core CPU it runs the
embedder 1.37x faster at the same parity (1e-6 of the map's range; docs/benchmarks.md "Edge speed").

Memory arena: ONNX Runtime's CPU arena keeps each session's peak allocation for reuse. It is on for
embedders (one or two sessions, and they run about 1.5x faster with it) and off for heads (one per
task: 16+ arenas would each hold their peak)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

try:
    import onnxruntime as ort
except ImportError as e:  # the base package pulls neither build on purpose
    raise ImportError("hiad_runtime needs ONNX Runtime: pip install 'hiad-deploy[cpu]' (or '[gpu]' on a CUDA box)") from e

from hiad_runtime.bundle import BundleError

# Best first; only those this onnxruntime build offers are used. TensorRT's provider is never taken by
# default: no parity check has run it (docs/bundle.md "TensorRT" says how to name it).
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
BACKENDS = ("auto", "onnxruntime", "openvino")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def resolve_backend(backend: str, providers: Sequence[str] | None = None) -> str:
    """'auto' -> 'openvino' on a CPU-only box where it is installed and no providers were asked for,
    else 'onnxruntime'; any other name as it is (checked)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    on_gpu = any(p in ort.get_available_providers() for p in GPU_PROVIDERS)
    return "openvino" if not providers and not on_gpu and importlib.util.find_spec("openvino") else "onnxruntime"


def available_providers(requested: Sequence[str] | None = None) -> list[str]:
    offered = ort.get_available_providers()
    wanted = requested or PREFERRED_PROVIDERS
    chosen = [p for p in wanted if p in offered]
    if not chosen:
        raise RuntimeError(f"none of the providers {list(wanted)} is available (this build offers {offered})")
    return chosen


class SessionFactory:
    """Creates sessions with one set of options; records which providers each session really uses."""

    def __init__(self, providers: Sequence[str] | None = None, intra_op_threads: int = 0, backend: str = "auto"):
        self.backend = backend = resolve_backend(backend, providers)
        self.providers = available_providers(providers) if backend == "onnxruntime" else []
        self.threads = intra_op_threads
        self.in_use: set[str] = set()

    def options(self, arena: bool) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads  # 0 = one per physical core
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = arena
        # Idle ORT threads must not spin: faiss (OpenMP) runs right after on the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def create(self, path: Path, arena: bool = False):
        """A session for one graph; `arena` for the few hot, large-activation graphs (embedders)."""
        if self.backend == "openvino":
            from hiad_runtime.openvino_backend import OpenVinoSession

            session = OpenVinoSession(path, self.threads)
        else:
            try:
                session = ort.InferenceSession(str(path), self.options(arena), providers=self.providers)
            except Exception as e:  # onnxruntime raises its own exception types
                raise BundleError(f"{path}: ONNX Runtime cannot load this graph ({e})") from e
        self.in_use.update(session.get_providers())
        return session
