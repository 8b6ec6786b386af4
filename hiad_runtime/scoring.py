"""Scoring heads: embeddings (B, D, h, w) -> anomaly scores (B, h, w).

'knn' heads have two interchangeable paths: a faiss index (fast; any index_factory type) whose
neighbours are re-ranked with exact L2 distances against the bank, and the self-contained ONNX head
(what a C program runs). Other detectors' heads run as ONNX graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

try:
    import faiss
except ImportError as e:  # the base package pulls neither build on purpose
    raise ImportError("hiad_runtime needs faiss: pip install 'hiad-deploy[cpu]' (or '[gpu]' on a CUDA box)") from e

from hiad_runtime.bundle import BundleError, HeadSpec
from hiad_runtime.sessions import SessionFactory


class Scorer(Protocol):
    def __call__(self, embedding: np.ndarray) -> np.ndarray: ...


def exact_knn_distance(queries: np.ndarray, bank: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Mean of |q - b| over each query's neighbour indices (M, k) -> (M,)."""
    diff = queries[:, None, :] - bank[indices]
    return np.sqrt(np.einsum("mkd,mkd->mk", diff, diff)).mean(1)


class FaissKnnScorer:
    """k-NN via a faiss index, distances recomputed exactly for the neighbours it returns."""

    def __init__(self, index_path: Path, bank_path: Path, k: int, search_params: str = ""):
        try:
            self.index = faiss.read_index(str(index_path))
            self.bank = np.load(bank_path, allow_pickle=False)
        except (RuntimeError, ValueError, OSError) as e:
            raise BundleError(f"{index_path.parent}: cannot load k-NN index or bank ({e})") from e
        if self.bank.shape != (self.index.ntotal, self.index.d):
            raise BundleError(f"{bank_path}: bank {self.bank.shape} does not match index ({self.index.ntotal}, {self.index.d})")
        if search_params:
            faiss.ParameterSpace().set_index_parameters(self.index, search_params)
        self.k = k

    def __call__(self, embedding: np.ndarray) -> np.ndarray:
        b, d, h, w = embedding.shape
        queries = np.ascontiguousarray(embedding.transpose(0, 2, 3, 1).reshape(-1, d), dtype=np.float32)
        _, idx = self.index.search(queries, self.k)
        idx = np.where(idx < 0, 0, idx)  # approximate indexes may return fewer than k
        return exact_knn_distance(queries, self.bank, idx).reshape(b, h, w).astype(np.float32)


class OnnxScorer:
    """A head exported as an ONNX graph (k-NN with the bank inside, or any other detector's head)."""

    def __init__(self, graph_path: Path, sessions: SessionFactory, input_name: str):
        self.session = sessions.create(graph_path)
        self.input_name = input_name

    def __call__(self, embedding: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(embedding, np.float32)})[0]


def make_scorer(root: Path, head: HeadSpec, sessions: SessionFactory, prefer: str = "faiss") -> Scorer:
    """The faiss path for k-NN heads when available and preferred, the ONNX head otherwise."""
    if head.kind == "knn" and prefer == "faiss" and head.index and head.bank:
        return FaissKnnScorer(root / head.index, root / head.bank, int(head.params["k"]), head.search_params)
    return OnnxScorer(root / head.graph.file, sessions, head.graph.input_name)
