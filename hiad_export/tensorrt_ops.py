"""Which ONNX ops of a graph TensorRT's ONNX parser would reject, checked by op type before any engine
is built (a box without TensorRT can still tell whether a graph will convert).

TENSORRT_OPS: the operators marked supported ("Y") in onnx-tensorrt's docs/operators.md (TensorRT 8.4
table, github.com/onnx/onnx-tensorrt, commit 009d654), plus LayerNormalization (opset 17), which the
parser takes from TensorRT 8.6 on. Per-op restrictions (e.g. Resize modes) are not checked here.

    python -m hiad_export.tensorrt_ops graph.onnx [...]   # prints each graph's op types and any rejected
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

TENSORRT_OPS = frozenset(
    """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GRU HardSigmoid Identity If ImageScaler
InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean Min Mul Neg NonMaxSuppression Not Or Pad ParametricSoftplus Pow PRelu
QuantizeLinear RandomUniform RandomUniformLike Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
RNN Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Unsqueeze Upsample Where Xor LayerNormalization
""".split()
)


def op_types(path: str | Path) -> set[str]:
    """Op types of a graph's nodes, subgraphs included (default ONNX domain only)."""

    def walk(graph):
        for node in graph.node:
            yield node.op_type
            for attr in node.attribute:
                if attr.g.node:
                    yield from walk(attr.g)

    return set(walk(onnx.load(str(path), load_external_data=False).graph))


def rejected_ops(path: str | Path) -> set[str]:
    """Op types of the graph that are not in TENSORRT_OPS."""
    return op_types(path) - TENSORRT_OPS


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: ops {sorted(op_types(arg))}; rejected by TensorRT: {sorted(rejected_ops(arg)) or 'none'}")
