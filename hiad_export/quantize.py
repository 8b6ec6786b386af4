"""Reduced-precision embedder graphs: the same ONNX contract (uint8 tiles in, float32 features out).

int8: ONNX Runtime static quantization, QDQ format, per-channel int8 weights, uint8 activations
calibrated (min-max) on tiles of the checkpoint's own training images, so no extra data is needed.
Two measures keep the embedding within ~3 % (relative L2) of fp32 instead of ~23 % (issue #10,
docs/benchmarks.md "int8 accuracy"):
- Bias correction: rounding a Conv's weights shifts each output channel's mean by dW @ E[input]
  (large after ReLU6, whose outputs are all positive), and the shifts compound through the network;
  each quantized Conv's bias absorbs its own shift, E[input] measured on the calibration tiles.
- The high-resolution head of the backbone (input normalization and every node up to the last Conv
  at stride <= 4) stays float: quantization noise there (low-contrast 8-bit images carry little
  signal per pixel) is amplified by every later layer. It is about 1/4 of the embedder's MACs; the rest,
  the channel pooling/aggregation tail included, runs quantized (that tail adds no measurable error).
fp16: weights and activations in float16 with float32 inputs/outputs kept; meant for GPU providers
(on a CPU, ONNX Runtime inserts casts and it is usually slower than fp32).
Heads stay fp32: their inputs are the embedder's float32 outputs, whatever its precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from hiad_runtime.bundle import Precision


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


def _float_session(model: onnx.ModelProto, outputs: list[str]):
    """An ONNX Runtime session of `model` that returns the float tensors `outputs`."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in outputs)
    return ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])


def conv_statistics(model: onnx.ModelProto, tiles: np.ndarray, batch_size: int) -> tuple[dict, dict]:
    """Per Conv node: its input's per-channel mean over `tiles`, and its output stride (tile width / output width)."""
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    names = list(dict.fromkeys([n.input[0] for n in convs] + [n.output[0] for n in convs]))
    session = _float_session(model, names)
    sums: dict[str, np.ndarray] = {}
    for i in range(0, len(tiles), batch_size):
        values = dict(zip(names, session.run(names, {model.graph.input[0].name: tiles[i : i + batch_size]})))
        for conv in convs:
            channel_means = values[conv.input[0]].mean(axis=(2, 3), dtype=np.float64)
            sums[conv.name] = sums.get(conv.name, 0) + channel_means.sum(axis=0)
    strides = {n.name: tiles.shape[2] / values[n.output[0]].shape[3] for n in convs}
    return {name: total / len(tiles) for name, total in sums.items()}, strides


def high_resolution_nodes(model: onnx.ModelProto, strides: dict[str, float], max_stride: float = 4) -> list[str]:
    """Every node up to the last Conv whose output stride is <= `max_stride`, in graph order."""
    names = [n.name for n in model.graph.node]
    last = max((i for i, n in enumerate(model.graph.node) if strides.get(n.name, np.inf) <= max_stride), default=-1)
    return names[: last + 1]


def _dequantized(inits: dict, dq: onnx.NodeProto) -> np.ndarray:
    """The float value a DequantizeLinear of an initializer yields (per tensor or per channel)."""
    q, scale, zero = (numpy_helper.to_array(inits[name]).astype(np.float64) for name in dq.input[:3])
    shape = [1] * q.ndim
    if scale.ndim:
        shape[next((a.i for a in dq.attribute if a.name == "axis"), 1)] = -1
    return (q - zero.reshape(shape)) * scale.reshape(shape)


def correct_bias(float_model: onnx.ModelProto, quantized: onnx.ModelProto, input_means: dict[str, np.ndarray]) -> None:
    """Subtract from each quantized Conv's bias the output mean shift its weight rounding causes: dW @ E[input]."""
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in float_model.graph.initializer}
    float_convs = {n.name: n for n in float_model.graph.node if n.op_type == "Conv"}
    inits = {t.name: t for t in quantized.graph.initializer}
    dequantize = {n.output[0]: n for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    for conv in quantized.graph.node:
        if conv.op_type != "Conv" or conv.input[1] not in dequantize:
            continue
        rounded = _dequantized(inits, dequantize[conv.input[1]])
        delta = (rounded - weights[float_convs[conv.name].input[1]]).sum(axis=(2, 3))  # (out, in / groups)
        groups = next((a.i for a in conv.attribute if a.name == "group"), 1)
        mean = np.repeat(input_means[conv.name].reshape(groups, -1), len(delta) // groups, axis=0)  # per output channel
        shift = (delta * mean).sum(axis=1)
        if len(conv.input) > 2 and conv.input[2]:  # the quantizer's int32 bias, scale = input scale x weight scale
            bias, scale = (inits[name] for name in dequantize[conv.input[2]].input[:2])
            corrected = np.round(numpy_helper.to_array(bias) - shift / numpy_helper.to_array(scale))
            bias.CopyFrom(numpy_helper.from_array(corrected.astype(np.int32), bias.name))
        else:
            name = f"{conv.name}.bias_correction"
            quantized.graph.initializer.append(numpy_helper.from_array((-shift).astype(np.float32), name))
            conv.input.append(name)


def quantize_int8(source: Path, target: Path, calibration_tiles: np.ndarray, batch_size: int = 4) -> None:
    """Static int8 QDQ quantization of an embedder graph, calibrated and bias-corrected on `calibration_tiles`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration_tiles) == 0:
        raise ValueError("int8 quantization needs calibration tiles (the checkpoint's training images)")
    prepared = target.with_name(target.stem + ".prep.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared))
    try:
        input_means, strides = conv_statistics(graph, calibration_tiles, batch_size)
        quantize_static(
            str(prepared),
            str(target),
            _TileReader(graph.graph.input[0].name, calibration_tiles, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=sorted(set(shape_arithmetic(graph)) | set(high_resolution_nodes(graph, strides))),
        )
    finally:
        prepared.unlink(missing_ok=True)
    quantized = onnx.load(str(target))
    correct_bias(graph, quantized, input_means)
    onnx.save_model(quantized, str(target))


def convert_fp16(source: Path, target: Path) -> None:
    """float16 weights and activations; the graph's inputs and outputs keep their types."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save_model(model, str(target))


def reduce_precision(source: Path, precision: str, calibration_tiles: np.ndarray | None) -> Path:
    """Write `source`'s graph at `precision` next to it (`<stem>.<precision>.onnx`) and return its path."""
    if precision not in (Precision.fp16, Precision.int8):
        raise ValueError(f"precision must be fp16 or int8 (fp32 is the graph as exported), got {precision!r}")
    target = source.with_name(f"{source.stem}.{precision}.onnx")
    if precision == "int8":
        quantize_int8(source, target, calibration_tiles if calibration_tiles is not None else np.empty((0,)))
    else:
        convert_fp16(source, target)
    return target


def calibration_tiles(images: Sequence[np.ndarray], split_tiles) -> np.ndarray:
    """Every tile of every calibration image (already at the model's image size), stacked."""
    return np.concatenate([split_tiles(im) for im in images]) if images else np.empty((0,), np.uint8)
