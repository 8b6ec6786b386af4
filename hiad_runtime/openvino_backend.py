"""OpenVINO as a backend for the bundle's ONNX graphs (Intel/AMD CPUs): the same files, read directly.

`pip install 'hiad-deploy[openvino]'`. A compiled model is wrapped to answer like an ONNX Runtime
session (`run(None, feeds) -> [outputs]`, `get_providers()`), so embedders and heads do not care
which backend runs them.
"""

from __future__ import annotations

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
        self.request = self.compiled.create_infer_request()

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feeds)
        # The request reuses its output buffers on the next call: hand out copies.
        return [np.array(results[port]) for port in self.compiled.outputs]

    @staticmethod
    def get_providers() -> list[str]:
        return ["OpenVINO:CPU"]
