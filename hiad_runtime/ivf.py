"""Inverted-file (IVF-Flat) search as matrix products: what faiss's GPU build does, on the CPU in numpy.

faiss's CPU IVF scan runs query by query (one list at a time for each), so probing 4 of 64 lists
costs far more than the 1/16 of an exact search it scans (a quarter of it on the demo, by CPU time).
Here the index's centroids and lists are read out of faiss once, every query is assigned its `nprobe`
nearest centroids with one product, and each list is scored against all the queries probing it with
one more:
||q - x||^2 = ||q||^2 - 2 q.x + ||x||^2. The neighbours found are the ones faiss finds (the same
probes and lists); the caller recomputes their exact distances, since the expanded form rounds.

The products are small (a few hundred queries by one list), where a multi-threaded BLAS spends more
on waking its threads than on the product (several times more on a loaded box): each search runs its
BLAS on one thread, and the lists are shared out to one worker per core instead. Each list's result
goes to its own rows, so the answer does not depend on the number of workers.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import Iterator

import faiss
import numpy as np
from threadpoolctl import ThreadpoolController


class IvfLists:
    """An IndexIVFFlat's coarse centroids and inverted lists as float32 matrices, searched by list."""

    def __init__(self, ivf: "faiss.IndexIVFFlat"):
        if not isinstance(ivf, faiss.IndexIVFFlat) or ivf.metric_type != faiss.METRIC_L2:
            raise TypeError(f"grouped IVF search reads an L2 IndexIVFFlat, not {type(ivf).__name__}")
        self.nprobe, self.d = ivf.nprobe, ivf.d
        self.centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        lists = ivf.invlists
        sizes = np.array([lists.list_size(i) for i in range(ivf.nlist)], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # list i is rows offsets[i]:offsets[i+1]
        self.vectors = np.empty((self.offsets[-1], self.d), np.float32)
        self.ids = np.empty(self.offsets[-1], np.int64)  # the bank row each vector is
        for i, n in enumerate(sizes):
            if n:
                rows = slice(self.offsets[i], self.offsets[i + 1])
                codes = faiss.rev_swig_ptr(lists.get_codes(i), int(n) * lists.code_size)
                self.vectors[rows] = np.frombuffer(codes, np.float32).reshape(n, self.d)
                self.ids[rows] = faiss.rev_swig_ptr(lists.get_ids(i), int(n))
        self.norms = np.einsum("nd,nd->n", self.vectors, self.vectors)
        self.centroid_norms = np.einsum("nd,nd->n", self.centroids, self.centroids)

    @property
    def nlist(self) -> int:
        """The number of inverted lists."""
        return len(self.centroids)

    def probes(self, queries: np.ndarray, nprobe: int) -> np.ndarray:
        """Each query's `nprobe` nearest centroids (M, nprobe), in no particular order."""
        if nprobe >= self.nlist:
            return np.broadcast_to(np.arange(self.nlist), (len(queries), self.nlist))
        d = queries @ self.centroids.T
        d *= -2
        d += self.centroid_norms  # + ||q||^2, the same for every centroid
        return np.argpartition(d, nprobe - 1, axis=1)[:, :nprobe]

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> np.ndarray:
        """The bank ids (M, k) of each query's k nearest vectors in its `nprobe` nearest lists (default:
        the index's nprobe), nearest first; -1 where those lists hold fewer than k vectors."""
        with one_blas_thread():
            return self._search(queries, k, min(nprobe or self.nprobe, self.nlist))

    def _search(self, queries: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        probes = self.probes(queries, nprobe).ravel()  # entry e: query e // nprobe probes list probes[e]
        entries = np.argsort(probes, kind="stable")  # grouped by list
        grouped = queries[entries // nprobe]  # the queries in that order: each list's are one block
        bounds = np.concatenate([[0], np.cumsum(np.bincount(probes, minlength=self.nlist))])
        found_d = np.full((len(entries), k), np.inf, np.float32)  # per entry: the k nearest in its list
        found_i = np.full((len(entries), k), -1, np.int64)

        def scan(lists: np.ndarray) -> None:  # each list against the block of queries probing it
            for i in lists:
                block, rows = slice(bounds[i], bounds[i + 1]), slice(self.offsets[i], self.offsets[i + 1])
                d = grouped[block] @ self.vectors[rows].T
                d *= -2
                d += self.norms[rows]  # + ||x||^2 (+ ||q||^2, the same for all of a query's candidates)
                best = _smallest(d, min(k, d.shape[1]))
                found_d[block, : best.shape[1]] = np.take_along_axis(d, best, 1)
                found_i[block, : best.shape[1]] = self.ids[rows][best]

        busy = np.flatnonzero((bounds[1:] > bounds[:-1]) & (self.offsets[1:] > self.offsets[:-1]))
        list(_pool().map(scan, [busy[w::WORKERS] for w in range(WORKERS)]))
        by_entry = np.empty_like(entries)
        by_entry[entries] = np.arange(len(entries))  # back from list order to query order
        found_i = found_i[by_entry].reshape(len(queries), nprobe * k)
        if nprobe == 1:
            return found_i
        found_d = found_d[by_entry].reshape(len(queries), nprobe * k)
        return np.take_along_axis(found_i, _smallest(found_d, k), 1)


WORKERS = len(os.sched_getaffinity(0))  # list scanners: one per core this process may run on


@cache
def _pool() -> ThreadPoolExecutor:
    """The list scanners, shared by every search."""
    return ThreadPoolExecutor(WORKERS, thread_name_prefix="hiad-ivf")


_searching = 0  # searches running now, in any thread
_searching_lock = threading.Lock()
_original_limits: list = []  # the BLAS thread limits from before the first of them


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """The loaded BLAS libraries (numpy's, faiss's) on one thread while any search runs; the first search
    to start sets it and the last to end restores it (searches overlap on a service's workers)."""
    global _searching
    with _searching_lock:
        if _searching == 0:
            _original_limits[:] = [_blas().limit(limits=1, user_api="blas")]
        _searching += 1
    try:
        yield
    finally:
        with _searching_lock:
            _searching -= 1
            if _searching == 0:
                _original_limits.pop().restore_original_limits()


@cache
def _blas() -> ThreadpoolController:
    """The BLAS libraries loaded in this process."""
    return ThreadpoolController()


def _smallest(d: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k smallest values, smallest first (ties: lower column first)."""
    if k == 1:
        return np.argmin(d, axis=1)[:, None]
    if k >= d.shape[1]:
        return np.argsort(d, axis=1, kind="stable")
    part = np.argpartition(d, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, np.take_along_axis(d, part, 1)), axis=-1)
    return np.take_along_axis(part, order, 1)
