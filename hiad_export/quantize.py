"""Reduced-precision embedder graphs: the same ONNX contract (uint8 tiles in, float32 features out).

int8: ONNX Runtime static quantization, QDQ format, per-channel weights, activations calibrated
(min-max) on tiles of the checkpoint's own training images, so no extra data is needed.
fp16: weights and activations in float16 with float32 inputs/outputs kept; meant for GPU providers
(on a CPU, ONNX Runtime inserts casts and it is usually slower than fp32).
Heads stay fp32: their inputs are the embedder's float32 outputs, whatever its precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

PRECISIONS = ("fp32", "fp16", "int8")


class _TileReader:
    """onnxruntime's CalibrationDataReader protocol over uint8 tiles (N, H, W, 3), in batches."""

    def __init__(self, input_name: str, tiles: np.ndarray, batch_size: int):
        self.batches: Iterator[dict] = iter(
            {input_name: np.ascontiguousarray(tiles[i : i + batch_size])} for i in range(0, len(tiles), batch_size)
        )

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def shape_arithmetic(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute on tensor shapes (e.g. 'same' padding from the input size).

    Quantizing them would round sizes (a 16-cell grid became 15), so they stay in float."""
    constants = {t.name for t in model.graph.initializer}
    shape_valued: set[str] = set()
    names = []
    for node in model.graph.node:  # topologically sorted in a valid ONNX graph
        if node.op_type == "Constant":
            constants.update(node.output)
            continue
        inputs = [i for i in node.input if i]
        if node.op_type == "Shape" or (
            any(i in shape_valued for i in inputs) and all(i in shape_valued or i in constants for i in inputs)
        ):
            shape_valued.update(node.output)
            names.append(node.name)
    return names


def quantize_int8(source: Path, target: Path, calibration_tiles: np.ndarray, batch_size: int = 4) -> None:
    """Static int8 QDQ quantization of an embedder graph, calibrated on `calibration_tiles`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration_tiles) == 0:
        raise ValueError("int8 quantization needs calibration tiles (the checkpoint's training images)")
    prepared = target.with_name(target.stem + ".prep.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared))
    try:
        quantize_static(
            str(prepared),
            str(target),
            _TileReader(graph.graph.input[0].name, calibration_tiles, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=shape_arithmetic(graph),
        )
    finally:
        prepared.unlink(missing_ok=True)


def convert_fp16(source: Path, target: Path) -> None:
    """float16 weights and activations; the graph's inputs and outputs keep their types."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save_model(model, str(target))


def reduce_precision(source: Path, precision: str, calibration_tiles: np.ndarray | None) -> Path:
    """Write `source`'s graph at `precision` next to it (`<stem>.<precision>.onnx`) and return its path."""
    if precision not in PRECISIONS[1:]:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    target = source.with_name(f"{source.stem}.{precision}.onnx")
    if precision == "int8":
        quantize_int8(source, target, calibration_tiles if calibration_tiles is not None else np.empty((0,)))
    else:
        convert_fp16(source, target)
    return target


def calibration_tiles(images: Sequence[np.ndarray], split_tiles) -> np.ndarray:
    """Every tile of every calibration image (already at the model's image size), stacked."""
    return np.concatenate([split_tiles(im) for im in images]) if images else np.empty((0,), np.uint8)
