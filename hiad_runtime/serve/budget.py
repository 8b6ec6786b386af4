"""A budget of request-body bytes held in memory at once.

A body is read whole before its request reaches the queue, so `--max-queue` alone does not bound
memory: 48 clients sending 60 MiB each held 4.5 GB. Each request claims its declared Content-Length
before a byte of its body is read (a chunked body claims as it arrives) and gives the bytes back
when it is answered. A claim beyond the budget is refused (503 + Retry-After), so an oversized
upload is turned away before it is read and a chunked one is no longer read once it passes.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from hiad_runtime.serve.pool import Overloaded


class BodyBudget:
    """Bytes of request bodies held; changed on the event loop only."""

    def __init__(self, limit_bytes: int, retry_after_s: Callable[[], int]):
        self.limit = limit_bytes
        self.held = 0
        self.retry_after_s = retry_after_s

    @contextlib.contextmanager
    def claim(self) -> Iterator["Claim"]:
        """A claim for one request's body, given back when the request is done."""
        claim = Claim(self)
        try:
            yield claim
        finally:
            self.held -= claim.bytes


class Claim:
    """One request's share of the budget: the bytes its body holds so far, given back when it is answered."""

    def __init__(self, budget: BodyBudget):
        self.budget = budget
        self.bytes = 0

    def cover(self, size: int) -> None:
        """Hold `size` bytes in all for this body, or raise Overloaded if the budget has no room."""
        extra = size - self.bytes
        if extra <= 0:
            return
        if self.budget.held + extra > self.budget.limit:
            what = f"request bodies in memory would pass {self.budget.limit / 2**20:g} MiB"
            raise Overloaded(what, self.budget.retry_after_s())
        self.budget.held += extra
        self.bytes = size
