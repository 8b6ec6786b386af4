"""Native files by head kind, mirroring hiad_runtime/heads.py's table: what a kind's fast path reads.

A 'knn' head's native path (hiad_runtime's FaissKnnHead) searches a faiss index of the memory bank
and re-ranks what it returns against the bank itself: written here as `<stem>.faiss` and
`<stem>_bank.npy`. The index is exact `Flat` by default, or any faiss index_factory string (e.g.
"IVF64,Flat" with search "nprobe=8", "HNSW32" with "efSearch=64", "SQ8"). Writers know head kinds,
never detectors: a 'knn' head's detector holds its bank as `state()["memory_bank"]` (N, D).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np
import torch

Artifacts = tuple[dict[str, str], dict[str, Any]]  # (role -> file name, manifest params)


def build_index(bank: np.ndarray, factory: str = "Flat", seed: int = 0) -> faiss.Index:
    bank = np.ascontiguousarray(bank, np.float32)
    try:
        index = faiss.index_factory(bank.shape[1], factory, faiss.METRIC_L2)
    except RuntimeError as e:
        raise ValueError(f"--index {factory!r} is not a faiss index_factory string ({e})") from e
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and ivf.nlist > bank.shape[0]:
            raise ValueError(f"--index {factory!r}: {ivf.nlist} lists for a bank of {bank.shape[0]} vectors")
        if ivf is not None:
            ivf.cp.seed = seed
        index.train(bank)
    index.add(bank)
    return index


def write_knn(state: dict[str, torch.Tensor], folder: Path, stem: str, options: dict, seed: int) -> Artifacts:
    """A faiss index of the bank (`options['index']`, an index_factory string; its training seeded by
    `seed`) and the bank as .npy for exact re-ranking of what the index returns."""
    factory, search = options.get("index", "Flat"), options.get("search_params", "")
    bank = state["memory_bank"].numpy().astype(np.float32)
    np.save(folder / f"{stem}_bank.npy", bank, allow_pickle=False)
    faiss.write_index(build_index(bank, factory, seed), str(folder / f"{stem}.faiss"))
    params = {"index_factory": factory, "search_params": search, "exact": factory.strip().lower() == "flat"}
    return {"index": f"{stem}.faiss", "bank": f"{stem}_bank.npy"}, params


WRITERS: dict[str, Callable[..., Artifacts]] = {"knn": write_knn}  # head kind -> its native files


def write_native(
    kind: str, state: dict[str, torch.Tensor], folder: Path, stem: str, options: dict, seed: int
) -> Artifacts:
    """The native files of a head of `kind` (none for a kind whose only path is its ONNX graph)."""
    writer = WRITERS.get(kind)
    return ({}, {}) if writer is None else writer(state, folder, stem, options, seed)
