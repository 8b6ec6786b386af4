"""Scoring heads by kind: the embedder's outputs (each (B, C, h, w)) -> anomaly scores (B, h, w).

Every head has a portable path, its ONNX graph (what a C program runs). A kind may add a native fast
path: 'knn' searches a faiss index (any index_factory type; an IVF-Flat index's lists are searched as
matrix products, hiad_runtime/ivf.py) and re-ranks the neighbours it returns with exact L2 distances
against the bank, so it agrees with the graph to float rounding. This table knows
head kinds, never detectors. `HeadCache` bounds the memory the heads of a many-task bundle hold.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from enum import StrEnum
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import cv2
import numpy as np

try:
    import faiss
except ImportError as e:  # the base package pulls neither build on purpose
    raise ImportError("hiad_runtime needs faiss: pip install 'hiad-deploy[cpu]' (or '[gpu]' on a CUDA box)") from e

from hiad_runtime.backends import SessionFactory
from hiad_runtime.bundle import BundleError, HeadSpec
from hiad_runtime.features import Features
from hiad_runtime.ivf import IvfLists

log = logging.getLogger("hiad_runtime")


class HeadPath(StrEnum):
    """How heads run: `native` takes a head kind's fast path (faiss for k-NN) where it has one, else its
    graph; `onnx` runs every head's exported graph (what a C program runs); `auto`: `onnx` where the graphs
    run on a GPU (faiss is the CPU build here, and the features stay on the device), else `native`."""

    auto = "auto"
    native = "native"
    onnx = "onnx"


def resolve_head_path(path: str, on_gpu: bool) -> HeadPath:
    """'auto' for sessions on a GPU (`on_gpu`) or not; any other path as it is (checked)."""
    path = as_head_path(path)
    if path is not HeadPath.auto:
        return path
    return HeadPath.onnx if on_gpu else HeadPath.native


def as_head_path(name: str) -> HeadPath:
    """The HeadPath a name stands for; a ValueError naming the choices otherwise."""
    try:
        return HeadPath(name)
    except ValueError:
        raise ValueError(f"head path {name!r} is not one of {[p.value for p in HeadPath]}") from None


class Head(Protocol):
    """The embedder's outputs (each (B, C, h, w)) -> anomaly scores (B, h, w)."""

    def __call__(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Anomaly scores (B, h, w) for the embedder's outputs, one (B, C, h, w) array per feature scale."""


class NativeHead(Head, Protocol):
    """A head kind's fast path, made from the bundle files its spec names."""

    @staticmethod
    def files(spec: HeadSpec) -> list[str]:
        """The bundle files loading reads (the head memory budget counts their bytes)."""
        ...

    def __init__(self, root: Path, spec: HeadSpec, sessions: SessionFactory): ...


class OnnxHead:
    """Any head, run as its exported graph."""

    def __init__(self, root: Path, spec: HeadSpec, sessions: SessionFactory):
        self.session = sessions.create(root / spec.graph.file)
        self.names = [t.name for t in spec.graph.inputs]
        self.output = spec.graph.outputs[0].name

    def __call__(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """The graph's score grid (B, h, w) for the embedder's outputs, fed as float32 in the graph's input order."""
        feeds = {n: np.ascontiguousarray(f, np.float32) for n, f in zip(self.names, features, strict=True)}
        return self.session.run(None, feeds)[0]

    def bound(self, features: Features, positions: Sequence[int]) -> np.ndarray:
        """The scores of rows `positions`, read where the features are (I/O binding); the scores come to the host."""
        binding = self.session.io_binding()
        features.bind_rows(binding, self.names, positions)
        binding.bind_output(self.output, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()


def score(head: Head, features: Features, positions: Sequence[int]) -> np.ndarray:
    """A head's scores (B, h, w) for rows `positions` of a chunk's features: a graph reads them where they
    are (hiad_runtime/features.py), any other head (faiss, or sessions that do not bind) from the host."""
    if isinstance(head, OnnxHead) and features.bound:
        return head.bound(features, positions)
    return head(features.rows(positions))


def position_rows(features: np.ndarray) -> np.ndarray:
    """Features (B, D, h, w) as one float32 row per position (B*h*w, D), the queries of a k-NN search.
    Each map is transposed by OpenCV: 8x faster than numpy's strided copy (2 MB per 512-px tile)."""
    b, d, h, w = features.shape
    features = np.ascontiguousarray(features, np.float32)
    rows = np.empty((b * h * w, d), np.float32)
    for i in range(b):
        cv2.transpose(features[i].reshape(d, h * w), dst=rows[i * h * w : (i + 1) * h * w])
    return rows


def exact_knn_distance(queries: np.ndarray, bank: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Mean of |q - b| over each query's neighbour indices (M, k) -> (M,)."""
    diff = queries[:, None, :] - bank[indices]
    return np.sqrt(np.einsum("mkd,mkd->mk", diff, diff)).mean(1)


def flat_vectors(index: "faiss.IndexFlat") -> np.ndarray:
    """The (ntotal, d) float32 vectors a Flat index holds, as a view (valid while `index` lives)."""
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def is_ivf_flat(index: "faiss.Index") -> bool:
    """Whether `index` is an L2 IVF-Flat index (what `IvfLists` searches)."""
    return isinstance(index, faiss.IndexIVFFlat) and index.metric_type == faiss.METRIC_L2


class FaissKnnHead:
    """k-NN via a faiss index, distances recomputed exactly for the neighbours it returns. An IVF-Flat
    index is read out of faiss at load and searched list by list as matrix products (`IvfLists`: the
    same neighbours as faiss's per-query scan, for 1.5-2.6x less CPU time; docs/benchmarks.md, #22)."""

    @staticmethod
    def files(spec: HeadSpec) -> list[str]:
        """What loading reads: the index, and the bank unless a Flat index holds it already."""
        return [spec.files["index"]] + ([] if spec.params.get("index_factory") == "Flat" else [spec.files["bank"]])

    def __init__(self, root: Path, spec: HeadSpec, sessions: SessionFactory):
        index_path, bank_path = root / spec.files["index"], root / spec.files["bank"]
        try:
            self.index = faiss.read_index(str(index_path))
            # A Flat index stores the bank itself: re-rank against its vectors instead of a second copy.
            self.bank = (
                flat_vectors(self.index)
                if isinstance(self.index, faiss.IndexFlat)
                else np.load(bank_path, allow_pickle=False)
            )
        except (RuntimeError, ValueError, OSError) as e:
            raise BundleError(f"{index_path.parent}: cannot load k-NN index or bank ({e})") from e
        if self.bank.shape != (self.index.ntotal, self.index.d) or self.bank.dtype != np.float32:
            raise BundleError(
                f"{bank_path}: bank {self.bank.shape} does not match index ({self.index.ntotal}, {self.index.d})"
            )
        if spec.params.get("search_params"):
            faiss.ParameterSpace().set_index_parameters(self.index, spec.params["search_params"])
        self.k = int(spec.params["k"])
        self.lists = IvfLists(self.index) if is_ivf_flat(self.index) else None
        if self.lists is not None:
            del self.index  # its lists live on in `lists`

    def neighbours(self, queries: np.ndarray) -> np.ndarray:
        """The bank rows (M, k) the index finds for each query (-1 where it finds fewer than k)."""
        if self.lists is not None:
            return self.lists.search(queries, self.k)
        return self.index.search(queries, self.k)[1]

    def __call__(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Per position, the mean exact L2 distance to its k nearest bank vectors: (B, D, h, w) -> (B, h, w)."""
        (embedding,) = features
        b, _, h, w = embedding.shape
        queries = position_rows(embedding)
        idx = self.neighbours(queries)
        idx = np.where(idx < 0, 0, idx)  # approximate indexes may return fewer than k
        return exact_knn_distance(queries, self.bank, idx).reshape(b, h, w).astype(np.float32)


NATIVE: dict[str, type[NativeHead]] = {"knn": FaissKnnHead}  # head kind -> its fast path (a class + an entry)


def has_native_path(spec: HeadSpec) -> bool:
    """Whether the head's kind has a native fast path (else only its ONNX graph runs it)."""
    return spec.kind in NATIVE


def native(spec: HeadSpec, path: str) -> bool:
    """Whether head path `path` (resolved: native or onnx) runs this head by its kind's native path (else its graph)."""
    path = as_head_path(path)
    if path is HeadPath.auto:
        raise ValueError("head path 'auto' is resolved before heads load (resolve_head_path)")
    return path is HeadPath.native and spec.kind in NATIVE


def load_head(root: Path, spec: HeadSpec, sessions: SessionFactory, path: str = "native") -> Head:
    """The kind's native path when asked for and available, else the ONNX graph."""
    return NATIVE[spec.kind](root, spec, sessions) if native(spec, path) else OnnxHead(root, spec, sessions)


def head_files(spec: HeadSpec, path: str = "native") -> list[str]:
    """The bundle files `load_head(..., spec, ..., path)` may read."""
    return NATIVE[spec.kind].files(spec) if native(spec, path) else [spec.graph.file]


class HeadCache:
    """Task heads by name, loaded on first use and kept while their files' bytes fit `budget`; the
    least recently used are released first.

    With a budget above the bundle's heads every head stays resident (`preload` loads them all up
    front); below it (256 O2O heads of an 8192^2 image) each chunk loads the heads its tiles need and
    the page cache makes reading them again cheap. The first head read a second time is logged once
    (warning, logger "hiad_runtime"), with the budget that would keep them all.
    """

    def __init__(self, load: Callable[[str], Head], sizes: Mapping[str, int], budget: int):
        self.load, self.sizes, self.budget = load, dict(sizes), budget
        self.heads: OrderedDict[str, Head] = OrderedDict()
        self.loads = 0  # heads read from the bundle so far
        self.reloads = 0  # of them, heads read again after being released
        self.released: set[str] = set()
        self.lock = threading.Lock()  # heads are fetched from the workers scoring a chunk

    @property
    def resident_bytes(self) -> int:
        """The bytes of the heads loaded now, what `budget` bounds."""
        return sum(self.sizes[name] for name in self.heads)

    def __getitem__(self, name: str) -> Head:
        with self.lock:
            return self._get(name)

    def _get(self, name: str) -> Head:
        if name in self.heads:
            self.heads.move_to_end(name)
            return self.heads[name]
        while self.heads and self.resident_bytes + self.sizes[name] > self.budget:
            self.released.add(self.heads.popitem(last=False)[0])
        head = self.heads[name] = self.load(name)
        self.loads += 1
        if name in self.released:
            self.reloads += 1
            if self.reloads == 1:
                total = sum(self.sizes.values()) / 2**20
                log.warning(
                    f"task heads are read again for every image: their files take {total:.0f} MB, more "
                    f"than the head memory of {self.budget / 2**20:.0f} MB; give --head-memory "
                    f"{math.ceil(total)} (or more) to keep them loaded, if the machine has the memory"
                )
        return head

    def preload(self) -> None:
        """Load heads in order while they fit: all of them when the budget allows."""
        for name, size in self.sizes.items():
            if self.resident_bytes + size > self.budget:
                return
            self[name]
