"""PyTorch modules -> ONNX graphs with a fixed, documented I/O contract; TensorRT engines where possible.

Embedder graphs: input `image` uint8 (batch, H, W, 3) RGB, outputs `feature_0..feature_{n-1}` float32
(batch, C, h, w); mean/std normalization is inside, so a C caller passes decoded pixels as they are.
Head graphs: inputs `feature_0..` (the embedder's outputs), output `scores` float32 (batch, h, w).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from hiad_runtime.bundle import GraphSpec, TensorSpec

OPSET = 17
# Above this, initializers go to an external data file (protobuf's 2 GiB limit on one file).
EXTERNAL_DATA_BYTES = 1 << 30


def _export(
    module: nn.Module,
    examples: tuple,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    fold: bool = True,
    metadata: dict[str, str] | None = None,
) -> None:
    before = set(path.parent.iterdir())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter: deterministic, fast, and it keeps the graph free of the
        # dynamo exporter's runtime shape asserts; the batch axis is declared dynamic.
        torch.onnx.export(
            module.eval(),
            examples,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in (*inputs, *outputs)},
            opset_version=OPSET,
            do_constant_folding=fold,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))  # by path: graphs over protobuf's 2 GiB come with external data
    model = onnx.load(str(path))
    if metadata:
        onnx.helper.set_model_props(model, metadata)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data"
        )
    elif metadata:
        onnx.save_model(model, str(path))
    for extra in set(path.parent.iterdir()) - before - {path, path.with_name(path.name + ".data")}:
        extra.unlink()  # the exporter's own one-file-per-tensor external data, now folded into one file


def feature_names(count: int) -> list[str]:
    return [f"feature_{i}" for i in range(count)]


def export_embedder(embedder: nn.Module, tile_size: tuple[int, int], path: Path) -> GraphSpec:
    """Export an embedder for tiles of `tile_size` (width, height): `image` -> `feature_0..`."""
    example = torch.zeros(1, tile_size[1], tile_size[0], 3, dtype=torch.uint8)
    with torch.no_grad():
        outs = embedder(example)
    names = feature_names(len(outs))
    _export(embedder, (example,), path, ["image"], names)
    return GraphSpec(
        file=path.name,
        inputs=[TensorSpec("image", "uint8", ["batch", tile_size[1], tile_size[0], 3])],
        outputs=[TensorSpec(n, "float32", ["batch", *o.shape[1:]]) for n, o in zip(names, outs)],
        opset=OPSET,
    )


def export_head(head: nn.Module, feature_shapes: list[tuple[int, ...]], path: Path) -> GraphSpec:
    """Export a scoring head taking features of shapes (C, h, w): `feature_0..` -> `scores`."""
    examples = tuple(torch.zeros(1, *s) for s in feature_shapes)
    with torch.no_grad():
        out = head(*examples)
    names = feature_names(len(feature_shapes))
    # No constant folding: it would store each bank chunk of a k-NN head as a second copy of the bank.
    _export(head, examples, path, names, ["scores"], fold=False)
    return GraphSpec(
        file=path.name,
        inputs=[TensorSpec(n, "float32", ["batch", *s]) for n, s in zip(names, feature_shapes)],
        outputs=[TensorSpec("scores", "float32", ["batch", *out.shape[1:]])],
        opset=OPSET,
    )
