"""Work shared out over the cores: one worker per core, each running its libraries on one thread.

A chunk's task heads are independent (one head per task, each with its own tiles), and most of a
head's work is small: a few hundred queries by one inverted list, a 64 x 64 grid. A multi-threaded BLAS
or OpenMP loop spends more on waking its threads for such work than it gains (several times more on a
loaded box), while a Python loop over the heads leaves all but one core idle between the products. So
the heads of a chunk run on one worker per core, each with one thread of the libraries it calls: the
BLAS (numpy's, faiss's; its limit is process-wide, so it holds while any such work runs) and OpenMP
(faiss's loops; its limit is per thread, so each worker sets its own once). The cores are used once,
by the workers. Results come back in the order of the work given, so the answer does not depend on
the number of cores.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import Callable, Iterable, Iterator, TypeVar

from threadpoolctl import ThreadpoolController

T = TypeVar("T")
R = TypeVar("R")

CORES = len(os.sched_getaffinity(0))  # the cores this process may run on


def map_on_cores(work: Callable[[T], R], items: Iterable[T], cores: int = CORES) -> list[R]:
    """`work` on every item, on at most `cores` workers (one per core) with the libraries on one thread each;
    results in item order. With one core (a replica given one thread) or one item, it runs here, with
    the libraries' own threads."""
    items = list(items)
    workers = min(cores, CORES, len(items))
    if workers <= 1:  # nothing to share out: the libraries keep their own threads
        return [work(item) for item in items]
    with one_blas_thread():
        shares = list(_pool().map(lambda w: [work(item) for item in items[w::workers]], range(workers)))
    results: list = [None] * len(items)
    for w, done in enumerate(shares):
        results[w::workers] = done  # worker w took items w, w + workers, ...
    return results


@cache
def _pool() -> ThreadPoolExecutor:
    """The workers, one per core, shared by every caller."""
    return ThreadPoolExecutor(CORES, thread_name_prefix="hiad-core", initializer=_one_openmp_thread)


def _one_openmp_thread() -> None:
    """OpenMP on one thread in this worker (OpenMP's limit is the calling thread's)."""
    _libraries().limit(limits=1, user_api="openmp")


_running = 0  # callers inside one_blas_thread now, in any thread
_running_lock = threading.Lock()
_original_limits: list = []  # the libraries' thread limits from before the first of them


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """The loaded BLAS libraries on one thread while any caller is inside; the first to enter sets it
    and the last to leave restores what was there (callers overlap on a service's workers)."""
    global _running
    with _running_lock:
        if _running == 0:
            _original_limits[:] = [_libraries().limit(limits=1, user_api="blas")]
        _running += 1
    try:
        yield
    finally:
        with _running_lock:
            _running -= 1
            if _running == 0:
                _original_limits.pop().restore_original_limits()


@cache
def _libraries() -> ThreadpoolController:
    """The BLAS and OpenMP libraries loaded in this process."""
    return ThreadpoolController()
