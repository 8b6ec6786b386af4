"""OpenVINO as a backend for the bundle's ONNX graphs (Intel/AMD CPUs): the same files, read directly.

`pip install 'hiad-deploy[openvino]'`. A compiled model is wrapped to answer like an ONNX Runtime
session (`run(None, feeds) -> [outputs]`, `get_providers()`), so embedders and heads do not care
which backend runs them.
"""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path
from typing import Sequence

import numpy as np

from hiad_runtime.bundle import BundleError


@cache
def _core():
    """OpenVINO's core, imported and made on first use: the runtime runs without OpenVINO installed."""
    try:
        import openvino as ov
    except ImportError as e:
        raise ImportError("--backend openvino needs OpenVINO: pip install 'hiad-deploy[openvino]'") from e
    return ov.Core()


class OpenVinoBackend:
    """OpenVINO sessions for the CPU (execution providers do not apply)."""

    on_gpu = False

    def __init__(self, providers: Sequence[str] | None = None, threads: int = 0):
        self.threads = threads
        _core()

    def create(self, path: Path, arena: bool = False) -> "OpenVinoSession":
        """An OpenVINO session for the graph at `path` (`arena` does not apply)."""
        return OpenVinoSession(path, self.threads)


class OpenVinoSession:
    """One ONNX graph compiled by OpenVINO for the CPU (latency hint: one image at a time)."""

    def __init__(self, path: Path, threads: int = 0):
        # f32: OpenVINO may otherwise pick bf16/fp16 on CPUs that have them, and parity would not hold.
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            core = _core()
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except RuntimeError as e:
            raise BundleError(f"{path}: OpenVINO cannot load this graph ({e})") from e
        self.requests = threading.local()  # an infer request is not thread-safe: one per calling thread

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """ONNX Runtime's contract: the named outputs in that order, or all of them for None."""
        results = self._request().infer(feeds)
        ports = self.compiled.outputs if output_names is None else [self.compiled.output(n) for n in output_names]
        # The request reuses its output buffers on the next call: hand out copies.
        return [np.array(results[port]) for port in ports]

    def run_into(self, feeds: dict[str, np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        """Run, writing every output (in the graph's order) straight into the given C-contiguous float32
        arrays: no copy of what OpenVINO computes (an embedder's chunk is 32 MB at 16 tiles of 512)."""
        import openvino as ov

        request = self._request("into")
        for i, out in enumerate(outputs):
            request.set_output_tensor(i, ov.Tensor(out, shared_memory=True))
        self.requests.bound = outputs  # alive while the request points at them (until the next call rebinds)
        request.infer(feeds)

    def _request(self, kind: str = "run"):
        """This thread's infer request of `kind` (a request is not thread-safe). `run_into` has its own: its
        outputs point into the caller's arrays, which `run` must never write."""
        request = getattr(self.requests, kind, None)
        if request is None:
            request = self.compiled.create_infer_request()
            setattr(self.requests, kind, request)
        return request

    @staticmethod
    def get_providers() -> list[str]:
        """What `SessionFactory` records as the provider in use."""
        return ["OpenVINO:CPU"]
