"""Memory banks as faiss indexes. Default exact `Flat`; any faiss index_factory string otherwise
(e.g. "IVF64,Flat" with search "nprobe=8", "HNSW32" with "efSearch=64", "SQ8")."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np


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


def write_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))
