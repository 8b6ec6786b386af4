"""Inverted-file (IVF-Flat) search as matrix products: what faiss's GPU build does, on the CPU in numpy.

faiss's CPU IVF scan runs query by query (one list at a time for each), so probing 4 of 64 lists
costs far more than the 1/16 of an exact search it scans (a quarter of it on the demo, by CPU time).
Here the index's centroids and lists are read out of faiss once, every query is assigned its `nprobe`
nearest centroids with one product, and each list is scored against all the queries probing it with
one more. Both products give ||x||^2 - 2 q.x directly (the squared distance less ||q||^2, the same for
all of a query's candidates): the stored side is [-2 x, ||x||^2] and the queries carry a last 1. The
neighbours found are the ones faiss finds (the same probes and lists); the caller recomputes their
exact distances, since the expanded form rounds.

The products are small (a few hundred queries by one list), where a multi-threaded BLAS spends more
on waking its threads than on the product: a search runs on one thread, its BLAS too, and the cores
are used by searching several heads (or parts of one) at once (hiad_runtime/cores.py).
"""

from __future__ import annotations

import faiss
import numpy as np

from hiad_runtime.cores import one_blas_thread


def augmented(vectors: np.ndarray) -> np.ndarray:
    """[-2 x, ||x||^2] per row (N, d+1): a product with [q, 1] gives ||x||^2 - 2 q.x."""
    out = np.empty((len(vectors), vectors.shape[1] + 1), np.float32)
    np.multiply(vectors, -2, out=out[:, :-1])
    out[:, -1] = np.einsum("nd,nd->n", vectors, vectors)
    return out


class IvfLists:
    """An IndexIVFFlat's coarse centroids and inverted lists as float32 matrices, searched by list."""

    def __init__(self, ivf: "faiss.IndexIVFFlat"):
        if not isinstance(ivf, faiss.IndexIVFFlat) or ivf.metric_type != faiss.METRIC_L2:
            raise TypeError(f"grouped IVF search reads an L2 IndexIVFFlat, not {type(ivf).__name__}")
        self.nprobe, self.d = ivf.nprobe, ivf.d
        lists = ivf.invlists
        sizes = np.array([lists.list_size(i) for i in range(ivf.nlist)], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # list i is rows offsets[i]:offsets[i+1]
        vectors = np.empty((self.offsets[-1], self.d), np.float32)
        self.ids = np.empty(self.offsets[-1], np.int64)  # the bank row each vector is
        for i, n in enumerate(sizes):
            if n:
                rows = slice(self.offsets[i], self.offsets[i + 1])
                codes = faiss.rev_swig_ptr(lists.get_codes(i), int(n) * lists.code_size)
                vectors[rows] = np.frombuffer(codes, np.float32).reshape(n, self.d)
                self.ids[rows] = faiss.rev_swig_ptr(lists.get_ids(i), int(n))
        self.centroids = augmented(ivf.quantizer.reconstruct_n(0, ivf.nlist))
        self.lists = augmented(vectors)  # the lists one after another, as [-2 x, ||x||^2]
        # list numbers as 16-bit keys where they fit: numpy sorts those by radix, 10x its int64 merge sort
        self.list_number = np.uint16 if ivf.nlist <= 1 << 16 else np.int64

    @property
    def nlist(self) -> int:
        """The number of inverted lists."""
        return len(self.centroids)

    @property
    def vectors(self) -> np.ndarray:
        """The lists' vectors one after another (N, d), as the index holds them (-2 x / -2 is exact)."""
        return self.lists[:, :-1] / -2

    def probes(self, queries: np.ndarray, nprobe: int) -> np.ndarray:
        """Each query's `nprobe` nearest centroids (M, nprobe), by list number; `queries` end in a 1.

        The nprobe-th smallest distance of each row (a partition of values) marks the probed lists, read
        off in row order: half the time of partitioning their indices. A row with a tie at that distance
        marks more than nprobe lists; then the indices are partitioned, keeping nprobe of them."""
        if nprobe >= self.nlist:
            return np.broadcast_to(np.arange(self.nlist), (len(queries), self.nlist))
        d = queries @ self.centroids.T
        if nprobe == 1:
            return d.argmin(1)[:, None]
        marked = np.flatnonzero(d <= np.partition(d, nprobe - 1, axis=1)[:, nprobe - 1 : nprobe])
        if len(marked) != len(queries) * nprobe:  # a tie
            return np.sort(np.argpartition(d, nprobe - 1, axis=1)[:, :nprobe], axis=1)
        return (marked % self.nlist).reshape(len(queries), nprobe)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> np.ndarray:
        """The bank ids (M, k) of each query's k nearest vectors in its `nprobe` nearest lists (default:
        the index's nprobe), nearest first; -1 where those lists hold fewer than k vectors."""
        with one_blas_thread():
            return self._search(queries, k, min(nprobe or self.nprobe, self.nlist))

    def _search(self, queries: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        ones = np.empty((len(queries), self.d + 1), np.float32)
        ones[:, :-1], ones[:, -1] = queries, 1
        probes = self.probes(ones, nprobe).ravel()  # entry e: query e // nprobe probes list probes[e]
        entries = np.argsort(probes.astype(self.list_number), kind="stable")  # grouped by list
        query = entries // nprobe  # the query of each entry: each list's are one block
        bounds = np.concatenate([[0], np.cumsum(np.bincount(probes, minlength=self.nlist))]).tolist()
        offsets = self.offsets.tolist()
        found_d = np.full((len(entries), k), np.inf, np.float32)  # per entry: the k nearest in its list
        found_i = np.full((len(entries), k), -1, np.int64)
        for i in range(self.nlist):
            (b0, b1), (r0, r1) = bounds[i : i + 2], offsets[i : i + 2]
            if b0 == b1 or r0 == r1:
                continue
            # the list against the queries probing it, gathered here so they are in cache for the product
            d = ones[query[b0:b1]] @ self.lists[r0:r1].T
            if k == 1:
                best = d.argmin(1)
                found_d[b0:b1, 0] = d[np.arange(b1 - b0), best]
                found_i[b0:b1, 0] = self.ids[r0:r1][best]
            else:
                best = _smallest(d, min(k, r1 - r0))
                found_d[b0:b1, : best.shape[1]] = np.take_along_axis(d, best, 1)
                found_i[b0:b1, : best.shape[1]] = self.ids[r0:r1][best]
        by_entry = np.empty_like(entries)
        by_entry[entries] = np.arange(len(entries))  # back from list order to query order
        found_i = found_i[by_entry].reshape(len(queries), nprobe * k)
        if nprobe == 1:
            return found_i
        found_d = found_d[by_entry].reshape(len(queries), nprobe * k)
        return np.take_along_axis(found_i, _smallest(found_d, k), 1)


def _smallest(d: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k smallest values, smallest first (ties: lower column first)."""
    if k == 1:
        return np.argmin(d, axis=1)[:, None]
    if k >= d.shape[1]:
        return np.argsort(d, axis=1, kind="stable")
    part = np.argpartition(d, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, np.take_along_axis(d, part, 1)), axis=-1)
    return np.take_along_axis(part, order, 1)
