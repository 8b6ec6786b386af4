"""Inference sessions, created once per graph: ONNX Runtime (tuned options, best providers present) or,
with backend 'openvino', OpenVINO on the same ONNX files.

Memory arena: ONNX Runtime's CPU arena keeps each session's peak allocation for reuse. It is on for
embedders (one or two sessions, and they run about 1.5x faster with it) and off for heads (one per
task: 16+ arenas would each hold their peak)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

try:
    import onnxruntime as ort
except ImportError as e:  # the base package pulls neither build on purpose
    raise ImportError("hiad_runtime needs ONNX Runtime: pip install 'hiad-deploy[cpu]' (or '[gpu]' on a CUDA box)") from e

from hiad_runtime.bundle import BundleError

# Best first; only those this onnxruntime build offers are used.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
BACKENDS = ("onnxruntime", "openvino")


def available_providers(requested: Sequence[str] | None = None) -> list[str]:
    offered = ort.get_available_providers()
    wanted = requested or PREFERRED_PROVIDERS
    chosen = [p for p in wanted if p in offered]
    if not chosen:
        raise RuntimeError(f"none of the providers {list(wanted)} is available (this build offers {offered})")
    return chosen


class SessionFactory:
    """Creates sessions with one set of options; records which providers each session really uses."""

    def __init__(self, providers: Sequence[str] | None = None, intra_op_threads: int = 0, backend: str = "onnxruntime"):
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
        self.backend = backend
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
