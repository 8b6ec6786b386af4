"""OpenVINO as a backend for the bundle's ONNX graphs (Intel/AMD CPUs): the same files, read directly.

`pip install 'hiad-deploy[openvino]'`. A compiled model is wrapped to answer like an ONNX Runtime
session (`run(None, feeds) -> [outputs]`, `get_providers()`), so embedders and heads do not care
which backend runs them.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

try:
    import openvino as ov
except ImportError as e:
    raise ImportError("--backend openvino needs OpenVINO: pip install 'hiad-deploy[openvino]'") from e

from hiad_runtime.bundle import BundleError

_CORE = ov.Core()


class OpenVinoSession:
    """One ONNX graph compiled by OpenVINO for the CPU (latency hint: one image at a time)."""

    def __init__(self, path: Path, threads: int = 0):
        # f32: OpenVINO may otherwise pick bf16/fp16 on CPUs that have them, and parity would not hold.
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.compiled = _CORE.compile_model(_CORE.read_model(str(path)), "CPU", config)
        except RuntimeError as e:
            raise BundleError(f"{path}: OpenVINO cannot load this graph ({e})") from e
        self.requests = threading.local()  # an infer request is not thread-safe: one per calling thread

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """ONNX Runtime's contract: the named outputs in that order, or all of them for None."""
        request = getattr(self.requests, "request", None)
        if request is None:
            request = self.requests.request = self.compiled.create_infer_request()
        results = request.infer(feeds)
        ports = self.compiled.outputs if output_names is None else [self.compiled.output(n) for n in output_names]
        # The request reuses its output buffers on the next call: hand out copies.
        return [np.array(results[port]) for port in ports]

    @staticmethod
    def get_providers() -> list[str]:
        return ["OpenVINO:CPU"]
