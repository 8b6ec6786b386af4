"""PyTorch modules -> ONNX graphs with a fixed, documented I/O contract; TensorRT engines where possible.

Embedder graphs: input `image` uint8 (batch, H, W, 3) RGB, output `embedding` float32
(batch, D, h, w); mean/std normalization is inside, so a C caller passes decoded pixels as they are.
Head graphs: input `embedding` float32 (batch, D, h, w), output `scores` float32 (batch, h, w).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from hiad_runtime.bundle import GraphSpec

OPSET = 17
# Above this, initializers go to an external data file (protobuf's 2 GiB limit on one file).
EXTERNAL_DATA_BYTES = 1 << 30


def _export(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_names: str | list[str],
    fold: bool = True,
    metadata: dict[str, str] | None = None,
) -> None:
    output_names = [output_names] if isinstance(output_names, str) else list(output_names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter: deterministic, fast, and it keeps the graph free of the
        # dynamo exporter's runtime shape asserts; the batch axis is declared dynamic.
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=[input_name],
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in [input_name, *output_names]},
            opset_version=OPSET,
            do_constant_folding=fold,
            dynamo=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    if metadata:
        onnx.helper.set_model_props(model, metadata)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
    elif metadata:
        onnx.save_model(model, str(path))


def export_embedder(embedder: nn.Module, tile_size: tuple[int, int], path: Path) -> GraphSpec:
    """Export an embedder for tiles of `tile_size` (width, height)."""
    example = torch.zeros(1, tile_size[1], tile_size[0], 3, dtype=torch.uint8)
    with torch.no_grad():
        out = embedder(example)
    _export(embedder, example, path, "image", "embedding")
    return GraphSpec(
        file=path.name,
        input_name="image",
        input_dtype="uint8",
        input_shape=["batch", tile_size[1], tile_size[0], 3],
        output_name="embedding",
        output_dtype="float32",
        output_shape=["batch", *out.shape[1:]],
        opset=OPSET,
    )


def export_head(head: nn.Module, embedding_shape: tuple[int, int, int], path: Path) -> GraphSpec:
    """Export a scoring head for embeddings of shape (D, h, w)."""
    example = torch.zeros(1, *embedding_shape)
    # No constant folding: it would store each bank chunk as a second copy of the bank.
    _export(head, example, path, "embedding", "scores", fold=False)
    return GraphSpec(
        file=path.name,
        input_name="embedding",
        input_dtype="float32",
        input_shape=["batch", *embedding_shape],
        output_name="scores",
        output_dtype="float32",
        output_shape=["batch", *embedding_shape[1:]],
        opset=OPSET,
    )


def tensorrt_status() -> tuple[bool, str]:
    """Whether TensorRT engines can be built here, and why not when they cannot."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the `tensorrt` Python package is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    return True, "tensorrt and a CUDA GPU are available"


def build_engine(onnx_path: Path, engine_path: Path, input_shape: list, max_batch: int = 16, fp16: bool = False) -> None:
    """Build a serialized TensorRT engine from an ONNX graph (batch 1..max_batch)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {[parser.get_error(i) for i in range(parser.num_errors)]}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    dims = [int(d) for d in input_shape[1:]]
    profile.set_shape(name, [1, *dims], [max(1, max_batch // 2), *dims], [max_batch, *dims])
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path.write_bytes(bytes(engine))
