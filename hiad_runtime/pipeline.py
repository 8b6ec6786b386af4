"""The bundle's whole-image graph (`pipeline.onnx`) as an engine: one `session.run` per image.

It computes in one graph what the Inspector's default engine does stage by stage; export proves the
two agree. The image must already be decoded and resized to the bundle's image_size.
"""

from __future__ import annotations

import numpy as np

from hiad_runtime.bundle import Bundle, BundleError
from hiad_runtime.sessions import SessionFactory


class PipelineGraph:
    """uint8 (H, W, 3) RGB at image_size -> (anomaly_map float32 (H, W), score float)."""

    def __init__(self, bundle: Bundle, sessions: SessionFactory):
        spec = bundle.manifest.pipeline
        if spec is None:
            raise BundleError(f"{bundle.root}: the bundle has no pipeline graph (exported before it existed)")
        if spec.graph is None:
            raise BundleError(f"{bundle.root}: no pipeline graph: {spec.unsupported}")
        self.session = sessions.create(bundle.path(spec.graph.file))
        self.input_name = spec.graph.inputs[0].name

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        anomaly_map, score = self.session.run(["anomaly_map", "score"], {self.input_name: np.ascontiguousarray(image)[None]})
        return anomaly_map[0], float(score[0])
