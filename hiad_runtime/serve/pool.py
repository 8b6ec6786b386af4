"""A fixed pool of inference threads behind a bounded queue.

onnxruntime and faiss release the GIL, so `workers` threads run that many inferences at once. At
most `max_queue` more requests wait; the next one is refused at once (`Overloaded`, answered 503
with Retry-After) instead of growing a backlog that no request would survive.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class Overloaded(Exception):
    """No room for one more request (the queue, or the bytes of request bodies held): answered 503."""

    def __init__(self, what: str, retry_after_s: int):
        super().__init__(f"server busy: {what}, retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class InferencePool:
    """`workers` inference threads and at most `max_queue` requests waiting; one more raises Overloaded."""

    def __init__(self, workers: int, max_queue: int):
        if workers < 1 or max_queue < 0:
            raise ValueError(f"workers must be >= 1 and max_queue >= 0 (got {workers}, {max_queue})")
        self.workers = workers
        self.max_queue = max_queue
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="inference")
        self.admitted = 0  # waiting + running; changed on the event loop only
        self.running = 0
        self.mean_run_s = 1.0  # running mean of one inference, for Retry-After
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Requests admitted but not yet running."""
        return max(self.admitted - self.running, 0)

    def retry_after_s(self) -> int:
        """Seconds until the queue has room again, if it drains at the current pace."""
        return max(1, math.ceil((self.max_queue + self.workers) * self.mean_run_s / self.workers))

    async def run(self, job: Callable[[], T], timeout_s: float) -> tuple[T, float]:
        """Run `job` on a worker; returns its result and the seconds it waited in the queue.

        Raises Overloaded when full and asyncio.TimeoutError past `timeout_s` (a job still queued is
        dropped; one already running finishes, and keeps its worker and queue place until then).
        """
        if self.admitted >= self.workers + self.max_queue:
            raise Overloaded("queue full", self.retry_after_s())
        self.admitted += 1
        loop = asyncio.get_running_loop()
        submitted = time.perf_counter()
        future: Future = self.executor.submit(self._timed, job, submitted)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            raise

    def _timed(self, job: Callable[[], T], submitted: float) -> tuple[T, float]:
        started = time.perf_counter()
        with self._lock:
            self.running += 1
        try:
            return job(), started - submitted
        finally:
            with self._lock:
                self.running -= 1
                self.mean_run_s = 0.9 * self.mean_run_s + 0.1 * (time.perf_counter() - started)

    def _release(self) -> None:
        self.admitted -= 1

    def shutdown(self) -> None:
        """At shutdown: drop the jobs still queued and wait for those running."""
        self.executor.shutdown(wait=True, cancel_futures=True)
