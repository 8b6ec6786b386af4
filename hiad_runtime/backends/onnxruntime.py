"""ONNX Runtime as a backend: tuned session options and the best execution providers present.

Memory arena: ONNX Runtime's CPU arena keeps each session's peak allocation for reuse. It is on for
embedders (one or two sessions, and they run about 1.5x faster with it) and off for heads (one per
task: 16+ arenas would each hold their peak)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Sequence

try:
    import onnxruntime as ort
except ImportError as e:  # the base package pulls neither build on purpose
    raise ImportError(
        "hiad_runtime needs ONNX Runtime: pip install 'hiad-deploy[cpu]' (or '[gpu]' on a CUDA box)"
    ) from e

from hiad_runtime.bundle import BundleError

# Best first; only those this onnxruntime build offers are used. TensorRT's provider is never taken by
# default: no parity check has run it (docs/bundle.md "TensorRT" says how to name it).
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def offered_providers() -> list[str]:
    """The execution providers this onnxruntime build offers."""
    return ort.get_available_providers()


def available_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The providers asked for (default: PREFERRED_PROVIDERS) that this build offers, in that order."""
    offered = offered_providers()
    wanted = requested or PREFERRED_PROVIDERS
    chosen = [p for p in wanted if p in offered]
    if not chosen:
        raise RuntimeError(f"none of the providers {list(wanted)} is available (this build offers {offered})")
    return chosen


@cache
def preload_cuda() -> None:
    """Load CUDA and cuDNN before the first CUDA session: from the nvidia pip packages beside onnxruntime where
    they are (`pip install 'onnxruntime-gpu[cuda,cudnn]'`), else from the system's library path."""
    if hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21
        ort.preload_dlls()


class OnnxRuntimeBackend:
    """ONNX Runtime sessions with one set of options and providers."""

    def __init__(self, providers: Sequence[str] | None = None, threads: int = 0):
        self.providers = available_providers(providers)
        self.threads = threads
        self.on_gpu = self.providers[0] in GPU_PROVIDERS  # the graphs run on a GPU (the rest is CPU fallback)
        if self.on_gpu:
            preload_cuda()

    def options(self, arena: bool) -> ort.SessionOptions:
        """Session options: full graph optimization, no spinning idle threads, the CPU arena only where asked."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads  # 0 = one per physical core
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = arena
        # Idle ORT threads must not spin: faiss (OpenMP) runs right after on the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def create(self, path: Path, arena: bool = False) -> ort.InferenceSession:
        """An ONNX Runtime session for the graph at `path`; a graph it cannot load is a BundleError naming the file."""
        try:
            return ort.InferenceSession(str(path), self.options(arena), providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"{path}: ONNX Runtime cannot load this graph ({e})") from e


def device_of(session) -> tuple[str, int] | None:
    """Where a session's I/O binding keeps tensors: ('cuda', device id) on a GPU provider, else ('cpu', 0);
    None for a session that does not bind (not ONNX Runtime's)."""
    if not isinstance(session, ort.InferenceSession):
        return None
    provider = session.get_providers()[0]
    if provider not in GPU_PROVIDERS:
        return "cpu", 0
    return "cuda", int(session.get_provider_options().get(provider, {}).get("device_id", 0))
