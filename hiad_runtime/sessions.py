"""ONNX Runtime sessions, created once per graph with tuned options and the best providers present."""

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


def available_providers(requested: Sequence[str] | None = None) -> list[str]:
    offered = ort.get_available_providers()
    wanted = requested or PREFERRED_PROVIDERS
    chosen = [p for p in wanted if p in offered]
    if not chosen:
        raise RuntimeError(f"none of the providers {list(wanted)} is available (this build offers {offered})")
    return chosen


class SessionFactory:
    """Creates sessions with one set of options; records which providers each session really uses."""

    def __init__(self, providers: Sequence[str] | None = None, intra_op_threads: int = 0):
        self.providers = available_providers(providers)
        self.options = ort.SessionOptions()
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.options.intra_op_num_threads = intra_op_threads  # 0 = one per physical core
        self.options.log_severity_level = 3
        self.options.enable_cpu_mem_arena = False  # an arena per session would keep each peak allocated
        # Idle ORT threads must not spin: faiss (OpenMP) runs right after on the same cores.
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.in_use: set[str] = set()

    def create(self, path: Path) -> ort.InferenceSession:
        try:
            session = ort.InferenceSession(str(path), self.options, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"{path}: ONNX Runtime cannot load this graph ({e})") from e
        self.in_use.update(session.get_providers())
        return session
