"""The bundle's whole-image graph (`pipeline.onnx`) as an engine: one `session.run` per image.

It computes in one graph what the tile engine does stage by stage; export proves the two agree.
"""

from __future__ import annotations

import time

import numpy as np

from hiad_runtime.backends import SessionFactory
from hiad_runtime.bundle import Bundle, BundleError


class PipelineEngine:
    """uint8 (H, W, 3) RGB at image_size -> (anomaly_map float32 (H, W), score float, timings)."""

    stages = ("pipeline",)
    heads = None  # inside the graph

    def __init__(self, bundle: Bundle, sessions: SessionFactory):
        spec = bundle.manifest.pipeline
        if spec is None:
            raise BundleError(f"{bundle.root}: the bundle has no pipeline graph (exported before it existed)")
        if spec.graph is None:
            raise BundleError(f"{bundle.root}: no pipeline graph: {spec.unsupported}")
        self.session = sessions.create(bundle.path(spec.graph.file))
        self.input_name = spec.graph.inputs[0].name

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, float, dict[str, float]]:
        """(anomaly map (H, W), score, {"pipeline": seconds}) from one run of the whole-image graph."""
        t0 = time.perf_counter()
        feeds = {self.input_name: np.ascontiguousarray(image)[None]}
        anomaly_map, score = self.session.run(["anomaly_map", "score"], feeds)
        return anomaly_map[0], float(score[0]), {"pipeline": time.perf_counter() - t0}
