"""Throughput mode: decode the next images on a worker thread while the current one is inferred.

Decoding (OpenCV) and inference (ONNX Runtime, faiss) release the GIL, so one thread overlaps them.
`depth` images are decoded ahead at most, which bounds the memory they take.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched(items: Iterable[T], load: Callable[[T], R], depth: int) -> Iterator[tuple[T, Future]]:
    """(item, future of load(item)) in order, with up to `depth` loads running ahead; depth 0 loads inline."""
    if depth <= 0:
        for item in items:
            future: Future = Future()
            try:
                future.set_result(load(item))
            except Exception as e:  # handed to the caller through the future, as on the worker
                future.set_exception(e)
            yield item, future
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hiad-decode") as pool:
        pending: deque[tuple[T, Future]] = deque()
        for item in items:
            pending.append((item, pool.submit(load, item)))
            if len(pending) > depth:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
