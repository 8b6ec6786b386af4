"""A chunk's embedder outputs kept where the sessions run them: ONNX Runtime I/O binding, on any device.

On a GPU, copying each chunk's features to the host and back for every head (16 tiles x 128 x 64 x 64
floats: 32 MB per chunk at 512-px tiles) costs about what the heads do. So the embedder writes its outputs
straight into tensors on its session's device (`Features.allocate`, each batch bound by address), and a
head's graph reads the rows of the tiles it scores from there (`bind_rows`: a contiguous run of rows of an
NCHW tensor is one block of memory, bound by address, not copied). Rows that are not contiguous, the plan's
host-side work (fusion with context windows, routing keys) and native heads (faiss) read `numpy()`, a host
copy made once per chunk (on the CPU provider the tensors are numpy arrays already: no copy).

The code is the same on every ONNX Runtime provider; on the CPU it gives what plain `session.run` gives,
bit for bit (tests/test_gpu.py). Sessions that do not bind (OpenVINO's) hand over host arrays
(`Features.host`), which every head reads.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnxruntime as ort

Device = tuple[str, int]  # ('cpu', 0) or ('cuda', device id), as I/O binding names it
FLOAT32 = np.dtype(np.float32)


class Features:
    """Per feature scale, a chunk's float32 features (N, C, h, w): OrtValues on `device` (None: host arrays only)."""

    def __init__(self, values: list[ort.OrtValue] | None, device: Device | None, arrays: list[np.ndarray] | None):
        self.values, self.device, self.arrays = values, device, arrays

    @classmethod
    def host(cls, arrays: Sequence[np.ndarray]) -> "Features":
        """Features already on the host (sessions that do not bind)."""
        return cls(None, None, list(arrays))

    @classmethod
    def allocate(cls, shapes: Sequence[Sequence[int]], device: Device) -> "Features":
        """Uninitialized tensors for an embedder to write into: numpy arrays wrapped in place on the CPU."""
        if device[0] == "cpu":
            arrays = [np.empty(shape, np.float32) for shape in shapes]
            return cls([ort.OrtValue.ortvalue_from_numpy(a) for a in arrays], device, arrays)
        return cls(
            [ort.OrtValue.ortvalue_from_shape_and_type(list(s), np.float32, *device) for s in shapes], device, None
        )

    @classmethod
    def upload(cls, arrays: Sequence[np.ndarray], device: Device | None) -> "Features":
        """Host arrays (e.g. fused on the host) on `device`, where the heads' graphs read them."""
        if device is None:
            return cls.host(arrays)
        arrays = [np.ascontiguousarray(a, np.float32) for a in arrays]
        return cls([ort.OrtValue.ortvalue_from_numpy(a, *device) for a in arrays], device, arrays)

    @property
    def bound(self) -> bool:
        """Whether the features live in OrtValues a graph can be bound to."""
        return self.values is not None

    def numpy(self) -> list[np.ndarray]:
        """Per scale, the features on the host (copied from the device once, on first use)."""
        if self.arrays is None:
            self.arrays = [v.numpy() for v in self.values]
        return self.arrays

    def rows(self, positions: Sequence[int]) -> list[np.ndarray]:
        """Per scale, the host rows `positions`: what a head that does not bind reads (a view where they
        are one run, as a chunk's share of one task's tiles is; else a copy)."""
        first, n = positions[0], len(positions)
        if list(positions) == list(range(first, first + n)):
            return [f[first : first + n] for f in self.numpy()]
        return [f[list(positions)] for f in self.numpy()]

    def block(self, scale: int, start: int, n: int) -> tuple[list[int], int]:
        """Rows start..start+n of one scale as (shape, address): what I/O binding binds without a copy."""
        shape = self.values[scale].shape()
        return [n, *shape[1:]], self.values[scale].data_ptr() + start * math.prod(shape[1:]) * FLOAT32.itemsize

    def bind_rows(self, binding: ort.IOBinding, names: Sequence[str], positions: Sequence[int]) -> None:
        """Bind rows `positions` of each scale as the inputs `names` (in scale order): by address where they are
        contiguous, else gathered on the host (ONNX Runtime copies them to the device)."""
        first, n = positions[0], len(positions)
        if list(positions) != list(range(first, first + n)):
            for name, rows in zip(names, self.rows(positions), strict=True):
                binding.bind_cpu_input(name, np.ascontiguousarray(rows))
            return
        for scale, name in zip(range(len(self.values)), names, strict=True):
            binding.bind_input(name, *self.device, np.float32, *self.block(scale, first, n))
