"""hiad_runtime: the torch-free inspection runtime (numpy, onnxruntime, faiss, opencv)."""

__version__ = "0.1.0"
