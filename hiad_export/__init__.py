"""hiad_export: checkpoints -> deployment bundles (ONNX graphs, faiss indexes, manifest), with parity."""

__version__ = "0.1.0"
