"""How much memory the whole-image graph needs, known before it is built.

The pipeline graph embeds every tile of the image in one batch and scores them all in one
`session.run`, so its working set grows with the tile count: with the demo's PatchCore about 1 GB at
2048^2 (16 tiles), 4 GB at 4096^2 and 16 GB at 8192^2 (256 tiles). Building it (`torch.onnx.export`
runs the forward pass to trace it) and proving it (one ONNX Runtime run per parity image) each need
about that much, so the exporter decides before either.

The estimate runs the forward pass on PyTorch's `meta` device (shapes, no data: seconds even at
8192^2) and records the peak of the bytes held by live tensors, plus the graph's constants. At 2048^2
and 4096^2 the export's tracing took 94-99 % of it and the ONNX Runtime run 75-94 %
(docs/benchmarks.md, "8192^2 end to end").
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PIPELINE_MEMORY_MB = 4096  # default budget for building and checking the graph (`hiad-export --pipeline-memory`)
MB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage an op creates until its last tensor dies; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.tensors: dict[int, int] = {}  # storage -> live tensors on it
        self.sizes: dict[int, int] = {}  # storage -> bytes
        self.live = self.peak = 0

    def _release(self, storage: int) -> None:
        self.tensors[storage] -= 1
        if self.tensors[storage] == 0:
            del self.tensors[storage]
            self.live -= self.sizes.pop(storage)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata  # the storage itself, shared by its views
                if key not in self.tensors:
                    self.tensors[key] = 0
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                self.tensors[key] += 1
                weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.live)
        return out


@dataclass(frozen=True)
class PipelineCost:
    """What the whole-image graph costs, estimated before it is built."""

    activations: int  # bytes: peak of live tensors in one forward pass of one image
    constants: int  # bytes: weights and buffers, about the size of pipeline.onnx

    @property
    def total_mb(self) -> int:
        return -(-(self.activations + self.constants) // MB)

    def describe(self) -> str:
        return (
            f"about {self.total_mb} MB to build and run ({self.activations / MB:.0f} MB of tensors at its peak, "
            f"{self.constants / MB:.0f} MB of weights: pipeline.onnx)"
        )


def pipeline_cost(pipeline: nn.Module, image_size: tuple[int, int]) -> PipelineCost:
    """Run `pipeline` on a meta-device image of `image_size` (w, h) with meta copies of its weights."""
    state = {**dict(pipeline.named_parameters()), **dict(pipeline.named_buffers())}
    constants = sum(t.numel() * t.element_size() for t in state.values())
    meta = {name: torch.empty_like(t, device="meta") for name, t in state.items()}
    width, height = image_size
    with torch.no_grad(), LiveTensorBytes() as counter:
        image = torch.empty(1, height, width, 3, dtype=torch.uint8, device="meta")  # counted: live all along
        torch.func.functional_call(pipeline, meta, (image,))
    return PipelineCost(counter.peak, constants)
